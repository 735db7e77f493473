"""Training a diffusion model from scratch with the published recipe shape.

AdamW, cosine learning-rate schedule with warm-up, gradient clipping 1.0, batch 128, epsilon-MSE
loss at uniformly drawn timesteps. Everything random (init, data order, timesteps, noise) comes
from `seed`, so the same call gives the same weights.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from dtrak_core.devices import autocast, check_precision, resolve_device
from dtrak_core.errors import Cancelled
from dtrak_core.model.unet import build_unet


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1500  # optimiser steps: 128 epochs of 1,500 digits (published: 200 epochs); more steps barely helped
    batch_size: int = 128  # as published
    lr: float = 2e-3  # tuned for the 160K-parameter default (published: 1e-4 for 36M parameters)
    warmup_fraction: float = 0.1  # share of steps with linear warm-up, as published
    weight_decay: float = 1e-6  # diffusers' example default
    grad_clip: float = 1.0  # as published
    seed: int = 0  # init, data order, timesteps and noise
    block_out_channels: tuple = (16, 32)  # UNet width per level: 160K parameters; (32, 64) = 634K was only 4 points better

    def to_dict(self) -> dict:
        return asdict(self)


def batch_stream(n: int, batch_size: int, generator: torch.Generator):
    """Endless batches of indices: a fresh permutation per epoch, batches may span epochs."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=generator)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def train(images: torch.Tensor, scheduler, config: TrainConfig = TrainConfig(), *,
          progress: Callable[[int, int, float], None] | None = None,
          should_stop: Callable[[], bool] | None = None, show_bar: bool = True,
          checkpoint_steps=(), on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
          device="cpu", precision: str = "fp32", unet_config: dict | None = None):
    """Train a fresh UNet on `images` (N, C, H, W) in [-1, 1]; returns it in eval mode, on the CPU.

    `progress(step, steps, loss)` is called every step; `should_stop()` returning True raises
    `Cancelled`. `on_checkpoint(step, unet)` is called after each optimiser step listed in
    `checkpoint_steps` (1..steps) with the live model (for saving intermediate checkpoints,
    e.g. TracInCP); it must not modify the model. It does not change the training trajectory.
    device, precision: where it trains and the forward pass's autocast policy (`devices`; fp16 scales
    the loss); the random numbers are drawn on the CPU either way, so a seed means the same batches,
    timesteps and noise on every device. unet_config: the architecture, a diffusers UNet2DModel
    config (e.g. a setting's, `dtrak_core.setting`); None: `build_unet` at config.block_out_channels.
    """
    dev = resolve_device(device)
    check_precision(precision, dev)
    if len(images) == 0:
        raise ValueError("cannot train on an empty dataset")
    checkpoint_steps = set(int(s) for s in checkpoint_steps)
    if any(not 1 <= s <= config.steps for s in checkpoint_steps):
        raise ValueError(f"checkpoint_steps must lie in 1..{config.steps}, got {sorted(checkpoint_steps)}")
    if unet_config is None:
        unet = build_unet(sample_size=images.shape[-1], channels=images.shape[1],
                          block_out_channels=config.block_out_channels, seed=config.seed)
    else:
        from diffusers import UNet2DModel

        torch.manual_seed(config.seed)  # the init, from the seed as build_unet does
        unet = UNet2DModel.from_config(unet_config)
        if (unet.config.in_channels, unet.config.sample_size) != (images.shape[1], images.shape[-1]):
            raise ValueError(f"the UNet config takes {unet.config.in_channels}x{unet.config.sample_size}px images, "
                             f"the training images are {images.shape[1]}x{images.shape[-1]}px")
    unet.to(dev).train()
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(config.warmup_fraction * config.steps), config.steps)
    T = scheduler.config.num_train_timesteps
    batches = batch_stream(len(images), config.batch_size, gen)
    bar = tqdm(range(config.steps), desc="train", disable=not show_bar, leave=False)
    for step in bar:
        if should_stop is not None and should_stop():
            raise Cancelled(f"training cancelled at step {step}/{config.steps}")
        x0 = images[next(batches)]
        t = torch.randint(0, T, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, t, noise = x0.to(dev), t.to(dev), noise.to(dev)
        xt = scheduler.add_noise(x0, noise, t)
        with autocast(dev, precision):
            pred = unet(xt, t, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
            opt.step()
        else:  # fp16: scaled loss, gradients unscaled before clipping, steps with inf/nan skipped
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
            scaler.step(opt)
            scaler.update()
        sched.step()
        if progress is not None:
            progress(step + 1, config.steps, loss.item())
        if on_checkpoint is not None and step + 1 in checkpoint_steps:
            on_checkpoint(step + 1, unet)
            unet.train()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return unet.cpu()
