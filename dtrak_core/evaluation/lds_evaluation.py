"""LDS of attribution methods on an LDS run: the features of the test sets, every method's LDS
with its lambda study, the noise ceiling and the timestep checks; and the wiring for a model folder.

    unet, scheduler, methods, train_features = default_methods("assets")   # D-TRAK and TRAK at K=100
    results = evaluate(run_dir, unet, scheduler, methods, train_features, dest="assets/benchmarks")

`evaluate` writes dest/lds_results.json and the published ground truth (`lds.save_ground_truth`).
Test-set features are cached as feature stores under run_dir/queries/<test set>/<setting>/.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from dtrak_core import checksums
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.attribution.output_functions import canonical_name
from dtrak_core.attribution.scoring import TRAKScorer
from dtrak_core.attribution.store import FeatureStore, cached_store
from dtrak_core.errors import root_option
from dtrak_core.evaluation.lds import lambda_study, lds, noise_ceiling, save_ground_truth
from dtrak_core.evaluation.lds_run import (
    TIMESTEP_STRIDES,
    LDSConfig,
    LDSRun,
    collect,
    collect_full_timesteps,
    load_test_sets,
)
from dtrak_core.folder import ModelFolder
from dtrak_core.model.data import fingerprint, load_digits
from dtrak_core.model.sampling import generate
from dtrak_core.model.unet import checkpoint_hash

RESULTS = "lds_results.json"

def default_run(root: str, out_dir: str, config: LDSConfig = LDSConfig()) -> LDSRun:
    """The LDS run for the digits model in the folder `root`: its recipe, the validation digits and
    its own generated samples (seeds 0..config.generated-1) as test sets."""
    folder = ModelFolder.load(root).require("train_config")
    unet, scheduler = folder.load_model()
    train = load_digits("train")
    validation = load_digits("validation")
    generated = generate(unet, scheduler, range(config.generated), steps=config.sample_steps)
    identity = {"checkpoint": checkpoint_hash(unet), "dataset": train.fingerprint}
    return LDSRun(out_dir, train.images, scheduler, folder.train_config, config,
                  {"validation": validation.images, "generated": generated}, identity)


def query_features(unet, scheduler, setting: FeatureSetting, images: torch.Tensor, path: str,
                   show_bar: bool = True) -> np.ndarray:
    """Projected features (Q, k) of test images (Q, C, H, W), cached (resumable) as a feature store at `path`."""
    identity = FeatureStore.identity(setting, checkpoint_hash(unet), fingerprint(images))
    store = cached_store(path, identity, images, lambda: Featurizer(unet, scheduler, setting), setting.k,
                         slice_size=32, show_bar=show_bar)
    return np.array(store.features())


def evaluate(run_dir: str, unet, scheduler, methods: dict, train_features: dict, dest: str | None = None,
             num_bootstrap: int = 1000, show_bar: bool = True) -> dict:
    """LDS of each method on each test set from the finished jobs of `run_dir` (at least 3 subsets).

    unet, scheduler: the base model the run retrained (its test-set features are computed here).
    methods: name -> FeatureSetting; train_features: name -> (N, k), the method's training-set
    features under that setting. Per method and test set, a `lds.lambda_study` (lambda grid, paper /
    honest / default-rule picks); per test set the noise ceiling; for the first method, LDS with
    fewer of the evaluated timesteps and (with `full_t` results) against all 1000 timesteps.
    Test-set features are cached under run_dir/queries/. With `dest`, writes
    dest/lds_ground_truth.npz (masks, F, generated images) and dest/lds_results.json.
    """
    col = collect(run_dir)
    M = len(col["subsets"])
    if M < 3:
        raise ValueError(f"only {M} subsets of {run_dir!r} have all their training seeds done; LDS needs at least 3")
    setup = col["setup"]
    config = LDSConfig(**setup["lds_config"])
    test_sets = load_test_sets(run_dir)
    results = {"partial": M < config.num_subsets, "subsets_done": M, "subsets_planned": config.num_subsets,
               "train_seeds": list(config.train_seeds), "setup": setup, "methods": {}, "noise_ceiling": {},
               "timestep_check": {},
               "wall_seconds_per_model": {"train_mean": float(np.mean(col["train_seconds"])),
                                          "eval_mean": float(np.mean(col["eval_seconds"]))}}
    for name, setting in methods.items():
        results["methods"][name] = {"setting": setting.to_dict()}
        for set_name, images in test_sets.items():
            q = query_features(unet, scheduler, setting, images, os.path.join(run_dir, "queries", set_name, setting.slug),
                               show_bar=show_bar)
            results["methods"][name][set_name] = lambda_study(train_features[name], q, col["masks"], col["F"][set_name],
                                                              num_bootstrap=num_bootstrap)
    for set_name in test_sets:
        if len(config.train_seeds) >= 2:
            results["noise_ceiling"][set_name] = noise_ceiling(col["F_seeds"][set_name], num_bootstrap)
    # does the timestep subset matter? LDS (default lambda, first method) with every stride-th evaluated timestep
    first = next(iter(methods))
    scorer = TRAKScorer().fit(train_features[first])
    for stride in TIMESTEP_STRIDES:
        if config.eval_timesteps % stride:
            continue
        col_s = collect(run_dir, timestep_stride=stride)
        for set_name, images in test_sets.items():
            q = query_features(unet, scheduler, methods[first], images,
                               os.path.join(run_dir, "queries", set_name, methods[first].slug), show_bar=False)
            v, pm = lds(scorer.scores(q), col_s["masks"], col_s["F"][set_name], num_bootstrap)
            results["timestep_check"].setdefault(set_name, {})[str(config.eval_timesteps // stride)] = {"lds": v, "pm": pm}
    full = collect_full_timesteps(run_dir)
    if full is not None:  # same models, same subsets: run's timestep subset vs all 1000 timesteps
        for set_name, images in test_sets.items():
            q = query_features(unet, scheduler, methods[first], images,
                               os.path.join(run_dir, "queries", set_name, methods[first].slug), show_bar=False)
            sc = scorer.scores(q)
            a = lds(sc, full["masks"], full["F_run"][set_name], num_bootstrap)
            b = lds(sc, full["masks"], full["F"][set_name], num_bootstrap)
            results["timestep_check"][set_name]["all_1000_vs_run"] = {
                "subsets": int(len(full["rows"])), "run": {"lds": a[0], "pm": a[1]}, "all_1000": {"lds": b[0], "pm": b[1]},
                "difference": b[0] - a[0]}
    results["timestep_check"]["method"] = first
    results["timestep_check"]["note"] = ("LDS at the default lambda with F from every stride-th of the run's evaluated "
                                         "timesteps (keys: number of timesteps); all_1000_vs_run: the same retrained "
                                         "models scored against F from all 1000 timesteps (one other noise seed)")
    if dest is not None:
        save_ground_truth(dest, col, test_sets)
        checksums.write_sealed_json(os.path.join(dest, RESULTS), results)  # its checksum in it
    return results


def default_methods(root: str, names=("d-trak", "trak"), K: int | None = 100):
    """(unet, scheduler, {name: setting}, {name: train features (N, k)}) from the stores of the model
    folder `root`: for each method name, its store with K timesteps (None: the largest)."""
    attributor = Attributor.load(root)
    methods, feats = {}, {}
    for name in names:
        entries = attributor.stores.get(canonical_name(name), [])
        entries = [e for e in entries if K is None or e[0].K == K]
        if not entries:
            raise ValueError(f"no feature store for {name!r} (K={K}) in {root!r}; build it with "
                             f"`python -m dtrak_core featurize{root_option(root)} --output-fn {canonical_name(name)}"
                             + (f" --K {K}`" if K else "`"))
        setting, store = max(entries, key=lambda e: e[0].K)
        methods[name], feats[name] = setting, np.asarray(store.features())
    return attributor.unet, attributor.scheduler, methods, feats
