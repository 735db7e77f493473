"""SIGKILL mid-run, then restart: the resumable writers (feature store fill, retrain job runner)
end exactly where an uninterrupted run ends, and nothing half-written is trusted.

The kill point is deterministic: the child is killed once its output shows some, not all, of the
work finished (done.npy with rows filled; a first job result on disk), i.e. while it is writing.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dtrak_core import cli
from dtrak_core.attribution.store import DONE, FEATURES, METADATA, FeatureStore
from dtrak_core.build import train_or_load
from dtrak_core.errors import IntegrityError
from dtrak_core.evaluation.retrain import RetrainJob, run_jobs
from dtrak_core.model.training import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAIN = TrainConfig(steps=6, batch_size=16, block_out_channels=(4, 8))
# K=20: ~0.5 s per 256-row slice on one thread, so a poll every 10 ms sees the fill in progress
FEATURIZE = ["featurize", "--output-fn", "square", "--K", "20", "--k", "32"]
SLUG = "square-K20-sparse-jl-k32-s42"
N_TRAIN = 1500


def _env():
    # one thread in every child: the same kernels (so bit-identical results) and no oversubscription
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it finished first (nothing was interrupted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run finished (exit {proc.returncode}) before it could be killed mid-way\n{out}\n{err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the run never reached the kill point")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny model folder (checkpoint + manifest, no stores), as build-default starts one."""
    root = str(tmp_path_factory.mktemp("kill") / "model_folder")
    train_or_load(root, TINY_TRAIN, show_bar=False)
    return root


def _rows_done(store_dir: str) -> int:
    try:
        return int(np.load(os.path.join(store_dir, DONE)).sum())
    except (FileNotFoundError, ValueError, EOFError):  # not created yet
        return 0


def test_featurize_killed_mid_fill_resumes_bit_identical(model_folder, tmp_path, one_thread):
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    shutil.copytree(model_folder, killed)
    shutil.copytree(model_folder, clean)
    store_dir = os.path.join(killed, "stores", SLUG)
    proc = _start(["-m", "dtrak_core", *FEATURIZE, "--root", killed])
    _kill_when(proc, lambda: 0 < _rows_done(store_dir) < N_TRAIN)

    partial = FeatureStore.open(store_dir)  # what the kill left verifies, and is not taken as finished
    assert not partial.complete and 0 < partial.done.sum() < N_TRAIN and partial.done.sum() % 256 == 0
    with pytest.raises(ValueError, match="incomplete"):
        partial.features()

    _finish(_start(["-m", "dtrak_core", *FEATURIZE, "--root", killed]))
    assert cli.main([*FEATURIZE, "--root", clean]) == 0  # the uninterrupted run, here on one thread too
    resumed = FeatureStore.open(store_dir)  # verifies metadata_sha256 and features_sha256
    reference = FeatureStore.open(os.path.join(clean, "stores", SLUG))
    assert resumed.complete and resumed.metadata == reference.metadata
    for name in (FEATURES, DONE, METADATA):
        with open(os.path.join(store_dir, name), "rb") as a, open(os.path.join(reference.path, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not [f for f in os.listdir(store_dir) if f.endswith(".tmp")]


# A retrain job runner, as the LDS and counterfactual harnesses use it: 4 jobs of ~0.5 s each.
RETRAIN_SCRIPT = r'''
import sys
from dataclasses import replace

import numpy as np
import torch

from dtrak_core.model.data import load_digits
from dtrak_core.model.unet import build_scheduler
from dtrak_core.evaluation.retrain import RetrainJob, retrain, run_jobs
from dtrak_core.model.training import TrainConfig

images = load_digits("train").images[:64]
scheduler = build_scheduler()
config = TrainConfig(steps=60, batch_size=16, block_out_channels=(4, 8))
jobs = [RetrainJob(f"job{j}", np.arange(64)[j % 2::2] if j < 2 else np.arange(64), seed=j) for j in range(4)]


def work(job):
    unet = retrain(images, job.keep, scheduler, replace(config, seed=job.seed), show_bar=False)
    return {"params": torch.cat([p.detach().flatten() for p in unet.parameters()]).numpy()}


run_jobs(jobs, sys.argv[1], work, show_bar=False)
'''


def _results(out_dir: str) -> list[str]:
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".npz")) if os.path.isdir(out_dir) else []


def _run_script_here(script, out_dir: str) -> None:
    argv = sys.argv
    sys.argv = [str(script), out_dir]
    try:
        exec(compile(script.read_text(), str(script), "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = argv


def test_retrain_runner_killed_mid_job_resumes_to_the_same_results(tmp_path, one_thread):
    script = tmp_path / "runner.py"
    script.write_text(RETRAIN_SCRIPT)
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    proc = _start([str(script), killed])
    _kill_when(proc, lambda: 0 < len(_results(killed)) < 4)  # killed while training the next job

    finished = _results(killed)
    assert 0 < len(finished) < 4
    for name in finished:  # every result on disk is whole (written atomically)
        np.load(os.path.join(killed, name))["params"]
    # a result damaged after the kill is named on restart, not trusted as done nor silently redone
    damaged = str(tmp_path / "damaged")
    shutil.copytree(killed, damaged)
    victim = os.path.join(damaged, finished[0])
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(IntegrityError, match=f"{victim} is not a readable result file.*delete it and rerun"):
        run_jobs([RetrainJob(f"job{j}", np.arange(64)) for j in range(4)], damaged,
                 lambda job: pytest.fail("ran a job before checking the results"), show_bar=False)

    _finish(_start([str(script), killed]))
    _run_script_here(script, clean)  # the uninterrupted run, here on one thread too
    assert _results(killed) == _results(clean) == [f"job{j}.npz" for j in range(4)]
    for name in _results(clean):
        np.testing.assert_array_equal(np.load(os.path.join(killed, name))["params"],
                                      np.load(os.path.join(clean, name))["params"], strict=True)
