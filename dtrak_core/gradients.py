"""Per-sample gradient features of an output function, averaged over timesteps.

For a sample x: for each of K timesteps t in range(0, T, T // K), with noise eps_t drawn from a
generator seeded by t (the same eps_t for every sample), x_t = sqrt(abar_t) x + sqrt(1 - abar_t)
eps_t; the feature is grad_theta mean_t f(eps_theta(x_t, t), eps_t, t) over all trainable
parameters, flattened in `named_parameters` order.

Exact per-sample gradients come from torch.func: vmap over samples of grad of a function that
runs the model on that sample's K noisy copies as one batch, so the K timesteps share one
forward/backward and the mean over timesteps is formed inside autograd.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from .output_functions import elbo_weights, get_output_function


def timesteps_for(K: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    if K < 1 or num_train_timesteps % K:
        raise ValueError(f"K must divide {num_train_timesteps}, got {K}")
    return torch.arange(0, num_train_timesteps, num_train_timesteps // K)


def timestep_noise(timesteps: torch.Tensor, sample_shape) -> torch.Tensor:
    """(K, *sample_shape) noise, row k seeded by timesteps[k]."""
    return torch.stack([torch.randn(tuple(sample_shape), generator=torch.Generator().manual_seed(int(t)))
                        for t in timesteps])


def trainable_params(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}


def num_features(unet) -> int:
    return sum(p.numel() for p in trainable_params(unet).values())


class GradientFeaturizer:
    """Full (unprojected) per-sample gradients (B, d) of one output function over K timesteps."""

    def __init__(self, unet, scheduler, output_fn: str, K: int, timestep_chunk: int = 100):
        self.unet = unet.eval()
        self.output_fn_name = output_fn
        self.f = get_output_function(output_fn)
        self.K = K
        self.timesteps = timesteps_for(K, scheduler.config.num_train_timesteps)
        abar = scheduler.alphas_cumprod.float()[self.timesteps]
        self.sqrt_ab = abar.sqrt().view(-1, 1, 1, 1)
        self.sqrt_1mab = (1 - abar).sqrt().view(-1, 1, 1, 1)
        self.weights = elbo_weights(scheduler)[self.timesteps]
        cfg = unet.config
        self.noise = timestep_noise(self.timesteps, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
        self.params = trainable_params(unet)
        self.dim = sum(p.numel() for p in self.params.values())
        self.timestep_chunk = timestep_chunk

    def _objective(self, params, x, sl: slice):
        """Sum over timesteps in `sl` of f for one sample x (C, H, W)."""
        eps = self.noise[sl]
        xt = self.sqrt_ab[sl] * x + self.sqrt_1mab[sl] * eps  # (k, C, H, W)
        pred = functional_call(self.unet, params, (xt, self.timesteps[sl]), {"return_dict": False})[0]
        return self.f(pred, eps, self.weights[sl]).sum()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> per-sample gradients (B, d), float32."""
        out = torch.zeros(len(images), self.dim)
        for start in range(0, self.K, self.timestep_chunk):
            sl = slice(start, min(start + self.timestep_chunk, self.K))
            g = vmap(grad(self._objective), in_dims=(None, 0, None))(self.params, images, sl)
            out += torch.cat([v.reshape(len(images), -1) for v in g.values()], dim=1)
        return out / self.K
