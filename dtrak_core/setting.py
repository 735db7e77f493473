"""An experimental setting as a config file: data, UNet architecture, noise schedule, training
recipe, feature stores, LDS and counterfactual protocol. The paper's CIFAR-2 is the preset
`cifar2` (dtrak_core/configs/cifar2.json); docs/CIFAR2.md has its commands for one GPU and a cluster.

    setting = load_setting("cifar2")          # a preset name, or the path of a JSON file of the same form
    write_data(setting, "cifar-10-batches-py", "cifar2-data")         # train/ and validation/ image folders
    train_base(setting, "cifar2-data", "cifar2-model", device="cuda")  # the base model, a diffusers pipeline folder
    build_folder(setting, "cifar2-data", "cifar2-model", "cifar2")     # model folder + D-TRAK / TRAK stores
    retrain(setting, "cifar2-data", "lds/jobs.json", "ckpts", shard=(i, n))   # the LDS / counterfactual retrains

The UNet is built locally from the config's `unet` entry (a diffusers UNet2DModel config, or the
name of a local model folder / a repo in the local Hugging Face cache whose config is read; nothing is
downloaded). The retrains play the part of "your own training script" of `evaluation.lds_own`:
they train each job of its jobs.json (LDS, with the job's seed) or removals.json (counterfactual,
with the base recipe's seed, as the paper retrains) and save the UNet as <checkpoints>/<id>/.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np

from dtrak_core.files import atomic_write_json, read_json

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SECTIONS = ("name", "description", "data", "unet", "scheduler", "train", "features", "lds", "counterfactual")
DATA_MARKER = "data.json"  # written last into the data folder: what it holds, from what
MODEL_MARKER = "setting.json"  # written into the base model's folder: the setting it was trained with
MODEL_KEYS = ("data", "unet", "scheduler", "train")  # the parts of a setting that make its base model
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# Fashion-MNIST's labels 0..9, named as folder names ("T-shirt/top" has a slash)
FASHION_MNIST_CLASSES = ("tshirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@dataclass(frozen=True)
class Setting:
    """A parsed config file (`load_setting`); `raw` is its JSON content, `path` where it was read."""

    raw: dict
    path: str

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def data(self) -> dict:
        return self.raw["data"]

    @property
    def unet(self) -> dict:
        """The UNet2DModel config: the `unet` entry itself, or, when it is a string, the config.json of
        that local model folder or Hugging Face repo id in the local cache (its architecture only:
        the setting trains from scratch; nothing is downloaded)."""
        spec = self.raw["unet"]
        if isinstance(spec, dict):
            return spec
        from dtrak_core.model.unet import resolve_model

        folder = resolve_model(spec)
        for path in (os.path.join(folder, "unet", "config.json"), os.path.join(folder, "config.json")):
            if os.path.isfile(path):
                config = read_json(path, "UNet config", f"restore the model {spec!r}, or write the config in the setting")
                return {k: v for k, v in config.items() if not k.startswith("_")}
        raise ValueError(f"{self.path}: unet {spec!r} ({folder}) has no unet/config.json")

    @property
    def train_config(self):
        from dtrak_core.model.training import TrainConfig

        return TrainConfig(**self.raw["train"])

    @property
    def feature_settings(self) -> list:
        from dtrak_core.attribution.features import FeatureSetting

        f = self.raw["features"]
        return [FeatureSetting(fn, K=int(f["K"]), k=int(f["k"]), projector=f.get("projector", "sparse-jl"))
                for fn in f["output_fns"]]

    @property
    def lds_config(self):
        from dtrak_core.evaluation.lds_run import LDSConfig

        return LDSConfig(**self.raw["lds"])

    @property
    def counterfactual(self) -> dict:
        return self.raw["counterfactual"]

    def scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(**self.raw["scheduler"])

    def build_unet(self, seed: int = 0):
        """A freshly initialised UNet of the config's architecture (built here, not downloaded)."""
        import torch
        from diffusers import UNet2DModel

        torch.manual_seed(seed)
        return UNet2DModel.from_config(self.unet)

    @property
    def resolution(self) -> int:
        return int(self.unet["sample_size"])

    @property
    def channels(self) -> int:
        return int(self.unet.get("in_channels", 3))


def load_setting(spec: str) -> Setting:
    """A preset name (`cifar2`: dtrak_core/configs/cifar2.json) or the path of a JSON config; its
    sections checked (a ValueError naming the file says which is missing or wrong)."""
    path = spec if spec.endswith(".json") or os.sep in spec else os.path.join(CONFIGS, f"{spec}.json")
    if not os.path.isfile(path):
        presets = sorted(f[:-5] for f in os.listdir(CONFIGS) if f.endswith(".json"))
        raise ValueError(f"no setting {spec!r}: not a preset ({', '.join(presets)}) nor a JSON file")
    import torch

    raw = read_json(path, "setting config", "restore it, or write one like dtrak_core/configs/cifar2.json")
    missing = [k for k in SECTIONS if k not in raw]
    if missing:
        raise ValueError(f"{path}: the setting lacks {', '.join(missing)} (see dtrak_core/configs/cifar2.json)")
    setting = Setting(raw, os.path.abspath(path))
    try:  # every section parses now, not hours into a run
        setting.train_config, setting.lds_config, setting.feature_settings, setting.scheduler()
        classes = raw["data"]["classes"]
        int(raw["data"]["train_per_class"]), int(raw["data"]["validation_per_class"])
        with torch.device("meta"):
            setting.build_unet()
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path}: {type(e).__name__}: {e} (see dtrak_core/configs/cifar2.json)") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}" if path not in str(e) else str(e)) from None
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"{path}: data.classes must name distinct classes, got {classes}")
    return setting


# -- data -----------------------------------------------------------------------------------------
class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR-10 batches (dicts of bytes, lists and numpy arrays) and nothing else: a
    pickle naming any other callable is refused rather than run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR-10 batch holds only arrays")


def _cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 32, 32, 3) uint8, labels (n,)) of one CIFAR-10 python batch file."""
    try:
        with open(path, "rb") as f:
            d = _ArraysOnly(f, encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); download "
                         f"cifar-10-python.tar.gz again and unpack it") from None
    if len(data) != len(labels):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _from_pickles(source: str) -> dict[str, dict[str, list]]:
    """{split: {class: [images]}} from the CIFAR-10 python batches in `source`."""
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(source, n))]
    if missing:
        raise ValueError(f"{source!r} lacks the CIFAR-10 batches {', '.join(missing)}; pass the unpacked "
                         f"cifar-10-batches-py folder (or an image folder with train/<class>/ and test/<class>/)")
    out = {"train": {}, "test": {}}
    for n in names:
        images, labels = _cifar_batch(os.path.join(source, n))
        split = out["test" if n == "test_batch" else "train"]
        for c, name in enumerate(CIFAR10_CLASSES):
            split.setdefault(name, []).extend(images[labels == c])
    return out


def _from_idx(source: str) -> dict[str, dict[str, list]]:
    """{split: {class: [images]}} from the Fashion-MNIST IDX files in `source` (each checked)."""
    from dtrak_core.model.idx import read_images_and_labels

    out = {}
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        images, labels = read_images_and_labels(os.path.join(source, images_file), os.path.join(source, labels_file))
        if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{os.path.join(source, labels_file)}: label {labels.max()} is not a Fashion-MNIST class "
                             f"(0..9); reinstall the dataset")
        out[split] = {name: list(images[labels == c]) for c, name in enumerate(FASHION_MNIST_CLASSES)}
    return out


def _from_folders(source: str, classes) -> dict[str, dict[str, list]]:
    """{split: {class: [image files]}} from source/train/<class>/ and source/test/<class>/."""
    from dtrak_core.model.data import IMAGE_SUFFIXES

    out = {}
    for split in ("train", "test"):
        out[split] = {}
        for name in classes:
            folder = os.path.join(source, split, name)
            if not os.path.isdir(folder):
                raise ValueError(f"{folder!r} does not exist; pass the unpacked cifar-10-batches-py folder, or an "
                                 f"image folder with train/<class>/ and test/<class>/ for the classes {list(classes)}")
            out[split][name] = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                                if f.lower().endswith(IMAGE_SUFFIXES)]
    return out


def selected(selection_seed: int, class_position: int, available: int, per_class: int) -> np.ndarray:
    """The sorted indices, among one class's `available` images of a split, that a setting's data
    folder takes (a permutation seeded by (selection_seed, class position), its first per_class)."""
    return np.sort(np.random.default_rng([selection_seed, class_position]).permutation(available)[:per_class])


def write_data(setting: Setting, source: str, out: str) -> dict:
    """The setting's training and validation images as out/train/<class>/ and out/validation/<class>/
    PNGs (the folders `build` and the LDS read), from the CIFAR-10 python batches or a train/ + test/
    class-folder layout in `source`. Per class, train_per_class images of the training split and
    validation_per_class of the test split, chosen by a permutation seeded by (selection_seed, class
    position), kept in their original order. Written into a temporary folder and renamed, with
    out/data.json last; a finished folder for the same setting and source is reused."""
    from PIL import Image

    d = setting.data
    classes = list(d["classes"])
    want = {"source": os.path.abspath(source), "data": d}
    marker = os.path.join(out, DATA_MARKER)
    if os.path.isfile(marker):
        have = read_json(marker, "data folder description", f"delete {out} and rerun `setting data`")
        if {k: have.get(k) for k in want} != want:
            raise ValueError(f"{out!r} holds data written from {have.get('source')!r} with {have.get('data')}, not this "
                             f"setting's; use another --data folder")
        return have
    if not os.path.isdir(source):
        raise ValueError(f"--source {source!r} does not exist; pass the unpacked cifar-10-batches-py folder")
    if os.path.isfile(os.path.join(source, "data_batch_1")):
        unknown = [c for c in classes if c not in CIFAR10_CLASSES]
        if unknown:
            raise ValueError(f"{setting.path}: {unknown} are not CIFAR-10 classes ({', '.join(CIFAR10_CLASSES)})")
        splits = _from_pickles(source)
    elif os.path.isfile(os.path.join(source, FASHION_MNIST_FILES["train"][0])):
        unknown = [c for c in classes if c not in FASHION_MNIST_CLASSES]
        if unknown:
            raise ValueError(f"{setting.path}: {unknown} are not Fashion-MNIST classes ({', '.join(FASHION_MNIST_CLASSES)})")
        splits = _from_idx(source)
    else:
        splits = _from_folders(source, classes)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-data-", dir=parent)
    counts = {}
    try:
        for split, target, per_class in (("train", "train", int(d["train_per_class"])),
                                         ("test", "validation", int(d["validation_per_class"]))):
            for c, name in enumerate(classes):
                items = splits[split][name]
                if len(items) < per_class:
                    raise ValueError(f"{source!r}: {split} has {len(items)} {name} images, the setting takes {per_class}")
                chosen = selected(int(d["selection_seed"]), c, len(items), per_class)
                folder = os.path.join(tmp, target, name)
                os.makedirs(folder)
                for j, i in enumerate(chosen):
                    item = items[i]
                    dest = os.path.join(folder, f"{j:05d}.png")
                    if isinstance(item, str):
                        with Image.open(item) as img:
                            img.convert("RGB" if setting.channels == 3 else "L").save(dest)
                    else:
                        Image.fromarray(item).save(dest)
                counts[f"{target}/{name}"] = int(per_class)
        if os.path.exists(out):
            shutil.rmtree(out)  # a folder without data.json: an earlier write that did not finish
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = {**want, "counts": counts}
    atomic_write_json(marker, done)
    return done


def _check_data(data: str) -> None:
    if not os.path.isfile(os.path.join(data, DATA_MARKER)):
        raise ValueError(f"--data {data!r} is not a setting's data folder (no {DATA_MARKER}); write it with "
                         f"`python -m dtrak_core setting data --config <setting> --source <cifar-10-batches-py> "
                         f"--data {data}`")


def training_images(setting: Setting, data: str):
    """The training `Dataset` of a data folder, at the setting's resolution (the order `build` reads)."""
    from dtrak_core.model.data import load_image_folder

    _check_data(data)
    return load_image_folder(os.path.join(data, "train"), setting.resolution, setting.channels)


# -- models ---------------------------------------------------------------------------------------
def train_base(setting: Setting, data: str, out: str, device="cpu", precision: str = "fp32",
               show_bar: bool = True) -> dict:
    """Train the base model with the setting's recipe on its training images and save it as a
    diffusers checkpoint folder (unet/ + scheduler/) at `out`, with out/setting.json; a folder
    trained with the same setting and data is reused. The description written."""
    from dtrak_core.model.training import train
    from dtrak_core.model.unet import checkpoint_hash, count_parameters, save_checkpoint

    train_set = training_images(setting, data)
    want = {"setting": setting.raw, "dataset_fingerprint": train_set.fingerprint}
    marker = os.path.join(out, MODEL_MARKER)
    if os.path.isfile(marker):
        have = read_json(marker, "base model description", f"delete {out} and rerun `setting train`")
        # only what makes the model: a changed evaluation plan (stores, LDS, counterfactual) keeps it
        made = dict(have.get("setting") or {}) if isinstance(have.get("setting"), dict) else {}
        if {k: made.get(k) for k in MODEL_KEYS} == {k: setting.raw.get(k) for k in MODEL_KEYS} and \
                have.get("dataset_fingerprint") == train_set.fingerprint:
            return have
        raise ValueError(f"{out!r} holds a model trained with another setting or data; use another --model folder")
    scheduler = setting.scheduler()
    t0 = time.perf_counter()
    unet = train(train_set.images, scheduler, setting.train_config, unet_config=setting.unet, device=device,
                 precision=precision, show_bar=show_bar)
    seconds = time.perf_counter() - t0
    save_checkpoint(out, unet, scheduler)
    done = {**want, "parameters": count_parameters(unet), "checkpoint_hash": checkpoint_hash(unet),
            "train_seconds": seconds, "device": str(device), "precision": precision}
    atomic_write_json(marker, done)
    return done


def build_folder(setting: Setting, data: str, model: str, root: str, stores: bool = True, device="cpu",
                 show_bar: bool = True) -> dict:
    """The model folder for the base model and its training images (`build.build_from`), with the
    setting's feature stores (stores=False: the manifest only, for `torchrun ... featurize`)."""
    from dtrak_core.build import build_from

    _check_data(data)
    return build_from(root, model, os.path.join(data, "train"), setting.feature_settings if stores else (),
                      show_bar=show_bar, device=device)


def build_baselines(root: str, show_bar: bool = True) -> dict:
    """TracInCP's and GAS's checkpoints for a model folder whose base model was trained from a setting
    (`train_base`: its model folder holds setting.json): the run replayed with that setting's recipe,
    architecture and the folder's training images (`tracin.build_tracin`, which checks that the
    replay ends at the model's own weights). Replay with the thread count the model was trained on."""
    from dtrak_core.attribution.tracin import build_tracin
    from dtrak_core.folder import ModelFolder
    from dtrak_core.model.unet import checkpoint_hash

    folder = ModelFolder.load(root)
    marker = os.path.join(root, folder.checkpoint or "", MODEL_MARKER)
    dataset = folder.dataset if isinstance(folder.dataset, dict) else {}
    if folder.checkpoint is None or not os.path.isfile(marker) or "folder" not in dataset:
        raise ValueError(f"build-baselines replays a training run it knows: the digits default (`build-default`) or a "
                         f"model trained from a setting (`setting train`, `build-fashion`: its model folder holds "
                         f"{MODEL_MARKER}); {root!r} has neither, so its training run cannot be replayed")
    made = read_json(marker, "base model description", f"restore {marker} (it records the training recipe)")
    setting = Setting(made["setting"], marker)
    train_set = training_images(setting, os.path.dirname(os.path.join(root, dataset["folder"])))
    if train_set.fingerprint != made.get("dataset_fingerprint"):
        raise ValueError(f"the training images of {root!r} (fingerprint {train_set.fingerprint}) are not the ones "
                         f"{marker} records ({made.get('dataset_fingerprint')}): the run cannot be replayed")
    unet, scheduler = folder.load_model()
    return build_tracin(root, train_set, scheduler, setting.train_config, expected_final=checkpoint_hash(unet),
                        unet_config=setting.unet, show_bar=show_bar)


def _read_jobs(path: str, n_train: int) -> tuple[list[dict], bool]:
    """(jobs, is_counterfactual) of an `lds_own` jobs.json or removals.json, checked against the data."""
    if not os.path.isfile(path):
        raise ValueError(f"--jobs {path!r} does not exist; write it with `lds-own prepare` (jobs.json) or "
                         f"`counterfactual-own prepare` (removals.json)")
    content = read_json(path, "retrain jobs", "rerun the prepare command that wrote it")
    jobs = content.get("jobs")
    if not isinstance(jobs, list) or not all(isinstance(j, dict) and "id" in j and "keep" in j for j in jobs):
        raise ValueError(f"{path}: expected {{\"jobs\": [{{\"id\": ..., \"keep\": [...]}}, ...]}} as `lds-own prepare` "
                         f"writes it")
    if content.get("num_train") != n_train:
        raise ValueError(f"{path} was written for a training set of {content.get('num_train')} images, the data "
                         f"folder has {n_train}; prepare the jobs for the model folder built from this data")
    ids = [j["id"] for j in jobs]
    for j in jobs:
        keep = j["keep"]
        if not (isinstance(j["id"], str) and j["id"] and os.sep not in j["id"] and not j["id"].startswith(".")):
            raise ValueError(f"{path}: job id {j['id']!r} is not a plain folder name")
        if not isinstance(keep, list) or not keep or not all(isinstance(i, int) and 0 <= i < n_train for i in keep):
            raise ValueError(f"{path}: job {j['id']!r} must keep a non-empty list of training indices in 0..{n_train - 1}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: job ids repeat; rerun the prepare command that wrote it")
    return jobs, any("ranking" in j for j in jobs)


def retrain(setting: Setting, data: str, jobs_path: str, checkpoints: str, shard=(0, 1), device="cpu",
            precision: str = "fp32", show_bar: bool = True) -> list[str]:
    """Train this shard's jobs (i, i+n, ...; under torchrun each rank its own) of a jobs.json (LDS:
    the job's seed) or removals.json (counterfactual: the recipe's own seed, as the base model) on
    their kept images with the setting's recipe, each saved with `save_pretrained` as
    checkpoints/<id>/ (written to a temporary folder, then renamed: resumable per job). The ids
    trained now."""
    import torch

    from dtrak_core.evaluation.lds_own import shard_of
    from dtrak_core.evaluation.retrain import retrain as retrain_subset

    train_set = training_images(setting, data)
    jobs, counterfactual = _read_jobs(jobs_path, len(train_set))
    i, n = shard_of(shard)
    scheduler = setting.scheduler()
    os.makedirs(checkpoints, exist_ok=True)
    done = []
    for job in jobs[i::n]:
        dest = os.path.join(checkpoints, job["id"])
        if os.path.isfile(os.path.join(dest, "config.json")):
            continue
        seed = setting.train_config.seed if counterfactual else int(job.get("train_seed", job["seed"]))
        unet = retrain_subset(train_set.images, np.asarray(job["keep"], dtype=np.int64), scheduler,
                              replace(setting.train_config, seed=seed), unet_config=setting.unet, device=device,
                              precision=precision, show_bar=show_bar)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{job['id']}-", dir=checkpoints)
        try:
            unet.save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(dest, ignore_errors=True)  # a folder without config.json: not a finished save
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        done.append(job["id"])
        del unet
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return done


def describe(setting: Setting) -> str:
    """A few lines on what the setting is: data, model size, recipe, stores and protocol."""
    import torch

    with torch.device("meta"):
        parameters = sum(p.numel() for p in setting.build_unet().parameters())
    d, t, f, l = setting.data, setting.raw["train"], setting.raw["features"], setting.raw["lds"]
    return "\n".join([
        f"{setting.name}: {setting.raw['description']}",
        f"data: {', '.join(d['classes'])}; {d['train_per_class']} training and {d['validation_per_class']} validation "
        f"images per class",
        f"UNet: {parameters:,} parameters, {setting.channels}x{setting.resolution}px, channels "
        f"{tuple(setting.unet['block_out_channels'])}",
        f"recipe: {t['steps']} steps, batch {t['batch_size']}, AdamW lr {t['lr']:g}, warm-up {t['warmup_fraction']:g}, "
        f"grad clip {t['grad_clip']:g}, seed {t['seed']}",
        f"stores: {', '.join(f['output_fns'])} at K={f['K']}, k={f['k']} ({f.get('projector', 'sparse-jl')})",
        f"LDS: M={l['num_subsets']} subsets x {len(l['train_seeds'])} seeds, alpha {l['alpha']:g}, "
        f"{l['eval_timesteps']} timesteps x {len(l['noise_seeds'])} noise seeds, {l['generated']} generated samples",
        f"counterfactual: {setting.counterfactual['targets']} targets, k={setting.counterfactual['k']}, "
        f"{', '.join(setting.counterfactual['rankings'])}",
    ])


def config_json(setting: Setting) -> str:
    return json.dumps(setting.raw, indent=2)
