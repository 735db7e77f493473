"""Why the noise-level view's high-noise column was the same for every query, and what centring leaves.

The Attribute tab splits a TRAK-family score into timestep buckets (`app_support.noise_levels`).
Uncentred, one training image led the highest-noise buckets for every query. This measures, on the
committed digits folder, over queries of every class that are not among the reference queries
(generated samples of seeds 1000.., and held-out real digits):

- how much of the noisy input x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps_t is the image at each
  bucket (eps_t is the same for every query: `gradients.timestep_noise`);
- per bucket: the mean cosine between queries' bucket features, the share of their squared norm
  along the reference mean (`app_support.reference_features`: seeds 0..31), the share of the
  bucket's score (sum of squares over queries and training images) that the reference mean's
  score explains, and the cosine of the mean with the training features' top singular vector;
- per bucket, uncentred, centred on the reference mean (the view's fix), and with the mean's
  direction projected out: how often the most common top proponent leads, how many distinct
  images lead, and how often the leader has the query's class (chance: about 0.1);
- the candidates for the shared image: its rank under the reference mean alone, by training
  feature norm, and along the top singular vector, and where its lead comes from.

    python experiments/noise_levels.py | tee experiments/results/noise_levels.txt   # ~1 min on one core
"""
from __future__ import annotations

from common import ROOT, machine_line  # first: before torch

# isort: split
import argparse
import os

import numpy as np
import torch

from dtrak_core import app_support as sup
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.evaluation.quality import classify
from dtrak_core.model.data import load_digits
from dtrak_core.model.sampling import generate

BUCKETS = 10


def leaders(C: np.ndarray, labels: np.ndarray, train_labels: np.ndarray) -> list[str]:
    """Per bucket of C (Q, B, N): 'image:count/distinct/class agreement' of the top proponents."""
    out = []
    for b in range(C.shape[1]):
        top = C[:, b].argmax(1)
        vals, cnt = np.unique(top, return_counts=True)
        j = int(cnt.argmax())
        out.append(f"#{vals[j]}:{cnt[j]}/{len(vals)}/{(train_labels[top] == labels).mean():.2f}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.path.join(ROOT, "assets"))
    p.add_argument("--generated", type=int, default=60, help="generated queries (seeds 1000..)")
    p.add_argument("--real", type=int, default=40, help="held-out real digits")
    p.add_argument("--methods", nargs="+", default=["avg", "square", "loss"])
    args = p.parse_args()
    torch.set_num_threads(1)
    print(machine_line())
    a = Attributor.load(args.root)
    train_labels = a.train.labels.numpy()
    gen = generate(a.unet, a.scheduler, range(1000, 1000 + args.generated), steps=sup.REFERENCE_STEPS)
    real = load_digits("validation")
    queries = torch.cat([gen, real.images[:args.real]])
    labels = np.concatenate([classify(gen.numpy())[0], real.labels[:args.real].numpy()])
    print(f"queries: {args.generated} generated (seeds 1000..) + {args.real} held-out digits; classes "
          f"{np.bincount(labels, minlength=10).tolist()}; reference: {sup.REFERENCE_QUERIES} generated samples "
          f"(seeds 0..{sup.REFERENCE_QUERIES - 1}), disjoint from the queries")

    setting, _ = a.setting(args.methods[0])
    ts = a.featurizer(setting).gradients.timesteps
    edges = sup.bucket_edges(len(ts), BUCKETS)
    abar = a.scheduler.alphas_cumprod[ts].double()
    image = [float(abar[lo:hi].sqrt().mean()) for lo, hi in zip(edges, edges[1:])]
    noise = [float((1 - abar[lo:hi]).sqrt().mean()) for lo, hi in zip(edges, edges[1:])]
    print("\nx_t = sqrt(abar) x + sqrt(1 - abar) eps_t, eps_t the same for every query; bucket means:")
    print("  bucket       " + " ".join(f"{f't{int(ts[lo])}-{int(ts[hi - 1])}':>9}" for lo, hi in zip(edges, edges[1:])))
    print("  sqrt(abar)   " + " ".join(f"{v:9.3f}" for v in image))
    print("  sqrt(1-abar) " + " ".join(f"{v:9.3f}" for v in noise))

    for method in args.methods:
        lam = a.lambda_for(a.setting(method)[0])
        scorer = a.scorer(method)
        W = scorer.weights_.numpy()  # (k, N)
        weights = np.diff(edges) / len(ts)
        F = sup.bucket_features(a, queries, method, BUCKETS).double().numpy()  # (Q, B, k)
        ref = sup.reference_features(a, method, BUCKETS)
        m = ref.features  # (B, k)
        C = np.einsum("qbk,kn->qbn", F, W) * weights[None, :, None]
        R = (m @ W) * weights[:, None]  # (B, N) the reference mean's part
        U = m / np.linalg.norm(m, axis=1, keepdims=True)
        P = F - np.einsum("qbk,bk->qb", F, U)[..., None] * U[None]  # the mean's direction projected out
        Cp = np.einsum("qbk,kn->qbn", P, W) * weights[None, :, None]
        phi = scorer.train_features_.numpy()
        _, s, vt = np.linalg.svd(phi, full_matrices=False)
        print(f"\n== {sup.method_label(method)}, lambda {scorer.lam_:g} ({'tuned' if lam is not None else 'rule'}); "
              f"training features: top singular value's share of the squared norm {s[0] ** 2 / (s ** 2).sum():.3f}")
        print("  bucket  cos(queries)  |f|^2 along mean  score explained by mean  cos(mean, top sing. vec.)")
        for b in range(len(edges) - 1):
            f = F[:, b]
            norms = np.linalg.norm(f, axis=1)
            G = (f / norms[:, None]) @ (f / norms[:, None]).T
            cos = G[~np.eye(len(f), dtype=bool)].mean()
            along = ((f @ U[b]) ** 2 / norms ** 2).mean()
            explained = 1 - ((C[:, b] - R[b]) ** 2).sum() / (C[:, b] ** 2).sum()
            print(f"  {b:6d}  {cos:12.4f}  {along:16.4f}  {explained:23.4f}  {abs(m[b] @ vt[0]) / np.linalg.norm(m[b]):25.3f}")
        print("  top proponent per bucket, low noise first: #most common:its count/distinct leaders/share of the query's class")
        for name, CC in (("uncentred (the old view)", C), ("centred on the reference mean (the view now)", C - R[None]),
                         ("mean direction projected out", Cp)):
            print(f"  {name}:\n    " + " ".join(leaders(CC, labels, train_labels)))
        shared = int(R[-1].argmax())
        norm_rank = int((np.linalg.norm(phi, axis=1) > np.linalg.norm(phi[shared])).sum()) + 1
        v1_rank = int((np.abs(phi @ vt[0]) > abs(phi[shared] @ vt[0])).sum()) + 1
        print(f"  the reference mean's top image in the highest bucket: #{shared} (class {train_labels[shared]}); "
              f"its training feature norm ranks {norm_rank} of {len(phi)}, its projection on the top singular "
              f"vector {v1_rank}")
        along_v1 = ((m[-1] @ vt[0]) * vt[0] @ W) * weights[-1]  # the mean's part along the top singular vector
        print(f"  the highest bucket's reference part: along the top singular vector its spread over training images "
              f"(std) is {along_v1.std() / R[-1].std():.3f} of the whole; the leader #{shared} comes from the rest "
              f"(the ridge inverse amplifies the mean's small part off that vector), ranking "
              f"{int((R[-1] - along_v1 > R[-1][shared] - along_v1[shared]).sum()) + 1} there")
        centred = C - R[None]
        print("  out of sample: the test queries' mean centred part over their mean raw part (mean |.| over "
              "training images), per bucket: " + " ".join(f"{np.abs(centred[:, b].mean(0)).mean() / np.abs(C[:, b]).mean():.3f}" for b in range(C.shape[1])))


if __name__ == "__main__":
    main()
