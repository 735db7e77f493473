"""The class-matched counterfactual control (experiments/class_matched_counterfactual.py) removes
the kernel's strongest images with a fixed number of the target's class."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
from class_matched_counterfactual import matched_removal  # noqa: E402


def test_matched_removal_takes_as_many_of_the_class_as_asked_each_in_the_kernels_order():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1, 2, 2])
    order = np.array([9, 0, 2, 8, 4, 1, 6, 3, 5, 7])  # strongest first
    removed = matched_removal(order, labels, target_label=0, same=2, k=5)
    assert removed.tolist() == [0, 2, 9, 8, 1]  # 2 of class 0 (its first two), then the first 3 of the rest
    assert np.sum(labels[removed] == 0) == 2
    assert matched_removal(order, labels, 0, 0, 3).tolist() == [9, 8, 1]
    assert matched_removal(order, labels, 0, 9, 5).tolist()[:4] == [0, 2, 4, 6]  # the class runs out: the rest fill k
