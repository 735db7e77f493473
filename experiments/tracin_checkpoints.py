"""Does TracInCP's sum over training checkpoints add anything to one checkpoint's gradients?

On a model folder with TracInCP's checkpoints (`build-baselines`) and a finished LDS run, prints the
LDS x 100 of the loss-gradient dot product at each checkpoint alone, of the last two summed, and of
TracInCP and GAS (all summed), on each test set.

    python experiments/tracin_checkpoints.py --root assets/fashion --run assets/fashion/lds

The test-set features at each checkpoint are cached under the run (`<run>/tracin/`; computed here
when missing, about a minute per checkpoint for 200 queries).
"""
from __future__ import annotations

from common import ROOT, machine_line  # first: before torch

# isort: split
import argparse
import os

import numpy as np

from dtrak_core.attribution.similarity import similarity
from dtrak_core.attribution.tracin import load_tracin
from dtrak_core.evaluation import tables as bm
from dtrak_core.evaluation.lds import SubsetBootstrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="assets/fashion")
    ap.add_argument("--run", default="assets/fashion/lds")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments", "results", "tracin_checkpoints.txt"))
    args = ap.parse_args()
    lines = [machine_line()]
    bench = bm.Bench(args.run, args.root, ablation_fns=(), ablation_Ks=(), ensemble_sizes=())
    checkpoints = load_tracin(args.root, bench.attributor)
    queries = bm.tracin_queries(bench, checkpoints, compute=True)
    masks, F = bench.truth["masks"], bench.truth["F"]
    bootstrap = SubsetBootstrap(len(masks), 200)

    def lds(scores, test_set):
        cell = bm.fixed_cell(np.asarray(scores), masks, F[test_set], bootstrap)
        return f"{cell['lds']:5.1f} ± {cell['pm']:.1f}"

    def summed(test_set, pairs, kind="dot"):
        return sum(similarity(q[test_set], c.train_features, kind) for c, q in pairs)

    pairs = list(zip(checkpoints, queries))
    lines.append(f"{len(masks)} subsets; LDS x 100 ± bootstrap std over subsets; "
                 f"{bench.attributor.train.images.shape[0]} training images")
    for test_set in bench.test_sets:
        for c, q in pairs:
            lines.append(f"{test_set:10s} step {c.step:5d} alone (dot)   {lds(summed(test_set, [(c, q)]), test_set)}")
        lines.append(f"{test_set:10s} last two summed (dot) {lds(summed(test_set, pairs[-2:]), test_set)}")
        for name, kind in (("TracInCP", "dot"), ("GAS", "cosine")):
            lines.append(f"{test_set:10s} {name:8s} all summed   {lds(summed(test_set, pairs, kind), test_set)}")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
