"""Command-line commands for text-to-image model folders (registered by dtrak_core.cli; this module
imports torch only inside a command, so `-h` answers at once).

    python -m dtrak_core build-text2image                        # the miniature -> assets/text2image
    python -m dtrak_core build-text2image --root R --pipeline SD --lora L --data IMAGES
    python -m dtrak_core generate-text2image --prompt "a handwritten digit 7" --seed 0 --out x.png
    python -m dtrak_core lds-text2image run | evaluate           # LDS with LoRA retrains (resumable)
    python -m dtrak_core attribute --root assets/text2image --prompt "a handwritten digit 7" --seed 0 --json
"""
from __future__ import annotations

import json
import os
import time

from dtrak_core.text2image import MINIATURE_ROOT

LDS_OUT = os.path.join(MINIATURE_ROOT, "lds")


def cmd_build(args):
    from dtrak_core.attribution.features import FeatureSetting
    from dtrak_core.text2image.build import DEFAULT_SETTINGS, build_miniature, build_text2image_from

    own = [args.pipeline, args.lora, args.data]
    if any(own) and not all(own):
        raise ValueError("your own model needs all of --pipeline, --lora and --data (or none of them for the miniature)")
    if args.device != "cpu" and not all(own):
        raise ValueError("--device is for your own pipeline's stores; the miniature is built on the CPU, so that "
                         "its committed files are rebuilt bit for bit")
    settings = DEFAULT_SETTINGS if not args.output_fn else \
        [FeatureSetting(fn, K=args.K, k=args.k) for fn in args.output_fn]
    if all(own):
        manifest = build_text2image_from(args.root, args.pipeline, args.lora, args.data, settings, device=args.device)
    else:
        manifest = build_miniature(args.root, settings=settings)
    keys = ("parameters", "num_train", "stores", "featurize_seconds", "quality")
    print(json.dumps({k: manifest.get(k) for k in keys + ("stage_seconds",) if k in manifest}, indent=2))
    print(f"attribute with: python -m dtrak_core attribute --root {args.root} --prompt \"...\" --seed 0 --method d-trak")


def cmd_generate(args):
    from dtrak_core.images import grid, save_png, to_pil
    from dtrak_core.text2image.attributor import TextToImageAttributor

    attributor = TextToImageAttributor.load(args.root)
    seeds = list(range(args.seed, args.seed + args.count))
    images = attributor.generate(seeds, args.prompt, steps=args.steps, guidance_scale=args.guidance)
    out = args.out or f"sample-{args.seed}.png"
    img = to_pil(images[0], args.scale) if args.count == 1 else grid(images, columns=min(16, args.count), scale=args.scale)
    save_png(img, out)
    print(f"wrote {out} ({args.prompt!r}, seeds {seeds[0]}..{seeds[-1]}, DDIM {args.steps} steps, "
          f"guidance {attributor.guidance_scale if args.guidance is None else args.guidance})")


def query(attributor, args) -> tuple:
    """(image (C, H, W), what it is) that `attribute --prompt` asks about: a generated sample (--seed)
    or a file (--image)."""
    if not args.prompt:
        raise ValueError(f"{args.root!r} is a text-to-image model folder: give the query's --prompt "
                         f"(e.g. --prompt \"a handwritten digit 7\")")
    if args.image:
        from dtrak_core.images import load_user_image

        c, r, _ = attributor.image_shape
        return load_user_image(args.image, r, c, invert=args.invert), {"image": args.image, "prompt": args.prompt}
    return attributor.generate([args.seed], args.prompt)[0], {"seed": args.seed, "prompt": args.prompt}


def cmd_lds(args):
    from dataclasses import replace

    import torch

    from dtrak_core.checksums import write_sealed_json
    from dtrak_core.evaluation.retrain import parse_shard
    from dtrak_core.files import atomic_write_bytes
    from dtrak_core.text2image.attributor import TextToImageAttributor
    from dtrak_core.text2image.lds import MINIATURE_LDS, evaluate, format_table, miniature_run

    torch.set_num_threads(args.threads)  # the generated test set must come out bit-identical on resume
    config = replace(MINIATURE_LDS, num_subsets=args.subsets) if args.subsets else MINIATURE_LDS
    if args.action == "run":
        run = miniature_run(args.root, args.out, config)
        t0 = time.perf_counter()
        ran = run.run(shard=parse_shard(args.shard), max_jobs=args.max_jobs)
        print(f"{len(ran)} LoRA retrains and their ground truth in {time.perf_counter() - t0:.0f} s; results in "
              f"{run.jobs_dir}")
        return
    results = evaluate(args.out, TextToImageAttributor.load(args.root), args.methods, K=args.K,
                       num_bootstrap=args.bootstrap)
    table = format_table(results)
    suffix = "" if args.K is None else f"_K{args.K}"
    write_sealed_json(os.path.join(args.out, f"lds_results{suffix}.json"), results)  # the app verifies it
    atomic_write_bytes(os.path.join(args.out, f"results{suffix}.md"), table.encode())
    print(table)


def add_commands(sub) -> None:
    """Register the text-to-image commands on the main parser's subcommands."""
    p = sub.add_parser("build-text2image", help="the text-to-image miniature (or your own pipeline + LoRA): "
                                                "model folder with feature stores of the LoRA's fine-tuning set")
    p.add_argument("--root", default=MINIATURE_ROOT, help=f"model folder to write (default {MINIATURE_ROOT})")
    p.add_argument("--pipeline", default=None, help="your own: a Stable Diffusion pipeline folder (diffusers layout) "
                                                    "or a Hugging Face repo id in the local cache")
    p.add_argument("--lora", default=None, help="your own: LoRA weights (folder or .safetensors, diffusers format)")
    p.add_argument("--data", default=None, help="your own: the captioned images the LoRA was fine-tuned on "
                                                "(metadata.jsonl or <name>.txt captions)")
    p.add_argument("--output-fn", nargs="+", default=None, help="stores to build (default: square and loss)")
    p.add_argument("--K", type=int, default=100, help="timesteps per store with --output-fn (default 100)")
    p.add_argument("--k", type=int, default=1024, help="projected dimension with --output-fn (default 1024)")
    p.add_argument("--device", default="cpu", help="your own: where the LoRA gradients are computed: cpu (default), "
                                                   "cuda, cuda:<i> or mps; an unavailable one is refused before any work")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("generate-text2image", help="sample a text-to-image model folder from a prompt and seeds")
    p.add_argument("--root", default=MINIATURE_ROOT, help=f"text-to-image model folder (default {MINIATURE_ROOT})")
    p.add_argument("--prompt", required=True, help='e.g. "a handwritten digit 7"')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the folder's)")
    p.add_argument("--scale", type=int, default=16, help="pixels per image pixel in the PNG")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("lds-text2image", help="LDS of a text-to-image folder: LoRA retrains on half subsets")
    p.add_argument("action", choices=("run", "evaluate"), help="run: retrain + ground truth (resumable, shardable); "
                                                               "evaluate: LDS of every method -> lds_results.json, results.md")
    p.add_argument("--root", default=MINIATURE_ROOT, help=f"text-to-image model folder (default {MINIATURE_ROOT})")
    p.add_argument("--out", default=LDS_OUT, help=f"run folder (default {LDS_OUT}: its small job results are committed)")
    p.add_argument("--subsets", type=int, default=None, help="M, random half subsets (default 64)")
    p.add_argument("--shard", default=None, help="run only jobs i, i+n, ... of the list: i/n")
    p.add_argument("--max-jobs", type=int, default=None, help="run: stop after this many retrains (resume later)")
    p.add_argument("--methods", nargs="+", default=["d-trak", "trak"], help="methods with stores in --root")
    p.add_argument("--K", type=int, default=None, help="evaluate: timesteps of the features (default: the stores'; "
                                                        "another K is featurized into the run folder)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.set_defaults(func=cmd_lds)
