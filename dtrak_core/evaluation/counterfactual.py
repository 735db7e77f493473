"""Counterfactual evaluation: remove a generated image's top proponents, retrain, regenerate, compare.

If a method's top proponents really made a generated image, then training again from scratch
without them (same recipe, same seed) and sampling again from the same seed (DDIM 50, eta 0) should
change that image more than removing as many random training images does. Per target we measure

- the pixel L2 distance between before and after (flattened [-1, 1] pixels, as published);
- the digit classifier's label and confidence before and after (did the digit change?);
- CLIP cosine similarity when CLIP weights are present locally (else recorded as unavailable).

One target, one ranking (the app's live "remove and retrain"):

    result = remove_and_retrain(attributor, seed=1000, ranking="d-trak", k="20%",
                                progress=lambda fraction, message: ..., should_stop=lambda: False)
    result.before, result.after, result.removed_indices, result.l2, result.label_after, ...

Many targets (`run_counterfactual`, CLI `python -m dtrak_core counterfactual`): each
(target, ranking, k) is one `RetrainJob` run by `retrain.run_jobs`, so the run is resumable (a
job's .npz is written atomically when it finishes; finished jobs are skipped) and shardable
(`--shard i/n`). `counterfactual_report` turns the job files into the paper's table (median per
ranking), the distribution, paired per-target comparisons and a before/after gallery.

Targets are the DDIM-50 samples of seeds `TARGET_SEED_START + i`, i = 0..n-1: a fixed rule, not a
choice of "good" images, disjoint from the quality seeds 0..255. The random ranking for a target
is `np.random.default_rng([RANDOM_RANKING_SEED, seed]).permutation(N)`, so its top-75 is a prefix
of its top-300, like a score ranking's.

Reproducibility: training is deterministic for a fixed torch build *and thread count*; the
control job (nothing removed; it runs after the first 3 targets' jobs) reports how far a retrain
under this run's thread count lands from the committed model (0 when they match: the committed
model was trained on `build.BUILD_THREADS` threads).

One record, `CounterfactualResult`, for every form of a result: `to_dict` (JSON, no images),
`to_arrays` / `from_arrays` (a harness job file, read back by `load_job`).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from dtrak_core import checksums
from dtrak_core.attribution import baselines
from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.base import RULE
from dtrak_core.attribution.output_functions import canonical_name
from dtrak_core.errors import Cancelled, IntegrityError, root_option
from dtrak_core.evaluation.quality import classify
from dtrak_core.evaluation.retrain import RetrainJob, retrain, run_jobs
from dtrak_core.files import atomic_write_json, load_result, read_json
from dtrak_core.folder import ModelFolder
from dtrak_core.model.sampling import generate
from dtrak_core.model.training import TrainConfig
from dtrak_core.model.unet import checkpoint_hash

TARGET_SEED_START = 1000  # targets are seeds 1000, 1001, ...; disjoint from the quality seeds 0..255
RANDOM_RANKING_SEED = 20240  # with the target seed, seeds the random ranking
RANDOM = "random"
SAMPLING = {"sampler": "ddim", "steps": 50, "eta": 0.0}  # as published
CONTROL_ID = "control-k0"  # one retrain on everything: how far this machine's retrain is from the model
CONTROL_AFTER_TARGETS = 3  # the control job runs after the first 3 targets' jobs at the first k


# -- small helpers --------------------------------------------------------------------------------
def target_seeds(n: int, start: int = TARGET_SEED_START) -> list[int]:
    """The documented target rule: seeds start, start+1, ..., start+n-1."""
    if n < 1:
        raise ValueError(f"need at least one target, got {n}")
    return list(range(start, start + n))


def ranking_name(ranking: str) -> str:
    """'random', or the canonical output-function name of a scored method ('d-trak' -> 'square')."""
    if not isinstance(ranking, str) or not ranking.strip():
        raise ValueError(f"ranking must be a method name such as 'd-trak', 'trak' or 'random', got {ranking!r}")
    name = ranking.strip().lower()
    method = registry.find(name)
    if method is not None and method.family in registry.SCORED_FAMILIES:  # scored through the registry (DAS, baselines)
        return method.name
    return RANDOM if name == RANDOM else canonical_name(name)


def check_ranking(attributor, ranking: str) -> str:
    """The canonical name of a ranking remove-and-retrain accepts on this attributor (one of
    `methods.counterfactual_rankings` over what it can run), checked before any sampling or
    training: a ValueError naming what is missing (the store to build, the file to restore) or why
    the method cannot drive a counterfactual."""
    name = ranking_name(ranking)
    if name == RANDOM:
        return name
    method = registry.find(name)
    if method is None or method.family == "trak":  # a TRAK-family ranking needs its store
        attributor.setting(name)
        return name
    if not method.counterfactual or "pixel" not in method.kinds:
        raise ValueError(f"{method.label} cannot drive a counterfactual; choose one of "
                         f"{', '.join(registry.counterfactual_rankings(registry.available(attributor)))}")
    problem = registry.problems(attributor, names={name}).get(name)
    if problem is not None:
        raise problem
    return name


def display_name(ranking: str) -> str:
    """The display label of a ranking ('D-TRAK', 'TRAK', 'Random'), as the reports' columns read."""
    return registry.get(ranking_name(ranking)).label


def slug(ranking: str) -> str:
    """File-name form of a ranking: 'd-trak', 'trak', 'random', or the output-function name."""
    return registry.get(ranking_name(ranking)).slug


def parse_k(k, n_train: int) -> int:
    """A removal size -> a count of training images.

    Accepts a count (an int, or a string of digits: 300), a fraction as a float in [0, 1) (0.2, or
    '0.2'), or a percentage string in [0%, 100%) ('20%'). The count must leave at least one training
    image; a fraction must give a whole number of images (20% of 1500 = 300; 1/7 is refused).
    """
    usage = f"k must be a count (300), a fraction (0.2) or a percentage ('20%'), got {k!r}"

    def whole(fraction):
        if not 0 <= fraction < 1:  # also rejects NaN
            raise ValueError(f"k as a fraction must be in [0, 1) (a percentage in [0%, 100%)), got {k!r}; "
                             f"give a count as an integer")
        count = int(round(fraction * n_train))
        if abs(fraction * n_train - count) > 1e-6:
            raise ValueError(f"k={k!r} of {n_train} training images is {fraction * n_train:g}, "
                             f"not a whole number; give a count")
        return count

    if isinstance(k, bool):
        raise ValueError(usage)
    if isinstance(k, (int, np.integer)):
        count = int(k)
    elif isinstance(k, (float, np.floating)):
        count = whole(float(k))
    elif isinstance(k, str) and k.strip():
        text = k.strip()
        try:
            if text.endswith("%"):
                count = whole(float(text[:-1]) / 100)
            elif text.isdigit():
                count = int(text)
            else:
                count = whole(float(text))
        except ValueError as e:
            raise ValueError(usage if "could not convert" in str(e) else str(e)) from None
    else:
        raise ValueError(usage)
    if not 0 <= count < n_train:
        raise ValueError(f"k must remove between 0 and {n_train - 1} of the {n_train} training images, got {k!r}")
    return count


def train_config_from_manifest(root: str) -> TrainConfig:
    """The recipe the model under `root` was trained with (manifest.json's train_config)."""
    folder = ModelFolder.load(root, missing_ok=True)
    if folder is None:
        raise ValueError(f"no manifest.json in {root!r}; build it with `python -m dtrak_core build-default"
                         f"{root_option(root)}` or pass a TrainConfig")
    if folder.train_config is None:
        raise ValueError(f"{folder.path} has no train_config; pass a TrainConfig")
    return folder.train_config


def _default_config(attributor) -> TrainConfig:
    """The recipe recorded in the attributor's model folder, after checking that the folder holds
    the attributor's model."""
    if attributor.root is None:
        raise ValueError("the attributor was not loaded from a model folder, so its training recipe is unknown; "
                         "pass config=TrainConfig(...) with the recipe it was trained with")
    config = train_config_from_manifest(attributor.root)
    folder = ModelFolder.load(attributor.root)
    if folder.checkpoint_hash is not None and folder.checkpoint_hash != checkpoint_hash(attributor.unet):
        raise ValueError(f"the attributor's model is not the one in {folder.path}; pass "
                         "config=TrainConfig(...) with the recipe it was trained with")
    return config


def removal(attributor, image: torch.Tensor, seed: int, ranking: str, k: int) -> np.ndarray:
    """The k training indices a ranking removes for one target, strongest proponent first."""
    name = ranking_name(ranking)
    n = len(attributor.train)
    if name == RANDOM:
        return np.random.default_rng([RANDOM_RANKING_SEED, int(seed)]).permutation(n)[:k]
    method = registry.get(name)
    if method.score is baselines.kernel_ridge:  # at its data-free rules, as D-TRAK ranks at its rule lambda below:
        # every ranking tuned alike, and none on the LDS data
        scores = baselines.kernel_ridge_at(method, attributor.method_inputs(), image[None].float(), {})[0]
        return np.argsort(-scores, kind="stable")[:k].astype(np.int64)
    if method.family in registry.SCORED_FAMILIES:  # its own scorer (DAS: `das.REGISTRY_LAMBDA`); the target is
        # the seed's sample, so Journey-TRAK follows the seed's own trajectory
        scores = registry.scores(attributor, name, image[None].float(), [int(seed)])[0]
        return np.argsort(-scores, kind="stable")[:k].astype(np.int64)
    # the data-free lambda rule, not a lambda tuned on LDS data: the counterfactual evaluation stays
    # independent of the LDS ground truth (and of later re-tuning)
    return np.asarray(attributor.attribute(image, name, lam=RULE).proponents(k), dtype=np.int64)


def keep_indices(n_train: int, removed) -> np.ndarray:
    """Sorted training indices without `removed`; all of them (0..n-1, in order) when nothing is removed,
    so a k=0 retrain sees exactly the data, in exactly the order, of the original training run."""
    mask = np.ones(n_train, dtype=bool)
    mask[np.asarray(removed, dtype=np.int64)] = False
    return np.flatnonzero(mask)


def sample(unet, scheduler, seed: int, progress=None) -> torch.Tensor:
    """One target image (C, H, W): DDIM 50, eta 0, from `seed` (generated alone, never batched, so the
    harness and the live path give bit-identical images)."""
    return generate(unet, scheduler, [int(seed)], steps=SAMPLING["steps"], sampler=SAMPLING["sampler"],
                    eta=SAMPLING["eta"], progress=progress)[0]


# -- metrics ------------------------------------------------------------------------------------------
def pixel_l2(before: torch.Tensor, after: torch.Tensor) -> float:
    """L2 distance of the flattened [-1, 1] pixels."""
    return float(torch.linalg.vector_norm(before.double().flatten() - after.double().flatten()))


@lru_cache(maxsize=1)
def _clip_encoder():
    """(encoder, None) or (None, why it is unavailable); loaded once, offline only."""
    try:
        from dtrak_core.attribution.clip_encoder import ClipImageEncoder, ClipUnavailable
    except ImportError as e:
        return None, f"unavailable: no CLIP loader ({e})"
    try:
        return ClipImageEncoder.load(), None
    except ClipUnavailable as e:
        return None, f"unavailable: {e}"


def clip_cosine(before: torch.Tensor, after: torch.Tensor) -> tuple[float | None, str]:
    """(cosine of the CLIP ViT-B/32 image embeddings, 'ok'); (None, reason) when no CLIP weights are local."""
    encoder, reason = _clip_encoder()
    if encoder is None:
        return None, reason
    e = encoder(torch.stack([before, after])).double()
    return float(torch.nn.functional.cosine_similarity(e[0], e[1], dim=0)), "ok"


@dataclass
class CounterfactualResult:
    """One target's remove-and-retrain result: what `remove_and_retrain` returns and a harness job holds."""

    seed: int  # sampling seed of the target
    ranking: str  # 'random' or the canonical output function ('square' = D-TRAK, 'loss' = TRAK)
    k: int  # training images removed
    before: torch.Tensor  # (C, H, W) the original model's sample
    after: torch.Tensor  # (C, H, W) the retrained model's sample from the same seed
    removed_indices: np.ndarray  # (k,) training indices removed, strongest proponent first
    l2: float  # pixel L2 distance between before and after
    label_before: int  # digit classifier's label and confidence
    confidence_before: float
    label_after: int
    confidence_after: float
    clip_cosine: float | None  # None when CLIP is unavailable (see clip_status)
    clip_status: str
    train_seconds: float
    config: TrainConfig = field(repr=False, default=None)

    @property
    def method(self) -> str:
        return display_name(self.ranking)

    @property
    def label_changed(self) -> bool:
        return self.label_before != self.label_after

    def to_dict(self) -> dict:
        """JSON-friendly summary (no images)."""
        return {"seed": self.seed, "ranking": self.ranking, "method": self.method, "k": self.k,
                "removed_indices": [int(i) for i in self.removed_indices], "l2": self.l2,
                "label_before": self.label_before, "confidence_before": self.confidence_before,
                "label_after": self.label_after, "confidence_after": self.confidence_after,
                "label_changed": self.label_changed, "clip_cosine": self.clip_cosine,
                "clip_status": self.clip_status, "train_seconds": self.train_seconds}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of a harness job file (`JOB_KEYS`; clip_cosine nan when unavailable)."""
        return {"seed": np.array(self.seed), "ranking": np.array(self.ranking), "k": np.array(self.k),
                "removed": self.removed_indices, "before": self.before.numpy(), "after": self.after.numpy(),
                "l2": np.array(self.l2), "label_before": np.array(self.label_before),
                "confidence_before": np.array(self.confidence_before), "label_after": np.array(self.label_after),
                "confidence_after": np.array(self.confidence_after),
                "clip_cosine": np.array(np.nan if self.clip_cosine is None else self.clip_cosine),
                "clip_status": np.array(self.clip_status), "train_seconds": np.array(self.train_seconds)}

    @classmethod
    def from_arrays(cls, z: dict) -> "CounterfactualResult":
        """The result a job file's arrays (`to_arrays`) describe."""
        clip = float(z["clip_cosine"])
        return cls(seed=int(z["seed"]), ranking=str(z["ranking"]), k=int(z["k"]),
                   before=torch.as_tensor(z["before"]), after=torch.as_tensor(z["after"]),
                   removed_indices=z["removed"], l2=float(z["l2"]), label_before=int(z["label_before"]),
                   confidence_before=float(z["confidence_before"]), label_after=int(z["label_after"]),
                   confidence_after=float(z["confidence_after"]),
                   clip_cosine=None if np.isnan(clip) else clip, clip_status=str(z["clip_status"]),
                   train_seconds=float(z["train_seconds"]))


def retrain_and_measure(attributor, seed: int, before: torch.Tensor, removed: np.ndarray, ranking: str,
                        config: TrainConfig, *, progress=None, should_stop=None, show_bar: bool = False) -> CounterfactualResult:
    """Retrain without `removed`, resample `seed`, measure. Shared by the live path and the harness.

    before: (C, H, W) the target, `seed`'s sample from the attributor's model; removed: (k,) training
    indices to leave out, strongest proponent first; ranking: the name recorded with the result;
    config: the retraining recipe (its seed included: the original model's, for a fair comparison).
    progress / should_stop: as for `remove_and_retrain`. A bad ranking name (a ValueError) is
    refused before the retrain, not after it.
    """
    ranking = ranking_name(ranking)
    removed = np.asarray(removed, dtype=np.int64)
    keep = keep_indices(len(attributor.train), removed)

    def on_step(step, steps, loss):
        if progress is not None:
            progress(0.02 + 0.93 * step / steps, f"retraining without {len(removed)} images: step {step}/{steps}")

    t0 = time.perf_counter()
    unet = retrain(attributor.train.images, keep, attributor.scheduler, config, progress=on_step,
                    should_stop=should_stop, show_bar=show_bar)
    train_seconds = time.perf_counter() - t0
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled before regenerating")
    on_sample = None if progress is None else (lambda i, n: progress(0.95 + 0.05 * i / n, f"regenerating: step {i}/{n}"))
    return measure_after(unet, attributor.scheduler, seed, before, removed, ranking, train_seconds, config,
                         progress=on_sample)


def measure_after(unet, scheduler, seed: int, before: torch.Tensor, removed: np.ndarray, ranking: str,
                  train_seconds: float, config: TrainConfig | None = None, *, digits: bool = True,
                  progress=None) -> CounterfactualResult:
    """Resample `seed` from a model retrained without `removed` and measure it against `before`.

    Shared by dtrak's retrains and checkpoints retrained by your own script (`lds_own`). digits:
    classify before and after with the digit classifier; False records labels -1 (unknown) and
    confidences nan, for models of other images.
    """
    after = sample(unet, scheduler, seed, progress=progress)
    if digits:
        labels, conf = classify(torch.stack([before, after]))
    else:
        labels, conf = (-1, -1), (float("nan"), float("nan"))
    cos, status = clip_cosine(before, after)
    return CounterfactualResult(seed=int(seed), ranking=ranking_name(ranking), k=len(removed), before=before,
                                after=after, removed_indices=np.asarray(removed, dtype=np.int64),
                                l2=pixel_l2(before, after), label_before=int(labels[0]),
                                confidence_before=float(conf[0]), label_after=int(labels[1]),
                                confidence_after=float(conf[1]), clip_cosine=cos, clip_status=status,
                                train_seconds=train_seconds, config=config)


def remove_and_retrain(attributor, seed: int, ranking: str | None = None, k="20%", config: TrainConfig | None = None,
                       progress: Callable[[float, str], None] | None = None,
                       should_stop: Callable[[], bool] | None = None) -> CounterfactualResult:
    """The app's "remove and retrain" for one target and one ranking.

    attributor: an `Attributor` (its model, scheduler, training set and stores).
    seed: the target is this seed's DDIM-50 sample from the attributor's model.
    ranking: 'd-trak', 'trak', 'random', or any of `methods.counterfactual_rankings` that the
        attributor can run (`check_ranking`); None: the registry's default among them.
    k: training images to remove: a count (300), a fraction (0.2) or a percentage ('20%').
    config: the retraining recipe; None = the one the attributor's model folder records
        (manifest.json's train_config), after checking that the folder holds the attributor's model.
    progress(fraction in [0, 1], message): called about once per training step.
    should_stop(): polled every training step; True raises `errors.Cancelled`.

    Returns a `CounterfactualResult`: before / after (C, H, W), removed_indices (k,), pixel L2,
    the classifier's label and confidence before and after, CLIP cosine when CLIP is available.
    ~70 s for the default recipe on 2 CPU cores. Raises ValueError on a bad ranking or k.
    """
    if ranking is None:
        ranking = registry.default_method(registry.counterfactual_rankings(registry.available(attributor)))
    name = check_ranking(attributor, ranking)  # a clear ValueError now, not after sampling
    count = parse_k(k, len(attributor.train))
    config = _default_config(attributor) if config is None else config
    if progress is not None:
        progress(0.0, "sampling the target")
    before = sample(attributor.unet, attributor.scheduler, seed)
    if progress is not None:
        progress(0.01, f"ranking the training set ({display_name(name)})")
    removed = removal(attributor, before, seed, name, count)
    return retrain_and_measure(attributor, seed, before, removed, name, config, progress=progress,
                               should_stop=should_stop)


# -- the harness: many targets x rankings x removal sizes, as resumable retrain jobs ----------------
def job_id(ranking: str, k: int, seed: int) -> str:
    return f"{slug(ranking)}-k{k}-seed{seed}"


def _identity(attributor, config: TrainConfig | None, rankings: list[str]) -> dict:
    """What every job in an output folder must share; a resumed run must match it (config None: the
    models are retrained by your own script, `lds_own`)."""
    settings = {}
    for name in rankings:
        if name != RANDOM and registry.get(name).family == "baseline" and registry.get(name).store is None:
            settings[name] = "no store; data-free rules"  # (`removal`: kernel baselines rank at their rules)
        elif name != RANDOM:
            setting, _ = attributor.setting(registry.get(name).store or name)
            settings[name] = setting.slug
            lam = attributor.tuned_lambdas.get(registry.sharpened_lambda_key(name, setting.slug))
            if lam is not None:  # a sharpened ranking follows its tuned lambda: re-tuning must not mix results
                settings[name] += f" at lambda {lam:g}"
    return {"checkpoint_hash": checkpoint_hash(attributor.unet), "dataset": attributor.train.fingerprint,
            "train_config": None if config is None else json.loads(json.dumps(config.to_dict())), "sampling": SAMPLING,
            "random_ranking_seed": RANDOM_RANKING_SEED, "stores": settings}


def _identity_mismatch(have: dict, want: dict) -> str | None:
    """Why results recorded under identity `have` are not what `want` describes, or None when they
    are (`have` may hold more rankings than `want`)."""
    for key, value in want.items():
        if key == "stores":
            for name, store in value.items():
                if have.get("stores", {}).get(name, store) != store:
                    return f"ranking {name!r} was computed from store {have['stores'][name]!r}, not {store!r}"
        elif have.get(key) != value:
            return f"results were computed with {key}={have.get(key)!r}, not {value!r}"
    return None


def _identity_remedy(out_dir: str) -> str:
    return (f"it records the model, data and recipe every job result in {out_dir} was computed with, so without "
            f"it they cannot be checked: restore it, or delete {out_dir} and rerun `{harness_run(out_dir)}` (with "
            f"the --targets, --rankings and --k it was run with) to recompute them")


def _read_identity(path: str, verified: bool = False) -> dict:
    """identity.json; verified: also against the checksum its writer recorded (what a reader of the
    results needs: an identity edited to match another model would pass stale results off as this one's)."""
    found = read_json(path, "counterfactual results' identity", _identity_remedy(os.path.dirname(path)))
    if verified:
        checksums.verify(path, "counterfactual results' identity", _identity_remedy(os.path.dirname(path)))
    return found


def _check_identity(path: str, identity: dict) -> None:
    """Write identity.json, or check the existing one (new rankings may be added); its checksum is
    recorded beside the job files' (`checksums.record`)."""
    if os.path.isfile(path):
        have = _read_identity(path)
        why = _identity_mismatch(have, identity)
        if why is not None:
            raise ValueError(f"{path}: {why}; use another output folder")
        have["stores"] = {**identity["stores"], **have.get("stores", {})}
        identity = have
    _adopt_unrecorded(os.path.dirname(path))
    atomic_write_json(path, identity)
    checksums.record(os.path.dirname(path), [IDENTITY])


def _adopt_unrecorded(out_dir: str) -> None:
    """A results folder written by a dtrak that recorded no checksums: its job files are read whole
    (zip CRCs) and their checksums recorded before this run adds its own, so that the folder's
    readers can verify every job in it."""
    if checksums.read_sidecar(out_dir) is not None:
        return
    names = [os.path.basename(p) for p in sorted(glob.glob(os.path.join(out_dir, "*.npz")))
             if re.fullmatch(r".+-k\d+-seed\d+\.npz", os.path.basename(p)) or os.path.basename(p) == f"{CONTROL_ID}.npz"]
    for name in names:
        load_result(os.path.join(out_dir, name))
    if os.path.isfile(os.path.join(out_dir, IDENTITY)):
        names.append(IDENTITY)
    if names:
        checksums.record(out_dir, names)


IDENTITY = "identity.json"


def harness_run(jobs_dir: str) -> str:
    """The `counterfactual` command that writes the job results in `jobs_dir` (<out>/jobs), with the
    --root of the model folder it lies in (<root>/counterfactual/jobs) and its --out."""
    jobs_dir = os.path.normpath(jobs_dir or ".")
    out = os.path.dirname(jobs_dir) if os.path.basename(jobs_dir) == "jobs" else jobs_dir
    root = os.path.dirname(os.path.abspath(out))
    in_folder = os.path.isfile(os.path.join(root, "manifest.json"))
    root_arg = root_option(os.path.dirname(out) or ".") if in_folder else ""
    return f"python -m dtrak_core counterfactual{root_arg} --out {shlex.quote(out)}"


def job_remedy(path: str) -> str:
    """What to do about a damaged or edited job file: recompute it."""
    return (f"delete it and rerun `{harness_run(os.path.dirname(path))}` with the --targets, --rankings and --k "
            f"that wrote {os.path.dirname(path) or '.'} (finished jobs are kept; this one is retrained and its "
            f"checksum recorded)")


def plan_jobs(attributor, seeds, rankings, ks) -> tuple[list[RetrainJob], dict, dict]:
    """(jobs, spec per job id, target image per seed): k-major, then target, then ranking, so a
    partial run has every ranking for its first targets at the first k."""
    n = len(attributor.train)
    names = [ranking_name(r) for r in rankings]
    counts = [parse_k(k, n) for k in ks]
    befores = {int(s): sample(attributor.unet, attributor.scheduler, s) for s in seeds}
    kmax = max(counts)
    order = {(name, s): removal(attributor, befores[s], s, name, kmax) for s in befores for name in names}
    jobs, specs = [], {}
    for k in counts:
        for s in befores:
            for name in names:
                removed = order[(name, s)][:k]
                jid = job_id(name, k, s)
                jobs.append(RetrainJob(jid, keep_indices(n, removed), seed=0))
                specs[jid] = {"seed": s, "ranking": name, "k": k, "removed": removed}
    return jobs, specs, befores


def run_counterfactual(attributor, out_dir: str, seeds, rankings=("d-trak", "trak", RANDOM), ks=("20%", "5%"),
                       config: TrainConfig | None = None, *, shard=(0, 1), control: bool = True,
                       show_bar: bool = True) -> list[str]:
    """Run this shard's unfinished jobs; each job's result is out_dir/<job id>.npz. Returns the ids run now.

    seeds: the targets' sampling seeds (`target_seeds`); rankings: method names ('random' included);
    ks: removal sizes, each as `parse_k` reads it; config: the recipe (None: the model folder's);
    shard (i, n): run jobs i, i+n, ... only. out_dir/identity.json records what every job shares (model,
    data, recipe, sampler, ranking stores); a resumed run must match it. With `control`, one extra
    job retrains on the whole training set and regenerates every target: its L2 to the targets is
    this machine's retrain noise (0 when it reproduces the model exactly).
    """
    config = _default_config(attributor) if config is None else config
    names = list(dict.fromkeys(ranking_name(r) for r in rankings))
    os.makedirs(out_dir, exist_ok=True)
    _check_identity(os.path.join(out_dir, "identity.json"), _identity(attributor, config, names))
    jobs, specs, befores = plan_jobs(attributor, seeds, names, ks)
    if control:  # after the first targets' jobs, so a short run first finishes a complete before/after gallery
        jobs.insert(min(len(jobs), CONTROL_AFTER_TARGETS * len(names)),
                    RetrainJob(CONTROL_ID, np.arange(len(attributor.train)), seed=0))
    threads = torch.get_num_threads()

    def work(job: RetrainJob) -> dict:
        if job.id == CONTROL_ID:
            t0 = time.perf_counter()
            unet = retrain(attributor.train.images, job.keep, attributor.scheduler, config, show_bar=False)
            seconds = time.perf_counter() - t0
            after = torch.stack([sample(unet, attributor.scheduler, s) for s in befores])
            before = torch.stack(list(befores.values()))
            return {"seeds": np.array(list(befores)), "before": before.numpy(), "after": after.numpy(),
                    "l2": np.array([pixel_l2(b, a) for b, a in zip(before, after)]),
                    "same_weights": np.array(checkpoint_hash(unet) == checkpoint_hash(attributor.unet)),
                    "train_seconds": np.array(seconds), "threads": np.array(threads)}
        spec = specs[job.id]
        r = retrain_and_measure(attributor, spec["seed"], befores[spec["seed"]], spec["removed"], spec["ranking"],
                                config)
        return {**r.to_arrays(), "threads": np.array(threads)}

    return run_jobs(jobs, out_dir, work, shard=shard, show_bar=show_bar, checksums=True)


def _jobs_dir(attributor) -> str:
    """<model folder>/counterfactual/jobs: where the harness's finished jobs for a model folder live."""
    if attributor.root is None:
        raise ValueError("the attributor was not loaded from a model folder: pass out_dir")
    return os.path.join(attributor.root, "counterfactual", "jobs")


def committed_results(attributor, out_dir: str | None = None,
                      config: TrainConfig | None = None) -> dict[tuple[int, str, int], str]:
    """(seed, ranking, k) -> job file, for every finished harness job in out_dir that a live
    `remove_and_retrain(attributor, seed, ranking, k, config)` would reproduce: same model, data,
    recipe, sampler and ranking store. {} when out_dir has no jobs or they were made for anything
    else (e.g. the model was rebuilt since), so a stale result is never shown as this model's.

    Damage is never skipped silently: an unreadable identity.json (or a missing one beside job
    files) or job file, or one that does not match the checksum its writer recorded in
    out_dir/checksums.json (edited, re-saved, or never recorded), raises `errors.IntegrityError`
    (a ValueError) naming the file."""
    out_dir = _jobs_dir(attributor) if out_dir is None else out_dir
    rankings = reproducible_rankings(attributor, out_dir, config)
    found = {}
    if not rankings:
        return found
    present = job_files(out_dir)
    recorded = checksums.read_sidecar(out_dir) or {}
    names = {os.path.basename(p) for p in present}
    for name in sorted(recorded):  # a result its writer recorded and someone deleted is not silently dropped
        if name.endswith(".npz") and name != f"{CONTROL_ID}.npz" and name not in names:
            path = os.path.join(out_dir, name)
            raise IntegrityError(path, "(counterfactual job result) is missing, though its folder's checksums.json "
                                 "lists it", job_remedy(path))
    for path in present:
        z = load_result(path, keys=JOB_KEYS, remedy=job_remedy(path))  # every array is read, so zip CRCs are checked too
        checksums.verify(path, "counterfactual job result", job_remedy(path))
        key = (int(z["seed"]), str(z["ranking"]), int(z["k"]))
        if key[1] in rankings:
            found[key] = path
    return found


JOB_KEYS = ("seed", "ranking", "k", "removed", "before", "after", "l2", "label_before", "confidence_before",
            "label_after", "confidence_after", "clip_cosine", "clip_status", "train_seconds")


def job_files(out_dir: str) -> list[str]:
    """The (target, ranking, k) job files in out_dir, sorted by name (not the control job)."""
    return [p for p in sorted(glob.glob(os.path.join(out_dir, "*.npz"))) if os.path.basename(p) != f"{CONTROL_ID}.npz"]


def reproducible_rankings(attributor, out_dir: str, config: TrainConfig | None) -> set[str]:
    """The rankings whose jobs in out_dir a live retrain here would reproduce (same model, data,
    recipe, sampler; same store for a scored ranking); empty when the folder's identity differs.
    Reads identity.json only (not the job files), so it is also the quick check of that file (its
    checksum included)."""
    path = os.path.join(out_dir, IDENTITY)
    if not os.path.isfile(path):
        if glob.glob(os.path.join(out_dir, "*.npz")):
            raise IntegrityError(path, "(counterfactual results' identity) is missing beside their job files",
                                 _identity_remedy(out_dir))
        return set()  # no results here
    have = _read_identity(path, verified=True)
    config = _default_config(attributor) if config is None else config
    if _identity_mismatch(have, _identity(attributor, config, [])) is not None:
        return set()
    rankings = {RANDOM}
    for name, store in have.get("stores", {}).items():
        try:
            if attributor.setting(name)[0].slug == store:
                rankings.add(name)
        except ValueError:  # no store for this ranking here
            pass
    return rankings


def load_job(path: str) -> CounterfactualResult:
    """One finished harness job as a `CounterfactualResult` (what `remove_and_retrain` returns),
    checked against the checksum recorded for it (in a folder that records checksums: one written
    before they were recorded is read as it is)."""
    z = load_result(path, keys=JOB_KEYS, remedy=job_remedy(path))
    checksums.verify(path, "counterfactual job result", job_remedy(path), required=False)
    return CounterfactualResult.from_arrays(z)


def load_precomputed(attributor, seed: int, ranking: str, k,
                     out_dir: str | None = None,
                     config: TrainConfig | None = None) -> CounterfactualResult | None:
    """The harness's committed result for (seed, ranking, k) if it matches what a live
    `remove_and_retrain` would compute (see `committed_results`), else None: lets the app show a
    finished result instantly instead of retraining."""
    name = ranking_name(ranking)
    out_dir = _jobs_dir(attributor) if out_dir is None else out_dir
    path = os.path.join(out_dir, f"{job_id(name, parse_k(k, len(attributor.train)), int(seed))}.npz")
    if not os.path.isfile(path) or name not in reproducible_rankings(attributor, out_dir, config):
        return None
    return load_job(path)
