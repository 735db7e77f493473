"""Retraining from scratch on subsets of the training set, as resumable, shardable jobs.

The LDS harness (M random half-subsets x training seeds) and the counterfactual harness (training
set minus a method's top proponents) both reduce to: many (subset, seed) retrains, each followed
by measuring something on the retrained model. `run_jobs` runs such a list:

- each job has a stable string id; its result is a small .npz (or .json) in `out_dir` written
  atomically when the job finishes, so a killed run loses at most the jobs in flight;
- jobs whose result file exists (and reads back whole) are skipped (resume); a damaged one stops
  the run with an error naming it, rather than being trusted or silently recomputed;
- `shard=(i, n)` runs only jobs i, i+n, i+2n, ... so processes or machines can split the work.

`train_many` trains several models at once (torch.func: the M models' parameters are stacked
and one vmapped forward/backward serves them all), each exactly as `training.train` would train
it alone: its own subset, seed-derived init, data order, timesteps and noise, grad-norm clipping
per model; AdamW is elementwise, so one AdamW over the stacked tensors is M independent AdamWs.
`run_job_groups` is `run_jobs` for such a batched worker.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from dtrak_core.errors import Cancelled
from dtrak_core.files import load_result, save_result
from dtrak_core.model.training import TrainConfig, batch_stream, train
from dtrak_core.model.unet import build_unet


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


def _check_keep(keep, n: int) -> np.ndarray:
    keep = np.asarray(keep)
    if keep.ndim != 1 or len(keep) == 0 or keep.min() < 0 or keep.max() >= n or not np.issubdtype(keep.dtype, np.integer):
        raise ValueError(f"keep must be a non-empty 1-D integer array of indices into the {n} training images")
    return keep


def train_many(train_images: torch.Tensor, keeps, seeds, scheduler, config: TrainConfig = TrainConfig(), *,
               should_stop: Callable[[], bool] | None = None, show_bar: bool = True) -> list:
    """M fresh models, model m trained with `config` (seed replaced by seeds[m]) on train_images[keeps[m]].

    Same result as `[retrain(train_images, k, scheduler, replace(config, seed=s)) for k, s in ...]`
    up to float32 rounding (the vmapped convolutions are grouped convolutions, summed in another
    order); returns the models in eval mode.
    """
    if len(keeps) != len(seeds) or not keeps:
        raise ValueError(f"need one seed per subset, got {len(keeps)} subsets and {len(seeds)} seeds")
    subsets = [train_images[torch.as_tensor(_check_keep(k, len(train_images)), dtype=torch.long)] for k in keeps]
    shape = train_images.shape[1:]
    unets = [build_unet(sample_size=shape[-1], channels=shape[0], block_out_channels=config.block_out_channels,
                        seed=int(s)) for s in seeds]
    params, buffers = stack_module_state(unets)  # name -> (M, ...) leaf tensors
    template = copy.deepcopy(unets[0]).to("meta")
    template.train()

    def forward(p, b, x, t):
        return functional_call(template, (p, b), (x, t), {"return_dict": False})[0]

    batched_forward = vmap(forward)
    names = list(params)
    opt = torch.optim.AdamW([params[n] for n in names], lr=config.lr, weight_decay=config.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(config.warmup_fraction * config.steps), config.steps)
    T = scheduler.config.num_train_timesteps
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    streams = [batch_stream(len(x), config.batch_size, g) for x, g in zip(subsets, gens)]
    M = len(subsets)
    for step in tqdm(range(config.steps), desc=f"train x{M}", disable=not show_bar, leave=False):
        if should_stop is not None and should_stop():
            raise Cancelled(f"training cancelled at step {step}/{config.steps}")
        # the same draws, in the same order, from each model's generator as `train` makes
        x0, t, noise = [], [], []
        for x, g, stream in zip(subsets, gens, streams):
            x0.append(x[next(stream)])
            t.append(torch.randint(0, T, (len(x0[-1]),), generator=g))
            noise.append(torch.randn(x0[-1].shape, generator=g))
        x0, t, noise = torch.stack(x0), torch.stack(t), torch.stack(noise)  # (M, B, C, H, W), (M, B), ...
        xt = scheduler.add_noise(x0.flatten(0, 1), noise.flatten(0, 1), t.flatten()).view_as(x0)  # as `train` noises
        pred = batched_forward(params, buffers, xt, t)
        losses = (pred - noise).pow(2).flatten(1).mean(1)  # (M,): each model's mse_loss
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # models share no parameters: each gets the gradient of its own loss
        grads = [params[n].grad for n in names]
        # clip_grad_norm_ per model: total norm over that model's parameters
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)  # (M,)
        coef = (config.grad_clip / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))
        opt.step()
        sched.step()
    out = []
    for m, unet in enumerate(unets):
        unet.load_state_dict({n: params[n][m].detach().clone() for n in names}, strict=False)
        unet.eval()
        out.append(unet)
    return out


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


def _pending(jobs: list[RetrainJob], out_dir: str, shard: tuple[int, int], checksums: bool = False) -> list[RetrainJob]:
    """This shard's jobs (i, i+n, ...) whose result file does not exist yet (checksums: a finished
    one must also match the checksum recorded for it, when its folder records checksums)."""
    os.makedirs(out_dir, exist_ok=True)
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("job ids must be unique")
    i, n = shard
    mine = [j for k, j in enumerate(jobs) if k % n == i]
    todo = []
    for j in mine:
        path = os.path.join(out_dir, f"{j.id}.npz")
        if os.path.exists(path):
            load_result(path)  # a finished job is skipped only if its result reads back whole
            if checksums:
                from dtrak_core.checksums import verify

                verify(path, "job result", "delete it and rerun the same command to recompute that job", required=False)
        else:
            todo.append(j)
    return todo


def run_jobs(jobs: list[RetrainJob], out_dir: str, work: Callable[[RetrainJob], dict], *,
             shard: tuple[int, int] = (0, 1), show_bar: bool = True, checksums: bool = False) -> list[str]:
    """Run `work(job) -> dict of arrays` for this shard's unfinished jobs; returns the ids run now.
    checksums: record each result's sha256 in out_dir/checksums.json as it is written (`checksums.record`:
    results that readers verify, such as the counterfactual's job files)."""
    todo = _pending(jobs, out_dir, shard, checksums)
    i, n = shard
    ran = []
    for job in tqdm(todo, desc=f"retrain {os.path.basename(out_dir)} shard {i}/{n}", disable=not show_bar):
        _save(out_dir, job, work(job), checksums)
        ran.append(job.id)
    return ran


def _save(out_dir: str, job: RetrainJob, result: dict, checksums: bool) -> None:
    save_result(os.path.join(out_dir, f"{job.id}.npz"), **result)
    if checksums:
        from dtrak_core.checksums import record

        record(out_dir, [f"{job.id}.npz"])


def run_job_groups(jobs: list[RetrainJob], out_dir: str, work_many: Callable[[list[RetrainJob]], list[dict]], *,
                   group_size: int = 1, shard: tuple[int, int] = (0, 1), show_bar: bool = True,
                   checksums: bool = False) -> list[str]:
    """`run_jobs` for a worker that handles several jobs at once (e.g. with `train_many`).

    This shard's unfinished jobs are taken `group_size` at a time, in list order; each group's
    results are written (atomically, one file per job) as soon as the group finishes.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    todo = _pending(jobs, out_dir, shard, checksums)
    i, n = shard
    groups = [todo[a:a + group_size] for a in range(0, len(todo), group_size)]
    ran = []
    for group in tqdm(groups, desc=f"retrain {os.path.basename(out_dir)} shard {i}/{n} x{group_size}",
                      disable=not show_bar):
        results = work_many(group)
        if len(results) != len(group):
            raise ValueError(f"work_many returned {len(results)} results for {len(group)} jobs")
        for job, result in zip(group, results):
            _save(out_dir, job, result, checksums)
            ran.append(job.id)
    return ran
