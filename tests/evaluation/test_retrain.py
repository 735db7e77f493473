import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from dtrak_core.evaluation.retrain import (
    RetrainJob,
    load_result,
    parse_shard,
    retrain,
    run_job_groups,
    run_jobs,
    save_result,
    train_many,
)
from dtrak_core.model.training import TrainConfig

TINY = TrainConfig(steps=12, batch_size=16, block_out_channels=(4, 8))


pytestmark = pytest.mark.usefixtures("one_thread")


def _probe():
    g = torch.Generator().manual_seed(123)
    return torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 1000, (32,), generator=g)


def test_train_many_matches_sequential_training(digits, scheduler):
    """Two models trained at once equal two `retrain` calls on the same subsets and seeds.

    Compared on outputs: the vmapped convolutions are grouped convolutions that sum in another
    order, so results differ by float32 rounding (~1e-6 measured). Weights are not compared
    element-wise: biases right before a GroupNorm with one channel per group have an exactly-zero
    true gradient, so Adam turns their rounding noise into O(lr) steps that change nothing downstream.
    """
    rng = np.random.default_rng(0)
    keeps = [np.sort(rng.choice(200, 100, replace=False)) for _ in range(2)]
    seeds = [3, 5]
    images = digits.images[:200]
    batched = train_many(images, keeps, seeds, scheduler, TINY, show_bar=False)
    x, t = _probe()
    outs = []
    for keep, seed, b in zip(keeps, seeds, batched):
        ref = retrain(images, keep, scheduler, replace(TINY, seed=seed), show_bar=False)
        with torch.no_grad():
            want, got = ref(x, t).sample, b(x, t).sample
        # 1e-4 is ~100x the rounding seen, and far below the change training makes (checked next)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        outs.append(want)
    assert (outs[0] - outs[1]).abs().max() > 1e-2  # the two models really are different


def test_train_many_sees_only_its_subset(digits, scheduler):
    images = digits.images[:60].clone()
    keeps = [np.arange(0, 20), np.arange(20, 45)]  # subsets of different sizes
    poisoned = images.clone()
    poisoned[45:] = float("nan")  # any model touching an image outside its subset gets NaN weights
    models = train_many(poisoned, keeps, [0, 1], scheduler, TINY, show_bar=False)
    for m in models:
        assert all(torch.isfinite(p).all() for p in m.parameters())
    # and each model really is trained on its own subset: poison subset 0 -> only model 0 breaks
    poisoned = images.clone()
    poisoned[:20] = float("nan")
    m0, m1 = train_many(poisoned, keeps, [0, 1], scheduler, TINY, show_bar=False)
    assert not all(torch.isfinite(p).all() for p in m0.parameters())
    assert all(torch.isfinite(p).all() for p in m1.parameters())


def test_train_many_validates(digits, scheduler):
    with pytest.raises(ValueError, match="one seed per subset"):
        train_many(digits.images[:10], [np.arange(5)], [0, 1], scheduler, TINY)
    with pytest.raises(ValueError, match="keep"):
        train_many(digits.images[:10], [np.arange(5, 12)], [0], scheduler, TINY)


def test_run_job_groups_resumes_and_shards(tmp_path):
    jobs = [RetrainJob(f"j{i}", np.arange(i + 1), i) for i in range(5)]
    groups = []

    def work_many(group):
        groups.append([j.id for j in group])
        return [{"n": np.array(len(j.keep))} for j in group]

    out = str(tmp_path)
    assert run_job_groups(jobs, out, work_many, group_size=2, shard=(0, 2), show_bar=False) == ["j0", "j2", "j4"]
    assert groups == [["j0", "j2"], ["j4"]]
    assert run_job_groups(jobs, out, work_many, group_size=2, show_bar=False) == ["j1", "j3"]
    assert run_jobs(jobs, out, lambda j: {}, show_bar=False) == []
    assert load_result(os.path.join(out, "j3.npz"))["n"] == 4
    with pytest.raises(ValueError, match="group_size"):
        run_job_groups(jobs, out, work_many, group_size=0)


def test_parse_shard_and_save_result(tmp_path):
    assert parse_shard(None) == (0, 1) and parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1-2"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    path = str(tmp_path / "r.npz")
    save_result(path, a=np.arange(3))
    assert load_result(path)["a"].tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["r.npz"]  # no temporary file left behind

    # a damaged result (cut short by a disk fault, a bad copy) is named, with what to do
    data = open(path, "rb").read()
    for damaged in (data[: len(data) // 2], b"", b"version https://git-lfs.github.com/spec/v1\n"):
        with open(path, "wb") as f:
            f.write(damaged)
        with pytest.raises(ValueError, match="r.npz is not a readable result file.*delete it"):
            load_result(path)
