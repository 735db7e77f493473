"""The counterfactual of the strongest model-free baseline beside D-TRAK's: remove the RBF pixel
kernel's top 300 (at its data-free rules, as D-TRAK's ranking uses the data-free lambda), retrain,
regenerate the same seed, on the same 60 targets, model and recipe as `assets/counterfactual/`.
Paired per target, with Holm-adjusted p-values over every comparison of the table.

    python -m dtrak_core counterfactual --rankings pixel-rbf --k 300 --targets 60 \\
        --out assets/benchmarks/lookalike_counterfactual --threads 1 --no-control   # runs / resumes the retrains
    python experiments/lookalike_counterfactual.py                                  # the table (finished targets)
"""
from __future__ import annotations

from common import ROOT  # first: before torch

# isort: split
import json
import os
import tempfile

from dtrak_core.evaluation.counterfactual_report import format_table, summarize
from dtrak_core.model.data import load_digits

RUNS = {"pixel-rbf": os.path.join(ROOT, "assets", "benchmarks", "lookalike_counterfactual", "jobs"),
        "paper": os.path.join(ROOT, "assets", "counterfactual", "jobs")}
K = 300


def main():
    identities = {}
    for name, run in RUNS.items():
        with open(os.path.join(run, "identity.json")) as f:
            identities[name] = json.load(f)
    for key in ("checkpoint_hash", "dataset", "sampling", "train_config", "random_ranking_seed"):
        if identities["pixel-rbf"].get(key) != identities["paper"].get(key):
            raise SystemExit(f"the runs differ in {key}; they cannot be compared")
    done = sorted(int(f.rsplit("seed", 1)[1][:-4]) for f in os.listdir(RUNS["pixel-rbf"]) if f.endswith(".npz"))
    with tempfile.TemporaryDirectory() as both:
        for run in RUNS.values():
            for f in os.listdir(run):
                if f.endswith(".npz") and f"-k{K}-" in f and int(f.rsplit("seed", 1)[1][:-4]) in done:
                    os.symlink(os.path.join(run, f), os.path.join(both, f))
        summary = summarize(both, load_digits("train").labels.numpy())
    print(f"{len(done)} of 60 targets finished for the RBF pixel kernel's ranking (seeds {done[0]}..{done[-1]}); "
          f"every ranking on those targets, k = {K}:\n")
    print(format_table(summary))


if __name__ == "__main__":
    main()
