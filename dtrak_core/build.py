"""Build a model folder (see folder.py): the embedded default, or feature stores for your own model.

    python -m dtrak_core build-default        # ~15 min on 2 idle cores; deterministic for the same torch
                                              # build and CPU (training runs on BUILD_THREADS threads)

Resumable: a checkpoint trained with the same config is reused, and feature stores resume.

    <root>/manifest.json        what was built, with timings and the sample-quality report
    <root>/model/               diffusers checkpoint (unet/ + scheduler/), safetensors
    <root>/stores/<setting>/    feature stores (see store.py)
"""
from __future__ import annotations

import os
import time

import torch

from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.attribution.store import FeatureStore, cached_store
from dtrak_core.errors import SealMismatch
from dtrak_core.evaluation.quality import sample_quality
from dtrak_core.folder import MANIFEST, ModelFolder, default_root, path_in_root
from dtrak_core.model.data import INPUT_RANGE, Dataset, load_dataset, load_digits, parse_input_range
from dtrak_core.model.sampling import generate
from dtrak_core.model.training import TrainConfig, train
from dtrak_core.model.unet import (
    build_scheduler,
    checkpoint_hash,
    config_hashes,
    count_parameters,
    load_checkpoint,
    resolve_model,
    save_checkpoint,
)

DEFAULT_TRAIN_CONFIG = TrainConfig()
DEFAULT_SETTINGS = (FeatureSetting("square", K=100), FeatureSetting("loss", K=100))
QUALITY_SEEDS = range(256)
# CPU training is bit-deterministic for a seed only at a fixed thread count (reductions split
# differently), so the default is always trained with this many threads, whatever the machine.
BUILD_THREADS = 2


def train_or_load(root: str, config: TrainConfig, show_bar: bool = True):
    """The checkpoint under root/model if it was trained with `config`, else train and save it
    (a new manifest: what was built for another model does not belong to this one). A manifest
    whose training recipe was edited by hand is not trusted to say how the model was trained: the
    model is trained again (the rebuild its error message names)."""
    ckpt = os.path.join(root, "model")
    try:
        folder = ModelFolder.load(root, missing_ok=True, tuned=False)
    except SealMismatch as e:
        if e.entry != "train_config":
            raise
        folder = None
    if folder is not None and folder.trained_with(config) and os.path.isdir(ckpt):
        unet, scheduler = load_checkpoint(ckpt)
        folder.check_weights(unet)
        return unet, scheduler, folder.train_seconds
    train_set = load_digits("train")
    scheduler = build_scheduler()
    t0 = time.perf_counter()
    unet = train(train_set.images, scheduler, config, show_bar=show_bar)
    seconds = time.perf_counter() - t0
    save_checkpoint(ckpt, unet, scheduler)
    unet, scheduler = load_checkpoint(ckpt)  # what users get: the saved weights
    ModelFolder(root, checkpoint="model", dataset="digits-train", checkpoint_hash=checkpoint_hash(unet),
                config_hash=config_hashes(ckpt), train_config=config, train_seconds=seconds, stores=[]).save()
    return unet, scheduler, seconds


def build_store(root: str, unet, scheduler, setting: FeatureSetting, show_bar: bool = True,
                train_set: Dataset | None = None, device="cpu") -> dict:
    """Fill (or finish) the store for `setting` and register it in the manifest; the manifest's
    fields as saved. `train_set`: the manifest's dataset, when the caller has it loaded already.
    device: where the gradients are computed (the features are float32 on every device)."""
    if train_set is None:
        train_set = ModelFolder.load(root).training_set()
    rel = os.path.join("stores", setting.slug)
    identity = FeatureStore.identity(setting, checkpoint_hash(unet), train_set.fingerprint)
    t0 = time.perf_counter()
    cached_store(os.path.join(root, rel), identity, train_set.images,
                 lambda: Featurizer(unet, scheduler, setting, device=device), setting.k, show_bar=show_bar)
    seconds = time.perf_counter() - t0
    return ModelFolder.edit(root, lambda folder: folder.add_store(rel, seconds)).to_dict()


def build_default(root: str | None = None, config: TrainConfig = DEFAULT_TRAIN_CONFIG,
                  settings=DEFAULT_SETTINGS, show_bar: bool = True) -> dict:
    """The embedded default under `root` (None: `folder.default_root()`): train (or reuse) the
    model, fill its stores, measure sample quality; the manifest's fields as saved."""
    root = default_root() if root is None else root
    os.makedirs(root, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        unet, scheduler, train_seconds = train_or_load(root, config, show_bar)
    finally:
        torch.set_num_threads(threads)
    for setting in settings:
        build_store(root, unet, scheduler, setting, show_bar)
    samples = generate(unet, scheduler, QUALITY_SEEDS)
    quality = {"seeds": f"0..{len(QUALITY_SEEDS) - 1}", "sampler": "ddim-50", **sample_quality(samples)}
    return ModelFolder.edit(root, parameters=count_parameters(unet), checkpoint_hash=checkpoint_hash(unet),
                            config_hash=config_hashes(os.path.join(root, "model")), quality=quality, torch_version=torch.__version__, threads=BUILD_THREADS).to_dict()


def build_from(root: str, model: str, data: str, settings=DEFAULT_SETTINGS, invert: bool = False,
               show_bar: bool = True, device="cpu", precision: str = "fp32", input_range=INPUT_RANGE) -> dict:
    """A model folder for your own model and training images: feature stores under `root`, the
    model and the images referenced where they are (nothing is copied or downloaded).

    model: a folder with unet/ + scheduler/ (a saved diffusers DDPM/DDIM pipeline, or a dtrak
        checkpoint) or a Hugging Face repo id already in the local cache.
    data: the folder of images the model was trained on (labels from class sub-folders, if any):
        every file under it (sorted by path) centre-cropped to a square, resized to the model's
        resolution (box filter), converted to its channels (grey or RGB), scaled to [-1, 1] (0 -> -1,
        255 -> 1) and mapped linearly to `input_range`; `invert` for dark-on-light images (negated in
        [-1, 1] before the mapping).
    input_range: (low, high) the model's training pixels lay in: (-1, 1), the default, or e.g.
        (0, 1), or "0,1"; the manifest records it (`input_range`, and in the dataset entry when not
        [-1, 1]), and query images outside it are refused.
    Resumable: run it again to finish stores; a root built for another model or data is refused.
    device: where the gradients are computed ("cpu", "cuda", "cuda:<i>", "mps"); precision: the
    policy of the model's forward passes outside the features (`devices.py`): the features are
    float32 whatever it is, so it changes no store. Both are checked (an unavailable device, fp16 on
    a CPU: a ValueError) before any work. settings=(): the manifest only (fill the stores later with
    `featurize --device ...`, or `torchrun ... featurize`).
    """
    from dtrak_core.devices import check_precision, resolve_device

    resolve_device(device)
    check_precision(precision, device)
    folder = resolve_model(model)
    unet, scheduler = load_checkpoint(folder)
    cfg = unet.config
    input_range = parse_input_range(input_range)
    spec = {"folder": os.path.abspath(data), "resolution": int(cfg.sample_size), "channels": int(cfg.in_channels),
            "invert": bool(invert)}
    if input_range != INPUT_RANGE:  # (folders built before it was recorded, and [-1, 1] ones, have none)
        spec["input_range"] = list(input_range)
    existing = ModelFolder.load(root, missing_ok=True)
    if existing is not None and existing.value_range != input_range:
        raise ValueError(f"{os.path.join(root, MANIFEST)} was built for input range {list(existing.value_range)}, "
                         f"not {list(input_range)}; use another --root (or the same --input-range)")
    train_set = load_dataset(spec)
    spec["folder"] = path_in_root(root, data)
    identity = {"checkpoint": path_in_root(root, folder), "dataset": spec, "checkpoint_hash": checkpoint_hash(unet),
                "config_hash": config_hashes(folder), "dataset_fingerprint": train_set.fingerprint}
    for key in ("checkpoint_hash", "dataset_fingerprint"):
        if existing is not None and getattr(existing, key) != identity[key]:
            raise ValueError(f"{os.path.join(root, MANIFEST)} was built for another {key.split('_')[0]} "
                             f"({key} {getattr(existing, key)!r}, not {identity[key]!r}); use another --root")
    ModelFolder.edit(root, lambda f: setattr(f, "stores", f.stores or []), **identity, model_source=model,
                     parameters=count_parameters(unet), num_train=len(train_set), input_range=list(input_range))
    for setting in settings:
        build_store(root, unet, scheduler, setting, show_bar, train_set=train_set, device=device)
    return ModelFolder.load(root).to_dict()
