import dtrak_core  # noqa: F401  (first: passive OpenMP waits before torch loads)

# isort: split
import contextlib
import importlib
import os
import sys

import pytest
import torch

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.model.data import load_digits
from dtrak_core.model.training import TrainConfig
from dtrak_core.model.unet import build_scheduler, build_unet

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


# -- a complete tiny model folder, and the app module loaded on it ------------------------------
# Long enough (a few seconds) for the browser test to cancel a retrain in flight.
TINY_TRAIN = TrainConfig(steps=250, batch_size=16, block_out_channels=(4, 8))
TINY_SETTINGS = (FeatureSetting("square", K=4, k=32), FeatureSetting("loss", K=4, k=32))
EXAMPLE_SEED, EXAMPLE_K = 1000, 30
EXAMPLE_TRAIN = TrainConfig(steps=5, batch_size=16, block_out_channels=(4, 8))  # the gallery's retrains


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """torch on `n` threads inside the block: on a busy 2-core machine two threads per process
    oversubscribe the cores and tiny models train ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def filled_store(path, unet, scheduler, train, setting: FeatureSetting):
    """A complete feature store of `train` under `setting`, filled by the real featurizer."""
    from dtrak_core.attribution.features import Featurizer
    from dtrak_core.attribution.store import FeatureStore
    from dtrak_core.model.unet import checkpoint_hash

    identity = FeatureStore.identity(setting, checkpoint_hash(unet), train.fingerprint)
    store = FeatureStore.create(str(path), identity, len(train), setting.k)
    return store.fill(Featurizer(unet, scheduler, setting), train.images, show_bar=False)


def build_tiny_assets(root: str) -> str:
    """A complete tiny model folder: model, two stores, and a precomputed counterfactual gallery
    written by the counterfactual harness (idempotent: a finished folder is reused)."""
    gallery = os.path.join(root, "counterfactual", "gallery", "gallery.json")
    if os.path.isfile(gallery):
        return root
    with torch_threads(1):
        _build_tiny_assets(root, gallery)
    return root


def _build_tiny_assets(root: str, gallery: str) -> None:
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.build import build_store, train_or_load
    from dtrak_core.evaluation import counterfactual as cf
    from dtrak_core.evaluation.counterfactual_report import write_gallery

    unet, scheduler, _ = train_or_load(root, TINY_TRAIN, show_bar=False)
    for setting in TINY_SETTINGS:  # (build_default would also measure sample quality: not needed here)
        build_store(root, unet, scheduler, setting, show_bar=False)
    attributor = Attributor.load(root)
    runs = os.path.join(root, "counterfactual", "runs")
    cf.run_counterfactual(attributor, runs, seeds=[EXAMPLE_SEED], rankings=("d-trak", "random"), ks=(EXAMPLE_K,),
                          config=EXAMPLE_TRAIN, control=False,
                          show_bar=False)
    write_gallery(runs, os.path.dirname(gallery), attributor.train)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return build_tiny_assets(str(tmp_path_factory.getbasetemp() / "app_assets"))


UI_MODULES = ("state", "texts", "serving", "generate", "attribute", "counterfactual", "benchmarks", "banner", "about",
              "page")  # dtrak_core.ui, each after what it imports


class AppHandlers:
    """The app's tab modules (`dtrak_core.ui`) under one name: `app.attribute(...)` is the handler
    of the module that defines it, `app.ASSETS = root` sets it there; `app.demo` is the page of
    $DTRAK_ASSETS, built on first use."""

    def __init__(self, modules):
        object.__setattr__(self, "_modules", modules)
        object.__setattr__(self, "_demo", None)

    def module_of(self, name):
        for m in self._modules:
            if name in vars(m):
                return m
        raise AttributeError(f"no dtrak_core.ui module defines {name!r}")

    def __getattr__(self, name):
        if name == "demo":
            if self._demo is None:
                object.__setattr__(self, "_demo", self.build_demo())
            return self._demo
        return getattr(self.module_of(name), name)

    def __setattr__(self, name, value):
        setattr(self.module_of(name), name, value)

    def __delattr__(self, name):  # what monkeypatch's undo of a new attribute does
        delattr(self.module_of(name), name)


def load_app() -> AppHandlers:
    """The app's modules, freshly imported (empty caches) on $DTRAK_ASSETS."""
    modules = []
    for name in UI_MODULES:
        full = f"dtrak_core.ui.{name}"
        modules.append(importlib.reload(sys.modules[full]) if full in sys.modules else importlib.import_module(full))
    return AppHandlers(modules)


@contextlib.contextmanager
def app_on(root: str):
    """`load_app()` on the model folder `root` (as $DTRAK_ASSETS, restored after), one torch thread."""
    before = os.environ.get("DTRAK_ASSETS")
    os.environ["DTRAK_ASSETS"] = root
    try:
        with torch_threads(1):
            yield load_app()
    finally:
        if before is None:
            os.environ.pop("DTRAK_ASSETS", None)
        else:
            os.environ["DTRAK_ASSETS"] = before


@pytest.fixture(scope="module")
def fashion_app():
    """The app's handlers on the committed Fashion-MNIST folder."""
    root = os.path.join(ASSETS, "fashion")
    if not os.path.isfile(os.path.join(root, "manifest.json")):
        pytest.skip("assets/fashion is not built (python -m dtrak_core build-fashion)")
    with app_on(root) as handlers:
        yield handlers


@pytest.fixture(scope="module")
def app(tiny_root):
    """The app's handlers, on the tiny folder."""
    os.environ["DTRAK_ASSETS"] = tiny_root
    with torch_threads(1):
        yield load_app()
