"""Sampling: DDIM (default, 50 steps, eta 0) or ancestral DDPM, one seed per image.

Each image's starting noise (and DDPM's per-step noise) comes from its own generator seeded by
the image's seed, so a seed gives the same image whatever else is in the batch.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

SAMPLERS = ("ddim", "ddpm")


@torch.no_grad()
def generate(unet, scheduler, seeds, *, steps: int = 50, sampler: str = "ddim", eta: float = 0.0,
             show_bar: bool = False, progress=None) -> torch.Tensor:
    """Images (len(seeds), C, H, W) in [-1, 1]."""
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seeds given")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if not 1 <= steps <= scheduler.config.num_train_timesteps:
        raise ValueError(f"steps must be in 1..{scheduler.config.num_train_timesteps}, got {steps}")
    cfg = unet.config
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g) for g in gens])
    if sampler == "ddim":
        sched = DDIMScheduler.from_config(scheduler.config)
    else:
        sched = DDPMScheduler.from_config(scheduler.config)
    sched.set_timesteps(steps)
    unet.eval()
    timesteps = sched.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="sample", disable=not show_bar, leave=False)):
        eps = unet(x, t, return_dict=False)[0]
        if sampler == "ddim":
            x = sched.step(eps, t, x, eta=eta, generator=gens, return_dict=False)[0]
        else:
            x = sched.step(eps, t, x, generator=gens, return_dict=False)[0]
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x.clamp(-1, 1)
