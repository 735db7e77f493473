"""dtrak: which training images made this generated image? TRAK and D-TRAK for diffusion models.

    from dtrak_core import Attributor, methods
    attributor = Attributor.load("assets")
    result = attributor.attribute(image, "d-trak")     # image (C, H, W) in [-1, 1]
    methods.scores(attributor, "pixel-cosine", images) # any registered method: images (Q, C, H, W) -> (Q, N)

The names below are imported on first use (PEP 562), so `import dtrak_core` (and the command
line's `-h`) does not load torch.
"""
import importlib
import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning workers stall
# each other (measured ~10x slower training under load) and it costs nothing when idle. Only takes
# effect if torch is imported after this package.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_EXPORTS = {
    "methods": "dtrak_core.attribution.methods",
    "Attribution": "dtrak_core.attribution.attributor",
    "Attributor": "dtrak_core.attribution.attributor",
    "EnsembleScorer": "dtrak_core.attribution.scoring",
    "Featurizer": "dtrak_core.attribution.features",
    "FeatureSetting": "dtrak_core.attribution.features",
    "TRAKScorer": "dtrak_core.attribution.scoring",
    "FeatureStore": "dtrak_core.attribution.store",
    "featurize_checkpoints": "dtrak_core.attribution.features",
    "TrainConfig": "dtrak_core.model.training",
}

__all__ = ["Attribution", "Attributor", "EnsembleScorer", "Featurizer", "FeatureSetting", "FeatureStore", "TRAKScorer",
           "TrainConfig", "featurize_checkpoints", "methods"]


def __getattr__(name: str):
    """The public names (`_EXPORTS`) and the subpackages (`dtrak_core.evaluation`, ...), imported
    when first asked for."""
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        value = module if name == "methods" else getattr(module, name)
    else:
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
