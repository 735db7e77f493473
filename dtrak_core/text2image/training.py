"""Training the text-to-image miniature: the VAE, the base model, and LoRA fine-tuning.

The recipe shape is the default's (AdamW, cosine learning rate with warm-up, gradient clipping 1.0,
epsilon-MSE at uniformly drawn timesteps) applied as Stable Diffusion's training scripts do:
latents are a fresh sample of the VAE posterior each step (times the scaling factor), noised with
`scheduler.add_noise`, and the UNet attends to the text encoder's hidden states for the caption.

- `train_vae`: the autoencoder alone (reconstruction MSE + a small KL term).
- `pretrain`: UNet and text encoder together, captions dropped to "" with probability
  `caption_dropout` so that the model also learns the unconditional prediction (classifier-free
  guidance at sampling).
- `finetune_lora`: LoRA adapters on the frozen base UNet (VAE and text encoder frozen too), the
  published ArtBench setting; `keep` trains on a subset (LDS and counterfactual retrains).

Everything random (init, data order, timesteps, noise, posterior samples, caption dropout) comes
from the config's `seed`, so the same call gives the same weights at a fixed thread count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from dtrak_core.errors import Cancelled
from dtrak_core.model.training import batch_stream
from dtrak_core.text2image.lora import LoraSetting, add_lora
from dtrak_core.text2image.pipeline import build_conditional_unet, build_text_encoder, build_vae
from dtrak_core.text2image.tokenizer import tokenize


@dataclass(frozen=True)
class VAEConfig:
    steps: int = 800  # optimiser steps
    batch_size: int = 128
    lr: float = 2e-3
    kl_weight: float = 1e-4  # weight of KL(posterior || N(0, I)) against the per-pixel MSE; keeps latents near N(0, 1)
    seed: int = 0
    block_out_channels: tuple = (16, 32)  # two levels: 8x8 images -> 4x4 latents
    latent_channels: int = 4  # as Stable Diffusion's VAE

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BaseConfig:
    steps: int = 1500  # optimiser steps of the base (pretrained) model
    batch_size: int = 128
    lr: float = 2e-3
    warmup_fraction: float = 0.1
    weight_decay: float = 1e-6
    grad_clip: float = 1.0
    caption_dropout: float = 0.1  # share of captions replaced by "" (the unconditional prompt)
    seed: int = 0
    block_out_channels: tuple = (16, 32)  # UNet width per level, cross-attention at every level
    attention_head_dim: int = 8
    text_hidden_size: int = 32  # text encoder width = the UNet's cross_attention_dim
    text_layers: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoraTrainConfig:
    steps: int = 300  # optimiser steps (26 epochs of the 747 fine-tuning digits at batch 64)
    batch_size: int = 64  # published: 64
    lr: float = 1e-2  # published: 3e-4 for Stable Diffusion; 3e-3 here left the digits 5-9 ignoring their prompts
    warmup_fraction: float = 0.1
    weight_decay: float = 1e-6  # as published
    grad_clip: float = 1.0
    seed: int = 0  # LoRA init, data order, timesteps, noise, posterior samples
    rank: int = 4
    alpha: float = 4.0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def lora(self) -> LoraSetting:
        return LoraSetting(rank=self.rank, alpha=self.alpha)


def _run(params, loss_fn: Callable[[int], torch.Tensor], steps: int, lr: float, warmup_fraction: float,
         weight_decay: float, grad_clip: float, *, desc: str, show_bar: bool, progress=None, should_stop=None,
         checkpoint_steps=(), on_checkpoint=None) -> None:
    """The optimisation loop shared by every stage: `loss_fn(step)` draws its own batch."""
    params = list(params)
    checkpoint_steps = {int(s) for s in checkpoint_steps}
    if any(not 1 <= s <= steps for s in checkpoint_steps):
        raise ValueError(f"checkpoint_steps must lie in 1..{steps}, got {sorted(checkpoint_steps)}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, int(warmup_fraction * steps), steps)
    bar = tqdm(range(steps), desc=desc, disable=not show_bar, leave=False)
    for step in bar:
        if should_stop is not None and should_stop():
            raise Cancelled(f"training cancelled at step {step}/{steps}")
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step + 1, steps, loss.item())
        if on_checkpoint is not None and step + 1 in checkpoint_steps:
            on_checkpoint(step + 1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")


def train_vae(images: torch.Tensor, config: VAEConfig = VAEConfig(), show_bar: bool = True):
    """An AutoencoderKL trained on `images` (N, C, H, W) in [-1, 1], its `scaling_factor` set to one
    over the standard deviation of the training latents (Stable Diffusion's 0.18215 is that number
    for its VAE), so that scaled latents have unit variance like the diffusion noise."""
    if len(images) == 0:
        raise ValueError("cannot train on an empty dataset")
    vae = build_vae(channels=images.shape[1], sample_size=images.shape[-1],
                    block_out_channels=config.block_out_channels, latent_channels=config.latent_channels,
                    seed=config.seed)
    vae.train()
    gen = torch.Generator().manual_seed(config.seed)
    batches = batch_stream(len(images), config.batch_size, gen)

    def loss_fn(step):
        x = images[next(batches)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        return F.mse_loss(recon, x) + config.kl_weight * posterior.kl().mean() / x[0].numel()

    _run(vae.parameters(), loss_fn, config.steps, config.lr, 0.1, 0.0, 1.0, desc="train vae", show_bar=show_bar)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 512]).latent_dist.mode() for i in range(0, len(images), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@dataclass(frozen=True, eq=False)
class LatentInputs:
    """What the diffusion stages train on, computed once: the VAE posterior of every image and the
    text encoder's hidden states for every caption (the encoder frozen)."""
    mean: torch.Tensor  # (N, c, h, w) posterior mean
    std: torch.Tensor  # (N, c, h, w) posterior standard deviation
    contexts: torch.Tensor | None  # (N, L, D) hidden states of the captions, None when the encoder is trained
    scaling_factor: float

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scaled posterior samples for rows `idx`, as `latent_dist.sample() * scaling_factor`."""
        eps = torch.randn(self.mean[idx].shape, generator=gen)
        return (self.mean[idx] + self.std[idx] * eps) * self.scaling_factor


@torch.no_grad()
def latent_inputs(vae, images: torch.Tensor, contexts: torch.Tensor | None = None) -> LatentInputs:
    means, stds = [], []
    for i in range(0, len(images), 512):
        posterior = vae.encode(images[i:i + 512].float()).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return LatentInputs(torch.cat(means), torch.cat(stds), contexts, float(vae.config.scaling_factor))


def _noised(latents, scheduler, gen):
    T = scheduler.config.num_train_timesteps
    t = torch.randint(0, T, (len(latents),), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    return scheduler.add_noise(latents, noise, t), noise, t


def pretrain(images: torch.Tensor, captions, vae, tokenizer, scheduler, config: BaseConfig = BaseConfig(),
             show_bar: bool = True):
    """A fresh UNet2DConditionModel and CLIPTextModel trained together on (images, captions);
    returns (unet, text_encoder) in eval mode."""
    captions = list(captions)
    if len(images) == 0 or len(captions) != len(images):
        raise ValueError(f"need a non-empty image set with one caption each, got {len(images)} images, "
                         f"{len(captions)} captions")
    inputs = latent_inputs(vae, images)
    c, h, _ = inputs.mean.shape[1:]
    unet = build_conditional_unet(sample_size=h, latent_channels=c, block_out_channels=config.block_out_channels,
                                  cross_attention_dim=config.text_hidden_size,
                                  attention_head_dim=config.attention_head_dim, seed=config.seed)
    text_encoder = build_text_encoder(len(tokenizer.get_vocab()), tokenizer.model_max_length,
                                      hidden_size=config.text_hidden_size, layers=config.text_layers,
                                      seed=config.seed)
    # Word embeddings fixed at random unit-variance codes instead of trained: words the base model
    # never saw (the fine-tuning digits) then still get distinct hidden states, as CLIP's text
    # encoder knows words Stable Diffusion's UNet never drew. Trained, an unseen word would keep its
    # near-zero initialisation and every unseen prompt would encode alike.
    words = text_encoder.get_input_embeddings()
    with torch.no_grad():
        words.weight.copy_(torch.randn(words.weight.shape, generator=torch.Generator().manual_seed(config.seed)))
    words.weight.requires_grad_(False)
    unet.train()
    text_encoder.train()
    ids = tokenize(tokenizer, captions)
    empty = tokenize(tokenizer, [""])[0]
    gen = torch.Generator().manual_seed(config.seed)
    batches = batch_stream(len(images), config.batch_size, gen)

    def loss_fn(step):
        idx = next(batches)
        drop = torch.rand(len(idx), generator=gen) < config.caption_dropout
        tokens = torch.where(drop[:, None], empty, ids[idx])
        latents = inputs.sample(idx, gen)
        noisy, noise, t = _noised(latents, scheduler, gen)
        pred = unet(noisy, t, text_encoder(tokens)[0], return_dict=False)[0]
        return F.mse_loss(pred, noise)

    _run(list(unet.parameters()) + [p for p in text_encoder.parameters() if p.requires_grad], loss_fn, config.steps, config.lr,
         config.warmup_fraction, config.weight_decay, config.grad_clip, desc="pretrain", show_bar=show_bar)
    return unet.eval(), text_encoder.eval()


def finetune_lora(base_unet, scheduler, inputs: LatentInputs, config: LoraTrainConfig = LoraTrainConfig(), *,
                  keep=None, show_bar: bool = True, progress=None, should_stop=None, checkpoint_steps=(),
                  on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None):
    """A copy of `base_unet` with LoRA adapters trained on inputs[keep] (all rows when None); the base
    weights untouched. `on_checkpoint(step, unet)` after each step in `checkpoint_steps` (TracInCP).
    Returns the adapted UNet in eval mode."""
    if inputs.contexts is None:
        raise ValueError("LoRA fine-tuning needs the captions' hidden states (a frozen text encoder)")
    n = len(inputs)
    keep = np.arange(n) if keep is None else np.asarray(keep)
    if keep.ndim != 1 or len(keep) == 0 or not np.issubdtype(keep.dtype, np.integer) or keep.min() < 0 or keep.max() >= n:
        raise ValueError(f"keep must be a non-empty 1-D integer array of indices into the {n} fine-tuning images")
    keep = torch.as_tensor(keep, dtype=torch.long)
    unet = add_lora(base_unet, config.lora, seed=config.seed)
    unet.train()
    gen = torch.Generator().manual_seed(config.seed)
    batches = batch_stream(len(keep), config.batch_size, gen)

    def loss_fn(step):
        idx = keep[next(batches)]
        latents = inputs.sample(idx, gen)
        noisy, noise, t = _noised(latents, scheduler, gen)
        pred = unet(noisy, t, inputs.contexts[idx], return_dict=False)[0]
        return F.mse_loss(pred, noise)

    def checkpoint(step):
        unet.eval()
        on_checkpoint(step, unet)
        unet.train()

    _run([p for p in unet.parameters() if p.requires_grad], loss_fn, config.steps, config.lr, config.warmup_fraction,
         config.weight_decay, config.grad_clip, desc="fine-tune lora", show_bar=show_bar, progress=progress,
         should_stop=should_stop, checkpoint_steps=checkpoint_steps,
         on_checkpoint=checkpoint if on_checkpoint is not None else None)
    return unet.eval()
