"""The report of the benchmark tables (tables.py): every cell whose inputs exist, evaluated and
written as dest/tables.json (the numbers) and dest/tables.md (the Markdown tables).

    results = tables(run_dir, root, dest="assets/benchmarks")   # or load_tables(path) for a written one
    print(format_report(results))

Recomputing some tables (`which`) keeps the others already in dest/tables.json.
"""
from __future__ import annotations

import os
import shlex
import time

from dtrak_core import checksums
from dtrak_core.attribution import methods
from dtrak_core.evaluation.evidence import format_table as evidence_table
from dtrak_core.evaluation.lds import noise_ceiling
from dtrak_core.evaluation.tables import (
    ABLATION_OUTPUT_FNS,
    ENSEMBLE_K,
    LAMBDA_GRID,
    Bench,
    ablation_table,
    ensemble_table,
    methods_table,
)
from dtrak_core.files import atomic_write_bytes

TABLES = "tables.json"
REPORT = "tables.md"
BEYOND = "beyond"  # rows beyond the paper's methods, from `evaluation.study` (same ground truth and bootstrap)
EVIDENCE = "evidence"  # every method beside the strong model-free baselines (`evidence`; experiments/strong_baselines.py)
SHIPPED = "shipped_lambda"  # the lambda `attribute`, the API and the app use per store (`lds_own_report.shipped_lambdas`)

def tables(run_dir: str, root: str | None = None, dest: str | None = None, num_bootstrap: int = 1000,
           which=("methods", "ablation", "ensembles"), title: str | None = None, annotate=None,
           **bench_options) -> dict:
    """Evaluate every cell whose inputs exist; with `dest`, write dest/tables.json and dest/tables.md.

    run_dir: the model's LDS run; root: its model folder (None: `folder.default_root()`);
    num_bootstrap: resamples of the subsets behind each +-; which: the tables to (re)compute;
    title: the report's heading (None: the embedded default's); annotate: a function of the
    results adding keys to them before they are written (e.g. `lds_own_report`'s "shipped_lambda");
    `bench_options` go to `Bench` (which output functions, K, ensemble sizes).
    """
    bench = Bench(run_dir, root, **bench_options)
    M = len(bench.truth["subsets"])
    out = {**({"title": title} if title else {}), "subsets_done": M, "subsets_planned": bench.config.num_subsets, "partial": M < bench.config.num_subsets,
           "train_seeds": list(bench.config.train_seeds), "lambda_grid": list(LAMBDA_GRID),
           "num_bootstrap": num_bootstrap, "ensemble_K": bench.ensemble_K, "test_sets": {k: len(v) for k, v in bench.test_sets.items()},
           "noise_ceiling": {s: noise_ceiling(bench.truth["F_seeds"][s], num_bootstrap) for s in bench.test_sets}
           if len(bench.config.train_seeds) >= 2 else {}}
    builders = {"methods": methods_table, "ablation": ablation_table, "ensembles": ensemble_table}
    for name in which:
        t0 = time.perf_counter()
        out[name] = builders[name](bench, num_bootstrap)
        out.setdefault("eval_seconds", {})[name] = time.perf_counter() - t0
        out.setdefault("subsets_per_table", {})[name] = M
    if annotate is not None:
        out.update(annotate(out))
    if dest is not None:
        previous = load_tables(os.path.join(dest, TABLES)) or {}
        # "beyond" (exact kernels, DAS, EK-FAC) and "evidence" (the model-free baselines) are written by
        # `evaluation.study publish` and experiments/strong_baselines.py: kept as they are
        merged = {**{k: v for k, v in previous.items() if (k in builders and k not in which) or k in (BEYOND, EVIDENCE)},
                  **out}
        merged["subsets_per_table"] = {**{k: v for k, v in previous.get("subsets_per_table", {}).items()
                                          if k in merged and k not in which}, **out.get("subsets_per_table", {})}
        os.makedirs(dest, exist_ok=True)
        checksums.write_sealed_json(os.path.join(dest, TABLES), merged)  # its checksum in it
        atomic_write_bytes(os.path.join(dest, REPORT), format_report(merged).encode())
        out = merged
    return out


def tables_remedy(path: str) -> str:
    """How to rewrite a damaged <root>/benchmarks/tables.json: the commands that write it, on its folder."""
    from dtrak_core.errors import root_option

    folder = os.path.dirname(os.path.normpath(path))
    root = os.path.dirname(folder) if os.path.basename(folder) == "benchmarks" else None
    dest = "" if root is not None else f" --dest {shlex.quote(folder or '.')}"
    where = "" if root is None else root_option(root)
    return (f"rewrite it with `python -m dtrak_core lds tables{where}{dest}` (and `python -m dtrak_core study "
            f"publish{where}` for its 'beyond' rows), which record its checksum in it")


def load_tables(path: str, required: bool = False) -> dict | None:
    """A written tables.json, or None when there is none; verified against the checksum its writer
    sealed into it (`checksums.read_sealed_json`: an `IntegrityError` naming it when it was edited).
    required: a tables.json with no checksum at all (written before dtrak recorded them) is refused
    too, as the app does; else it is read as it is (a writer merging it into a new, sealed one)."""
    if not os.path.isfile(path):
        return None
    return checksums.read_sealed_json(path, "benchmark tables", tables_remedy(path), required=required)


# -- the Markdown ----------------------------------------------------------------------------------
def _ordered(names, order) -> list:
    """names in `order` first (JSON files store keys sorted), then any others as they come."""
    names = list(dict.fromkeys(names))
    return [n for n in order if n in names] + [n for n in names if n not in order]


def _n(x) -> str:
    """A number to one decimal; "nan" for the None a written tables.json holds in place of NaN (`json_safe`)."""
    return "nan" if x is None else f"{x:.1f}"


def _fmt(cell: dict | None, set_name: str) -> str:
    """'honest +- pm (paper)' for swept cells, 'lds +- pm' for fixed ones, or why it is empty."""
    if cell is None:
        return "n/a"
    if "missing" in cell:
        return "missing"
    if "unavailable" in cell:
        return "unavailable"
    c = cell.get(set_name)
    if c is None:
        return "n/a"
    if "honest" in c:
        return f"{_n(c['honest']['lds'])} ± {_n(c['honest']['pm'])} ({_n(c['paper']['lds'])})"
    return f"{_n(c['lds'])} ± {_n(c['pm'])}"


def format_report(t: dict) -> str:
    """The Markdown of a `tables` result: the methods, ablation and ensemble tables, then the missing
    cells with the commands that fill them."""
    own = "title" in t  # another model's run: only its own test sets, described as they are
    sets = tuple(s for s in ("validation", "generated") if s in t["test_sets"]) if own else ("validation", "generated")
    lines = [f"# {t.get('title', 'LDS benchmark tables (embedded default)')}", ""]
    status = (f"**PARTIAL: {t['subsets_done']} of {t['subsets_planned']} subsets retrained**" if t.get("partial")
              else f"{t['subsets_done']} subsets")
    if own:
        on = " and the ".join(f"{t['test_sets'][s]} {'held-out validation images' if s == 'validation' else 'generated samples'}"
                              for s in sets)
    else:
        on = (f"{t['test_sets'].get('validation', 0)} validation digits and the {t['test_sets'].get('generated', 0)} "
              f"generated samples")
    lines += [f"LDS x 100 on the {on}; {status}, "
              f"{len(t['train_seeds'])} training seeds each; +- = bootstrap std over subsets "
              f"({t['num_bootstrap']} resamples).", "",
              "Cells read `honest ± pm (paper)`: *honest* = lambda chosen by 2-fold cross-fitting over test "
              "samples (never on the samples it is reported on); *(paper)* = lambda best on the reported samples "
              "themselves, as the paper chose it (optimistic). Methods without a lambda show one number.", ""]
    per = {k: v for k, v in t.get("subsets_per_table", {}).items() if v != t["subsets_done"]}
    if per:
        lines += ["Computed with fewer subsets (rerun `python -m dtrak_core lds tables`): " +
                  ", ".join(f"{k} at M = {v}" for k, v in per.items()), ""]
    if t.get("noise_ceiling"):
        nc = t["noise_ceiling"]
        one_seed = any(isinstance(v, dict) and v.get("target_seeds") == 1 for v in nc.values())
        against = "this run's one-seed ground truth" if one_seed else "the seed mean"
        lines += ["Noise ceiling (how well one training seed's ground truth predicts the other's; the best LDS "
                  f"reachable against {against} in brackets): " +
                  "; ".join(f"{s} {_n(nc[s]['seed_vs_seed'])} ± {_n(nc[s]['seed_vs_seed_pm'])} [{_n(nc[s]['ceiling'])}]"
                            for s in sets if s in nc), ""]
    if "methods" in t:
        Ks = sorted({int(k.split("/K")[1]) for k in t["methods"] if "/K" in k})
        names = sorted(dict.fromkeys(k.split("/K")[0] for k in t["methods"]), key=methods.sort_key)  # the poster's rows
        lines += ["## Methods (the poster's LDS table)", "",
                  "| method | " + " | ".join(f"{s} K={K}" for s in sets for K in Ks) + " |",
                  "|---|" + "---|" * (len(sets) * len(Ks))]
        for name in names:
            if name in t["methods"]:  # no K: one number, in the first K column
                label = name + (" (4 checkpoints, K=10, k=512)" if name in ("tracin", "gas") else "")
                cells = [_fmt(t["methods"][name], s) if i == 0 else "" for s in sets for i in range(len(Ks))]
            else:
                label = name
                cells = [_fmt(t["methods"].get(f"{name}/K{K}"), s) for s in sets for K in Ks]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if "ablation" in t:
        Ks = sorted({int(k.split('/K')[1]) for k in t["ablation"]})
        fns = _ordered((k.split("/K")[0] for k in t["ablation"]), ABLATION_OUTPUT_FNS)
        lines += ["## Output function x K (the poster's ablation)", "",
                  "| output function | " + " | ".join(f"{s} K={K}" for s in sets for K in Ks) + " |",
                  "|---|" + "---|" * (len(sets) * len(Ks))]
        for fn in fns:
            lines.append(f"| {fn} | " + " | ".join(_fmt(t["ablation"].get(f"{fn}/K{K}"), s) for s in sets for K in Ks) + " |")
        lines.append("")
    if "ensembles" in t:
        sizes = sorted({int(k.split('/S')[1]) for k in t["ensembles"]})
        lines += [f"## Ensembles (K={t.get('ensemble_K', ENSEMBLE_K)}; each model trained on its own random half)", "",
                  "| method | " + " | ".join(f"{s} S={S}" for s in sets for S in sizes) + " |",
                  "|---|" + "---|" * (len(sets) * len(sizes))]
        for label in ("trak", "d-trak"):
            lines.append(f"| {label} | " + " | ".join(_fmt(t["ensembles"].get(f"{label}/S{S}"), s)
                                                     for s in sets for S in sizes) + " |")
        lines.append("")
    if t.get(BEYOND):
        lines += ["## Beyond the paper (K=100, one model): exact kernels, DAS, EK-FAC influence", "",
                  "Written by `python -m dtrak_core study publish`; the regulariser or damping of each "
                  "row is cross-fitted like lambda above; seconds on one thread (features: train + both test sets; "
                  "scoring: kernels or curvature, then every test sample's scores).", "",
                  "| method | validation | generated | features s | scoring s |", "|---|---|---|---|---|"]
        for row in t[BEYOND]["rows"]:
            lines.append(f"| {row['label']} | {_fmt(row, 'validation')} | {_fmt(row, 'generated')} | "
                         f"{row['feature_seconds']:.0f} | {row['scoring_seconds']:.0f} |")
        lines.append("")
    if t.get(EVIDENCE):
        ev = t[EVIDENCE]
        lines += ["## Beside the strong model-free baselines: signed, sharpened, rank-normalised, top-1%", "",
                  "The same ground truth; every hyperparameter (lambda, the RBF's bandwidth) 2-fold cross-fitted by "
                  "one rule for every row. *Sharpened* scores s|s| keep every ranking, so any gain over *signed* is "
                  "the metric's, not better attribution; *rank* and *top-1%* are invariant to any increasing "
                  f"transform of each query's scores. Written by `{ev['source']}`.", "",
                  evidence_table(ev["rows"], ev["sets"]), ""]
    if t.get(SHIPPED):
        lines += _shipped_lines(t[SHIPPED])
    missing = sorted({c["missing"] for tab in ("methods", "ablation", "ensembles") for c in t.get(tab, {}).values()
                      if "missing" in c})
    if missing:
        lines += ["## Missing cells and the commands that fill them", ""] + [f"- `{m}`" for m in missing] + [""]
    return "\n".join(lines)


def _shipped_lines(shipped: dict) -> list[str]:
    """The section saying which lambda the shipped answers (`attribute`, the API, the app) use for
    each store: the one recorded in the model folder, or the data-free rule; its LDS beside it."""
    lines = ["## The lambda of the shipped answers (`attribute`, the Python API, the app)", "",
             "The cells above sweep lambda; the answers rank with one lambda per store, this one:", "",
             "| store | method | lambda | from | generated LDS at it |", "|---|---|---|---|---|"]
    hint, crossfit = None, False
    for slug, e in shipped.items():
        lds = "n/a" if e.get("generated_lds") is None else f"{e['generated_lds']:.1f}"
        if e["source"] == "recorded":
            chosen = str(e.get("chosen_on", ""))
            crossfit = crossfit or "cross-fitted" in chosen
            source = f"recorded in manifest.json ({chosen.split(';')[0]})"
        else:
            source = "the data-free rule (0.1 x mean squared training-feature norm): no lambda recorded"
            hint = e.get("record")
        lines.append(f"| {slug} | {e['method']} | {e['lambda']:.3g} | {source} | {lds} |")
    lines.append("")
    if crossfit:
        lines += ["A lambda chosen on the generated samples (no validation set) shows their 2-fold cross-fitted LDS: "
                  "each half scored at the lambda best on the other half.", ""]
    if hint:
        lines += [f"Record the lambda measured here, so that the answers use it: `{hint}`.", ""]
    return lines


def publish_evidence(dest: str, rows: list[dict], sets, source: str) -> bool:
    """Put the `evidence.evaluate` rows into dest/tables.json (key EVIDENCE, re-sealed) and rewrite
    dest/tables.md with them; False when dest has no tables.json."""
    path = os.path.join(dest, TABLES)
    t = load_tables(path)
    if t is None:
        return False
    t[EVIDENCE] = {"rows": rows, "sets": list(sets), "source": source}
    checksums.write_sealed_json(path, t)
    atomic_write_bytes(os.path.join(dest, REPORT), format_report(t).encode())
    return True
