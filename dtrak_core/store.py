"""On-disk feature store: the projected training features for one (checkpoint, dataset, setting).

    <store>/metadata.json   what the features are (checked on every open), and their sha256 once complete
    <store>/features.npy    (N, k) float32, a memmap filled slice by slice
    <store>/done.npy        (N,) bool, which rows are written

The store is filled in fixed slices of `slice_size` rows, always computed whole, so a run that is
killed and restarted recomputes only unfinished slices and ends bit-identical to an uninterrupted
run. A row counts as done only after its features were flushed to disk and the done mask was
replaced atomically (write to a temporary file, then rename), so a kill at any moment never leaves
a half-written row marked valid.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import numpy as np
from tqdm.auto import tqdm

FORMAT_VERSION = 1
METADATA = "metadata.json"
FEATURES = "features.npy"
DONE = "done.npy"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a file so that a killed process leaves either the old file or the new one, never a
    part (the temporary name ends in .tmp, which git ignores)."""
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _atomic_save_npy(path: str, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class FeatureStore:
    """Open with `FeatureStore.open(path)` (read) or `FeatureStore.create(path, identity, n, k)`."""

    def __init__(self, path: str, metadata: dict):
        self.path = path
        self.metadata = metadata

    # -- identity -------------------------------------------------------------------------------
    @staticmethod
    def identity(setting, checkpoint: str, dataset: str) -> dict:
        """Fields that must match for a store to be reused: the setting, the weights, the data."""
        return {**setting.to_dict(), "checkpoint": checkpoint, "dataset": dataset}

    def check_identity(self, expected: dict) -> None:
        for key, value in expected.items():
            have = self.metadata.get(key)
            if have != value:
                raise ValueError(f"feature store {self.path!r} was built for {key}={have!r}, not {key}={value!r}; "
                                 f"use another store folder or delete this one")

    # -- open / create --------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, expected: dict | None = None, verify: bool = True) -> "FeatureStore":
        meta_path = os.path.join(path, METADATA)
        if not os.path.isfile(meta_path):
            raise ValueError(f"{path!r} is not a feature store (no {METADATA})")
        try:
            with open(meta_path) as f:
                metadata = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"corrupt {meta_path}: {e}") from e
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"feature store {path!r} has format_version={metadata.get('format_version')!r}, "
                             f"this code reads {FORMAT_VERSION}")
        store = cls(path, metadata)
        if expected is not None:
            store.check_identity(expected)
        store._check_files(verify)
        return store

    @classmethod
    def create(cls, path: str, identity: dict, n: int, k: int, slice_size: int = 256) -> "FeatureStore":
        """Open the store at `path` if it matches `identity`, else start a new one there."""
        if os.path.exists(os.path.join(path, METADATA)):
            store = cls.open(path, identity, verify=False)
            for key, value in {"n": n, "k": k, "slice_size": slice_size}.items():
                if store.metadata[key] != value:
                    raise ValueError(f"feature store {path!r} has {key}={store.metadata[key]!r}, not {value!r}")
            return store
        os.makedirs(path, exist_ok=True)
        metadata = {"format_version": FORMAT_VERSION, **identity, "n": n, "k": k, "dtype": "float32",
                    "slice_size": slice_size, "complete": False, "features_sha256": None}
        np.lib.format.open_memmap(os.path.join(path, FEATURES), mode="w+", dtype=np.float32, shape=(n, k)).flush()
        _atomic_save_npy(os.path.join(path, DONE), np.zeros(n, dtype=bool))
        atomic_write_json(os.path.join(path, METADATA), metadata)  # written last: marks the store as existing
        return cls(path, metadata)

    def _check_files(self, verify: bool) -> None:
        n, k = self.metadata["n"], self.metadata["k"]
        fpath = os.path.join(self.path, FEATURES)
        try:
            arr = np.load(fpath, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"feature store {self.path!r}: cannot read {FEATURES} ({e}); it is truncated or corrupt") from e
        if arr.shape != (n, k) or arr.dtype != np.float32:
            raise ValueError(f"feature store {self.path!r}: {FEATURES} is {arr.shape} {arr.dtype}, expected ({n}, {k}) float32")
        try:
            done = np.load(os.path.join(self.path, DONE))
        except (OSError, ValueError) as e:
            raise ValueError(f"feature store {self.path!r}: cannot read {DONE} ({e})") from e
        if done.shape != (n,):
            raise ValueError(f"feature store {self.path!r}: {DONE} has shape {done.shape}, expected ({n},)")
        if verify and self.metadata.get("complete") and _sha256_file(fpath) != self.metadata["features_sha256"]:
            raise ValueError(f"feature store {self.path!r}: {FEATURES} does not match its recorded sha256 (corrupt)")

    # -- contents -------------------------------------------------------------------------------
    @property
    def done(self) -> np.ndarray:
        return np.load(os.path.join(self.path, DONE))

    @property
    def complete(self) -> bool:
        return bool(self.metadata.get("complete"))

    def features(self) -> np.ndarray:
        """(N, k) float32 memmap (read-only); only for a complete store."""
        if not self.complete:
            missing = int((~self.done).sum())
            raise ValueError(f"feature store {self.path!r} is incomplete ({missing} rows missing); run featurize to finish it")
        return np.load(os.path.join(self.path, FEATURES), mmap_mode="r")

    def fill(self, featurize, inputs, show_bar: bool = True, progress=None, should_stop=None) -> "FeatureStore":
        """Compute the missing slices with `featurize(inputs[a:b]) -> (b - a, k)` and mark the store complete."""
        n, k, size = self.metadata["n"], self.metadata["k"], self.metadata["slice_size"]
        if len(inputs) != n:
            raise ValueError(f"store expects {n} inputs, got {len(inputs)}")
        done = self.done
        todo = [s for s in range(0, n, size) if not done[s:s + size].all()]
        feats = np.load(os.path.join(self.path, FEATURES), mmap_mode="r+")
        for i, start in enumerate(tqdm(todo, desc=f"featurize {os.path.basename(self.path)}", disable=not show_bar)):
            if should_stop is not None and should_stop():
                from .training import Cancelled

                raise Cancelled("featurization cancelled; rerun to resume")
            stop = min(start + size, n)
            rows = np.asarray(featurize(inputs[start:stop]), dtype=np.float32)
            if rows.shape != (stop - start, k):
                raise ValueError(f"featurize returned {rows.shape}, expected {(stop - start, k)}")
            feats[start:stop] = rows
            feats.flush()
            done[start:stop] = True
            _atomic_save_npy(os.path.join(self.path, DONE), done)
            if progress is not None:
                progress(i + 1, len(todo))
        del feats
        if not self.complete:
            self.metadata = {**self.metadata, "complete": True,
                             "features_sha256": _sha256_file(os.path.join(self.path, FEATURES))}
            atomic_write_json(os.path.join(self.path, METADATA), self.metadata)
        return self
