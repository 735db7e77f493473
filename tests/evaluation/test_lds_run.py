"""The LDS run (evaluation/lds_run.py) on tiny models: subsets and jobs, the ground truth, resume
after a kill, shards, batched training, compact job results; and its evaluation end to end
(evaluation/lds_evaluation.py) down to the published ground truth."""
import os

import numpy as np
import pytest
import torch

from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.attribution.scoring import TRAKScorer
from dtrak_core.evaluation.lds import PAPER_LAMBDA_GRID, lds, load_ground_truth
from dtrak_core.evaluation.lds_evaluation import evaluate
from dtrak_core.evaluation.lds_run import (
    TIMESTEP_STRIDES,
    LDSConfig,
    LDSRun,
    collect,
    compact_losses,
    eps_losses,
    eval_timesteps,
    full_timestep_check,
    job_F,
    lds_jobs,
    noise_chunks,
    subset_indices,
    subset_masks,
)
from dtrak_core.model.training import TrainConfig
from dtrak_core.model.unet import build_unet

TINY = TrainConfig(steps=6, batch_size=16, block_out_channels=(4, 8))

pytestmark = pytest.mark.usefixtures("one_thread")


def test_subsets_are_fixed_half_subsets():
    a = subset_indices(100, 3, 0.5, seed=0)
    assert len(a) == 50 and len(np.unique(a)) == 50 and np.array_equal(a, subset_indices(100, 3, 0.5, seed=0))
    masks = subset_masks(100, 5)
    assert masks.sum(1).tolist() == [50] * 5 and np.array_equal(masks[3], np.isin(np.arange(100), a))
    assert np.array_equal(subset_masks(100, 8)[:5], masks)  # growing M keeps the first subsets
    jobs = lds_jobs(100, LDSConfig(num_subsets=2, train_seeds=(1, 2)))
    assert [j.id for j in jobs] == ["m000-s1", "m000-s2", "m001-s1", "m001-s2"]


def test_eval_timesteps_and_eps_losses(tiny_unet, scheduler):
    assert eval_timesteps(10).tolist() == list(range(50, 1000, 100))
    assert eval_timesteps(1000).tolist() == list(range(1000))
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    ts = eval_timesteps(4)
    got = eps_losses(tiny_unet, scheduler, images, ts, (7,), chunk=5)
    # direct: one (timestep, image) at a time, noise laid out as (T, Q, C, H, W) from seed 7
    noise = torch.randn((4 * 3, 1, 8, 8), generator=torch.Generator().manual_seed(7)).view(4, 3, 1, 8, 8)
    abar = scheduler.alphas_cumprod.float()
    for ti, t in enumerate(ts):
        for q in range(3):
            xt = abar[t].sqrt() * images[q] + (1 - abar[t]).sqrt() * noise[ti, q]
            with torch.no_grad():
                pred = tiny_unet(xt[None], t[None]).sample[0]
            assert got[0, ti, q] == pytest.approx(float(((pred - noise[ti, q]) ** 2).mean()), rel=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 3, 3)])
def test_noise_in_chunks_is_one_draw(shape):
    """The ground truth's noise drawn chunk by chunk (memory bounded at any T x Q) is the one draw of
    the published protocol, bit for bit."""
    whole = torch.randn((23, *shape), generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat(list(noise_chunks(5, 23, shape, 4))), whole)


def _tiny_run(tmp_path, digits, scheduler, name="run", num_subsets=4):
    config = LDSConfig(num_subsets=num_subsets, train_seeds=(1, 2), eval_timesteps=10, noise_seeds=(0, 1), generated=4)
    test_sets = {"validation": digits.images[-6:], "generated": torch.rand(4, 1, 8, 8) * 2 - 1}
    return LDSRun(str(tmp_path / name), digits.images[:40], scheduler, TINY, config, test_sets, {"checkpoint": "tiny"})


def test_tiny_end_to_end(tmp_path, digits, scheduler):
    run = _tiny_run(tmp_path, digits, scheduler)
    assert len(run.run(show_bar=False)) == 8
    assert run.run(show_bar=False) == []  # everything done: nothing reruns
    col = collect(run.out_dir)
    assert col["masks"].shape == (4, 40) and col["F"]["validation"].shape == (4, 6)
    assert col["F_seeds"]["generated"].shape == (2, 4, 4)
    assert os.path.isdir(os.path.join(run.out_dir, "models", "m003-s2"))
    unet = build_unet(block_out_channels=(4, 8), seed=0).eval()
    setting = FeatureSetting("square", K=10, k=32)
    feats = Featurizer(unet, scheduler, setting)(digits.images[:40]).numpy()
    assert len(full_timestep_check(run.out_dir, scheduler, max_subsets=3, show_bar=False)) == 6
    dest = str(tmp_path / "bench")
    res = evaluate(run.out_dir, unet, scheduler, {"d-trak": setting}, {"d-trak": feats}, dest=dest,
                   num_bootstrap=20, show_bar=False)
    r = res["methods"]["d-trak"]["validation"]
    assert res["subsets_done"] == 4 and not res["partial"]
    assert len(r["lds_by_lambda"]) == len(PAPER_LAMBDA_GRID) == 27
    for key in ("paper", "honest", "default"):
        assert -100 <= r[key]["lds"] <= 100 and r[key]["pm"] >= 0
    assert r["paper"]["lds"] == pytest.approx(max(r["lds_by_lambda"]))
    assert "validation" in res["noise_ceiling"] and "10" in res["timestep_check"]["validation"]
    check = res["timestep_check"]["generated"]["all_1000_vs_run"]
    assert check["subsets"] == 3 and check["difference"] == pytest.approx(check["all_1000"]["lds"] - check["run"]["lds"])
    gt = load_ground_truth(os.path.join(dest, "lds_ground_truth.npz"))
    np.testing.assert_array_equal(gt["masks"], col["masks"])
    np.testing.assert_allclose(gt["F"]["validation"], col["F"]["validation"], rtol=1e-6)
    # anyone can recompute a method's LDS from the stored masks and F alone
    q = Featurizer(unet, scheduler, setting)(digits.images[-6:]).numpy()
    assert lds(TRAKScorer().fit(feats).scores(q), gt["masks"], gt["F"]["validation"], 20)[0] == pytest.approx(r["default"]["lds"], abs=1e-4)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, digits, scheduler):
    whole = _tiny_run(tmp_path, digits, scheduler, "whole", num_subsets=2)
    whole.run(show_bar=False)
    killed = _tiny_run(tmp_path, digits, scheduler, "killed", num_subsets=2)
    real_work, calls = killed._work, []

    def dies_on_third(job):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        calls.append(job.id)
        return real_work(job)

    killed._work = dies_on_third
    with pytest.raises(KeyboardInterrupt):
        killed.run(show_bar=False)
    assert sorted(os.listdir(killed.jobs_dir)) == ["m000-s1.npz", "m000-s2.npz"]
    resumed = _tiny_run(tmp_path, digits, scheduler, "killed", num_subsets=2)
    assert resumed.run(show_bar=False) == ["m001-s1", "m001-s2"]
    a, b = collect(whole.out_dir), collect(resumed.out_dir)
    np.testing.assert_array_equal(a["F_seeds"]["validation"], b["F_seeds"]["validation"])


def test_resume_refuses_a_different_setup(tmp_path, digits, scheduler):
    run = _tiny_run(tmp_path, digits, scheduler, num_subsets=2)
    run.prepare()
    other = LDSRun(run.out_dir, run.train_images, scheduler, TINY,
                   LDSConfig(num_subsets=2, train_seeds=(1, 2), eval_timesteps=20, noise_seeds=(0, 1), generated=4),
                   run.test_sets, run.identity)
    with pytest.raises(ValueError, match="lds_config"):
        other.prepare()
    grown = LDSRun(run.out_dir, run.train_images, scheduler, TINY,
                   LDSConfig(num_subsets=5, train_seeds=(1, 2), eval_timesteps=10, noise_seeds=(0, 1), generated=4),
                   run.test_sets, run.identity)
    grown.prepare()  # more subsets is fine: the first ones are unchanged


def test_shards_split_the_jobs(tmp_path, digits, scheduler):
    run = _tiny_run(tmp_path, digits, scheduler, num_subsets=2)
    run._work = lambda job: {"x": np.zeros(1)}
    assert run.run(shard=(1, 2), show_bar=False) == ["m000-s2", "m001-s2"]
    assert run.run(shard=(0, 2), show_bar=False) == ["m000-s1", "m001-s1"]


def test_batched_run_matches_sequential_run(tmp_path, digits, scheduler):
    seq = _tiny_run(tmp_path, digits, scheduler, "seq", num_subsets=1)
    seq.run(show_bar=False)
    bat = _tiny_run(tmp_path, digits, scheduler, "bat", num_subsets=1)
    assert bat.run(batch_models=2, show_bar=False) == ["m000-s1", "m000-s2"]
    a, b = collect(seq.out_dir), collect(bat.out_dir)
    np.testing.assert_allclose(b["F_seeds"]["validation"], a["F_seeds"]["validation"], rtol=1e-4)


def test_compact_job_results_equal_full_losses():
    losses = np.random.default_rng(0).random((3, 100, 7))
    compact = compact_losses("validation", losses)
    assert compact["F_validation"].shape == (len(TIMESTEP_STRIDES), 7)
    full = {"loss_validation": losses}
    for stride in TIMESTEP_STRIDES:
        np.testing.assert_allclose(job_F(compact, "validation", stride), job_F(full, "validation", stride))
        np.testing.assert_allclose(job_F(compact, "validation", stride), losses[:, ::stride].mean(axis=(0, 1)))
    with pytest.raises(ValueError, match="timestep_stride"):
        job_F(compact, "validation", 3)
