"""The app's ridge lambda per feature store, tuned on the validation LDS and recorded in the model
folder's manifest (`tuned_lambda`, read by `Attributor`).

    python -m dtrak_core lds tune-lambda
"""
from __future__ import annotations

import numpy as np

from dtrak_core.attribution import methods
from dtrak_core.attribution.scoring import SpectralTRAK, default_lambda
from dtrak_core.evaluation.lds import lambda_sweep
from dtrak_core.evaluation.tables import LAMBDA_GRID, Bench, sweep_cell
from dtrak_core.folder import ModelFolder

TEST_SETS = ("validation", "generated")

def tune_lambdas(run_dir: str, root: str | None = None, num_bootstrap: int = 200) -> dict:
    """Pick each of the model's stores' lambda on the *validation* LDS (LAMBDA_GRID) and record it in
    root/manifest.json as 'tuned_lambda' (used by `Attributor` by default); the same for each
    registered sharpened method over a store (`methods.sharpened`), keyed
    `methods.sharpened_lambda_key`. The generated-set LDS at
    that lambda is reported beside it: chosen on another test set, it is an honest number.

    run_dir: the model's LDS run; root: its model folder (None: `folder.default_root()`).
    Returns {store slug or sharpened key: {"lambda", "chosen_on", "validation_lds", "generated_lds", ...}}.
    """
    bench = Bench(run_dir, root, tuned=False)  # the lambdas it replaces are neither used nor checked
    masks = np.asarray(bench.truth["masks"], dtype=np.float64)
    F = {s: bench.truth["F"][s] for s in TEST_SETS}
    tuned = {}

    def record(key, res):
        lam = res["validation"]["paper"]["lambda"]
        gen = res["generated"]
        tuned[key] = {
            "lambda": lam, "chosen_on": f"validation LDS, {len(bench.truth['subsets'])} subsets",
            "validation_lds": res["validation"]["paper"]["lds"],
            "generated_lds": gen["lds_by_lambda"][LAMBDA_GRID.index(lam)],
            "rule_lambda": gen["default"]["lambda"], "generated_lds_rule": gen["default"]["lds"],
            "at_grid_edge": res["validation"]["paper"]["at_grid_edge"]}

    for per_fn in bench.attributor.stores.values():
        for setting, store in per_fn:
            train = np.array(store.features())
            queries = {s: bench.features.query(s, setting, compute=True) for s in TEST_SETS}
            record(setting.slug, sweep_cell(bench, [train], {s: [q] for s, q in queries.items()}, num_bootstrap,
                                            default=default_lambda(train)))
            spectral = None
            for method in methods.sharpened(setting.output_fn):  # their scores are not linear in the kernel's
                spectral = spectral or SpectralTRAK().fit(train)
                record(methods.sharpened_lambda_key(method.name, setting.slug), lambda_sweep(
                    lambda lam: {s: masks @ methods.sharpen(spectral.scores(q, lam)).T for s, q in queries.items()},
                    F, LAMBDA_GRID, num_bootstrap, default_lambda=default_lambda(train)))
    ModelFolder.edit(bench.root, tuned_lambda=tuned)  # saved with new seals (`ModelFolder.save`)
    return tuned
