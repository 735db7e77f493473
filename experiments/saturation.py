"""Does TRAK's loss gradient saturate on the default model? (Why D-TRAK's lead is small here.)

The poster's explanation for D-TRAK >> TRAK: the loss gradient is 2 (eps_theta - eps)^T d eps_theta,
and a model that fits its training images well predicts eps almost exactly on them, so the residual,
and with it the training samples' TRAK features, shrink ("gradient saturation"); the Square output
function's gradient 2 eps_theta^T d eps_theta does not shrink. This script measures, side by side:

1. the eps-prediction loss on training vs validation images (is the model fitting its training set
   more tightly than unseen digits?);
2. the mean norm of the projected features of training vs validation images, loss vs square
   (does the loss gradient shrink on training images relative to square?);

for the default model and, as a contrast, for the same recipe trained on only 100 digits (a model
that memorizes its training set), where saturation should show.

    python experiments/saturation.py            # ~3 min on 2 cores
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dtrak_core.attribution.features import FeatureSetting, Featurizer  # noqa: E402
from dtrak_core.evaluation.lds_run import eps_losses, eval_timesteps  # noqa: E402
from dtrak_core.model.data import load_digits  # noqa: E402
from dtrak_core.model.training import TrainConfig, train  # noqa: E402
from dtrak_core.model.unet import load_checkpoint  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def fit_and_norms(unet, scheduler, train_images, val_images, K=10):
    ts = eval_timesteps(100)
    loss_tr = float(eps_losses(unet, scheduler, train_images, ts, (0, 1, 2)).mean())
    loss_va = float(eps_losses(unet, scheduler, val_images, ts, (0, 1, 2)).mean())
    norms = {}
    for fn in ("loss", "square"):
        feat = Featurizer(unet, scheduler, FeatureSetting(fn, K=K))
        tr, va = feat(train_images).norm(dim=1).mean().item(), feat(val_images).norm(dim=1).mean().item()
        norms[fn] = (tr, va)
    return loss_tr, loss_va, norms


def report(name, loss_tr, loss_va, norms):
    print(f"\n{name}")
    print(f"  eps loss   train {loss_tr:.4f}   validation {loss_va:.4f}   train/validation {loss_tr / loss_va:.3f}")
    for fn, (tr, va) in norms.items():
        print(f"  ||phi_{fn:6s}|| train {tr:9.4f}   validation {va:9.4f}   train/validation {tr / va:.3f}")
    ratio = (norms["loss"][0] / norms["loss"][1]) / (norms["square"][0] / norms["square"][1])
    print(f"  loss-gradient shrinkage on training images relative to square: {ratio:.3f} (1 = none)")


def main():
    torch.manual_seed(0)
    train_set, val_set = load_digits("train"), load_digits("validation")
    unet, scheduler = load_checkpoint(os.path.join(ROOT, "model"))
    idx = torch.arange(0, 1500, 5)  # 300 training digits, every 5th
    t0 = time.perf_counter()
    report("default model (1,500 digits, 1,500 steps)", *fit_and_norms(unet, scheduler, train_set.images[idx],
                                                                       val_set.images))
    small = train_set.images[:100]
    memorizer = train(small, scheduler, TrainConfig(), show_bar=False)
    report("same recipe on 100 digits (1,500 steps = 1,920 epochs: memorizes)",
           *fit_and_norms(memorizer, scheduler, small, val_set.images))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
