"""Projected LoRA-gradient features of captioned images, the published ArtBench featurization.

For an image x with caption c: z = VAE posterior mode(x) x scaling_factor, h = text encoder(c);
then exactly the default's feature, with the UNet conditioned on h and gradients taken with
respect to the LoRA weights only (the only trainable parameters):

    phi(x, c) = P^T  mean_t  grad_LoRA f(eps_theta(z_t, t, h), eps_t)

over K timesteps t in range(0, 1000, 1000 // K), noise eps_t seeded by t (`gradients`). The
output functions, projectors, stores and scorers are the default's.
"""
from __future__ import annotations

import torch

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.gradients import GradientFeaturizer
from dtrak_core.attribution.projectors import make_projector


class ConditionalFeaturizer:
    """(latents (B, c, h, w), contexts (B, L, D)) -> projected features (B, k) for one adapted UNet."""

    def __init__(self, unet, scheduler, setting: FeatureSetting, batch_size: int = 32, timestep_chunk: int = 25,
                 device="cpu"):
        if not any(p.requires_grad for p in unet.parameters()):
            raise ValueError("the UNet has no trainable parameters to take gradients of (load its LoRA weights)")
        self.setting = setting
        self.batch_size = batch_size  # samples per gradient call: bounds activation memory to ~batch_size * K inputs
        # on `device` (float32 everywhere, as the pixel Featurizer): features come back on the CPU
        self.gradients = GradientFeaturizer(unet, scheduler, setting.output_fn, setting.K, timestep_chunk, device=device)
        self.projector = make_projector(setting.projector, self.gradients.dim, setting.k, setting.seed)

    def __call__(self, latents: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or contexts.ndim != 3 or len(latents) != len(contexts):
            raise ValueError(f"expected latents (B, c, h, w) and contexts (B, L, D), got {tuple(latents.shape)} "
                             f"and {tuple(contexts.shape)}")
        b = self.batch_size
        grads = torch.cat([self.gradients(latents[i:i + b], encoder_hidden_states=contexts[i:i + b])
                           for i in range(0, len(latents), b)])
        return self.projector.project(grads)


class CaptionedInputs:
    """Latents and text contexts of a captioned image set, sliceable as one sequence (what
    `FeatureStore.fill` walks through): inputs[a:b] -> (latents, contexts)."""

    def __init__(self, latents: torch.Tensor, contexts: torch.Tensor):
        if len(latents) != len(contexts):
            raise ValueError(f"{len(latents)} latents but {len(contexts)} contexts")
        self.latents, self.contexts = latents, contexts

    @classmethod
    def of(cls, pipeline, images: torch.Tensor, captions) -> "CaptionedInputs":
        captions = list(captions)
        if len(captions) != len(images):
            raise ValueError(f"need one caption per image: {len(images)} images, {len(captions)} captions")
        contexts = torch.cat([pipeline.encode_prompts(captions[i:i + 256]) for i in range(0, len(captions), 256)])
        return cls(pipeline.encode_images(images), contexts)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[sl], self.contexts[sl]


def featurize_fn(featurizer: ConditionalFeaturizer):
    """`FeatureStore.fill`'s featurize callable over `CaptionedInputs` slices."""
    return lambda batch: featurizer(*batch)
