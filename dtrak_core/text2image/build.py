"""Text-to-image model folders: the embedded miniature, and your own Stable Diffusion + LoRA.

    python -m dtrak_core build-text2image          # the miniature under assets/text2image (deterministic)
    python -m dtrak_core build-text2image --root R --pipeline SD --lora L --data IMAGES   # your own

The miniature is Stable Diffusion's setting in small: a latent text-to-image model (VAE, CLIP
text encoder, word-level tokenizer, conditional UNet) pretrained on the digits 0-4 with prompts
"a handwritten digit <d>", then a LoRA fine-tuned on the digits 5-9, the set that is attributed
(as ArtBench is for Stable Diffusion). Every component is built and trained here; nothing is
downloaded.

    <root>/manifest.json     kind "text2image", recipes, hashes, stores, timings, sample quality
    <root>/pipeline/         the base pipeline, diffusers layout (StableDiffusionPipeline.from_pretrained loads it)
    <root>/lora/             pytorch_lora_weights.safetensors (diffusers' LoRA format)
    <root>/stores/<setting>/ feature stores of the fine-tuning set (LoRA gradients)

Resumable: a pipeline and a LoRA trained with the recorded recipes are reused, stores resume.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import torch

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.errors import SealMismatch
from dtrak_core.folder import SEALED_EXTRA, ModelFolder
from dtrak_core.model.data import INPUT_RANGE
from dtrak_core.model.unet import count_parameters
from dtrak_core.text2image import MINIATURE_ROOT
from dtrak_core.text2image.attributor import KIND, component_hashes
from dtrak_core.text2image.data import CaptionedDataset, digit_caption, load_captioned_dataset, load_digit_captions
from dtrak_core.text2image.features import CaptionedInputs, ConditionalFeaturizer, featurize_fn
from dtrak_core.text2image.lora import load_lora, save_lora
from dtrak_core.text2image.pipeline import TextToImagePipeline, build_latent_scheduler, config_hashes
from dtrak_core.text2image.sampling import DEFAULT_GUIDANCE, generate
from dtrak_core.text2image.tokenizer import build_word_tokenizer
from dtrak_core.text2image.training import (
    BaseConfig,
    LoraTrainConfig,
    VAEConfig,
    finetune_lora,
    latent_inputs,
    pretrain,
    train_vae,
)

PRETRAIN_DIGITS = tuple(range(5))  # the base model's data
FINETUNE_DIGITS = tuple(range(5, 10))  # the LoRA's data: what is attributed
FINETUNE_SPEC = {"digits": list(FINETUNE_DIGITS), "split": "train"}
# k = 1024: the LoRA has ~12K weights, and a store of the 747 fine-tuning digits stays at 3 MB
DEFAULT_SETTINGS = (FeatureSetting("square", K=100, k=1024), FeatureSetting("loss", K=100, k=1024))
QUALITY_PER_DIGIT = 40  # samples per prompt in the quality report, seeds 0..
BUILD_THREADS = 2  # CPU training is bit-deterministic only at a fixed thread count


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def prompt_quality(images: torch.Tensor, digits) -> dict:
    """The digit classifier's verdict on generated images whose prompts named `digits` (one per image):
    the share classified as the prompted digit, the share confident, the class histogram."""
    from dtrak_core.evaluation.quality import CONFIDENCE, classify, sample_quality

    digits = np.asarray(digits)
    labels, conf = classify(images)
    per_digit = {str(d): float((labels[digits == d] == d).mean()) for d in sorted(set(digits.tolist()))}
    return {**sample_quality(images), "prompt_accuracy": float((labels == digits).mean()),
            "prompt_accuracy_confident": float(((labels == digits) & (conf >= CONFIDENCE)).mean()),
            "prompt_accuracy_per_digit": per_digit}


def quality_report(pipeline, digits=FINETUNE_DIGITS, per_digit: int = QUALITY_PER_DIGIT,
                   guidance_scale: float = DEFAULT_GUIDANCE) -> dict:
    """Samples for "a handwritten digit <d>", `per_digit` seeds each (0, 1, ...), DDIM 50, judged by
    the digit classifier (evaluation/quality.py)."""
    prompted = [d for d in digits for _ in range(per_digit)]
    seeds = [i for _ in digits for i in range(per_digit)]
    images = generate(pipeline, [digit_caption(d) for d in prompted], seeds, guidance_scale=guidance_scale)
    return {"prompts": f"a handwritten digit {{{','.join(map(str, digits))}}}", "seeds": f"0..{per_digit - 1} each",
            "sampler": "ddim-50", "guidance_scale": guidance_scale, **prompt_quality(images, prompted)}


def _set_extra(folder: ModelFolder, **values) -> None:
    """Set the text-to-image manifest keys (`values`) of `folder`; guidance_scale, which the build
    sets to what the folder is built with, is sealed (`settings_hash`), so that a hand edit is refused
    on load, naming manifest.json (a folder built before guidance was sealed gets its seal now)."""
    folder.extra.update(values)
    folder.reseal("guidance_scale")


def build_store(root: str, pipeline, train: CaptionedDataset, setting: FeatureSetting, inputs=None,
                show_bar: bool = True, device="cpu") -> str:
    """Fill (or finish) the store for `setting` and register it in the manifest; its folder, relative to root."""
    rel = os.path.join("stores", setting.slug)
    identity = FeatureStore.identity(setting, pipeline.weights_hash(), train.fingerprint)
    store = FeatureStore.create(os.path.join(root, rel), identity, len(train), setting.k)
    inputs = inputs if inputs is not None else CaptionedInputs.of(pipeline, train.images, train.captions)
    t0 = time.perf_counter()
    store.fill(featurize_fn(ConditionalFeaturizer(pipeline.unet, pipeline.scheduler, setting, device=device)), inputs,
               show_bar=show_bar)
    seconds = time.perf_counter() - t0
    ModelFolder.edit(root, lambda f: f.add_store(rel, seconds))
    return rel


def _train_base(vae_config: VAEConfig, base_config: BaseConfig, show_bar: bool) -> tuple[TextToImagePipeline, dict]:
    pretraining = load_digit_captions("train", PRETRAIN_DIGITS)
    tokenizer = build_word_tokenizer()
    scheduler = build_latent_scheduler()
    t0 = time.perf_counter()
    vae = train_vae(pretraining.images, vae_config, show_bar=show_bar)
    t1 = time.perf_counter()
    unet, text_encoder = pretrain(pretraining.images, pretraining.captions, vae, tokenizer, scheduler, base_config,
                                  show_bar=show_bar)
    t2 = time.perf_counter()
    return TextToImagePipeline(unet, vae, text_encoder, tokenizer, scheduler), {"vae": t1 - t0, "base": t2 - t1}


def build_miniature(root: str = MINIATURE_ROOT, vae_config: VAEConfig = VAEConfig(),
                    base_config: BaseConfig = BaseConfig(), lora_config: LoraTrainConfig = LoraTrainConfig(),
                    settings=DEFAULT_SETTINGS, show_bar: bool = True, quality: bool = True) -> dict:
    """Train (or reuse) the miniature's pipeline and LoRA, fill its stores, measure its samples."""
    os.makedirs(root, exist_ok=True)
    recipe = _jsonable({"vae": vae_config.to_dict(), "base": base_config.to_dict(), "lora": lora_config.to_dict(),
                        "pretrain_digits": list(PRETRAIN_DIGITS), "torch": torch.__version__,
                        "threads": BUILD_THREADS})
    try:
        folder = ModelFolder.load(root, missing_ok=True)
    except SealMismatch as e:  # a value this build sets itself (guidance_scale) edited by hand: the fix it names
        if e.entry not in SEALED_EXTRA:
            raise
        folder = ModelFolder._read(root, missing_ok=True)
    old = folder.extra if folder is not None else {}
    same_base = old.get("recipe", {}).get("vae") == recipe["vae"] and old.get("recipe", {}).get("base") == recipe["base"]
    same_lora = same_base and old.get("recipe", {}).get("lora") == recipe["lora"]
    pipeline_dir, lora_dir = os.path.join(root, "pipeline"), os.path.join(root, "lora")
    seconds = dict(old.get("stage_seconds", {})) if same_base else {}
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        if same_base and os.path.isdir(pipeline_dir):
            base = TextToImagePipeline.load(pipeline_dir)
            if base.weights_hash() != old.get("base_hash"):
                raise ValueError(f"{pipeline_dir} does not hold the base pipeline {folder.path} records "
                                 f"(base_hash {old.get('base_hash')}); delete {root} and build again")
        else:
            base, times = _train_base(vae_config, base_config, show_bar)
            base.save(pipeline_dir)
            base = TextToImagePipeline.load(pipeline_dir)  # what users get: the saved weights
            seconds.update(times)
            same_lora = False
        train = load_digit_captions("train", FINETUNE_DIGITS)
        inputs = CaptionedInputs.of(base, train.images, train.captions)
        reuse_lora = same_lora and os.path.isdir(lora_dir)
        if reuse_lora:
            unet = load_lora(base.unet, lora_dir)
            if replace(base, unet=unet).weights_hash() != folder.checkpoint_hash:
                raise ValueError(f"{lora_dir} does not hold the LoRA {folder.path} records (checkpoint_hash "
                                 f"{folder.checkpoint_hash}); delete {root} and build again")
        else:
            t0 = time.perf_counter()
            unet = finetune_lora(base.unet, base.scheduler, latent_inputs(base.vae, train.images, inputs.contexts),
                                 lora_config, show_bar=show_bar)
            seconds["lora"] = time.perf_counter() - t0
            save_lora(lora_dir, unet)
            unet = load_lora(base.unet, lora_dir)
    finally:
        torch.set_num_threads(threads)
    pipeline = replace(base, unet=unet)
    if not reuse_lora and folder is not None:  # stores and samples of the replaced weights are stale
        for rel in folder.stores or []:
            shutil.rmtree(os.path.join(root, rel), ignore_errors=True)
    ModelFolder.edit(root, checkpoint="pipeline", checkpoint_hash=pipeline.weights_hash(), dataset=FINETUNE_SPEC,
                     dataset_fingerprint=train.fingerprint, num_train=len(train),
                     parameters=count_parameters(pipeline.unet), config_hash=config_hashes(pipeline_dir),
                     stores=(folder.stores if folder is not None and reuse_lora else []) or [],
                     featurize_seconds=(folder.featurize_seconds if folder is not None and reuse_lora else {}),
                     quality=folder.quality if folder is not None and reuse_lora else None,
                     change=lambda f: _set_extra(f, kind=KIND, lora="lora", recipe=recipe, stage_seconds=seconds,
                                                 base_hash=base.weights_hash(), guidance_scale=DEFAULT_GUIDANCE,
                                                 base_parameters=count_parameters(base.unet),
                                                 component_hash=component_hashes(base, pipeline)))
    for setting in settings:
        build_store(root, pipeline, train, setting, inputs, show_bar)
    if quality:
        report = {"lora": quality_report(pipeline), "base_on_pretraining_digits": quality_report(base, PRETRAIN_DIGITS),
                  "base_on_finetuning_digits": quality_report(base)}
        ModelFolder.edit(root, quality=report)
    return ModelFolder.load(root).to_dict()


def seal_folder(root: str) -> dict:
    """Record what a text-to-image folder built before they were recorded lacks: `config_hash` (the
    pipeline's configs, tokenizer files and index), `component_hash` (each component's weights and
    the LoRA's) and the seal of guidance_scale, after loading it and checking that its weights are
    the ones its checkpoint_hash records (nothing else is rebuilt or changed). Returns the manifest."""
    from dtrak_core.text2image.attributor import load_folder_pipeline

    folder = ModelFolder.load(root)
    if folder.extra.get("kind") != KIND:
        raise ValueError(f"{folder.path} is not a text-to-image model folder")
    pipeline = load_folder_pipeline(folder)  # its weights checked against checkpoint_hash first
    if folder.checkpoint_hash is None:
        raise ValueError(f"{folder.path} records no checkpoint_hash: nothing to seal against; rebuild the folder")
    base = TextToImagePipeline.load(folder.checkpoint_path)
    hashes = component_hashes(base, pipeline)
    ModelFolder.edit(root, config_hash=config_hashes(folder.checkpoint_path),
                     change=lambda f: _set_extra(f, component_hash=hashes))
    return ModelFolder.load(root).to_dict()


def build_text2image_from(root: str, pipeline_source: str, lora: str, data: str, settings=DEFAULT_SETTINGS,
                          show_bar: bool = True, device="cpu") -> dict:
    """A text-to-image model folder for your own pipeline + LoRA and the captioned images the LoRA was
    fine-tuned on: stores under `root`; the pipeline, LoRA and images referenced where they are.

    pipeline_source: a Stable Diffusion folder (diffusers layout) or a Hugging Face repo id in the
        local cache; lora: a folder or .safetensors file in diffusers' LoRA format; data: an image
        folder with captions (`metadata.jsonl` or `<name>.txt`, see text2image/data.py).
    Resumable; a root built for another pipeline, LoRA or data is refused. device: where the LoRA
    gradients are computed ("cpu", "cuda", "cuda:<i>", "mps"; float32 on each, so the stores agree
    across devices up to float rounding); an unavailable one is refused before any work.
    """
    from dtrak_core.devices import resolve_device
    from dtrak_core.model.unet import resolve_model

    resolve_device(device)

    folder_path = resolve_model(pipeline_source)
    base = TextToImagePipeline.load(folder_path)
    pipeline = replace(base, unet=load_lora(base.unet, lora))
    spec = {"folder": os.path.abspath(data), "resolution": pipeline.resolution, "channels": pipeline.channels}
    train = load_captioned_dataset(spec)
    folder = ModelFolder.load(root, missing_ok=True)
    have = pipeline.weights_hash()
    if folder is not None:
        for key, value in (("checkpoint_hash", have), ("dataset_fingerprint", train.fingerprint)):
            if getattr(folder, key) != value:
                raise ValueError(f"{folder.path} was built for another {'pipeline or LoRA' if key[0] == 'c' else 'dataset'} "
                                 f"({key} {getattr(folder, key)!r}, not {value!r}); use another --root")
    lora_path = os.path.abspath(lora)
    ModelFolder.edit(root, checkpoint=folder_path, checkpoint_hash=have, dataset=spec,
                     dataset_fingerprint=train.fingerprint, num_train=len(train), model_source=pipeline_source,
                     parameters=count_parameters(pipeline.unet), config_hash=config_hashes(folder_path),
                     input_range=list(INPUT_RANGE),
                     stores=(folder.stores if folder is not None else []) or [],
                     change=lambda f: _set_extra(f, kind=KIND, lora=lora_path, guidance_scale=7.5,
                                                 base_hash=base.weights_hash(),
                                                 component_hash=component_hashes(base, pipeline)))
    inputs = CaptionedInputs.of(pipeline, train.images, train.captions)
    for setting in settings:
        build_store(root, pipeline, train, setting, inputs, show_bar, device=device)
    return ModelFolder.load(root).to_dict()
