"""Does D-TRAK's counterfactual lead over the RBF pixel kernel come from removing more of the
target's own class? A class-matched control on the digits' 60 look-alike targets (k = 300).

D-TRAK's top 300 hold more images of the target's (classifier) label than the kernel's top 300 (31%
against 21%), and removing a class's images moves a sample of that class for any ranking. The
control removes, for each target, the kernel's top images with exactly as many of the target's
label as D-TRAK's top 300 holds, the rest from the kernel's top among the other labels; it retrains
with the same recipe and seed, regenerates the same seed and measures the same L2. If the matched
kernel moves the samples as far as D-TRAK, class composition explains the gap; if D-TRAK still
moves them further, its ranking carries more than which class to remove.

    python experiments/class_matched_counterfactual.py --run [--targets 60]   # the retrains (resumable)
    python experiments/class_matched_counterfactual.py                        # the table (finished targets)

One retrain per target (about 3 minutes on a free core); results in
experiments/results/class_matched_counterfactual/, the table in
experiments/results/class_matched_counterfactual.txt.
"""
from __future__ import annotations

from common import ROOT, machine_line  # first: before torch

# isort: split
import argparse
import os

import numpy as np
from scipy.stats import wilcoxon

from dtrak_core.attribution import baselines
from dtrak_core.attribution import methods as registry
from dtrak_core.evaluation import counterfactual as cf
from dtrak_core.evaluation.counterfactual_report import holm, load_results
from dtrak_core.files import load_result, save_result

K = 300
ASSETS = os.path.join(ROOT, "assets")
RUNS = {"D-TRAK": os.path.join(ASSETS, "counterfactual", "jobs"),
        "Random": os.path.join(ASSETS, "counterfactual", "jobs"),
        "pixel-rbf": os.path.join(ASSETS, "benchmarks", "lookalike_counterfactual", "jobs")}
RANKINGS = {"D-TRAK": "square", "Random": "random", "pixel-rbf": "pixel-rbf"}
OUT = os.path.join(ROOT, "experiments", "results", "class_matched_counterfactual")


def matched_removal(kernel_scores: np.ndarray, labels: np.ndarray, target_label: int, same: int, k: int) -> np.ndarray:
    """k training indices: the `same` highest-scored of the target's label, then the k - same
    highest-scored of the other labels (each strongest first)."""
    order = np.argsort(-kernel_scores, kind="stable")
    own = order[labels[order] == target_label][:same]
    rest = order[labels[order] != target_label][:k - len(own)]
    return np.concatenate([own, rest]).astype(np.int64)


def reference_results() -> dict:
    """{name: {seed: CounterfactualResult}} of the committed runs at k = K."""
    out = {}
    for name, run in RUNS.items():
        rows = [r for r in load_results(run) if r.k == K and r.ranking == RANKINGS[name]]
        out[name] = {r.seed: r for r in rows}
    return out


def run(targets: int) -> None:
    from dtrak_core.attribution.attributor import Attributor

    attributor = Attributor.load(ASSETS)
    labels = attributor.train.labels.numpy()
    config = cf.train_config_from_manifest(ASSETS)
    method = registry.get("pixel-rbf")
    dtrak = reference_results()["D-TRAK"]
    os.makedirs(OUT, exist_ok=True)
    for seed in cf.target_seeds(targets):
        path = os.path.join(OUT, f"pixel-rbf-matched-k{K}-seed{seed}.npz")
        if os.path.exists(path) or seed not in dtrak:
            continue
        ref = dtrak[seed]
        before = cf.sample(attributor.unet, attributor.scheduler, seed)
        if not np.allclose(before.numpy(), ref.before.numpy(), atol=1e-5):
            raise SystemExit(f"seed {seed}: the target differs from the committed run's; is this the same model?")
        same = int(np.sum(labels[ref.removed_indices] == ref.label_before))
        # the kernel at its data-free rules, as the committed look-alike run ranked it
        scores = baselines.kernel_ridge_at(method, attributor.method_inputs(), before[None].float(), {})[0]
        removed = matched_removal(scores, labels, ref.label_before, same, K)
        result = cf.retrain_and_measure(attributor, seed, before, removed, "pixel-rbf", config)
        save_result(path, **result.to_arrays(), same_label=np.array(same))
        print(f"seed {seed}: {same} of {K} removed share the target's label; L2 {result.l2:.2f} "
              f"(D-TRAK {ref.l2:.2f}), label {result.label_before} -> {result.label_after}", flush=True)


def table(targets: int) -> str:
    refs = reference_results()
    matched = {}
    for f in sorted(os.listdir(OUT)) if os.path.isdir(OUT) else []:
        if f.endswith(".npz"):
            z = load_result(os.path.join(OUT, f))
            matched[int(z["seed"])] = cf.CounterfactualResult.from_arrays(z)
    if not matched:
        return "no finished targets yet; run with --run"
    seeds = sorted(matched)
    cols = {"class-matched pixel-rbf": matched, **{n: refs[n] for n in ("pixel-rbf", "D-TRAK", "Random")}}
    lines = [f"{len(seeds)} of {targets} targets finished (seeds {seeds[0]}..{seeds[-1]}), k = {K}; the class-matched "
             "kernel removes as many images of the target's label as D-TRAK does; paired tests from 6 targets", "",
             "| ranking | median L2 [p25, p75] | label changed | removed with the target's label |", "|---|---|---|---|"]
    labels = None
    for name, rows in cols.items():
        rs = [rows[s] for s in seeds]
        l2 = np.array([r.l2 for r in rs])
        if labels is None:
            from dtrak_core.model.data import load_digits

            labels = load_digits("train").labels.numpy()
        share = np.mean([np.mean(labels[r.removed_indices] == r.label_before) for r in rs])
        lines.append(f"| {name} | {np.median(l2):.2f} [{np.percentile(l2, 25):.2f}, {np.percentile(l2, 75):.2f}] | "
                     f"{np.mean([r.label_changed for r in rs]):.0%} | {share:.0%} |")
    paired = []
    for a, b in (("D-TRAK", "class-matched pixel-rbf"), ("class-matched pixel-rbf", "pixel-rbf"),
                 ("class-matched pixel-rbf", "Random")):
        diff = np.array([cols[a][s].l2 - cols[b][s].l2 for s in seeds])
        p = float(wilcoxon(diff).pvalue) if len(seeds) >= 6 and np.any(diff != 0) else None
        paired.append({"a": a, "b": b, "wins": float(np.mean(diff > 0)), "median": float(np.median(diff)),
                       "wilcoxon_p": p})
    holm(paired)
    lines += ["", f"| comparison | A moves more | median L2(A) - L2(B) | Wilcoxon p | Holm-adjusted p ({len(paired)} tests) |",
              "|---|---|---|---|---|"]
    for p in paired:
        pv = "-" if p["wilcoxon_p"] is None else f"{p['wilcoxon_p']:.2g}"
        ph = "-" if p.get("holm_p") is None else f"{p['holm_p']:.2g}"
        lines.append(f"| {p['a']} vs {p['b']} | {p['wins']:.0%} | {p['median']:+.2f} | {pv} | {ph} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", action="store_true", help="run the retrains of the targets not finished yet")
    p.add_argument("--targets", type=int, default=60)
    args = p.parse_args()
    print(machine_line())
    if args.run:
        run(args.targets)
    print(table(args.targets))


if __name__ == "__main__":
    main()
