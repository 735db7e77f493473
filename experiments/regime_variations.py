"""What moves a model out of the kernel regime? The regime measures of `regime.py` (denoiser gap,
copy ratio) for models trained like a folder's base model with one thing changed: fewer training
images (a stratified subset), fewer or more optimiser steps, or a narrower or wider UNet.

Where the gap to the empirical optimal denoiser is small at the timesteps the attribution scores
(t <= 300 carries most of the LDS), a model's output is a similarity-weighted average of its
training images, and a pixel kernel attributes as well as a gradient method; a model far from it
has learned something the kernel does not see. Each variant is one training run of the folder's
recipe (seed 0), saved under runs/regime/ (resumable: a finished model is reused), then measured on
the folder's validation images and 100 generated samples.

    python experiments/regime_variations.py                                   # the digits (assets/)
    python experiments/regime_variations.py --root assets/fashion --variants steps-375

Variants: size-N (N training images, the same share of each class), steps-N, width-A-B[-C] (the
UNet's block_out_channels). Results: experiments/results/regime_variations.txt.
"""
from __future__ import annotations

from common import ROOT, machine_line  # first: before torch

# isort: split
import argparse
import dataclasses
import os
import time

import numpy as np
import torch
from regime import TIMESTEPS, denoiser_gap, nearest_distance, validation_images

from dtrak_core.folder import ModelFolder
from dtrak_core.model.sampling import generate
from dtrak_core.model.training import TrainConfig, train
from dtrak_core.model.unet import load_checkpoint, save_checkpoint

DIGITS_VARIANTS = ("base", "size-375", "size-750", "steps-375", "steps-6000", "width-8-16", "width-32-64")
SHOWN_TIMESTEPS = tuple(t for t in TIMESTEPS if t <= 500)


def stratified(labels: torch.Tensor, n: int, seed: int = 0) -> np.ndarray:
    """n indices with each class's share of the whole, the first of a seeded permutation per class."""
    labels = labels.numpy()
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = {c: int(round(n * np.mean(labels == c))) for c in classes}
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per[c]] for c in classes]))


def recipe(root: str, folder: ModelFolder) -> dict:
    """The base model's training recipe: the manifest's train_config, else its setting's (model/setting.json)."""
    if folder.train_config:
        return folder.train_config.to_dict()
    from dtrak_core.files import read_json

    return dict(read_json(os.path.join(root, "model", "setting.json"), "base model description", "")["setting"]["train"])


def variant_model(root: str, name: str, folder: ModelFolder, train_set, scheduler, base_unet):
    """(unet, training images, seconds to train or None when reused) of one variant."""
    images = train_set.images
    if name == "base":
        return base_unet, images, None
    kind, _, value = name.partition("-")
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in recipe(root, folder).items()
                            if k in {f.name for f in dataclasses.fields(TrainConfig)}})
    unet_config = dict(base_unet.config)
    if kind == "size":
        images = images[torch.as_tensor(stratified(train_set.labels, int(value)))]
    elif kind == "steps":
        config = dataclasses.replace(config, steps=int(value))
    elif kind == "width":
        channels = tuple(int(c) for c in value.split("-"))
        if len(channels) != len(unet_config["block_out_channels"]):
            raise SystemExit(f"{name}: this UNet has {len(unet_config['block_out_channels'])} levels")
        unet_config["block_out_channels"] = channels
        config = dataclasses.replace(config, block_out_channels=channels)
    else:
        raise SystemExit(f"unknown variant {name!r} (size-N, steps-N, width-A-B)")
    path = os.path.join(ROOT, "runs", "regime", f"{os.path.basename(os.path.abspath(root))}-{name}")
    if os.path.isdir(os.path.join(path, "unet")):
        return load_checkpoint(path)[0], images, None
    t0 = time.perf_counter()
    unet = train(images, scheduler, config, unet_config=unet_config, show_bar=False)
    seconds = time.perf_counter() - t0
    save_checkpoint(path, unet, scheduler)
    return unet, images, seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.path.join(ROOT, "assets"))
    p.add_argument("--variants", nargs="+", default=list(DIGITS_VARIANTS))
    p.add_argument("--samples", type=int, default=100)
    args = p.parse_args()
    print(machine_line())
    folder = ModelFolder.load(args.root)
    base_unet, scheduler = folder.load_model()
    train_set = folder.training_set()
    validation = validation_images(args.root, folder)
    print(f"{os.path.relpath(args.root, ROOT)}: base {len(train_set)} training images, recipe "
          f"{recipe(args.root, folder).get('steps')} steps; gap = denoiser gap at t "
          + "/".join(str(t) for t in SHOWN_TIMESTEPS) + "; err = the model's own error on unseen images at t 150")
    print(f"{'variant':12s} {'images':>6s} {'params':>8s}  {'gap':30s}  {'err':>5s}  {'copy':>5s}  train s")
    for name in args.variants:
        unet, images, seconds = variant_model(args.root, name, folder, train_set, scheduler, base_unet)
        unet.eval()
        gaps = [denoiser_gap(unet, scheduler, images, validation, t) for t in SHOWN_TIMESTEPS]
        err = next(g["error"] for g in gaps if g["t"] == 150)
        samples = generate(unet, scheduler, range(args.samples))
        copy = np.median(nearest_distance(samples, images)) / np.median(nearest_distance(validation, images))
        print(f"{name:12s} {len(images):6d} {sum(q.numel() for q in unet.parameters()):8,d}  "
              f"{' / '.join(format(g['gap'], '.3f') for g in gaps):30s}  {err:5.3f}  {copy:5.2f}  "
              + ("reused" if seconds is None else f"{seconds:.0f}"), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
