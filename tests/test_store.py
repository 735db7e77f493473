import json
import os

import numpy as np
import pytest

from dtrak_core.features import FeatureSetting
from dtrak_core.store import FEATURES, METADATA, FeatureStore
from dtrak_core.training import Cancelled

SETTING = FeatureSetting("square", K=10, k=6)
IDENTITY = FeatureStore.identity(SETTING, checkpoint="abc123", dataset="data456")
INPUTS = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)


def featurize(x):
    # a deterministic function of each row alone
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate([np.sin(x), np.cos(x)], axis=1).astype(np.float32)


def build(path, stop_after=None):
    store = FeatureStore.create(str(path), IDENTITY, n=len(INPUTS), k=6, slice_size=5)
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return stop_after is not None and calls["n"] > stop_after

    return store.fill(featurize, INPUTS, show_bar=False, should_stop=should_stop)


def test_resume_after_kill_is_bit_identical(tmp_path):
    with pytest.raises(Cancelled):
        build(tmp_path / "a", stop_after=2)
    partial = FeatureStore.open(str(tmp_path / "a"))
    assert partial.done.sum() == 10 and not partial.complete
    with pytest.raises(ValueError, match="incomplete"):
        partial.features()
    resumed = build(tmp_path / "a")
    clean = build(tmp_path / "b")
    assert resumed.complete
    a, b = resumed.features(), clean.features()
    assert a.tobytes() == b.tobytes()
    assert resumed.metadata["features_sha256"] == clean.metadata["features_sha256"]
    np.testing.assert_array_equal(a, featurize(INPUTS))


def test_resume_recomputes_only_missing_slices(tmp_path):
    with pytest.raises(Cancelled):
        build(tmp_path / "a", stop_after=3)
    seen = []
    store = FeatureStore.create(str(tmp_path / "a"), IDENTITY, n=len(INPUTS), k=6, slice_size=5)
    store.fill(lambda x: (seen.append(len(x)), featurize(x))[1], INPUTS, show_bar=False)
    assert seen == [5, 3]  # rows 15..19 and 20..22


def test_mismatched_metadata_names_the_field(tmp_path):
    build(tmp_path / "s")
    for field, value in [("checkpoint", "other"), ("dataset", "other"), ("output_fn", "loss"), ("K", 100), ("k", 7)]:
        with pytest.raises(ValueError, match=f"built for {field}="):
            FeatureStore.open(str(tmp_path / "s"), expected={**IDENTITY, field: value})
    with pytest.raises(ValueError, match="built for checkpoint="):
        FeatureStore.create(str(tmp_path / "s"), {**IDENTITY, "checkpoint": "zzz"}, n=len(INPUTS), k=6, slice_size=5)


def test_truncated_or_corrupt_files_are_detected(tmp_path):
    build(tmp_path / "s")
    path = tmp_path / "s" / FEATURES
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        FeatureStore.open(str(tmp_path / "s"))
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="sha256"):
        FeatureStore.open(str(tmp_path / "s"))
    (tmp_path / "s" / METADATA).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        FeatureStore.open(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="not a feature store"):
        FeatureStore.open(str(tmp_path / "nothing"))


def test_kill_between_rows_and_mask_loses_nothing(tmp_path):
    """Rows written but the done mask not yet replaced: those rows are simply recomputed."""
    build(tmp_path / "s")
    store = FeatureStore.open(str(tmp_path / "s"))
    done = store.done
    done[5:] = False
    np.save(tmp_path / "s" / "done.npy", done)
    meta = json.loads((tmp_path / "s" / METADATA).read_text())
    meta.update(complete=False, features_sha256=None)
    (tmp_path / "s" / METADATA).write_text(json.dumps(meta))
    feats = np.load(tmp_path / "s" / FEATURES, mmap_mode="r+")
    feats[7] = np.nan  # a half-written row
    feats.flush()
    del feats
    store = build(tmp_path / "s")
    np.testing.assert_array_equal(store.features(), featurize(INPUTS))
    assert not any(name.startswith(".tmp") for name in os.listdir(tmp_path / "s"))
