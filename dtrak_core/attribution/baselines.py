"""Baseline attribution methods of the poster's table, selectable by name beside TRAK / D-TRAK.

Score of training sample n for a query q (higher = stronger proponent, as for TRAK):

| name            | score                                                                       |
|-----------------|-----------------------------------------------------------------------------|
| pixel-dot       | <x_q, x_n> over flattened pixels in [-1, 1]                                 |
| pixel-cosine    | cos(x_q, x_n)                                                               |
| clip-dot        | <e_q, e_n>, e = CLIP ViT-B/32 image embedding (see clip_encoder)            |
| clip-cosine     | cos(e_q, e_n)                                                               |
| gradient-dot    | <phi_q, phi_n>, phi = projected loss gradient at the final checkpoint       |
| gradient-cosine | cos(phi_q, phi_n)  (Charpiat et al. 2019)                                   |
| tracin          | sum_c <phi_c(q), phi_c(n)> over saved checkpoints c, no lr weighting         |
|                 | (TracInCP, Pruthi et al. 2020)                                              |
| gas             | sum_c cos(phi_c(q), phi_c(n))  (Hammoudeh & Lowd 2022)                      |
| relative-ip     | TRAK score / ||(Phi^T Phi + lam I)^-1 phi_n||  (Barshan et al. 2020)        |
| renorm-ip       | TRAK score / ||phi_n||                                                      |
| journey-trak    | TRAK score of the loss gradient averaged along the query's DDIM trajectory: |
|                 | at each step the predicted x0, re-noised at that step's timestep            |
|                 | (Georgiev et al. 2023; generated samples only, needs their seeds)           |

"Loss gradient" features are the attributor's `loss` (TRAK) store and featurizer, so gradient-*,
relative-ip, renorm-ip and journey-trak share the TRAK projection and lambda. TracInCP needs the
intermediate checkpoints of the model's own training run and their stores, written under
`<root>/tracin/` by `build_tracin` (`python -m dtrak_core build-baselines`).

Uniform interface over every method, the attributor's own (d-trak, trak, output functions) and
these:

    available_methods(attributor)                  -> names that can run now
    unavailable_methods(attributor)                -> {name: why not}
    method_scores(attributor, name, images, seeds) -> (Q, N) float64
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler
from torch.func import functional_call, grad, vmap

from dtrak_core.attribution.attributor import MANIFEST, Attributor
from dtrak_core.attribution.clip_encoder import ClipImageEncoder, ClipUnavailable
from dtrak_core.attribution.features import Featurizer, FeatureSetting
from dtrak_core.attribution.gradients import timestep_noise, trainable_params
from dtrak_core.model.unet import checkpoint_hash, load_checkpoint, save_checkpoint
from dtrak_core.shared import ModelReplicas, OnceCache
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.errors import IntegrityError, MethodUnavailable
from dtrak_core.files import atomic_write_json, read_json
from dtrak_core.model.training import TrainConfig, train

# TracInCP store setting: loss gradients as in TRAK, but K=10 timesteps and k=512 so that four
# checkpoints cost 4 x 3 MB on disk and ~4 x 1 min to featurize (K=100, k=2048 would be 4 x 12 MB
# and ~4 x 6 min). The final-checkpoint gradient baselines use the full TRAK store instead.
TRACIN_SETTING = FeatureSetting("loss", K=10, k=512)
TRACIN_CHECKPOINTS = 4  # as published: 4 checkpoints of the run, evenly spaced, the last one final
TRACIN_INDEX = os.path.join("tracin", "index.json")
JOURNEY_STEPS = 50  # DDIM steps, as `sampling.generate` uses by default


# -- similarity scorers ------------------------------------------------------------------------
def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def similarity(query, train, kind: str) -> np.ndarray:
    """(Q, D) x (N, D) -> (Q, N) float64 dot products or cosines."""
    q = torch.as_tensor(np.asarray(query)).double()
    t = torch.as_tensor(np.asarray(train)).double()
    if q.ndim != 2 or t.ndim != 2 or q.shape[1] != t.shape[1]:
        raise ValueError(f"similarity needs (Q, D) and (N, D), got {tuple(q.shape)} and {tuple(t.shape)}")
    if kind == "cosine":
        q, t = _normalize(q), _normalize(t)
    elif kind != "dot":
        raise ValueError(f"unknown similarity {kind!r}; choose 'dot' or 'cosine'")
    return (q @ t.T).numpy()


# -- TracInCP checkpoints ----------------------------------------------------------------------
def tracin_steps(total_steps: int, count: int = TRACIN_CHECKPOINTS) -> list[int]:
    """`count` evenly spaced optimiser steps ending at the final one: 1500 -> [375, 750, 1125, 1500]."""
    if not 1 <= count <= total_steps:
        raise ValueError(f"need 1 <= count <= {total_steps}, got {count}")
    return [round(total_steps * (i + 1) / count) for i in range(count)]


def build_tracin(root: str, train_set, scheduler, config: TrainConfig, *, expected_final: str | None = None,
                 steps=None, setting: FeatureSetting = TRACIN_SETTING, show_bar: bool = True, register: bool = True) -> dict:
    """Replay the training run, save checkpoints at `steps` and featurize each.

    Writes <root>/tracin/index.json (what was built) and, with `register`, points manifest['tracin'] at it.

    Training is deterministic for a seed, so rerunning `train` with the model's own config retraces
    its trajectory; `expected_final` (the checkpoint_hash of the model these belong to) is checked
    against the replayed final weights, and a mismatch (e.g. another torch build) stops the build.
    Resumable: checkpoints already saved with the recorded hashes are reused, stores resume.
    """
    steps = sorted(set(tracin_steps(config.steps) if steps is None else [int(s) for s in steps]))
    base = os.path.join(root, "tracin")
    rel_ckpt = {s: os.path.join("tracin", "checkpoints", f"step-{s:05d}") for s in steps}
    old = _read_json(os.path.join(root, TRACIN_INDEX))
    have = {c["step"]: c["checkpoint_hash"] for c in old.get("checkpoints", [])}
    reusable = (old.get("train_config") == _jsonable(config.to_dict()) and set(have) >= set(steps)
                and old.get("dataset") == train_set.fingerprint
                and (expected_final is None or old.get("model_checkpoint_hash") == expected_final)
                and all(os.path.isfile(os.path.join(root, rel_ckpt[s], "unet", "config.json")) for s in steps))
    t0 = time.perf_counter()
    train_seconds = old.get("train_seconds")
    model_hash = expected_final or old.get("model_checkpoint_hash")
    if not reusable:
        final = train(train_set.images, scheduler, config, show_bar=show_bar, checkpoint_steps=steps,
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
        if reusable and have[s] != h:
            raise ValueError(f"checkpoint {rel_ckpt[s]} has hash {h}, the manifest recorded {have[s]}; delete {base} and rebuild")
        rel_store = os.path.join("tracin", "stores", f"step-{s:05d}-{setting.slug}")
        store = FeatureStore.create(os.path.join(root, rel_store), FeatureStore.identity(setting, h, train_set.fingerprint),
                                    len(train_set), setting.k)
        t1 = time.perf_counter()
        store.fill(Featurizer(unet, sched, setting), train_set.images, show_bar=show_bar)
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
        raise ValueError(f"no {TRACIN_INDEX} under {root!r}; build it with `python -m dtrak_core build-baselines`")
    manifest = _read_json(os.path.join(root, MANIFEST))
    if manifest.get("tracin") != TRACIN_INDEX:
        manifest["tracin"] = TRACIN_INDEX
        atomic_write_json(os.path.join(root, MANIFEST), manifest)


def build_default_baselines(root: str = "assets", show_bar: bool = True, register: bool = True) -> dict:
    """TracInCP checkpoints and stores for the model under `root` (built by build-default).

    The replay must run with the thread count of the original training (CPU kernels split their
    reductions by thread, so the weights differ in the last bits otherwise): the manifest's
    `threads` when recorded, else torch's default. On a busy machine set OMP_WAIT_POLICY=PASSIVE
    (same numbers, far less time lost in OpenMP barriers).
    """
    from dtrak_core.model.data import load_digits

    manifest = _read_json(os.path.join(root, MANIFEST))
    if "train_config" not in manifest or "checkpoint" not in manifest:
        raise ValueError(f"{os.path.join(root, MANIFEST)} is missing or unfinished; run `python -m dtrak_core build-default` first")
    if manifest.get("dataset") != "digits-train":
        raise ValueError(f"build-baselines knows the digits default only, not dataset {manifest.get('dataset')!r}")
    cfg = dict(manifest["train_config"])
    cfg["block_out_channels"] = tuple(cfg["block_out_channels"])
    unet, scheduler = load_checkpoint(os.path.join(root, manifest["checkpoint"]))
    if "threads" in manifest:
        torch.set_num_threads(int(manifest["threads"]))  # replay under the thread count of the original run
    return build_tracin(root, load_digits("train"), scheduler, TrainConfig(**cfg), expected_final=checkpoint_hash(unet),
                        show_bar=show_bar, register=register)


def _read_json(path: str) -> dict:
    """The manifest or the TracInCP index, {} when absent; an IntegrityError naming it when damaged."""
    from dtrak_core.build import MANIFEST_REMEDY

    if not os.path.isfile(path):
        return {}
    if os.path.basename(path) == MANIFEST:
        return read_json(path, "model manifest", MANIFEST_REMEDY)
    return read_json(path, "TracInCP index", f"delete {os.path.dirname(path)} and rebuild it with "
                     f"`python -m dtrak_core build-baselines` (it replays the training run)")


def _jsonable(d: dict) -> dict:
    import json

    return json.loads(json.dumps(d))


@dataclass
class TracInCheckpoint:
    step: int
    featurizer: Featurizer  # for queries, on this checkpoint's weights
    train_features: torch.Tensor  # (N, k) float64


def load_tracin(root: str, attributor: Attributor) -> list[TracInCheckpoint]:
    """The checkpoints registered under manifest['tracin'], checked to belong to the attributor's model."""
    index = _read_json(os.path.join(root, MANIFEST)).get("tracin")
    if index and not os.path.isfile(os.path.join(root, index)):
        raise IntegrityError(os.path.join(root, index), f"(TracInCP index) is missing, though "
                             f"{os.path.join(root, MANIFEST)} registers it",
                             "rebuild it with `python -m dtrak_core build-baselines`")
    entry = _read_json(os.path.join(root, index)) if index else {}
    if not entry:
        raise MethodUnavailable(f"TracInCP needs the training run's checkpoints: none registered in "
                                f"{os.path.join(root, MANIFEST)}; build them with `python -m dtrak_core build-baselines` "
                                f"(it replays the training run, so it needs a model trained by dtrak)")
    index_path = os.path.join(root, index)
    fields = {"model_checkpoint_hash": str, "dataset": str, "setting": dict, "checkpoints": list}
    bad = [key for key, kind in fields.items() if not isinstance(entry.get(key), kind)]
    bad += [f"checkpoints[{i}]" for i, c in enumerate(entry.get("checkpoints") or [])
            if not (isinstance(c, dict) and {"step", "checkpoint", "checkpoint_hash", "store"} <= set(c))]
    if bad:
        raise IntegrityError(index_path, f"(TracInCP index) lacks or garbles {', '.join(bad)}",
                             "rebuild it with `python -m dtrak_core build-baselines`")
    model_hash = checkpoint_hash(attributor.unet)
    if entry["model_checkpoint_hash"] != model_hash or entry["dataset"] != attributor.train.fingerprint:
        raise MethodUnavailable(f"the TracInCP checkpoints under {root!r} belong to model {entry['model_checkpoint_hash']} "
                                f"on data {entry['dataset']}, not to this model ({model_hash}, data {attributor.train.fingerprint})")
    setting = FeatureSetting(**entry["setting"])
    out = []
    for c in entry["checkpoints"]:
        unet, scheduler = load_checkpoint(os.path.join(root, c["checkpoint"]))
        h = checkpoint_hash(unet)
        if h != c["checkpoint_hash"]:
            raise IntegrityError(os.path.join(root, c["checkpoint"], "unet"), f"(TracInCP checkpoint weights) "
                                 f"hashes to {h}, but {index_path} records {c['checkpoint_hash']} (the weights were "
                                 f"replaced or are corrupt)", "rebuild them with `python -m dtrak_core build-baselines`")
        store = FeatureStore.open(os.path.join(root, c["store"]), FeatureStore.identity(setting, h, attributor.train.fingerprint))
        out.append(TracInCheckpoint(c["step"], Featurizer(unet, scheduler, setting),
                                    torch.from_numpy(np.array(store.features())).double()))
    return out


# -- Journey TRAK ------------------------------------------------------------------------------
class JourneyFeaturizer:
    """Generation seeds -> projected loss gradients (B, k) averaged along each sample's DDIM trajectory.

    At each DDIM step i (timestep t_i) of the sampler's run for a seed, the predicted clean image
    x0_i (as the sampler computes it, clipped to [-1, 1]) is re-noised at t_i with the noise that
    the training features use at t_i (seeded by t_i): x_i = sqrt(abar_ti) x0_i + sqrt(1 - abar_ti) eps_ti.
    The feature is P^T grad_theta mean_i mean((eps_theta(x_i, t_i) - eps_ti)^2), with the projector
    of the TRAK store it is scored against.

    Thread-safe: the sampling is a read-only forward of `unet`; the gradients swap parameters
    (`functional_call`), so they run on a private replica (`shared.ModelReplicas`).
    """

    def __init__(self, unet, scheduler, projector, steps: int = JOURNEY_STEPS, batch_size: int = 16):
        self.unet, self.scheduler, self.projector = unet.eval(), scheduler, projector
        self.replicas = ModelReplicas(self.unet)
        self.steps, self.batch_size = steps, batch_size

    @torch.no_grad()
    def trajectory(self, seeds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(final images (B, C, H, W), x0 predictions (B, S, C, H, W), timesteps (S,)), as `generate` samples."""
        cfg = self.unet.config
        x = torch.cat([torch.randn((1, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                                   generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(self.steps)
        x0s = []
        for t in sched.timesteps:
            eps = self.unet(x, t, return_dict=False)[0]
            out = sched.step(eps, t, x, eta=0.0)
            x0s.append(out.pred_original_sample)
            x = out.prev_sample
        return x.clamp(-1, 1), torch.stack(x0s, 1), sched.timesteps.clone()

    def gradients(self, x0s: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 predictions (B, S, C, H, W) at timesteps (S,) -> mean loss gradients (B, d)."""
        abar = self.scheduler.alphas_cumprod.float()[timesteps].view(-1, 1, 1, 1)
        noise = timestep_noise(timesteps, x0s.shape[2:])  # (S, C, H, W)
        params = trainable_params(self.unet)

        with self.replicas.borrow() as unet:
            def objective(p, x0):  # x0 (S, C, H, W): one sample's trajectory
                xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
                pred = functional_call(unet, p, (xt, timesteps), {"return_dict": False})[0]
                return (pred - noise).flatten(1).pow(2).mean(1).mean()

            g = vmap(grad(objective), in_dims=(None, 0))(params, x0s)
        return torch.cat([v.reshape(len(x0s), -1) for v in g.values()], dim=1)

    def __call__(self, seeds, images: torch.Tensor | None = None, atol: float = 1e-2) -> torch.Tensor:
        """(B, k) features; with `images`, first check that they are these seeds' samples."""
        seeds = [int(s) for s in seeds]
        if images is not None and len(images) != len(seeds):
            raise ValueError(f"got {len(seeds)} seeds for {len(images)} images")
        out = []
        for i in range(0, len(seeds), self.batch_size):
            final, x0s, ts = self.trajectory(seeds[i:i + self.batch_size])
            if images is not None and (final - images[i:i + self.batch_size]).abs().max() > atol:
                raise ValueError(f"journey-trak: the images are not the DDIM-{self.steps} samples of seeds "
                                 f"{seeds[i:i + self.batch_size]}")
            out.append(self.projector.project(self.gradients(x0s, ts)))
        return torch.cat(out)


# -- per-attributor state ----------------------------------------------------------------------
class _Context:
    """Lazily computed inputs of the baselines for one attributor (and one assets root)."""

    def __init__(self, attributor: Attributor, root: str, clip_path: str | None):
        self.attributor, self.root, self.clip_path = attributor, root, clip_path
        self._cache = OnceCache()

    def cached(self, key, make):
        return self._cache.get(key, make)

    def loss_setting(self, K=None) -> tuple[FeatureSetting, FeatureStore]:
        try:
            return self.attributor.setting("loss", K)
        except ValueError as e:
            raise MethodUnavailable(str(e)) from e

    def loss_train(self, K=None) -> torch.Tensor:
        setting, store = self.loss_setting(K)
        return self.cached(("loss-train", setting), lambda: torch.from_numpy(np.array(store.features())).double())

    def loss_query(self, images, K=None) -> torch.Tensor:
        setting, _ = self.loss_setting(K)
        return self.attributor.featurizer(setting)(images).double()

    def clip(self) -> ClipImageEncoder:
        def load():
            try:
                return ClipImageEncoder.load(self.clip_path)
            except ClipUnavailable as e:
                return e
        enc = self.cached("clip", load)
        if isinstance(enc, ClipUnavailable):
            raise MethodUnavailable(str(enc)) from enc
        return enc

    def clip_train(self) -> torch.Tensor:
        enc = self.clip()
        return self.cached("clip-train", lambda: enc(self.attributor.train.images))

    def tracin(self) -> list[TracInCheckpoint]:
        return self.cached("tracin", lambda: load_tracin(self.root, self.attributor))


_CONTEXTS: "weakref.WeakKeyDictionary[Attributor, dict]" = weakref.WeakKeyDictionary()


_CONTEXTS_LOCK = threading.Lock()


def _context(attributor: Attributor, root: str, clip_path: str | None) -> _Context:
    key = (os.path.abspath(root), clip_path)
    with _CONTEXTS_LOCK:
        per = _CONTEXTS.setdefault(attributor, {})
        if key not in per:
            per[key] = _Context(attributor, root, clip_path)
        return per[key]


# -- the registry ------------------------------------------------------------------------------
def _pixels(ctx, images, seeds, K, kind):
    return similarity(images.flatten(1), ctx.attributor.train.images.flatten(1), kind)


def _clip(ctx, images, seeds, K, kind):
    return similarity(ctx.clip()(images), ctx.clip_train(), kind)


def _gradient(ctx, images, seeds, K, kind):
    return similarity(ctx.loss_query(images, K), ctx.loss_train(K), kind)


def _tracin(ctx, images, seeds, K, kind):
    return sum(similarity(c.featurizer(images), c.train_features, kind) for c in ctx.tracin())


def ip_norms(scorer, kind: str) -> np.ndarray:
    """(N,) per-training-sample divisors of Relative IP ('relative') and Renorm IP ('renorm')."""
    if kind == "relative":  # columns of scorer.weights are (Phi^T Phi + lam I)^-1 phi_n
        return np.maximum(scorer.weights.norm(dim=0).numpy(), 1e-300)
    if kind == "renorm":
        return np.maximum(scorer.train_features.norm(dim=1).numpy(), 1e-300)
    raise ValueError(f"kind must be 'relative' or 'renorm', got {kind!r}")


def _ip(ctx, images, seeds, K, kind):
    setting, _ = ctx.loss_setting(K)
    scorer = ctx.attributor.scorer("loss", setting.K)
    norms = ctx.cached((kind, setting, scorer.lam), lambda: ip_norms(scorer, kind))
    return scorer.scores(ctx.loss_query(images, K)) / norms


def _journey(ctx, images, seeds, K, kind):
    if seeds is None:
        raise MethodUnavailable("journey-trak attributes generated samples only: pass the generation seeds")
    setting, _ = ctx.loss_setting(K)
    att = ctx.attributor
    journey = ctx.cached(("journey", setting),
                         lambda: JourneyFeaturizer(att.unet, att.scheduler, att.featurizer(setting).projector))
    return att.scorer("loss", setting.K).scores(journey(seeds, images))


@dataclass(frozen=True)
class Baseline:
    description: str
    needs: str  # what it needs beyond the model: 'nothing', 'clip', 'loss-store', 'tracin'
    score: Callable  # (context, images, seeds, K, kind) -> (Q, N)
    kind: str = ""

    def __call__(self, ctx, images, seeds=None, K=None) -> np.ndarray:
        return self.score(ctx, images, seeds, K, self.kind)


BASELINES = {
    "pixel-dot": Baseline("dot product of flattened pixels", "nothing", _pixels, "dot"),
    "pixel-cosine": Baseline("cosine of flattened pixels", "nothing", _pixels, "cosine"),
    "clip-dot": Baseline("dot product of CLIP ViT-B/32 image embeddings", "clip", _clip, "dot"),
    "clip-cosine": Baseline("cosine of CLIP ViT-B/32 image embeddings", "clip", _clip, "cosine"),
    "gradient-dot": Baseline("dot product of loss gradients at the final checkpoint", "loss-store", _gradient, "dot"),
    "gradient-cosine": Baseline("cosine of loss gradients at the final checkpoint (Charpiat et al.)", "loss-store",
                                _gradient, "cosine"),
    "tracin": Baseline("TracInCP: loss-gradient dot products summed over training checkpoints", "tracin", _tracin, "dot"),
    "gas": Baseline("GAS: loss-gradient cosines summed over training checkpoints", "tracin", _tracin, "cosine"),
    "relative-ip": Baseline("TRAK score / ||(Phi^T Phi + lam I)^-1 phi_n|| (Barshan et al.)", "loss-store", _ip, "relative"),
    "renorm-ip": Baseline("TRAK score / ||phi_n||", "loss-store", _ip, "renorm"),
    "journey-trak": Baseline("TRAK on loss gradients averaged along the DDIM trajectory (generated samples)",
                             "loss-store", _journey),
}


# -- uniform interface -------------------------------------------------------------------------
def method_problems(attributor: Attributor, root: str = "assets", clip_path: str | None = None) -> dict[str, ValueError]:
    """{baseline name: why it cannot run}: a `MethodUnavailable` when its inputs are absent, another
    ValueError (naming the file) when they are present but damaged."""
    ctx = _context(attributor, root, clip_path)
    checks = {"nothing": lambda: None, "clip": ctx.clip, "loss-store": ctx.loss_train, "tracin": ctx.tracin}
    problems = {}
    for need, check in checks.items():
        try:
            check()
        except ValueError as e:
            problems.update({name: e for name, b in BASELINES.items() if b.needs == need})
    return problems


def unavailable_methods(attributor: Attributor, root: str = "assets", clip_path: str | None = None) -> dict[str, str]:
    """{baseline name: why it cannot run} for this attributor."""
    return {name: str(e) for name, e in method_problems(attributor, root, clip_path).items()}


def available_methods(attributor: Attributor, root: str = "assets", clip_path: str | None = None) -> list[str]:
    """The attributor's own methods (output functions with a store) and the baselines that can run."""
    missing = unavailable_methods(attributor, root, clip_path)
    return list(attributor.methods) + [name for name in BASELINES if name not in missing]


def method_scores(attributor: Attributor, name: str, images: torch.Tensor, seeds=None, *, K: int | None = None,
                  root: str = "assets", clip_path: str | None = None) -> np.ndarray:
    """Scores (Q, N) of any method by name for query images (Q, C, H, W) in [-1, 1].

    `seeds` are the generation seeds of the images (needed by journey-trak only). `K` picks the
    loss/TRAK store for the gradient-based methods (default: the largest). Raises
    `MethodUnavailable` (a ValueError) when the method's weights or stores are not present.
    """
    cfg = attributor.unet.config
    expected = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a tensor (Q, {', '.join(map(str, expected))}), got {shape}")
    images = images.float()
    key = name.strip().lower()
    if key in BASELINES:
        return BASELINES[key](_context(attributor, root, clip_path), images, seeds, K)
    try:
        return attributor.scores(images, name, K)
    except ValueError as e:
        if "unknown output function" in str(e):
            raise ValueError(f"unknown method {name!r}; choose a TRAK-family name ({', '.join(attributor.methods)}, "
                             f"d-trak, trak) or a baseline ({', '.join(BASELINES)})") from None
        raise
