"""The app's ridge lambda per feature store, tuned on the validation LDS and recorded in the model
folder's manifest (`tuned_lambda`, read by `Attributor`).

    python -m dtrak_core lds tune-lambda                               # the embedded default
    python -m dtrak_core lds-own tune-lambda --root R --out RUN        # your own model's LDS run
"""
from __future__ import annotations

import numpy as np

from dtrak_core.attribution import baselines, methods
from dtrak_core.attribution.kernels import mean_diagonal
from dtrak_core.attribution.scoring import SpectralTRAK, default_lambda
from dtrak_core.evaluation.lds import lambda_sweep
from dtrak_core.evaluation.tables import LAMBDA_GRID, Bench, sweep_cell
from dtrak_core.folder import ModelFolder

TEST_SETS = ("validation", "generated")

def tune_lambdas(run_dir: str, root: str | None = None, num_bootstrap: int = 200, bench: Bench | None = None) -> dict:
    """Pick each of the model's stores' lambda on the *validation* LDS (LAMBDA_GRID) and record it in
    root/manifest.json as 'tuned_lambda' (used by `Attributor` by default); the same for each
    registered sharpened method over a store (`methods.sharpened`), keyed
    `methods.sharpened_lambda_key`. The generated-set LDS at
    that lambda is reported beside it: chosen on another test set, it is an honest number.

    A run with no validation set (`lds-own prepare` without --validation): the lambda best on the
    generated samples, and as its `generated_lds` the 2-fold cross-fitted LDS (each half of the
    samples scored with the lambda best on the other half: an honest estimate of a lambda chosen
    this way), said so in `chosen_on`; `validation_lds` is None.

    run_dir: the model's LDS run; root: its model folder (None: `folder.default_root()`); bench: the
    run's `Bench` when the caller has one (made with tuned=False).
    Returns {store slug or sharpened key: {"lambda", "chosen_on", "validation_lds", "generated_lds", ...}}.
    """
    bench = bench or Bench(run_dir, root, tuned=False)  # the lambdas it replaces are neither used nor checked
    sets = tuple(s for s in TEST_SETS if s in bench.test_sets)
    if "generated" not in sets:
        raise ValueError(f"the LDS run in {run_dir!r} has no generated test set; prepare it again")
    masks = np.asarray(bench.truth["masks"], dtype=np.float64)
    F = {s: bench.truth["F"][s] for s in sets}
    M = len(bench.truth["subsets"])
    tuned = {}

    def record(key, res):
        gen = res["generated"]
        common = {"rule_lambda": gen["default"]["lambda"], "generated_lds_rule": gen["default"]["lds"]}
        if "validation" in res:
            lam = res["validation"]["paper"]["lambda"]
            tuned[key] = {
                "lambda": lam, "chosen_on": f"validation LDS, {M} subsets",
                "validation_lds": res["validation"]["paper"]["lds"],
                "generated_lds": gen["lds_by_lambda"][LAMBDA_GRID.index(lam)],
                **common, "at_grid_edge": res["validation"]["paper"]["at_grid_edge"]}
        else:  # no held-out images: chosen on the generated samples, its LDS estimated by cross-fitting
            tuned[key] = {
                "lambda": gen["paper"]["lambda"],
                "chosen_on": f"generated-sample LDS (no validation set), {M} subsets; generated_lds is the 2-fold "
                             f"cross-fitted LDS (each half scored at the lambda best on the other half)",
                "validation_lds": None, "generated_lds": gen["honest"]["lds"],
                "generated_lds_in_sample": gen["paper"]["lds"], "fold_lambdas": list(gen["honest"]["lambdas"]),
                **common, "at_grid_edge": gen["paper"]["at_grid_edge"]}

    for per_fn in bench.attributor.stores.values():
        for setting, store in per_fn:
            train = np.array(store.features())
            queries = {s: bench.features.query(s, setting, compute=True) for s in sets}
            record(setting.slug, sweep_cell(bench, [train], {s: [q] for s, q in queries.items()}, num_bootstrap,
                                            default=default_lambda(train)))
            spectral = None
            for method in methods.sharpened(setting.output_fn):  # their scores are not linear in the kernel's
                spectral = spectral or SpectralTRAK().fit(train)
                record(methods.sharpened_lambda_key(method.name, setting.slug), lambda_sweep(
                    lambda lam: {s: masks @ methods.sharpen(spectral.scores(q, lam)).T for s, q in queries.items()},
                    F, LAMBDA_GRID, num_bootstrap, default_lambda=default_lambda(train)))
    # the stores' and sharpened methods' entries replaced; the kernel baselines' (written by
    # `record_kernel_params`) kept: this run did not measure them
    kernels = {m.name for m in kernel_baselines(bench.attributor.kind)}
    ModelFolder.edit(bench.root, change=lambda folder: setattr(folder, "tuned_lambda", {
        **{k: v for k, v in folder.tuned_lambda.items() if k in kernels}, **tuned}))  # re-sealed on save
    return tuned


def kernel_baselines(kind: str) -> list:
    """The registry's kernel-ridge baselines of a folder kind (pixel-trak, pixel-rbf, ...; latent-* too
    on a text-to-image folder): their lambda, and the RBF's bandwidth, are tuned like TRAK's lambda."""
    return [m for m in methods.all("baseline", kind) if m.score is baselines.kernel_ridge]


def kernel_entries(rows: list[dict], train_by_space: dict, subsets: int) -> dict:
    """{method name: {"lambda", "gamma", "relative", "chosen_on", "validation_lds", "generated_lds"}}:
    each kernel baseline's hyperparameters chosen on the *validation* LDS of its signed scores (the
    generated samples' when a run has no validation set), from `evidence.evaluate` rows; the lambda
    is absolute (relative x the kernel's mean diagonal on the training inputs of its space), as
    `baselines.kernel_ridge` reads it. The LDS numbers are the rows' 2-fold cross-fitted ones."""
    out = {}
    for row in rows:
        m = methods.find(row["method"])
        if m is None or m.score is not baselines.kernel_ridge:
            continue
        chosen = "validation" if "validation/signed best" in row else "generated"
        best = row.get(f"{chosen}/signed best")
        if best is None:
            continue
        out[m.name] = {"lambda": best["relative"] * mean_diagonal(train_by_space[m.space], m.kind),
                       "gamma": best.get("gamma", 1.0), "relative": best["relative"],
                       "chosen_on": f"{chosen} LDS of the signed scores, {subsets} subsets",
                       "validation_lds": row.get("validation/signed"), "generated_lds": row.get("generated/signed")}
    return out


def record_kernel_params(root: str, entries: dict) -> None:
    """Add `kernel_entries` to the model folder's manifest (`tuned_lambda`, re-sealed): `attribute`,
    the API, the app and the counterfactual use them from then on."""
    ModelFolder.edit(root, change=lambda folder: folder.tuned_lambda.update(entries))
