"""TracInCP's inputs: checkpoints along the model's own training run, and their feature stores.

TracInCP (Pruthi et al. 2020) and GAS (Hammoudeh & Lowd 2022) sum over checkpoints of the
training run; the final model alone does not have them. `build_tracin` replays the run (training
is deterministic for a seed), saves `TRACIN_CHECKPOINTS` evenly spaced checkpoints and featurizes
each with `TRACIN_SETTING`:

    <root>/tracin/index.json                       what was built (TRACIN_INDEX)
    <root>/tracin/checkpoints/step-<s>/            the checkpoint after optimiser step s
    <root>/tracin/stores/step-<s>-<setting>/       its training-set feature store

`load_tracin` reads them back for an attributor, checking that they belong to its model and data.
Built with `python -m dtrak_core build-baselines`.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.attribution.store import FeatureStore, cached_store
from dtrak_core.errors import IntegrityError, MethodUnavailable, root_option
from dtrak_core.files import atomic_write_json, read_json
from dtrak_core.folder import MANIFEST, ModelFolder, default_root
from dtrak_core.model.training import TrainConfig, train
from dtrak_core.model.unet import (
    CONFIG_NAMES,
    checkpoint_hash,
    config_file_hash,
    config_hashes,
    load_checkpoint,
    save_checkpoint,
    weights_named,
)

# TracInCP store setting: loss gradients as in TRAK, but K=10 timesteps and k=512 so that four
# checkpoints cost 4 x 3 MB on disk and ~4 x 1 min to featurize (K=100, k=2048 would be 4 x 12 MB
# and ~4 x 6 min). The final-checkpoint gradient baselines use the full TRAK store instead.
TRACIN_SETTING = FeatureSetting("loss", K=10, k=512)
TRACIN_CHECKPOINTS = 4  # as published: 4 checkpoints of the run, evenly spaced, the last one final
TRACIN_INDEX = os.path.join("tracin", "index.json")


def tracin_steps(total_steps: int, count: int = TRACIN_CHECKPOINTS) -> list[int]:
    """`count` evenly spaced optimiser steps ending at the final one: 1500 -> [375, 750, 1125, 1500]."""
    if not 1 <= count <= total_steps:
        raise ValueError(f"need 1 <= count <= {total_steps}, got {count}")
    return [round(total_steps * (i + 1) / count) for i in range(count)]


def build_tracin(root: str, train_set, scheduler, config: TrainConfig, *, expected_final: str | None = None,
                 steps=None, setting: FeatureSetting = TRACIN_SETTING, unet_config: dict | None = None,
                 show_bar: bool = True, register: bool = True) -> dict:
    """Replay the training run, save checkpoints at `steps` and featurize each.

    Writes <root>/tracin/index.json (what was built) and, with `register`, points manifest['tracin'] at it.

    Training is deterministic for a seed, so rerunning `train` with the model's own config retraces
    its trajectory; `expected_final` (the checkpoint_hash of the model these belong to) is checked
    against the replayed final weights, and a mismatch (e.g. another torch build) stops the build.
    Resumable: checkpoints already saved with the recorded hashes are reused, stores resume.
    `unet_config`: the architecture the run trained (None: the digits default's).
    """
    if steps is None:
        steps = tracin_steps(config.steps, min(TRACIN_CHECKPOINTS, config.steps))
    steps = sorted({int(s) for s in steps})
    base = os.path.join(root, "tracin")
    rel_ckpt = {s: os.path.join("tracin", "checkpoints", f"step-{s:05d}") for s in steps}
    old = _read_json(os.path.join(root, TRACIN_INDEX), root)
    have = {c["step"]: c["checkpoint_hash"] for c in old.get("checkpoints", [])}
    # the index belongs to the model when it says so, or when its final checkpoint is the model (its
    # model_checkpoint_hash alone was edited); each checkpoint is checked against its store below
    reusable = (old.get("train_config") == _jsonable(config.to_dict()) and set(have) >= set(steps)
                and old.get("dataset") == train_set.fingerprint
                and (expected_final is None or expected_final in (old.get("model_checkpoint_hash"),
                                                                  have.get(config.steps)))
                and all(os.path.isfile(os.path.join(root, rel_ckpt[s], "unet", "config.json")) for s in steps))
    t0 = time.perf_counter()
    train_seconds = old.get("train_seconds")
    model_hash = expected_final or old.get("model_checkpoint_hash")
    if not reusable:
        final = train(train_set.images, scheduler, config, show_bar=show_bar, checkpoint_steps=steps,
                      unet_config=unet_config,
                      on_checkpoint=lambda s, unet: save_checkpoint(os.path.join(root, rel_ckpt[s]), unet, scheduler))
        train_seconds = time.perf_counter() - t0
        model_hash = expected_final or checkpoint_hash(final)
        if expected_final is not None and checkpoint_hash(final) != expected_final:
            shutil.rmtree(os.path.join(base, "checkpoints"), ignore_errors=True)  # not the model's: never leave them to reuse
            raise ValueError(f"replaying the training run gave final weights {checkpoint_hash(final)}, not the model's "
                             f"{expected_final}: training is not reproducible here (torch build or thread count differs), "
                             "so these checkpoints are not the model's own trajectory")
    entries, featurize_seconds = [], {}
    for s in steps:
        unet, sched = load_checkpoint(os.path.join(root, rel_ckpt[s]))
        h = checkpoint_hash(unet)
        rel_store = os.path.join("tracin", "stores", f"step-{s:05d}-{setting.slug}")
        # a recorded hash that its weights and its store both contradict was edited in the index: the
        # index is rewritten from them below; weights that their store contradicts too are damaged
        if reusable and have[s] != h and _store_checkpoint(os.path.join(root, rel_store)) != h:
            raise IntegrityError(os.path.join(root, rel_ckpt[s], "unet"), f"(TracInCP checkpoint weights) hashes to "
                                 f"{h}, but {os.path.join(root, TRACIN_INDEX)} records {have[s]} and its feature "
                                 f"store another hash (the weights file was replaced or is corrupt)",
                                 f"delete {os.path.join(root, rel_ckpt[s])} and rerun `python -m dtrak_core "
                                 f"build-baselines{root_option(root)}` (it replays the training run)")
        if reusable and s == config.steps and expected_final is not None and h != expected_final:
            raise IntegrityError(os.path.join(root, rel_ckpt[s], "unet"), f"(TracInCP final checkpoint weights) hashes "
                                 f"to {h}, not to the model's {expected_final}: it is not the model's training run",
                                 f"delete {base} and rerun `python -m dtrak_core build-baselines{root_option(root)}` "
                                 f"(it replays the training run)")
        t1 = time.perf_counter()
        cached_store(os.path.join(root, rel_store), FeatureStore.identity(setting, h, train_set.fingerprint),
                     train_set.images, lambda: Featurizer(unet, sched, setting), setting.k, show_bar=show_bar)
        featurize_seconds[rel_store] = time.perf_counter() - t1
        entries.append({"step": s, "checkpoint": rel_ckpt[s], "checkpoint_hash": h, "store": rel_store})
    entry = {"train_config": _jsonable(config.to_dict()), "dataset": train_set.fingerprint, "setting": setting.to_dict(),
             "model_checkpoint_hash": model_hash, "checkpoints": entries,
             "train_seconds": train_seconds,
             # a rerun keeps the first full timings (a no-op or resumed fill is not a measurement)
             "featurize_seconds": {**featurize_seconds, **old.get("featurize_seconds", {})} if reusable else featurize_seconds}
    atomic_write_json(os.path.join(root, TRACIN_INDEX), entry)
    if register:
        register_tracin(root)
    return entry


def register_tracin(root: str) -> None:
    """Point manifest['tracin'] at tracin/index.json (read-modify-write of the manifest, written atomically)."""
    if not os.path.isfile(os.path.join(root, TRACIN_INDEX)):
        raise ValueError(f"no {TRACIN_INDEX} under {root!r}; build it with `python -m dtrak_core "
                         f"build-baselines{root_option(root)}`")
    folder = ModelFolder.load(root, missing_ok=True)
    if folder is None or folder.tracin != TRACIN_INDEX:
        ModelFolder.edit(root, tracin=TRACIN_INDEX)


def build_default_baselines(root: str | None = None, show_bar: bool = True, register: bool = True) -> dict:
    """TracInCP checkpoints and stores for the digits default under `root` (built by build-default;
    None: `folder.default_root()`); a model trained from a setting: `setting.build_baselines`.

    The replay must run with the thread count of the original training (CPU kernels split their
    reductions by thread, so the weights differ in the last bits otherwise): the manifest's
    `threads` when recorded, else torch's default. On a busy machine set OMP_WAIT_POLICY=PASSIVE
    (same numbers, far less time lost in OpenMP barriers).
    """
    from dtrak_core.model.data import load_digits

    root = default_root() if root is None else root
    folder = ModelFolder.load(root, missing_ok=True)
    if folder is None or folder.train_config is None or folder.checkpoint is None:
        raise ValueError(f"{os.path.join(root, MANIFEST)} is missing or unfinished; run `python -m dtrak_core "
                         f"build-default{root_option(root)}` first")
    if folder.dataset != "digits-train":
        raise ValueError(f"build-baselines knows the digits default only, not dataset {folder.dataset!r}")
    unet, scheduler = folder.load_model()
    if folder.threads is not None:
        torch.set_num_threads(folder.threads)  # replay under the thread count of the original run
    return build_tracin(root, load_digits("train"), scheduler, folder.train_config, expected_final=checkpoint_hash(unet),
                        show_bar=show_bar, register=register)


def _read_json(path: str, root: str) -> dict:
    """The TracInCP index, {} when absent; an IntegrityError naming it when damaged."""
    if not os.path.isfile(path):
        return {}
    return read_json(path, "TracInCP index", f"delete {os.path.dirname(path)} and rebuild it with "
                     f"`python -m dtrak_core build-baselines{root_option(root)}` (it replays the training run)")


def _store_checkpoint(path: str) -> str | None:
    """The checkpoint hash a TracInCP feature store records it was built from (its metadata checked
    against its seal), None when it cannot be read: a second record of each checkpoint's weights,
    beside the index's."""
    try:
        return FeatureStore.open(path, verify=False).metadata.get("checkpoint")
    except (ValueError, OSError):
        return None


def _rebuild_index(root: str) -> str:
    return (f"rebuild it with `python -m dtrak_core build-baselines{root_option(root)}` (it reuses the checkpoints "
            f"and stores that match what they record, and replays the training run otherwise)")


def _jsonable(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d))


@dataclass
class TracInCheckpoint:
    step: int
    featurizer: Featurizer  # for queries, on this checkpoint's weights
    train_features: torch.Tensor  # (N, k) float64


def tracin_index(root: str, attributor) -> tuple[dict, str]:
    """(index entry, its path) of the checkpoints registered under manifest['tracin'], checked
    to be complete and to belong to the attributor's model and data, without loading the
    checkpoints themselves (`load_tracin` does, and verifies their weights)."""
    folder = ModelFolder.load(root, missing_ok=True)
    index = None if folder is None else folder.tracin
    if index and not os.path.isfile(os.path.join(root, index)):
        raise IntegrityError(os.path.join(root, index), f"(TracInCP index) is missing, though "
                             f"{os.path.join(root, MANIFEST)} registers it",
                             f"rebuild it with `python -m dtrak_core build-baselines{root_option(root)}`")
    entry = _read_json(os.path.join(root, index), root) if index else {}
    if not entry:
        raise MethodUnavailable(f"TracInCP needs the training run's checkpoints: none registered in "
                                f"{os.path.join(root, MANIFEST)}; build them with `python -m dtrak_core "
                                f"build-baselines{root_option(root)}` "
                                f"(it replays the training run, so it needs a model trained by dtrak)")
    index_path = os.path.join(root, index)
    fields = {"model_checkpoint_hash": str, "dataset": str, "setting": dict, "checkpoints": list}
    bad = [key for key, kind in fields.items() if not isinstance(entry.get(key), kind)]
    bad += [f"checkpoints[{i}]" for i, c in enumerate(entry.get("checkpoints") or [])
            if not (isinstance(c, dict) and {"step", "checkpoint", "checkpoint_hash", "store"} <= set(c))]
    if bad:
        raise IntegrityError(index_path, f"(TracInCP index) lacks or garbles {', '.join(bad)}",
                             f"rebuild it with `python -m dtrak_core build-baselines{root_option(root)}`")
    model_hash = checkpoint_hash(attributor.unet)
    if entry["model_checkpoint_hash"] != model_hash or entry["dataset"] != attributor.train.fingerprint:
        # the model's weights were checked against the manifest, which registers this index: the index
        # (edited, or left from another model) is what is wrong, not the model
        raise IntegrityError(index_path, f"(TracInCP index) records checkpoints of model "
                             f"{entry['model_checkpoint_hash']} on data {entry['dataset']}, but the model of "
                             f"{os.path.join(root, MANIFEST)} is {model_hash} on data {attributor.train.fingerprint} "
                             f"(the index was edited, or built for another model)", _rebuild_index(root))
    _check_layout(entry, index_path, root)
    model_configs = folder.config_hash or (config_hashes(folder.checkpoint_path) if folder.checkpoint else {})
    for c in entry["checkpoints"]:
        for rel, what in ((c["checkpoint"], "TracInCP checkpoint"), (c["store"], "TracInCP feature store")):
            if not os.path.exists(os.path.join(root, rel)):
                raise IntegrityError(os.path.join(root, rel), f"({what}) is missing, though {index_path} registers it",
                                     f"rebuild it with `python -m dtrak_core build-baselines{root_option(root)}`")
        _check_configs(os.path.join(root, c["checkpoint"]), model_configs, folder, root)
    return entry, index_path


def _setting(entry: dict, index_path: str, root: str) -> FeatureSetting:
    try:
        return FeatureSetting(**entry["setting"])
    except (TypeError, ValueError) as e:
        raise IntegrityError(index_path, f"(TracInCP index) has no valid 'setting' entry ({e})",
                             f"rebuild it with `python -m dtrak_core build-baselines{root_option(root)}`") from None


def _check_layout(entry: dict, index_path: str, root: str) -> None:
    """Each checkpoint's step and the index's setting are the ones its folders are named after
    (`build_tracin` names them so): the index records no seal of its own, and a step or setting
    edited by hand would otherwise be used unreported."""
    slug = _setting(entry, index_path, root).slug
    for i, c in enumerate(entry["checkpoints"]):
        step = c["step"]
        name = f"step-{step:05d}" if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
        want = None if name is None else (os.path.join("tracin", "checkpoints", name),
                                          os.path.join("tracin", "stores", f"{name}-{slug}"))
        have = tuple(os.path.normpath(str(c[key])) for key in ("checkpoint", "store"))
        if want != have:
            raise IntegrityError(index_path, f"(TracInCP index) checkpoints[{i}] records step {step!r} and setting "
                                 f"{slug} for the folders {have[0]} and {have[1]}, which build-baselines names "
                                 f"otherwise (the index was edited by hand)",
                                 f"restore it, or rebuild it with `python -m dtrak_core build-baselines"
                                 f"{root_option(root)}`")


def _check_configs(ckpt: str, model_configs: dict, folder: ModelFolder, root: str) -> None:
    """A checkpoint of the model's own training run has the model's architecture and noise schedule:
    its config files must hash to the model's (`config_hash`), since its index seals its weights only."""
    for rel, want in sorted(model_configs.items()):
        have = config_file_hash(ckpt, rel)
        if have != want:
            path = os.path.join(ckpt, *rel.split("/"))
            raise IntegrityError(path, f"(TracInCP checkpoint {CONFIG_NAMES.get(rel, 'config')}) hashes to {have}, "
                                 f"but the model's {rel} hashes to {want} (recorded in {folder.path}): a checkpoint of "
                                 f"its training run has the same one, so the file was edited",
                                 f"restore it, or delete {ckpt} and rebuild it with `python -m dtrak_core "
                                 f"build-baselines{root_option(root)}` (it replays the training run)")


def load_tracin(root: str, attributor) -> list[TracInCheckpoint]:
    """The checkpoints registered under manifest['tracin'], checked to belong to the attributor's model."""
    entry, index_path = tracin_index(root, attributor)
    setting = _setting(entry, index_path, root)
    out = []
    for i, c in enumerate(entry["checkpoints"]):
        ckpt = os.path.join(root, c["checkpoint"])
        unet, scheduler = load_checkpoint(ckpt)
        h = checkpoint_hash(unet)
        if h != c["checkpoint_hash"] and _store_checkpoint(os.path.join(root, c["store"])) == h:
            # the weights hash to what their sealed feature store records: the index's record is what changed
            raise IntegrityError(index_path, f"(TracInCP index) records checkpoint_hash {c['checkpoint_hash']!r} for "
                                 f"checkpoints[{i}] ({c['checkpoint']}), but its weights hash to {h}, which its feature "
                                 f"store {c['store']} records too (the index was edited)", _rebuild_index(root))
        if h != c["checkpoint_hash"]:
            unet_dir = os.path.join(ckpt, "unet")
            raise IntegrityError(unet_dir, f"(TracInCP checkpoint weights) hashes to {h}, but {index_path} records "
                                 f"{c['checkpoint_hash']} ({weights_named(unet_dir)} was replaced or is corrupt)",
                                 f"restore it, or delete {ckpt} and rebuild it with `python -m dtrak_core "
                                 f"build-baselines{root_option(root)}` (it replays the training run)")
        store = FeatureStore.open(os.path.join(root, c["store"]), FeatureStore.identity(setting, h, attributor.train.fingerprint))
        out.append(TracInCheckpoint(c["step"], Featurizer(unet, scheduler, setting),
                                    torch.from_numpy(np.array(store.features())).double()))
    return out
