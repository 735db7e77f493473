"""Retraining from scratch on subsets of the training set, as resumable, shardable jobs.

The LDS harness (M random half-subsets x training seeds) and the counterfactual harness (training
set minus a method's top proponents) both reduce to: many (subset, seed) retrains, each followed
by measuring something on the retrained model. `run_jobs` runs such a list:

- each job has a stable string id; its result is a small .npz (or .json) in `out_dir` written
  atomically when the job finishes, so a killed run loses at most the jobs in flight;
- jobs whose result file exists are skipped (resume);
- `shard=(i, n)` runs only jobs i, i+n, i+2n, ... so processes or machines can split the work.
"""
from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .training import TrainConfig, train


@dataclass(frozen=True)
class RetrainJob:
    id: str  # stable name, used as the result file name
    keep: np.ndarray = field(compare=False)  # training-set indices the model is trained on
    seed: int = 0  # training seed


def retrain(train_images: torch.Tensor, keep, scheduler, config: TrainConfig, **kwargs):
    """A fresh model trained with `config` on train_images[keep] only."""
    keep = np.asarray(keep)
    if keep.ndim != 1 or (len(keep) and (keep.min() < 0 or keep.max() >= len(train_images))):
        raise ValueError(f"keep must be a 1-D array of indices into the {len(train_images)} training images")
    return train(train_images[torch.as_tensor(keep, dtype=torch.long)], scheduler, config, **kwargs)


def save_result(path: str, **arrays) -> None:
    """Atomically write a .npz of the given arrays."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def load_result(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n; None -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"shard index must satisfy 0 <= i < n, got {text!r}")
    return i, n


def run_jobs(jobs: list[RetrainJob], out_dir: str, work: Callable[[RetrainJob], dict], *,
             shard: tuple[int, int] = (0, 1), show_bar: bool = True) -> list[str]:
    """Run `work(job) -> dict of arrays` for this shard's unfinished jobs; returns the ids run now."""
    os.makedirs(out_dir, exist_ok=True)
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("job ids must be unique")
    i, n = shard
    mine = [j for k, j in enumerate(jobs) if k % n == i]
    todo = [j for j in mine if not os.path.exists(os.path.join(out_dir, f"{j.id}.npz"))]
    ran = []
    for job in tqdm(todo, desc=f"retrain {os.path.basename(out_dir)} shard {i}/{n}", disable=not show_bar):
        save_result(os.path.join(out_dir, f"{job.id}.npz"), **work(job))
        ran.append(job.id)
    return ran
