"""Attribution for a text-to-image model folder: a pipeline, its LoRA, the captioned fine-tuning set
and the feature stores of that set, queried by (image, prompt) and method name.

    attributor = TextToImageAttributor.load("assets/text2image")
    image = attributor.generate([0], "a handwritten digit 7")[0]
    result = attributor.attribute(image, "d-trak", prompt="a handwritten digit 7")

It is an `Attributor` (same methods, stores, scorers and lambdas); what differs is the query: an
image and its prompt, encoded by the VAE and the text encoder before the LoRA gradients are taken.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from dtrak_core.attribution.attributor import Attribution, Attributor
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.output_functions import canonical_name
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.errors import IntegrityError
from dtrak_core.folder import MANIFEST_REMEDY, ModelFolder
from dtrak_core.shared import OnceCache
from dtrak_core.text2image.data import CaptionedDataset, load_captioned_dataset
from dtrak_core.text2image.features import CaptionedInputs, ConditionalFeaturizer
from dtrak_core.text2image.lora import load_lora
from dtrak_core.text2image.pipeline import TextToImagePipeline
from dtrak_core.text2image.sampling import DEFAULT_GUIDANCE, generate

KIND = "text2image"  # manifest key "kind" of a text-to-image model folder


def is_text2image_folder(root: str) -> bool:
    folder = ModelFolder.load(root, missing_ok=True)
    return folder is not None and folder.extra.get("kind") == KIND


def load_folder_pipeline(folder: ModelFolder) -> TextToImagePipeline:
    """The folder's pipeline with its LoRA adapters on the UNet, weights checked against the
    manifest's `checkpoint_hash` (`TextToImagePipeline.weights_hash`)."""
    folder.require("checkpoint")
    lora = folder.extra.get("lora")
    if not isinstance(lora, str):
        raise IntegrityError(folder.path, "(model manifest) has no valid 'lora' entry", MANIFEST_REMEDY)
    base = TextToImagePipeline.load(folder.checkpoint_path)
    pipeline = replace(base, unet=load_lora(base.unet, os.path.join(folder.root, lora)))
    have = pipeline.weights_hash()
    if folder.checkpoint_hash is not None and folder.checkpoint_hash != have:
        raise IntegrityError(os.path.join(folder.root, lora), f"(pipeline + LoRA weights) hash to {have}, but "
                             f"{folder.path} records checkpoint_hash {folder.checkpoint_hash} (the weights were "
                             f"replaced or are corrupt)", "restore the pipeline and LoRA files, or rebuild the "
                             "folder (`python -m dtrak_core build-text2image`)")
    return pipeline


class TextToImageAttributor(Attributor):
    """One LoRA-adapted pipeline, its captioned fine-tuning set and its stores."""

    def __init__(self, pipeline: TextToImagePipeline, train: CaptionedDataset, stores: list[FeatureStore],
                 lam: float | None = None, tuned_lambdas: dict[str, float] | None = None,
                 guidance_scale: float = DEFAULT_GUIDANCE):
        if not isinstance(train, CaptionedDataset):
            raise ValueError("a text-to-image attributor needs a CaptionedDataset (one caption per training image)")
        self.pipeline = pipeline
        self.unet, self.scheduler, self.train = pipeline.unet.eval(), pipeline.scheduler, train
        self.guidance_scale = guidance_scale  # sampling default of `generate`
        self.root = None
        self.lam = lam
        self.tuned_lambdas = dict(tuned_lambdas or {})
        self.stores = {}
        ckpt = pipeline.weights_hash()
        for store in stores:
            setting = FeatureSetting(**{f: store.metadata[f] for f in FeatureSetting.__dataclass_fields__})
            store.check_identity(FeatureStore.identity(setting, ckpt, train.fingerprint))
            self.stores.setdefault(setting.output_fn, []).append((setting, store))
        self._scorers, self._featurizers = OnceCache(), OnceCache()

    @classmethod
    def load(cls, root: str | None = None) -> "TextToImageAttributor":
        folder = ModelFolder.load(root).require("checkpoint", "dataset", "stores")
        if folder.extra.get("kind") != KIND:
            raise ValueError(f"{folder.path} describes an unconditional model folder, not a text-to-image one "
                             f"(manifest key 'kind' is not {KIND!r}); load it with Attributor.load")
        pipeline = load_folder_pipeline(folder)
        try:
            train = load_captioned_dataset(folder.dataset)
        except ValueError as e:
            raise ValueError(f"{folder.path}: {e}") from None
        guidance = folder.extra.get("guidance_scale", DEFAULT_GUIDANCE)
        attributor = cls(pipeline, train, folder.open_stores(), tuned_lambdas=folder.tuned_lambdas(),
                         guidance_scale=float(guidance))
        attributor.root = folder.root
        return attributor

    # -- queries ----------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.pipeline.channels, self.pipeline.resolution, self.pipeline.resolution

    def generate(self, seeds, prompt, steps: int = 50, guidance_scale: float | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] for the seeds, one prompt (or one per seed)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return generate(self.pipeline, prompt, seeds, steps=steps, guidance_scale=scale)

    def featurizer(self, setting: FeatureSetting) -> ConditionalFeaturizer:
        return self._featurizers.get(setting, lambda: ConditionalFeaturizer(self.unet, self.scheduler, setting))

    def query_features(self, images: torch.Tensor, prompts, setting: FeatureSetting) -> torch.Tensor:
        expected = self.image_shape
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
        inputs = CaptionedInputs.of(self.pipeline, images.float(), prompts)
        return self.featurizer(setting)(inputs.latents, inputs.contexts)

    def scores(self, images: torch.Tensor, method: str, K: int | None = None, lam=None, *, prompts=None) -> np.ndarray:
        """images (B, C, H, W) in [-1, 1] with their prompts (one, or one per image) -> scores (B, N)."""
        if prompts is None:
            raise ValueError("a text-to-image query needs its prompt (the caption the image was generated from)")
        setting, _ = self.setting(method, K)
        return self.scorer(method, K, lam).scores(self.query_features(images, prompts, setting))

    def attribute(self, image: torch.Tensor, method: str = "d-trak", K: int | None = None, lam=None, *,
                  prompt: str | None = None) -> Attribution:
        """One image (C, H, W) and its prompt -> its `Attribution` over the fine-tuning set."""
        scores = self.scores(image[None], method, K, lam, prompts=prompt)[0]
        return Attribution(canonical_name(method), scores, self.train.labels.numpy())
