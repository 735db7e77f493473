"""On-disk feature store: the projected training features for one (checkpoint, dataset, setting).

    <store>/metadata.json   what the features are (checked on every open), the sha256 of features.npy
                            once complete, and `metadata_sha256` over every other field
    <store>/features.npy    (N, k) float32 (or float16 to halve a large store), a memmap filled slice by slice
    <store>/done.npy        (N,) bool, which rows are written
    <store>/done-rank<r>.npy  while several processes fill the store at once: rank r's rows (merged
                            into done.npy once all finish; see `fill`'s part)

Every open checks the metadata against its own sha256 (an edited field, e.g. K, is refused rather
than trusted), the files' shapes, and for a complete store the features against their sha256
(checksums against edits and damage, not signatures against a deliberate forger).
Stores written before the metadata had a checksum (format 1) are refused until
`python -m dtrak_core migrate-stores <folder>` adds it (after re-verifying their features).

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

from dtrak_core.attribution import batches
from dtrak_core.attribution.features import Featurizer
from dtrak_core.errors import InputImagesError, IntegrityError
from dtrak_core.files import atomic_save_npy, atomic_write_json, read_json, sha256_file

FORMAT_VERSION = 2  # 2: metadata_sha256 covers the metadata; 1: features only (migrate_store upgrades)
METADATA = "metadata.json"
FEATURES = "features.npy"
DONE = "done.npy"
STORE_DTYPES = ("float32", "float16")


def metadata_sha256(metadata: dict) -> str:
    """sha256 of the canonical JSON of every metadata field except `metadata_sha256` itself."""
    fields = {key: value for key, value in metadata.items() if key != "metadata_sha256"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_metadata(path: str, metadata: dict) -> dict:
    """Seal `metadata` with its `metadata_sha256` and write it atomically to <path>/metadata.json."""
    sealed = {**metadata, "metadata_sha256": metadata_sha256(metadata)}
    atomic_write_json(os.path.join(path, METADATA), sealed)
    return sealed


def _rebuild(path: str) -> str:
    """Delete the store and build it again: with the command that builds it where it lies
    (`remedies.store_command`: its model folder's --root and its setting), else the commands that do."""
    from dtrak_core.remedies import store_command

    command = store_command(path)
    if command is not None:
        return f"delete the folder {path} and build the store again with `{command}`"
    return (f"delete the folder {path} and build the store again (`python -m dtrak_core featurize --root <model "
            f"folder> ...` with its setting for a model folder's store, `build-baselines --root <model folder>` for "
            f"a TracInCP store)")


class FeatureStore:
    """The (N, k) features of N inputs in a folder, checked on every open, filled resumably.

        identity = FeatureStore.identity(setting, checkpoint_hash(unet), train.fingerprint)
        store = FeatureStore.create(path, identity, n=len(train), k=setting.k)   # or reopens a match
        store.fill(Featurizer(unet, scheduler, setting), train.images)          # computes missing slices
        phi = FeatureStore.open(path, identity).features()                       # (N, k) float32 memmap

    `metadata` holds the identity fields plus n, k, slice_size, complete and the checksums.
    """

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
        """Open and check a store: its metadata against `metadata_sha256`, its files' shapes, and with
        `verify` (a complete store) features.npy against `features_sha256`. Any mismatch is an
        `IntegrityError` naming the file; a store built for something else than `expected`, a ValueError."""
        meta_path = os.path.join(path, METADATA)
        if not os.path.isfile(meta_path):
            if os.path.isdir(path) and os.listdir(path):  # a store whose metadata was lost
                raise IntegrityError(meta_path, "(feature store metadata) is missing, so the folder is not a "
                                     "usable feature store", _rebuild(path))
            raise ValueError(f"{path!r} is not a feature store (no {METADATA})")
        metadata = read_json(meta_path, "feature store metadata", _rebuild(path))
        version = metadata.get("format_version")
        if version == 1:
            raise IntegrityError(meta_path, "(feature store metadata) was written by an older dtrak (store format 1) "
                                 "and has no checksum", f"add it with `python -m dtrak_core migrate-stores {path}` "
                                 f"(it verifies the features first), or {_rebuild(path)}")
        if version != FORMAT_VERSION:
            raise IntegrityError(meta_path, f"(feature store metadata) has format_version={version!r}; this code "
                                 f"reads format {FORMAT_VERSION}", _rebuild(path))
        recorded = metadata.get("metadata_sha256")
        if recorded != metadata_sha256(metadata):
            raise IntegrityError(meta_path, "(feature store metadata) does not match its recorded metadata_sha256 "
                                 "(a field was edited or the file is corrupt), so what the stored features are is "
                                 "unknown", _rebuild(path))
        store = cls(path, metadata)
        store._check_fields()
        if expected is not None:
            store.check_identity(expected)
        store._check_files(verify)
        return store

    @classmethod
    def create(cls, path: str, identity: dict, n: int, k: int, slice_size: int = 256,
               dtype: str = "float32") -> "FeatureStore":
        """Open (and verify) the store at `path` if it matches `identity`, else start a new one there.
        dtype: "float32", or "float16" for stores too large for float32 (scored out of core)."""
        if dtype not in STORE_DTYPES:
            raise ValueError(f"feature store dtype must be one of {STORE_DTYPES}, not {dtype!r}")
        if os.path.exists(os.path.join(path, METADATA)):
            store = cls.open(path, identity)
            for key, value in {"n": n, "k": k, "slice_size": slice_size, "dtype": dtype}.items():
                if key == "dtype" and store.complete:
                    continue  # finished, then compacted (`compact_store`): read in the dtype it has
                if store.metadata[key] != value:
                    raise ValueError(f"feature store {path!r} has {key}={store.metadata[key]!r}, not {value!r}")
            return store
        os.makedirs(path, exist_ok=True)
        metadata = {"format_version": FORMAT_VERSION, **identity, "n": n, "k": k, "dtype": dtype,
                    "slice_size": slice_size, "complete": False, "features_sha256": None}
        np.lib.format.open_memmap(os.path.join(path, FEATURES), mode="w+", dtype=dtype, shape=(n, k)).flush()
        atomic_save_npy(os.path.join(path, DONE), np.zeros(n, dtype=bool))
        metadata = write_metadata(path, metadata)  # written last: marks the store as existing
        return cls(path, metadata)

    def _check_fields(self) -> None:
        meta_path = os.path.join(self.path, METADATA)
        m = self.metadata
        ints = all(isinstance(m.get(f), int) and not isinstance(m.get(f), bool) and m[f] > 0
                   for f in ("n", "k", "slice_size"))
        sha = m.get("features_sha256")
        if not ints or m.get("dtype") not in STORE_DTYPES or not isinstance(m.get("complete"), bool) \
                or (m["complete"] and not isinstance(sha, str)):
            raise IntegrityError(meta_path, "(feature store metadata) lacks or garbles one of n, k, slice_size, "
                                 "dtype, complete, features_sha256", _rebuild(self.path))

    def _check_files(self, verify: bool) -> None:
        n, k = self.metadata["n"], self.metadata["k"]
        fpath = os.path.join(self.path, FEATURES)
        try:
            arr = np.load(fpath, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise IntegrityError(fpath, f"(stored features) cannot be read ({e}): it is truncated or corrupt",
                                 _rebuild(self.path)) from None
        if arr.shape != (n, k) or arr.dtype != np.dtype(self.metadata["dtype"]):
            raise IntegrityError(fpath, f"(stored features) holds {arr.shape} {arr.dtype}, the metadata says "
                                 f"({n}, {k}) {self.metadata['dtype']}", _rebuild(self.path))
        del arr
        done = self.done
        if done.shape != (n,) or done.dtype != bool:
            raise IntegrityError(os.path.join(self.path, DONE), f"(done mask) holds {done.shape} {done.dtype}, "
                                 f"expected ({n},) bool", _rebuild(self.path))
        if self.complete and not done.all():
            raise IntegrityError(os.path.join(self.path, DONE), f"(done mask) lacks {int((~done).sum())} rows of a "
                                 f"store marked complete", _rebuild(self.path))
        if verify and self.complete and sha256_file(fpath) != self.metadata["features_sha256"]:
            raise IntegrityError(fpath, "(stored features) does not match its recorded sha256 (the file is "
                                 "corrupt or was replaced)", _rebuild(self.path))

    # -- contents -------------------------------------------------------------------------------
    @property
    def done(self) -> np.ndarray:
        path = os.path.join(self.path, DONE)
        try:
            return np.load(path)
        except (OSError, ValueError, EOFError) as e:
            raise IntegrityError(path, f"(done mask) cannot be read ({e}): it is truncated or corrupt",
                                 _rebuild(self.path)) from None

    @property
    def complete(self) -> bool:
        return bool(self.metadata.get("complete"))

    def features(self) -> np.ndarray:
        """(N, k) memmap (read-only) of the store's dtype (float32 unless built as float16); only for a
        complete store."""
        if not self.complete:
            missing = int((~self.done).sum())
            raise ValueError(f"feature store {self.path!r} is incomplete ({missing} rows missing); run featurize to finish it")
        return np.load(os.path.join(self.path, FEATURES), mmap_mode="r")

    def fill(self, featurize, inputs, show_bar: bool = True, progress=None, should_stop=None,
             part: tuple[int, int] = (0, 1), transform=None) -> "FeatureStore":
        """Compute the missing slices with `featurize(inputs[a:b]) -> (b - a, k)` and mark the store complete.

        inputs: the N inputs, sliced as `inputs[a:b]` (a tensor, an array, indices, a list); for a
        `Featurizer`, also a torch Dataset or any sequence of images, handed over as lazy `Items`
        views of its slices, or an iterable of batches (a DataLoader), read through once, each slice
        stacked as it completes (`batches`: no more than one slice of images is held). A resumed fill
        skips the done slices' items (an iterable is still read through, and its count checked).
        transform: applied to each item's image (see `batches`); the features are those of the
        stacked tensor, bit for bit, however the images are given.

        part=(rank, world) with world > 1 (one of several processes filling the store at once): only
        this rank's contiguous share of the slices (`part_rows`), recorded in its own done file
        (done-rank<rank>.npy), and the store is left incomplete; once every rank has finished, one
        process calls `fill` again with the default part, which merges the ranks' done files (as any
        fill does with those a killed run left) and marks the store complete."""
        n, k, size = self.metadata["n"], self.metadata["k"], self.metadata["slice_size"]
        stream = batches.is_stream(inputs)
        count = batches.stream_length(inputs) if stream else len(inputs)
        if count is not None and count != n:
            raise ValueError(f"store expects {n} inputs, got {count}")
        rank, world = part
        done = self.done if world > 1 else self.merge_rank_done()
        first, stop_row = self.part_rows(rank, world)
        done_path = os.path.join(self.path, DONE if world == 1 else f"done-rank{rank}.npy")
        todo = [s for s in range(first, stop_row, size) if not done[s:s + size].all()]
        if stream:
            slices = self._stream_slices(inputs, set(todo), transform)
        else:
            lazy = isinstance(featurize, Featurizer)
            slices = ((s, batches.rows(inputs, s, min(s + size, n), transform, lazy)) for s in todo)
        feats = np.load(os.path.join(self.path, FEATURES), mmap_mode="r+")
        for i, (start, rows) in enumerate(tqdm(slices, total=len(todo), desc=f"featurize {os.path.basename(self.path)}",
                                               disable=not show_bar)):
            if should_stop is not None and should_stop():
                from dtrak_core.errors import Cancelled

                raise Cancelled("featurization cancelled; rerun to resume")
            stop = min(start + size, n)
            rows = np.asarray(featurize(rows), dtype=self.metadata["dtype"])
            if rows.shape != (stop - start, k):
                raise ValueError(f"featurize returned {rows.shape}, expected {(stop - start, k)}")
            feats[start:stop] = rows
            feats.flush()
            done[start:stop] = True
            atomic_save_npy(done_path, done)
            if progress is not None:
                progress(i + 1, len(todo))
        del feats
        if not self.complete and world == 1:
            sha = sha256_file(os.path.join(self.path, FEATURES))
            self.metadata = write_metadata(self.path, {**self.metadata, "complete": True, "features_sha256": sha})
        return self

    def _stream_slices(self, inputs, todo: set, transform):
        """(start, images (b, C, H, W)) of the slices in `todo`, read from an iterable of batches in
        order; the rest of the iterable is read through to check that it holds n images."""
        n, size = self.metadata["n"], self.metadata["slice_size"]
        seen = 0
        for start, images in batches.image_batches(inputs, size, transform):
            seen = start + len(images)
            if seen > n:
                raise InputImagesError(f"the images hold more than the {n} the store was made for")
            if len(images) < min(size, n - start):  # (only the last batch is short)
                break
            if start in todo:
                yield start, images
        if seen != n:
            raise InputImagesError(f"the images hold {seen} images, the store was made for {n}")

    def part_rows(self, rank: int, world: int) -> tuple[int, int]:
        """Rows [a, b) of rank `rank` out of `world`: a contiguous share of whole slices."""
        if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
            raise ValueError(f"part must be (rank, world) with 0 <= rank < world, got ({rank!r}, {world!r})")
        n, size = self.metadata["n"], self.metadata["slice_size"]
        slices = -(-n // size)
        return min(n, slices * rank // world * size), min(n, slices * (rank + 1) // world * size)

    def merge_rank_done(self) -> np.ndarray:
        """The done mask with the rows of any done-rank<r>.npy (from processes that filled the store
        together) merged in and recorded in done.npy, those files removed. Only while no rank writes."""
        done = self.done
        extra = sorted(f for f in os.listdir(self.path) if f.startswith("done-rank") and f.endswith(".npy"))
        for name in extra:
            path = os.path.join(self.path, name)
            try:
                part = np.load(path)
            except (OSError, ValueError, EOFError) as e:
                raise IntegrityError(path, f"(a rank's done mask) cannot be read ({e})", _rebuild(self.path)) from None
            if part.shape != done.shape or part.dtype != bool:
                raise IntegrityError(path, f"(a rank's done mask) holds {part.shape} {part.dtype}, expected "
                                     f"{done.shape} bool", _rebuild(self.path))
            done |= part
        if extra:
            atomic_save_npy(os.path.join(self.path, DONE), done)  # first, so no row is lost if killed here
            for name in extra:
                os.remove(os.path.join(self.path, name))
        return done


def cached_store(path: str, identity: dict, inputs, make_featurizer, k: int, *, slice_size: int = 256,
                 build: bool = True, show_bar: bool = True) -> FeatureStore | None:
    """The complete feature store at `path` for `inputs`: built if missing, verified if present.

    identity: what the features are of (`FeatureStore.identity(setting, checkpoint hash, inputs'
        fingerprint)`, plus any field that changes them); a store at `path` built for anything
        else is refused (ValueError), never overwritten.
    inputs: the N inputs to featurize, sliced as `inputs[a:b]` (images (N, C, H, W), or indices).
    make_featurizer(): -> a callable `inputs[a:b] -> (b - a, k)`; called only when rows are missing.
    build: False only looks: None when the store is absent or unfinished (left as it is).

    Every open checks the store (metadata checksum, shapes, features sha256 once complete); an
    unfinished store resumes where it stopped.
    """
    if not build:
        if not os.path.isfile(os.path.join(path, METADATA)):
            return None
        store = FeatureStore.open(path, identity)
        return store if store.complete else None
    store = FeatureStore.create(path, identity, len(inputs), k, slice_size=slice_size)
    if not store.complete:
        store.fill(make_featurizer(), inputs, show_bar=show_bar)
    return store


def compact_store(path: str, dtype: str = "float16") -> FeatureStore:
    """Rewrite a complete store in a smaller dtype (its identity kept), swapped in atomically: the
    same rows, rounded; a store already in `dtype` is returned as it is."""
    import shutil

    store = FeatureStore.open(path)
    if not store.complete:
        raise ValueError(f"{path}: the store is not complete; finish it before compacting it")
    if store.metadata["dtype"] == dtype:
        return store
    features = np.asarray(store.features(), dtype=np.float32)
    identity = {key: store.metadata[key] for key in store.metadata if key not in (
        "format_version", "n", "k", "dtype", "complete", "features_sha256", "metadata_sha256", "slice_size")}
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(prefix=".tmp-compact-", dir=parent)
    try:
        new = FeatureStore.create(os.path.join(tmp, "store"), identity, len(features), features.shape[1],
                                  slice_size=int(store.metadata.get("slice_size", 256)), dtype=dtype)
        new.fill(lambda rows: rows, features, show_bar=False)
        old = tempfile.mkdtemp(prefix=".old-store-", dir=parent)
        os.replace(path, os.path.join(old, "store"))
        os.replace(os.path.join(tmp, "store"), path)
        shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return FeatureStore.open(path)


# -- migration of format-1 stores -----------------------------------------------------------------
def migrate_store(path: str) -> bool:
    """Upgrade one format-1 store to format 2 (metadata sealed by `metadata_sha256`); True if it was
    upgraded, False if it already was format 2 (and verifies).

    A deliberate, one-time step: the format-1 metadata had no checksum, so its fields are taken as
    they are; the features are verified against their recorded sha256 (and the files' shapes
    against the metadata) first, and a store that fails is left untouched (IntegrityError).
    """
    meta_path = os.path.join(path, METADATA)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path!r} is not a feature store (no {METADATA})")
    metadata = read_json(meta_path, "feature store metadata", _rebuild(path))
    if metadata.get("format_version") == FORMAT_VERSION:
        FeatureStore.open(path)
        return False
    if metadata.get("format_version") != 1 or "metadata_sha256" in metadata:
        raise IntegrityError(meta_path, f"(feature store metadata) is not of a format-1 store (format_version="
                             f"{metadata.get('format_version')!r}), so there is nothing to migrate", _rebuild(path))
    store = FeatureStore(path, metadata)
    store._check_fields()
    store._check_files(verify=True)
    write_metadata(path, {**metadata, "format_version": FORMAT_VERSION})
    FeatureStore.open(path)  # what was written reads back and verifies
    return True


def find_stores(folder: str) -> list[str]:
    """Every feature store at or under `folder` (folders holding metadata.json and features.npy)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        if METADATA in filenames and FEATURES in filenames:
            found.append(dirpath)
    return found


def open_stores(folder, damaged: dict | None = None) -> list[FeatureStore]:
    """Every feature store a model folder registers (`folder.ModelFolder`), opened and verified; the
    first that cannot be is an error naming its file (the CLI's strict path).

    damaged: a dict instead collects {store folder: the error} of the stores that cannot be
    opened, which are left out (the app, which turns off only the methods that need them); at
    least one store must open, else the first error is raised."""
    stores = []
    for rel in folder.stores or []:
        path = os.path.join(folder.root, rel)
        try:
            stores.append(FeatureStore.open(path))
        except (ValueError, OSError) as e:
            if damaged is None:
                raise
            damaged[path] = e
    if damaged and not stores:
        raise next(iter(damaged.values()))
    return stores
