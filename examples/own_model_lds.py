"""LDS of a model dtrak did not train, end to end, on a small dataset that is not digits.

What `docs/OWN_MODEL_LDS.md` describes, as one script:

1. a dataset: 16x16 RGB coloured shapes (circle, square, triangle, cross; one class sub-folder each,
   PNG files), the same files from the same --seed;
2. a model trained by "your own" plain PyTorch loop (a diffusers `UNet2DModel`, epsilon prediction,
   `DDPMScheduler`; nothing of dtrak's trainer), saved with `save_pretrained` (unet/ + scheduler/);
3. `python -m dtrak_core build` (the model folder, D-TRAK and TRAK stores);
4. `lds-own prepare` (the subsets, jobs.json);
5. the same plain loop again, once per job of jobs.json: a fresh UNet from the base config, trained
   on the job's `keep` indices with the job's `train_seed`, saved as <checkpoints>/<id>/;
6. `lds-own ground-truth`, `lds-own evaluate` (the LDS table), `lds-own tune-lambda` (the lambda
   measured here recorded for the answers) and `attribute --json` on a generated sample (the
   training images it names, by class and file).

Every dtrak step is the documented command, run in-process (`dtrak_core.cli.main`) and printed as
you would type it. Run from the repository root:

    python examples/own_model_lds.py --out own-lds            # default sizes: a few minutes on a CPU
    python examples/own_model_lds.py --out own-lds --tiny     # seconds: the size the tests run

Sizes can be changed one by one (`--images`, `--subsets`, `--steps`, `--retrain-steps`, `--K`, ...;
`--help`). The folder given as --out gets data/ (the images), pipeline/ (the model), attr/ (the model
folder), lds/ (the run: jobs.json, tables.md, ...) and checkpoints/ (the retrained UNets). Every
step that already has its output is skipped on a second run, as dtrak's own commands are resumable.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys
import time

if importlib.util.find_spec("dtrak_core") is None:  # run from a checkout, not installed: this checkout's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch

import dtrak_core  # noqa: F401  (importable from here on)

CLASSES = ("circle", "cross", "square", "triangle")
RESOLUTION = 16

# sizes: the default (CPU minutes) and --tiny (the tests' seconds)
DEFAULT = dict(images=120, subsets=12, seeds=[1], steps=400, retrain_steps=150, batch=32, width=16, K=10, k=128,
               eval_timesteps=20, noise_seeds=[0, 1], generated=32, sample_steps=20, bootstrap=200)
TINY = dict(images=32, subsets=4, seeds=[1], steps=30, retrain_steps=20, batch=16, width=8, K=2, k=16,
            eval_timesteps=10, noise_seeds=[0], generated=6, sample_steps=4, bootstrap=20)


# -- 1. the dataset -------------------------------------------------------------------------------
def shape_image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """One (16, 16, 3) uint8 image: a shape of `kind`, random colour, size and position, on a
    random dark background."""
    n = RESOLUTION
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    r = rng.uniform(3.5, 6.0)
    cy, cx = rng.uniform(r, n - r, size=2)
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        mask = dy ** 2 + dx ** 2 <= r ** 2
    elif kind == "square":
        mask = (np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)
    elif kind == "triangle":  # apex up
        mask = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55)
    else:  # cross
        arm = max(1.0, r * 0.3)
        mask = ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    background = rng.integers(0, 60, size=3)
    colour = rng.integers(120, 256, size=3)
    img = np.where(mask[..., None], colour, background) + rng.integers(-8, 9, size=(n, n, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(folder: str, count: int, seed: int) -> None:
    """`count` PNGs, as many of each class as the count allows, in folder/<class>/<i>.png."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, kind in enumerate(CLASSES):
        os.makedirs(os.path.join(folder, kind), exist_ok=True)
        for i in range(count // len(CLASSES) + (c < count % len(CLASSES))):
            Image.fromarray(shape_image(kind, rng)).save(os.path.join(folder, kind, f"{i:04d}.png"))


def load_images(folder: str) -> tuple[list[str], torch.Tensor]:
    """Your own data loader: the files in the order dtrak reads them (sorted paths: class sub-folders
    sorted, then file names), scaled to [-1, 1] as the folder route does."""
    from PIL import Image

    files = sorted(glob.glob(os.path.join(folder, "*", "*.png")))
    x = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files]) / 127.5 - 1.0
    return [os.path.relpath(f, folder).replace(os.sep, "/") for f in files], torch.from_numpy(x).permute(0, 3, 1, 2)


# -- 2. your own model and training loop ----------------------------------------------------------
def new_unet(width: int):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=RESOLUTION, in_channels=3, out_channels=3, block_out_channels=(width, 2 * width),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=min(8, width), add_attention=False)


def train(unet, scheduler, images: torch.Tensor, steps: int, batch: int, seed: int):
    """A plain DDPM loop: random timesteps, epsilon-prediction MSE, AdamW. Deterministic from `seed`."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    unet.train()
    T = scheduler.config.num_train_timesteps
    for _ in range(steps):
        x0 = images[torch.randint(0, len(images), (min(batch, len(images)),), generator=g)]
        x0 = torch.where(torch.rand(len(x0), 1, 1, 1, generator=g) < 0.5, x0, x0.flip(-1))  # horizontal flips
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, T, (len(x0),), generator=g)
        loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.eval()


# -- 3.-6. the documented dtrak path --------------------------------------------------------------
def dtrak(*argv: str) -> None:
    """Run `python -m dtrak_core ARGV` in this process (printed as typed); stop on a failure."""
    from dtrak_core.cli import main

    print(f"\n$ python -m dtrak_core {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    code = main(list(argv))
    if code not in (0, None):
        sys.exit(f"`python -m dtrak_core {' '.join(argv)}` failed (exit {code})")
    print(f"[{time.perf_counter() - t0:.1f} s]", flush=True)


def run(out: str, sizes: dict, seed: int = 0) -> dict:
    """The whole path in `out`; {"tables": tables.json, "attribute": attribute --json} at the end."""
    import contextlib
    import io

    from diffusers import DDPMPipeline, DDPMScheduler

    torch.set_num_threads(1)
    data, pipeline, root = (os.path.join(out, d) for d in ("data", "pipeline", "attr"))
    run_dir, ckpts = os.path.join(out, "lds"), os.path.join(out, "checkpoints")
    t_all = time.perf_counter()

    if not os.path.isdir(data):
        make_dataset(data, sizes["images"], seed)
    files, images = load_images(data)
    print(f"dataset: {len(files)} images of {', '.join(CLASSES)} in {data}")

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    if not os.path.isdir(os.path.join(pipeline, "unet")):
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        unet = train(new_unet(sizes["width"]), scheduler, images, sizes["steps"], sizes["batch"], seed)
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(pipeline)
        print(f"trained the base model with the plain loop ({sizes['steps']} steps) in "
              f"{time.perf_counter() - t0:.1f} s; saved to {pipeline}")

    if not os.path.isfile(os.path.join(root, "manifest.json")):
        dtrak("build", "--root", root, "--model", pipeline, "--data", data, "--output-fn", "square", "loss",
              "--K", str(sizes["K"]), "--k", str(sizes["k"]))
    from dtrak_core.folder import ModelFolder

    train_set = ModelFolder.load(root).training_set()
    assert list(train_set.paths) == files, "the loader's order is not the model folder's"

    if not os.path.isfile(os.path.join(run_dir, "jobs.json")):
        dtrak("lds-own", "prepare", "--root", root, "--out", run_dir, "--subsets", str(sizes["subsets"]),
              "--seeds", *map(str, sizes["seeds"]), "--eval-timesteps", str(sizes["eval_timesteps"]),
              "--noise-seeds", *map(str, sizes["noise_seeds"]), "--generated", str(sizes["generated"]),
              "--sample-steps", str(sizes["sample_steps"]))

    # your own script, once per job: a fresh UNet of the base config, the kept images, the job's seed
    from diffusers import UNet2DModel

    jobs = json.load(open(os.path.join(run_dir, "jobs.json")))["jobs"]
    config = UNet2DModel.load_config(os.path.join(pipeline, "unet"))
    t0, trained = time.perf_counter(), 0
    for job in jobs:
        dest = os.path.join(ckpts, job["id"])
        if os.path.isfile(os.path.join(dest, "config.json")):
            continue
        torch.manual_seed(job["train_seed"])
        unet = train(UNet2DModel.from_config(config), scheduler, images[torch.as_tensor(job["keep"])],
                     sizes["retrain_steps"], sizes["batch"], job["train_seed"])
        unet.save_pretrained(dest)
        trained += 1
    print(f"\nretrained {trained} of {len(jobs)} jobs with the plain loop ({sizes['retrain_steps']} steps each) in "
          f"{time.perf_counter() - t0:.1f} s; saved to {ckpts}/<id>/")

    dtrak("lds-own", "ground-truth", "--root", root, "--out", run_dir, "--checkpoints", ckpts)
    dtrak("lds-own", "evaluate", "--root", root, "--out", run_dir, "--bootstrap", str(sizes["bootstrap"]),
          "--no-journey")
    dtrak("lds-own", "tune-lambda", "--root", root, "--out", run_dir, "--bootstrap", str(sizes["bootstrap"]))

    argv = ["attribute", "--root", root, "--seed", "0", "--method", "d-trak", "--top", "5", "--json"]
    print(f"\n$ python -m dtrak_core {' '.join(argv)}   (the top proponents, by class and file)")
    from dtrak_core.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if main(argv) != 0:
            sys.exit("`attribute` failed")
    answer = json.loads(buffer.getvalue())
    print(f"  lambda {answer['lambda']:g}: {answer['lambda_source']}")
    for row in answer["proponents"]:
        print(f"  #{row['index']:<4} {row['class']:<9} {row['path']:<20} score {row['score']:+.4g}")
    print(f"\ndone in {time.perf_counter() - t_all:.0f} s; the LDS table is {os.path.join(run_dir, 'tables.md')}")
    return {"tables": json.load(open(os.path.join(run_dir, "tables.json"))), "attribute": answer}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="working folder (data/, pipeline/, attr/, lds/, checkpoints/)")
    p.add_argument("--tiny", action="store_true", help="the tests' sizes: seconds, numbers not meaningful")
    p.add_argument("--seed", type=int, default=0, help="the dataset's and the base model's seed (default 0)")
    for name, value in DEFAULT.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            p.add_argument(flag, type=int, nargs="+", default=None, help=f"default {value} (--tiny {TINY[name]})")
        else:
            p.add_argument(flag, type=int, default=None, help=f"default {value} (--tiny {TINY[name]})")
    args = p.parse_args(argv)
    sizes = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in (TINY if args.tiny else DEFAULT).items()}
    return run(args.out, sizes, args.seed)


if __name__ == "__main__":
    main()
