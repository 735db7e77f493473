"""MadryLab `trak` (PyPI `traker` 0.3.2) set up for our diffusion model, for side-by-side runs.

traker has no diffusion output function; `DiffusionLossOutput` implements its
`AbstractModelOutput` interface for TRAK's eps-MSE 'loss' output function with our protocol
(K timesteps t in range(0, 1000, 1000 // K), noise seeded by t, the gradient averaged over the K
timesteps), so TRAKer computes the same per-sample gradient as `GradientFeaturizer(..., 'loss', K)`:

- `get_output(model, weights, buffers, image)` is f for ONE sample (TRAKer vmaps it over the
  batch and takes torch.func.grad w.r.t. the weights). With `timesteps_in_batch=True` (default)
  the K noisy copies go through the model as one batch of K, the fastest form TRAKer allows;
  with False it loops over the K timesteps, one model call each, which mirrors the structure of
  the published D-TRAK code (vmap over samples of a per-(sample, timestep) f, a Python loop over t).
- `get_out_to_loss_grad` is 1 for every sample: the output function is the loss itself, so
  TRAK's Q term is the identity (as in D-TRAK, which has no Q term).

On a CPU, TRAKer picks `BasicProjector` (dense Gaussian, regenerated block by block, 100 columns
per block, on every call); we run it in float32 (`use_half_precision=False`): its float16 default
is slower on a CPU and loses precision in X^T X.
"""
from __future__ import annotations

import logging

import torch
from torch.func import functional_call

from dtrak_core.attribution.gradients import timestep_noise, timesteps_for


def _trak():
    try:
        import trak  # noqa: F401
    except ImportError as e:
        raise SystemExit("this benchmark compares against MadryLab's trak: pip install traker==0.3.2 --no-deps") from e
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput

    return TRAKer, AbstractModelOutput


def make_output(scheduler, sample_shape, K: int, timesteps_in_batch: bool = True):
    _, AbstractModelOutput = _trak()

    class DiffusionLossOutput(AbstractModelOutput):
        def __init__(self):
            super().__init__()
            self.timesteps = timesteps_for(K, scheduler.config.num_train_timesteps)
            abar = scheduler.alphas_cumprod.float()[self.timesteps]
            self.sqrt_ab = abar.sqrt().view(-1, 1, 1, 1)
            self.sqrt_1mab = (1 - abar).sqrt().view(-1, 1, 1, 1)
            self.noise = timestep_noise(self.timesteps, sample_shape)  # (K, C, H, W)

        def get_output(self, model, weights, buffers, image):
            xt = self.sqrt_ab * image + self.sqrt_1mab * self.noise  # (K, C, H, W)
            if timesteps_in_batch:
                pred = functional_call(model, (weights, buffers), (xt, self.timesteps), {"return_dict": False})[0]
                return (pred - self.noise).pow(2).flatten(1).mean(1).mean()
            total = 0.0
            for j in range(K):
                pred = functional_call(model, (weights, buffers), (xt[j:j + 1], self.timesteps[j:j + 1]),
                                       {"return_dict": False})[0]
                total = total + (pred - self.noise[j:j + 1]).pow(2).mean()
            return total / K

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(len(batch[0]), 1)

    return DiffusionLossOutput()


def make_traker(unet, scheduler, n_train: int, k: int, K: int, save_dir: str, timesteps_in_batch: bool = True,
                seed: int = 42):
    TRAKer, _ = _trak()
    cfg = unet.config
    task = make_output(scheduler, (cfg.in_channels, cfg.sample_size, cfg.sample_size), K, timesteps_in_batch)
    traker = TRAKer(model=unet, task=task, train_set_size=n_train, save_dir=save_dir, device="cpu", proj_dim=k,
                    use_half_precision=False, projector_seed=seed, logging_level=logging.WARNING)
    return traker


def trak_featurize_batch(traker, batch) -> None:
    """Featurize one batch of training images into TRAKer's store (call load_checkpoint first)."""
    traker.featurize(batch=(batch,), num_samples=len(batch))


def trak_finish_scores(traker, unet, query_images, batch_size: int, relative_lambda: float = 0.1):
    """After all training batches are featurized: finalize and score `query_images` -> scores (Q, N).

    lambda is set like ours: `relative_lambda` x the mean squared norm of TRAKer's own projected
    training gradients (TRAKer's default lambda_reg=0 makes X^T X singular when k > N).
    """
    grads = torch.as_tensor(traker.saver.current_store["grads"]).double()
    traker.score_computer.lambda_reg = float(relative_lambda * grads.pow(2).sum(1).mean())
    traker.finalize_features()
    traker.start_scoring_checkpoint("bench", unet.state_dict(), model_id=0, num_targets=len(query_images))
    for i in range(0, len(query_images), batch_size):
        batch = query_images[i:i + batch_size]
        traker.score(batch=(batch,), num_samples=len(batch))
    scores = traker.finalize_scores("bench")  # (N, Q)
    return torch.as_tensor(scores).T.numpy().copy()
