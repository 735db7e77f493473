"""LDS for a text-to-image model: LoRA retrains on random half subsets of the fine-tuning set.

The default's protocol (evaluation/lds_run.py, evaluation/lds.py) with the published ArtBench changes: each subset's
model is the *base* pipeline with a fresh LoRA fine-tuned on that subset only (same recipe, the
job's seed), and the ground truth F(x; theta_m) is the eps-prediction MSE of the test image's VAE
latent (posterior mode x scaling factor) conditioned on its prompt, averaged over evenly spaced
timesteps x fixed noise draws x training seeds. Retrains are jobs of `retrain.run_jobs`
(resumable, shardable, one small result per model), so a run can span sessions.

    out_dir/setup.json, test_sets.npz, jobs/<id>.npz   as the default's run (jobs are committed)
    out_dir/models/<id>.safetensors                    each retrained LoRA (git-ignored)
    out_dir/queries/<set>/<setting>/                   test-set feature stores (cached)
    out_dir/train/<setting>/                           training-set stores of settings the folder lacks (cached)

Test sets: the validation digits of the fine-tuned classes with their captions, and generated
samples (prompt i cycles through the fine-tuned digits, seed i).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace

import numpy as np
import torch

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.similarity import ip_norms
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.evaluation.lds import lambda_study, lds
from dtrak_core.evaluation.lds_run import TEST_SETS, LDSConfig, LDSRun, collect, compact_losses, eval_timesteps
from dtrak_core.evaluation.retrain import RetrainJob
from dtrak_core.files import atomic_write_bytes, load_result
from dtrak_core.text2image.data import CaptionedDataset, digit_caption, load_digit_captions
from dtrak_core.text2image.features import CaptionedInputs, ConditionalFeaturizer, featurize_fn
from dtrak_core.text2image.lora import lora_state_dict
from dtrak_core.text2image.training import LatentInputs, LoraTrainConfig, finetune_lora, latent_inputs

# The miniature's run: 64 subsets x 2 training seeds as the default's; fewer ground-truth
# timesteps (20 x 3 noise draws, every fifth being kept too) because a LoRA retrain is cheap next to measuring it.
MINIATURE_LDS = LDSConfig(num_subsets=64, eval_timesteps=20, generated=100)


@torch.no_grad()
def conditional_eps_losses(unet, scheduler, latents: torch.Tensor, contexts: torch.Tensor, timesteps: torch.Tensor,
                           noise_seeds, chunk: int = 2048) -> np.ndarray:
    """(S, T, Q) eps-prediction MSE of each latent, conditioned on its context, at each timestep for
    each noise seed; the noise for seed s is one (T, Q, c, h, w) draw, the same for every model."""
    unet.eval()
    Q, T = len(latents), len(timesteps)
    t_flat = timesteps.repeat_interleave(Q)  # row-major over (T, Q)
    z_flat, h_flat = latents.repeat(T, 1, 1, 1), contexts.repeat(T, 1, 1)
    out = np.empty((len(noise_seeds), T, Q), dtype=np.float32)
    for si, s in enumerate(noise_seeds):
        noise = torch.randn((T * Q, *latents.shape[1:]), generator=torch.Generator().manual_seed(int(s)))
        losses = torch.empty(T * Q)
        for a in range(0, T * Q, chunk):
            b = min(a + chunk, T * Q)
            noisy = scheduler.add_noise(z_flat[a:b], noise[a:b], t_flat[a:b])
            pred = unet(noisy, t_flat[a:b], h_flat[a:b], return_dict=False)[0]
            losses[a:b] = (pred - noise[a:b]).pow(2).flatten(1).mean(1)
        out[si] = losses.view(T, Q).numpy()
    return out


class TextToImageLDSRun(LDSRun):
    """LoRA retrains + ground truth for one base pipeline (see the module docstring)."""

    def __init__(self, out_dir: str, base, train: CaptionedDataset, lora_config: LoraTrainConfig, config: LDSConfig,
                 test_sets: dict[str, tuple[torch.Tensor, list[str]]], identity: dict | None = None):
        prompts = {name: list(p) for name, (_, p) in test_sets.items()}
        super().__init__(out_dir, train.images, base.scheduler, lora_config, config,
                         {name: images for name, (images, _) in test_sets.items()},
                         {**(identity or {}), "test_prompts": prompts, "kind": "text2image"})
        self.base, self.train = base, train
        self._inputs: LatentInputs | None = None
        self._tests: dict[str, CaptionedInputs] | None = None

    def inputs(self) -> LatentInputs:
        if self._inputs is None:
            contexts = torch.cat([self.base.encode_prompts(list(self.train.captions[i:i + 256]))
                                  for i in range(0, len(self.train), 256)])
            self._inputs = latent_inputs(self.base.vae, self.train.images, contexts)
        return self._inputs

    def test_inputs(self) -> dict[str, CaptionedInputs]:
        if self._tests is None:
            prompts = self.identity["test_prompts"]
            self._tests = {name: CaptionedInputs.of(self.base, images, prompts[name])
                           for name, images in self.test_sets.items()}
        return self._tests

    def _work(self, job: RetrainJob) -> dict:
        t0 = time.perf_counter()
        unet = finetune_lora(self.base.unet, self.scheduler, self.inputs(), replace(self.train_config, seed=job.seed),
                             keep=job.keep, show_bar=False)
        train_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        ts = eval_timesteps(self.config.eval_timesteps, self.scheduler.config.num_train_timesteps)
        out = {}
        for name, inputs in self.test_inputs().items():
            out.update(compact_losses(name, conditional_eps_losses(unet, self.scheduler, inputs.latents,
                                                                   inputs.contexts, ts, self.config.noise_seeds)))
        from safetensors.torch import save

        os.makedirs(os.path.join(self.out_dir, "models"), exist_ok=True)
        atomic_write_bytes(os.path.join(self.out_dir, "models", f"{job.id}.safetensors"), save(lora_state_dict(unet)))
        return {**out, "train_seconds": np.float64(train_seconds), "eval_seconds": np.float64(time.perf_counter() - t0),
                "keep": job.keep.astype(np.int32), "seed": np.int64(job.seed)}

    def run(self, shard: tuple[int, int] = (0, 1), max_jobs: int | None = None, show_bar: bool = True) -> list[str]:
        """Retrain and measure this shard's unfinished jobs, at most `max_jobs` of them (in list order,
        so a run done in pieces completes whole subsets first); returns the ids done now."""
        from dtrak_core.evaluation.retrain import run_jobs

        self.prepare()
        jobs = self.jobs()
        if max_jobs is not None:
            i, n = shard
            done = {f[:-4] for f in os.listdir(self.jobs_dir) if f.endswith(".npz")}
            jobs = [j for k, j in enumerate(jobs) if k % n == i and j.id not in done][:max_jobs]
            shard = (0, 1)
        return run_jobs(jobs, self.jobs_dir, self._work, shard=shard, show_bar=show_bar)


def miniature_test_sets(pipeline, config: LDSConfig, guidance_scale: float) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Validation digits 5-9 with their captions; `config.generated` samples, prompt i naming digit
    5 + i % 5, seed i."""
    from dtrak_core.text2image.build import FINETUNE_DIGITS
    from dtrak_core.text2image.sampling import generate

    validation = load_digit_captions("validation", FINETUNE_DIGITS)
    prompts = [digit_caption(FINETUNE_DIGITS[i % len(FINETUNE_DIGITS)]) for i in range(config.generated)]
    generated = generate(pipeline, prompts, range(config.generated), steps=config.sample_steps,
                         guidance_scale=guidance_scale)
    return {"validation": (validation.images, list(validation.captions)), "generated": (generated, prompts)}


def miniature_run(root: str, out_dir: str, config: LDSConfig = MINIATURE_LDS) -> TextToImageLDSRun:
    """The LDS run of the text-to-image folder `root` (the miniature: its recipe is recorded)."""
    from dtrak_core.folder import ModelFolder
    from dtrak_core.text2image.attributor import TextToImageAttributor
    from dtrak_core.text2image.pipeline import TextToImagePipeline

    folder = ModelFolder.load(root)
    recipe = folder.extra.get("recipe")
    if not isinstance(recipe, dict) or "lora" not in recipe:
        raise ValueError(f"{folder.path} records no LoRA recipe: LDS retrains need a LoRA fine-tuned by dtrak "
                         f"(`python -m dtrak_core build-text2image`)")
    attributor = TextToImageAttributor.load(root)
    base = TextToImagePipeline.load(folder.checkpoint_path)
    tests = miniature_test_sets(attributor.pipeline, config, attributor.guidance_scale)
    identity = {"checkpoint": folder.checkpoint_hash, "base": base.weights_hash(), "dataset": attributor.train.fingerprint}
    return TextToImageLDSRun(out_dir, base, attributor.train, LoraTrainConfig(**recipe["lora"]), config, tests, identity)


# -- evaluation -------------------------------------------------------------------------------------
def query_features(attributor, setting: FeatureSetting, images: torch.Tensor, prompts, path: str,
                   show_bar: bool = False) -> np.ndarray:
    """Features of test (image, prompt) pairs, cached as a feature store at `path` (resumable)."""
    h = hashlib.sha256(images.contiguous().numpy().tobytes())
    for p in prompts:
        h.update(p.encode() + b"\0")
    identity = FeatureStore.identity(setting, attributor.pipeline.weights_hash(), h.hexdigest()[:16])
    store = FeatureStore.create(path, identity, len(images), setting.k, slice_size=32)
    inputs = CaptionedInputs.of(attributor.pipeline, images, prompts)
    featurizer = ConditionalFeaturizer(attributor.unet, attributor.scheduler, setting)
    return np.array(store.fill(featurize_fn(featurizer), inputs, show_bar=show_bar).features())


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-30)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-30)
    return a @ b.T


# lambda = c x the mean squared training-feature norm, c in 1e-6..5e2 (1, 2, 5 per decade): the
# paper's absolute grid (1e-2..5e6) starts above the best lambda of the LoRA features here, whose
# squared norms are ~0.07.
RELATIVE_GRID = tuple(float(f"{m}e{e}") for e in range(-6, 3) for m in (1, 2, 5))


def training_features(attributor, setting: FeatureSetting, run_dir: str) -> np.ndarray:
    """The training set's features for `setting`: the model folder's store if it has one, else a
    store cached under run_dir/train/ (e.g. another K)."""
    for s, store in attributor.stores.get(setting.output_fn, []):
        if s == setting:
            return np.asarray(store.features())
    train = attributor.train
    return query_features(attributor, setting, train.images, list(train.captions),
                          os.path.join(run_dir, "train", setting.slug), show_bar=True)


def evaluate(run_dir: str, attributor, methods=("d-trak", "trak"), K: int | None = None,
             num_bootstrap: int = 1000) -> dict:
    """LDS x 100 of every method on each test set from the finished jobs of `run_dir`.

    TRAK-family methods (K: the stores' timesteps, None the model folder's largest): lambda from
    `RELATIVE_GRID`, best on the test set itself (the paper's choice) and 2-fold cross-fitted
    (`lds.lambda_sweep`). Baselines (no lambda): the registry's text-to-image baselines
    (`methods.all("baseline", "text2image")`): pixel and latent similarity, loss-gradient dot / cosine
    (Charpiat et al.), relative and renormalised IP (TRAK score over a per-training-sample norm) at the
    `trak` store's lambda; those over the loss gradients only when `trak` is among `methods`.
    """
    from dtrak_core.attribution import methods as registry
    from dtrak_core.attribution.output_functions import canonical_name
    from dtrak_core.attribution.scoring import TRAKScorer, default_lambda

    col = collect(run_dir)
    M = len(col["subsets"])
    if M < 3:
        raise ValueError(f"only {M} subsets of {run_dir!r} have all their training seeds done; LDS needs at least 3")
    config = LDSConfig(**col["setup"]["lds_config"])
    prompts = col["setup"]["test_prompts"]
    test_sets = {k: torch.from_numpy(v) for k, v in load_result(os.path.join(run_dir, TEST_SETS)).items()}
    results = {"subsets_done": M, "subsets_planned": config.num_subsets, "partial": M < config.num_subsets,
               "train_seeds": list(config.train_seeds), "methods": {}, "baselines": {},
               "seconds_per_model": {"train_mean": float(np.mean(col["train_seconds"])),
                                     "eval_mean": float(np.mean(col["eval_seconds"]))}}
    query = {}
    for name in methods:
        setting = attributor.setting(name)[0]
        if K is not None:
            setting = setting.with_(K=K)
        train_features = training_features(attributor, setting, run_dir)
        scale = default_lambda(train_features, 1.0)  # the mean squared training-feature norm
        grid = tuple(c * scale for c in RELATIVE_GRID)
        results["methods"][name] = {"setting": setting.to_dict(), "mean_squared_norm": scale}
        for set_name, images in test_sets.items():
            q = query_features(attributor, setting, images, prompts[set_name],
                               os.path.join(run_dir, "queries", set_name, setting.slug))
            query[(canonical_name(name), set_name)] = (train_features, q)
            results["methods"][name][set_name] = lambda_study(train_features, q, col["masks"], col["F"][set_name],
                                                              grid=grid, num_bootstrap=num_bootstrap)
    for set_name, images in test_sets.items():
        F, masks = col["F"][set_name], col["masks"]
        for method in registry.all("baseline", "text2image"):
            if method.store is None:  # model-free: pixels or VAE latents, at the folder's tuned (lambda, gamma)
                scores = registry.scores(attributor, method.name, images)
                v, pm = lds(scores, masks, F, num_bootstrap)
                results["baselines"].setdefault(method.name, {})[set_name] = {"lds": v, "pm": pm}
                continue
            if (method.store, set_name) not in query:  # its store's TRAK-family method was not evaluated
                continue
            train, q = query[(method.store, set_name)]
            if method.kind in ("dot", "cosine"):
                scores = q @ train.T if method.kind == "dot" else _cosine(q, train)
            else:  # relative / renorm IP at the store's paper lambda
                store_method = next(n for n in methods if canonical_name(n) == method.store)
                scorer = TRAKScorer(lam=results["methods"][store_method][set_name]["paper"]["lambda"]).fit(train)
                norms = (np.maximum(np.linalg.norm(train, axis=1), 1e-30) if method.kind == "renorm"
                         else ip_norms(scorer, method.kind))
                scores = scorer.scores(q) / norms[None]
            v, pm = lds(scores, masks, F, num_bootstrap)
            results["baselines"].setdefault(method.name, {})[set_name] = {"lds": v, "pm": pm}
    return results


def format_table(results: dict) -> str:
    """The LDS results as a Markdown table (validation / generated)."""
    done = f"{results['subsets_done']} of {results['subsets_planned']} subsets" if results["partial"] else \
        f"{results['subsets_done']} subsets"
    from dtrak_core.attribution.methods import label

    lines = [f"LDS x 100 ({done} x {len(results['train_seeds'])} LoRA retrains each; +- bootstrap over subsets; "
             "higher is better). TRAK-family cells: lambda cross-fitted over test samples (2 folds), then in "
             "parentheses the best lambda on the reported samples themselves (the paper's choice).", "",
             "| method | validation | generated | paper lambda / mean squared feature norm (val / gen) |",
             "|---|---|---|---|"]
    for name, r in results["methods"].items():
        cells = [f"{r[s]['honest']['lds']:.2f} +- {r[s]['honest']['pm']:.2f} ({r[s]['paper']['lds']:.2f})"
                 for s in ("validation", "generated")]
        rel = [r[s]["paper"]["lambda"] / r["mean_squared_norm"] for s in ("validation", "generated")]
        lines.append(f"| {label(name)}, K={r['setting']['K']} | {cells[0]} | {cells[1]} | {rel[0]:.0e} / {rel[1]:.0e} |")
    for name, r in results["baselines"].items():
        lines.append(f"| {label(name)} | {r['validation']['lds']:.2f} +- {r['validation']['pm']:.2f} | "
                     f"{r['generated']['lds']:.2f} +- {r['generated']['pm']:.2f} | |")
    s = results["seconds_per_model"]
    lines += ["", f"Cost per retrained model: {s['train_mean']:.1f} s LoRA fine-tuning + {s['eval_mean']:.1f} s ground truth."]
    return "\n".join(lines) + "\n"
