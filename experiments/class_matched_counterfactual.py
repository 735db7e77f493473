"""Does D-TRAK's counterfactual lead over the RBF pixel kernel come from removing more of the
target's own class? A class-matched control.

D-TRAK's top k hold more images of the target's (classifier) label than the kernel's top k
(digits, k = 300: 31% against 21%; Fashion-MNIST, k = 100: 39% against 28%), and removing a class's
images moves a sample of that class for any ranking. The control removes, for each target, the
kernel's top images with exactly as many of the target's label as D-TRAK's top k holds, the rest
from the kernel's top among the other labels; it retrains with the same recipe and seed,
regenerates the same seed and measures the same L2. If the matched kernel moves the samples as far
as D-TRAK, class composition explains the gap; if D-TRAK still moves them further, its ranking
carries more than which class to remove.

The digits' 60 look-alike targets, k = 300 (one retrain per target, about 3 minutes on a free core;
results in experiments/results/class_matched_counterfactual/):

    python experiments/class_matched_counterfactual.py --run [--targets 60]   # the retrains (resumable)
    python experiments/class_matched_counterfactual.py                        # the table (finished targets)

A model folder with a `counterfactual-own` run of D-TRAK and the pixel kernel in <root>/counterfactual
(Fashion-MNIST: 16 targets, k = 100, about 17 minutes per retrain on one core; the removals, in the
run's format, and the results go to <root>/counterfactual-matched/, the retrained models to
<root>/counterfactual-matched-models/):

    python experiments/class_matched_counterfactual.py --root assets/fashion --run [--shard 0/2]
    python experiments/class_matched_counterfactual.py --root assets/fashion
"""
from __future__ import annotations

from common import ROOT, labelled, machine_line  # first: before torch

# isort: split
import argparse
import os
import shutil

import numpy as np
import torch
from scipy.stats import wilcoxon

from dtrak_core.attribution import baselines
from dtrak_core.attribution import methods as registry
from dtrak_core.evaluation import counterfactual as cf
from dtrak_core.evaluation.counterfactual_report import holm, load_results
from dtrak_core.files import atomic_write_json, load_result, read_json, save_result

K = 300
ASSETS = os.path.join(ROOT, "assets")
RUNS = {"D-TRAK": os.path.join(ASSETS, "counterfactual", "jobs"),
        "Random": os.path.join(ASSETS, "counterfactual", "jobs"),
        "pixel-rbf": os.path.join(ASSETS, "benchmarks", "lookalike_counterfactual", "jobs")}
RANKINGS = {"D-TRAK": "square", "Random": "random", "pixel-rbf": "pixel-rbf"}
OUT = os.path.join(ROOT, "experiments", "results", "class_matched_counterfactual")
MATCHED = "class-matched pixel-rbf"


def matched_removal(kernel_order: np.ndarray, labels: np.ndarray, target_label: int, same: int, k: int) -> np.ndarray:
    """k training indices from the kernel's order (strongest first): the `same` first of the
    target's label, then the k - same first of the other labels."""
    order = np.asarray(kernel_order)
    own = order[labels[order] == target_label][:same]
    rest = order[labels[order] != target_label][:k - len(own)]
    return np.concatenate([own, rest]).astype(np.int64)


# -- the digits ------------------------------------------------------------------------------------
def reference_results() -> dict:
    """{name: {seed: CounterfactualResult}} of the digits' committed runs at k = K."""
    out = {}
    for name, run in RUNS.items():
        rows = [r for r in load_results(run) if r.k == K and r.ranking == RANKINGS[name]]
        out[name] = {r.seed: r for r in rows}
    return out


def run_digits(targets: int) -> None:
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
        removed = matched_removal(np.argsort(-scores, kind="stable"), labels, ref.label_before, same, K)
        result = cf.retrain_and_measure(attributor, seed, before, removed, "pixel-rbf", config)
        save_result(path, **result.to_arrays(), same_label=np.array(same))
        print(f"seed {seed}: {same} of {K} removed share the target's label; L2 {result.l2:.2f} "
              f"(D-TRAK {ref.l2:.2f}), label {result.label_before} -> {result.label_after}", flush=True)


def digits_table(targets: int) -> str:
    from dtrak_core.model.data import load_digits

    refs = reference_results()
    matched = {}
    for f in sorted(os.listdir(OUT)) if os.path.isdir(OUT) else []:
        if f.endswith(".npz"):
            z = load_result(os.path.join(OUT, f))
            matched[int(z["seed"])] = cf.CounterfactualResult.from_arrays(z)
    labels = {s: r.label_before for s, r in refs["D-TRAK"].items()}
    return table({MATCHED: matched, **{n: refs[n] for n in ("pixel-rbf", "D-TRAK", "Random")}},
                 load_digits("train").labels.numpy(), labels, K, targets)


# -- a model folder's counterfactual-own run ----------------------------------------------------
def folder_paths(root: str) -> tuple[str, str, str]:
    """The folder's counterfactual run, the control's run, and where its retrained models go."""
    return (os.path.join(root, "counterfactual"), os.path.join(root, "counterfactual-matched"),
            os.path.join(root, "counterfactual-matched-models"))


def prepare_folder(root: str) -> str:
    """Write <root>/counterfactual-matched/ (removals.json in the run's format, its targets and
    identity) from the run's planned D-TRAK and kernel removals; the path of removals.json. A
    control prepared before must hold exactly these removals."""
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.evaluation import lds_own
    from dtrak_core.model.classifier import folder_classifier

    run, out, _ = folder_paths(root)
    removals = read_json(os.path.join(run, "removals.json"), "counterfactual removals",
                         "run the folder's counterfactual (`counterfactual-own prepare`) first")
    attributor = Attributor.load(root)
    labels, n = attributor.train.labels.numpy(), len(attributor.train)
    targets = load_result(os.path.join(run, "targets.npz"), keys=("seeds", "images"))
    seeds = [int(s) for s in targets["seeds"]]
    classifier = folder_classifier(root)
    if classifier is None:
        raise SystemExit(f"{root} has no classifier/: the control needs the target's class")
    read, _ = classifier.classify(targets["images"])
    planned = {(j["ranking"], lds_own.target_seed(j)): j for j in removals["jobs"]}
    dtrak, kernel = cf.ranking_name("d-trak"), cf.ranking_name("pixel-rbf")
    jobs = []
    for seed, image, label in zip(seeds, targets["images"], map(int, read)):
        if (dtrak, seed) not in planned or (kernel, seed) not in planned:
            continue
        ref, own = planned[(dtrak, seed)], planned[(kernel, seed)]
        k = int(ref["k"])
        order = cf.removal(attributor, torch.as_tensor(image), seed, kernel, n)
        if not np.array_equal(order[:k], own["removed"]):
            raise SystemExit(f"seed {seed}: the kernel ranks differently from the run's removals.json; "
                             f"is {root} the model the run was prepared for?")
        same = int(np.sum(labels[np.asarray(ref["removed"])] == label))
        removed = matched_removal(order, labels, label, same, k)
        jobs.append({"id": f"pixel-rbf-matched-k{k}-seed{seed}", "target_seed": seed, "seed": seed,
                     "ranking": kernel, "k": k, "same_label": same, "removed": removed.tolist(),
                     "keep": cf.keep_indices(n, removed).tolist()})
    control = {"num_train": n, "note": "the class-matched control of the pixel kernel "
               "(experiments/class_matched_counterfactual.py): the kernel's top images with as many of the "
               "target's classifier label as D-TRAK's removals hold; trained and measured as the run's jobs",
               "jobs": jobs}
    path = os.path.join(out, "removals.json")
    if os.path.isfile(path):
        if read_json(path, "class-matched removals", f"delete {out} and rerun") != control:
            raise SystemExit(f"{path} holds other removals than this model's run gives; delete {out} to start again")
        return path
    os.makedirs(out, exist_ok=True)
    for name in ("targets.npz", "identity.json"):
        shutil.copyfile(os.path.join(run, name), os.path.join(out, name))
    atomic_write_json(path, control)
    return path


def run_folder(root: str, setting: str, shard) -> None:
    from dtrak_core import fashion
    from dtrak_core.evaluation import lds_own
    from dtrak_core.setting import load_setting

    torch.set_num_threads(fashion.BUILD_THREADS)  # the base model's thread count: bit-deterministic retrains
    path = prepare_folder(root)
    _, out, models = folder_paths(root)
    fashion.train_and_measure(load_setting(setting), os.path.join(root, "data"), path, models, shard,
                              lambda one: lds_own.counterfactual_measure(root, out, models, shard=one, show_bar=False))


def folder_table(root: str) -> str:
    from dtrak_core.attribution.attributor import Attributor

    run, out, _ = folder_paths(root)
    if not os.path.isfile(os.path.join(out, "removals.json")):
        return f"no control prepared in {out}; run with --root {root} --run"
    planned = read_json(os.path.join(out, "removals.json"), "class-matched removals", f"delete {out} and rerun")["jobs"]
    k = int(planned[0]["k"])
    rows = labelled(root, [r for r in load_results(os.path.join(run, "jobs")) if r.k == k])
    matched = labelled(root, load_results(os.path.join(out, "jobs"))) if os.path.isdir(os.path.join(out, "jobs")) else []
    cols = {MATCHED: {r.seed: r for r in matched}}
    for name, ranking in (("pixel-rbf", "pixel-rbf"), ("D-TRAK", "square"), ("Random", "random")):
        cols[name] = {r.seed: r for r in rows if r.ranking == ranking}
    return table(cols, Attributor.load(root).train.labels.numpy(), {r.seed: r.label_before for r in rows + matched},
                 k, len(planned))


# -- the table ---------------------------------------------------------------------------------------
def table(cols: dict, train_labels: np.ndarray, labels: dict, k: int, planned: int) -> str:
    """cols: {name: {seed: CounterfactualResult}}, the control first; the targets every column has."""
    seeds = sorted(set.intersection(*(set(c) for c in cols.values())))
    if not seeds:
        return "no finished targets yet; run with --run"
    lines = [f"{len(seeds)} of {planned} targets finished under every ranking (seeds {seeds[0]}..{seeds[-1]}), k = {k}; "
             "the class-matched kernel removes as many images of the target's label as D-TRAK does; paired tests "
             "from 6 targets", "",
             "| ranking | median L2 [p25, p75] | label changed | removed with the target's label |", "|---|---|---|---|"]
    for name, rows in cols.items():
        rs = [rows[s] for s in seeds]
        l2 = np.array([r.l2 for r in rs])
        share = np.mean([np.mean(train_labels[r.removed_indices] == labels[r.seed]) for r in rs])
        changed = np.mean([r.label_changed for r in rs])
        lines.append(f"| {name} | {np.median(l2):.2f} [{np.percentile(l2, 25):.2f}, {np.percentile(l2, 75):.2f}] | "
                     f"{changed:.0%} | {share:.0%} |")
    paired = []
    for a, b in (("D-TRAK", MATCHED), (MATCHED, "pixel-rbf"), (MATCHED, "Random")):
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
    p.add_argument("--root", default=None, help="a model folder with a counterfactual-own run (default: the digits)")
    p.add_argument("--setting", default="fashion-mnist", help="with --root: the setting that trains its models")
    p.add_argument("--run", action="store_true", help="run the retrains of the targets not finished yet")
    p.add_argument("--targets", type=int, default=60, help="the digits: how many targets")
    p.add_argument("--shard", default="0/1", help="with --root: only jobs i, i+n, ... (i/n)")
    args = p.parse_args()
    print(machine_line())
    if args.root is None:
        if args.run:
            run_digits(args.targets)
        print(digits_table(args.targets))
        return
    if args.run:
        i, n = (int(x) for x in args.shard.split("/"))
        run_folder(args.root, args.setting, (i, n))
    print(folder_table(args.root))


if __name__ == "__main__":
    main()
