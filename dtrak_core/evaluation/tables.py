"""The benchmark tables of a model, all scored against one LDS run's ground truth (see lds_run.py).

1. `ablation_table`: output functions (loss = TRAK, square = D-TRAK, ...) x K timesteps;
2. `methods_table`: every baseline of the poster's table beside TRAK and D-TRAK at K = 10 and 100;
3. `ensemble_table`: TRAK and D-TRAK averaged over S models, each trained on its own random half.

Every cell is an LDS on both test sets with the same subsets, ground truth and bootstrap
resamples. Methods with a ridge lambda are swept over `LAMBDA_GRID` and reported twice: `honest`
(2-fold cross-fitting over test samples, the headline number) and `paper` (the lambda best on the
reported samples themselves, as the paper chose it; optimistic).

The expensive inputs are features, computed by resumable commands and cached as feature stores
under the run folder (git-ignored; the same commands rebuild them):

    <run>/train/<setting>/                training-set features of the model (unless <root> has the store)
    <run>/queries/<test set>/<setting>/   test-set features
    <run>/ensemble/e<j>/                  ensemble member j: model/, train/, queries/

A cell whose inputs are missing says so, with the command that computes them, so a table can be
filled over several sessions. `tables_report.tables` evaluates them all and writes the report;
`tuning.tune_lambdas` picks the app's lambda on the validation LDS.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.attribution.scoring import SpectralTRAK, default_lambda
from dtrak_core.attribution.store import FeatureStore, cached_store
from dtrak_core.evaluation.lds import SubsetBootstrap, lambda_sweep, rank_corr
from dtrak_core.evaluation.lds_run import LDSConfig, collect, load_test_sets, subset_indices
from dtrak_core.evaluation.retrain import retrain
from dtrak_core.folder import default_root
from dtrak_core.model.data import fingerprint
from dtrak_core.model.training import TrainConfig
from dtrak_core.model.unet import checkpoint_hash, load_checkpoint, save_checkpoint

ABLATION_OUTPUT_FNS = ("loss", "elbo", "square", "avg", "l1-norm", "l2-norm", "linf-norm",
                       "eta=0", "eta=0.25", "eta=0.75")  # the poster's interpolation: eta=1 is square, eta=0.5 ~ loss
ABLATION_K = (10, 100, 1000)
METHOD_K = (10, 100)
ENSEMBLE_SIZES = (1, 2, 4, 8)
ENSEMBLE_K = 100
ENSEMBLE_SUBSET_SEED = 1  # member halves: default_rng([1, j]); the LDS subsets use seed 0
ENSEMBLE_TRAIN_SEED = 1000  # member j trains with seed 1000 + j (the LDS models use 1, 2)
# The paper's 1-2-5 grid (1e-2..5e6) extended three decades down: the features of a 160K-parameter
# model on 8x8 images are small, and D-TRAK's best lambda sat at the paper grid's lower edge.
LAMBDA_GRID = tuple(float(f"{m}e{e}") for e in range(-5, 7) for m in (1, 2, 5))


class ModelFeatures:
    """Training-set and test-set features of one model for any `FeatureSetting`, cached under `base`.

    `registered` maps settings to existing complete training stores (e.g. the committed ones in
    assets/stores), which are used instead of computing a copy.
    """

    def __init__(self, base: str, unet, scheduler, train_images: torch.Tensor, train_fingerprint: str,
                 test_sets: dict[str, torch.Tensor], registered: dict | None = None):
        self.base, self.unet, self.scheduler = base, unet.eval(), scheduler
        self.train_images, self.train_fingerprint, self.test_sets = train_images, train_fingerprint, test_sets
        self.checkpoint = checkpoint_hash(unet)
        self.registered = dict(registered or {})
        self._test_fingerprints = {name: fingerprint(x) for name, x in test_sets.items()}

    def train_path(self, setting: FeatureSetting) -> str:
        if setting in self.registered:
            return self.registered[setting]
        return os.path.join(self.base, "train", setting.slug)

    def query_path(self, set_name: str, setting: FeatureSetting) -> str:
        return os.path.join(self.base, "queries", set_name, setting.slug)

    def train(self, setting: FeatureSetting, compute: bool = False, show_bar: bool = True) -> np.ndarray | None:
        """Training-set features (N, k); computed first when `compute`, else None unless complete."""
        identity = FeatureStore.identity(setting, self.checkpoint, self.train_fingerprint)
        store = cached_store(self.train_path(setting), identity, self.train_images,
                             lambda: Featurizer(self.unet, self.scheduler, setting), setting.k, build=compute,
                             show_bar=show_bar)
        return None if store is None else np.array(store.features())

    def query(self, set_name: str, setting: FeatureSetting, compute: bool = False, show_bar: bool = True):
        """Features (Q, k) of one test set; computed first when `compute`, else None unless complete."""
        identity = FeatureStore.identity(setting, self.checkpoint, self._test_fingerprints[set_name])
        store = cached_store(self.query_path(set_name, setting), identity, self.test_sets[set_name],
                             lambda: Featurizer(self.unet, self.scheduler, setting), setting.k, slice_size=32,
                             build=compute, show_bar=show_bar)
        return None if store is None else np.array(store.features())

    def compute(self, setting: FeatureSetting, show_bar: bool = True) -> None:
        """Fill (or finish) the training store and every test-set store of `setting`."""
        self.train(setting, compute=True, show_bar=show_bar)
        for name in self.test_sets:
            self.query(name, setting, compute=True, show_bar=show_bar)

    def has(self, setting: FeatureSetting) -> bool:
        return self.train(setting) is not None and all(self.query(n, setting) is not None for n in self.test_sets)


class Bench:
    """Everything the tables need for one model: its LDS run, features, baselines and ensemble members.

    run_dir: the LDS run of the model (`lds_run.LDSRun`); root: its model folder (None:
    `folder.default_root()`); the keyword options pick the output functions, K and ensemble sizes.
    """

    def __init__(self, run_dir: str, root: str | None = None, *, ablation_fns=ABLATION_OUTPUT_FNS, ablation_Ks=ABLATION_K,
                 method_Ks=METHOD_K, ensemble_sizes=ENSEMBLE_SIZES, ensemble_K: int = ENSEMBLE_K,
                 journey_K: int = 100, successors: bool = False, tuned: bool = True):
        root = default_root() if root is None else root
        self.run_dir, self.root = run_dir, root
        self.ablation_fns, self.ablation_Ks, self.method_Ks = tuple(ablation_fns), tuple(ablation_Ks), tuple(method_Ks)
        self.ensemble_sizes, self.ensemble_K, self.journey_K = tuple(ensemble_sizes), ensemble_K, journey_K
        self.successors = successors  # methods_table: a row per registered successor (DAS) too
        self.attributor = Attributor.load(root, tuned=tuned)  # tuned=False: `tune_lambdas`, which replaces them
        stores = [s for v in self.attributor.stores.values() for s, _ in v]
        if not stores:
            from dtrak_core.remedies import build_command

            raise ValueError(f"the model in {root!r} has no feature stores; build them with `{build_command(root)}`")
        # projector, k and seed of the model's own stores, so every table's features share them
        self.base = max(stores, key=lambda s: (s.output_fn == "square", s.K))
        self.truth = collect(run_dir)
        setup = self.truth["setup"]
        if setup.get("checkpoint") not in (None, checkpoint_hash(self.attributor.unet)):
            raise ValueError(f"the LDS run in {run_dir!r} was made for model {setup['checkpoint']}, not for the model "
                             f"in {root!r} ({checkpoint_hash(self.attributor.unet)})")
        self.config = LDSConfig(**setup["lds_config"])
        self.test_sets = load_test_sets(run_dir)
        train = self.attributor.train
        registered = {s: store.path for v in self.attributor.stores.values() for s, store in v}
        self.features = ModelFeatures(run_dir, self.attributor.unet, self.attributor.scheduler, train.images,
                                      train.fingerprint, self.test_sets, registered)
        recipe = setup.get("train_config")  # None: retrained by your own script (`lds_own`), no ensembles here
        self.train_config = None if recipe is None else TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                                      for k, v in recipe.items()})

    def setting(self, output_fn: str, K: int) -> FeatureSetting:
        return self.base.with_(output_fn=output_fn, K=K)

    def command(self, action: str) -> str:
        """The command that computes a missing input of this bench, as it runs on its model folder
        and run (--root / --out named unless they are the defaults): `lds <action>` for a run of the
        built-in harness; for a run of checkpoints your own script retrained (`lds_own`), `lds-own
        evaluate`, which computes every missing feature first."""
        from dtrak_core.errors import root_option

        root = root_option(self.root)
        if self.truth["setup"].get("subsets_given"):
            return f"python -m dtrak_core lds-own evaluate{root} --out {self.run_dir}"
        default_out = os.path.join(self.root, "benchmarks", "lds_run")
        out = "" if os.path.abspath(self.run_dir) == os.path.abspath(default_out) else f" --out {self.run_dir}"
        return f"python -m dtrak_core lds {action}{root}{out}"

    # -- ensemble members --------------------------------------------------------------------------
    def member_dir(self, j: int) -> str:
        return os.path.join(self.run_dir, "ensemble", f"e{j}")

    def member(self, j: int, train: bool = False, show_bar: bool = True) -> ModelFeatures | None:
        """Ensemble member j (trained on its own random half with seed ENSEMBLE_TRAIN_SEED + j); trained
        and saved first when `train`, else None when it is not there yet."""
        path = os.path.join(self.member_dir(j), "model")
        if not os.path.isdir(path):
            if not train:
                return None
            if self.train_config is None:
                raise ValueError(f"the LDS run in {self.run_dir!r} has no training recipe (its models were retrained "
                                 f"by your own script), so dtrak cannot train ensemble members for it")
            from dataclasses import replace

            keep = subset_indices(len(self.attributor.train), j, 0.5, ENSEMBLE_SUBSET_SEED)
            unet = retrain(self.attributor.train.images, keep, self.attributor.scheduler,
                           replace(self.train_config, seed=ENSEMBLE_TRAIN_SEED + j), show_bar=show_bar)
            save_checkpoint(path, unet, self.attributor.scheduler)
        unet, scheduler = load_checkpoint(path)
        train_set = self.attributor.train
        return ModelFeatures(self.member_dir(j), unet, scheduler, train_set.images, train_set.fingerprint,
                             self.test_sets)

    # -- scores ------------------------------------------------------------------------------------
    def trak_sweep_inputs(self, setting: FeatureSetting, members: list[ModelFeatures] | None = None):
        """(train features per model, {set: query features per model}) or None when any is missing."""
        models = members if members is not None else [self.features]
        trains = [m.train(setting) for m in models]
        queries = {name: [m.query(name, setting) for m in models] for name in self.test_sets}
        if any(t is None for t in trains) or any(q is None for v in queries.values() for q in v):
            return None
        return trains, queries


def trak_g_fn(trains: list, queries: dict, masks, normalize: str | None = None):
    """g_fn(lam) for `lambda_sweep`: subset sums of TRAK scores averaged over models (an ensemble
    when > 1), each model from one SVD (`SpectralTRAK`). `normalize` divides each training sample's
    score by ||(Phi^T Phi + lam I)^-1 phi_n|| ('relative', Relative IP) or ||phi_n|| ('renorm')."""
    masks = torch.as_tensor(np.asarray(masks, dtype=np.float64))
    models = []
    for i, train in enumerate(trains):
        trak = SpectralTRAK().fit(train)
        models.append((trak, {name: trak.project(qs[i]).T for name, qs in queries.items()}))

    def g_fn(lam):
        out = {name: 0.0 for name in queries}
        for trak, projected in models:
            w = masks
            if normalize == "relative":
                w = masks / trak.weight_norms(lam).clamp_min(1e-300)
            elif normalize == "renorm":
                w = masks / trak.train_norms_.clamp_min(1e-300)
            A = (w @ trak.U_) * trak.shrink(lam)
            for name, B in projected.items():
                out[name] = out[name] + (A @ B).numpy()
        return {name: v / len(models) for name, v in out.items()}
    return g_fn


def fixed_cell(scores: np.ndarray, masks, F, bootstrap: SubsetBootstrap) -> dict:
    """LDS x 100 and its bootstrap +- for a method without a lambda: scores (Q, N), masks (M, N), F (M, Q)."""
    g = np.asarray(masks, dtype=np.float64) @ np.asarray(scores, dtype=np.float64).T
    return {"lds": 100 * float(np.nanmean(rank_corr(g, -F))), "pm": 100 * bootstrap.std_of_mean(g, -F)}


# -- the tables ------------------------------------------------------------------------------------
def _featurize_cmd(bench: Bench, output_fn: str, K: int) -> str:
    return bench.command(f"features --output-fn {output_fn} --K {K}")


def sweep_cell(bench: Bench, trains, queries, num_bootstrap: int, default: float | None = None,
                normalize: str | None = None) -> dict:
    """`lds.lambda_sweep` of TRAK scores from training features per model and {test set: query
    features per model} (an ensemble when several models), against the bench's ground truth;
    `default`: the data-free lambda, reported beside the grid; `normalize`: see `trak_g_fn`."""
    F = {name: bench.truth["F"][name] for name in queries}
    g_fn = trak_g_fn(trains, queries, bench.truth["masks"], normalize)
    return lambda_sweep(g_fn, F, LAMBDA_GRID, num_bootstrap, default_lambda=default)


def ablation_table(bench: Bench, num_bootstrap: int = 1000) -> dict:
    rows = {}
    for fn in bench.ablation_fns:
        for K in bench.ablation_Ks:
            setting = bench.setting(fn, K)
            inputs = bench.trak_sweep_inputs(setting)
            key = f"{setting.output_fn}/K{K}"
            if inputs is None:
                rows[key] = {"missing": _featurize_cmd(bench, fn, K)}
                continue
            t0 = time.perf_counter()
            rows[key] = {"setting": setting.to_dict(),
                         **sweep_cell(bench, *inputs, num_bootstrap, default_lambda(inputs[0][0])),
                         "eval_seconds": time.perf_counter() - t0}
    return rows


def methods_table(bench: Bench, num_bootstrap: int = 1000) -> dict:
    """The poster's LDS table: every baseline, TRAK and D-TRAK; rows '<method>/K<K>' for the methods
    built on K-timestep gradient features (K in bench.method_Ks), plain '<method>' for the others
    (pixels and CLIP need no gradients; TracInCP / GAS use their own checkpoints' K=10 stores).

    The baselines are the registry's (`methods.all("baseline", "pixel")`), each scored by its entry's
    `kind` over the bench's cached features (one feature set serves every K and test set); the
    nonparametric ones are measured by `benchmarks/strong_baselines.py`."""
    from dtrak_core.attribution import methods
    from dtrak_core.attribution.clip_encoder import ClipImageEncoder, ClipUnavailable
    from dtrak_core.attribution.similarity import similarity
    from dtrak_core.attribution.tracin import load_tracin
    from dtrak_core.errors import MethodUnavailable

    masks, F = bench.truth["masks"], bench.truth["F"]
    bootstrap = SubsetBootstrap(len(masks), num_bootstrap)
    train = bench.attributor.train.images
    rows = {}

    def fixed(name, scores_by_set, note):
        rows[name] = {"note": note, **{s: fixed_cell(sc, masks, F[s], bootstrap) for s, sc in scores_by_set.items()}}

    baselines = methods.all("baseline", "pixel")
    similarities = [m for m in baselines if m.group == "Similarity baselines"]  # pixels, then CLIP embeddings
    for m in (m for m in similarities if not m.needs):
        fixed(m.name, {s: similarity(x.flatten(1), train.flatten(1), m.kind) for s, x in bench.test_sets.items()},
              m.description)
    for m in (m for m in similarities if "clip" in m.needs):
        try:
            enc = ClipImageEncoder.load(None)
            e_train = enc(train)
            fixed(m.name, {s: similarity(enc(x), e_train, m.kind) for s, x in bench.test_sets.items()}, m.description)
        except ClipUnavailable as e:
            rows[m.name] = {"unavailable": str(e)}
    over_checkpoints = [m for m in baselines if "tracin" in m.needs]  # TracInCP, GAS
    try:
        checkpoints = load_tracin(bench.root, bench.attributor)
    except MethodUnavailable as e:
        rows.update({m.name: {"unavailable": str(e)} for m in over_checkpoints})
    else:
        per_ckpt = tracin_queries(bench, checkpoints, compute=False)
        if per_ckpt is None:
            rows.update({m.name: {"missing": bench.command("features --tracin")} for m in over_checkpoints})
        else:
            for m in over_checkpoints:
                fixed(m.name, summed_over_checkpoints(checkpoints, per_ckpt, m.kind), m.description)
    # journey features are the loss gradients along each sample's trajectory, projected with the
    # store's projector (the same for every K), so one set serves every K's training features
    journey = journey_features(bench, bench.setting("loss", bench.journey_K), compute=False)
    over_gradients = [m for m in baselines if m.store == "loss"]  # gradient-*, relative / renorm IP, Journey-TRAK
    for K in bench.method_Ks:
        loss = bench.trak_sweep_inputs(bench.setting("loss", K))
        if loss is None:
            for name in [m.name for m in over_gradients] + ["trak"]:
                rows[f"{name}/K{K}"] = {"missing": _featurize_cmd(bench, "loss", K)}
        else:
            (phi,), queries = loss
            for m in over_gradients:
                if m.kind in ("dot", "cosine"):
                    fixed(f"{m.name}/K{K}", {s: similarity(q[0], phi, m.kind) for s, q in queries.items()},
                          m.description)
                elif m.kind in ("relative", "renorm"):
                    rows[f"{m.name}/K{K}"] = {"note": m.description,
                                              **sweep_cell(bench, [phi], queries, num_bootstrap, normalize=m.kind)}
                else:  # Journey-TRAK: the generated samples' trajectories
                    rows[f"{m.name}/K{K}"] = (
                        {"missing": bench.command("features --journey")} if journey is None else
                        {"note": m.description + "; generated samples only",
                         **sweep_cell(bench, [phi], {"generated": [journey]}, num_bootstrap)})
            rows[f"trak/K{K}"] = sweep_cell(bench, [phi], queries, num_bootstrap, default_lambda(phi))
        square = bench.trak_sweep_inputs(bench.setting("square", K))
        rows[f"d-trak/K{K}"] = ({"missing": _featurize_cmd(bench, "square", K)} if square is None else
                                sweep_cell(bench, *square, num_bootstrap, default_lambda(square[0][0])))
    if bench.successors:  # the registry's own scorer and lambda, over the folder's largest-K store
        for method in methods.all("successor"):
            try:
                fixed(method.name, {s: method.scores(bench.attributor, x) for s, x in bench.test_sets.items()},
                      method.description)
            except MethodUnavailable as e:
                rows[method.name] = {"unavailable": str(e)}
    return rows


def journey_features(bench: Bench, setting: FeatureSetting, compute: bool = False, show_bar: bool = True):
    """Journey-TRAK features of the generated test set (seeds 0..generated-1), cached as a store."""
    from dtrak_core.attribution.journey import JOURNEY_STEPS, JourneyFeaturizer

    images = bench.test_sets["generated"]
    seeds = np.arange(len(images))
    identity = {**FeatureStore.identity(setting, bench.features.checkpoint, fingerprint(images)),
                "journey_steps": JOURNEY_STEPS}

    def factory():
        journey = JourneyFeaturizer(bench.attributor.unet, bench.attributor.scheduler,
                                    bench.attributor.featurizer(setting).projector)
        return lambda idx: journey(seeds[idx], images[torch.as_tensor(idx)])

    store = cached_store(os.path.join(bench.run_dir, "queries", "generated", f"journey-{setting.slug}"), identity,
                         np.arange(len(images)), factory, setting.k, slice_size=32, build=compute, show_bar=show_bar)
    return None if store is None else np.array(store.features())


def summed_over_checkpoints(checkpoints, per_ckpt: list[dict], kind: str) -> dict:
    """TracInCP ('dot') or GAS ('cosine') scores per test set: the similarity of each checkpoint's
    query and training features, summed over the checkpoints (`tracin_queries` gives per_ckpt)."""
    from dtrak_core.attribution.similarity import similarity

    return {s: sum(similarity(q[s], c.train_features, kind) for c, q in zip(checkpoints, per_ckpt))
            for s in per_ckpt[0]}


def tracin_queries(bench: Bench, checkpoints, compute: bool = False, show_bar: bool = True):
    """Per TracIn checkpoint, {test set: query features (Q, k)} at the checkpoint's weights; None if missing."""
    out = []
    for c in checkpoints:
        f = ModelFeatures(os.path.join(bench.run_dir, "tracin", f"step{c.step}"), c.featurizer.gradients.unet,
                          bench.attributor.scheduler, bench.attributor.train.images,
                          bench.attributor.train.fingerprint, bench.test_sets)
        per = {s: f.query(s, c.featurizer.setting, compute=compute, show_bar=show_bar) for s in bench.test_sets}
        if any(v is None for v in per.values()):
            return None
        out.append(per)
    return out


def ensemble_table(bench: Bench, num_bootstrap: int = 1000) -> dict:
    sizes, K = bench.ensemble_sizes, bench.ensemble_K
    rows = {}
    have = []
    for j in range(max(sizes)):
        m = bench.member(j)
        if m is None:
            break
        have.append(m)
    for label, fn in (("trak", "loss"), ("d-trak", "square")):
        setting = bench.setting(fn, K)
        ready = []
        for m in have:
            if not m.has(setting):
                break
            ready.append(m)
        for S in sizes:
            key = f"{label}/S{S}"
            if len(ready) < S:
                rows[key] = {"missing": bench.command(f"ensemble --models {S} --K {K}")}
                continue
            inputs = bench.trak_sweep_inputs(setting, ready[:S])
            rows[key] = {"models": S, "K": K, **sweep_cell(bench, *inputs, num_bootstrap)}
    return rows
