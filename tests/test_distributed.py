"""Several processes filling one feature store (torch.distributed): each rank its own slices, the
result bit-identical to one process, resumable per slice."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.store import DONE, FEATURES, FeatureStore
from dtrak_core.build import train_or_load
from dtrak_core.errors import Cancelled, IntegrityError
from dtrak_core.model.training import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDENTITY = FeatureStore.identity(FeatureSetting("square", K=4, k=32), checkpoint="c0ffee", dataset="d4t4")
INPUTS = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)


def featurize(x):
    x = np.asarray(x, dtype=np.float64)
    return np.concatenate([np.sin(x), np.cos(x)], axis=1).astype(np.float32)


def test_part_rows_cover_the_store_in_whole_slices(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s"), IDENTITY, n=23, k=6, slice_size=5)  # 5 slices
    assert [store.part_rows(r, 2) for r in range(2)] == [(0, 10), (10, 23)]
    assert [store.part_rows(r, 3) for r in range(3)] == [(0, 5), (5, 15), (15, 23)]
    assert [store.part_rows(r, 7) for r in range(7)][:2] == [(0, 0), (0, 5)]  # more ranks than slices
    for world in (1, 2, 3, 4, 5, 8):
        parts = [store.part_rows(r, world) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == 23 and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    with pytest.raises(ValueError, match="rank"):
        store.part_rows(2, 2)


def test_ranks_then_a_merge_equal_one_process_and_resume_per_slice(tmp_path):
    clean = FeatureStore.create(str(tmp_path / "clean"), IDENTITY, n=23, k=6, slice_size=5)
    clean.fill(featurize, INPUTS, show_bar=False)
    store = FeatureStore.create(str(tmp_path / "parts"), IDENTITY, n=23, k=6, slice_size=5)
    store.fill(featurize, INPUTS, show_bar=False, part=(1, 2))  # rank 1 finished ...
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(Cancelled):  # ... rank 0 was killed after one slice
        store.fill(featurize, INPUTS, show_bar=False, part=(0, 2), should_stop=stop)
    assert not store.complete and store.done.sum() == 0  # the ranks' rows are in their own files
    assert sorted(f for f in os.listdir(store.path) if f.startswith("done-rank")) == ["done-rank0.npy", "done-rank1.npy"]
    seen = []
    store.fill(lambda x: (seen.append(len(x)), featurize(x))[1], INPUTS, show_bar=False)  # one process resumes
    assert seen == [5]  # only rank 0's unfinished slice
    assert not any(f.startswith("done-rank") for f in os.listdir(store.path))
    reopened = FeatureStore.open(store.path)
    assert reopened.complete and reopened.done.all()
    assert reopened.features().tobytes() == clean.features().tobytes()
    assert reopened.metadata["features_sha256"] == clean.metadata["features_sha256"]


def test_a_damaged_rank_done_file_is_named(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s"), IDENTITY, n=23, k=6, slice_size=5)
    np.save(os.path.join(store.path, "done-rank1.npy"), np.ones(7, dtype=bool))
    with pytest.raises(IntegrityError, match="done-rank1.npy"):
        store.fill(featurize, INPUTS, show_bar=False)


TINY_TRAIN = TrainConfig(steps=6, batch_size=16, block_out_channels=(4, 8))
FEATURIZE = ["featurize", "--output-fn", "square", "--K", "4", "--k", "32"]
SLUG = "square-K4-sparse-jl-k32-s42"


def _run(args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def test_torchrun_two_processes_fill_the_store_bit_identical_to_one(tmp_path):
    single, ranks = str(tmp_path / "single"), str(tmp_path / "ranks")
    train_or_load(single, TINY_TRAIN, show_bar=False)
    shutil.copytree(single, ranks)
    _run(["-m", "dtrak_core", *FEATURIZE, "--root", single])
    out = _run(["-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
                "-m", "dtrak_core", *FEATURIZE, "--root", ranks])
    assert "rank 0/2 filled rows 0-767" in out and "rank 1/2 filled rows 768-1499" in out, out
    a, b = (FeatureStore.open(os.path.join(r, "stores", SLUG)) for r in (single, ranks))
    assert b.complete and b.metadata["features_sha256"] == a.metadata["features_sha256"]
    with open(os.path.join(a.path, FEATURES), "rb") as fa, open(os.path.join(b.path, FEATURES), "rb") as fb:
        assert fa.read() == fb.read()
    assert np.load(os.path.join(b.path, DONE)).all()
    assert sorted(os.listdir(b.path)) == sorted(os.listdir(a.path))  # no rank's done file left
    from dtrak_core.folder import ModelFolder

    assert os.path.join("stores", SLUG) in ModelFolder.load(ranks).stores
