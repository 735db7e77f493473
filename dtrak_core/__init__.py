"""dtrak: which training images made this generated image? TRAK and D-TRAK for diffusion models.

    from dtrak_core import Attributor, methods
    attributor = Attributor.load("assets")
    result = attributor.attribute(image, "d-trak")     # image (C, H, W) in [-1, 1]
    methods.scores(attributor, "pixel-cosine", images) # any registered method: images (Q, C, H, W) -> (Q, N)
"""
import os

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning workers stall
# each other (measured ~10x slower training under load) and it costs nothing when idle. Only takes
# effect if torch is imported after this package.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dtrak_core.attribution import methods  # noqa: E402
from dtrak_core.attribution.attributor import Attribution, Attributor  # noqa: E402
from dtrak_core.attribution.features import Featurizer, FeatureSetting  # noqa: E402
from dtrak_core.attribution.scoring import TRAKScorer  # noqa: E402
from dtrak_core.attribution.store import FeatureStore  # noqa: E402
from dtrak_core.model.training import TrainConfig  # noqa: E402

__all__ = ["Attribution", "Attributor", "Featurizer", "FeatureSetting", "FeatureStore", "TRAKScorer", "TrainConfig",
           "methods"]
