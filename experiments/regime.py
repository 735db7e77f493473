"""Is a model in the kernel regime? How close its denoiser is to its training set's empirical
optimal denoiser, and how close its samples are to their nearest training image.

Where a diffusion model has learned the optimal denoiser of its finite training set, its output is
a similarity-weighted average of training images, and "which images made it" coincides with
"which images look like it": a pixel kernel is then as good an attribution as any gradient method.
Two measures, per model folder:

- **denoiser gap** at timestep t: E ||D_model(x_t) - D_opt(x_t)||^2 / E ||x - x_bar||^2 over
  noised validation images x (x_t = sqrt(abar) x + sqrt(1 - abar) eps), D the predicted clean
  image, x_bar the training mean: 0 when the model is the optimal denoiser, 1 when the two differ
  as much as an image differs from the mean image; beside it the same for the model's own error
  E ||D_model(x_t) - x||^2 / E ||x - x_bar||^2 (how well it denoises unseen images);
- **copy ratio**: the median distance of generated samples to their nearest training image over
  the median distance of validation images to theirs: well below 1 for a model that reproduces its
  training images, about 1 for one whose samples are as new as unseen real images.

    python experiments/regime.py                       # the digits (assets/)
    python experiments/regime.py --root assets/fashion
"""
from __future__ import annotations

from common import ROOT, machine_line  # first: before torch

# isort: split
import argparse
import math
import os

import numpy as np
import torch

from dtrak_core.folder import ModelFolder
from dtrak_core.model.sampling import generate

TIMESTEPS = (50, 150, 300, 500, 700, 900)


def validation_images(root: str, folder: ModelFolder) -> torch.Tensor:
    if folder.dataset == "digits-train":
        from dtrak_core.model.data import load_digits

        return load_digits("validation").images
    from dtrak_core.model.data import load_image_folder

    spec = folder.dataset
    data = spec["folder"] if os.path.isabs(spec["folder"]) else os.path.join(root, spec["folder"])
    return load_image_folder(os.path.join(os.path.dirname(data), "validation"), int(spec["resolution"]),
                             int(spec.get("channels", 1))).images


@torch.no_grad()
def denoiser_gap(unet, scheduler, train: torch.Tensor, queries: torch.Tensor, t: int, seed: int = 0) -> dict:
    a = float(scheduler.alphas_cumprod[t])
    noise = torch.randn(queries.shape, generator=torch.Generator().manual_seed(seed))
    xt = math.sqrt(a) * queries + math.sqrt(1 - a) * noise
    eps = unet(xt, torch.full((len(xt),), t), return_dict=False)[0]
    model = (xt - math.sqrt(1 - a) * eps) / math.sqrt(a)
    x, q = train.flatten(1).double(), xt.flatten(1).double()
    d2 = q.pow(2).sum(1)[:, None] + a * x.pow(2).sum(1)[None] - 2 * math.sqrt(a) * q @ x.T
    w = torch.softmax(-d2 / (2 * (1 - a)), dim=1)
    optimal = (w @ x).float()
    scale = (queries.flatten(1) - train.flatten(1).mean(0)).pow(2).sum(1).mean()
    gap = (model.flatten(1) - optimal).pow(2).sum(1).mean() / scale
    error = (model.flatten(1) - queries.flatten(1)).pow(2).sum(1).mean() / scale
    optimal_error = (optimal - queries.flatten(1)).pow(2).sum(1).mean() / scale
    return {"t": t, "gap": float(gap), "error": float(error), "optimal_error": float(optimal_error),
            "top_weight": float(w.max(1).values.median())}


def nearest_distance(images: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    return torch.cdist(images.flatten(1).double(), train.flatten(1).double()).min(1).values.numpy()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=os.path.join(ROOT, "assets"))
    p.add_argument("--samples", type=int, default=100)
    args = p.parse_args()
    print(machine_line())
    folder = ModelFolder.load(args.root)
    unet, scheduler = folder.load_model()
    train = folder.training_set().images
    validation = validation_images(args.root, folder)
    print(f"{os.path.relpath(args.root, ROOT)}: {len(train)} training images {tuple(train.shape[1:])}, {len(validation)} validation, "
          f"{sum(p.numel() for p in unet.parameters()):,} parameters")
    for t in TIMESTEPS:
        r = denoiser_gap(unet, scheduler, train, validation, t)
        print(f"t={t:4d}  denoiser gap {r['gap']:.3f}   error on unseen images: model {r['error']:.3f}, optimal "
              f"denoiser {r['optimal_error']:.3f}   (median largest posterior weight {r['top_weight']:.2f})")
    samples = generate(unet, scheduler, range(args.samples))
    gen, val = np.median(nearest_distance(samples, train)), np.median(nearest_distance(validation, train))
    print(f"copy ratio {gen / val:.2f}  (median nearest-training distance: generated {gen:.2f}, validation {val:.2f})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
