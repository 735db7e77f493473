"""The report of an LDS run of your own checkpoints (`lds_own`): every method's LDS against its
ground truth as tables.json / tables.md, and each store's lambda measured on it and recorded in the
model folder's manifest.

    results = evaluate(root, run_dir, dest=run_dir)     # the methods (and ablation) tables
    tuned = tune_lambda(root, run_dir)                   # manifest `tuned_lambda`, the report updated
"""
from __future__ import annotations

import os

from dtrak_core import checksums
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.scoring import default_lambda
from dtrak_core.attribution.store import open_stores
from dtrak_core.errors import root_option
from dtrak_core.evaluation import tables as bm
from dtrak_core.evaluation.lds_own import is_own_run, require_subsets
from dtrak_core.evaluation.tables_report import REPORT, SHIPPED, TABLES, format_report, load_tables, tables
from dtrak_core.evaluation.tuning import tune_lambdas
from dtrak_core.files import atomic_write_bytes
from dtrak_core.folder import ModelFolder

TABLES_TITLE = "LDS of your model (checkpoints retrained by your training script)"


def paired_noise_ceiling(run_dir: str, ceiling_run: str, num_bootstrap: int = 1000) -> dict:
    """{test set: `lds.noise_ceiling`} of an LDS run against a second run that retrained some of its
    subsets with another training seed (`lds-own prepare --masks` with those subsets and `--seeds`),
    paired by the subsets' content whatever order each run has them in; at least 3 pairs. The
    ceiling is for the run's own LDS, against the mean of its training seeds."""
    import numpy as np

    from dtrak_core.evaluation.lds import noise_ceiling
    from dtrak_core.evaluation.lds_run import collect

    first, second = collect(run_dir), collect(ceiling_run)
    rows = {tuple(np.flatnonzero(m)): i for i, m in enumerate(first["masks"])}
    pairs = [(rows[key], j) for j, key in enumerate(tuple(np.flatnonzero(m)) for m in second["masks"]) if key in rows]
    if len(pairs) < 3:
        raise ValueError(f"only {len(pairs)} subsets are measured in both {run_dir!r} and {ceiling_run!r}; the "
                         f"noise ceiling needs 3: measure more of {ceiling_run!r} (lds-own ground-truth)")
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    target = len(first["setup"]["lds_config"]["train_seeds"])
    return {name: noise_ceiling(np.stack([first["F"][name][a], second["F"][name][b]]), num_bootstrap,
                                target_seeds=target)
            for name in first["F"] if name in second["F"]}


def evaluate(root: str, out_dir: str, dest: str | None = None, K: int | None = None, num_bootstrap: int = 1000,
             journey: bool = True, show_bar: bool = True, ceiling_run: str | None = None) -> dict:
    """Every registered method that can run on the model folder, scored against the run's ground
    truth (at least 3 subsets with every seed measured): the methods table of `tables_report.tables`
    at the stores' K (None: the K of the D-TRAK store) with the registry's successors (DAS, when the
    folder has an `avg` store), and an ablation row per other output function with a store there;
    the missing test-set features computed first (cached under out_dir). With `dest`:
    dest/tables.json and dest/tables.md. With `ceiling_run`, a run that retrained some of the
    subsets with another seed, the noise ceiling (`paired_noise_ceiling`)."""
    require_subsets(out_dir, root)
    ceiling = {} if ceiling_run is None else paired_noise_ceiling(out_dir, ceiling_run, num_bootstrap)
    bench = bm.Bench(out_dir, root, ablation_fns=(), ablation_Ks=(), ensemble_sizes=())
    K = bench.base.K if K is None else K  # the K of the folder's D-TRAK store, by default
    bench.method_Ks, bench.journey_K = (K,), K
    for fn in ("loss", "square"):
        bench.features.compute(bench.setting(fn, K), show_bar=show_bar)
    if journey and "generated" in bench.test_sets:
        bm.journey_features(bench, bench.setting("loss", K), compute=True, show_bar=show_bar)
    checkpoints = _tracin_checkpoints(root, bench.attributor)
    if checkpoints:  # TracInCP's and GAS's queries at each checkpoint of the training run
        bm.tracin_queries(bench, checkpoints, compute=True, show_bar=show_bar)
    # the other output functions whose training store the folder has (same projection): the ablation rows
    variants = tuple(fn for fn in bench.attributor.methods if fn not in ("loss", "square")
                     and bench.setting(fn, K) in bench.features.registered)
    for fn in variants:
        bench.features.compute(bench.setting(fn, K), show_bar=show_bar)
    return tables(out_dir, root, dest=dest, num_bootstrap=num_bootstrap,
                  which=("methods", "ablation") if variants else ("methods",), title=TABLES_TITLE,
                  annotate=lambda results: {SHIPPED: shipped_lambdas(root, out_dir, results),
                                            **({"noise_ceiling": ceiling} if ceiling else {})},
                  ablation_fns=variants, ablation_Ks=(K,), method_Ks=(K,), ensemble_sizes=(), journey_K=K,
                  successors=True)


def _tracin_checkpoints(root: str, attributor) -> list:
    """The folder's TracInCP checkpoints (`build-baselines`), [] when it has none (the table then says
    why); damaged ones raise, naming the file."""
    from dtrak_core.attribution.tracin import load_tracin
    from dtrak_core.errors import MethodUnavailable

    try:
        return load_tracin(root, attributor)
    except MethodUnavailable:
        return []


def tune_lambda(root: str, out_dir: str, dest: str | None = None, num_bootstrap: int = 200,
                show_bar: bool = True) -> dict:
    """Record in the model folder's manifest (`tuned_lambda`, through `ModelFolder.edit`, which
    re-seals it) each store's lambda measured on this run: chosen on the validation LDS, or, with no
    validation set, on the generated samples with its LDS cross-fitted (`tuning.tune_lambdas`).
    `attribute`, `Attributor.load` and the app use it from then on. The run's report
    (dest/tables.json and tables.md, dest None: out_dir), when written, is updated to say so.
    Returns the recorded entries."""
    if not is_own_run(out_dir):
        raise ValueError(f"{out_dir!r} holds no LDS run of your checkpoints; write one with `python -m dtrak_core "
                         f"lds-own prepare{root_option(root)} --out {out_dir}` (then ground-truth)")
    require_subsets(out_dir, root)
    bench = bm.Bench(out_dir, root, tuned=False, ablation_fns=(), ablation_Ks=(), ensemble_sizes=())
    for per_fn in bench.attributor.stores.values():  # every store's test-set features, cached under out_dir
        for setting, _ in per_fn:
            bench.features.compute(setting, show_bar=show_bar)
    tuned = tune_lambdas(out_dir, root, num_bootstrap, bench=bench)
    dest = out_dir if dest is None else dest
    results = load_tables(os.path.join(dest, TABLES))
    if results is not None:  # the report written by `evaluate`: it now names the recorded lambdas
        results[SHIPPED] = shipped_lambdas(root, out_dir, results)
        checksums.write_sealed_json(os.path.join(dest, TABLES), results)  # re-sealed: the app verifies it
        atomic_write_bytes(os.path.join(dest, REPORT), format_report(results).encode())
    return tuned


def shipped_lambdas(root: str, out_dir: str, results: dict | None = None) -> dict:
    """{store slug (or sharpened method key): {"method", "lambda", "source", ...}}: the lambda the
    shipped answers (`attribute`, `Attributor.load`, the app) use for each of the folder's stores now:
    "recorded" (manifest `tuned_lambda`, with "chosen_on" and its "generated_lds"), or "rule" (the
    data-free `scoring.default_lambda`; its generated-sample LDS read from `results`, the tables of
    this run, when they have the cell; "record": the command that records a measured one)."""
    folder = ModelFolder.load(root)
    names = {"square": "d-trak", "loss": "trak"}
    out = {}
    for store in open_stores(folder):
        setting = FeatureSetting(**{f: store.metadata[f] for f in FeatureSetting.__dataclass_fields__})
        fn, slug = setting.output_fn, setting.slug
        method = names.get(fn, fn)
        entry = folder.tuned_lambda.get(slug)
        if entry is not None:
            out[slug] = {"method": method, "lambda": float(entry["lambda"]), "source": "recorded",
                         "chosen_on": entry.get("chosen_on", "recorded"), "generated_lds": entry.get("generated_lds")}
            continue
        cell = None
        for table, key in (("methods", f"{method}/K{setting.K}"), ("ablation", f"{fn}/K{setting.K}")):
            cell = cell or ((results or {}).get(table, {}).get(key) or {}).get("generated")
        rule = (cell or {}).get("default")
        out[slug] = {"method": method, "lambda": default_lambda(store.features()), "source": "rule",
                     "generated_lds": None if rule is None else rule["lds"],
                     "record": f"python -m dtrak_core lds-own tune-lambda{root_option(root)} --out {out_dir}"}
    for key, entry in folder.tuned_lambda.items():  # the sharpened methods' own lambdas (`methods.sharpened`)
        if key not in out and "/" in key:
            out[key] = {"method": key.split("/", 1)[0], "lambda": float(entry["lambda"]), "source": "recorded",
                        "chosen_on": entry.get("chosen_on", "recorded"), "generated_lds": entry.get("generated_lds")}
    return out
