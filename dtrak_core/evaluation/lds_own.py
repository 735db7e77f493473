"""LDS and the counterfactual on your own model: subsets you retrain on with your own training
script, checkpoints it saved, and the same ground truth, LDS and reports as the built-in harnesses.

The model folder is one built with `python -m dtrak_core build` (your saved pipeline and training
images, plus D-TRAK / TRAK feature stores). Then:

1. `prepare`: the subsets, written as run_dir/masks.npz (M x N booleans) and run_dir/jobs.json
   (one entry per retrain: its id, subset index, training seed `train_seed` and the kept training
   indices, in the order of the training set your model folder reads). Bring your own masks instead with
   `masks=` (a .npy / .npz of M x N booleans, or a JSON of M index lists).
2. Retrain: your script trains one model per entry of jobs.json on the kept images and saves its
   UNet with diffusers' `save_pretrained` (a UNet folder, or a pipeline folder with unet/) as
   <checkpoints>/<id>/, ids `m<subset, 3 digits>-s<seed>` (`m000-s1`); or anywhere, listed in
   <checkpoints>/checkpoints.json as {"m000-s1": "path/to/folder", ...} (relative to that file).
3. `ground_truth`: each checkpoint's eps loss on the test sets at the built-in harness's timesteps
   and noise seeds (`lds_run.LDSRun.ground_truth`), one result file per checkpoint (atomic,
   resumable, shardable). Every checkpoint must have the base model's architecture; a result
   records the weights file's checksum, so a checkpoint replaced later is noticed.
4. `lds_own_report.evaluate`: every registered method that runs on the folder (TRAK, D-TRAK and the paper's
   baselines) scored against it: tables.json / tables.md as `lds tables` writes them for the
   default, +- from the same `lds.SubsetBootstrap`, and which lambda the shipped answers use.
5. `lds_own_report.tune_lambda`: each store's lambda measured on the run (validation LDS; with no validation set,
   the generated samples, cross-fitted) recorded in the model folder's manifest (`tuned_lambda`),
   where `attribute`, `Attributor.load` and the app take it from.

The test sets are the base model's own generated samples (seeds 0..generated-1, DDIM
`sample_steps`), plus `validation` when a folder of held-out images is given. The noise schedule
is the base model's: every retrain must use it.

The counterfactual works the same way (`counterfactual_prepare`, `counterfactual_measure`): the
top-k proponents of each target under each ranking, as jobs with the kept indices; your
checkpoints, one per job id (`d-trak-k1000-seed1000`), regenerate the target from its seed; the
report is the built-in harness's (median pixel L2, CLIP cosine when CLIP is local).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from dtrak_core.errors import IntegrityError, root_option
from dtrak_core.evaluation.lds_run import LDSConfig, LDSRun, job_id, read_masks, subset_masks
from dtrak_core.evaluation.retrain import RetrainJob, run_jobs
from dtrak_core.files import atomic_write_json, json_safe, load_result, read_json, save_result, sha256_file

MASKS = "masks.npz"  # the run's subsets (M, N) bool, key "masks"
JOBS = "jobs.json"  # what your training script trains: one entry per (subset, seed)
CHECKPOINTS = "checkpoints.json"  # optional, in the checkpoints folder: {job id: folder}
SAMPLE_BATCH = 256  # generated test samples per sampling batch


# -- checkpoints ----------------------------------------------------------------------------------
def find_checkpoints(checkpoints_dir: str, ids) -> dict[str, str | None]:
    """{job id: its checkpoint folder, or None when absent}: from checkpoints_dir/checkpoints.json
    when there is one, else checkpoints_dir/<id>/."""
    if not os.path.isdir(checkpoints_dir):
        raise ValueError(f"checkpoints folder {checkpoints_dir!r} does not exist; pass the folder your training "
                         f"script saved the retrained models in")
    listing = os.path.join(checkpoints_dir, CHECKPOINTS)
    if os.path.isfile(listing):
        mapping = read_json(listing, "checkpoint listing", 'write {"<job id>": "<folder>", ...}')
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"{listing}: expected an object mapping job ids to folders, e.g. "
                             f'{{"m000-s1": "runs/m000-s1"}}')
        known = set(ids)
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ValueError(f"{listing}: {unknown[0]!r} is no job of this run (ids look like {sorted(known)[0]!r}; "
                             f"see {JOBS})")
        paths = {i: os.path.join(checkpoints_dir, mapping[i]) if i in mapping else None for i in ids}
        return {i: p if p is not None and os.path.isdir(p) else None for i, p in paths.items()}
    return {i: (p if os.path.isdir(p) else None) for i in ids for p in [os.path.join(checkpoints_dir, i)]}


def _unet_dir(path: str) -> str:
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "unet", "config.json")):
        return os.path.join(path, "unet")
    raise ValueError(f"checkpoint {path!r} holds no UNet: expected config.json + diffusion_pytorch_model.safetensors "
                     f"(`unet.save_pretrained(folder)`) or a pipeline folder with unet/")


def _weights_file(path: str) -> str:
    from dtrak_core.model.unet import unet_weights

    weights = unet_weights(_unet_dir(path))
    if not weights:
        raise IntegrityError(_unet_dir(path), "has no weights file (diffusion_pytorch_model.safetensors)",
                             "save the retrained UNet again with save_pretrained")
    return weights[0]


def check_architecture(path: str, base_unet) -> None:
    """Refuse (ValueError naming it) a checkpoint whose UNet config is not the base model's: a
    retrain of another model says nothing about this one's attributions. Reads config.json only."""
    from diffusers import UNet2DModel

    config_path = os.path.join(_unet_dir(path), "config.json")
    config = read_json(config_path, "UNet config", "save the retrained UNet again with save_pretrained")
    try:
        with torch.device("meta"):  # the config with diffusers' defaults filled in, no weights allocated
            have = dict(UNet2DModel.from_config(config).config)
    except Exception as e:  # diffusers raises several types for a config it cannot build
        raise ValueError(f"{config_path}: not a UNet2DModel config ({type(e).__name__}: {e})") from None
    _compare_configs(path, have, dict(base_unet.config))


def load_retrained(path: str, base_unet) -> torch.nn.Module:
    """The retrained UNet saved at `path` (its architecture checked, `check_architecture`)."""
    from dtrak_core.model.unet import load_unet

    check_architecture(path, base_unet)
    unet = load_unet(_unet_dir(path), "save the retrained UNet again with save_pretrained, or retrain it")
    _compare_configs(path, dict(unet.config), dict(base_unet.config))
    return unet


def _compare_configs(path: str, have: dict, want: dict) -> None:
    differ = sorted(k for k in set(have) | set(want) if not k.startswith("_")
                    and json.dumps(have.get(k), default=str) != json.dumps(want.get(k), default=str))
    if differ:
        k = differ[0]
        raise ValueError(f"checkpoint {path!r} has another architecture than the model folder's UNet ({k}: "
                         f"{have.get(k)!r}, not {want.get(k)!r}{f', and {len(differ) - 1} more' if len(differ) > 1 else ''}); "
                         f"retrain from the base model's UNet config (UNet2DModel.from_config(base.config))")


def _weights_record(path: str) -> dict:
    f = _weights_file(path)
    st = os.stat(f)
    return {"checkpoint": np.array(os.path.abspath(path)), "weights_sha256": np.array(sha256_file(f)),
            "weights_size": np.int64(st.st_size), "weights_mtime_ns": np.int64(st.st_mtime_ns)}


def _check_unchanged(result_path: str, result: dict, checkpoint: str | None) -> None:
    """A finished result belongs to the checkpoint now at its place (size and mtime, else the checksum)."""
    if checkpoint is None or "weights_sha256" not in result:
        return
    f = _weights_file(checkpoint)
    st = os.stat(f)
    if st.st_size == int(result["weights_size"]) and st.st_mtime_ns == int(result["weights_mtime_ns"]):
        return
    if sha256_file(f) != str(result["weights_sha256"]):
        raise IntegrityError(result_path, f"was measured on another checkpoint than the one now at {checkpoint}",
                             "delete the result file to measure the new checkpoint")


def shard_of(shard) -> tuple[int, int]:
    """The shard to run: `shard`, or (rank, world) under torchrun (each rank its own jobs)."""
    from dtrak_core import distributed

    if distributed.launched() and tuple(shard) == (0, 1):
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return tuple(shard)


def _measure_checkpoints(jobs: list[RetrainJob], out_dir: str, checkpoints_dir: str, base_unet, work, *,
                         shard=(0, 1), partial: bool = False, show_bar: bool = True) -> list[str]:
    """Run `work(unet, job, checkpoint) -> arrays` for this shard's jobs that have no result yet, one
    result file per checkpoint (`retrain.run_jobs`: atomic, resumable). Missing checkpoints are an
    error naming the first (with `partial`, they are skipped); finished results are checked against
    the checkpoint now in their place."""
    i, n = shard_of(shard)
    mine = [j for k, j in enumerate(jobs) if k % n == i]
    found = find_checkpoints(checkpoints_dir, [j.id for j in jobs])
    todo = []
    for job in mine:
        path = os.path.join(out_dir, f"{job.id}.npz")
        if os.path.exists(path):
            _check_unchanged(path, load_result(path), found[job.id])
        elif found[job.id] is not None:
            todo.append(job)
    missing = [j.id for j in mine if found[j.id] is None and not os.path.exists(os.path.join(out_dir, f"{j.id}.npz"))]
    if missing and not partial:
        where = os.path.join(checkpoints_dir, CHECKPOINTS if os.path.isfile(os.path.join(checkpoints_dir, CHECKPOINTS))
                             else missing[0])
        raise ValueError(f"{len(missing)} of this shard's {len(mine)} checkpoints are missing, the first {missing[0]!r} "
                         f"(looked for {where}); train them, or pass --partial to measure the ones there")
    for job in todo:  # every architecture before any work: one foreign checkpoint stops the run up front
        check_architecture(found[job.id], base_unet)
    return run_jobs(todo, out_dir, lambda job: work(load_retrained(found[job.id], base_unet), job, found[job.id]),
                    show_bar=show_bar)


# -- the LDS run ----------------------------------------------------------------------------------
def _load_base(root: str):
    """(unet, scheduler, training set) of the model folder `root` (one built with `build`)."""
    from dtrak_core.folder import ModelFolder

    folder = ModelFolder.load(root).require("checkpoint", "dataset")
    unet, scheduler = folder.load_model()
    return unet, scheduler, folder.training_set()


def _masks_hash(masks: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(str(masks.shape).encode() + np.packbits(masks, axis=1).tobytes()).hexdigest()[:16]


class OwnLDSRun(LDSRun):
    """An LDS run whose models your training script retrained: `LDSRun` (setup.json, test sets,
    ground truth, `lds_run.collect`) with given masks, no recipe, and checkpoints measured where
    they are. Made by `prepare`, reopened by `open_run`."""

    def __init__(self, out_dir: str, root: str, masks: np.ndarray, config: LDSConfig,
                 test_sets: dict[str, torch.Tensor], base=None):
        from dtrak_core.model.unet import checkpoint_hash

        unet, scheduler, train = base or _load_base(root)
        if masks.shape[1] != len(train):
            raise ValueError(f"the masks have {masks.shape[1]} columns but the training set of {root!r} has "
                             f"{len(train)} images")
        super().__init__(out_dir, train.images, scheduler, None, config, test_sets,
                         {"checkpoint": checkpoint_hash(unet), "dataset": train.fingerprint,
                          "masks": MASKS, "masks_sha256": _masks_hash(masks), "subsets_given": True})
        self.root, self.base_unet, self.masks = root, unet, masks

    def jobs(self) -> list[RetrainJob]:
        return [RetrainJob(job_id(m, s), np.flatnonzero(self.masks[m]), s)
                for m in range(len(self.masks)) for s in self.config.train_seeds]

    def prepare(self) -> None:
        """`LDSRun.prepare`, then masks.npz and jobs.json (what your training script reads)."""
        path = os.path.join(self.out_dir, MASKS)
        if os.path.exists(path) and not np.array_equal(read_masks(path, self.masks.shape[1]), self.masks):
            raise ValueError(f"{self.out_dir!r} holds an LDS run with other masks ({path}); use another --out folder")
        super().prepare()
        if not os.path.exists(path):
            save_result(path, masks=self.masks)
        atomic_write_json(os.path.join(self.out_dir, JOBS), {
            "num_train": int(self.masks.shape[1]),
            "note": "train one model per job on the kept training indices (in the model folder's training-set order) "
                    "with the job's training seed, train_seed; save its UNet with save_pretrained to "
                    "<checkpoints>/<id>/ ('seed' repeats train_seed for readers of older files)",
            "jobs": [{"id": j.id, "subset": m, "train_seed": j.seed, "seed": j.seed, "keep": j.keep.tolist()}
                     for m, j in zip(np.repeat(np.arange(len(self.masks)), len(self.config.train_seeds)).tolist(),
                                     self.jobs())]})

    def measure(self, checkpoints_dir: str, shard=(0, 1), partial: bool = False, device="cpu",
                show_bar: bool = True) -> list[str]:
        """Ground truth for this shard's checkpoints that have none yet; the job ids measured now."""
        self.prepare()

        def work(unet, job, checkpoint):
            t0 = time.perf_counter()
            out = self.ground_truth(unet, device=device)
            return {**out, **_weights_record(checkpoint), "keep": job.keep.astype(np.int32), "seed": np.int64(job.seed),
                    "train_seconds": np.float64(np.nan), "eval_seconds": np.float64(time.perf_counter() - t0)}

        return _measure_checkpoints(self.jobs(), self.jobs_dir, checkpoints_dir, self.base_unet, work, shard=shard,
                                    partial=partial, show_bar=show_bar)


def open_run(out_dir: str, root: str) -> OwnLDSRun:
    """The run `prepare` wrote in out_dir: its masks, config and saved test sets (not regenerated:
    sampling is not bit-identical across devices), checked against the model folder `root`."""
    from dtrak_core.evaluation.lds_run import SETUP, SETUP_REMEDY, load_test_sets

    path = os.path.join(out_dir, SETUP)
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir!r} holds no LDS run ({SETUP} missing); write it with `python -m dtrak_core "
                         f"lds-own prepare --root {root} --out {out_dir}`")
    setup = read_json(path, "LDS run setup", SETUP_REMEDY)
    if not setup.get("subsets_given"):
        raise ValueError(f"{out_dir!r} is a built-in LDS run (`python -m dtrak_core lds`), not one for your checkpoints")
    masks = read_masks(os.path.join(out_dir, MASKS), setup["num_train"])
    return OwnLDSRun(out_dir, root, masks, LDSConfig(**setup["lds_config"]), load_test_sets(out_dir))


def prepare(root: str, out_dir: str, config: LDSConfig = LDSConfig(), masks: str | None = None,
            validation: str | None = None, device="cpu") -> OwnLDSRun:
    """Write the run folder: setup.json, test_sets.npz, masks.npz and jobs.json.

    masks: a file of your subsets (`read_masks`); None draws config.num_subsets subsets of a
    fraction config.alpha (`lds_run.subset_masks`, as the built-in harness does). validation: a
    folder of held-out images, a second test set. device: where the generated test samples are
    sampled. A folder prepared before must match."""
    from dataclasses import replace

    from dtrak_core.model.data import load_dataset
    from dtrak_core.model.sampling import generate

    unet, scheduler, train = base = _load_base(root)
    if masks is not None:
        given = read_masks(masks, len(train))
        config = replace(config, num_subsets=len(given), alpha=float(np.clip(given.mean(), 1e-6, 1 - 1e-6)))
    else:
        given = subset_masks(len(train), config.num_subsets, config.alpha, config.subset_seed)
    test_sets = {}
    if validation is not None:
        from dtrak_core.folder import ModelFolder

        cfg = unet.config
        spec = ModelFolder.load(root).dataset
        scaled = {"input_range": spec["input_range"]} if isinstance(spec, dict) and "input_range" in spec else {}
        test_sets["validation"] = load_dataset({"folder": validation, "resolution": int(cfg.sample_size),
                                                "channels": int(cfg.in_channels), **scaled}).images
    seeds = list(range(config.generated))  # sampled SAMPLE_BATCH at a time: memory bounded at any test-set size
    test_sets["generated"] = torch.cat([generate(unet, scheduler, seeds[a:a + SAMPLE_BATCH], steps=config.sample_steps,
                                                 device=device) for a in range(0, len(seeds), SAMPLE_BATCH)])
    run = OwnLDSRun(out_dir, root, given, config, test_sets, base)
    run.prepare()
    return run


def ground_truth(root: str, out_dir: str, checkpoints_dir: str, shard=(0, 1), partial: bool = False, device="cpu",
                 show_bar: bool = True) -> list[str]:
    """Measure the checkpoints of a prepared run (`OwnLDSRun.measure`); the job ids measured now."""
    return open_run(out_dir, root).measure(checkpoints_dir, shard, partial, device, show_bar)


def require_subsets(out_dir: str, root: str) -> None:
    from dtrak_core.evaluation.lds_run import collect

    done = len(collect(out_dir)["subsets"])
    if done < 3:
        raise ValueError(f"only {done} subsets of {out_dir!r} have every training seed measured; LDS needs at least 3 "
                         f"(`python -m dtrak_core lds-own ground-truth{root_option(root)} --out {out_dir} "
                         f"--checkpoints DIR`)")


def is_own_run(out_dir: str) -> bool:
    """Whether out_dir holds an LDS run of checkpoints retrained by your own script (`prepare`)."""
    from dtrak_core.evaluation.lds_run import SETUP

    path = os.path.join(out_dir, SETUP)
    if not os.path.isfile(path):
        return False
    setup = read_json(path, "LDS run setup", "prepare the run again")
    return isinstance(setup, dict) and bool(setup.get("subsets_given"))


# -- the counterfactual ---------------------------------------------------------------------------
TARGETS = "targets.npz"  # the targets (seeds, images) the removals were ranked for
REMOVALS = "removals.json"  # what your training script trains: one entry per (target, ranking, k)


def counterfactual_prepare(root: str, out_dir: str, seeds, rankings=("d-trak", "trak", "random"),
                           ks=("20%",)) -> dict:
    """Rank the training set for each target seed and write out_dir/removals.json (per job: id,
    target_seed (the target's sampling seed; also as `seed`, as older files have it), ranking, k,
    the removed indices strongest first and the kept ones) and
    out_dir/targets.npz; the removals' content. A folder prepared before must match its model and
    targets; its jobs are kept as they are, in their order, and the jobs of rankings or k's it
    does not have yet are appended after them (so a running shard's job numbers stay valid)."""
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.evaluation import counterfactual as cf

    attributor = Attributor.load(root)
    names = list(dict.fromkeys(cf.ranking_name(r) for r in rankings))
    path = os.path.join(out_dir, REMOVALS)
    before = read_json(path, "counterfactual removals", f"delete {path} and rerun `counterfactual-own prepare`") \
        if os.path.isfile(path) else None
    have = [] if before is None else before.get("jobs") if isinstance(before, dict) else None
    if not isinstance(have, list) or not all(isinstance(j, dict) and isinstance(j.get("id"), str) for j in have):
        raise ValueError(f"{path} is not a removals list this tool wrote (no 'jobs' list of jobs with an 'id'); "
                         f"restore it, or delete it and rerun `counterfactual-own prepare`")
    known, n = {j["id"] for j in have}, len(attributor.train)
    wanted = [name for name in names if any(cf.job_id(name, cf.parse_k(k, n), int(s)) not in known for k in ks for s in seeds)]
    os.makedirs(out_dir, exist_ok=True)
    cf._check_identity(os.path.join(out_dir, "identity.json"), {**cf._identity(attributor, None, names),
                                                                 "subsets_given": True})
    if before is not None and not wanted:
        return before
    jobs, specs, befores = cf.plan_jobs(attributor, seeds, wanted, ks)
    targets = os.path.join(out_dir, TARGETS)
    if os.path.exists(targets):
        held = load_result(targets, keys=("seeds", "images"))
        if not np.array_equal(held["seeds"], list(befores)):
            raise ValueError(f"{targets} holds targets {held['seeds'].tolist()}, not {list(befores)}; use another --out")
    save_result(targets, seeds=np.array(list(befores)), images=torch.stack(list(befores.values())).numpy())
    removals = {"num_train": n, "note": "train one model per job on the kept training indices "
                "(the model folder's training-set order) with the base model's own recipe and training seed; save its "
                "UNet with save_pretrained to <checkpoints>/<id>/. target_seed is the sampling seed of the target "
                "image, not a training seed ('seed' repeats it for readers of older files)",
                "jobs": have + [{"id": j.id, "target_seed": specs[j.id]["seed"], "seed": specs[j.id]["seed"],
                                 "ranking": specs[j.id]["ranking"], "k": specs[j.id]["k"],
                                 "removed": specs[j.id]["removed"].tolist(), "keep": j.keep.tolist()}
                                for j in jobs if j.id not in known]}
    atomic_write_json(path, json_safe(removals))
    return removals


def target_seed(job: dict) -> int:
    """The sampling seed of a removals.json job's target: `target_seed`, or `seed` in files written
    before it was named so."""
    return int(job["target_seed"] if "target_seed" in job else job["seed"])


def train_seed(job: dict) -> int:
    """The training seed of a jobs.json job: `train_seed`, or `seed` in files written before it was
    named so."""
    return int(job["train_seed"] if "train_seed" in job else job["seed"])


def counterfactual_measure(root: str, out_dir: str, checkpoints_dir: str, shard=(0, 1), partial: bool = False,
                           show_bar: bool = True) -> list[str]:
    """Regenerate each target from its seed with its job's checkpoint and measure it against the
    target (`counterfactual.measure_after`); results in out_dir/jobs/<id>.npz, as the built-in
    harness writes them. The job ids measured now."""
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.evaluation.counterfactual import _identity, _identity_mismatch, _read_identity, measure_after

    attributor = Attributor.load(root)
    path = os.path.join(out_dir, REMOVALS)
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir!r} has no {REMOVALS}; write it with `python -m dtrak_core counterfactual-own "
                         f"prepare --root {root} --out {out_dir}`")
    why = _identity_mismatch(_read_identity(os.path.join(out_dir, "identity.json")), _identity(attributor, None, []))
    if why is not None:  # the model folder changed since the removals were ranked
        raise ValueError(f"{os.path.join(out_dir, 'identity.json')}: {why}; prepare the removals again in another --out")
    removals = read_json(path, "counterfactual removals", "rerun `counterfactual-own prepare`")
    if removals.get("num_train") != len(attributor.train):
        raise ValueError(f"{path} was written for a training set of {removals.get('num_train')} images, not "
                         f"{len(attributor.train)} ({root!r})")
    targets = load_result(os.path.join(out_dir, TARGETS), keys=("seeds", "images"))
    befores = {int(s): torch.as_tensor(x) for s, x in zip(targets["seeds"], targets["images"])}
    specs = {j["id"]: j for j in removals["jobs"]}
    jobs = [RetrainJob(j["id"], np.asarray(j["keep"], dtype=np.int64)) for j in removals["jobs"]]

    def work(unet, job, checkpoint):
        spec = specs[job.id]
        seed = target_seed(spec)
        r = measure_after(unet, attributor.scheduler, seed, befores[seed],
                          np.asarray(spec["removed"], dtype=np.int64), spec["ranking"], float("nan"), digits=False)
        return {**r.to_arrays(), **_weights_record(checkpoint)}

    return _measure_checkpoints(jobs, os.path.join(out_dir, "jobs"), checkpoints_dir, attributor.unet, work,
                                shard=shard, partial=partial, show_bar=show_bar)
