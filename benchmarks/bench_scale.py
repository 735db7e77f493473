"""Out-of-core scoring at scale: a synthetic store of N training images (k=2048, float16) built
through `FeatureStore` and scored by `ChunkedTRAKScorer`, for N = 10^4 ... 10^6.

Each N runs in three fresh processes, so that each one's peak RSS is its own: `build` fills the
store slice by slice (random Gaussian rows, seeded per slice); `query` opens it (sha256 verified),
fits the scorer (one pass for the k x k Gram matrix and its Cholesky factor, saved with the store),
fits again (the saved kernel is read back), then times one query's top-10 (best of --repeats, wall
clock and CPU seconds), one query's full (N,) scores, and a batch of 16 queries' top-10 in one pass
(per-query share); `floor` times plain passes over the same features.npy with nothing computed: reads
into a reused 1 MiB buffer (--threads readers, each its own part of the file) and a numpy memmap
summed as uint64 in 64 MiB slices (best of --repeats each): the memory-bandwidth floor of a query,
which must bring every byte of the store to the CPU. The stores live under runs/ (git ignored) and
are deleted afterwards (--keep keeps them). The last lines are

    floor: N=1000000 read <seconds> s memmap <seconds> s; query / floor <ratio>
    scale: N=1000000 k=2048 query <seconds> s peak RSS <GiB> GiB

with the single-query top-10 latency and the query process's peak RSS (fit and queries included).

    python benchmarks/bench_scale.py --threads 1
"""
from __future__ import annotations

from common import ROOT, Timer, machine_line, set_threads  # first: before torch

# isort: split
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dtrak_core.attribution.chunked import ChunkedTRAKScorer
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.scoring import top_k
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.devices import describe

IDENTITY = FeatureStore.identity(FeatureSetting("square", K=10, k=2048), checkpoint="synthetic", dataset="synthetic")
SLICE = 1 << 16


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def build(path: str, n: int, k: int) -> dict:
    def rows(idx):  # deterministic per slice, cheap to generate
        rng = np.random.default_rng(int(idx[0]))
        return rng.standard_normal((len(idx), k), dtype=np.float32).astype(np.float16)

    with Timer() as t:
        store = FeatureStore.create(path, IDENTITY, n=n, k=k, slice_size=SLICE, dtype="float16")
        store.fill(rows, np.arange(n), show_bar=False)
    size = os.path.getsize(os.path.join(path, "features.npy"))
    return {"build_s": t.seconds, "store_gib": size / 2 ** 30, "build_rss_gib": peak_rss_gib()}


def query(path: str, k: int, repeats: int, device: str) -> dict:
    with Timer() as t_open:
        store = FeatureStore.open(path, IDENTITY)
    with Timer() as t_fit:
        ChunkedTRAKScorer(device=device).fit(store)
    with Timer() as t_refit:
        scorer = ChunkedTRAKScorer(device=device).fit(store)
    assert scorer.kernel_source_ == "loaded"
    rng = np.random.default_rng(123)
    q1, q16 = rng.standard_normal((1, k)), rng.standard_normal((16, k))
    times = []
    for _ in range(repeats):
        cpu = time.process_time()
        with Timer() as t:
            pro, opp = scorer.top_k(q1, 10)
        times.append((t.seconds, time.process_time() - cpu))
    with Timer() as t_scores:
        full = scorer.scores(q1)[0]
    assert np.array_equal(pro[0], top_k(full, 10)[0]) and np.array_equal(opp[0], top_k(full, 10)[1])
    with Timer() as t_batch:
        scorer.top_k(q16, 10)
    wall, cpu = min(times)
    return {"open_s": t_open.seconds, "fit_s": t_fit.seconds, "refit_s": t_refit.seconds, "query_s": wall,
            "query_cpu_s": cpu, "scores_s": t_scores.seconds, "batch16_per_query_s": t_batch.seconds / 16,
            "rss_gib": peak_rss_gib()}


def floor(path: str, repeats: int, threads: int) -> dict:
    """Plain passes over features.npy that compute nothing: the least time a query's pass can take."""
    file = os.path.join(path, "features.npy")
    feats = np.load(file, mmap_mode="r")
    start, size = feats.offset, feats.nbytes  # a whole number of uint64: k = 2048 float16 a row
    del feats

    def read_part(lo, hi):  # plain reads into one reused 1 MiB buffer
        buf = memoryview(bytearray(1 << 20))
        with open(file, "rb", buffering=0) as f:
            for pos in range(lo, hi, len(buf)):
                f.seek(start + pos)
                f.readinto(buf[:min(len(buf), hi - pos)])

    def read_pass():
        cuts = [size * i // threads // 4096 * 4096 for i in range(threads)] + [size]
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(read_part, cuts, cuts[1:]))

    def memmap_pass():  # mapped one 64 MiB slice at a time, every byte touched by a numpy reduction
        step = 64 << 20
        for pos in range(0, size, step):
            part = np.memmap(file, np.uint64, "r", offset=start + pos, shape=(min(step, size - pos) // 8,))
            part.sum()
            del part

    def best(fn):
        out = []
        for _ in range(repeats):
            with Timer() as t:
                fn()
            out.append(t.seconds)
        return min(out)

    return {"read_s": best(read_pass), "memmap_s": best(memmap_pass), "rss_gib": peak_rss_gib()}


def child(args) -> None:
    set_threads(args.threads)
    if args.child == "build":
        out = build(args.path, args.n, args.k)
    elif args.child == "query":
        out = query(args.path, args.k, args.repeats, args.device)
    else:
        out = floor(args.path, args.repeats, args.threads)
    print("RESULT " + json.dumps(out))


def run_child(kind: str, path: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--path", path, "--n", str(n), "--k", str(args.k),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--device", args.device]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{kind} N={n} failed:\n{res.stderr[-3000:]}")
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated N (the last is the headline)")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where the scorer multiplies: cpu (default), cuda, mps")
    ap.add_argument("--dir", default=os.path.join(ROOT, "runs", "bench_scale"))
    ap.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    ap.add_argument("--child", choices=["build", "query", "floor"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    set_threads(args.threads)
    print(machine_line())
    print(f"device: {describe(args.device)}")
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'N':>9} {'store GiB':>9} {'build s':>8} {'build RSS':>9} {'open s':>7} {'fit s':>7} {'refit s':>7} "
          f"{'top-10 s':>8} {'top-10 CPU s':>12} {'scores s':>8} {'16q s/q':>8} {'query RSS GiB':>13} {'read floor s':>12} "
          f"{'memmap floor s':>14}")
    last = None
    for n in sizes:
        path = os.path.join(args.dir, f"n{n}_k{args.k}")
        shutil.rmtree(path, ignore_errors=True)
        try:
            b = run_child("build", path, n, args)
            q = run_child("query", path, n, args)
            f = run_child("floor", path, n, args)
        finally:
            if not args.keep:
                shutil.rmtree(path, ignore_errors=True)
        print(f"{n:>9} {b['store_gib']:>9.2f} {b['build_s']:>8.1f} {b['build_rss_gib']:>9.2f} {q['open_s']:>7.1f} "
              f"{q['fit_s']:>7.1f} {q['refit_s']:>7.2f} {q['query_s']:>8.3f} {q['query_cpu_s']:>12.3f} "
              f"{q['scores_s']:>8.3f} {q['batch16_per_query_s']:>8.3f} {q['rss_gib']:>13.2f} {f['read_s']:>12.3f} "
              f"{f['memmap_s']:>14.3f}", flush=True)
        last = (n, q, f)
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)
    print(machine_line())
    n, q, f = last
    print(f"floor: N={n} read {f['read_s']:.2f} s memmap {f['memmap_s']:.2f} s; query / floor "
          f"{q['query_s'] / min(f['read_s'], f['memmap_s']):.2f}")
    print(f"scale: N={n} k={args.k} query {q['query_s']:.2f} s peak RSS {q['rss_gib']:.2f} GiB")


if __name__ == "__main__":
    main()
