"""Sample quality: a classifier of real images (for the digits, a plain one trained on the training digits).

Reported for generated images: the share classified with confidence >= 0.8 and the histogram of
predicted classes (a model that forgot a class shows a hole there).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

CONFIDENCE = 0.8


@lru_cache(maxsize=1)
def digit_classifier():
    """Logistic regression on the 1,500 training digits (about 97% accurate on the 297 held out)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from dtrak_core.model.data import load_digits

    train = load_digits("train")
    # One BLAS thread: the problem is tiny, and on a loaded 2-core machine OpenBLAS's spinning
    # threads made this fit take 10 s instead of 0.1 s (the app's first samples wait for it).
    with threadpool_limits(1):
        return LogisticRegression(max_iter=5000).fit(train.images.flatten(1).numpy(), train.labels.numpy())


def classify(images) -> tuple[np.ndarray, np.ndarray]:
    """(labels, confidences) for digit images (B, 1, 8, 8) in [-1, 1]."""
    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    if x.shape[1] != 64:
        raise ValueError(f"the digit classifier takes 1x8x8 images, got {tuple(np.shape(images))[1:]}")
    p = digit_classifier().predict_proba(x)
    return p.argmax(1), p.max(1)


def sample_quality(images, classifier=None) -> dict:
    """The report for generated images, read by `classifier` (an object with `classify(images)`;
    None: the digit classifier)."""
    labels, conf = classify(images) if classifier is None else classifier.classify(images)
    return {
        "n": int(len(labels)),
        "share_confident": float((conf >= CONFIDENCE).mean()),
        "confidence_threshold": CONFIDENCE,
        "class_histogram": np.bincount(labels, minlength=len(getattr(classifier, "classes", range(10)))).tolist(),
        "mean_confidence": float(conf.mean()),
    }
