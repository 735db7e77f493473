"""The Benchmarks tab: the folder's committed LDS tables, evidence against the model-free baselines and
counterfactual medians, each shown only as its writer wrote it (its checksum verified) and its report
drawn from the verified numbers; charts drawn when the tab is first shown."""
from __future__ import annotations

import functools
import html
import os
import shlex

import gradio as gr

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.errors import root_option
from dtrak_core.shared import OnceCache
from dtrak_core.ui import texts
from dtrak_core.ui.state import load_assets

SUMMARY = "counterfactual summary"  # verified_results' key of counterfactual/summary.json (no file stem has a space)
# the part of the page each result feeds, as the banner names it when the file is damaged
PARTS = {"tables": "Benchmarks: LDS tables", SUMMARY: "Benchmarks: counterfactual summary",
         "evidence": "Benchmarks: evidence against the model-free baselines, the similarity flag's LDS line and "
                     "About's numbers",
         "lds_results": "Benchmarks: LDS of D-TRAK and TRAK", "sharpening": "Benchmarks: LDS of sharpened scores",
         "study": "Benchmarks: the study's cells"}
TITLES = {"tables": "LDS of every method", SUMMARY: "Counterfactual: remove the top proponents and retrain",
          "evidence": "Attribution or look-alikes?", "lds_results": "LDS: D-TRAK and TRAK"}


def result_part(name: str) -> str:
    return PARTS.get(name, f"Benchmarks: {name}")


def verified_results(root: str) -> dict:
    """{name: {"path", and "data" or "error"}} for every result the Benchmarks tab shows: each JSON
    of benchmarks/ by its name ("tables", "evidence", "lds_results", ...; `sup.read_benchmarks`) and
    counterfactual/summary.json (`SUMMARY`), each verified against the checksum its writer recorded.
    "error" (unreadable, edited, unrecorded) turns off that part of the tab, which then says why, as
    the banner does. (Small files: read each time it is asked, when the page is built and by the
    banner's checks.)"""
    from dtrak_core import checksums
    from dtrak_core.errors import IntegrityError
    from dtrak_core.evaluation.counterfactual_report import summary_remedy

    out = {i["name"]: i for i in sup.read_benchmarks(os.path.join(root, "benchmarks"))}
    path = os.path.join(root, "counterfactual", "summary.json")
    if os.path.exists(path):
        try:
            out[SUMMARY] = {"path": path, "data": checksums.read_sealed_json(path, "counterfactual summary",
                                                                             summary_remedy(path))}
        except IntegrityError as e:
            out[SUMMARY] = {"path": path, "error": str(e)}
    return out


def drawn(render, data) -> str:
    """The Markdown `render` draws from a verified result; a line saying why when the file does not
    have the shape its writer gives it (a writer of another version)."""
    try:
        return render(data)
    except (KeyError, TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        return f"*The report cannot be drawn from this file ({type(e).__name__}: {html.escape(str(e))}).*"


def evidence_markdown(evidence: dict) -> str:
    """The evidence table (`evidence.format_table`) drawn from the verified rows, its test sets in the
    order its writer gave them ("sets"), else validation first."""
    from dtrak_core.evaluation.evidence import format_table

    found = evidence.get("test_sets") or {}
    sets = evidence.get("sets") or [s for s in ("validation", "generated") if s in found] + \
        [s for s in found if s not in ("validation", "generated")]
    return format_table(evidence["rows"], sets)


LOOKALIKE_SUMMARY = os.path.join("lookalike_counterfactual", "summary.json")  # experiments/lookalike_counterfactual.py


def with_lookalike(bench: str, summary: dict) -> tuple[dict, str | None]:
    """The counterfactual summary with the cells of the strongest model-free baseline's rankings
    (bench/lookalike_counterfactual: the same targets, removal size and recipe, retrained by
    `experiments/lookalike_counterfactual.py`), verified against its seal; (summary, why it is left
    out when its file is damaged)."""
    from dtrak_core import checksums
    from dtrak_core.errors import IntegrityError

    path = os.path.join(bench, LOOKALIKE_SUMMARY)
    if not os.path.isfile(path):
        return summary, None
    try:
        extra = checksums.read_sealed_json(path, "look-alike counterfactual summary",
                                           "rerun `python experiments/lookalike_counterfactual.py`")
    except IntegrityError as e:
        return summary, str(e)
    have = {(c.get("ranking"), c.get("k")) for c in summary.get("cells", [])}
    cells = [c for c in extra.get("cells", []) if (c.get("ranking"), c.get("k")) not in have]
    paired = list(summary.get("paired", []))
    for new in cells:  # each ranking of the run beside the baseline, on the targets both finished
        for old in summary.get("cells", []):
            if old.get("k") == new.get("k") and old.get("per_target") and new.get("per_target"):
                a, b = (new, old) if old.get("ranking") == "random" else (old, new)
                pair = _paired(a, b)
                if pair is not None:
                    paired.append(pair)
    return {**summary, "cells": list(summary.get("cells", [])) + cells, "paired": paired}, None


def _paired(a: dict, b: dict) -> dict | None:
    """A paired comparison of two counterfactual cells over their common targets, as the harness
    writes one (`counterfactual_report`): share where A moves more, median difference, Wilcoxon p."""
    import numpy as np
    from scipy.stats import wilcoxon

    la = {t["seed"]: t["l2"] for t in a["per_target"]}
    lb = {t["seed"]: t["l2"] for t in b["per_target"]}
    seeds = sorted(set(la) & set(lb))
    if len(seeds) < 6:
        return None
    diff = np.array([la[s] - lb[s] for s in seeds])
    return {"a": sup.method_label(a["ranking"]), "b": sup.method_label(b["ranking"]), "k": a["k"], "n": len(seeds),
            "share_a_moves_more": float(np.mean(diff > 0)), "median_difference": float(np.median(diff)),
            "wilcoxon_p": float(wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0}


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def _table(rows: list[dict], label: str) -> None:
    headers = list(dict.fromkeys(h for r in rows for h in r))
    gr.Dataframe(value=[["" if r.get(h) is None else r.get(h) for h in headers] for r in rows], headers=headers,
                 label=label, interactive=False, wrap=True)


def _loaded(root: str):
    """The folder's `Assets`, or None when it cannot be loaded (then the digits default's words and
    instructions apply)."""
    try:
        return load_assets(root)
    except (ValueError, OSError):
        return None


def _n_train(root: str) -> int | None:
    a = _loaded(root)
    return None if a is None else a.n_train


def _digits_root(root: str) -> bool:
    a = _loaded(root)
    return True if a is None else a.digits


# ---------------------------------------------------------------- a model not trained by dtrak: its own runs

LDS_RUN, CF_RUN = "lds", "counterfactual"  # the runs' folders under the model folder, as the commands below name them


def run_progress(folder: str, plan: str) -> tuple[int, int] | None:
    """(measured, planned) retrains of an `lds-own` / `counterfactual-own` run in `folder`: the jobs
    its plan (jobs.json, removals.json) lists and those with a result in folder/jobs/; None without a plan."""
    from dtrak_core.files import read_json

    path = os.path.join(folder, plan)
    if not os.path.isfile(path):
        return None
    try:
        ids = [j["id"] for j in read_json(path, "run plan", "prepare the run again")["jobs"]]
    except (ValueError, KeyError, TypeError):
        return None
    return sum(os.path.isfile(os.path.join(folder, "jobs", f"{i}.npz")) for i in ids), len(ids)


def setting_data(root: str) -> str | None:
    """The data folder of a folder built from a documented setting (`setting data` wrote it; its
    manifest's training folder is <data>/train), or None for any other folder."""
    from dtrak_core.folder import read_manifest
    from dtrak_core.ui.state import setting_name

    if setting_name(root) is None:
        return None
    try:
        data = read_manifest(root).get("dataset")
    except (ValueError, OSError):
        return None
    folder = data.get("folder") if isinstance(data, dict) else None
    if not isinstance(folder, str):
        return None
    return os.path.dirname(folder if os.path.isabs(folder) else os.path.join(root, folder))


def own_runs_markdown(root: str, lds_shown: bool, cf_shown: bool) -> str:
    """For a model not trained by dtrak's built-in harnesses: how to fill the Benchmarks tab (the
    exact `lds-own` and `counterfactual-own` commands on this folder) for whichever of the two is not
    shown yet, and how far a run already prepared under the folder has come. The retrains are your
    training script's, or `setting retrain` for a folder built from a documented setting."""
    from dtrak_core.ui.state import setting_name

    q = shlex.quote
    r, lds, cf = root, os.path.join(root, LDS_RUN), os.path.join(root, CF_RUN)
    name, data = setting_name(root), setting_data(root)
    by_setting = name is not None and data is not None

    def retrain(plan: str, checkpoints: str, what: str) -> str:
        if by_setting:
            return (f"python -m dtrak_core setting retrain --config {q(name)} --data {q(data)} --jobs {q(plan)} "
                    f"--checkpoints {q(checkpoints)}  # --shard i/n")
        return f"# your training script: one model per job of {q(plan)} ({what}), saved to {q(checkpoints)}/<id>/"
    who = (f"`setting retrain` retrains it with the `{name}` setting's recipe" if by_setting else
           "your own training script retrains it")
    parts = []
    if not lds_shown:
        progress = run_progress(lds, "jobs.json")
        models = os.path.join(root, "lds-models")
        lines = ["### LDS: how to measure it on this model",
                 "The LDS needs the model retrained on many random halves of its training set. The built-in `lds` and "
                 "`counterfactual` harnesses retrain with dtrak's own recipe, so they run for models trained by dtrak "
                 f"(`build-default`); for this model {who}, and `lds-own` prepares the subsets, measures the "
                 f"retrained models and writes the tables this tab shows (`{os.path.join(root, 'benchmarks', 'tables.json')}`):"]
        if progress is not None:
            lines.append(f"\n**Under way:** `lds-own prepare` listed {progress[1]:,} retrains in "
                         f"`{os.path.join(lds, 'jobs.json')}`; the ground truth of {progress[0]:,} is measured.")
        if os.path.isfile(os.path.join(lds, "tables.json")):
            lines.append(f"\n**Evaluated** into `{lds}/`, not here: run `evaluate` again with `--dest "
                         f"{os.path.join(root, 'benchmarks')}` to show it.")
        lines += ["", "```bash",
                  f"python -m dtrak_core lds-own prepare --root {q(r)} --out {q(lds)}",
                  retrain(os.path.join(lds, "jobs.json"), models, "its `keep` indices, its `train_seed`"),
                  f"python -m dtrak_core lds-own ground-truth --root {q(r)} --out {q(lds)} --checkpoints {q(models)}",
                  f"python -m dtrak_core lds-own evaluate --root {q(r)} --out {q(lds)} --dest "
                  f"{q(os.path.join(root, 'benchmarks'))}",
                  f"python -m dtrak_core lds-own tune-lambda --root {q(r)} --out {q(lds)}  # optional: the λ "
                  "the answers use", "```"]
        parts.append("\n".join(lines))
    if not cf_shown:
        progress = run_progress(cf, "removals.json")
        models = os.path.join(root, "counterfactual-models")
        lines = ["### Counterfactual: how to measure it on this model",
                 "Remove each target's top proponents, retrain without them (" + ("`setting retrain`" if by_setting
                                                                                     else "your training script")
                 + ") and regenerate the target: "
                 f"`counterfactual-own` writes the summary this tab shows (`{os.path.join(cf, 'summary.json')}`):"]
        if progress is not None:
            lines.append(f"\n**Under way:** `counterfactual-own prepare` listed {progress[1]:,} retrains in "
                         f"`{os.path.join(cf, 'removals.json')}`; {progress[0]:,} are measured.")
        lines += ["", "```bash",
                  f"python -m dtrak_core counterfactual-own prepare --root {q(r)} --out {q(cf)}",
                  retrain(os.path.join(cf, "removals.json"), models, "its `keep` indices, the base model's training seed"),
                  f"python -m dtrak_core counterfactual-own measure --root {q(r)} --out {q(cf)} --checkpoints {q(models)}",
                  "```"]
        parts.append("\n".join(lines))
    if parts:
        parts.append("Then restart the app. The steps, their options and checks: `docs/OWN_MODEL_LDS.md`, "
                     "`python -m dtrak_core lds-own -h` and `python -m dtrak_core counterfactual-own -h`.")
    return "\n\n".join(parts)


def evidence_blocks(evidence: dict, ceiling, chart) -> None:
    """The headline and one chart (`chart(draw)` places it): every method beside the strong
    model-free baselines, under the noise ceiling; the full table, drawn from the verified rows, folded."""
    gr.Markdown("## Attribution or look-alikes?\n" + sup.evidence_headline(evidence))
    chart(functools.partial(viz.lds_chart, sup.evidence_rows(evidence), ceiling))
    with gr.Accordion("Every method beside the model-free baselines: signed, sharpened, rank and top-1% LDS",
                      open=False):
        gr.Markdown("Each method's LDS four ways: as scored (*signed*), with each score s reported as s·|s| "
                    "(*sharpened*: the same rankings, the effect concentrated on the strongest), from each "
                    "query's ranks alone (*rank*) and from an indicator of its top 1% (*top-1%*). The last two "
                    "are the same for every increasing transform of the scores. Every λ and bandwidth is "
                    "cross-fitted. *(no model)* marks baselines that never look at the diffusion model.")
        gr.Markdown(sup.relabel_tables(drawn(evidence_markdown, evidence)))


def damaged_section(title: str, error: str, elem_id: str | None = None) -> None:
    """In place of a result's section: the file is not shown, and why (its name and the fix)."""
    gr.Markdown(f"## {title}\n\n**Not shown: this result file is unreadable, or not the one its writer wrote.** "
                f"{html.escape(error)}", elem_classes="damaged-result", elem_id=elem_id)


def benchmarks_blocks(root: str) -> list:
    """The LDS and counterfactual results under `root` (tables, charts, the harnesses' reports) and
    any other assets/benchmarks/*.json as generic tables; an empty state when there are none.

    The charts are empty plots here, returned as [(plot, draw)] for the tab to fill when it is first
    shown: plotly builds its figure classes on first use (about 0.5 s), which the page's start-up
    would otherwise wait for."""
    charts = []

    def chart(draw) -> None:
        charts.append((gr.Plot(show_label=False), draw))
    bench, cf_dir = os.path.join(root, "benchmarks"), os.path.join(root, "counterfactual")
    # every result is shown only as its writer wrote it (checksums verified); one that is not is named
    # in place of its section (and in the banner), never silently left out
    items = verified_results(root)
    lds, tables, cf_summary = items.pop("lds_results", None), items.pop("tables", None), items.pop(SUMMARY, None)
    evidence = items.pop("evidence", None)
    broken = [(TITLES[name], x) for name, x in (("evidence", evidence), ("lds_results", lds), ("tables", tables),
                                                (SUMMARY, cf_summary)) if x is not None and "error" in x]
    broken += [(name, x) for name, x in items.items() if "error" in x]
    items = {name: x for name, x in items.items() if "error" not in x}
    shown = any(x is not None and x.get("data") for x in (lds, tables, cf_summary, evidence)) or bool(items) \
        or bool(broken)
    if evidence is not None and evidence.get("data"):
        ceiling = (tables or {}).get("data", {}).get("noise_ceiling") if tables is not None else None
        evidence_blocks(evidence["data"], ceiling, chart)
    if shown:
        with gr.Accordion("How to read these numbers", open=not (evidence is not None and evidence.get("data"))):
            a = _loaded(root)
            gr.Markdown(texts.fill(texts.get("benchmarks_help.md"), **(texts.words(True) if a is None else a.words))
                        .split("\n", 1)[1])
    for title, x in broken:
        damaged_section(title, x["error"])
    # each topic's heading in sight, its tables and charts folded under it when the headline leads
    folded = evidence is not None and bool(evidence.get("data"))
    if lds is not None and lds.get("data"):
        data = lds["data"]
        gr.Markdown("## LDS: D-TRAK and TRAK")
        with gr.Accordion("λ chosen three ways, with the noise ceiling", open=not folded):
            if data.get("partial"):
                gr.Markdown(f"**Provisional:** only {data.get('subsets_done')} of {data.get('subsets_planned')} "
                            "retrained subsets were finished when these numbers were written.")
            rows = sup.lds_rows(data)
            if rows:
                same = ("Here the two coincide: the same λ was best on both halves of every test set, so choosing it "
                        "on the test set (as the paper does) cost nothing. " if sup.lambdas_coincide(rows) else "")
                gr.Markdown(f"λ is the ridge term of the scores. *Honest λ*: chosen on one half of the test images and "
                            f"reported on the other (cross-fitted). *Paper λ*: best on the reported images themselves, "
                            f"as in the paper (optimistic). {same}*Default λ*: a rule that uses no evaluation data. "
                            "± is the bootstrap spread over the retrained subsets.")
                _table(rows, "LDS x 100 (higher is better), mean over test images")
                chart(functools.partial(viz.lds_chart, rows, data.get("noise_ceiling")))
    if tables is not None and tables.get("data"):
        gr.Markdown("## LDS of every method: baselines, output functions x K, ensembles")
        with gr.Accordion("The poster's table, every output function and K, ensembles", open=not folded):
            from dtrak_core.evaluation.tables_report import format_report

            report = drawn(format_report, tables["data"])  # drawn from the verified numbers, not tables.md
            gr.Markdown(sup.relabel_tables(report.split("\n", 1)[-1] if report.startswith("# ") else report))
            rows = sup.table_rows(tables["data"].get("methods", {}))
            if rows:
                gr.Markdown(methods_chart_note(root, rows))
                chart(functools.partial(viz.lds_chart, rows, tables["data"].get("noise_ceiling")))
    if cf_summary is not None and cf_summary.get("data"):
        gr.Markdown("## Counterfactual: remove the top proponents and retrain")
        with gr.Accordion("Medians against random removal and the strongest look-alike baseline, per removal size",
                          open=not folded):
            a = _loaded(root)
            data, lookalike_error = with_lookalike(bench, cf_summary["data"])
            gr.Markdown(viz.counterfactual_summary(data, _n_train(root), "digit" if a is None else a.class_word))
            if lookalike_error:
                gr.Markdown("**The look-alike baseline's counterfactual is not shown: its result file is unreadable, "
                            f"or not the one its writer wrote.** {html.escape(lookalike_error)}",
                            elem_classes="damaged-result")
            published = cf_summary["data"].get("published_cifar2_medians", {}).get("l2")
            if published:
                gr.Markdown("For reference, the paper's medians on CIFAR-2 (32x32 colour images, so larger distances) "
                            "at 20% removed: " + ", ".join(f"{sup.method_label(m)} {v:.2f}" for m, v in published.items())
                            + ".")
            if data.get("cells"):
                chart(functools.partial(viz.counterfactual_chart, data))
    for item in items.values():  # any other benchmark file, as generic tables
        with gr.Accordion(item["name"], open=False):
            for path, rows in sup.records(item["data"]):
                _table(rows, path)
                headers = list(dict.fromkeys(h for r in rows for h in r))
                if viz.chartable(rows, headers):
                    chart(functools.partial(viz.benchmark_chart, rows, headers, path))
    readme = _read_text(os.path.join(bench, "README.md"))
    if shown and readme:
        with gr.Accordion("How the benchmarks were measured", open=False):
            gr.Markdown(readme)
    if not _digits_root(root):  # a model not trained by dtrak: what is missing, and the commands that fill it
        # (a damaged result counts as there: its section names the file and how to rewrite it)
        lds_shown = any(x is not None and (x.get("data") or "error" in x) for x in (lds, tables))
        cf_shown = cf_summary is not None and bool(cf_summary.get("data") or "error" in cf_summary)
        todo = own_runs_markdown(root, lds_shown, cf_shown)
        if not shown:
            gr.Markdown("## No benchmark results for this model yet\n\n" + todo, elem_id="own-runs")
        elif todo:
            with gr.Accordion("Not measured yet: " + " and ".join(
                    w for w, done in (("the LDS", lds_shown), ("the counterfactual", cf_shown)) if not done), open=False):
                gr.Markdown(todo, elem_id="own-runs")
    elif not shown:
        gr.Markdown(
            "### No benchmark results yet\n"
            f"Nothing under `{bench}/` or `{cf_dir}/`. The LDS tables and the counterfactual medians are "
            f"produced by the evaluation harnesses (`python -m dtrak_core lds <step>{root_option(root)}` writes "
            f"`benchmarks/lds_results.json`, `python -m dtrak_core counterfactual{root_option(root)}` writes "
            "`counterfactual/summary.json`; see `python -m dtrak_core --help`); restart the app to show them.")
    return charts


def methods_chart_note(root: str, rows: list[dict]) -> str:
    """The line above the methods chart: which test set orders it, named as the folder's data."""
    a = _loaded(root)
    if a is None or a.digits:
        return "The poster's methods, best on the validation digits at the top:"
    first = "validation " + a.kind[1] if any(r.get("test set") == "validation" for r in rows) else "generated samples"
    return f"Every method, best on the {first} at the top:"


def draw_charts(charts: list, cache: OnceCache):
    """The figures of `benchmarks_blocks`' charts, drawn once per process (as one value when there
    is one chart, as Gradio expects for a single output)."""
    figures = cache.get("figures", lambda: [draw() for _, draw in charts])
    return figures[0] if len(figures) == 1 else figures
