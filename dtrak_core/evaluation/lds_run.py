"""The LDS run: retrain on random subsets of the training set and measure the ground truth that
`lds.lds` scores attributions against.

Protocol (see assets/benchmarks/README.md):

- M random subsets of the training set, each a fraction `alpha` of it; subset m is drawn from
  `default_rng([subset_seed, m])`, so subset m is the same whatever M is (M can grow later).
- For each subset and each training seed, a model is retrained from scratch with the base recipe
  (`retrain.run_jobs`: resumable, one result file per finished model, shardable).
- Ground truth F(x; theta_m): the eps-prediction MSE of test sample x under the retrained model,
  averaged over `eval_timesteps` evenly spaced timesteps (midpoints of equal bins of the 1000)
  x `noise_seeds` fixed noise draws (the same noise for every model: common random numbers)
  x the training seeds.

    run = LDSRun(out_dir, train_images, scheduler, train_config, LDSConfig(), test_sets)
    run.run()                                  # resumable, shardable: run.run(shard=(i, n))
    truth = collect(out_dir)                   # masks (M, N), F[test set] (M, Q) of the finished subsets
    lds.save_ground_truth(dest, truth, test_sets)   # the published form; lds.load_ground_truth reads it

The run folder:

    out_dir/setup.json       config, train recipe, fingerprints (checked when resuming)
    out_dir/test_sets.npz    the test images (validation digits, generated samples)
    out_dir/jobs/<id>.npz    per retrained model: F per test set (compact_losses), timings; small, committed
    out_dir/models/<id>/     the retrained model (diffusers folder), for later measurements (git-ignored)
    out_dir/full_t/<id>.npz  F at all 1000 timesteps for some models (`full_timestep_check`)
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from diffusers import UNet2DModel
from tqdm.auto import tqdm

from dtrak_core.errors import IntegrityError
from dtrak_core.evaluation.retrain import RetrainJob, retrain, run_job_groups, run_jobs, train_many
from dtrak_core.files import atomic_write_json, load_result, read_json, save_result
from dtrak_core.model.training import TrainConfig

SETUP = "setup.json"
SETUP_REMEDY = ("it records what every job result in the run folder was computed with: restore it, or use a new "
                "--out folder")
TEST_SETS = "test_sets.npz"


@dataclass(frozen=True)
class LDSConfig:
    num_subsets: int = 64  # M: retrained subsets (the paper's number)
    alpha: float = 0.5  # each subset keeps this fraction of the training set
    subset_seed: int = 0  # subset m = default_rng([subset_seed, m]).choice(...)
    train_seeds: tuple = (1, 2)  # training seeds per subset; seed s is used for every subset (common random numbers)
    eval_timesteps: int = 100  # ground-truth timesteps: midpoints of eval_timesteps equal bins of the 1000
    noise_seeds: tuple = (0, 1, 2)  # ground-truth noise draws per (sample, timestep)
    generated: int = 256  # generated test samples, seeds 0..generated-1
    sample_steps: int = 50  # DDIM steps for the generated test samples

    def __post_init__(self):
        object.__setattr__(self, "train_seeds", tuple(int(s) for s in self.train_seeds))
        object.__setattr__(self, "noise_seeds", tuple(int(s) for s in self.noise_seeds))
        if self.num_subsets < 1 or not 0 < self.alpha < 1:
            raise ValueError(f"need num_subsets >= 1 and 0 < alpha < 1, got {self.num_subsets}, {self.alpha}")
        if not self.train_seeds or not self.noise_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ValueError("train_seeds and noise_seeds must be non-empty, train_seeds distinct")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# -- subsets and jobs -----------------------------------------------------------------------------
def subset_indices(n: int, m: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """Sorted training indices of subset m (independent of how many subsets there are)."""
    size = int(round(alpha * n))
    return np.sort(np.random.default_rng([seed, m]).choice(n, size, replace=False))


def subset_masks(n: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """(M, N) bool: masks[m, i] is True when training sample i is in subset m."""
    masks = np.zeros((num_subsets, n), dtype=bool)
    for m in range(num_subsets):
        masks[m, subset_indices(n, m, alpha, seed)] = True
    return masks


def run_masks(out_dir: str, setup: dict) -> np.ndarray:
    """(M, N) bool masks of a run: the subsets given to it (setup "masks": a file in out_dir, see
    `lds_own`), else the drawn ones (`subset_masks` of its LDSConfig)."""
    config = LDSConfig(**setup["lds_config"])
    if setup.get("masks"):
        return read_masks(os.path.join(out_dir, setup["masks"]), setup["num_train"])
    return subset_masks(setup["num_train"], config.num_subsets, config.alpha, config.subset_seed)


# -- masks given to a run ----------------------------------------------------------------------------------------
def read_masks(path: str, num_train: int) -> np.ndarray:
    """(M, N) bool masks from `path`: a .npy of M x N booleans (or 0/1 integers), a .npz holding one
    such array (key "masks", or its only array), or a .json of M lists of training indices (or
    {"subsets": [...]}). Checked: two dimensions, N = num_train, M >= 3, every subset neither empty
    nor the whole training set, no index out of range or repeated."""
    def bad(problem: str, remedy: str = "write M x N booleans, one row per subset, N the training set's size"):
        return ValueError(f"masks {path}: {problem}; {remedy}")

    if not os.path.isfile(path):
        raise ValueError(f"masks {path}: no such file; pass a .npy / .npz of M x N booleans or a .json of index lists")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
            raise bad(f"is not readable JSON ({type(e).__name__}: {e})", "write a JSON list of M lists of training "
                      "indices") from None
        lists = data.get("subsets") if isinstance(data, dict) else data
        if not isinstance(lists, list) or not all(isinstance(r, list) for r in lists):
            raise bad("expected a list of index lists (or {\"subsets\": [...]})", "write M lists of training indices")
        masks = np.zeros((len(lists), num_train), dtype=bool)
        for m, row in enumerate(lists):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in row):
                raise bad(f"subset {m} holds a non-integer index", "write integer training indices")
            idx = np.asarray(row, dtype=np.int64)
            if len(idx) and (idx.min() < 0 or idx.max() >= num_train):
                raise bad(f"subset {m} has an index outside 0..{num_train - 1} (the training set has {num_train} "
                          f"images)", "index the training set in the order the model folder reads it")
            if len(np.unique(idx)) != len(idx):
                raise bad(f"subset {m} repeats an index", "list each training index once per subset")
            masks[m, idx] = True
    elif path.endswith((".npy", ".npz")):
        try:
            z = np.load(path, allow_pickle=False)
            if isinstance(z, np.ndarray):  # .npy
                arr = z
            else:
                with z:
                    keys = list(z.files)
                    if "masks" not in keys and len(keys) != 1:
                        raise bad(f"holds arrays {keys}, none named 'masks'", "save the masks under the key 'masks'")
                    arr = z["masks" if "masks" in keys else keys[0]]
        except ValueError as e:
            if str(e).startswith(f"masks {path}"):
                raise
            raise bad(f"cannot be read ({e})") from None
        except (OSError, EOFError) as e:
            raise bad(f"cannot be read ({type(e).__name__}: {e})") from None
        if arr.ndim != 2:
            raise bad(f"has shape {arr.shape}, not two dimensions (M, N)")
        if arr.dtype != bool:
            if not np.issubdtype(arr.dtype, np.integer) or not np.isin(arr, (0, 1)).all():
                raise bad(f"has dtype {arr.dtype} with values other than 0 and 1")
        masks = arr.astype(bool)
    else:
        raise bad("unknown file type", "use .npy, .npz or .json")
    if masks.shape[1] != num_train:
        raise bad(f"has {masks.shape[1]} columns but the training set has {num_train} images")
    if masks.shape[0] < 3:
        raise bad(f"has {masks.shape[0]} subsets; LDS needs at least 3")
    sizes = masks.sum(1)
    if (sizes == 0).any() or (sizes == num_train).any():
        m = int(np.flatnonzero((sizes == 0) | (sizes == num_train))[0])
        raise bad(f"subset {m} keeps {int(sizes[m])} of {num_train} images", "every subset must leave some images "
                  "out and keep some")
    return masks


def job_id(m: int, seed: int) -> str:
    return f"m{m:03d}-s{seed}"


def lds_jobs(n: int, config: LDSConfig) -> list[RetrainJob]:
    """Subset-major order (m0 s1, m0 s2, m1 s1, ...), so a partial run has whole subsets done."""
    return [RetrainJob(job_id(m, s), subset_indices(n, m, config.alpha, config.subset_seed), s)
            for m in range(config.num_subsets) for s in config.train_seeds]


# -- ground truth ---------------------------------------------------------------------------------
def eval_timesteps(n: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """n evenly spaced timesteps: the midpoints of n equal bins (n = 1000 gives all of them)."""
    if n < 1 or num_train_timesteps % n:
        raise ValueError(f"eval_timesteps must divide {num_train_timesteps}, got {n}")
    step = num_train_timesteps // n
    return torch.arange(step // 2, num_train_timesteps, step)


def noise_chunks(seed: int, rows: int, shape, chunk: int):
    """The rows of one (rows, *shape) normal draw from a CPU generator seeded by `seed`, `chunk` rows
    at a time, so the whole draw is never held. torch's CPU sampler turns uniforms into normals 16 at
    a time, so consecutive draws of multiples of 16 values continue one draw exactly; other shapes
    are drawn whole, then sliced."""
    gen = torch.Generator().manual_seed(int(seed))
    per_row = int(np.prod(shape))
    whole = None if per_row % 16 == 0 else torch.randn((rows, *shape), generator=gen)
    for a in range(0, rows, chunk):
        b = min(a + chunk, rows)
        yield whole[a:b] if whole is not None else torch.randn((b - a, *shape), generator=gen)


@torch.no_grad()
def eps_losses(unet, scheduler, images: torch.Tensor, timesteps: torch.Tensor, noise_seeds, chunk: int = 4096,
               device="cpu") -> np.ndarray:
    """(S, T, Q) eps-prediction MSE of each image at each timestep for each noise seed.

    The noise for seed s is one (T, Q, C, H, W) draw from a CPU generator seeded by s, so every model
    is evaluated on the same noisy inputs, on any device (`device`: where the UNet runs, float32).
    Memory is bounded by `chunk` (image, timestep) pairs, whatever T x Q is.
    """
    from dtrak_core.devices import resolve_device

    device = resolve_device(device)
    unet.eval().to(device)
    Q, T = len(images), len(timesteps)
    out = np.empty((len(noise_seeds), T, Q), dtype=np.float32)
    for si, s in enumerate(noise_seeds):
        losses = torch.empty(T * Q)
        for a, noise in zip(range(0, T * Q, chunk), noise_chunks(s, T * Q, images.shape[1:], chunk)):
            rows = torch.arange(a, a + len(noise))  # row-major over (T, Q): timestep rows // Q, image rows % Q
            t = timesteps[rows // Q]
            xt = scheduler.add_noise(images[rows % Q], noise, t)
            pred = unet(xt.to(device), t.to(device), return_dict=False)[0]
            losses[a:a + len(noise)] = (pred.float() - noise.to(device)).pow(2).flatten(1).mean(1).cpu()
        out[si] = losses.view(T, Q).numpy()
    return out


# -- the run --------------------------------------------------------------------------------------
class LDSRun:
    """Retraining + ground truth for one base model, in `out_dir` (resumable, shardable; the folder's
    layout is in the module docstring).

    train_images: (N, C, H, W) in [-1, 1], the base model's training set; scheduler: its noise
    schedule; train_config: its recipe (every subset is retrained with it, seed replaced; None for
    models retrained by your own script, `lds_own`);
    config: the protocol (`LDSConfig`); test_sets: {name: (Q, C, H, W)} the test samples F is
    measured on; identity: fields recorded in setup.json and checked on resume (e.g. the base
    model's checkpoint hash and the training set's fingerprint).
    """

    def __init__(self, out_dir: str, train_images: torch.Tensor, scheduler, train_config: TrainConfig,
                 config: LDSConfig, test_sets: dict[str, torch.Tensor], identity: dict | None = None):
        self.out_dir, self.train_images, self.scheduler = out_dir, train_images, scheduler
        self.train_config, self.config, self.test_sets = train_config, config, test_sets
        self.identity = identity or {}

    @property
    def jobs_dir(self) -> str:
        return os.path.join(self.out_dir, "jobs")

    def setup_dict(self) -> dict:
        recipe = None if self.train_config is None else json.loads(json.dumps(self.train_config.to_dict()))
        return {"lds_config": self.config.to_dict(), "train_config": recipe,
                "num_train": len(self.train_images), "test_sets": {k: len(v) for k, v in self.test_sets.items()},
                **self.identity}

    def prepare(self) -> None:
        """Write setup.json and the test sets, or check that an existing run matches."""
        os.makedirs(self.jobs_dir, exist_ok=True)
        path = os.path.join(self.out_dir, SETUP)
        want = self.setup_dict()
        if os.path.exists(path):
            have = read_json(path, "LDS run setup", SETUP_REMEDY)
            for key in sorted(set(have) | set(want)):
                if key == "lds_config":  # only num_subsets may change (extend or stop early)
                    a = {k: v for k, v in have[key].items() if k != "num_subsets"}
                    b = {k: v for k, v in want[key].items() if k != "num_subsets"}
                    if a != b:
                        raise ValueError(f"{self.out_dir!r} holds an LDS run with lds_config {have[key]}, not {want[key]}; "
                                         f"use another --out folder")
                elif have.get(key) != want.get(key):
                    raise ValueError(f"{self.out_dir!r} holds an LDS run with {key}={have.get(key)!r}, not "
                                     f"{want.get(key)!r}; use another --out folder")
            saved = load_result(os.path.join(self.out_dir, TEST_SETS))
            for name, images in self.test_sets.items():
                if not np.array_equal(saved[name], images.numpy()):
                    raise ValueError(f"test set {name!r} differs from the one saved in {self.out_dir!r}")
            if have["lds_config"]["num_subsets"] != self.config.num_subsets:
                atomic_write_json(path, {**have, "lds_config": want["lds_config"]})
            return
        save_result(os.path.join(self.out_dir, TEST_SETS), **{k: v.numpy() for k, v in self.test_sets.items()})
        atomic_write_json(path, want)

    def jobs(self) -> list[RetrainJob]:
        return lds_jobs(len(self.train_images), self.config)

    def ground_truth(self, unet, device="cpu") -> dict:
        """F_<test set> (`compact_losses`) of one retrained model: its eps losses on every test set at
        the run's timesteps and noise seeds (the same noisy inputs for every model)."""
        ts = eval_timesteps(self.config.eval_timesteps, self.scheduler.config.num_train_timesteps)
        out = {}
        for name, images in self.test_sets.items():
            out.update(compact_losses(name, eps_losses(unet, self.scheduler, images, ts, self.config.noise_seeds,
                                                       device=device)))
        return out

    def _measure(self, unet, job: RetrainJob, train_seconds: float) -> dict:
        t0 = time.perf_counter()
        out = self.ground_truth(unet)
        model_dir = os.path.join(self.out_dir, "models", job.id)
        shutil.rmtree(model_dir + ".tmp", ignore_errors=True)
        unet.save_pretrained(model_dir + ".tmp", safe_serialization=True)
        shutil.rmtree(model_dir, ignore_errors=True)  # left by a run killed after saving it
        os.replace(model_dir + ".tmp", model_dir)
        return {**out, "train_seconds": np.float64(train_seconds), "eval_seconds": np.float64(time.perf_counter() - t0),
                "keep": job.keep.astype(np.int32), "seed": np.int64(job.seed)}

    def _work(self, job: RetrainJob) -> dict:
        t0 = time.perf_counter()
        unet = retrain(self.train_images, job.keep, self.scheduler, replace(self.train_config, seed=job.seed), show_bar=False)
        return self._measure(unet, job, time.perf_counter() - t0)

    def _work_many(self, jobs: list[RetrainJob]) -> list[dict]:
        t0 = time.perf_counter()
        unets = train_many(self.train_images, [j.keep for j in jobs], [j.seed for j in jobs], self.scheduler,
                           self.train_config, show_bar=False)
        seconds = (time.perf_counter() - t0) / len(jobs)
        return [self._measure(u, j, seconds) for u, j in zip(unets, jobs)]

    def run(self, shard: tuple[int, int] = (0, 1), batch_models: int = 1, show_bar: bool = True) -> list[str]:
        """Retrain and measure this shard's unfinished jobs; returns the ids done now."""
        self.prepare()
        if batch_models == 1:
            return run_jobs(self.jobs(), self.jobs_dir, self._work, shard=shard, show_bar=show_bar)
        return run_job_groups(self.jobs(), self.jobs_dir, self._work_many, group_size=batch_models, shard=shard,
                              show_bar=show_bar)


TIMESTEP_STRIDES = (1, 2, 5, 10)  # the timestep subsets a job keeps F for (see compact_losses)


def compact_losses(name: str, losses: np.ndarray) -> dict:
    """(noise seeds, T, Q) eps losses -> F_<name> (len(TIMESTEP_STRIDES), Q): row i is the mean over
    noise seeds and every TIMESTEP_STRIDES[i]-th timestep. ~9 KB a job instead of ~0.7 MB, so the
    finished jobs of a run can be committed and a run can span sessions."""
    return {f"F_{name}": np.stack([losses[:, ::s].mean(axis=(0, 1)) for s in TIMESTEP_STRIDES])}


def job_F(result: dict, name: str, timestep_stride: int = 1) -> np.ndarray:
    """F (Q,) of one job result, compact or (runs made before compaction) full per-timestep losses."""
    if f"loss_{name}" in result:
        return result[f"loss_{name}"][:, ::timestep_stride].mean(axis=(0, 1))
    if timestep_stride not in TIMESTEP_STRIDES:
        raise ValueError(f"timestep_stride must be one of {TIMESTEP_STRIDES}, got {timestep_stride}")
    return result[f"F_{name}"][TIMESTEP_STRIDES.index(timestep_stride)]


def collect(out_dir: str, timestep_stride: int = 1) -> dict:
    """Gather the finished jobs of a run.

    Returns masks (M, N) for the subsets whose every training seed is done (in subset order),
    subsets (M,) their indices, and per test set F_seeds (S, M, Q) (averaged over noise seeds and
    timesteps; `timestep_stride` > 1 keeps every stride-th evaluated timestep, to measure how much
    the timestep subset matters) and F (M, Q) = mean over training seeds.
    """
    setup = read_json(os.path.join(out_dir, SETUP), "LDS run setup", SETUP_REMEDY)
    config = LDSConfig(**setup["lds_config"])
    all_masks = run_masks(out_dir, setup)
    jobs_dir = os.path.join(out_dir, "jobs")
    done = []
    for m in range(config.num_subsets):
        if all(os.path.exists(os.path.join(jobs_dir, f"{job_id(m, s)}.npz")) for s in config.train_seeds):
            done.append(m)
    out = {"setup": setup, "subsets": np.array(done, dtype=np.int64),
           "masks": all_masks[done], "F_seeds": {}, "F": {},
           "train_seconds": [], "eval_seconds": []}
    per_set = {name: [] for name in setup["test_sets"]}
    for m in done:
        rows = {name: [] for name in per_set}
        for s in config.train_seeds:
            path = os.path.join(jobs_dir, f"{job_id(m, s)}.npz")
            r = load_result(path)
            if "keep" in r and not np.array_equal(np.sort(r["keep"]), np.flatnonzero(all_masks[m])):
                raise IntegrityError(path, f"was measured on a model trained on other images than subset {m} of "
                                     f"the run's masks", "delete it and rerun the ground truth for that model")
            out["train_seconds"].append(float(r["train_seconds"]))
            out["eval_seconds"].append(float(r["eval_seconds"]))
            for name in per_set:
                rows[name].append(job_F(r, name, timestep_stride))  # (Q,)
        for name in per_set:
            per_set[name].append(rows[name])  # (S, Q)
    for name, rows in per_set.items():
        q = setup["test_sets"][name]
        F_seeds = np.asarray(rows, dtype=np.float64).reshape(len(done), len(config.train_seeds), q).transpose(1, 0, 2)
        out["F_seeds"][name] = F_seeds
        out["F"][name] = F_seeds.mean(0)
    return out


def load_test_sets(run_dir: str) -> dict[str, torch.Tensor]:
    """{test set name: images (Q, C, H, W)} saved by the run in run_dir/test_sets.npz."""
    return {k: torch.from_numpy(v) for k, v in load_result(os.path.join(run_dir, TEST_SETS)).items()}


FULL_T_NOISE_SEED = 100  # noise for the all-1000-timesteps check: a draw not used by the run itself


def full_timestep_check(run_dir: str, scheduler, max_subsets: int | None = None, show_bar: bool = True) -> list[str]:
    """Ground truth with all 1000 timesteps (one fresh noise seed) for the finished models of a run.

    Written per model to run_dir/full_t/<id>.npz (resumable); `collect_full_timesteps` reads them
    back, so LDS with the run's evenly spaced subset can be compared with LDS at all timesteps on the
    same retrained models.
    """
    col = collect(run_dir)
    setup = col["setup"]
    config = LDSConfig(**setup["lds_config"])
    test_sets = load_test_sets(run_dir)
    out_dir = os.path.join(run_dir, "full_t")
    os.makedirs(out_dir, exist_ok=True)
    subsets = col["subsets"][:max_subsets]
    ids = [job_id(int(m), s) for m in subsets for s in config.train_seeds]
    todo = [i for i in ids if not os.path.exists(os.path.join(out_dir, f"{i}.npz"))]
    ts = eval_timesteps(scheduler.config.num_train_timesteps, scheduler.config.num_train_timesteps)
    for i in tqdm(todo, desc="all-timestep ground truth", disable=not show_bar):
        unet = UNet2DModel.from_pretrained(os.path.join(run_dir, "models", i)).eval()
        save_result(os.path.join(out_dir, f"{i}.npz"),
                    **{f"loss_{k}": eps_losses(unet, scheduler, v, ts, (FULL_T_NOISE_SEED,)).mean(axis=(0, 1))
                       for k, v in test_sets.items()})
    return todo


def collect_full_timesteps(run_dir: str) -> dict | None:
    """masks and F (M, Q) per test set from run_dir/full_t, for the subsets with every seed there; None if < 3."""
    col = collect(run_dir)
    config = LDSConfig(**col["setup"]["lds_config"])
    out_dir = os.path.join(run_dir, "full_t")
    rows = [k for k, m in enumerate(col["subsets"])
            if all(os.path.exists(os.path.join(out_dir, f"{job_id(int(m), s)}.npz")) for s in config.train_seeds)]
    if len(rows) < 3:
        return None
    F = {}
    for name in col["F"]:
        F[name] = np.array([np.mean([load_result(os.path.join(out_dir, f"{job_id(int(col['subsets'][k]), s)}.npz"))[f"loss_{name}"]
                                     for s in config.train_seeds], axis=0) for k in rows])
    return {"rows": np.array(rows), "masks": col["masks"][rows], "F": F,
            "F_run": {name: col["F"][name][rows] for name in col["F"]}}
