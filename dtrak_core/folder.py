"""The model folder: one model, its training set and everything built for them, described by
manifest.json, which `ModelFolder` alone reads and writes.

    <root>/manifest.json             the fields of `ModelFolder`
    <root>/model/                    the checkpoint (unet/ + scheduler/), unless `checkpoint` points elsewhere
    <root>/stores/<setting>/         training-set feature stores (attribution/store.py)
    <root>/tracin/index.json         TracInCP checkpoints and their stores (`build-baselines`)
    <root>/counterfactual/, <root>/benchmarks/     evaluation results

    folder = ModelFolder.load("assets")           # fields and seals checked: an IntegrityError names manifest.json
    unet, scheduler = folder.load_model()         # configs checked (config_hash), weights (checkpoint_hash)
    train = folder.training_set()                 # the Dataset it was trained on
    ModelFolder.edit(root, tracin="tracin/index.json")   # read-modify-write, saved atomically

What an answer depends on besides the weights is sealed in the manifest: the checkpoint's config
files (`config_hash`) and the manifest's own settings, the training recipe and the tuned lambdas
(`settings_hash`, one hash per entry). `save` (and so `edit`) re-seals what its writer changed; an
entry changed by hand no longer matches its seal and is refused on load, naming manifest.json.

A folder is found by argument, else by the DTRAK_ASSETS environment variable, else ./assets
(`default_root`, the one place that default lives), so the installed package works from any
working directory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Callable

from dtrak_core.errors import IntegrityError, SealMismatch
from dtrak_core.files import atomic_write_json, folder_lock, json_hash, read_json
from dtrak_core.model.data import INPUT_RANGE, Dataset, load_dataset
from dtrak_core.model.training import TrainConfig
from dtrak_core.model.unet import CONFIG_NAMES, checkpoint_hash, config_file_hash, load_checkpoint, weights_named
from dtrak_core.remedies import MANIFEST, build_command, checkpoint_remedy, manifest_remedy

# manifest keys of a folder kind's own (kept in `extra`) that are sealed like the recipe: what each changes
SEALED_EXTRA = {"guidance_scale": "it is the classifier-free guidance of every text-to-image sample"}
ENV_ROOT = "DTRAK_ASSETS"


def path_in_root(root: str, path: str) -> str:
    """`path` relative to `root` when it lies inside it (a folder that carries its model and data can
    be moved or cloned), else absolute."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    rel = os.path.relpath(path, root)
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def default_root() -> str:
    """The model folder used when none is given: $DTRAK_ASSETS if set, else ./assets."""
    return os.environ.get(ENV_ROOT) or "assets"


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


@dataclass
class ModelFolder:
    """What manifest.json records about a model folder; every field but `root` is one manifest key.

    Load with `load` (validated), change with `edit` (read-modify-write under a lock, atomic save).
    A field is None (or empty) when the manifest does not record it: a folder built with `build` for
    your own model has no train_config, a folder without TracInCP checkpoints no `tracin`.
    """

    root: str  # the folder (not written into the manifest)
    checkpoint: str | None = None  # checkpoint folder, relative to root ("model"), or absolute for `build`
    checkpoint_hash: str | None = None  # `unet.checkpoint_hash` of the weights; loaded weights must match it
    config_hash: dict | None = None  # checkpoint config file ("unet/config.json", ...) -> `unet.config_hashes` of it
    dataset: str | dict | None = None  # the training set, as `data.load_dataset` reads it
    dataset_fingerprint: str | None = None  # `Dataset.fingerprint` of it (`build` records it and refuses other data)
    stores: list | None = None  # training-set feature store folders, relative to root
    featurize_seconds: dict = field(default_factory=dict)  # store folder -> seconds of its first full fill
    train_config: TrainConfig | None = None  # the recipe the model was trained with (None: not trained by dtrak)
    train_seconds: float | None = None  # how long that training took
    threads: int | None = None  # torch threads it was trained on (a bit-identical replay needs as many)
    torch_version: str | None = None  # torch that trained it (manifest key "torch")
    parameters: int | None = None  # trainable parameters of the UNet
    quality: dict | None = None  # sample-quality report of its generated images (evaluation/quality.py)
    tracin: str | None = None  # TracInCP index, relative to root (attribution/tracin.py)
    tuned_lambda: dict = field(default_factory=dict)  # store slug -> {"lambda": ..., how it was chosen}
    model_source: str | None = None  # what `build --model` was given (a folder or a Hugging Face repo id)
    num_train: int | None = None  # training images (`build`)
    input_range: list | None = None  # [low, high] of the pixels the model was trained on (None: [-1, 1], see `value_range`)
    settings_hash: dict | None = None  # sealed entry ("train_config", "tuned_lambda/<key>") -> `files.json_hash` of it
    extra: dict = field(default_factory=dict)  # manifest keys this version does not know, kept as they are

    # -- finding and loading ----------------------------------------------------------------------
    @property
    def path(self) -> str:
        return os.path.join(self.root, MANIFEST)

    @classmethod
    def load(cls, root: str | None = None, *, missing_ok: bool = False, tuned: bool = True) -> "ModelFolder | None":
        """The folder at `root` (None: `default_root()`), its manifest's fields and seals checked.

        No manifest: a ValueError saying how to build one (None with `missing_ok`). A damaged
        manifest, a field of the wrong type or a sealed entry edited by hand (`check_settings`): an
        `IntegrityError` naming manifest.json. tuned=False: the `tuned_lambda` entries are not
        checked, for a caller that does not use them (`lds tune-lambda`, which replaces them).
        """
        folder = cls._read(root, missing_ok)
        if folder is not None:
            folder.check_settings(tuned=tuned)
        return folder

    @classmethod
    def _read(cls, root: str | None, missing_ok: bool) -> "ModelFolder | None":
        """`load` without the seals' check (`edit` re-seals what its writer changes, nothing else)."""
        root = default_root() if root is None else root
        path = os.path.join(root, MANIFEST)
        if not os.path.isfile(path):
            if missing_ok:
                return None
            raise ValueError(f"no {MANIFEST} in {root!r}; {manifest_remedy(root)}")
        return cls.from_dict(root, read_json(path, "model manifest", manifest_remedy(root)))

    @classmethod
    def from_dict(cls, root: str, manifest: dict) -> "ModelFolder":
        """A folder from manifest.json's content; a field of the wrong type is an `IntegrityError`."""
        path = os.path.join(root, MANIFEST)

        def bad(key):
            return IntegrityError(path, f"(model manifest) has no valid {key!r} entry", manifest_remedy(root, manifest))

        def number(v, kinds=(int, float)):
            return isinstance(v, kinds) and not isinstance(v, bool)

        def hashes(v):
            return isinstance(v, dict) and all(isinstance(k, str) and isinstance(h, str) for k, h in v.items())

        checks = {
            "checkpoint": lambda v: isinstance(v, str), "checkpoint_hash": lambda v: isinstance(v, str),
            "dataset": lambda v: isinstance(v, (str, dict)), "dataset_fingerprint": lambda v: isinstance(v, str),
            "stores": lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
            "featurize_seconds": lambda v: isinstance(v, dict) and all(number(x) for x in v.values()),
            "train_config": lambda v: isinstance(v, dict), "train_seconds": number,
            "threads": lambda v: number(v, int) and v > 0, "torch": lambda v: isinstance(v, str),
            "parameters": lambda v: number(v, int), "quality": lambda v: isinstance(v, dict),
            "tracin": lambda v: isinstance(v, str),
            "tuned_lambda": lambda v: isinstance(v, dict) and all(
                isinstance(e, dict) and number(e.get("lambda")) for e in v.values()),
            "model_source": lambda v: isinstance(v, str), "num_train": lambda v: number(v, int),
            "input_range": lambda v: isinstance(v, list) and len(v) == 2 and all(number(x) for x in v) and v[0] < v[1],
            "config_hash": hashes, "settings_hash": hashes,
        }
        values, extra = {}, {}
        for key, value in manifest.items():
            if key not in checks:
                extra[key] = value
                continue
            if value is None:  # recorded as unknown
                continue
            if not checks[key](value):
                raise bad(key)
            values["torch_version" if key == "torch" else key] = value
        if "train_config" in values:
            cfg = dict(values["train_config"])
            if isinstance(cfg.get("block_out_channels"), list):
                cfg["block_out_channels"] = tuple(cfg["block_out_channels"])
            try:
                values["train_config"] = TrainConfig(**cfg)
            except TypeError:  # a missing or unknown recipe field
                raise bad("train_config") from None
        folder = cls(root, **values, extra=extra)
        folder._loaded = folder.sealed_entries()  # what `save` compares against: an entry it changed is re-sealed
        return folder

    def to_dict(self) -> dict:
        """manifest.json's content: the fields that are set (JSON types), then the unknown keys."""
        out = dict(self.extra)
        for f in fields(self):
            if f.name in ("root", "extra"):
                continue
            value = getattr(self, f.name)
            if value is None or (f.name in ("featurize_seconds", "tuned_lambda") and not value):
                continue
            if f.name == "train_config":
                value = _jsonable(value.to_dict())
            out["torch" if f.name == "torch_version" else f.name] = value
        return out

    # -- the seals ----------------------------------------------------------------------------------
    def sealed_entries(self) -> dict[str, str]:
        """{entry: `files.json_hash` of its value now} for the manifest entries an answer depends on:
        "train_config" (what a retrain replays), "tuned_lambda/<key>" for each tuned lambda and, in a
        text-to-image folder, "guidance_scale" (every sample's classifier-free guidance)."""
        out = {} if self.train_config is None else {"train_config": json_hash(_jsonable(self.train_config.to_dict()))}
        out.update({f"tuned_lambda/{key}": json_hash(entry) for key, entry in self.tuned_lambda.items()})
        out.update({key: json_hash(self.extra[key]) for key in SEALED_EXTRA if key in self.extra})
        return out

    def reseal(self, *keys: str) -> None:
        """Seal `keys` (entries of `sealed_entries`) at the next `save`, as for entries this process
        changed: for a writer that sets them to what they must be (a build), even to the value they
        had (a folder written before they were sealed gets its seals)."""
        loaded = dict(getattr(self, "_loaded", None) or {})
        for key in keys:
            loaded[key] = None
        self._loaded = loaded

    def check_settings(self, tuned: bool = True) -> None:
        """Every sealed entry matches its seal in `settings_hash` (none recorded, an older folder:
        nothing to check); else a `SealMismatch` (an `IntegrityError`) naming manifest.json, the entry
        and its fix.
        tuned=False: the tuned_lambda entries are skipped."""
        if self.settings_hash is None:
            return
        have, sealed = self.sealed_entries(), self.settings_hash
        for key in sorted(set(have) | set(sealed)):
            if have.get(key) == sealed.get(key) or (not tuned and key.startswith("tuned_lambda/")):
                continue
            if key in SEALED_EXTRA and key not in sealed:  # sealed by a writer from before it was sealed
                continue
            if key == "train_config":
                entry, why = "'train_config'", "it is the recipe a live retrain replays"
                remedy = f"rebuild the model folder with `python -m dtrak_core build-default --root {self.root}`"
            elif key in SEALED_EXTRA:
                entry, why = f"{key!r}", SEALED_EXTRA[key]
                remedy = (f"rebuild the model folder with `{build_command(self.root, self.to_dict())}` "
                          f"(it sets the value it was built with; the pipeline, LoRA and stores are reused)")
            else:
                entry, why = f"tuned_lambda[{key.split('/', 1)[1]!r}]", "the lambda changes the method's ranking"
                remedy = (f"re-run `python -m dtrak_core lds tune-lambda --root {self.root}`, which tunes the lambdas "
                          f"again and re-seals them")
            if key not in sealed:
                state = "has no seal in 'settings_hash' (it was added by hand)"
            elif key not in have:
                state = "is sealed in 'settings_hash' but missing (it was removed by hand)"
            else:
                state = (f"hashes to {have[key]}, not to its seal {sealed[key]} in 'settings_hash' (it was edited by "
                         f"hand)")
            raise SealMismatch(self.path, key, f"(model manifest) entry {entry} {state}; {why}", remedy)

    def _reseal(self) -> None:
        """Seal what this process changed: an entry changed since the manifest was read (or every
        entry of a new manifest) gets a new seal; an unchanged one keeps the seal it had, so that an
        entry edited by hand stays refused whoever saves the manifest next, and an older manifest
        with no seals keeps none until a writer changes a sealed entry."""
        now, loaded = self.sealed_entries(), getattr(self, "_loaded", None)
        if loaded is not None and now == loaded:
            return
        if loaded is None or self.settings_hash is None:
            self.settings_hash = dict(now) or None
            return
        seal = {}
        for key, h in now.items():
            if loaded.get(key) != h:
                seal[key] = h
            elif key in self.settings_hash:
                seal[key] = self.settings_hash[key]
        self.settings_hash = seal or None

    @property
    def text2image(self) -> bool:
        return self.extra.get("kind") == "text2image"

    @property
    def remedy(self) -> str:
        """What to do when its manifest lacks an entry: delete it and build the folder again
        (`remedies.manifest_remedy`: the command that built it, on this folder)."""
        return manifest_remedy(self.root, self.to_dict())

    def require(self, *keys: str) -> "ModelFolder":
        """self, or an `IntegrityError` naming manifest.json for the first of `keys` it lacks."""
        for key in keys:
            if getattr(self, key) is None:
                raise IntegrityError(self.path, f"(model manifest) has no valid {key!r} entry", self.remedy)
        return self

    # -- saving -----------------------------------------------------------------------------------
    def save(self) -> None:
        """Write manifest.json atomically (a killed process leaves the old one or this one), the
        entries this process changed re-sealed (`_reseal`)."""
        self._reseal()
        atomic_write_json(self.path, self.to_dict())
        self._loaded = self.sealed_entries()

    @classmethod
    def edit(cls, root: str, change: Callable[["ModelFolder"], None] | None = None, **values) -> "ModelFolder":
        """Read-modify-write: load the manifest under `root` (an empty folder when there is none),
        set `values` (field name -> value), apply `change(folder)`, save atomically; the saved folder.

        Concurrent edits of one folder (two featurize runs, a tuner) are serialised by an advisory
        lock on the folder, so none loses another's change.
        """
        os.makedirs(root, exist_ok=True)
        with folder_lock(root):
            folder = cls._read(root, missing_ok=True) or cls(root)
            for key, value in values.items():
                if key in ("root", "extra") or key not in {f.name for f in fields(cls)}:
                    raise TypeError(f"ModelFolder has no field {key!r}")
                setattr(folder, key, value)
            if change is not None:
                change(folder)
            folder.save()
        return folder

    def add_store(self, rel: str, seconds: float) -> None:
        """Register a store folder (relative to root); a store's first full fill keeps its timing."""
        self.stores = list(self.stores or [])
        if rel not in self.stores:
            self.stores.append(rel)
        self.featurize_seconds.setdefault(rel, seconds)

    # -- what it holds ----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> str:
        self.require("checkpoint")
        return os.path.join(self.root, self.checkpoint)

    def trained_with(self, config: TrainConfig) -> bool:
        """Whether the manifest records `config` as the model's recipe."""
        return self.train_config is not None and _jsonable(self.train_config.to_dict()) == _jsonable(config.to_dict())

    @property
    def is_digits_default(self) -> bool:
        """A digits model trained by dtrak (what the retraining harnesses can replay)."""
        return self.dataset == "digits-train" and self.train_config is not None

    def check_configs(self) -> None:
        """The checkpoint's config files are the ones the manifest recorded (`config_hash`, when
        recorded; an older folder has none): an edited architecture or noise schedule, which would
        change every answer, is refused, naming the edited file."""
        if not self.config_hash:
            return
        ckpt = self.checkpoint_path
        remedy = checkpoint_remedy(self.root, self.to_dict(), restore="the config file as it was built")
        for rel, want in sorted(self.config_hash.items()):
            have = config_file_hash(ckpt, rel, remedy)
            if have != want:
                path, what = os.path.join(ckpt, *rel.split("/")), CONFIG_NAMES.get(rel, "checkpoint config")
                raise IntegrityError(path, f"({what}) hashes to {have}, but {self.path} records config_hash "
                                     f"{want} for it (the config was edited; it changes every answer)", remedy)

    def check_weights(self, unet) -> None:
        """The checkpoint's configs (`check_configs`) and the loaded weights are the ones the manifest
        recorded (`checkpoint_hash`, when recorded): a replaced or damaged weights file that still
        loads is refused, not trusted."""
        self.check_configs()
        have = checkpoint_hash(unet)
        if self.checkpoint_hash is not None and self.checkpoint_hash != have:
            unet_dir = os.path.join(self.root, self.checkpoint or "model", "unet")
            raise IntegrityError(unet_dir, f"(model weights) hashes to {have}, but {self.path} records "
                                 f"checkpoint_hash {self.checkpoint_hash} ({weights_named(unet_dir)} was replaced "
                                 f"or is corrupt)", checkpoint_remedy(self.root, self.to_dict(), restore="the model's weights"))

    def load_model(self):
        """(unet, scheduler) of the checkpoint, its configs checked against `config_hash` (first: an
        edited config is named as such, not as weights that do not fit it), its weights against
        `checkpoint_hash`."""
        self.check_configs()
        unet, scheduler = load_checkpoint(self.checkpoint_path)
        self.check_weights(unet)
        return unet, scheduler

    def training_set(self) -> Dataset:
        """The `Dataset` the manifest names; a ValueError naming manifest.json when it cannot be loaded."""
        self.require("dataset")
        spec = self.dataset
        if isinstance(spec, dict) and isinstance(spec.get("folder"), str) and not os.path.isabs(spec["folder"]):
            spec = {**spec, "folder": os.path.join(self.root, spec["folder"])}  # data kept inside the folder
        try:
            return load_dataset(spec)
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from None

    @property
    def value_range(self) -> tuple[float, float]:
        """(low, high) of the pixels the model was trained on, which query images must lie in: the
        manifest's `input_range`, else [-1, 1] (what every loader here scales to; a folder built
        before the range was recorded was trained on it)."""
        return INPUT_RANGE if self.input_range is None else (float(self.input_range[0]), float(self.input_range[1]))

    def tuned_lambdas(self) -> dict[str, float]:
        """Store slug -> the ridge lambda tuned on validation LDS (`lds tune-lambda`)."""
        return {slug: float(entry["lambda"]) for slug, entry in self.tuned_lambda.items()}


def read_manifest(root: str) -> dict:
    """manifest.json under `root` as a plain dict, checked by `ModelFolder` ({} when there is none)."""
    folder = ModelFolder.load(root, missing_ok=True)
    return {} if folder is None else folder.to_dict()
