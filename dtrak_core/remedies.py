"""What to do about a damaged file: the command that builds again what a model folder holds, written
to run as printed (its --root, unless it is the built-in default: `errors.root_option`; your own
model's and data's paths from what can be read of its manifest). Each is found from where the file
lies and from what the folder's manifest.json says (or, when that is damaged, its layout): read here
for a hint only (`folder.ModelFolder` reads it for use). This module reads files only and imports
nothing of dtrak but `errors`, so that every loader can use it."""
from __future__ import annotations

import json
import os
import shlex

from dtrak_core.errors import root_option

MANIFEST = "manifest.json"


def _readable_manifest(root: str) -> dict:
    """What can still be read of root's manifest.json: its content, {} when it is missing or not JSON."""
    try:
        with open(os.path.join(root, MANIFEST)) as f:
            content = json.load(f)
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def is_text2image(root: str, manifest: dict | None = None) -> bool:
    """A text-to-image folder: kind "text2image" in its manifest (`manifest`, else what can be read of
    root's), or, when that is damaged, in what remains of it or in its layout (pipeline/ and lora/)."""
    manifest = _readable_manifest(root) if manifest is None else manifest
    if manifest:
        return manifest.get("kind") == "text2image"
    try:
        with open(os.path.join(root, MANIFEST), "rb") as f:
            raw = f.read(1 << 20)
    except OSError:
        raw = b""
    return b'"text2image"' in raw or all(os.path.isdir(os.path.join(root, d)) for d in ("pipeline", "lora"))


def _arg(value) -> str:
    return shlex.quote(str(value))


def build_command(root: str, manifest: dict | None = None) -> str:
    """The command that builds (or finishes) the model folder at `root` the way it was built, to run
    as printed: its --root (`root_option`: none for the built-in default), and for a folder of your
    own model the model and data its manifest records (`manifest`, else what can be read of root's;
    a placeholder in capitals where it no longer says). build-text2image for a text-to-image folder,
    `build` for your own model and images, build-default for the digits default."""
    manifest = _readable_manifest(root) if manifest is None else manifest
    data = manifest.get("dataset")
    folder = data.get("folder") if isinstance(data, dict) else None
    if isinstance(folder, str) and not os.path.isabs(folder):
        folder = os.path.join(root, folder)  # data kept inside the model folder
    # the model as the build takes it: the folder's own checkpoint when it lies inside the folder,
    # else the source it was built from (a path, or a repo id of the local Hugging Face cache)
    checkpoint = manifest.get("checkpoint")
    inside = isinstance(checkpoint, str) and not os.path.isabs(checkpoint)
    model = os.path.join(root, checkpoint) if inside else (manifest.get("model_source") or checkpoint)
    if is_text2image(root, manifest):
        lora = manifest.get("lora")
        if manifest.get("model_source") or (isinstance(lora, str) and os.path.isabs(lora)):  # your own pipeline
            return (f"python -m dtrak_core build-text2image --root {_arg(root)} --pipeline {_arg(model or 'PIPELINE')} "
                    f"--lora {_arg(lora if isinstance(lora, str) else 'LORA')} --data {_arg(folder or 'IMAGES')}")
        return f"python -m dtrak_core build-text2image --root {_arg(root)}"
    if _setting_name(root) == "fashion-mnist":  # the documented setting's folder, built from its own model
        return f"python -m dtrak_core build-fashion --root {_arg(root)} --stage folder"
    if manifest.get("model_source") or folder:  # your own model and images (`build`)
        model = model or "MODEL"
        invert = " --invert" if isinstance(data, dict) and data.get("invert") else ""
        return (f"python -m dtrak_core build --root {_arg(root)} --model {_arg(model)} --data "
                f"{_arg(folder or 'IMAGES')}{invert}{_store_options(manifest.get('stores'))}")
    return f"python -m dtrak_core build-default{root_option(root)}"


def _store_setting(name: str) -> tuple | None:
    """(output_fn, K, projector, k, seed) of a store folder named by `FeatureSetting.slug`, else None."""
    import re

    found = re.fullmatch(r"(.+)-K(\d+)-(sparse-jl|dense-gaussian)-k(\d+)-s(\d+)", name)
    if found is None:
        return None
    fn, K, projector, k, seed = found.groups()
    if re.fullmatch(r"eta[0-9.]+", fn):  # the slug drops the '=' of eta=<e>
        fn = "eta=" + fn[3:]
    return fn, K, projector, k, seed


def _store_options(stores) -> str:
    """`build`'s options that build these stores again (`build` builds one K, projector and k for
    all, with the projector seed 42): '' for its default ones, or when they cannot be built by one run."""
    settings = [_store_setting(os.path.basename(os.path.normpath(s))) for s in stores or [] if isinstance(s, str)]
    if not settings or None in settings or len({s[1:] for s in settings}) != 1 or settings[0][4] != "42":
        return ""
    fns = list(dict.fromkeys(s[0] for s in settings))
    _, K, projector, k, _ = settings[0]
    if sorted(fns) == ["loss", "square"] and (K, projector, k) == ("100", "sparse-jl", "2048"):
        return ""
    return f" --output-fn {' '.join(_arg(fn) for fn in fns)} --K {K} --projector {projector} --k {k}"


def manifest_remedy(root: str, manifest: dict | None = None) -> str:
    """How to replace the folder's manifest when it is missing or damaged: delete it (every build
    command reads the manifest it finds, and refuses a damaged one) and build the folder again
    (`build_command`; a text-to-image folder by `is_text2image`), with the command for your own
    model too when what remains of the manifest no longer says how the folder was built."""
    manifest = _readable_manifest(root) if manifest is None else manifest
    command = build_command(root, manifest)
    what = "text-to-image model folder" if is_text2image(root, manifest) else "model folder"
    own = ""
    if " build " not in command and not is_text2image(root, manifest) and manifest.get("dataset") is None:
        own = f" (a folder of your own model: `python -m dtrak_core build --root {_arg(root)} --model MODEL --data IMAGES`)"
    first = "delete it and build" if os.path.exists(os.path.join(root, MANIFEST)) else "build"
    return f"{first} the {what} again with `{command}`{own}"


def _setting_name(root: str) -> str | None:
    """The documented setting (`setting.py`) whose base model root/model is, from its setting.json; None
    for any other model."""
    try:
        with open(os.path.join(root, "model", "setting.json")) as f:
            name = json.load(f)["setting"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None


def checkpoint_remedy(root: str, manifest: dict | None = None, restore: str | None = None) -> str:
    """How to replace the model folder's checkpoint (root/<checkpoint>: the model, or a text-to-image
    folder's base pipeline) when one of its files is damaged: restore it (`restore`: what to restore,
    default the whole folder), or train it again with the command that built it (the checkpoint
    folder deleted first, since a build reuses a checkpoint it finds); your own model only by
    restoring it (dtrak did not train it)."""
    manifest = _readable_manifest(root) if manifest is None else manifest
    t2i = is_text2image(root, manifest)
    ckpt = os.path.join(root, manifest.get("checkpoint") or ("pipeline" if t2i else "model"))
    restore = f"the {'pipeline' if t2i else 'checkpoint'} folder {ckpt}" if restore is None else restore
    if not t2i and _setting_name(root) == "fashion-mnist":
        return (f"restore {restore}, or delete {ckpt} and train it again with `python -m dtrak_core build-fashion "
                f"--root {_arg(root)} --stage model folder`")
    if manifest.get("model_source"):  # your own model: dtrak did not train it
        return f"restore {restore} (your own model: save it again as it was trained)"
    return f"restore {restore}, or delete {ckpt} and build the model folder again with `{build_command(root, manifest)}`"


def lora_remedy(file: str) -> str:
    """How to replace a damaged or missing LoRA weights file: restore it, or, for the LoRA of a
    text-to-image folder that dtrak trained (<root>/lora/), train it again with `build-text2image`."""
    lora_dir = os.path.dirname(os.path.normpath(file))
    root = os.path.dirname(lora_dir)
    manifest = _readable_manifest(root)
    if os.path.basename(lora_dir) == "lora" and is_text2image(root, manifest) and not manifest.get("model_source"):
        return (f"restore {file}, or train the LoRA again: delete {lora_dir} and run `{build_command(root, manifest)}` "
                f"(the stores are rebuilt for it)")
    return f"restore {file} (your own LoRA: save it again as it was trained)"


def store_command(path: str) -> str | None:
    """The command that builds the feature store folder `path` again (once it is deleted), to run as
    printed, from where it lies and its name (`FeatureSetting.slug`, since its metadata may be what is
    damaged): `build-baselines` for a TracInCP store (<root>/tracin/stores/step-<s>-<setting>),
    `featurize` with its setting for a store of a pixel model folder, `build-text2image` for a
    text-to-image folder's; None where it lies elsewhere."""
    path = os.path.normpath(path)
    name, stores = os.path.basename(path), os.path.dirname(path)
    if os.path.basename(stores) != "stores":
        return None
    root = os.path.dirname(stores)
    if os.path.basename(root) == "tracin" and name.startswith("step-"):
        return f"python -m dtrak_core build-baselines{root_option(os.path.dirname(root))}"
    setting = _store_setting(name)
    if setting is None or not (os.path.isfile(os.path.join(root, MANIFEST)) or is_text2image(root)):
        return None
    fn, K, projector, k, seed = setting
    if is_text2image(root):
        command = build_command(root)
        if (fn, K, projector, k, seed) in (("square", "100", "sparse-jl", "1024", "42"),
                                           ("loss", "100", "sparse-jl", "1024", "42")):
            return command
        if (projector, seed) != ("sparse-jl", "42"):
            return None  # build-text2image builds its default projector and seed only
        return f"{command} --output-fn {_arg(fn)} --K {K} --k {k}"
    return (f"python -m dtrak_core featurize{root_option(root)} --output-fn {_arg(fn)} --K {K} --projector "
            f"{projector} --k {k} --projector-seed {seed}")


def checkpoint_folder_remedy(path: str) -> str:
    """How to replace the checkpoint folder `path` when a file of it is damaged, from where it lies: a
    TracInCP checkpoint (<root>/tracin/checkpoints/step-<s>) by `build-baselines`, a model folder's own
    by `checkpoint_remedy`, anything else by restoring it."""
    path = os.path.normpath(path)
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints" and os.path.basename(os.path.dirname(parent)) == "tracin":
        return (f"restore the checkpoint folder {path}, or delete it and rebuild it with `python -m dtrak_core "
                f"build-baselines{root_option(os.path.dirname(os.path.dirname(parent)))}` (it replays the training run)")
    if os.path.isfile(os.path.join(parent, MANIFEST)):
        return checkpoint_remedy(parent)
    return f"restore the checkpoint folder {path} (for your own model: save the pipeline again)"


def result_writer(path: str) -> str | None:
    """The command that writes the precomputed result `path` again, sealed, to run as printed, from
    where it lies: <root>/benchmarks/{evidence,lds_results,sharpening,study}.json of a model folder
    and a text-to-image folder's <root>/lds/lds_results.json; None for any other file."""
    folder = os.path.dirname(os.path.normpath(path))
    name, root = os.path.basename(path), os.path.dirname(folder)
    where = os.path.basename(folder)
    if where == "lds" and name == "lds_results.json" and is_text2image(root):
        return f"python -m dtrak_core lds-text2image evaluate --root {_arg(root)} --out {_arg(folder)}"
    if where != "benchmarks":
        return None
    if name == "evidence.json":
        t2i = is_text2image(root)
        # an explicit --root for a text-to-image folder: the script's default is the digits'
        on = f" --text2image --root {_arg(root)}" if t2i else root_option(root)
        return f"python experiments/strong_baselines.py{on} --write"
    if name == "lds_results.json":
        return f"python -m dtrak_core lds evaluate{root_option(root)}"
    default = not root_option(root)  # these two write the embedded default's results only
    if name == "sharpening.json" and default:
        return "python experiments/sharpening.py --write"
    if name == "study.json" and default:
        return "python -m dtrak_core study publish"
    return None


def result_remedy(path: str) -> str:
    """How to fix a precomputed result the app shows that is damaged, edited or has no checksum:
    rewrite it with its writer (`result_writer`), which seals it, or, for a copy written before its
    writer sealed it, record it with `python -m dtrak_core checksums FILE` once it is the file its
    writer wrote."""
    writer = result_writer(path)
    legacy = (f"a copy its writer wrote before dtrak sealed these results is recorded with "
              f"`python -m dtrak_core checksums {_arg(path)}`")
    if writer is None:
        return f"restore the file its writer wrote ({legacy})"
    return f"rewrite it with `{writer}`, which seals it ({legacy})"
