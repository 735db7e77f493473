"""Does a ranking's lead in a counterfactual run follow how many images of the target's class it
removes? The observational counterpart of class_matched_counterfactual.py: no retrains, only the
finished jobs of one or more runs of a model folder.

A ranking that removes more of the target's (classifier) class can move the sample further for
that reason alone. Per pair of rankings on the targets both measured, it reports how many of the
target's class each removed (median), the Spearman correlation between the per-target differences
in L2 and in same-class count, and how often the first ranking moves the target further on the
targets where it removed no more of the class than the second (if its lead came from class
composition alone, there it would not lead), and the lead a straight-line fit of the L2 difference
on the same-class difference puts at equal counts. Per ranking, the correlation of same-class count and
L2 across targets.

    python experiments/counterfactual_composition.py --root assets/fashion --runs assets/fashion/counterfactual
    python experiments/counterfactual_composition.py --root assets --runs assets/counterfactual \
        assets/benchmarks/lookalike_counterfactual
"""
from __future__ import annotations

from common import labelled, machine_line  # first: before torch

# isort: split
import argparse
import os

import numpy as np
from scipy.stats import linregress, spearmanr

from dtrak_core.attribution import methods as registry
from dtrak_core.evaluation.counterfactual import display_name
from dtrak_core.evaluation.counterfactual_report import load_results


def composition(rows, train_labels: np.ndarray, labels: dict[int, int]) -> list[str]:
    by = {}  # (k, ranking) -> {seed: (l2, same-class count)}
    for r in rows:
        same = int(np.sum(train_labels[r.removed_indices] == labels[r.seed]))
        by.setdefault((r.k, r.ranking), {})[r.seed] = (r.l2, same)
    lines = []
    for k in sorted({k for k, _ in by}, reverse=True):
        names = sorted((n for kk, n in by if kk == k), key=registry.sort_key, reverse=True)
        lines += [f"k = {k}", "", "| ranking | targets | removed of the target's class (median) | "
                  "Spearman(same-class count, L2) across targets |", "|---|---|---|---|"]
        for n in names:
            v = np.array(list(by[(k, n)].values()))
            rho = spearmanr(v[:, 1], v[:, 0]) if len(v) >= 6 and np.ptp(v[:, 1]) > 0 else None
            lines.append(f"| {display_name(n)} | {len(v)} | {np.median(v[:, 1]):g} | "
                         + ("-" if rho is None else f"{rho.statistic:+.2f} (p {rho.pvalue:.2g})") + " |")
        lines += ["", "| A vs B (same targets) | n | A's and B's same-class removals (median) | Spearman(dL2, "
                  "d same-class) | d same-class (min to max) | A's lead at equal same-class counts (dL2 = a + b d same-class: a, its s.e.) | "
                  "A moves more where it removed no more of the class |", "|---|---|---|---|---|---|---|"]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                seeds = sorted(set(by[(k, a)]) & set(by[(k, b)]))
                if not seeds:
                    continue
                A = np.array([by[(k, a)][s] for s in seeds])
                B = np.array([by[(k, b)][s] for s in seeds])
                dl2, dsame = A[:, 0] - B[:, 0], A[:, 1] - B[:, 1]
                rho = spearmanr(dsame, dl2) if len(seeds) >= 6 and np.ptp(dsame) > 0 else None
                fewer = dsame <= 0
                fit = linregress(dsame, dl2) if len(seeds) >= 6 and np.ptp(dsame) > 0 else None
                lines.append(f"| {display_name(a)} vs {display_name(b)} | {len(seeds)} | "
                             f"{np.median(A[:, 1]):g} / {np.median(B[:, 1]):g} | "
                             + ("-" if rho is None else f"{rho.statistic:+.2f} (p {rho.pvalue:.2g})")
                             + f" | {int(dsame.min()):+d} to {int(dsame.max()):+d}"
                             + (" | -" if fit is None else f" | {fit.intercept:+.2f} ({fit.intercept_stderr:.2f})")
                             + f" | {int(np.sum(dl2[fewer] > 0))} of {int(fewer.sum())} |")
        lines.append("")
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="assets/fashion", help="the model folder (its training labels, its classifier)")
    p.add_argument("--runs", nargs="+", default=["assets/fashion/counterfactual"],
                   help="counterfactual run folders (each with jobs/); rankings of every run pooled per target")
    args = p.parse_args()
    print(machine_line())
    from dtrak_core.attribution.attributor import Attributor

    train_labels = Attributor.load(args.root).train.labels.numpy()
    rows = labelled(args.root, [r for run in args.runs for r in load_results(os.path.join(run, "jobs"))])
    if not rows:
        raise SystemExit(f"no finished jobs under {', '.join(args.runs)}")
    print(f"{len(rows)} finished jobs of {', '.join(args.runs)}; the target's class as its classifier reads it\n")
    print("\n".join(composition(rows, train_labels, {r.seed: r.label_before for r in rows})))


if __name__ == "__main__":
    main()
