"""Build the embedded default under `assets/`: train the model, fill the feature stores, measure.

    python -m dtrak_core build-default        # ~15 min on 2 idle cores; deterministic for the same torch
                                              # build and CPU (training runs on BUILD_THREADS threads)

Resumable: a checkpoint trained with the same config is reused, and feature stores resume.

    assets/manifest.json        what was built, with timings and the sample-quality report
    assets/model/               diffusers checkpoint (unet/ + scheduler/), safetensors
    assets/stores/<setting>/    feature stores (see store.py)
"""
from __future__ import annotations

import json
import os
import time

import torch

from dtrak_core.attribution.attributor import MANIFEST
from dtrak_core.model.data import Dataset, load_dataset, load_digits
from dtrak_core.attribution.features import Featurizer, FeatureSetting
from dtrak_core.model.unet import (
    build_scheduler,
    checkpoint_hash,
    count_parameters,
    load_checkpoint,
    resolve_model,
    save_checkpoint,
)
from dtrak_core.evaluation.quality import sample_quality
from dtrak_core.model.sampling import generate
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.errors import IntegrityError
from dtrak_core.files import atomic_write_json, read_json
from dtrak_core.model.training import TrainConfig, train

DEFAULT_TRAIN_CONFIG = TrainConfig()
DEFAULT_SETTINGS = (FeatureSetting("square", K=100), FeatureSetting("loss", K=100))
QUALITY_SEEDS = range(256)
# CPU training is bit-deterministic for a seed only at a fixed thread count (reductions split
# differently), so the default is always trained with this many threads, whatever the machine.
BUILD_THREADS = 2


MANIFEST_REMEDY = ("rebuild the model folder with `python -m dtrak_core build-default` (or `build` for your own "
                   "model; finished feature stores are reused)")


def read_manifest(root: str) -> dict:
    """root/manifest.json, {} when there is none; an `IntegrityError` naming it when it is damaged."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return {}
    return read_json(path, "model manifest", MANIFEST_REMEDY)


def check_weights(root: str, manifest: dict, unet) -> None:
    """The loaded weights are the ones manifest.json recorded (`checkpoint_hash`, when recorded): a
    replaced or damaged weights file that still loads is refused, not trusted."""
    recorded, have = manifest.get("checkpoint_hash"), checkpoint_hash(unet)
    if recorded is not None and recorded != have:
        ckpt = os.path.join(root, manifest.get("checkpoint", "model"))
        raise IntegrityError(os.path.join(ckpt, "unet"), f"(model weights) hashes to {have}, but "
                             f"{os.path.join(root, MANIFEST)} records checkpoint_hash {recorded} (the weights were "
                             f"replaced or are corrupt)",
                             "restore the model's weights, or rebuild the model folder (`python -m dtrak_core "
                             "build-default`, or `build` for your own model)")


def train_or_load(root: str, config: TrainConfig, show_bar: bool = True):
    """The checkpoint under root/model if it was trained with `config`, else train and save it."""
    ckpt = os.path.join(root, "model")
    manifest = read_manifest(root)
    if manifest.get("train_config") == json.loads(json.dumps(config.to_dict())) and os.path.isdir(ckpt):
        unet, scheduler = load_checkpoint(ckpt)
        check_weights(root, manifest, unet)
        return unet, scheduler, manifest.get("train_seconds")
    train_set = load_digits("train")
    scheduler = build_scheduler()
    t0 = time.perf_counter()
    unet = train(train_set.images, scheduler, config, show_bar=show_bar)
    seconds = time.perf_counter() - t0
    save_checkpoint(ckpt, unet, scheduler)
    unet, scheduler = load_checkpoint(ckpt)  # what users get: the saved weights
    atomic_write_json(os.path.join(root, MANIFEST), {"checkpoint": "model", "dataset": "digits-train",
                                                     "checkpoint_hash": checkpoint_hash(unet),
                                                     "train_config": config.to_dict(), "train_seconds": seconds,
                                                     "stores": []})
    return unet, scheduler, seconds


def build_store(root: str, unet, scheduler, setting: FeatureSetting, show_bar: bool = True,
                train_set: Dataset | None = None) -> dict:
    """Fill (or finish) the store for `setting` and register it in the manifest. `train_set`: the
    manifest's dataset, when the caller has it loaded already."""
    if train_set is None:
        train_set = load_dataset(read_manifest(root).get("dataset", "digits-train"))
    rel = os.path.join("stores", setting.slug)
    identity = FeatureStore.identity(setting, checkpoint_hash(unet), train_set.fingerprint)
    store = FeatureStore.create(os.path.join(root, rel), identity, len(train_set), setting.k)
    t0 = time.perf_counter()
    store.fill(Featurizer(unet, scheduler, setting), train_set.images, show_bar=show_bar)
    seconds = time.perf_counter() - t0
    manifest = read_manifest(root)
    if rel not in manifest["stores"]:
        manifest["stores"].append(rel)
    manifest.setdefault("featurize_seconds", {})
    manifest["featurize_seconds"].setdefault(rel, seconds)  # a resumed fill keeps the first full timing
    atomic_write_json(os.path.join(root, MANIFEST), manifest)
    return manifest


def build_default(root: str = "assets", config: TrainConfig = DEFAULT_TRAIN_CONFIG,
                  settings=DEFAULT_SETTINGS, show_bar: bool = True) -> dict:
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
    manifest = read_manifest(root)
    manifest.update({"parameters": count_parameters(unet), "checkpoint_hash": checkpoint_hash(unet),
                     "quality": {"seeds": f"0..{len(QUALITY_SEEDS) - 1}", "sampler": "ddim-50",
                                 **sample_quality(samples)},
                     "torch": torch.__version__, "threads": BUILD_THREADS})
    atomic_write_json(os.path.join(root, MANIFEST), manifest)
    return manifest


def build_from(root: str, model: str, data: str, settings=DEFAULT_SETTINGS, invert: bool = False,
               show_bar: bool = True) -> dict:
    """A model folder for your own model and training images: feature stores under `root`, the
    model and the images referenced where they are (nothing is copied or downloaded).

    model: a folder with unet/ + scheduler/ (a saved diffusers DDPM/DDIM pipeline, or a dtrak
        checkpoint) or a Hugging Face repo id already in the local cache.
    data: the folder of images the model was trained on (labels from class sub-folders, if any),
        resized to the model's resolution and channels; `invert` for dark-on-light images.
    Resumable: run it again to finish stores; a root built for another model or data is refused.
    """
    folder = resolve_model(model)
    unet, scheduler = load_checkpoint(folder)
    cfg = unet.config
    spec = {"folder": os.path.abspath(data), "resolution": int(cfg.sample_size), "channels": int(cfg.in_channels),
            "invert": bool(invert)}
    train_set = load_dataset(spec)
    identity = {"checkpoint": folder, "dataset": spec, "checkpoint_hash": checkpoint_hash(unet),
                "dataset_fingerprint": train_set.fingerprint}
    manifest = read_manifest(root)
    for key in ("checkpoint_hash", "dataset_fingerprint"):
        if manifest and manifest.get(key) != identity[key]:
            raise ValueError(f"{os.path.join(root, MANIFEST)} was built for another {key.split('_')[0]} "
                             f"({key} {manifest.get(key)!r}, not {identity[key]!r}); use another --root")
    os.makedirs(root, exist_ok=True)
    atomic_write_json(os.path.join(root, MANIFEST), {**manifest, **identity, "stores": manifest.get("stores", []),
                                                     "model_source": model, "parameters": count_parameters(unet),
                                                     "num_train": len(train_set)})
    for setting in settings:
        build_store(root, unet, scheduler, setting, show_bar, train_set=train_set)
    return read_manifest(root)
