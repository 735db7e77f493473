"""Command line: python -m dtrak_core <command> ...  (run with -h for each command's options).

The arguments are parsed before anything heavy is imported: torch, diffusers and the text-to-image
stack load inside the command that needs them, so `-h` and a mistyped option answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# what a missing optional module needs installed: the package's extras (pyproject.toml)
EXTRAS = {"transformers": "text2image", "peft": "text2image", "gradio": "app"}


def _set_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _root_option(root) -> str:
    from dtrak_core.errors import root_option

    return root_option(root)


def _add_root(p):
    p.add_argument("--root", default=None, help="model folder written by build-default (default: $DTRAK_ASSETS, "
                                                "else ./assets)")


def _input_range(text: str) -> tuple[float, float]:
    """--input-range LOW,HIGH (e.g. 0,1; write --input-range=-1,1 for a negative LOW)."""
    import math

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (e.g. 0,1 or -1,1), got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with LOW < HIGH, got {text!r}")
    return lo, hi


def _add_device(p, precision: bool = False):
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:<i> or mps")
    if precision:
        p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                       help="autocast of the model's forward passes (default fp32; fp16 needs a GPU)")


def _check_writable(root: str) -> None:
    """Refuse up front, with the reason, a --root that cannot be written (not an OSError midway)."""
    probe = os.path.abspath(root)
    while not os.path.exists(probe):  # a new root is created inside its nearest existing parent
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"--root {root!r}: {probe!r} is a file, not a folder; pass a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--root {root!r} cannot be written ({probe!r} is read-only); pass a folder you can write to")


def _check_model_root(root: str) -> None:
    from dtrak_core.folder import MANIFEST

    if not os.path.isdir(root):
        raise ValueError(f"--root {root!r} does not exist; build a model folder there first (`python -m dtrak_core "
                         f"build-default --root {root}`, or `build` for your own model)")
    if not os.path.isfile(os.path.join(root, MANIFEST)):
        raise ValueError(f"--root {root!r} is not a model folder (no {MANIFEST}); build one with `python -m dtrak_core "
                         f"build-default --root {root}` (or `build` for your own model)")


def cmd_build_default(args):
    from dataclasses import replace

    from dtrak_core.build import DEFAULT_TRAIN_CONFIG, build_default

    _check_writable(args.root)
    config = DEFAULT_TRAIN_CONFIG if args.steps is None else replace(DEFAULT_TRAIN_CONFIG, steps=args.steps)
    manifest = build_default(args.root, config)
    print(json.dumps({k: manifest[k] for k in ("parameters", "train_seconds", "featurize_seconds", "quality")}, indent=2))


def cmd_build(args):
    from dtrak_core.devices import check_precision, resolve_device

    resolve_device(args.device)  # an unavailable device or precision: refused before any work
    check_precision(args.precision, args.device)
    from dtrak_core.attribution.features import FeatureSetting
    from dtrak_core.build import build_from

    settings = [] if args.manifest_only else [FeatureSetting(fn, K=args.K, projector=args.projector, k=args.k)
                                              for fn in args.output_fn]
    _check_writable(args.root)
    manifest = build_from(args.root, args.model, args.data, settings, invert=args.invert, device=args.device,
                          precision=args.precision, input_range=args.input_range)
    print(json.dumps({k: manifest.get(k) for k in ("checkpoint", "dataset", "num_train", "parameters", "stores",
                                                    "featurize_seconds")}, indent=2))
    if args.manifest_only:  # on a GPU: --device cuda; under torchrun each rank fills its share of a store
        print("fill the stores with:")
        for fn in args.output_fn:
            print(f"  python -m dtrak_core featurize{_root_option(args.root)} --output-fn {fn} --K {args.K} "
                  f"--k {args.k} --projector {args.projector} --device {args.device}")
    else:
        print(f"attribute with: python -m dtrak_core attribute{_root_option(args.root)} --image FILE --method d-trak")


def cmd_generate(args):
    from dtrak_core.devices import check_precision
    from dtrak_core.images import grid, save_png, to_pil
    from dtrak_core.model.sampling import generate

    check_precision(args.precision, args.device)  # refused before the model loads
    unet, scheduler = _load_model(args.root)
    seeds = list(range(args.seed, args.seed + args.count))
    images = generate(unet, scheduler, seeds, steps=args.steps, sampler=args.sampler, device=args.device,
                      precision=args.precision)
    out = args.out or (f"sample-{args.seed}.png" if args.count == 1 else f"samples-{args.seed}-{seeds[-1]}.png")
    img = to_pil(images[0], args.scale) if args.count == 1 else grid(images, columns=min(16, args.count), scale=args.scale)
    save_png(img, out)
    print(f"wrote {out} (seeds {seeds[0]}..{seeds[-1]}, {args.sampler} {args.steps} steps)")


def _require_digits_model(root, what: str) -> None:
    """The harnesses retrain the model on the digits (or classify digits): refuse an external model
    up front, with the reason, instead of failing deep inside."""
    from dtrak_core.folder import ModelFolder

    folder = ModelFolder.load(root, missing_ok=True, tuned=False)  # (the tuned lambdas: checked where used)
    if folder is not None and not folder.is_digits_default:
        raise ValueError(f"{what} needs a digits model trained by dtrak (`build-default`); {root!r} holds "
                         f"{folder.model_source or folder.checkpoint!r}, built with `build` "
                         f"(attribute, featurize, generate and the app work with it; for LDS and the counterfactual "
                         f"with models retrained by your own script: `lds-own`, `counterfactual-own`; the lambda "
                         f"measured there is recorded by `python -m dtrak_core lds-own tune-lambda"
                         f"{_root_option(root)} --out RUN`)")


def _own_lds_run(args) -> bool:
    """Whether `lds tune-lambda` was given a folder not trained by dtrak and an `lds-own` run (--out);
    such a folder without one is refused by `_require_digits_model`, which names `lds-own tune-lambda`."""
    from dtrak_core.evaluation.lds_own import is_own_run
    from dtrak_core.folder import ModelFolder

    folder = ModelFolder.load(args.root, missing_ok=True, tuned=False)
    return folder is not None and not folder.is_digits_default and args.out is not None and is_own_run(args.out)


def _load_model(root):
    from dtrak_core.folder import ModelFolder

    _check_model_root(root)
    return ModelFolder.load(root).load_model()


def cmd_attribute(args):
    from dtrak_core.attribution import methods
    from dtrak_core.attribution.attributor import Attribution, Attributor
    from dtrak_core.devices import resolve_device
    from dtrak_core.images import load_user_image
    from dtrak_core.model.data import to_input_range
    from dtrak_core.model.sampling import generate

    resolve_device(args.device)  # refused before the model loads
    attributor = Attributor.load(args.root)
    attributor.lam = args.lam
    attributor.device = args.device  # the query's gradients and the TRAK scores (baselines stay on the CPU)
    t0 = time.perf_counter()
    text2image = getattr(attributor, "pipeline", None) is not None  # a text-to-image folder: queries carry a prompt
    if text2image:
        from dtrak_core.text2image.cli import query as text2image_query

        image, query = text2image_query(attributor, args)
    elif args.prompt:
        raise ValueError(f"--prompt is for text-to-image model folders; {args.root!r} holds an unconditional model")
    elif args.image:  # an image file, converted to the folder's input range
        cfg = attributor.unet.config
        image = to_input_range(load_user_image(args.image, cfg.sample_size, cfg.in_channels, invert=args.invert),
                               attributor.input_range)
        query = {"image": args.image}
    else:
        image = generate(attributor.unet, attributor.scheduler, [args.seed], device=args.device)[0]
        image = image.clamp(*attributor.input_range)  # (the sampler clamps to [-1, 1]; a [0, 1] model's range)
        query = {"seed": args.seed}
    if args.method is None:
        args.method = methods.default_method(methods.available(attributor, args.root) if not text2image
                                             else attributor.methods)
    method = methods.get(args.method)
    if method.family == "trak":
        result = attributor.attribute(image, args.method, K=args.K, **({"prompt": args.prompt} if text2image else {}))
        lam = attributor.scorer(args.method, args.K).lam_
        lam_source = _lambda_source(attributor, args.method, args.K, args.lam)
    elif text2image:  # its baselines (`TextToImageAttributor.baseline_scores`): the query with its prompt
        result = attributor.attribute(image, method.name, prompt=args.prompt)
        lam, lam_source = None, None
    else:  # a baseline, through the registry (Journey-TRAK follows the seed's own trajectory)
        scores = methods.scores(attributor, method.name, image[None], None if args.image else [args.seed], K=args.K)
        result = Attribution(method.name, scores[0], attributor.train.labels.numpy(), attributor.train)
        lam, lam_source = None, None
    seconds = time.perf_counter() - t0
    table = {**query, **result.table(args.top), "lambda": lam, **({"lambda_source": lam_source} if lam_source else {}),
             "seconds": round(seconds, 3)}
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"{method.label} attribution for {query}{'' if lam is None else f', lambda {lam:.4g} ({lam_source})'} "
          f"({seconds:.2f} s)")
    for kind in ("proponents", "opponents"):
        if kind == "opponents" and not result.signed:
            print(f"\nopponents: none ({method.label}'s scores carry no sign: its lowest are the least alike, not "
                  "opponents)")
            continue
        print(f"\n{kind}:")
        for line in _rows_text(table[kind]):
            print(line)


def _rows_text(rows: list[dict]) -> list[str]:
    """A result table's rows as aligned text: rank, index, label and score, then what names each
    training image (`Attribution.describe`): its class name (left out where it only repeats the
    label, as the digits' do), its file relative to the data folder, its caption."""
    shown = [k for k in ("class", "path", "caption") if any(k in row for row in rows)]
    if "class" in shown and all(row.get("class") == str(row["label"]) for row in rows):
        shown.remove("class")
    widths = {k: max([len(k)] + [len(str(row.get(k, ""))) for row in rows]) for k in shown[:-1]}
    header = f"  {'rank':>4s}  {'train-index':>11s}  {'label':>5s}  {'score':>11s}" + "".join(f"  {k:{widths.get(k, 0)}s}" for k in shown)
    lines = [header.rstrip()]
    for r, row in enumerate(rows, 1):
        names = "".join(f"  {str(row.get(k, '')):{widths.get(k, 0)}s}" for k in shown)
        lines.append(f"  {r:4d}  {row['index']:11d}  {row['label']:5d}  {row['score']:+.4e}{names}".rstrip())
    return lines


def _lambda_source(attributor, method: str, K, given) -> str | None:
    """Where a TRAK-family answer's lambda comes from: --lambda, the manifest's recorded one (and
    how it was chosen), or the data-free rule."""
    if given is not None:
        return "given with --lambda"
    try:
        slug = attributor.setting(method, K)[0].slug
    except (ValueError, AttributeError):
        return None
    if slug in attributor.tuned_lambdas:
        chosen = ((getattr(attributor, "tuned_params", {}).get(slug) or {}).get("chosen_on") or "").split(";")[0]
        return f"recorded in manifest.json{f', chosen on {chosen}' if chosen else ''}"
    return "the data-free rule: no lambda recorded for this store"


def cmd_featurize(args):
    from dtrak_core import distributed
    from dtrak_core.attribution.features import FeatureSetting
    from dtrak_core.build import build_store
    from dtrak_core.devices import resolve_device

    setting = FeatureSetting(args.output_fn, K=args.K, projector=args.projector, k=args.k, seed=args.projector_seed)
    resolve_device(args.device)  # refused before any work
    _check_model_root(args.root)
    _check_writable(args.root)
    _check_writable(os.path.join(args.root, "stores", setting.slug))
    unet, scheduler = _load_model(args.root)
    if distributed.launched():  # under torchrun: each rank fills its share of the one store
        manifest = distributed.build_store(args.root, unet, scheduler, setting, device=args.device)
        if int(os.environ["RANK"]) != 0:
            return
    else:
        manifest = build_store(args.root, unet, scheduler, setting, device=args.device)
    rel = os.path.join("stores", setting.slug)
    print(f"store {os.path.join(args.root, rel)} complete ({manifest['featurize_seconds'][rel]:.1f} s)")


def cmd_migrate_stores(args):
    from dtrak_core.attribution.store import find_stores, migrate_store

    for folder in args.folders:
        stores = find_stores(folder)
        if not stores:
            raise ValueError(f"no feature store at or under {folder!r}")
        for path in stores:
            print(f"{path}: {'migrated' if migrate_store(path) else 'already current'} (verified)")


def cmd_quality(args):
    from dtrak_core.evaluation.quality import sample_quality
    from dtrak_core.model.sampling import generate

    _require_digits_model(args.root, "quality (a digit classifier)")
    unet, scheduler = _load_model(args.root)
    images = generate(unet, scheduler, range(args.count), steps=args.steps, sampler=args.sampler)
    print(json.dumps(sample_quality(images), indent=2))


def cmd_counterfactual(args):
    from dtrak_core import distributed
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.evaluation.counterfactual import run_counterfactual, target_seeds, train_config_from_manifest
    from dtrak_core.evaluation.counterfactual_report import write_gallery
    from dtrak_core.evaluation.lds_own import shard_of
    from dtrak_core.evaluation.retrain import parse_shard

    _require_digits_model(args.root, "counterfactual (remove and retrain)")
    shard = shard_of(parse_shard(args.shard))  # under torchrun: each rank its own jobs
    _set_threads(args.threads)
    attributor = Attributor.load(args.root)
    args.out = os.path.join(args.root, "counterfactual") if args.out is None else args.out
    jobs_dir = os.path.join(args.out, "jobs")
    if not args.summary_only:
        seeds = target_seeds(args.targets, args.first_seed)
        ran = run_counterfactual(attributor, jobs_dir, seeds, args.rankings.split(","), args.k or ["20%", "5%"],
                                 train_config_from_manifest(args.root), shard=shard, control=not args.no_control)
        print(f"ran {len(ran)} job(s) now; results in {jobs_dir}")
        if distributed.launched():  # ranks finish at different times: summarize once, when all are done
            print(f"rank {shard[0]}/{shard[1]} done; when every rank is, summarize with `python -m dtrak_core "
                  f"counterfactual{_root_option(args.root)} --summary-only --out {args.out}`")
            return
    summary = _counterfactual_report(args.out, jobs_dir, attributor.train)
    if args.gallery and summary["cells"]:
        index = write_gallery(jobs_dir, os.path.join(args.out, "gallery"), attributor.train, args.gallery)
        print(f"gallery: seeds {index['seeds']} at k={index['k']} in {os.path.join(args.out, 'gallery')}")



def _counterfactual_report(out: str, jobs_dir: str, train, planned: list[str] | None = None,
                           measure_hint: str | None = None, classifier=None) -> dict:
    """summary.json and results.md in `out` from the finished jobs in jobs_dir (printed); the summary.

    planned: the ids of every job of the run (`counterfactual-own`: removals.json), for a model not
    trained by dtrak: a run with some not measured yet is marked PARTIAL (in summary.json and at the
    top of results.md, with `measure_hint`, the command that measures the rest), and the published
    CIFAR-2 row gets its caveat (another model and dataset). classifier: the folder's own (its
    classifier/), which reads the targets' class before and after."""
    from dtrak_core.checksums import write_sealed_json
    from dtrak_core.evaluation.counterfactual_report import format_table, summarize
    from dtrak_core.files import atomic_write_bytes

    summary = summarize(jobs_dir, train.labels.numpy(), classifier)
    table = format_table(summary, len(train), "digit" if classifier is None else "class")
    if planned is not None:
        done = sum(os.path.isfile(os.path.join(jobs_dir, f"{i}.npz")) for i in planned)
        summary.update(jobs_planned=len(planned), jobs_done=done, partial=done < len(planned))
        table += ("\nThe '20% (CIFAR-2, published)' row is the paper's medians for its CIFAR-2 model: another model "
                  "and dataset, shown for scale, not for comparison.\n")
        if done < len(planned):
            table = (f"**PARTIAL: {done} of {len(planned)} retrains measured**; the cells cover the measured ones "
                     f"only{f' (measure the rest with `{measure_hint}`)' if measure_hint else ''}.\n\n" + table)
    write_sealed_json(os.path.join(out, "summary.json"), summary)  # sealed again: the PARTIAL keys are added after
    atomic_write_bytes(os.path.join(out, "results.md"), table.encode())
    print(table)
    return summary


def _shard_arg(args) -> tuple[int, int]:
    from dtrak_core.evaluation.retrain import parse_shard

    return parse_shard(args.shard)


def cmd_lds_own(args):
    from dtrak_core.devices import resolve_device
    from dtrak_core.evaluation import lds_own
    from dtrak_core.evaluation.lds_run import LDSConfig

    _check_model_root(args.root)
    _set_threads(args.threads)
    if args.action == "prepare":
        from dataclasses import asdict

        resolve_device(args.device)
        # each option: as given, else the setting's (--config), else the built-in harness's default
        base = asdict(_setting(args).lds_config if args.config else LDSConfig())
        given = {"num_subsets": args.subsets, "alpha": args.alpha, "subset_seed": args.subset_seed,
                 "train_seeds": args.seeds, "eval_timesteps": args.eval_timesteps, "noise_seeds": args.noise_seeds,
                 "generated": args.generated, "sample_steps": args.sample_steps}
        config = LDSConfig(**{**base, **{k: v for k, v in given.items() if v is not None}})
        _check_writable(args.out)
        run = lds_own.prepare(args.root, args.out, config, masks=args.masks, validation=args.validation,
                              device=args.device)
        print(f"{len(run.jobs())} retrains ({len(run.masks)} subsets x {len(run.config.train_seeds)} seeds) listed in "
              f"{os.path.join(args.out, lds_own.JOBS)}; save each UNet to <checkpoints>/<id>/, then run "
              f"`python -m dtrak_core lds-own ground-truth --root {args.root} --out {args.out} --checkpoints DIR`")
        return
    if args.action == "ground-truth":
        if not args.checkpoints:
            raise ValueError("ground-truth needs --checkpoints, the folder your training script saved the models in")
        resolve_device(args.device)
        t0 = time.perf_counter()
        shard = lds_own.shard_of(_shard_arg(args))
        done = lds_own.ground_truth(args.root, args.out, args.checkpoints, shard=shard, partial=args.partial,
                                    device=args.device)
        print(f"shard {shard[0]}/{shard[1]}: ground truth of {len(done)} checkpoint(s) measured in "
              f"{time.perf_counter() - t0:.0f} s; results in {os.path.join(args.out, 'jobs')}")
        return
    if args.action == "tune-lambda":
        _tune_own(args.root, args.out, args.dest, args.bootstrap)
        return
    from dtrak_core.evaluation import lds_own_report
    from dtrak_core.evaluation.tables_report import format_report

    dest = args.out if args.dest is None else args.dest
    out = lds_own_report.evaluate(args.root, args.out, dest=dest or None, K=args.K, num_bootstrap=args.bootstrap,
                                  journey=not args.no_journey, ceiling_run=args.ceiling_run)
    print(format_report(out))
    if dest:
        print(f"wrote {os.path.join(dest, 'tables.json')} and tables.md")


def _print_tuned(tuned: dict, root: str) -> None:
    """One line per recorded lambda: where it was chosen, its LDS, and the data-free rule's beside it."""
    for slug, e in tuned.items():
        where = (f"best on {e['chosen_on']}: LDS {e['validation_lds']:.1f}" if e.get("validation_lds") is not None
                 else f"chosen on {e['chosen_on']}")
        print(f"{slug}: lambda {e['lambda']:g} ({where}); generated-set LDS {e['generated_lds']:.1f} at it vs "
              f"{e['generated_lds_rule']:.1f} with the rule's {e['rule_lambda']:.3g}")
    print(f"recorded under 'tuned_lambda' in {os.path.join(root, 'manifest.json')}: `attribute`, Attributor.load and "
          f"the app use these lambdas from now on (`attribute --lambda` overrides them)")


def _tune_own(root: str, out: str, dest: str | None, num_bootstrap: int) -> None:
    from dtrak_core.evaluation import lds_own_report

    _check_writable(root)
    tuned = lds_own_report.tune_lambda(root, out, dest=dest or None, num_bootstrap=num_bootstrap)
    _print_tuned(tuned, root)


def cmd_counterfactual_own(args):
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.evaluation import lds_own
    from dtrak_core.evaluation.counterfactual import target_seeds

    _check_model_root(args.root)
    _set_threads(args.threads)
    if args.action == "prepare":
        _check_writable(args.out)
        cf = _setting(args).counterfactual if args.config else {}
        targets = args.targets if args.targets is not None else cf.get("targets", 60)
        first = args.first_seed if args.first_seed is not None else cf.get("first_seed", 1000)
        rankings = args.rankings.split(",") if args.rankings else cf.get("rankings", ["d-trak", "trak", "random"])
        removals = lds_own.counterfactual_prepare(args.root, args.out, target_seeds(targets, first), rankings,
                                                  args.k or cf.get("k", ["20%"]))
        print(f"{len(removals['jobs'])} retrains listed in {os.path.join(args.out, lds_own.REMOVALS)}; save each UNet "
              f"to <checkpoints>/<id>/, then run `python -m dtrak_core counterfactual-own measure --root {args.root} "
              f"--out {args.out} --checkpoints DIR`")
        return
    if not args.checkpoints:
        raise ValueError("measure needs --checkpoints, the folder your training script saved the models in")
    done = lds_own.counterfactual_measure(args.root, args.out, args.checkpoints, shard=_shard_arg(args),
                                          partial=args.partial)
    print(f"{len(done)} checkpoint(s) measured now; results in {os.path.join(args.out, 'jobs')}")
    from dtrak_core.files import read_json
    from dtrak_core.model.classifier import folder_classifier

    removals = read_json(os.path.join(args.out, lds_own.REMOVALS), "counterfactual removals",
                         "rerun `counterfactual-own prepare`")
    _counterfactual_report(args.out, os.path.join(args.out, "jobs"), Attributor.load(args.root).train,
                           planned=[j["id"] for j in removals["jobs"]],
                           measure_hint=f"python -m dtrak_core counterfactual-own measure{_root_option(args.root)} "
                                        f"--out {args.out} --checkpoints DIR", classifier=folder_classifier(args.root))


def _setting(args):
    from dtrak_core.setting import load_setting

    return load_setting(args.config)


def cmd_setting(args):
    from dtrak_core import setting as st
    from dtrak_core.devices import check_precision, resolve_device

    setting = _setting(args)
    if args.action == "show":  # --json: stdout is the config's JSON and nothing else
        print(st.config_json(setting) if args.json else st.describe(setting))
        return
    resolve_device(args.device)
    check_precision(args.precision, args.device)
    _set_threads(args.threads)
    need = {"data": ("source", "data"), "train": ("data", "model"), "build": ("data", "model", "root"),
            "retrain": ("data", "jobs", "checkpoints")}[args.action]
    missing = [f"--{k}" for k in need if not getattr(args, k)]
    if missing:
        raise ValueError(f"setting {args.action} needs {', '.join(missing)}")
    t0 = time.perf_counter()
    if args.action == "data":
        done = st.write_data(setting, args.source, args.data)
        print(f"{args.data}: {', '.join(f'{v} {k}' for k, v in done['counts'].items())}")
    elif args.action == "train":
        _check_writable(args.model)
        done = st.train_base(setting, args.data, args.model, device=args.device, precision=args.precision)
        print(f"base model ({done['parameters']:,} parameters) in {args.model} ({done['train_seconds']:.0f} s)")
    elif args.action == "build":
        _check_writable(args.root)
        st.build_folder(setting, args.data, args.model, args.root, stores=not args.manifest_only, device=args.device)
        print(f"model folder {args.root} ready ({time.perf_counter() - t0:.0f} s)")
    else:
        from dtrak_core.evaluation.lds_own import shard_of

        shard = shard_of(_shard_arg(args))
        done = st.retrain(setting, args.data, args.jobs, args.checkpoints, shard=shard, device=args.device,
                          precision=args.precision)
        print(f"shard {shard[0]}/{shard[1]}: {len(done)} model(s) retrained into {args.checkpoints} in "
              f"{time.perf_counter() - t0:.0f} s")


def cmd_build_baselines(args):
    from dtrak_core.attribution.tracin import build_default_baselines
    from dtrak_core.folder import ModelFolder
    from dtrak_core.setting import build_baselines

    _set_threads(args.threads)
    folder = ModelFolder.load(args.root, missing_ok=True, tuned=False)
    if folder is not None and not folder.is_digits_default:  # a model trained from a setting, or refused
        entry = build_baselines(args.root)
    else:
        entry = build_default_baselines(args.root)
    print(json.dumps({k: entry[k] for k in ("checkpoints", "train_seconds", "featurize_seconds")}, indent=2))


def cmd_build_das(args):
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.das import build_residuals

    _check_model_root(args.root)
    _check_writable(args.root)
    t0 = time.perf_counter()
    path, computed = build_residuals(Attributor.load(args.root))
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)" if computed else f"{path} is already built for this model")


def cmd_methods(args):
    from dtrak_core.attribution import methods
    from dtrak_core.attribution.attributor import Attributor

    attributor = Attributor.load(args.root)
    missing = methods.unavailable(attributor, args.root)
    available = methods.available(attributor, args.root)
    report = {"available": available, "unavailable": missing,
              "baselines": {m.name: m.description for m in methods.all("baseline", "pixel")},
              "labels": {m.name: m.label for m in methods.all()},
              "menu": dict(methods.menu(available)),  # the available methods by group, the default first
              "unsigned": [m.name for m in methods.all() if not m.signed],  # no opponents listed
              "counterfactual": methods.counterfactual_rankings(available)}  # rankings `counterfactual` accepts
    print(json.dumps(report, indent=2))

def cmd_lds(args):
    from dtrak_core.evaluation.lds_evaluation import default_methods, default_run, evaluate, query_features
    from dtrak_core.evaluation.lds_run import LDSConfig
    from dtrak_core.evaluation.retrain import parse_shard

    if args.action == "tune-lambda" and _own_lds_run(args):  # a model of your own, measured with `lds-own`
        _tune_own(args.root, args.out, args.dest, args.bootstrap)
        return
    _require_digits_model(args.root, "lds (retrains on subsets)")
    if args.out is None:
        args.out = os.path.join(args.root, "benchmarks", "lds_run")
    if args.dest is None:
        args.dest = os.path.join(args.root, "benchmarks")
    _set_threads(args.threads)
    config = LDSConfig(num_subsets=args.subsets)
    if args.action == "check-timesteps":
        from dtrak_core.evaluation.lds_run import full_timestep_check

        done = full_timestep_check(args.out, _load_model(args.root)[1], max_subsets=args.check_subsets)
        print(f"all-1000-timestep ground truth for {len(done)} more models in {os.path.join(args.out, 'full_t')}")
        return
    if args.action == "run":
        from dtrak_core.evaluation.lds_own import shard_of

        shard = shard_of(parse_shard(args.shard))  # under torchrun: each rank its own jobs
        run = default_run(args.root, args.out, config)
        t0 = time.perf_counter()
        ran = run.run(shard=shard, batch_models=args.batch_models)
        print(f"{len(ran)} models retrained and measured in {time.perf_counter() - t0:.0f} s; results in {run.jobs_dir}")
        return
    if args.action in ("tables", "ensemble", "tune-lambda") or (args.action == "features" and (args.output_fn or args.journey or args.tracin)):
        _lds_tables(args)
        return
    unet, scheduler, methods, feats = default_methods(args.root, args.methods, args.K)
    if args.action == "features":
        run = default_run(args.root, args.out, config)
        run.prepare()
        for name, setting in methods.items():
            for set_name, images in run.test_sets.items():
                query_features(unet, scheduler, setting, images, os.path.join(args.out, "queries", set_name, setting.slug))
        print(f"query features of {sorted(run.test_sets)} for {sorted(methods)} in {os.path.join(args.out, 'queries')}")
        return
    results = evaluate(args.out, unet, scheduler, methods, feats, dest=args.dest or None)
    label = f"PARTIAL: {results['subsets_done']} of {results['subsets_planned']} subsets" if results["partial"] else \
        f"{results['subsets_done']} subsets"
    print(f"LDS x 100 ({label}, {len(results['train_seeds'])} training seeds each)")
    for name, per_set in results["methods"].items():
        for set_name in ("validation", "generated"):
            r = per_set[set_name]
            print(f"  {name:8s} {set_name:10s} paper-lambda {r['paper']['lds']:6.2f} +- {r['paper']['pm']:.2f}   "
                  f"honest {r['honest']['lds']:6.2f} +- {r['honest']['pm']:.2f}   default {r['default']['lds']:6.2f} +- {r['default']['pm']:.2f}")
    for set_name, c in results["noise_ceiling"].items():
        print(f"  noise ceiling {set_name}: seed-vs-seed {c['seed_vs_seed']:.2f} +- {c['seed_vs_seed_pm']:.2f}, "
              f"ceiling for the {c['seeds']}-seed mean {c['ceiling']:.2f}")
    if args.dest:
        print(f"wrote {os.path.join(args.dest, 'lds_results.json')} and lds_ground_truth.npz")


def _lds_tables(args):
    from dtrak_core.evaluation import tables as bm
    from dtrak_core.evaluation.tables_report import format_report, tables
    from dtrak_core.evaluation.tuning import tune_lambdas

    bench = bm.Bench(args.out, args.root, tuned=args.action != "tune-lambda")  # (tune-lambda replaces them)
    Ks = args.K_list or [args.K]
    if args.action == "features":
        for fn in args.output_fn or []:
            for K in Ks:
                t0 = time.perf_counter()
                bench.features.compute(bench.setting(fn, K))
                print(f"features of {fn} K={K} (training set + test sets) ready in {time.perf_counter() - t0:.0f} s")
        if args.journey:
            bm.journey_features(bench, bench.setting("loss", bench.journey_K), compute=True)
            print("journey-trak features of the generated test set ready")
        if args.tracin:
            from dtrak_core.attribution.tracin import load_tracin

            bm.tracin_queries(bench, load_tracin(args.root, bench.attributor), compute=True)
            print("TracInCP test-set features ready")
        return
    if args.action == "ensemble":
        for j in range(args.models):
            t0 = time.perf_counter()
            member = bench.member(j, train=True)
            for fn in args.output_fn or ["loss", "square"]:
                for K in Ks:
                    member.compute(bench.setting(fn, K))
            print(f"ensemble member {j} ready ({time.perf_counter() - t0:.0f} s)")
        return
    if args.action == "tune-lambda":
        _print_tuned(tune_lambdas(args.out, args.root), args.root)
        return
    out = tables(args.out, args.root, dest=args.dest or None, num_bootstrap=args.bootstrap, which=args.only)
    print(format_report(out))


def cmd_build_fashion(args):
    from dtrak_core import fashion
    from dtrak_core.evaluation.lds_own import shard_of

    _set_threads(args.threads)
    fashion.build_fashion(args.root or fashion.DEFAULT_ROOT, args.source or fashion.DEFAULT_SOURCE,
                          tuple(args.stage or fashion.STAGES), shard=shard_of(_shard_arg(args)))


def _prog() -> str:
    """The name the help shows: `dtrak` when run as the console script, else `python -m dtrak_core`."""
    return "dtrak" if os.path.basename(sys.argv[0] or "") in ("dtrak", "dtrak.exe") else "python -m dtrak_core"


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser, built without importing torch (or anything heavy): every command
    imports what it needs when it runs, the text-to-image commands included."""
    parser = argparse.ArgumentParser(prog=_prog(), description="D-TRAK data attribution for diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-default", help="train the default digits model and build its feature stores")
    _add_root(p)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the committed recipe)")
    p.set_defaults(func=cmd_build_default)

    p = sub.add_parser("build-fashion", help="the Fashion-MNIST model folder from Debian's dataset-fashion-mnist "
                                             "(resumable: data, classifier, model, folder, lds, counterfactual)")
    p.add_argument("--root", default=os.path.join("assets", "fashion"), help="the folder to write (default assets/fashion)")
    p.add_argument("--source", default=None, help="the IDX files (default: where the Debian package installs them)")
    p.add_argument("--stage", nargs="+", default=None, help="only these stages, in the given order (default: all)")
    p.add_argument("--shard", default=None, help="lds / counterfactual: this process's share of the retrains (i/n)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.set_defaults(func=cmd_build_fashion)

    p = sub.add_parser("build", help="feature stores for your own diffusers model and training images")
    p.add_argument("--root", required=True, help="folder to write (manifest + stores); the model and images stay where they are")
    p.add_argument("--model", required=True,
                   help="folder with unet/ + scheduler/ (a saved DDPM/DDIM pipeline), or a repo id in the local Hugging Face cache")
    p.add_argument("--data", required=True, help="folder of the training images (class sub-folders give labels)")
    p.add_argument("--invert", action="store_true", help="the images have dark ink on a light background")
    p.add_argument("--input-range", default="-1,1", type=_input_range, metavar="LOW,HIGH",
                   help="the pixel range the model was trained on: -1,1 (default) or e.g. 0,1 (a negative LOW as "
                        "--input-range=-1,1); the images are mapped to it, the manifest records it and queries "
                        "outside it are refused")
    p.add_argument("--output-fn", nargs="+", default=["square", "loss"], help="stores to build (default: square loss)")
    p.add_argument("--K", type=int, default=100, help="timesteps per feature (default 100)")
    p.add_argument("--projector", choices=("sparse-jl", "dense-gaussian"), default="sparse-jl")
    p.add_argument("--k", type=int, default=2048, help="projected dimension (default 2048)")
    p.add_argument("--manifest-only", action="store_true",
                   help="write the model folder's manifest only, no stores (fill them with `featurize --device ...`, "
                        "or under torchrun)")
    p.add_argument("--device", default="cpu", help="where the features' gradients are computed: cpu (default), cuda, "
                                                   "cuda:<i> or mps; an unavailable one is refused before any work")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="the model's forward passes outside the features (checked against --device; fp16 needs a "
                        "GPU); the features themselves are float32 on every device, whatever this says "
                        "(attribution ranks small differences; devices.py)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("generate", help="generate images from seeds")
    _add_root(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=1, help="images from seeds seed..seed+count-1")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscaling of the PNG")
    p.add_argument("--out", default=None, help="PNG path")
    _add_device(p, precision=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("attribute", help="top proponents and opponents of a generated or given image")
    _add_root(p)
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--seed", type=int, help="attribute the image generated from this seed (DDIM 50)")
    q.add_argument("--image", help="attribute this image file")
    p.add_argument("--invert", action="store_true", help="the image has dark ink on a light background")
    p.add_argument("--prompt", default=None, help="text-to-image folders: the query's prompt (e.g. \"a handwritten digit 7\")")
    p.add_argument("--method", default=None, help="d-trak, trak, an output function or a baseline (see `methods`; "
                                                  "default: the registry's default, avg, else d-trak)")
    p.add_argument("--K", type=int, default=None, help="timesteps of the store to use (default: the largest)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="ridge lambda (default: the documented rule)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true")
    _add_device(p)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("featurize", help="build (or finish) a feature store for any setting")
    _add_root(p)
    p.add_argument("--output-fn", default="square", help="loss, square, avg, l1-norm, l2-norm, linf-norm, elbo, eta=<e>")
    p.add_argument("--K", type=int, default=100, help="timesteps (10, 100 or 1000)")
    p.add_argument("--projector", default="sparse-jl", choices=("sparse-jl", "dense-gaussian"))
    p.add_argument("--k", type=int, default=2048, help="projected dimension")
    p.add_argument("--projector-seed", type=int, default=42)
    _add_device(p)
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("migrate-stores", help="add the metadata checksum to feature stores written by an older dtrak "
                                              "(verifies their features first)")
    p.add_argument("folders", nargs="+", help="store folders, or folders searched for stores (e.g. assets)")
    p.set_defaults(func=cmd_migrate_stores)

    p = sub.add_parser("quality", help="sample quality: classifier confidence and class histogram")
    _add_root(p)
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.set_defaults(func=cmd_quality)
    p = sub.add_parser("counterfactual", help="remove each target's top proponents, retrain, regenerate, measure")
    _add_root(p)
    p.add_argument("--out", default=None,
                   help="results folder (jobs/, summary.json, results.md, gallery/; default: <root>/counterfactual)")
    p.add_argument("--targets", type=int, default=60, help="number of target seeds (default 60, as in the paper)")
    p.add_argument("--first-seed", type=int, default=1000, help="targets are seeds first-seed .. first-seed+targets-1")
    p.add_argument("--rankings", default="d-trak,trak,random", help="comma-separated: d-trak, trak, random or any method with a store")
    p.add_argument("--k", action="append", default=None,
                   help="training images to remove: a count (300), fraction (0.2) or percentage (20%%); repeat for several "
                        "(default: 20%% then 5%%)")
    p.add_argument("--shard", default=None, help="run only jobs i, i+n, ... (e.g. 0/4; a SLURM array task each; "
                                                 "under torchrun each rank its own)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-control", action="store_true", help="skip the nothing-removed control retrain")
    p.add_argument("--summary-only", action="store_true", help="only summarize finished jobs")
    p.add_argument("--gallery", type=int, default=3, help="before/after PNGs for this many targets (0: none)")
    p.set_defaults(func=cmd_counterfactual)

    p = sub.add_parser("build-baselines", help="TracInCP checkpoints (replayed training run) and their feature stores")
    _add_root(p)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads: the original run's, for an identical replay (build-fashion trains on 1)")
    p.set_defaults(func=cmd_build_baselines)

    p = sub.add_parser("build-das", help="DAS's training losses (das_residuals.npz: N x 100 forward passes) for the "
                                         "model folder; DAS is unavailable until they are built")
    _add_root(p)
    p.set_defaults(func=cmd_build_das)

    p = sub.add_parser("methods", help="attribution methods that can run on this model (and why others cannot)")
    _add_root(p)
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("lds", help="LDS benchmark: retrain on random half-subsets, then score methods against them")
    _add_root(p)
    p.add_argument("action", choices=("run", "features", "evaluate", "check-timesteps", "ensemble", "tables", "tune-lambda"),
                   help="run: retrain + ground truth (resumable); features: training- and test-set features "
                        "(cached, resumable); evaluate: D-TRAK/TRAK LDS + noise ceiling + timestep check; "
                        "check-timesteps: all-1000-timestep ground truth for finished models; ensemble: train and "
                        "featurize ensemble members; tables: every method's LDS -> tables.json / tables.md; "
                        "tune-lambda: each store's lambda chosen on the validation LDS -> manifest.json (a folder "
                        "built with `build`: --out its `lds-own` run, as `lds-own tune-lambda` does)")
    p.add_argument("--check-subsets", type=int, default=None, help="check-timesteps: at most this many subsets")
    p.add_argument("--out", default=None,
                   help="run folder (default <root>/benchmarks/lds_run: its small job results are committed)")
    p.add_argument("--dest", default=None, help="evaluate: where results go (default <root>/benchmarks; '' = nowhere)")
    p.add_argument("--subsets", type=int, default=64, help="M, number of random half-subsets (default 64)")
    p.add_argument("--shard", default=None, help="run: only jobs i, i+n, ... of the list: i/n (a SLURM array task "
                                                 "each; under torchrun each rank its own)")
    p.add_argument("--batch-models", type=int, default=1, help="models trained at once with torch.func (default 1)")
    p.add_argument("--methods", nargs="+", default=["d-trak", "trak"], help="methods with stores in --root")
    p.add_argument("--K", type=int, default=100, help="timesteps of the stores to use (default 100)")
    p.add_argument("--Ks", dest="K_list", type=int, nargs="+", default=None,
                   help="features/ensemble: several K at once (default: --K)")
    p.add_argument("--output-fn", nargs="+", default=None,
                   help="features: output functions to featurize (e.g. loss square elbo); ensemble: default loss square")
    p.add_argument("--journey", action="store_true", help="features: journey-trak features of the generated test set")
    p.add_argument("--tracin", action="store_true", help="features: test-set features at the TracInCP checkpoints")
    p.add_argument("--models", type=int, default=4, help="ensemble: members to train and featurize (default 4)")
    p.add_argument("--only", nargs="+", default=["methods", "ablation", "ensembles"],
                   choices=("methods", "ablation", "ensembles"), help="tables: which tables to (re)compute")
    p.add_argument("--bootstrap", type=int, default=1000, help="tables: bootstrap resamples (default 1000)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.set_defaults(func=cmd_lds)

    p = sub.add_parser("lds-own", help="LDS of your own model: subsets to retrain on with your training script, "
                                       "then ground truth and every method's LDS from your checkpoints")
    _add_root(p)
    p.add_argument("action", choices=("prepare", "ground-truth", "evaluate", "tune-lambda"),
                   help="prepare: the subsets (masks.npz) and the retrains to run (jobs.json); ground-truth: measure "
                        "your retrained checkpoints (resumable, shardable); evaluate: every method's LDS -> "
                        "tables.json / tables.md; tune-lambda: record each store's lambda measured on this run "
                        "(chosen on the validation LDS, or with no validation set on the generated samples, its LDS "
                        "cross-fitted) in the model folder's manifest.json, where attribute, the API and the app "
                        "take it from")
    p.add_argument("--out", required=True, help="the run folder (setup, masks, jobs.json, ground truth, features)")
    p.add_argument("--masks", default=None, help="prepare: your subsets, a .npy/.npz of M x N booleans or a .json of "
                                                 "M index lists (default: draw --subsets subsets)")
    p.add_argument("--subsets", type=int, default=None, help="prepare: M subsets to draw (default 64)")
    p.add_argument("--alpha", type=float, default=None, help="prepare: fraction of the training set per subset (0.5)")
    p.add_argument("--subset-seed", type=int, default=None, help="prepare: seed of the drawn subsets (default 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="prepare: training seeds per subset (1 2)")
    p.add_argument("--eval-timesteps", type=int, default=None, help="prepare: ground-truth timesteps (default 100)")
    p.add_argument("--noise-seeds", type=int, nargs="+", default=None, help="prepare: ground-truth noise draws (0 1 2)")
    p.add_argument("--generated", type=int, default=None, help="prepare: generated test samples, seeds 0..n-1 (256)")
    p.add_argument("--sample-steps", type=int, default=None, help="prepare: DDIM steps of the generated test samples (50)")
    p.add_argument("--validation", default=None, help="prepare: a folder of held-out images, a second test set")
    p.add_argument("--config", default=None, help="prepare: a setting (preset name such as cifar2, or a JSON file) whose "
                                                  "lds section gives the defaults of the options above")
    p.add_argument("--checkpoints", default=None, help="ground-truth: the folder of retrained models, <id>/ each "
                                                       "(or listed in checkpoints.json)")
    p.add_argument("--shard", default=None, help="ground-truth: only jobs i, i+n, ... (i/n; under torchrun: each rank)")
    p.add_argument("--partial", action="store_true", help="ground-truth: measure the checkpoints there, skip the missing")
    p.add_argument("--dest", default=None, help="evaluate, tune-lambda: where tables.json / tables.md are (default: "
                                                "--out)")
    p.add_argument("--K", type=int, default=None, help="evaluate: timesteps of the stores (default: the largest)")
    p.add_argument("--ceiling-run", default=None,
                   help="evaluate: a second run that retrained some of these subsets with another training seed "
                        "(prepare it with --masks and --seeds); the report then has the noise ceiling")
    p.add_argument("--bootstrap", type=int, default=1000, help="evaluate, tune-lambda: bootstrap resamples "
                                                                "(default 1000)")
    p.add_argument("--no-journey", action="store_true", help="evaluate: skip Journey-TRAK (a backward pass per "
                                                             "sampling step of each generated sample)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    _add_device(p)
    p.set_defaults(func=cmd_lds_own)

    p = sub.add_parser("counterfactual-own", help="counterfactual of your own model: the top proponents to remove, "
                                                  "then measure your checkpoints retrained without them")
    _add_root(p)
    p.add_argument("action", choices=("prepare", "measure"),
                   help="prepare: rank each target's proponents -> removals.json (the retrains to run); measure: "
                        "regenerate each target with its checkpoint -> summary.json / results.md")
    p.add_argument("--out", required=True, help="the results folder (removals.json, targets.npz, jobs/, results.md)")
    p.add_argument("--config", default=None, help="prepare: a setting (preset or JSON file) whose counterfactual "
                                                  "section gives the defaults of the options below")
    p.add_argument("--targets", type=int, default=None, help="prepare: number of target seeds (default 60)")
    p.add_argument("--first-seed", type=int, default=None, help="prepare: targets are seeds first-seed ... (1000)")
    p.add_argument("--rankings", default=None, help="prepare: comma-separated rankings (d-trak,trak,random)")
    p.add_argument("--k", action="append", default=None, help="prepare: images to remove, a count, fraction or "
                                                              "percentage; repeat for several (default 20%%)")
    p.add_argument("--checkpoints", default=None, help="measure: the folder of retrained models, <id>/ each")
    p.add_argument("--shard", default=None, help="measure: only jobs i, i+n, ... (i/n)")
    p.add_argument("--partial", action="store_true", help="measure: the checkpoints there, skip the missing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.set_defaults(func=cmd_counterfactual_own)

    p = sub.add_parser("setting", help="a documented experimental setting (the paper's CIFAR-2: --config cifar2): "
                                       "its data, base model, model folder and retrains")
    p.add_argument("action", choices=("show", "data", "train", "build", "retrain"),
                   help="show: what the setting is; data: the training and validation image folders; train: the "
                        "base model; build: its model folder and feature stores; retrain: the LDS / counterfactual "
                        "retrains of a jobs.json or removals.json (resumable, shardable)")
    p.add_argument("--config", required=True, help="a preset name (cifar2) or a JSON file of the same form")
    p.add_argument("--json", action="store_true", help="show: print the whole config as JSON (only the JSON, "
                                                       "instead of the description)")
    p.add_argument("--source", default=None, help="data: the unpacked cifar-10-batches-py folder, or an image folder "
                                                  "with train/<class>/ and test/<class>/")
    p.add_argument("--data", default=None, help="the setting's data folder (written by `setting data`)")
    p.add_argument("--model", default=None, help="train: where the base model goes; build: the base model")
    p.add_argument("--root", default=None, help="build: the model folder to write")
    p.add_argument("--manifest-only", action="store_true", help="build: no stores (fill them with torchrun featurize)")
    p.add_argument("--jobs", default=None, help="retrain: jobs.json (lds-own prepare) or removals.json "
                                                "(counterfactual-own prepare)")
    p.add_argument("--checkpoints", default=None, help="retrain: where the retrained UNets go, <id>/ each")
    p.add_argument("--shard", default=None, help="retrain: only jobs i, i+n, ... (i/n; a SLURM array task each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    _add_device(p, precision=True)
    p.set_defaults(func=cmd_setting)

    p = sub.add_parser("study", help="attribution quality per compute on the default: exact kernels, the projection "
                                     "dimension, DAS, EK-FAC (resumable steps, then lds and publish)")
    p.add_argument("step", choices=["gradients", "kernels", "residuals", "kfac", "lds", "publish"])
    p.add_argument("--run", default=None, help="run folder (git-ignored; default assets/benchmarks/lds_run/study)")
    p.add_argument("--root", default="assets", help="the default model folder")
    p.add_argument("--output-fn", nargs="+", default=["square", "loss", "avg"])
    p.add_argument("--K", type=int, default=100)
    p.add_argument("--k", nargs="+", default=None, help="kernels: projection dims ('exact' included by default)")
    p.add_argument("--unit-timesteps", action="store_true", help="normalise each timestep's gradient (DAS code)")
    p.add_argument("--samples", type=int, default=None, help="kfac: draws per image per pass (default 4)")
    p.add_argument("--only", nargs="+", default=None, help="lds: cells whose name starts with these")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--redo", action="store_true", help="lds: recompute cells already in study.json")
    p.add_argument("--minutes", type=float, default=None, help="stop cleanly after this long (resume later)")
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("checksums", help="record the checksums of result files, after reading each whole (for "
                                         "results written before dtrak recorded checksums; never for files edited by "
                                         "hand): a folder's every .npz, .json and .png (its sidecar then lists exactly "
                                         "those), or one file (added to its folder's sidecar)")
    p.add_argument("paths", nargs="+", metavar="FOLDER_OR_FILE")
    p.set_defaults(func=cmd_checksums)

    from dtrak_core import space  # `space export DIR [--push REPO_ID]`

    space.add_parser(sub)
    from dtrak_core.text2image import cli as text2image_cli  # build-text2image, generate-text2image, lds-text2image

    text2image_cli.add_commands(sub)
    return parser


def cmd_study(args):
    from dtrak_core.evaluation import study

    study.run_step(args)


def cmd_checksums(args):
    from dtrak_core import checksums

    for path in args.paths:
        try:
            sidecar, entries = checksums.record_path(path)
        except OSError as e:
            raise ValueError(str(e)) from None
        print(f"{sidecar}: {len(entries)} file(s)")


def _missing_module(e: ModuleNotFoundError) -> int:
    """An optional dependency that is not installed: the extras that bring it (then exit status 2);
    any other missing module is a real error (re-raised)."""
    top = (e.name or "").split(".")[0]
    if top not in EXTRAS:
        raise e
    extra = EXTRAS[top]
    print(f"error: this command needs the Python package {top!r}, which is not installed; install dtrak's "
          f"{extra} extras: pip install .[{extra}] (in the dtrak checkout)", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    root_defaulted = getattr(args, "root", "") is None
    if root_defaulted:
        from dtrak_core.folder import default_root

        args.root = default_root()
    try:
        args.func(args)
    except ModuleNotFoundError as e:
        return _missing_module(e)
    except ValueError as e:
        message = str(e)
        if root_defaulted and repr(args.root) in message and not os.path.isfile(os.path.join(args.root,
                                                                                             "manifest.json")):
            from dtrak_core.errors import no_model_folder

            message += f"\n  ({no_model_folder(args.root, '--root DIR')})"
        print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a disk that fills up or turns read-only midway: the file and the reason
        where = e.filename if e.filename is not None else ""
        print(f"error: {where}{': ' if where else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0
