"""Benchmark 1: featurization throughput and score agreement, ours vs MadryLab's trak (traker 0.3.2).

Same model, same training subset, output function 'loss' (TRAK's), same K and k, same batch size.

- ours:   `Featurizer` with the default projector (sparse JL) and the default gradient engine,
          timed end to end (per-sample gradients + projection).
Both are timed batch by batch, alternating, so that a shared machine's changing load hits both alike.

- trak:   `TRAKer(device='cpu')` with its CPU projector (BasicProjector, dense Gaussian, float32)
          and `trak_adapter.DiffusionLossOutput` (K timesteps batched inside its vmap), timed over
          `TRAKer.featurize` (gradients + projection + writing its memmap store).
- trak-loop (optional, --loop-samples): the same with the K timesteps looped inside get_output,
          the structure of the published D-TRAK code; timed on a few samples only.

Agreement: Spearman correlation over the N training samples of the attribution scores of each
query, between ours (sparse JL), ours with a dense Gaussian projector at the same k (the reference
at this k), trak, and the exact unprojected gradients (k = d, same ridge scorer). 'dense43' is the
dense reference with another seed: its agreement with 'dense' is the floor set by projection noise
at this k, which no projector can beat.

    python benchmarks/bench_featurize.py --n-train 256 --queries 4 --K 100 --k 2048
"""
from __future__ import annotations

from common import Timer, load_model, machine_line, set_threads, spearman_rows  # first: before torch

# isort: split
import argparse
import tempfile

import numpy as np
import torch
from trak_adapter import make_traker, trak_featurize_batch, trak_finish_scores

from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.attribution.projectors import DenseGaussianProjector
from dtrak_core.attribution.scoring import TRAKScorer
from dtrak_core.model.data import load_digits


def exact_scores(train_grads: torch.Tensor, query_grads: torch.Tensor, relative_lambda: float = 0.1) -> np.ndarray:
    """The same ridge score with unprojected gradients (k = d), in the dual form (N x N)."""
    g = train_grads.double()
    lam = relative_lambda * g.pow(2).sum(1).mean()
    gram = g @ g.T
    gram.diagonal().add_(lam)
    return (query_grads.double() @ torch.linalg.solve(gram, g).T).numpy()


def main(args):
    set_threads(args.threads)
    print(machine_line())
    unet, scheduler, what = load_model(args.fresh_model)
    train = load_digits("train").images[:args.n_train]
    queries = load_digits("validation").images[:args.queries]
    print(f"model: {what}; output function 'loss', K={args.K}, k={args.k}, N={len(train)} training samples, "
          f"{len(queries)} validation queries, batch {args.batch}")

    # -- throughput, interleaved batch by batch so that both tools see the same machine load -----
    setting = FeatureSetting("loss", K=args.K, k=args.k)
    ours = Featurizer(unet, scheduler, setting, batch_size=args.batch)
    ours(train[:2])  # warm-up
    tmp = tempfile.TemporaryDirectory()
    traker = make_traker(unet, scheduler, len(train), args.k, args.K, tmp.name)
    traker.load_checkpoint(unet.state_dict(), model_id=0)
    ours_g = ours_p = trak_s = 0.0
    grads, feats = [], []
    for i in range(0, len(train), args.batch):
        batch = train[i:i + args.batch]
        with Timer() as tg:
            grads.append(ours.gradients(batch))
        with Timer() as tp:
            feats.append(ours.projector.project(grads[-1]))
        with Timer() as tt:
            trak_featurize_batch(traker, batch)
        ours_g, ours_p, trak_s = ours_g + tg.seconds, ours_p + tp.seconds, trak_s + tt.seconds
        print(f"  batch {i // args.batch}: ours {tg.seconds + tp.seconds:.2f} s, trak {tt.seconds:.2f} s", flush=True)
    grads, feats = torch.cat(grads), torch.cat(feats)
    ours_s = ours_g + ours_p
    qgrads = ours.gradients(queries)
    qfeats = ours.projector.project(qgrads)
    trak_s_scores = trak_finish_scores(traker, unet, queries, args.batch)
    tmp.cleanup()
    print(f"ours ({setting.projector}, engine={ours.gradients.engine}): {len(train) / ours_s:8.2f} samples/s "
          f"({ours_g:.1f} s gradients + {ours_p:.2f} s projection)")
    print(f"trak (BasicProjector fp32, K in batch): {len(train) / trak_s:8.2f} samples/s ({trak_s:.1f} s)")
    print(f"RATIO featurization throughput ours / trak: {trak_s / ours_s:.1f}x  (goal >= 20x)")
    if args.loop_samples:
        n = args.loop_samples
        with tempfile.TemporaryDirectory() as tmp:
            loop = make_traker(unet, scheduler, n, args.k, args.K, tmp, timesteps_in_batch=False)
            loop.load_checkpoint(unet.state_dict(), model_id=0)
            with Timer() as tl:
                loop.featurize(batch=(train[:n],), num_samples=n)
        print(f"trak-loop (K looped in get_output, {n} samples): {n / tl.seconds:8.2f} samples/s; "
              f"RATIO ours / trak-loop: {tl.seconds / n * len(train) / ours_s:.1f}x")

    # -- agreement -------------------------------------------------------------------------------
    dense = DenseGaussianProjector(grads.shape[1], args.k, seed=setting.seed)
    with Timer() as td:
        dense_feats = dense.project(grads)
    dense_q = dense.project(qgrads)
    dense43 = DenseGaussianProjector(grads.shape[1], args.k, seed=setting.seed + 1)  # the same reference, another seed
    print(f"(dense Gaussian reference projection of {len(train)} vectors: {td.seconds:.1f} s)")
    scores = {
        "ours": TRAKScorer().fit(feats).scores(qfeats),
        "dense": TRAKScorer().fit(dense_feats).scores(dense_q),
        "dense43": TRAKScorer().fit(dense43.project(grads)).scores(dense43.project(qgrads)),
        "trak": trak_s_scores,
        "exact": exact_scores(grads, qgrads),
    }
    print("Spearman over training samples, per query (mean [min]):")
    pairs = [("ours", "dense"), ("dense43", "dense"), ("trak", "dense"), ("ours", "trak"), ("ours", "exact"),
             ("dense", "exact"), ("trak", "exact")]
    for a, b in pairs:
        rho = spearman_rows(scores[a], scores[b])
        goal = "  (goal >= 0.99)" if (a, b) == ("ours", "dense") else ""
        print(f"  {a:>7} vs {b:<5}: {rho.mean():.4f} [{rho.min():.4f}]{goal}")
    if args.k_sweep:
        # Projection noise shrinks with k: the same gradients, several k, against the exact scores.
        from dtrak_core.attribution.projectors import SparseJLProjector

        print("k sweep (same gradients), Spearman mean [min] over queries:")
        for k in args.k_sweep:
            sp = SparseJLProjector(grads.shape[1], k, seed=setting.seed)
            s_sparse = TRAKScorer().fit(sp.project(grads)).scores(sp.project(qgrads))
            line = f"  k={k:>6}: sparse vs exact {spearman_rows(s_sparse, scores['exact']).mean():.4f}"
            if k <= args.dense_max_k:
                dp = DenseGaussianProjector(grads.shape[1], k, seed=setting.seed)
                s_dense = TRAKScorer().fit(dp.project(grads)).scores(dp.project(qgrads))
                d43 = DenseGaussianProjector(grads.shape[1], k, seed=setting.seed + 1)
                s_d43 = TRAKScorer().fit(d43.project(grads)).scores(d43.project(qgrads))
                rho = spearman_rows(s_sparse, s_dense)
                line += (f", dense vs exact {spearman_rows(s_dense, scores['exact']).mean():.4f}"
                         f", sparse vs dense {rho.mean():.4f} [{rho.min():.4f}]"
                         f", dense43 vs dense {spearman_rows(s_d43, s_dense).mean():.4f}")
            print(line)
    print(machine_line().replace("machine:", "machine at end:"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--K", type=int, default=100)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32, help="samples per featurize call, both tools")
    parser.add_argument("--loop-samples", type=int, default=0, help="also time trak with the K timesteps looped")
    parser.add_argument("--k-sweep", type=int, nargs="*", default=[], help="extra k values for the agreement sweep")
    parser.add_argument("--dense-max-k", type=int, default=8192, help="largest k of the sweep that also runs dense")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--fresh-model", action="store_true", help="a freshly initialised UNet instead of assets/model")
    main(parser.parse_args())
