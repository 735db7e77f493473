"""The IDX format of MNIST and Fashion-MNIST (optionally gzip-compressed), read and checked.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values. Only unsigned bytes (type 0x08) occur in these
datasets, and only those are read. Every check names the file, so a damaged download says which one.

    images = read_idx("train-images-idx3-ubyte.gz")   # (60000, 28, 28) uint8
    labels = read_idx("train-labels-idx1-ubyte.gz")   # (60000,) uint8
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

UBYTE = 0x08
FIX = "reinstall the dataset (for Fashion-MNIST: apt-get install --reinstall dataset-fashion-mnist)"


class IDXError(ValueError):
    """A file that is not a whole, well-formed IDX file of unsigned bytes."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}; {FIX}")
        self.path = path


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise IDXError(path, "no such file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise IDXError(path, f"damaged gzip stream ({type(e).__name__}: {e})") from None


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
    """The array stored in an IDX file of unsigned bytes; `ndim`: the number of dimensions it must have."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXError(path, "not an IDX file (its magic number does not start with two zero bytes)")
    if raw[2] != UBYTE:
        raise IDXError(path, f"values of type 0x{raw[2]:02x}, expected unsigned bytes (0x08)")
    dims = raw[3]
    if ndim is not None and dims != ndim:
        raise IDXError(path, f"{dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise IDXError(path, "truncated header")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != size:
        raise IDXError(path, f"{len(raw) - header} bytes of data for a {'x'.join(map(str, shape))} array "
                             f"({size} bytes): truncated or padded")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def read_images_and_labels(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) int64) from a pair of IDX files that must agree in N."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise IDXError(labels_path, f"{len(labels)} labels for the {len(images)} images of {images_path}")
    return images, labels.astype(np.int64)
