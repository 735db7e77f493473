"""Projected gradient features: phi(x) = P^T grad_theta f(x), for one `FeatureSetting`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from dtrak_core.attribution.gradients import GradientFeaturizer
from dtrak_core.attribution.output_functions import canonical_name
from dtrak_core.attribution.projectors import PROJECTORS, make_projector


@dataclass(frozen=True)
class FeatureSetting:
    """What a feature is: which output function's gradient, over how many timesteps, projected how.

    Stores record it in their metadata and are reused only for an equal setting; `slug` names
    their folder. Any spelling of an output function is accepted and kept canonical ('d-trak' ->
    'square').
    """

    output_fn: str = "square"  # output function name (see output_functions); 'square' is D-TRAK
    K: int = 100  # timesteps averaged per sample: t in range(0, 1000, 1000 // K)
    projector: str = "sparse-jl"  # 'sparse-jl' (fast on CPU) or 'dense-gaussian' (reference)
    k: int = 2048  # projected dimension
    seed: int = 42  # projector seed

    def __post_init__(self):
        object.__setattr__(self, "output_fn", canonical_name(self.output_fn))
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; choose one of {sorted(PROJECTORS)}")
        if self.k < 1 or self.K < 1:
            raise ValueError(f"K and k must be positive, got K={self.K}, k={self.k}")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "FeatureSetting":
        return replace(self, **changes)

    @property
    def slug(self) -> str:
        """A folder name for this setting."""
        return f"{self.output_fn.replace('=', '')}-K{self.K}-{self.projector}-k{self.k}-s{self.seed}"


class Featurizer:
    """Projected gradient features of images for one model and `FeatureSetting`.

        phi = Featurizer(unet, scheduler, FeatureSetting("square", K=100, k=2048))(images)
        # images (B, C, H, W) in [-1, 1] -> phi (B, k) float32 = P^T grad_theta mean_t f(x_t, t)

    Args:
        unet, scheduler: the diffusers model (only read; see `gradients.GradientFeaturizer`) and its
            noise scheduler.
        setting: the output function, K, projector, k and projector seed.
        batch_size: samples per gradient pass (bounds memory to about batch_size x K images).
        timestep_chunk: timesteps per pass within a batch.
        device: where the gradients are computed ("cpu", "cuda", "mps"; always in float32); the
            features come back float32 on the CPU, equal across devices up to float rounding.

    `gradients` is the unprojected `GradientFeaturizer` (B, d) and `projector` the (d -> k)
    projection; both are deterministic, so equal settings give equal features.
    """

    def __init__(self, unet, scheduler, setting: FeatureSetting, batch_size: int = 32, timestep_chunk: int = 25,
                 device="cpu"):
        self.setting = setting
        self.batch_size = batch_size  # samples per vmap call: bounds activation memory to ~batch_size * K images
        self.gradients = GradientFeaturizer(unet, scheduler, setting.output_fn, setting.K, timestep_chunk,
                                            device=device)
        self.projector = make_projector(setting.projector, self.gradients.dim, setting.k, setting.seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got {tuple(images.shape)}")
        grads = torch.cat([self.gradients(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)])
        return self.projector.project(grads)
