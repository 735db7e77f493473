"""The model folder (folder.py): manifest.json's one reader and writer, where a folder is found, the
one fingerprint of a set of images and the one feature-store cache."""
import json
import os
import threading

import numpy as np
import pytest
import torch

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.store import FeatureStore, cached_store, compact_store
from dtrak_core.errors import IntegrityError
from dtrak_core.folder import MANIFEST, ModelFolder, default_root, read_manifest
from dtrak_core.model.data import Dataset, fingerprint
from dtrak_core.model.training import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets")
TINY = TrainConfig(steps=6, batch_size=16, block_out_channels=(4, 8))


def _write(root, manifest) -> str:
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path


@pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, MANIFEST)), reason="assets/ not built")
def test_the_committed_manifest_loads_and_round_trips_unchanged():
    with open(os.path.join(ASSETS, MANIFEST)) as f:
        committed = json.load(f)
    folder = ModelFolder.load(ASSETS)
    assert folder.to_dict() == committed and folder.extra == {}
    assert folder.train_config == TrainConfig(**{**committed["train_config"], "block_out_channels": (16, 32)})
    assert folder.torch_version == committed["torch"] and folder.threads == committed["threads"]
    assert folder.tuned_lambdas() == {slug: e["lambda"] for slug, e in committed["tuned_lambda"].items()}
    assert folder.is_digits_default and folder.trained_with(folder.train_config)
    assert read_manifest(ASSETS) == committed


@pytest.mark.parametrize("key, value", [("checkpoint", 3), ("dataset", ["digits"]), ("stores", "stores/x"),
                                        ("stores", [1]), ("train_config", {"steps": 1, "bogus": 2}),
                                        ("train_config", "recipe"), ("tuned_lambda", {"square": {"lambda": "big"}}),
                                        ("threads", 0), ("threads", True), ("featurize_seconds", {"stores/x": "1 s"}),
                                        ("tracin", {"index": 1})])
def test_a_field_of_the_wrong_type_is_named(tmp_path, key, value):
    good = {"checkpoint": "model", "dataset": "digits-train", "stores": []}
    path = _write(str(tmp_path), {**good, key: value})
    with pytest.raises(IntegrityError, match=f"^{path} \\(model manifest\\) has no valid '{key}' entry.*build-default") \
            as e:
        ModelFolder.load(str(tmp_path))
    assert e.value.path == path


def test_missing_and_partial_manifests(tmp_path):
    root = str(tmp_path / "none")
    with pytest.raises(ValueError, match="no manifest.json in .*build-default"):
        ModelFolder.load(root)
    assert ModelFolder.load(root, missing_ok=True) is None and read_manifest(root) == {}
    # a folder holding only a TracInCP registration (registered before any model was built)
    partial = str(tmp_path / "partial")
    _write(partial, {"tracin": "tracin/index.json"})
    folder = ModelFolder.load(partial)
    assert folder.tracin == "tracin/index.json" and folder.stores is None
    assert folder.to_dict() == {"tracin": "tracin/index.json"}
    with pytest.raises(IntegrityError, match="has no valid 'checkpoint' entry"):
        folder.require("tracin", "checkpoint")
    with pytest.raises(IntegrityError, match="has no valid 'checkpoint' entry"):
        folder.load_model()


def test_edit_keeps_what_it_does_not_change_and_saves_atomically(tmp_path):
    root = str(tmp_path)
    _write(root, {"checkpoint": "model", "dataset": "digits-train", "stores": ["stores/a"], "future_field": [1, 2],
                  "train_config": TINY.to_dict()})
    folder = ModelFolder.edit(root, tracin="tracin/index.json")
    saved = json.load(open(os.path.join(root, MANIFEST)))
    assert saved == {"checkpoint": "model", "dataset": "digits-train", "stores": ["stores/a"], "future_field": [1, 2],
                     "train_config": json.loads(json.dumps(TINY.to_dict())), "tracin": "tracin/index.json"}
    assert folder.to_dict() == saved and folder.trained_with(TINY)
    ModelFolder.edit(root, lambda f: f.add_store("stores/b", 2.0))
    ModelFolder.edit(root, lambda f: f.add_store("stores/b", 9.0))  # a rerun keeps the first full timing
    again = ModelFolder.load(root)
    assert again.stores == ["stores/a", "stores/b"] and again.featurize_seconds == {"stores/b": 2.0}
    assert not [f for f in os.listdir(root) if f.endswith(".tmp")]
    with pytest.raises(TypeError, match="no field 'tracin_index'"):
        ModelFolder.edit(root, tracin_index="x")


def test_concurrent_edits_lose_nothing(tmp_path):
    """Read-modify-writes of one manifest are serialised: every writer's store is registered."""
    root = str(tmp_path)
    _write(root, {"checkpoint": "model", "dataset": "digits-train", "stores": []})
    barrier = threading.Barrier(8)

    def register(i):
        barrier.wait()
        ModelFolder.edit(root, lambda f: f.add_store(f"stores/s{i}", float(i)))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ModelFolder.load(root).stores) == sorted(f"stores/s{i}" for i in range(8))


def test_the_default_root_is_the_environment_variable_else_assets(tmp_path, monkeypatch):
    monkeypatch.delenv("DTRAK_ASSETS", raising=False)
    assert default_root() == "assets"
    monkeypatch.setenv("DTRAK_ASSETS", str(tmp_path))
    assert default_root() == str(tmp_path)
    _write(str(tmp_path), {"checkpoint": "model", "dataset": "digits-train", "stores": []})
    assert ModelFolder.load().root == str(tmp_path)


def test_the_cli_finds_the_model_folder_from_any_working_directory(tmp_path, monkeypatch, one_thread):
    """As an installed package: no path relative to the working directory, DTRAK_ASSETS names the folder."""
    from dtrak_core.build import train_or_load
    from dtrak_core.cli import main

    root = str(tmp_path / "model folder")
    train_or_load(root, TINY, show_bar=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("DTRAK_ASSETS", root)
    assert main(["generate", "--seed", "3", "--steps", "2", "--out", "s.png"]) == 0
    assert (elsewhere / "s.png").is_file() and not (elsewhere / "assets").exists()


def test_one_fingerprint_for_every_set_of_images(digits):
    assert digits.fingerprint == fingerprint(digits.images, digits.labels)
    images = digits.images[:5]
    unlabelled = Dataset("test set", images.clone(), torch.full((5,), -1, dtype=torch.long))
    assert fingerprint(images) == unlabelled.fingerprint  # unknown labels are -1, as in a Dataset
    changed = images.clone()
    changed[2, 0, 3, 3] += 1e-3
    assert fingerprint(changed) != fingerprint(images)
    assert fingerprint(images[:4]) != fingerprint(images)


def test_the_store_cache_builds_once_then_verifies(tmp_path):
    setting = FeatureSetting("square", K=2, k=3)
    inputs = torch.arange(10, dtype=torch.float32).view(10, 1)
    identity = FeatureStore.identity(setting, "ckpt", fingerprint(inputs.view(10, 1, 1, 1)))
    made = []

    def make():
        made.append(1)
        return lambda x: np.repeat(x.numpy(), 3, axis=1)

    path = str(tmp_path / "store")
    assert cached_store(path, identity, inputs, make, 3, slice_size=4, build=False) is None  # absent: only looks
    store = cached_store(path, identity, inputs, make, 3, slice_size=4)
    assert store.complete and made == [1]
    np.testing.assert_array_equal(store.features(), np.repeat(inputs.numpy(), 3, axis=1))
    again = cached_store(path, identity, inputs, make, 3, slice_size=4, build=False)
    assert again is not None and made == [1]  # present: opened and verified, nothing recomputed
    assert cached_store(path, identity, inputs, make, 3, slice_size=4) is not None and made == [1]
    with pytest.raises(ValueError, match="was built for checkpoint='ckpt', not checkpoint='other'"):
        cached_store(path, {**identity, "checkpoint": "other"}, inputs, make, 3, slice_size=4)
    # an unfinished store is left as it is when only looking, and resumed when building
    half = str(tmp_path / "half")
    FeatureStore.create(half, identity, 10, 3, slice_size=4)
    assert cached_store(half, identity, inputs, make, 3, slice_size=4, build=False) is None
    assert cached_store(half, identity, inputs, make, 3, slice_size=4).complete and made == [1, 1]
    # a finished store compacted to float16 (as a model folder ships it) is read, not refused or rebuilt
    compact_store(half)
    small = cached_store(half, identity, inputs, make, 3, slice_size=4)
    assert small.metadata["dtype"] == "float16" and made == [1, 1]
    np.testing.assert_array_equal(np.asarray(small.features(), np.float32), np.repeat(inputs.numpy(), 3, axis=1))
    with pytest.raises(ValueError, match="has n=10, not 9"):
        cached_store(half, identity, inputs[:9], make, 3, slice_size=4)
    # damage is named, never trusted
    with open(os.path.join(path, "features.npy"), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x01")
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        cached_store(path, identity, inputs, make, 3, slice_size=4)


# -- the seals: what an answer depends on, besides the weights ------------------------------------
TUNED = {"square-K2": {"lambda": 0.05, "chosen_on": "validation LDS"},
         "d-trak-sharp/square-K2": {"lambda": 0.2, "chosen_on": "validation LDS"}}


def _sealed_folder(root) -> str:
    """A manifest saved by a writer (`save`): its recipe and tuned lambdas sealed."""
    ModelFolder(root, checkpoint="model", dataset="digits-train", stores=[], train_config=TINY,
                tuned_lambda=json.loads(json.dumps(TUNED))).save()
    return os.path.join(root, MANIFEST)


def _hand_edit(path, change):
    with open(path) as f:
        manifest = json.load(f)
    change(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_a_writer_seals_the_recipe_and_the_tuned_lambdas(tmp_path):
    path = _sealed_folder(str(tmp_path))
    saved = json.load(open(path))
    assert set(saved["settings_hash"]) == {"train_config", "tuned_lambda/square-K2", "tuned_lambda/d-trak-sharp/square-K2"}
    folder = ModelFolder.load(str(tmp_path))
    assert folder.tuned_lambdas() == {"square-K2": 0.05, "d-trak-sharp/square-K2": 0.2}
    assert folder.to_dict() == saved  # loads and round-trips unchanged


@pytest.mark.parametrize("change, entry, fix", [
    (lambda m: m["tuned_lambda"]["d-trak-sharp/square-K2"].update({"lambda": 50}),
     r"tuned_lambda\['d-trak-sharp/square-K2'\] hashes to \w+, not to its seal", "lds tune-lambda"),
    (lambda m: m["tuned_lambda"].update({"avg-K2": {"lambda": 1.0}}),
     r"tuned_lambda\['avg-K2'\] has no seal in 'settings_hash' \(it was added by hand\)", "lds tune-lambda"),
    (lambda m: m["tuned_lambda"].pop("square-K2"),
     r"tuned_lambda\['square-K2'\] is sealed in 'settings_hash' but missing", "lds tune-lambda"),
    (lambda m: m["train_config"].update({"steps": 1}), r"'train_config' hashes to \w+, not to its seal", "build-default"),
])
def test_a_hand_edited_setting_is_refused_naming_the_manifest_and_the_fix(tmp_path, change, entry, fix):
    root = str(tmp_path)
    path = _sealed_folder(root)
    _hand_edit(path, change)
    with pytest.raises(IntegrityError, match=f"^{path} \\(model manifest\\) entry {entry}.*`python -m dtrak_core "
                                             f"{fix} --root {root}`") as e:
        ModelFolder.load(root)
    assert e.value.path == path
    with pytest.raises(IntegrityError, match=entry):
        read_manifest(root)
    # a writer that does not change the edited entry keeps it refused (no laundering by the next save)
    ModelFolder.edit(root, lambda f: f.add_store("stores/b", 1.0))
    with pytest.raises(IntegrityError, match=entry):
        ModelFolder.load(root)


def test_the_tuned_lambdas_writer_reseals_them(tmp_path):
    root = str(tmp_path)
    path = _sealed_folder(root)
    _hand_edit(path, lambda m: m["tuned_lambda"]["square-K2"].update({"lambda": 50}))
    with pytest.raises(IntegrityError, match="lds tune-lambda"):
        ModelFolder.load(root)
    assert ModelFolder.load(root, tuned=False).train_config == TINY  # what tune-lambda reads: the rest still checked
    retuned = {"square-K2": {"lambda": 0.1, "chosen_on": "validation LDS"}}
    ModelFolder.edit(root, tuned_lambda=retuned)  # what `lds tune-lambda` does (evaluation/tuning.py)
    assert ModelFolder.load(root).tuned_lambdas() == {"square-K2": 0.1}
    assert set(json.load(open(path))["settings_hash"]) == {"train_config", "tuned_lambda/square-K2"}
    # a recipe edited by hand is not laundered by re-tuning
    _hand_edit(path, lambda m: m["train_config"].update({"steps": 1}))
    ModelFolder.edit(root, tuned_lambda=TUNED)
    with pytest.raises(IntegrityError, match="'train_config' hashes to"):
        ModelFolder.load(root)


def test_an_older_manifest_without_seals_still_loads_and_is_sealed_by_its_next_writer(tmp_path):
    root = str(tmp_path)
    path = _write(root, {"checkpoint": "model", "dataset": "digits-train", "stores": [], "train_config": TINY.to_dict(),
                         "tuned_lambda": {"square-K2": {"lambda": 7}}})
    assert ModelFolder.load(root).tuned_lambdas() == {"square-K2": 7}
    ModelFolder.edit(root, tracin="tracin/index.json")  # changes nothing sealed: no seal appears
    assert "settings_hash" not in json.load(open(path))
    ModelFolder.edit(root, tuned_lambda={"square-K2": {"lambda": 0.5}})
    assert set(json.load(open(path))["settings_hash"]) == {"train_config", "tuned_lambda/square-K2"}
    _hand_edit(path, lambda m: m["tuned_lambda"]["square-K2"].update({"lambda": 7}))
    with pytest.raises(IntegrityError, match="tune-lambda"):
        ModelFolder.load(root)


@pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, MANIFEST)), reason="assets/ not built")
def test_the_committed_manifest_is_sealed_and_a_hand_edited_lambda_is_refused(tmp_path):
    """The reported defect: avg-sharp's tuned lambda edited from 0.05 to 50 changed the default
    method's ranking with no warning."""
    from dtrak_core.model.unet import config_hashes

    committed = ModelFolder.load(ASSETS)
    assert committed.config_hash == config_hashes(os.path.join(ASSETS, "model"))
    assert committed.settings_hash == committed.sealed_entries() and "train_config" in committed.settings_hash
    key = "avg-sharp/avg-K100-sparse-jl-k2048-s42"
    path = _write(str(tmp_path), committed.to_dict())
    assert ModelFolder.load(str(tmp_path)).tuned_lambdas()[key] == 0.05
    _hand_edit(path, lambda m: m["tuned_lambda"][key].update({"lambda": 50}))
    with pytest.raises(IntegrityError, match=f"^{path} \\(model manifest\\) entry tuned_lambda\\['{key}'\\] hashes to "
                                             f".*re-run `python -m dtrak_core lds tune-lambda"):
        ModelFolder.load(str(tmp_path))
