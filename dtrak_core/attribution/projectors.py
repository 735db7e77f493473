"""Random projections of gradients to k dimensions (Johnson-Lindenstrauss).

- `DenseGaussianProjector`: P (d, k) with N(0, 1/k) entries, never stored whole: it is defined
  tile by tile (fixed `TILE` x `TILE` tiles, each from its own seed), regenerated on every call,
  and at most `max_bytes` of it exists at once. The result depends only on (seed, d, k), not on
  the batch size or the memory bound.
- `SparseJLProjector`: each input coordinate goes to `c` output coordinates (one in each of c
  equal blocks of the output) with a random sign, scaled by 1/sqrt(c). O(d c) work per vector
  whatever k is, which is what makes it fast on a CPU.

Both map (B, d) float32 -> (B, k) float32 and preserve inner products in expectation.
"""
from __future__ import annotations

import math
import warnings

import torch

TILE = 1024


class DenseGaussianProjector:
    kind = "dense-gaussian"

    def __init__(self, dim: int, k: int, seed: int = 42, max_bytes: int = 256 * 2**20):
        if dim < 1 or k < 1:
            raise ValueError(f"dim and k must be positive, got dim={dim}, k={k}")
        self.dim, self.k, self.seed, self.max_bytes = dim, k, seed, max_bytes
        self.n_row_tiles = math.ceil(dim / TILE)
        self.n_col_tiles = math.ceil(k / TILE)
        if TILE * TILE * 4 > max_bytes:
            raise ValueError(f"max_bytes must be at least one {TILE}x{TILE} float32 tile ({TILE * TILE * 4} bytes)")

    def tile(self, i: int, j: int) -> torch.Tensor:
        """Rows [i*TILE, ...) and columns [j*TILE, ...) of P."""
        rows = min(TILE, self.dim - i * TILE)
        cols = min(TILE, self.k - j * TILE)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i * 65_537 + j)
        return torch.randn((rows, cols), generator=g) / math.sqrt(self.k)

    def matrix(self) -> torch.Tensor:
        """The whole P (d, k): for tests and small problems only."""
        return torch.cat([torch.cat([self.tile(i, j) for j in range(self.n_col_tiles)], 1)
                          for i in range(self.n_row_tiles)], 0)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) input, got {tuple(x.shape)}")
        x = x.float()
        out = torch.zeros(len(x), self.k)
        # Column tiles are independent; within one, the sum over row tiles runs in a fixed order.
        cols_per_pass = max(1, self.max_bytes // (self.dim * TILE * 4))
        for j0 in range(0, self.n_col_tiles, cols_per_pass):
            for i in range(self.n_row_tiles):
                block = torch.cat([self.tile(i, j) for j in range(j0, min(j0 + cols_per_pass, self.n_col_tiles))], 1)
                c0 = j0 * TILE
                out[:, c0:c0 + block.shape[1]] += x[:, i * TILE:i * TILE + block.shape[0]] @ block
        return out


class SparseJLProjector:
    kind = "sparse-jl"

    def __init__(self, dim: int, k: int, seed: int = 42, c: int = 4):
        if dim < 1 or k < 1:
            raise ValueError(f"dim and k must be positive, got dim={dim}, k={k}")
        if c < 1 or k % c:
            raise ValueError(f"c must be positive and divide k, got c={c}, k={k}")
        self.dim, self.k, self.seed, self.c = dim, k, seed, c
        g = torch.Generator().manual_seed(seed)
        block = k // c
        # Column index of coordinate i's nonzero in block b: b*block + h_b(i).
        cols = torch.randint(0, block, (dim, c), generator=g) + torch.arange(c) * block
        signs = torch.randint(0, 2, (dim, c), generator=g).float() * 2 - 1
        rows = torch.arange(dim).repeat_interleave(c)
        # Stored transposed (k, d) in CSR so that P^T x^T is one sparse-dense product.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self._pt = torch.sparse_coo_tensor(torch.stack([cols.reshape(-1), rows]), signs.reshape(-1) / math.sqrt(c),
                                               (k, dim), check_invariants=True).coalesce().to_sparse_csr()

    def matrix(self) -> torch.Tensor:
        return self._pt.to_dense().T.contiguous()

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) input, got {tuple(x.shape)}")
        return (self._pt @ x.float().T).T.contiguous()


PROJECTORS = {DenseGaussianProjector.kind: DenseGaussianProjector, SparseJLProjector.kind: SparseJLProjector}


def make_projector(kind: str, dim: int, k: int, seed: int = 42):
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector {kind!r}; choose one of {sorted(PROJECTORS)}")
    return PROJECTORS[kind](dim, k, seed)
