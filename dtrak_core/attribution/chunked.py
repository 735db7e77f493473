"""TRAK scores out of core: the training features stay on disk and are read one chunk at a time.

The same scores as `TRAKScorer` (primal form),

    scores = Phi_q (Phi^T Phi + lambda I)^-1 Phi^T          (Q, N)

computed as Phi @ w with w = (Phi^T Phi + lambda I)^-1 Phi_q^T (k, Q) (the solve folded into the
query once), so a query is one pass of one matrix product over the store, linear in N: blocks of
rows are read with plain reads into reused, cache-sized buffers, converted to the compute dtype
there and multiplied by w, by `threads` workers each scoring its own part of a chunk of rows. Memory
is one chunk's scores and each worker's two blocks, whatever N; `top_k` merges each chunk's best
(found in linear time) into the running best rows, never holding all N scores. `fit` accumulates
the k x k Gram matrix Phi^T Phi block by block (one pass) and factorises Phi^T Phi + lambda I once
(Cholesky); both are saved with the store in `kernel.npz`, so later fits on the same store only
read that file.

    <store>/kernel.npz    gram (k, k) and cholesky (k, k) float64, plus a sealed JSON record: the
                          store's features_sha256, n, k, lambda, the compute dtype, and the arrays'
                          sha256 (one file written atomically, so it is never half-updated)

A kernel for other features (the store was rebuilt) or another compute dtype is recomputed; one for
another lambda is refactorised from the saved Gram matrix; a damaged one is an `IntegrityError`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dtrak_core.attribution.scoring import DEFAULT_RELATIVE_LAMBDA
from dtrak_core.attribution.store import FEATURES, FeatureStore, metadata_sha256
from dtrak_core.devices import resolve_device
from dtrak_core.errors import IntegrityError
from dtrak_core.files import atomic_write_bytes

KERNEL = "kernel.npz"
KERNEL_FORMAT = 1
CHUNK_ROWS = 1 << 16  # rows whose scores are held at once for the top-k merge (256 KiB a query in float32)
BLOCK_BYTES = 1 << 20  # rows are read, as stored, in blocks about this size into reused buffers that stay in cache
DEVICE_BLOCK_BYTES = 64 << 20  # blocks bound for a GPU are larger: fewer, bigger host-to-device copies
GRAM_BLOCK_BYTES = 4 << 20  # the Gram pass reads larger blocks: a product per block is k x k x rows flops
GRAM_FLUSH_ROWS = 1 << 14  # float32 partial Gram sums are added into the float64 total every this many rows
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).data).hexdigest()  # the array's bytes, hashed without a copy


class _Rows:
    """An (N, k) feature matrix read a block of rows at a time: a complete store's features.npy
    (plain reads into the caller's buffer: cheaper than mapping a large file's pages, and resident
    memory stays the buffers) or an in-memory array."""

    def __init__(self, source):
        if isinstance(source, (str, os.PathLike)):
            source = FeatureStore.open(str(source))
        if isinstance(source, FeatureStore):
            feats = source.features()  # refuses an incomplete store
            self.n, self.k = feats.shape
            self.dtype, self.offset = feats.dtype, feats.offset
            self.path, self.array = os.path.join(source.path, FEATURES), None
            self.features_sha256 = source.metadata["features_sha256"]
            self.store_path = source.path
            del feats
        else:
            array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
            if array.ndim != 2:
                raise ValueError(f"train features must be (N, k), got {tuple(array.shape)}")
            if array.dtype not in (np.float16, np.float32, np.float64):
                array = array.astype(np.float32)
            self.n, self.k = array.shape
            self.dtype, self.array, self.path = array.dtype, array, None
            self.features_sha256 = self.store_path = None
        self.torch_dtype = _TORCH[np.dtype(self.dtype)]
        self.row_bytes = self.k * np.dtype(self.dtype).itemsize


class _Worker:
    """Turns rows a..b of the features into a (b - a, k) tensor in the compute dtype on the device,
    through buffers allocated once: rows are read as stored, then converted (on the CPU into a
    second, cache-sized buffer; on a GPU after the copy, so fewer bytes cross). Each worker has its
    own file handle and buffers, so workers on several threads share nothing."""

    def __init__(self, rows: _Rows, block: int, cdtype: torch.dtype, device: torch.device):
        self.rows, self.cdtype, self.device = rows, cdtype, device
        self.file = open(rows.path, "rb", buffering=0) if rows.path is not None else None
        pin = device.type == "cuda"  # page-locked: the copy to the GPU needs no staging
        self.raw = torch.empty(block, rows.k, dtype=rows.torch_dtype, pin_memory=pin)
        self.raw_np = self.raw.numpy()
        self.conv = None
        if device.type == "cpu" and rows.torch_dtype != cdtype:
            self.conv = torch.empty(block, rows.k, dtype=cdtype)

    def _read(self, a: int, b: int) -> None:
        if self.file is None:
            np.copyto(self.raw_np[:b - a], self.rows.array[a:b])
            return
        view = memoryview(self.raw_np[:b - a]).cast("B")
        pos, done = self.rows.offset + a * self.rows.row_bytes, 0
        while done < len(view):
            if hasattr(os, "preadv"):  # one call, no shared file position
                got = os.preadv(self.file.fileno(), [view[done:]], pos + done)
            else:
                self.file.seek(pos + done)
                got = self.file.readinto(view[done:])
            if not got:
                raise IntegrityError(self.rows.path, f"ends before row {b} of {self.rows.n} (it shrank after the "
                                     "store was opened)", "build the store again")
            done += got

    def block(self, a: int, b: int) -> torch.Tensor:
        self._read(a, b)
        x = self.raw[:b - a]
        if self.device.type != "cpu":
            return x.to(self.device).to(self.cdtype)
        return x if self.conv is None else self.conv[:b - a].copy_(x)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Pool:
    """`threads` workers that score disjoint parts of a chunk at once (file reads and torch kernels
    release the GIL). Each worker thread runs its torch kernels on one thread: the workers are the
    parallelism (torch splitting every cache-sized block over its threads costs more than it gains)."""

    def __init__(self, scorer: "ChunkedTRAKScorer", threads: int):
        self.scorer, self.threads = scorer, threads
        self.workers = [scorer._worker() for _ in range(threads)]
        self.executor, self.torch_threads = None, torch.get_num_threads()
        if threads > 1 or self.torch_threads > 1:  # torch's own threads on blocks this small only wait on each other
            self.executor = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))

    def score(self, w: torch.Tensor, a: int, b: int, out: torch.Tensor) -> None:
        """Scores of rows a..b into out ((b - a, Q))."""
        if self.executor is None:
            return self.scorer._score_range(self.workers[0], w, a, b, out)
        block = self.scorer._block
        blocks = -(-(b - a) // block)
        cuts = [a + min(b - a, block * (blocks * i // self.threads)) for i in range(self.threads + 1)]
        jobs = [self.executor.submit(self.scorer._score_range, wk, w, lo, hi, out[lo - a:hi - a])
                for wk, lo, hi in zip(self.workers, cuts, cuts[1:]) if hi > lo]
        for job in jobs:
            job.result()

    def call(self, fn, *args):
        """fn(*args) on a worker thread (single-threaded torch), or here when there are none."""
        return fn(*args) if self.executor is None else self.executor.submit(fn, *args).result()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            torch.set_num_threads(self.torch_threads)  # the workers' setting also set the default for new threads
        for wk in self.workers:
            wk.close()


class ChunkedTRAKScorer:
    """TRAK / D-TRAK scores over a feature store read in chunks (out of core), for stores of any N.

        scorer = ChunkedTRAKScorer(lam=None).fit(store)          # a complete FeatureStore, its path,
                                                                 # or an (N, k) array / tensor
        scores = scorer.scores(query_features)                   # (Q, k) -> (Q, N)
        proponents, opponents = scorer.top_k(query_features, 10) # (Q, 10) indices, strongest first

    The constructor only stores its arguments; `fit` reads the store once (or its saved kernel).

    Args:
        lam: the ridge lambda; None applies `relative_lambda` x the mean squared training-feature norm
            (trace(Phi^T Phi) / N, the same rule as `TRAKScorer`).
        relative_lambda: the rule's factor.
        compute_dtype: "float32" (default; features are multiplied in float32, the Gram matrix and the
            Cholesky factor accumulate in float64) or "float64" (matches `TRAKScorer` to float64 rounding,
            about twice the time).
        chunk_rows: rows whose scores are held at once (the top-k merge runs once a chunk); None: 65,536.
        save_kernel: write the kernel next to a store's features (kernel.npz) and reuse it on later fits.
        device: where the features are multiplied ("cpu", "cuda", "mps"): blocks are read on the CPU and
            moved there with the query weights; the float64 Gram sum, the Cholesky factor and the
            top-k merge stay on the CPU.
        threads: CPU threads that score parts of each chunk at once (each runs torch on one thread);
            None: torch.get_num_threads(). A GPU device uses one.

    Fitted attributes:
        lam_: the lambda used. n_, k_: the store's shape. gram_: (k, k) float64 Phi^T Phi.
        cholesky_: (k, k) float64 lower factor L, L L^T = Phi^T Phi + lam I.
        kernel_source_: "computed", "refactorised" (saved Gram, new lambda) or "loaded".
    """

    def __init__(self, lam: float | None = None, relative_lambda: float = DEFAULT_RELATIVE_LAMBDA,
                 compute_dtype: str = "float32", chunk_rows: int | None = None, save_kernel: bool = True,
                 device="cpu", threads: int | None = None):
        self.lam = lam
        self.relative_lambda = relative_lambda
        self.compute_dtype = compute_dtype
        self.chunk_rows = chunk_rows
        self.save_kernel = save_kernel
        self.device = device
        self.threads = threads

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, train_features) -> "ChunkedTRAKScorer":
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, not {self.compute_dtype!r}")
        if self.chunk_rows is not None and not (isinstance(self.chunk_rows, int) and self.chunk_rows > 0):
            raise ValueError(f"chunk_rows must be a positive int or None, got {self.chunk_rows!r}")
        if self.threads is not None and not (isinstance(self.threads, int) and self.threads > 0):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        rows = _Rows(train_features)
        if rows.n == 0 or rows.k == 0:
            raise ValueError(f"train features must be a non-empty (N, k) matrix, got ({rows.n}, {rows.k})")
        self.rows_, self.n_, self.k_ = rows, rows.n, rows.k
        self._cdtype = _DTYPES[self.compute_dtype]
        self._device = resolve_device(self.device)
        if self._device.type == "mps" and self._cdtype == torch.float64:
            raise ValueError("compute_dtype 'float64' is not available on mps; use 'float32'")
        self._chunk = min(rows.n, self.chunk_rows or CHUNK_ROWS)
        block_bytes = BLOCK_BYTES if self._device.type == "cpu" else DEVICE_BLOCK_BYTES
        self._block = min(self._chunk, max(1, block_bytes // rows.row_bytes))
        saved = self._load_kernel() if rows.store_path is not None and self.save_kernel else None
        gram = saved["gram"] if saved is not None else self._gram()
        lam = self.relative_lambda * float(np.trace(gram)) / rows.n if self.lam is None else float(self.lam)
        if not lam > 0:
            raise ValueError(f"lambda must be positive, got {lam}")
        if saved is not None and saved["lam"] == lam:
            chol, self.kernel_source_ = saved["cholesky"], "loaded"
        else:
            a = torch.from_numpy(gram.copy())
            a.diagonal().add_(lam)
            chol = torch.linalg.cholesky(a).numpy()
            self.kernel_source_ = "computed" if saved is None else "refactorised"
            if rows.store_path is not None and self.save_kernel:
                self._save_kernel(gram, chol, lam)
        self.lam_, self.gram_, self.cholesky_ = lam, gram, chol
        return self

    def _worker(self, block: int | None = None) -> _Worker:
        return _Worker(self.rows_, block or self._block, self._cdtype, self._device)

    def _blocks(self):
        """Yield (start, stop, rows start..stop in the compute dtype on the device), block by block
        over the store (blocks of the Gram pass); each block is valid until the next one is requested."""
        block = max(self._block, min(self.n_, GRAM_BLOCK_BYTES // self.rows_.row_bytes))
        worker = self._worker(block)
        try:
            for a in range(0, self.n_, block):
                b = min(a + block, self.n_)
                yield a, b, worker.block(a, b)
        finally:
            worker.close()

    def _gram(self) -> np.ndarray:
        """Phi^T Phi in one pass: block products summed in the compute dtype over at most
        GRAM_FLUSH_ROWS rows, those partial sums added up in float64."""
        gram = torch.zeros(self.k_, self.k_, dtype=torch.float64)
        part = torch.zeros(self.k_, self.k_, dtype=self._cdtype, device=self._device)
        since = 0
        for a, b, xs in self._blocks():
            part.addmm_(xs.T, xs)
            since += b - a
            if since >= GRAM_FLUSH_ROWS:
                gram += part.to("cpu", torch.float64)
                part.zero_()
                since = 0
        gram += part.to("cpu", torch.float64)
        return gram.numpy()

    # -- the kernel file ------------------------------------------------------------------------
    def _record(self, gram: np.ndarray, chol: np.ndarray, lam: float) -> dict:
        record = {"format": KERNEL_FORMAT, "features_sha256": self.rows_.features_sha256, "n": self.n_,
                  "k": self.k_, "lam": lam, "compute_dtype": self.compute_dtype,
                  "gram_sha256": _array_sha256(gram), "cholesky_sha256": _array_sha256(chol)}
        return {**record, "metadata_sha256": metadata_sha256(record)}

    def _save_kernel(self, gram: np.ndarray, chol: np.ndarray, lam: float) -> None:
        record = json.dumps(self._record(gram, chol, lam), sort_keys=True).encode()
        buf = io.BytesIO()
        np.savez(buf, gram=gram, cholesky=chol, record=np.frombuffer(record, dtype=np.uint8))
        atomic_write_bytes(os.path.join(self.rows_.store_path, KERNEL), buf.getvalue())

    def _load_kernel(self) -> dict | None:
        """The saved kernel of these features, or None when absent or made for other features or
        another compute dtype (then it is recomputed); a damaged file is an IntegrityError."""
        path = os.path.join(self.rows_.store_path, KERNEL)
        if not os.path.isfile(path):
            return None
        remedy = f"delete {path}; the next fit recomputes it from the store"
        try:
            with np.load(path, allow_pickle=False) as z:
                gram, chol, record = z["gram"], z["cholesky"], json.loads(z["record"].tobytes())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise IntegrityError(path, f"(saved TRAK kernel) cannot be read ({type(e).__name__}: {e}): it is "
                                 "truncated or corrupt", remedy) from None
        if not isinstance(record, dict) or record.get("metadata_sha256") != metadata_sha256(record):
            raise IntegrityError(path, "(saved TRAK kernel) record does not match its metadata_sha256 (edited or "
                                 "corrupt)", remedy)
        if record.get("format") != KERNEL_FORMAT or record.get("features_sha256") != self.rows_.features_sha256 \
                or record.get("compute_dtype") != self.compute_dtype:
            return None  # a kernel of other features or settings: stale, not damaged
        k = self.k_
        if record.get("n") != self.n_ or record.get("k") != k or gram.shape != (k, k) or chol.shape != (k, k) \
                or gram.dtype != np.float64 or chol.dtype != np.float64 \
                or _array_sha256(gram) != record.get("gram_sha256") \
                or _array_sha256(chol) != record.get("cholesky_sha256"):
            raise IntegrityError(path, "(saved TRAK kernel) arrays do not match their recorded shapes or sha256 "
                                 "(the file is corrupt or was replaced)", remedy)
        return {"gram": gram, "cholesky": chol, "lam": record["lam"]}

    # -- queries --------------------------------------------------------------------------------
    def _weights(self, query_features) -> torch.Tensor:
        """(k, Q) w = (Phi^T Phi + lam I)^-1 q^T in the compute dtype, so that scores = Phi @ w."""
        if not hasattr(self, "cholesky_"):
            raise ValueError("this ChunkedTRAKScorer is not fitted yet; call fit(store) first")
        q = query_features.detach().to("cpu", torch.float64) if isinstance(query_features, torch.Tensor) \
            else torch.from_numpy(np.array(query_features, dtype=np.float64))
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.k_:
            raise ValueError(f"query features must be (Q, {self.k_}) or ({self.k_},), got {tuple(q.shape)}")
        w = torch.cholesky_solve(q.T.contiguous(), torch.from_numpy(self.cholesky_))
        return w.to(self._cdtype).to(self._device)

    def _score_range(self, worker: _Worker, w: torch.Tensor, a: int, b: int, out: torch.Tensor) -> None:
        """Scores of rows a..b into out ((b - a, Q)), block by block through one worker's buffers."""
        for i in range(a, b, self._block):
            j = min(i + self._block, b)
            torch.mm(worker.block(i, j), w, out=out[i - a:j - a])

    def _pass(self, w: torch.Tensor, consume) -> None:
        """One pass over the store: consume(start, stop, scores (stop - start, Q) on the CPU in the
        compute dtype) for each chunk in order (the scores are valid during the call). Memory: one
        chunk's scores and each worker's two blocks. `consume` runs on a worker thread too, where torch
        is single-threaded (its small ops are slower split over threads)."""
        host = torch.empty(self._chunk, w.shape[1], dtype=self._cdtype)
        out = host if self._device.type == "cpu" else torch.empty_like(host, device=self._device)
        threads = 1 if self._device.type != "cpu" else self.threads or torch.get_num_threads()
        pool = _Pool(self, max(1, min(threads, -(-self._chunk // self._block))))
        try:
            for a in range(0, self.n_, self._chunk):
                b = min(a + self._chunk, self.n_)
                pool.score(w, a, b, out[:b - a])
                if out is not host:
                    host[:b - a].copy_(out[:b - a])
                pool.call(consume, a, b, host[:b - a])
        finally:
            pool.close()

    def scores(self, query_features) -> np.ndarray:
        """Query features (Q, k), or one (k,) -> scores (Q, N) in the compute dtype; higher = stronger
        proponent. Holds the (Q, N) result (use `top_k` when only the extremes are needed)."""
        w = self._weights(query_features)
        out = torch.empty(w.shape[1], self.n_, dtype=self._cdtype)

        def consume(a, b, s):
            out[:, a:b] = s.T

        self._pass(w, consume)
        return out.numpy()

    def top_k(self, query_features, n: int, return_scores: bool = False):
        """(proponents, opponents): (Q, n) indices of each query's n highest and n lowest scores,
        strongest first, found chunk by chunk (memory O(chunk + Q n), never all N scores). With
        `return_scores`, also their scores (compute dtype): (proponents, opponents, proponent_scores,
        opponent_scores). Ties are broken as `scoring.top_k` breaks them: proponents by lower index,
        opponents by higher index."""
        if not (isinstance(n, int) and 0 < n <= self.n_):
            raise ValueError(f"n must be an int in 1..{self.n_}, got {n!r}")
        w = self._weights(query_features)
        kept = {}  # largest (proponents) / not: (values (Q, n), indices (Q, n)), best first

        def merge(a, b, s):
            s = s.T.contiguous()  # (Q, m)
            for largest in (True, False):
                vals, idx = self._chunk_best(s, n, largest)
                idx = idx + a
                if largest in kept:  # candidates in tie order, so a stable sort by value breaks ties right:
                    old_vals, old_idx = kept[largest]  # kept rows have lower indices than this chunk's
                    pair = ((old_vals, vals), (old_idx, idx)) if largest else ((vals, old_vals), (idx, old_idx))
                    vals, idx = torch.cat(pair[0], 1), torch.cat(pair[1], 1)
                order = torch.sort(vals, dim=1, descending=largest, stable=True).indices[:, :n]
                kept[largest] = (vals.gather(1, order), idx.gather(1, order))

        self._pass(w, merge)
        (pv, pi), (ov, oi) = kept[True], kept[False]
        pro, opp = pi.numpy(), oi.numpy()
        return (pro, opp, pv.numpy(), ov.numpy()) if return_scores else (pro, opp)

    @staticmethod
    def _chunk_best(s: torch.Tensor, n: int, largest: bool):
        """(values, positions) (Q, min(n, m)) of each row's n largest (or smallest) values of s (Q, m),
        in tie order: equal values ordered by position, ascending for the largest, descending for the
        smallest. Found in linear time (topk); a row with ties at the n-th value takes the exact path."""
        q, m = s.shape
        if m <= n:
            pos = torch.arange(m).expand(q, m)
            pos = pos if largest else pos.flip(1)
            return s.gather(1, pos), pos
        top = torch.topk(s, n + 1, dim=1, largest=largest, sorted=True)
        if not bool((top.values[:, n - 1] == top.values[:, n]).any()):  # the n are exactly these
            pos = top.indices[:, :n].sort(1).values
            pos = pos if largest else pos.flip(1)
            return s.gather(1, pos), pos
        rows = []
        for r in range(q):  # ties at the n-th value: all values at least as good, in position order
            keep = torch.nonzero(s[r] >= top.values[r, n - 1] if largest else s[r] <= top.values[r, n - 1]).squeeze(1)
            keep = keep if largest else keep.flip(0)
            rows.append(keep[torch.sort(s[r, keep], descending=largest, stable=True).indices[:n]])
        pos = torch.stack(rows)
        return s.gather(1, pos), pos
