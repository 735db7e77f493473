"""DAS and the sharpened rankings beside D-TRAK, TRAK and random in the counterfactual harness: one
table, paired per target.

The paper's rankings were run into `assets/counterfactual/jobs/`, DAS into
`assets/benchmarks/das_counterfactual/jobs/`, the sharpened D-TRAK and avg (`d-trak-sharp`,
`avg-sharp`: their signed rankings at the lambdas tuned for the sharpened scores) into
`assets/benchmarks/sharpened_counterfactual/jobs/` (same model, recipe, targets and removal
sizes; each run's identity.json says so; a run not there yet is left out). This reads both job sets as one (linked into a temporary folder) and
prints the harness's own table: median pixel L2 per ranking and k, label changes, and the paired
per-target comparisons (share of targets where a ranking moves the image more, Wilcoxon p).

Then why DAS moves the images less: its score is squared, so its top-k holds the strongest
opponents as well as the strongest proponents. For each DAS job, the share of the removed images
whose *signed* score (DAS before squaring: the `avg` store's TRAK score at DAS's lambda times a
positive residual weight) is negative.

    python experiments/das_counterfactual.py
"""
from __future__ import annotations

from common import ROOT  # first: before torch

# isort: split
import json
import os
import tempfile

import numpy as np
import torch

from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.das import REGISTRY_LAMBDA
from dtrak_core.evaluation.counterfactual import load_job
from dtrak_core.evaluation.counterfactual_report import format_table, summarize
from dtrak_core.model.data import load_digits

DAS_RUN = os.path.join(ROOT, "assets", "benchmarks", "das_counterfactual", "jobs")
RUNS = [run for run in (os.path.join(ROOT, "assets", "counterfactual", "jobs"), DAS_RUN,
                        os.path.join(ROOT, "assets", "benchmarks", "sharpened_counterfactual", "jobs"))
        if os.path.isfile(os.path.join(run, "identity.json"))]


def same_identity(first: dict, *others: dict) -> None:
    for other in others:
        for key in ("checkpoint_hash", "dataset", "sampling", "train_config", "random_ranking_seed"):
            if first.get(key) != other.get(key):
                raise SystemExit(f"the runs differ in {key}: {first.get(key)} vs {other.get(key)}; they cannot be "
                                 "compared")


def main():
    identities = []
    for run in RUNS:
        with open(os.path.join(run, "identity.json")) as f:
            identities.append(json.load(f))
    same_identity(*identities)
    with tempfile.TemporaryDirectory() as both:
        for run in RUNS:
            for name in os.listdir(run):
                if name.endswith(".npz") and not name.startswith("control"):
                    os.symlink(os.path.join(run, name), os.path.join(both, name))
        train = load_digits("train")
        summary = summarize(both, train.labels.numpy())
    print(format_table(summary, len(train)))
    torch.set_num_threads(1)
    attributor = Attributor.load(os.path.join(ROOT, "assets"))
    for k in sorted({c["k"] for c in summary["cells"] if c["ranking"] == "das"}, reverse=True):
        shares = []
        for name in sorted(os.listdir(DAS_RUN)):
            if name.startswith(f"das-k{k}-") and name.endswith(".npz"):
                job = load_job(os.path.join(DAS_RUN, name))
                signed = attributor.attribute(job.before.float(), "avg", lam=REGISTRY_LAMBDA).scores
                shares.append(float(np.mean(signed[job.removed_indices] < 0)))
        print(f"DAS k={k}: opponents (negative signed score) among the removed: median {np.median(shares):.0%} "
              f"[min {min(shares):.0%}, max {max(shares):.0%}] over {len(shares)} targets")


if __name__ == "__main__":
    main()
