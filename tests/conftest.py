import os

import dtrak_core  # noqa: F401  (first: passive OpenMP waits before torch loads)
import pytest
import torch

from dtrak_core.data import load_digits
from dtrak_core.model import build_scheduler, build_unet

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine two threads can be 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_unet():
    """A tiny UNet (channels (4, 8), ~10K parameters) with non-trivial weights."""
    return build_unet(block_out_channels=(4, 8), seed=1).eval()


@pytest.fixture(scope="session")
def scheduler():
    return build_scheduler()


@pytest.fixture(scope="session")
def digits():
    return load_digits("train")
