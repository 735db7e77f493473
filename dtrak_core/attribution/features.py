"""Projected gradient features: phi(x) = P^T grad_theta f(x), for one `FeatureSetting`."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

import torch

from dtrak_core.attribution.batches import check_range, image_batches
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
        # images (N, C, H, W) in [-1, 1] -> phi (N, k) float32 = P^T grad_theta mean_t f(x_t, t)
        phi = featurizer(my_dataset, transform=to_model_range)   # any form `batches` reads

    Args:
        unet, scheduler: the diffusers model (only read; see `gradients.GradientFeaturizer`) and its
            noise scheduler.
        setting: the output function, K, projector, k and projector seed.
        batch_size: samples per gradient pass (bounds memory to about batch_size x K images).
        timestep_chunk: timesteps per pass within a batch.
        device: where the gradients are computed ("cpu", "cuda", "mps"; always in float32); the
            features come back float32 on the CPU, equal across devices up to float rounding.
        input_range: (low, high) the model's training pixels lay in (a model folder's manifest
            `input_range`); images outside it are refused, naming the first such item (None: not checked).

    `gradients` is the unprojected `GradientFeaturizer` (B, d) and `projector` the (d -> k)
    projection; both are deterministic, so equal settings give equal features. The images are read
    and featurized `batch_size` at a time (`batches.image_batches`), so a sequence, a torch Dataset or
    a DataLoader gives the features of the stacked tensor bit for bit, holding one batch at a time.
    """

    def __init__(self, unet, scheduler, setting: FeatureSetting, batch_size: int = 32, timestep_chunk: int = 25,
                 device="cpu", input_range=None):
        self.setting = setting
        self.batch_size = batch_size  # samples per vmap call: bounds activation memory to ~batch_size * K images
        self.input_range = None if input_range is None else (float(input_range[0]), float(input_range[1]))
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise ValueError(f"input_range must be (low, high) with low < high, got {input_range!r}")
        self.gradients = GradientFeaturizer(unet, scheduler, setting.output_fn, setting.K, timestep_chunk,
                                            device=device)
        self.projector = make_projector(setting.projector, self.gradients.dim, setting.k, setting.seed)
        self.image_shape = model_image_shape(unet)

    def __call__(self, images, transform=None) -> torch.Tensor:
        """images -> (N, k) float32 features. images: a tensor (N, C, H, W), a sequence or torch Dataset
        of images ((C, H, W) tensors or arrays, (image, label) tuples, dicts with "image" or
        "pixel_values"), or an iterable of batches (a DataLoader); transform: applied to each item's
        image first (see `batches`). A wrong item is an `InputImagesError` naming its index."""
        out = []
        for start, batch in image_batches(images, self.batch_size, transform, self.image_shape):
            if self.input_range is not None:
                check_range(batch, self.input_range, first=start, source="this Featurizer's input_range")
            out.append(self.projector.project(self.gradients(batch)))
        return torch.cat(out) if out else torch.zeros(0, self.setting.k)


def model_image_shape(unet) -> tuple[int, int, int] | None:
    """(C, H, W) a diffusers UNet takes (its config's in_channels and sample_size), None if unknown."""
    config = getattr(unet, "config", None)
    channels, size = getattr(config, "in_channels", None), getattr(config, "sample_size", None)
    if isinstance(size, int):
        size = (size, size)
    if not isinstance(channels, int) or not (isinstance(size, (tuple, list)) and len(size) == 2
                                             and all(isinstance(v, int) for v in size)):
        return None
    return (channels, int(size[0]), int(size[1]))


def featurize_checkpoints(unets, scheduler, setting: FeatureSetting, images, transform=None,
                          **options) -> list[torch.Tensor]:
    """The features of the same images under each of several checkpoints of one model (an ensemble:
    `scoring.EnsembleScorer`): [(N, k) float32], one per checkpoint, in order.

        train = featurize_checkpoints(["ckpt/seed0", "ckpt/seed1"], scheduler, setting, my_dataset)
        scorer = EnsembleScorer().fit(train)
        scores = scorer.scores(featurize_checkpoints(["ckpt/seed0", "ckpt/seed1"], scheduler, setting, queries))

    unets: UNet2DModels, or folders saved with `save_pretrained` (a UNet folder, or a pipeline folder
        with unet/), each loaded when its turn comes and let go after it.
    scheduler: the noise schedule they were all trained with.
    images, transform: as `Featurizer` reads them, once per checkpoint (so not a one-shot iterator).
    options: the other arguments of `Featurizer` (batch_size, timestep_chunk, device, input_range).
    The projector is the setting's for every checkpoint (same seed), as the trak package's ensembles.
    """
    from dtrak_core.errors import InputImagesError

    unets = list(unets)
    if not unets:
        raise ValueError("featurize_checkpoints needs one or more checkpoints")
    if len(unets) > 1 and not isinstance(images, torch.Tensor) and iter(images) is images:
        raise InputImagesError("the images are a one-shot iterator (a generator), read once per checkpoint; pass "
                               "a tensor, a sequence, a Dataset or a DataLoader, which can be read again")
    features = []
    for unet in unets:
        if isinstance(unet, (str, os.PathLike)):
            unet = _load_unet(os.fspath(unet))
        features.append(Featurizer(unet, scheduler, setting, **options)(images, transform))
    return features


def _load_unet(path: str):
    """The UNet saved at `path` (a UNet folder, or a pipeline folder holding unet/)."""
    from dtrak_core.model.unet import load_unet

    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r}: no such folder")
    unet_dir = os.path.join(path, "unet") if os.path.isfile(os.path.join(path, "unet", "config.json")) else path
    if not os.path.isfile(os.path.join(unet_dir, "config.json")):
        raise ValueError(f"checkpoint {path!r} is not a saved UNet (no config.json, nor unet/config.json)")
    return load_unet(unet_dir, "save the UNet again with save_pretrained").eval()
