"""Sampling: DDIM (default, 50 steps, eta 0) or ancestral DDPM, one seed per image.

Each image's starting noise (and DDPM's per-step noise) comes from its own generator seeded by
the image's seed, so a seed gives the same image whatever else is in the batch.

`generate` is the one denoising loop: `on_step` sees every step's output, which is how
Journey-TRAK reads the predicted clean image along a sample's own trajectory.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from dtrak_core.devices import autocast, check_precision, resolve_device

SAMPLERS = ("ddim", "ddpm")


@torch.no_grad()
def generate(unet, scheduler, seeds, *, steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
             show_bar: bool = False, progress: Callable[[int, int], None] | None = None,
             on_step: Callable | None = None, device="cpu", precision: str = "fp32") -> torch.Tensor:
    """Images (len(seeds), C, H, W) in [-1, 1], one per seed (on the CPU).

    steps: denoising steps (1..num_train_timesteps). sampler: 'ddim' or 'ddpm'. eta: DDIM's noise
    scale (0: deterministic). progress(i, steps) is called after step i (1-based).
    on_step(i, t, out) is called after step i (0-based) at timestep t (a 0-dim int tensor) with the
    scheduler's output: `out.prev_sample` (B, C, H, W) is the next sample and
    `out.pred_original_sample` (B, C, H, W) this step's prediction of the clean image (clipped to
    [-1, 1] when the scheduler's config says `clip_sample`). It must not modify them.
    device, precision: where the model runs and its autocast policy (`devices`); the seeds' noise is
    drawn on the CPU either way, and the scheduler steps in float32.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if not 1 <= steps <= scheduler.config.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{scheduler.config.num_train_timesteps}, got {steps}")
    dev = resolve_device(device)
    check_precision(precision, dev)
    if next(unet.parameters()).device != dev:  # a copy: the caller's model stays where it is
        unet = copy.deepcopy(unet).to(dev)
    cfg = unet.config
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g) for g in gens]).to(dev)
    if sampler == "ddim":
        sched = DDIMScheduler.from_config(scheduler.config)
    else:
        sched = DDPMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    unet.eval()
    timesteps = sched.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="sample", disable=not show_bar, leave=False)):
        with autocast(dev, precision):
            eps = unet(x, t, return_dict=False)[0].float()  # (B, C, H, W) predicted noise
        if sampler == "ddim":
            out = sched.step(eps, t, x, eta=eta, generator=gens)
        else:
            out = sched.step(eps, t, x, generator=gens)
        x = out.prev_sample
        if on_step is not None:
            on_step(i, t, out)
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x.clamp(-1, 1).cpu()
