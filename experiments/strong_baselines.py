"""Attribution or look-alikes? Every method of a model folder beside the strong model-free baselines
(pixel kernels, nearest neighbours, the empirical optimal denoiser) on one LDS ground truth,
signed, sharpened (s|s|) and rank-normalised (invariant to any monotone transform), every
hyperparameter cross-fitted by the same rule (`dtrak_core.evaluation.evidence`).

    python experiments/strong_baselines.py                 # the digits (assets/, its committed LDS run)
    python experiments/strong_baselines.py --write         # also assets/benchmarks/evidence.json / evidence.md
    python experiments/strong_baselines.py --root assets/fashion --run assets/fashion/lds --write
    python experiments/strong_baselines.py --text2image --write    # the text-to-image miniature: pixels and VAE latents

The gradient methods' test-set features are computed on first use and cached in the run folder
(minutes per store); the model-free rows take seconds.
"""
from __future__ import annotations

from common import ROOT, machine_line  # first: before torch

# isort: split
import argparse
import os

import numpy as np

from dtrak_core import checksums
from dtrak_core.attribution import methods
from dtrak_core.evaluation import evidence, tables_report, tuning
from dtrak_core.evaluation.tables import LAMBDA_GRID, Bench
from dtrak_core.files import atomic_write_bytes

GRADIENT_STORES = ("square", "loss", "avg")  # D-TRAK, TRAK, and the best signed output function here


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.path.join(ROOT, "assets"))
    p.add_argument("--run", default=None, help="the LDS run (default: <root>/benchmarks/lds_run)")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--write", action="store_true", help="write <run's benchmarks folder>/evidence.json and .md")
    p.add_argument("--dest", default=None, help="where --write writes (default: <root>/benchmarks)")
    p.add_argument("--text2image", action="store_true", help="the text-to-image miniature (assets/text2image, its "
                                                              "lds/ run): model-free baselines on pixels and on VAE latents")
    args = p.parse_args()
    print(machine_line())
    if args.text2image:
        root = os.path.join(ROOT, "assets", "text2image") if args.root == p.get_default("root") else args.root
        candidates, masks, F, tests, train_by_space = text2image_candidates(root, args.run or os.path.join(root, "lds"))
        return report(candidates, masks, F, tests, args, root, train_by_space)
    run = args.run or os.path.join(args.root, "benchmarks", "lds_run")
    bench = Bench(run, args.root)
    masks, F = bench.truth["masks"], bench.truth["F"]
    tests = {n: bench.test_sets[n] for n in F}
    print(f"LDS run {os.path.relpath(run, ROOT)}: {len(masks)} subsets, test sets " +
          ", ".join(f"{n} ({len(x)})" for n, x in tests.items()))
    candidates = []
    K = max(s.K for per in bench.attributor.stores.values() for s, _ in per)
    for fn in GRADIENT_STORES:
        if fn not in bench.attributor.stores:
            continue
        setting = bench.setting(fn, K)
        train = bench.features.train(setting, compute=True, show_bar=False)
        queries = {n: bench.features.query(n, setting, compute=True, show_bar=False) for n in tests}
        candidates.append(evidence.trak_candidate(fn, train, queries, LAMBDA_GRID,
                                                  f"{setting.K} timesteps of per-sample gradients, k = {setting.k}"))
    if "avg" in bench.attributor.stores and "generated" in tests:  # DAS as the registry scores it
        try:
            das = {n: methods.scores(bench.attributor, "das", x) for n, x in tests.items()}
            candidates.append(evidence.fixed_candidate("das", "model", das, "avg store + residuals (registry lambda)"))
        except ValueError as e:
            print(f"DAS skipped: {e}")
    candidates += checkpoint_candidates(bench, tests)
    train_images = bench.attributor.train.images
    candidates += evidence.pixel_candidates(train_images, tests, bench.attributor.scheduler.alphas_cumprod)
    report(candidates, masks, F, tests, args, args.root, {"pixel": train_images})


def checkpoint_candidates(bench: Bench, tests: dict) -> list:
    """TracInCP and GAS (loss-gradient dot products / cosines summed over the folder's training
    checkpoints) from the run's cached checkpoint query features; none where the folder has no
    checkpoints or the run has not computed their features (`lds-own evaluate` does)."""
    from dtrak_core.attribution.tracin import load_tracin
    from dtrak_core.errors import MethodUnavailable
    from dtrak_core.evaluation.tables import summed_over_checkpoints, tracin_queries

    try:
        checkpoints = load_tracin(bench.root, bench.attributor)
    except MethodUnavailable as e:
        print(f"TracInCP and GAS skipped: {e}")
        return []
    per_ckpt = tracin_queries(bench, checkpoints, compute=False)
    if per_ckpt is None:
        print("TracInCP and GAS skipped: the run has no checkpoint query features (" + bench.command("features --tracin") + ")")
        return []
    note = f"{len(checkpoints)} checkpoints x K = {checkpoints[0].featurizer.setting.K}, k = {checkpoints[0].featurizer.setting.k}"
    return [evidence.fixed_candidate(name, "model", summed_over_checkpoints(checkpoints, per_ckpt, kind), note)
            for name, kind in (("tracin", "dot"), ("gas", "cosine"))]


def text2image_candidates(root: str, run: str):
    """D-TRAK and TRAK on the LoRA features, and every model-free baseline twice: on the pixels and
    on the VAE latents the LoRA is trained on (`latent-*`; the optimal denoiser of the latents is the
    miniature's memorising model)."""
    import torch

    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.scoring import default_lambda
    from dtrak_core.evaluation.lds_run import collect
    from dtrak_core.files import load_result
    from dtrak_core.text2image import lds as t2l
    from dtrak_core.text2image.features import CaptionedInputs

    col = collect(run)
    prompts = col["setup"]["test_prompts"]
    tests = {k: torch.from_numpy(v) for k, v in load_result(os.path.join(run, t2l.TEST_SETS)).items()}
    attributor = Attributor.load(root)
    print(f"LDS run {os.path.relpath(run, ROOT)}: {len(col['subsets'])} subsets, test sets " +
          ", ".join(f"{n} ({len(x)})" for n, x in tests.items()))
    candidates = []
    for fn in ("square", "loss"):
        setting = attributor.setting(fn)[0]
        train = t2l.training_features(attributor, setting, run)
        queries = {n: t2l.query_features(attributor, setting, x, prompts[n], os.path.join(run, "queries", n, setting.slug))
                   for n, x in tests.items()}
        scale = default_lambda(train, 1.0)
        candidates.append(evidence.trak_candidate(fn, train, queries, [c * scale for c in t2l.RELATIVE_GRID],
                                                  f"{setting.K} timesteps of LoRA gradients, k = {setting.k}"))
    train_images = attributor.train.images
    candidates += evidence.pixel_candidates(train_images, tests, attributor.scheduler.alphas_cumprod)
    with torch.no_grad():
        train_latents = CaptionedInputs.of(attributor.pipeline, train_images, attributor.train.captions).latents
        latents = {n: attributor.pipeline.encode_images(x) for n, x in tests.items()}
    for c in evidence.pixel_candidates(train_latents, latents, attributor.scheduler.alphas_cumprod):
        c.name = "latent-" + c.name.removeprefix("pixel-")
        candidates.append(c)
    return candidates, col["masks"], col["F"], tests, {"pixel": train_images, "latent": train_latents}


def report(candidates, masks, F, tests, args, root, train_by_space):
    rows = evidence.evaluate(candidates, masks, F, args.bootstrap)
    table = evidence.format_table(rows, list(tests))
    print()
    print(table)
    if args.write:
        dest = args.dest or os.path.join(root, "benchmarks")
        os.makedirs(dest, exist_ok=True)
        checksums.write_sealed_json(os.path.join(dest, "evidence.json"), {  # sealed: the app verifies it
            "subsets": int(len(masks)), "test_sets": {n: int(len(x)) for n, x in tests.items()},
            "sets": list(tests),  # the table's column order (the keys of test_sets are stored sorted)
            "rule": "every hyperparameter by 2-fold cross-fitting over test samples", "rows": rows})
        atomic_write_bytes(os.path.join(dest, "evidence.md"), (table + "\n").encode())
        print(f"wrote {os.path.relpath(os.path.join(dest, 'evidence.json'), ROOT)}")
        if tables_report.publish_evidence(dest, rows, list(tests), "python experiments/strong_baselines.py --write"):
            print(f"and its rows into {os.path.relpath(os.path.join(dest, tables_report.REPORT), ROOT)}")
        entries = tuning.kernel_entries(rows, train_by_space, len(masks))
        tuning.record_kernel_params(root, entries)
        print(f"recorded in {os.path.relpath(os.path.join(root, 'manifest.json'), ROOT)} (used by attribute and the "
              "app): " + ", ".join(f"{n} gamma {e['gamma']:g} lambda {e['lambda']:.4g}" for n, e in entries.items()))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
