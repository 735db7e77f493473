"""Does D-TRAK beat TRAK on the text-to-image miniature, as on ArtBench in the paper? Paired.

For each K with features in the LDS run folder (the stores' K = 100, and K = 10 once
`lds-text2image evaluate --K 10` has cached it), each method is scored at its own best lambda (from
`lds_results*.json`: the paper's choice, optimistic for both alike), and the per-test-sample LDS of
D-TRAK minus TRAK is reported with its bootstrap spread over subsets (the same resamples for both
methods, so the spread is that of the difference, not of each).

Then the generalisation gap that explains when the output function matters: the eps-prediction
loss of the LoRA model on its own fine-tuning images and on held-out digits 5-9, at the ground
truth's timesteps and noise seeds. A model that fits its fine-tuning images much better than new
ones (memorises) is where D-TRAK's lead was largest on the pixel model (benchmarks/README.md,
`memorization_lds.py`); a gap near zero means the loss gradient (TRAK) already carries the signal.

    python experiments/text2image_ordering.py     # after `lds-text2image evaluate` (and `--K 10`)

Output of the committed run: results/text2image_ordering.txt.
"""
from __future__ import annotations

from common import ROOT  # first: before torch

# isort: split
import argparse
import glob
import json
import os

import numpy as np
import torch

from dtrak_core.attribution.scoring import TRAKScorer
from dtrak_core.evaluation.lds import SubsetBootstrap, rank_corr
from dtrak_core.evaluation.lds_run import TEST_SETS, LDSConfig, collect, eval_timesteps
from dtrak_core.files import load_result
from dtrak_core.text2image.attributor import TextToImageAttributor
from dtrak_core.text2image.data import load_digit_captions
from dtrak_core.text2image.features import CaptionedInputs
from dtrak_core.text2image.lds import conditional_eps_losses, query_features, training_features


def paired(run_dir: str, attributor, results: dict, col: dict, num_bootstrap: int) -> list[str]:
    lines = []
    K = results["methods"]["d-trak"]["setting"]["K"]
    boot = SubsetBootstrap(len(col["masks"]), num_bootstrap)
    test_sets = {k: torch.from_numpy(v) for k, v in load_result(os.path.join(run_dir, TEST_SETS)).items()}
    for set_name in ("validation", "generated"):
        F = np.asarray(col["F"][set_name], dtype=np.float64)
        per, per_boot = {}, {}
        for name in ("d-trak", "trak"):
            setting = attributor.setting(name)[0].with_(K=K)
            train = training_features(attributor, setting, run_dir)
            q = query_features(attributor, setting, test_sets[set_name], col["setup"]["test_prompts"][set_name],
                               os.path.join(run_dir, "queries", set_name, setting.slug))  # cached by `evaluate`
            lam = results["methods"][name][set_name]["paper"]["lambda"]
            g = col["masks"].astype(np.float64) @ TRAKScorer(lam=lam).fit(train).scores(q).T  # (M, Q)
            per[name], per_boot[name] = rank_corr(g, -F), boot.rank_corr(g, -F)
        diff = 100 * np.nanmean(per["d-trak"] - per["trak"])
        spread = 100 * np.nanstd(np.nanmean(per_boot["d-trak"] - per_boot["trak"], axis=1))
        wins = int(np.sum(per["d-trak"] > per["trak"]))
        lines.append(f"K={K} {set_name}: D-TRAK {100 * np.nanmean(per['d-trak']):.2f}, TRAK "
                     f"{100 * np.nanmean(per['trak']):.2f}; D-TRAK - TRAK = {diff:+.2f} +- {spread:.2f} "
                     f"(D-TRAK higher on {wins} of {len(F.T)} test samples)")
    return lines


def generalisation_gap(attributor, config: LDSConfig) -> str:
    pipe = attributor.pipeline
    ts = eval_timesteps(config.eval_timesteps, attributor.scheduler.config.num_train_timesteps)
    held_out = load_digit_captions("validation")
    out = {}
    for name, data in (("fine-tuning", attributor.train), ("held-out", held_out)):
        inputs = CaptionedInputs.of(pipe, data.images, list(data.captions))
        out[name] = float(conditional_eps_losses(attributor.unet, attributor.scheduler, inputs.latents,
                                                 inputs.contexts, ts, config.noise_seeds).mean())
    gap = out["held-out"] / out["fine-tuning"] - 1
    return (f"eps loss of the LoRA model: fine-tuning images {out['fine-tuning']:.4f} ({len(attributor.train)}), "
            f"held-out digits 5-9 {out['held-out']:.4f} ({len(held_out)}): held-out {100 * gap:+.1f}%")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.path.join(ROOT, "assets", "text2image"))
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(1)
    run_dir = os.path.join(args.root, "lds")
    attributor = TextToImageAttributor.load(args.root)
    col = collect(run_dir)
    print(f"{len(col['masks'])} subsets x {len(col['setup']['lds_config']['train_seeds'])} LoRA retrains")
    for path in sorted(glob.glob(os.path.join(run_dir, "lds_results*.json"))):
        with open(path) as f:
            for line in paired(run_dir, attributor, json.load(f), col, args.bootstrap):
                print(line)
    print(generalisation_gap(attributor, LDSConfig(**col["setup"]["lds_config"])))


if __name__ == "__main__":
    main()
