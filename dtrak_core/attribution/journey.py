"""Journey-TRAK's query features: loss gradients averaged along a generated sample's own DDIM run.

Journey-TRAK (Georgiev et al. 2023) attributes a generated sample through the trajectory that
made it, not through the final image alone. It needs the sample's generation seed (generated
samples only) and is scored by TRAK against the `loss` store, with that store's projector.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from dtrak_core.attribution.gradients import timestep_noise, trainable_params
from dtrak_core.model.sampling import generate
from dtrak_core.shared import ModelReplicas

JOURNEY_STEPS = 50  # DDIM steps, as `sampling.generate` uses by default


class JourneyFeaturizer:
    """Generation seeds -> projected loss gradients (B, k) averaged along each sample's DDIM trajectory.

    At each DDIM step i (timestep t_i) of the sampler's run for a seed, the predicted clean image
    x0_i (as the sampler computes it, clipped to [-1, 1]) is re-noised at t_i with the noise that
    the training features use at t_i (seeded by t_i): x_i = sqrt(abar_ti) x0_i + sqrt(1 - abar_ti) eps_ti.
    The feature is P^T grad_theta mean_i mean((eps_theta(x_i, t_i) - eps_ti)^2), with the projector
    of the TRAK store it is scored against.

    Thread-safe: the sampling is a read-only forward of `unet`; the gradients swap parameters
    (`functional_call`), so they run on a private replica (`shared.ModelReplicas`).
    """

    def __init__(self, unet, scheduler, projector, steps: int = JOURNEY_STEPS, batch_size: int = 16):
        self.unet, self.scheduler, self.projector = unet.eval(), scheduler, projector
        self.replicas = ModelReplicas(self.unet)
        self.steps, self.batch_size = steps, batch_size

    @torch.no_grad()
    def trajectory(self, seeds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final images (B, C, H, W), x0 predictions (B, S, C, H, W), timesteps (S,)): `generate`'s
        DDIM run for these seeds, read step by step."""
        x0s, timesteps = [], []

        def record(i, t, out):
            x0s.append(out.pred_original_sample)
            timesteps.append(t)

        final = generate(self.unet, self.scheduler, seeds, steps=self.steps, sampler="ddim", eta=0.0, on_step=record)
        return final, torch.stack(x0s, 1), torch.stack(timesteps)

    def gradients(self, x0s: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 predictions (B, S, C, H, W) at timesteps (S,) -> mean loss gradients (B, d)."""
        noise = timestep_noise(timesteps, x0s.shape[2:])  # (S, C, H, W)
        params = trainable_params(self.unet)

        with self.replicas.borrow() as unet:
            def objective(p, x0):  # x0 (S, C, H, W): one sample's trajectory
                xt = self.scheduler.add_noise(x0, noise, timesteps)
                pred = functional_call(unet, p, (xt, timesteps), {"return_dict": False})[0]
                return (pred - noise).flatten(1).pow(2).mean(1).mean()

            g = vmap(grad(objective), in_dims=(None, 0))(params, x0s)
        return torch.cat([v.reshape(len(x0s), -1) for v in g.values()], dim=1)

    def __call__(self, seeds, images: torch.Tensor | None = None, atol: float = 1e-2) -> torch.Tensor:
        """(B, k) features; with `images`, first check that they are these seeds' samples."""
        seeds = [int(s) for s in seeds]
        if images is not None and len(images) != len(seeds):
            raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
        out = []
        for i in range(0, len(seeds), self.batch_size):
            final, x0s, ts = self.trajectory(seeds[i:i + self.batch_size])
            if images is not None and (final - images[i:i + self.batch_size]).abs().max() > atol:
                raise ValueError(f"journey-trak: the images are not the DDIM-{self.steps} samples of seeds "
                                 f"{seeds[i:i + self.batch_size]}")
            out.append(self.projector.project(self.gradients(x0s, ts)))
        return torch.cat(out)
