"""The Fashion-MNIST folder's data stage on tiny IDX files made here: the subset written from the
IDX files (deterministic, stratified), the quality classifier's data disjoint from it; the noise
ceiling's pairing and the retrain stages' one-job shards."""
import json
import os

import numpy as np
import pytest

from dtrak_core import fashion
from dtrak_core.model.data import load_image_folder
from dtrak_core.setting import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, load_setting, write_data
from tests.model.test_idx import write_idx


@pytest.fixture
def source(tmp_path):
    """A tiny Fashion-MNIST: 6 training and 3 test images per class, each image's pixels encoding
    (split, class, position) so a test can tell which image went where."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for split, per in (("train", 6), ("test", 3)):
        labels = np.repeat(np.arange(10), per)[np.random.default_rng(1).permutation(10 * per)]
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(len(labels))
        images[:, 0, 1] = labels
        images[:, 0, 2] = split == "train"
        images[:, 5:20, 8:20] = 200
        write_idx(folder / FASHION_MNIST_FILES[split][0], images)
        write_idx(folder / FASHION_MNIST_FILES[split][1], labels)
    return str(folder)


@pytest.fixture
def setting(tmp_path):
    raw = json.loads(open(load_setting(fashion.PRESET).path).read())
    raw["data"].update(train_per_class=2, validation_per_class=1)
    path = tmp_path / "tiny-fashion.json"
    path.write_text(json.dumps(raw))
    return load_setting(str(path))


def test_data_stage_writes_a_stratified_deterministic_subset(tmp_path, source, setting):
    done = write_data(setting, source, str(tmp_path / "data"))
    assert done["counts"]["train/ankle-boot"] == 2 and done["counts"]["validation/tshirt-top"] == 1
    train = load_image_folder(str(tmp_path / "data" / "train"), 28, 1)
    assert len(train) == 20 and np.bincount(train.labels.numpy()).tolist() == [2] * 10
    # the folder's labels are the sorted class names; each image is one of that class
    encoded = np.rint((train.images[:, 0, 0, 1].numpy() + 1) * 127.5).astype(int)
    assert [FASHION_MNIST_CLASSES[c] for c in encoded] == [sorted(FASHION_MNIST_CLASSES)[y] for y in train.labels]
    again = write_data(setting, source, str(tmp_path / "again"))
    assert again["counts"] == done["counts"]
    assert load_image_folder(str(tmp_path / "again" / "train"), 28, 1).fingerprint == train.fingerprint


def test_classifier_data_is_disjoint_from_the_subset(tmp_path, source, setting):
    write_data(setting, source, str(tmp_path / "data"))
    (x, y), (xt, yt) = fashion.classifier_data(setting, source)
    assert len(x) == 60 - 20 and len(xt) == 30 - 10
    position = lambda images: set(np.rint((images[:, 0, 0, 0].numpy() + 1) * 127.5).astype(int).tolist())  # noqa: E731
    subset = load_image_folder(str(tmp_path / "data" / "train"), 28, 1).images
    held_out = load_image_folder(str(tmp_path / "data" / "validation"), 28, 1).images
    assert not position(x) & position(subset) and not position(xt) & position(held_out)
    # the classifier's labels use the data folder's order, as the model folder's training set does
    encoded = np.rint((x[:, 0, 0, 1].numpy() + 1) * 127.5).astype(int)
    assert [FASHION_MNIST_CLASSES[c] for c in encoded] == [sorted(FASHION_MNIST_CLASSES)[i] for i in y]


def test_a_damaged_idx_file_is_named(tmp_path, source, setting):
    path = os.path.join(source, FASHION_MNIST_FILES["train"][1])
    with open(path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(ValueError, match=FASHION_MNIST_FILES["train"][1]):
        write_data(setting, source, str(tmp_path / "data"))
    assert not os.path.exists(tmp_path / "data")


def test_noise_ceiling_pairs_the_two_runs_by_subset(monkeypatch):
    """The ceiling run retrains the LDS run's first subsets with another seed; the two are paired by
    the subsets' content, whatever order each run finished them in."""
    from dtrak_core.evaluation import lds_run

    rng = np.random.default_rng(0)
    masks = rng.random((6, 20)) < 0.5
    F = rng.normal(size=(6, 5))
    runs = {
        os.path.join("R", "lds"): {"masks": masks, "F": {"validation": F},
                                   "setup": {"lds_config": {"train_seeds": [1]}}},
        # the second seed: subsets 3, 0, 1, 2 (out of order), its F the first seed's plus a little noise
        os.path.join("R", "lds-ceiling"): {"masks": masks[[3, 0, 1, 2]],
                                           "F": {"validation": F[[3, 0, 1, 2]] + 0.01 * rng.normal(size=(4, 5))}},
    }
    monkeypatch.setattr(lds_run, "collect", lambda path: runs[path])
    result = fashion.noise_ceiling("R", num_bootstrap=0)["validation"]
    assert result["subsets"] == 4 and result["seed_vs_seed"] > 95
    # the LDS is against one seed, so the ceiling is sqrt(r), not the two-seed mean's
    assert result["target_seeds"] == 1 and result["ceiling"] == pytest.approx(10 * np.sqrt(result["seed_vs_seed"]))
    runs[os.path.join("R", "lds-ceiling")] = {"masks": masks[:2], "F": {"validation": F[:2]}}
    with pytest.raises(ValueError, match="only 2 subsets"):
        fashion.noise_ceiling("R")


def test_each_retrain_is_exactly_its_job_when_jobs_are_appended_meanwhile(tmp_path, monkeypatch):
    """A shard trains its jobs one at a time as shards of exactly one job; when another process
    appends jobs to the list meanwhile (a ranking added to the plan), each call still selects
    exactly the job it means, and the shard does not take on the appended ones."""
    from dtrak_core import setting as st
    from dtrak_core.files import atomic_write_json

    run = tmp_path / "counterfactual"
    (run / "jobs").mkdir(parents=True)
    path = str(run / "removals.json")
    atomic_write_json(path, {"jobs": [{"id": f"j{i}"} for i in range(4)]})
    (run / "jobs" / "j2.npz").write_bytes(b"measured before")
    trained = []

    def retrain(setting, data, jobs_path, ckpts, shard, show_bar):
        jobs = json.load(open(jobs_path))["jobs"]
        i, n = shard
        trained.append([j["id"] for j in jobs[i::n]])
        if len(trained) == 1:  # another process extends the plan while this one trains
            atomic_write_json(jobs_path, {"jobs": jobs + [{"id": f"j{i}"} for i in range(4, 9)]})

    monkeypatch.setattr(st, "retrain", retrain)
    measured = []
    fashion.train_and_measure(None, "data", path, str(tmp_path / "ckpts"), (0, 1), measured.append)
    assert trained == [["j0"], ["j1"], ["j3"]]
    assert measured == [(0, 4), (1, 9), (3, 9)]
