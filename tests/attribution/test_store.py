import json
import os

import numpy as np
import pytest

from dtrak_core import cli
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.store import (
    DONE,
    FEATURES,
    METADATA,
    FeatureStore,
    find_stores,
    migrate_store,
    write_metadata,
)
from dtrak_core.errors import Cancelled, IntegrityError
from dtrak_core.files import read_json

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
    write_metadata(str(tmp_path / "s"), meta)  # the metadata as it was before the store completed
    feats = np.load(tmp_path / "s" / FEATURES, mmap_mode="r+")
    feats[7] = np.nan  # a half-written row
    feats.flush()
    del feats
    store = build(tmp_path / "s")
    np.testing.assert_array_equal(store.features(), featurize(INPUTS))
    assert not any(name.startswith(".tmp") for name in os.listdir(tmp_path / "s"))


@pytest.mark.parametrize("field, value", [("K", 100), ("checkpoint", "other"), ("n", 22), ("complete", False),
                                          ("features_sha256", "0" * 64)])
def test_edited_metadata_is_refused_not_trusted(tmp_path, field, value):
    """Every metadata field is covered by metadata_sha256: an edit (e.g. K=10 -> 100, which would
    change the proponents) is refused with the file named, whatever the field."""
    build(tmp_path / "s")
    path = tmp_path / "s" / METADATA
    meta = json.loads(path.read_text())
    meta[field] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(IntegrityError, match=f"{path}.*does not match its recorded metadata_sha256.*delete the folder"):
        FeatureStore.open(str(tmp_path / "s"))
    with pytest.raises(IntegrityError, match="metadata_sha256"):  # nor reused to resume a fill
        FeatureStore.create(str(tmp_path / "s"), IDENTITY, n=len(INPUTS), k=6, slice_size=5)


def test_edited_metadata_of_an_unfinished_store_is_refused(tmp_path):
    with pytest.raises(Cancelled):
        build(tmp_path / "s", stop_after=2)
    path = tmp_path / "s" / METADATA
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "slice_size": 3}))
    with pytest.raises(IntegrityError, match="metadata_sha256"):
        build(tmp_path / "s")


def test_metadata_checksum_ignores_formatting_only(tmp_path):
    """The checksum is over the canonical JSON of the fields: re-indenting the file is not an edit."""
    build(tmp_path / "s")
    path = tmp_path / "s" / METADATA
    path.write_text(json.dumps(json.loads(path.read_text()), indent=None))
    assert FeatureStore.open(str(tmp_path / "s")).complete


def test_damaged_done_mask_is_named(tmp_path):
    build(tmp_path / "s")
    done = tmp_path / "s" / DONE
    done.write_bytes(done.read_bytes()[:20])
    with pytest.raises(IntegrityError, match=f"{done} \\(done mask\\) cannot be read"):
        FeatureStore.open(str(tmp_path / "s"))
    np.save(done, np.zeros(len(INPUTS), dtype=bool))  # a complete store whose mask says otherwise
    with pytest.raises(IntegrityError, match=f"{done} \\(done mask\\) lacks 23 rows of a store marked complete"):
        FeatureStore.open(str(tmp_path / "s"))


def _as_format_1(path):
    """Rewrite a store's metadata as an older dtrak wrote it: format 1, no metadata checksum."""
    meta = json.loads((path / METADATA).read_text())
    del meta["metadata_sha256"]
    meta["format_version"] = 1
    (path / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def test_format_1_store_is_refused_until_migrated(tmp_path):
    build(tmp_path / "s")
    old = _as_format_1(tmp_path / "s")
    features = (tmp_path / "s" / FEATURES).read_bytes()
    with pytest.raises(IntegrityError, match=f"{tmp_path / 's' / METADATA} .*older dtrak.*no checksum.*"
                                             f"python -m dtrak_core migrate-stores {tmp_path / 's'}"):
        FeatureStore.open(str(tmp_path / "s"))
    assert migrate_store(str(tmp_path / "s")) is True
    store = FeatureStore.open(str(tmp_path / "s"))
    assert {k: v for k, v in store.metadata.items() if k not in ("metadata_sha256", "format_version")} == \
        {k: v for k, v in old.items() if k != "format_version"}
    assert (tmp_path / "s" / FEATURES).read_bytes() == features  # the features are never rewritten
    np.testing.assert_array_equal(store.features(), featurize(INPUTS))
    assert migrate_store(str(tmp_path / "s")) is False  # idempotent


def test_migration_verifies_the_features_first(tmp_path):
    build(tmp_path / "s")
    _as_format_1(tmp_path / "s")
    before = (tmp_path / "s" / METADATA).read_bytes()
    feats = np.load(tmp_path / "s" / FEATURES, mmap_mode="r+")
    feats[3, 2] += 1  # damage that a metadata checksum added now would otherwise bless
    feats.flush()
    del feats
    with pytest.raises(IntegrityError, match=f"{tmp_path / 's' / FEATURES} .*does not match its recorded sha256"):
        migrate_store(str(tmp_path / "s"))
    assert (tmp_path / "s" / METADATA).read_bytes() == before  # left untouched


def test_migrate_stores_command(tmp_path, capsys):
    for name in ("a", "b"):
        build(tmp_path / "root" / "stores" / name)
    _as_format_1(tmp_path / "root" / "stores" / "a")
    assert find_stores(str(tmp_path / "root")) == [str(tmp_path / "root" / "stores" / n) for n in ("a", "b")]
    assert cli.main(["migrate-stores", str(tmp_path / "root")]) == 0
    out = capsys.readouterr().out
    assert "stores/a: migrated (verified)" in out and "stores/b: already current (verified)" in out
    assert cli.main(["migrate-stores", str(tmp_path / "nothing")]) == 2
    assert "no feature store at or under" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [(None, "is missing"), (b"", "is empty"),
                                              (b'{"a": 1', "is not valid JSON"), (b"\xff\xfe{", "is not valid JSON"),
                                              (b"[1, 2]", "is not a JSON object")])
def test_read_json_names_the_file_and_the_fix(tmp_path, content, problem):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(IntegrityError, match=f"^{path} \\(test file\\) {problem}.*; rebuild it$") as e:
        read_json(str(path), "test file", "rebuild it")
    assert e.value.path == str(path) and isinstance(e.value, ValueError)
