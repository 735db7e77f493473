"""Attribution for a text-to-image model folder: a pipeline, its LoRA, the captioned fine-tuning set
and the feature stores of that set, queried by (image, prompt) and method name.

    attributor = TextToImageAttributor.load("assets/text2image")
    image = attributor.generate([0], "a handwritten digit 7")[0]
    result = attributor.attribute(image, "d-trak", prompt="a handwritten digit 7")

It shares `Attributor`'s stores, scorers and lambdas (`base.StoreAttributor`); what differs is the
query: an image and its prompt, encoded by the VAE and the text encoder before the LoRA gradients are taken.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.base import Attribution, StoreAttributor
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.output_functions import canonical_name
from dtrak_core.attribution.similarity import ip_norms, similarity
from dtrak_core.attribution.store import FeatureStore, open_stores
from dtrak_core.errors import IntegrityError
from dtrak_core.folder import ModelFolder
from dtrak_core.shared import QUERY_FEATURES_KEPT, OnceCache, image_digest
from dtrak_core.text2image.data import CaptionedDataset, load_captioned_dataset
from dtrak_core.text2image.features import CaptionedInputs, ConditionalFeaturizer
from dtrak_core.text2image.lora import WEIGHTS_NAME as LORA_WEIGHTS
from dtrak_core.text2image.lora import load_lora, lora_hash
from dtrak_core.text2image.pipeline import TextToImagePipeline, component_file
from dtrak_core.text2image.sampling import DEFAULT_GUIDANCE, generate

KIND = "text2image"  # manifest key "kind" of a text-to-image model folder


def is_text2image_folder(root: str) -> bool:
    folder = ModelFolder.load(root, missing_ok=True)
    return folder is not None and folder.extra.get("kind") == KIND


def load_folder_pipeline(folder: ModelFolder) -> TextToImagePipeline:
    """The folder's pipeline with its LoRA adapters on the UNet: its configs, tokenizer files and
    pipeline index checked against the manifest's `config_hash`, its weights and vocabulary against
    `checkpoint_hash` (`TextToImagePipeline.weights_hash`). A mismatch names the file that changed
    (`component_hash`, else `base_hash`, tell which) with the fix for that file."""
    folder.require("checkpoint")
    lora = folder.extra.get("lora")
    if not isinstance(lora, str):
        raise IntegrityError(folder.path, "(model manifest) has no valid 'lora' entry", folder.remedy)
    folder.check_configs()  # first: an edited config is named as such, not as weights that do not fit it
    base = TextToImagePipeline.load(folder.checkpoint_path)
    lora_path = os.path.join(folder.root, lora)
    pipeline = replace(base, unet=load_lora(base.unet, lora_path))
    have = pipeline.weights_hash()
    if folder.checkpoint_hash is not None and folder.checkpoint_hash != have:
        raise changed_weights(folder, base, pipeline, lora_path, have)
    return pipeline


COMPONENT_NAMES = {"unet": "UNet weights", "vae": "VAE weights", "text_encoder": "text encoder weights",
                   "tokenizer": "tokenizer vocabulary", "lora": "LoRA weights"}


def component_hashes(base: TextToImagePipeline, pipeline: TextToImagePipeline) -> dict[str, str]:
    """What a model folder records as `component_hash`: the base pipeline's components, one by one
    (`TextToImagePipeline.component_hashes`), and the LoRA's weights."""
    return {**base.component_hashes(), "lora": lora_hash(pipeline.unet)}


def _lora_file(lora_path: str) -> str:
    return lora_path if os.path.isfile(lora_path) else os.path.join(lora_path, LORA_WEIGHTS)


def changed_weights(folder: ModelFolder, base: TextToImagePipeline, pipeline: TextToImagePipeline, lora_path: str,
                    have: str) -> IntegrityError:
    """The error for weights that do not hash to the manifest's checkpoint_hash, naming what changed:
    the component whose hash differs from the one recorded in `component_hash` (its weights file;
    the tokenizer's vocabulary file), else, with `base_hash` only (a folder built before components
    were recorded), the base pipeline folder or the LoRA file."""
    ckpt, root = folder.checkpoint_path, folder.root
    inside = not os.path.isabs(folder.checkpoint or "")  # the miniature's pipeline lives in the folder
    rebuild_pipeline = (f"or rebuild it: delete {ckpt} and run `python -m dtrak_core build-text2image --root {root}` "
                        "(the miniature's pipeline is trained again, then its LoRA and stores)" if inside else
                        "or build a new folder for the pipeline you have (`python -m dtrak_core build-text2image "
                        "--root NEW --pipeline ... --lora ... --data ...`)")
    rebuild_lora = (f"or train it again: delete {os.path.dirname(_lora_file(lora_path))} and run `python -m dtrak_core "
                    f"build-text2image --root {root}` (the stores are rebuilt for it)" if inside else
                    "or build a new folder for the LoRA you have (`build-text2image --root NEW ...`)")
    recorded = folder.extra.get("component_hash")
    if isinstance(recorded, dict):
        now = component_hashes(base, pipeline)
        for name in ("unet", "vae", "text_encoder", "tokenizer", "lora"):
            if name in recorded and recorded[name] != now[name]:
                path = _lora_file(lora_path) if name == "lora" else component_file(ckpt, name)
                return IntegrityError(path, f"({COMPONENT_NAMES[name]}) hash to {now[name]}, but {folder.path} "
                                      f"records component_hash {recorded[name]} for them (the pipeline no longer "
                                      f"hashes to its checkpoint_hash: the file was replaced or is corrupt; every "
                                      f"answer would change)",
                                      f"restore it, {rebuild_lora if name == 'lora' else rebuild_pipeline}")
    base_hash = folder.extra.get("base_hash")
    if isinstance(base_hash, str):
        have_base = base.weights_hash()
        if have_base != base_hash:
            return IntegrityError(ckpt, f"(base pipeline: UNet, VAE and text encoder weights, tokenizer vocabulary) "
                                  f"hashes to {have_base}, but {folder.path} records base_hash {base_hash} (a file in "
                                  f"it was replaced or is corrupt; every answer would change)",
                                  f"restore the pipeline folder, {rebuild_pipeline}")
        return IntegrityError(_lora_file(lora_path), f"(LoRA weights) with the recorded base pipeline hash to {have}, "
                              f"but {folder.path} records checkpoint_hash {folder.checkpoint_hash} (the LoRA was "
                              f"replaced or is corrupt)", f"restore it, {rebuild_lora}")
    return IntegrityError(ckpt, f"(pipeline) with the LoRA {_lora_file(lora_path)} hashes to {have}, but {folder.path} "
                          f"records checkpoint_hash {folder.checkpoint_hash} (a pipeline or LoRA file was replaced or "
                          f"is corrupt)", f"restore the pipeline and LoRA files, {rebuild_pipeline}")


class TextToImageAttributor(StoreAttributor):
    """One LoRA-adapted pipeline, its captioned fine-tuning set and its stores."""

    kind = "text2image"

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
        self._index_stores(stores, pipeline.weights_hash(), train.fingerprint)
        self._scorers, self._featurizers = OnceCache(), OnceCache()
        self._query_features = OnceCache(QUERY_FEATURES_KEPT)  # (setting, image, prompts) -> (B, k)
        self.tuned_params = {}  # manifest `tuned_lambda` entries of the kernel baselines (`baselines.hyperparameters`)

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
        attributor = cls(pipeline, train, open_stores(folder), tuned_lambdas=folder.tuned_lambdas(),
                         guidance_scale=float(guidance))
        attributor.root = folder.root
        attributor.input_range = folder.value_range
        attributor.tuned_params = dict(folder.tuned_lambda)  # the kernel baselines' (lambda, gamma), when tuned
        return attributor

    # -- queries ----------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.pipeline.channels, self.pipeline.resolution, self.pipeline.resolution

    def generate(self, seeds, prompt, steps: int = 50, guidance_scale: float | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] for the seeds, one prompt (or one per seed)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return generate(self.pipeline, prompt, seeds, steps=steps, guidance_scale=scale)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the VAE latents (B, c, h, w) the UNet is trained on: what
        the registry's `latent-*` baselines compare."""
        with torch.no_grad():
            return self.pipeline.encode_images(images.float())

    def featurizer(self, setting: FeatureSetting) -> ConditionalFeaturizer:
        return self._featurizers.get(setting, lambda: ConditionalFeaturizer(self.unet, self.scheduler, setting))

    def gradient_inputs(self, images: torch.Tensor, prompts) -> tuple[torch.Tensor, dict]:
        """(VAE latents, {"encoder_hidden_states": text hidden states}) of query images (B, C, H, W)
        in [-1, 1] and their prompts (one per image): what the LoRA-gradient featurizers take."""
        captioned = CaptionedInputs.of(self.pipeline, images, prompts)
        return captioned.latents, {"encoder_hidden_states": captioned.contexts}

    def query_features(self, images: torch.Tensor, prompts, setting: FeatureSetting) -> torch.Tensor:
        expected = self.image_shape
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        self.check_input_range(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")
        images = images.float()

        def compute():
            inputs = CaptionedInputs.of(self.pipeline, images, prompts)
            return self.featurizer(setting)(inputs.latents, inputs.contexts)
        # kept for recent queries: every method over one store (and its gradient baselines) shares them
        return self._query_features.get((setting, image_digest(images), tuple(prompts)), compute).clone()

    def scores(self, images: torch.Tensor, method: str, K: int | None = None, lam=None, *, prompts=None) -> np.ndarray:
        """images (B, C, H, W) in [-1, 1] with their prompts (one, or one per image) -> scores (B, N)."""
        if prompts is None:
            raise ValueError("a text-to-image query needs its prompt (the caption the image was generated from)")
        setting, _ = self.setting(method, K)
        return self.scorer(method, K, lam).scores(self.query_features(images, prompts, setting))

    def baseline_scores(self, images: torch.Tensor, method: str, *, prompts=None) -> np.ndarray:
        """Scores (B, N) of a registered text-to-image baseline (`methods.all("baseline", "text2image")`):
        the model-free ones (pixels or VAE latents) through the registry; those over a store's
        LoRA-gradient features (dot, cosine, relative / renormalised IP at the store's lambda) with the
        query's prompts."""
        m = registry.get(method)
        if m.family != "baseline" or self.kind not in m.kinds:
            raise ValueError(f"{m.label} is not a text-to-image baseline; those are: "
                             f"{', '.join(b.name for b in registry.all('baseline', self.kind))}")
        if m.store is None:
            return registry.scores(self, m.name, images)
        if prompts is None:
            raise ValueError(f"{m.label} compares LoRA gradients, which need the query's prompt")
        setting, _ = self.setting(m.store)
        scorer = self.scorer(m.store)
        phi = self.query_features(images, prompts, setting)
        if m.kind in ("dot", "cosine"):
            return similarity(phi, scorer.train_features_, m.kind)
        inputs = self.method_inputs()
        norms = inputs.cached(("ip norms", m.kind, setting, scorer.lam_), lambda: ip_norms(scorer, m.kind))
        return scorer.scores(phi) / norms[None]

    def attribute(self, image: torch.Tensor, method: str = "d-trak", K: int | None = None, lam=None, *,
                  prompt: str | None = None) -> Attribution:
        """One image (C, H, W) and its prompt -> its `Attribution` over the fine-tuning set."""
        known = registry.find(method)
        if known is not None and known.family != "trak":  # (refuses what is not a text-to-image baseline)
            return Attribution(known.name, self.baseline_scores(image[None], known.name, prompts=prompt)[0],
                               self.train.labels.numpy(), self.train)
        scores = self.scores(image[None], method, K, lam, prompts=prompt)[0]
        return Attribution(canonical_name(method), scores, self.train.labels.numpy(), self.train)
