"""CLIP ViT-B/32 image embeddings for the CLIP-similarity baseline, loaded offline only.

The weights are looked for, in order, at an explicit path, at $DTRAK_CLIP_PATH, and in the
Hugging Face cache (`openai/clip-vit-base-patch32`, where `from_pretrained` would have stored it).
Nothing is ever downloaded (`local_files_only=True`). When no weights are present (or
`transformers` is not installed) `ClipUnavailable` says so and where it looked; the CLIP baselines
are then reported as unavailable, never replaced by another encoder.

Our images are small grayscale arrays in [-1, 1]; the encoder sees them as CLIP's processor would
see a photo: [-1, 1] -> [0, 1], gray repeated to RGB, bicubic upscaling to the encoder's input size
(224 for ViT-B/32; torch's bicubic kernel a = -0.75, align_corners=False) clamped to [0, 1], then
CLIP's mean/std normalisation (from the folder's preprocessor_config.json when present, else the
published CLIP values). The embedding is the projected image embedding (`image_embeds`), not
normalised: the cosine baseline normalises it, the dot baseline does not.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

CLIP_REPO = "openai/clip-vit-base-patch32"
ENV_VAR = "DTRAK_CLIP_PATH"
# CLIP's published preprocessing constants (the same as in its preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipUnavailable(RuntimeError):
    """No local CLIP weights (or no `transformers`): the CLIP baselines cannot run."""


def find_clip(path: str | None = None) -> str:
    """The folder holding CLIP weights (config.json + weights), or raise `ClipUnavailable`."""
    looked = []
    for candidate, where in ((path, "given path"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if not candidate:
            continue
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
        looked.append(f"{where} {candidate!r} (no config.json)")
        if path:  # an explicit path that does not hold weights is an error, not a cue to look elsewhere
            break
    else:
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(CLIP_REPO, local_files_only=True)
        except Exception as e:  # LocalEntryNotFoundError, offline errors, missing package
            looked.append(f"the Hugging Face cache for {CLIP_REPO} ({type(e).__name__})")
    raise ClipUnavailable("CLIP similarity is unavailable: no local CLIP ViT-B/32 weights (looked at "
                          + "; ".join(looked) + "). Nothing is downloaded; put the weights of "
                          f"{CLIP_REPO} in the Hugging Face cache or point ${ENV_VAR} at a folder saved with "
                          "save_pretrained.")


class ClipImageEncoder:
    """images (B, C, H, W) in [-1, 1] -> CLIP image embeddings (B, D). Build with `ClipImageEncoder.load`."""

    def __init__(self, model, image_size: int, mean=CLIP_MEAN, std=CLIP_STD, source: str = "", batch_size: int = 64):
        self.model = model.eval()
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.source = source
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | None = None, batch_size: int = 64) -> "ClipImageEncoder":
        folder = find_clip(path)
        try:
            from transformers import AutoConfig, CLIPVisionModelWithProjection
        except ImportError as e:
            raise ClipUnavailable(f"CLIP similarity is unavailable: `transformers` is not installed ({e})") from e
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            if getattr(config, "vision_config", None) is not None:
                # A whole CLIP (text + vision towers, as published): keep the vision tower and its
                # projection, whose output size is the top-level projection_dim.
                vision = config.vision_config
                vision.projection_dim = config.projection_dim
                config = vision
            model = CLIPVisionModelWithProjection.from_pretrained(folder, config=config, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise ClipUnavailable(f"CLIP similarity is unavailable: cannot load CLIP weights from {folder!r} ({e})") from e
        mean, std = CLIP_MEAN, CLIP_STD
        pre = os.path.join(folder, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre) as f:
                cfg = json.load(f)
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        return cls(model, model.config.image_size, mean, std, source=folder, batch_size=batch_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [-1, 1] -> normalised pixel values (B, 3, S, S)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(images.shape)}")
        x = (images.float() + 1) / 2
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = [self.model(pixel_values=self.preprocess(images[i:i + self.batch_size])).image_embeds
               for i in range(0, len(images), self.batch_size)]
        return torch.cat(out).float()
