"""TRAK scores out of core: the training features stay on disk and are read one chunk at a time.

The same scores as `TRAKScorer` (primal form),

    scores = Phi_q (Phi^T Phi + lambda I)^-1 Phi^T          (Q, N)

computed as Phi @ w with w = (Phi^T Phi + lambda I)^-1 Phi_q^T (k, Q), so a query costs one pass over
the store (linear in N) with memory bounded by one chunk, and `top_k` keeps only the running best
rows, never all N scores. `fit` accumulates the k x k Gram matrix Phi^T Phi chunk by chunk (one pass)
and factorises Phi^T Phi + lambda I once (Cholesky); both are saved with the store in `kernel.npz`,
so later fits on the same store only read that file.

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
import mmap
import os

import warnings
import zipfile
import zlib

import numpy as np
import torch

from dtrak_core.attribution.scoring import DEFAULT_RELATIVE_LAMBDA
from dtrak_core.attribution.store import FEATURES, FeatureStore, metadata_sha256
from dtrak_core.devices import resolve_device
from dtrak_core.errors import IntegrityError
from dtrak_core.files import atomic_write_bytes

KERNEL = "kernel.npz"
KERNEL_FORMAT = 1
CHUNK_BYTES = 64 << 20  # a chunk of the store as stored, mapped at once: bounds the resident memory
BLOCK_BYTES = 4 << 20  # a chunk is converted and multiplied in blocks this size (compute dtype) that stay in cache
GRAM_FLUSH_ROWS = 1 << 14  # float32 partial Gram sums are added into the float64 total every this many rows
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# chunks are read-only mappings of the store, only ever read: torch's warning about them is noise
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=__name__.replace(".", r"\."))


def _array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


class _Rows:
    """Chunks of an (N, k) feature matrix as torch tensors: a complete store's features.npy mapped
    one chunk at a time (unmapped after use, so resident memory stays one chunk) or an array."""

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

    def chunks(self, rows: int):
        """Yield (start, stop, tensor of rows start..stop) in the stored dtype (the tensor is valid
        until the next chunk is requested)."""
        if self.array is not None:
            for a in range(0, self.n, rows):
                b = min(a + rows, self.n)
                yield a, b, torch.from_numpy(np.ascontiguousarray(self.array[a:b]))
            return
        row_bytes = self.k * self.dtype.itemsize
        gran = mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # prefault the chunk in one call
        dtype = torch.from_numpy(np.zeros(0, self.dtype)).dtype
        with open(self.path, "rb") as f:
            for a in range(0, self.n, rows):
                b = min(a + rows, self.n)
                start = self.offset + a * row_bytes
                base = start - start % gran
                mm = mmap.mmap(f.fileno(), start - base + (b - a) * row_bytes, flags=flags, prot=mmap.PROT_READ,
                               offset=base)
                # read-only view (never written); the mapping goes when the last view of it does
                yield a, b, torch.frombuffer(mm, dtype=dtype, count=(b - a) * self.k,
                                             offset=start - base).view(b - a, self.k)
                del mm


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
        chunk_rows: rows per chunk; None sizes a chunk to about 64 MiB in the compute dtype.
        save_kernel: write the kernel next to a store's features (kernel.npz) and reuse it on later fits.
        device: where the chunks are multiplied ("cpu", "cuda", "mps"); the chunks are read on the CPU
            and moved, the Gram sum, the Cholesky factor and the top-k merge stay on the CPU in float64.

    Fitted attributes:
        lam_: the lambda used. n_, k_: the store's shape. gram_: (k, k) float64 Phi^T Phi.
        cholesky_: (k, k) float64 lower factor L, L L^T = Phi^T Phi + lam I.
        kernel_source_: "computed", "refactorised" (saved Gram, new lambda) or "loaded".
    """

    def __init__(self, lam: float | None = None, relative_lambda: float = DEFAULT_RELATIVE_LAMBDA,
                 compute_dtype: str = "float32", chunk_rows: int | None = None, save_kernel: bool = True,
                 device="cpu"):
        self.lam = lam
        self.relative_lambda = relative_lambda
        self.compute_dtype = compute_dtype
        self.chunk_rows = chunk_rows
        self.save_kernel = save_kernel
        self.device = device

    # -- fit ------------------------------------------------------------------------------------
    def fit(self, train_features) -> "ChunkedTRAKScorer":
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, not {self.compute_dtype!r}")
        if self.chunk_rows is not None and not (isinstance(self.chunk_rows, int) and self.chunk_rows > 0):
            raise ValueError(f"chunk_rows must be a positive int or None, got {self.chunk_rows!r}")
        rows = _Rows(train_features)
        if rows.n == 0 or rows.k == 0:
            raise ValueError(f"train features must be a non-empty (N, k) matrix, got ({rows.n}, {rows.k})")
        self.rows_, self.n_, self.k_ = rows, rows.n, rows.k
        self._cdtype = _DTYPES[self.compute_dtype]
        self._device = resolve_device(self.device)
        if self._device.type == "mps" and self._cdtype == torch.float64:
            raise ValueError("compute_dtype 'float64' is not available on mps; use 'float32'")
        self._chunk = self.chunk_rows or max(1, CHUNK_BYTES // (rows.k * rows.dtype.itemsize))
        self._block = min(self._chunk, max(1, BLOCK_BYTES // (rows.k * self._cdtype.itemsize)))
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

    def _blocks(self):
        """Yield (start, stop, rows start..stop in the compute dtype), block by block over the store;
        each block is valid until the next one is requested."""
        buf = None
        for a, b, x in self.rows_.chunks(self._chunk):
            for i in range(0, b - a, self._block):
                xs = x[i:i + self._block]
                if self._device.type != "cpu":  # moved in the stored dtype (fewer bytes), converted there
                    xs = xs.to(self._device).to(self._cdtype)
                elif xs.dtype != self._cdtype:  # convert into one reused, cache-sized buffer
                    if buf is None:
                        buf = torch.empty(self._block, self.k_, dtype=self._cdtype)
                    xs = buf[:len(xs)].copy_(xs)
                yield a + i, a + i + len(xs), xs

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

    def _chunk_scores(self, w: torch.Tensor):
        """Yield (start, stop, scores (stop - start, Q)) chunk by chunk over the store (each valid until
        the next is requested), computed block by block: memory is one chunk's scores and one block."""
        out = torch.empty(self._chunk, w.shape[1], dtype=self._cdtype, device=self._device)
        start = 0
        for a, b, xs in self._blocks():
            torch.mm(xs, w, out=out[a - start:b - start])
            if b - start == self._chunk or b == self.n_:
                yield start, b, out[:b - start]
                start = b

    def scores(self, query_features) -> np.ndarray:
        """Query features (Q, k), or one (k,) -> scores (Q, N) in the compute dtype; higher = stronger
        proponent. Holds the (Q, N) result (use `top_k` when only the extremes are needed)."""
        w = self._weights(query_features)
        out = torch.empty(w.shape[1], self.n_, dtype=self._cdtype)
        for a, b, s in self._chunk_scores(w):
            out[:, a:b] = s.T.cpu()
        return out.numpy()

    def top_k(self, query_features, n: int, return_scores: bool = False):
        """(proponents, opponents): (Q, n) indices of each query's n highest and n lowest scores,
        strongest first, found chunk by chunk (memory O(chunk + Q n), never all N scores). With
        `return_scores`, also their scores: (proponents, opponents, proponent_scores, opponent_scores).
        Ties are broken as `scoring.top_k` breaks them."""
        if not (isinstance(n, int) and 0 < n <= self.n_):
            raise ValueError(f"n must be an int in 1..{self.n_}, got {n!r}")
        w = self._weights(query_features)
        best = [None, None]  # per side: (values (Q, m), indices (Q, m)); opponents kept as negated scores
        for a, b, s in self._chunk_scores(w):
            s = s.T.cpu().to(torch.float64)
            idx = torch.arange(a, b).expand_as(s)
            for side in (0, 1):
                # candidates ordered so that a stable sort by value breaks ties as scoring.top_k does:
                # proponents by lower index, opponents (its reversed order) by higher index
                if side == 0:
                    vals, cand = s, idx
                    if best[0] is not None:
                        vals, cand = torch.cat([best[0][0], vals], 1), torch.cat([best[0][1], cand], 1)
                else:
                    vals, cand = -s.flip(1), idx.flip(1)
                    if best[1] is not None:
                        vals, cand = torch.cat([vals, best[1][0]], 1), torch.cat([cand, best[1][1]], 1)
                order = self._best(vals, n)
                best[side] = (vals.gather(1, order), cand.gather(1, order))
        (pv, pi), (ov, oi) = best
        pro, opp = pi.numpy(), oi.numpy()
        return (pro, opp, pv.numpy(), -ov.numpy()) if return_scores else (pro, opp)

    @staticmethod
    def _best(vals: torch.Tensor, n: int) -> torch.Tensor:
        """(Q, n) positions of each row's n largest values, ties in position order: the values at
        least as large as the n-th largest (found in linear time), then a stable sort of those few."""
        if vals.shape[1] <= 4 * n:
            return torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :n]
        thresh = torch.topk(vals, n, dim=1, sorted=False).values.min(1).values
        rows = []
        for r in range(vals.shape[0]):
            keep = torch.nonzero(vals[r] >= thresh[r]).squeeze(1)  # position order
            rows.append(keep[torch.sort(vals[r, keep], descending=True, stable=True).indices[:n]])
        return torch.stack(rows)
