"""The Benchmarks tab: the folder's committed LDS tables, evidence against the model-free baselines and
counterfactual medians, each shown only as its writer sealed it; charts drawn when the tab is first shown."""
from __future__ import annotations

import functools
import html
import os

import gradio as gr

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.errors import root_option
from dtrak_core.shared import OnceCache
from dtrak_core.ui import texts
from dtrak_core.ui.state import load_assets


def verified_results(root: str) -> dict:
    """{name: {"path", and "data" or "error"}} for the benchmark results the app shows whole:
    benchmarks/tables.json and counterfactual/summary.json (when present), each verified against
    the checksum its writer recorded. "error" (unreadable, edited, unrecorded) turns off that part
    of the Benchmarks tab, which then says why, as the banner does. (Two small files: read each
    time it is asked, when the page is built and by the banner's checks.)"""
    from dtrak_core import checksums
    from dtrak_core.errors import IntegrityError
    from dtrak_core.evaluation.counterfactual_report import summary_remedy
    from dtrak_core.evaluation.tables_report import tables_remedy

    out = {}
    for name, path, what, remedy in (
            ("tables", os.path.join(root, "benchmarks", "tables.json"), "benchmark tables",
             tables_remedy(os.path.join(root, "benchmarks", "tables.json"))),
            ("summary", os.path.join(root, "counterfactual", "summary.json"), "counterfactual summary",
             summary_remedy(os.path.join(root, "counterfactual", "summary.json")))):
        if not os.path.exists(path):
            continue
        try:
            out[name] = {"path": path, "data": checksums.read_sealed_json(path, what, remedy)}
        except IntegrityError as e:
            out[name] = {"path": path, "error": str(e)}
    return out


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def _table(rows: list[dict], label: str) -> None:
    headers = list(dict.fromkeys(h for r in rows for h in r))
    gr.Dataframe(value=[["" if r.get(h) is None else r.get(h) for h in headers] for r in rows], headers=headers,
                 label=label, interactive=False, wrap=True)


def _n_train(root: str) -> int | None:
    try:
        return load_assets(root).n_train
    except (ValueError, OSError):
        return None


def _digits_root(root: str) -> bool:
    try:
        return load_assets(root).digits
    except (ValueError, OSError):
        return True  # nothing loadable: the default's instructions apply


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
    items = {i["name"]: i for i in sup.read_benchmarks(bench)}
    cf_items = {i["name"]: i for i in sup.read_benchmarks(cf_dir)}
    lds, cf_summary = items.pop("lds_results", None), cf_items.get("summary")
    tables = items.pop("tables", None)
    # the tables and the summary are shown only as their writers wrote them (checksums verified);
    # one that is not is named in place of its section (and in the banner), never silently left out
    checked = verified_results(root)
    if tables is not None:
        tables = {**tables, **checked.get("tables", {})}
    if cf_summary is not None:
        cf_summary = {**cf_summary, **checked.get("summary", {})}
    broken = [(title, x) for title, x in (("LDS: D-TRAK and TRAK", lds), ("LDS of every method", tables),
                                          ("Counterfactual: remove the top proponents and retrain", cf_summary))
              if x is not None and "error" in x]
    for _, x in broken:
        x.pop("data", None)
    evidence = items.pop("evidence", None)
    shown = any(x is not None and x.get("data") for x in (lds, tables, cf_summary, evidence)) or bool(items) \
        or bool(broken)
    if evidence is not None and evidence.get("data"):
        # the headline and one chart: every method beside the strong baselines, under the noise ceiling
        ceiling = (tables or {}).get("data", {}).get("noise_ceiling") if tables is not None else None
        gr.Markdown("## Attribution or look-alikes?\n" + sup.evidence_headline(evidence["data"]))
        chart(functools.partial(viz.lds_chart, sup.evidence_rows(evidence["data"]), ceiling))
        with gr.Accordion("Every method beside the model-free baselines: signed, sharpened, rank and top-1% LDS",
                          open=False):
            gr.Markdown("Each method's LDS four ways: as scored (*signed*), with each score s reported as s·|s| "
                        "(*sharpened*: the same rankings, the effect concentrated on the strongest), from each "
                        "query's ranks alone (*rank*) and from an indicator of its top 1% (*top-1%*). The last two "
                        "are the same for every increasing transform of the scores. Every λ and bandwidth is "
                        "cross-fitted. *(no model)* marks baselines that never look at the diffusion model.")
            table = _read_text(os.path.join(bench, "evidence.md"))
            if table:
                gr.Markdown(sup.relabel_tables(table))
    if shown:
        with gr.Accordion("How to read these numbers", open=not (evidence is not None and evidence.get("data"))):
            gr.Markdown(texts.get("benchmarks_help.md").split("\n", 1)[1])
    for title, x in broken:
        gr.Markdown(f"## {title}\n\n**Not shown: this result file is unreadable, or not the one its writer wrote.** "
                    f"{html.escape(x['error'])}", elem_classes="damaged-result")
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
            if tables.get("markdown"):
                gr.Markdown(sup.relabel_tables(tables["markdown"].split("\n", 1)[-1]))  # without its own title
            rows = sup.table_rows(tables["data"].get("methods", {}))
            if rows:
                gr.Markdown("The poster's methods, best on the validation digits at the top:")
                chart(functools.partial(viz.lds_chart, rows, tables["data"].get("noise_ceiling")))
    if cf_summary is not None and cf_summary.get("data"):
        gr.Markdown("## Counterfactual: remove the top proponents and retrain")
        with gr.Accordion("Medians against random removal, per removal size", open=not folded):
            gr.Markdown(viz.counterfactual_summary(cf_summary["data"], _n_train(root)))
            published = cf_summary["data"].get("published_cifar2_medians", {}).get("l2")
            if published:
                gr.Markdown("For reference, the paper's medians on CIFAR-2 (32x32 colour images, so larger distances) "
                            "at 20% removed: " + ", ".join(f"{sup.method_label(m)} {v:.2f}" for m, v in published.items())
                            + ".")
            if cf_summary["data"].get("cells"):
                chart(functools.partial(viz.counterfactual_chart, cf_summary["data"]))
    for item in items.values():  # any other benchmark file, as generic tables
        with gr.Accordion(item["name"], open=False):
            if "error" in item:
                gr.Markdown(f"Could not read `{item['error']}`")
                continue
            for path, rows in sup.records(item["data"]):
                _table(rows, path)
                headers = list(dict.fromkeys(h for r in rows for h in r))
                if viz.chartable(rows, headers):
                    chart(functools.partial(viz.benchmark_chart, rows, headers, path))
    readme = _read_text(os.path.join(bench, "README.md"))
    if shown and readme:
        with gr.Accordion("How the benchmarks were measured", open=False):
            gr.Markdown(readme)
    if not shown and not _digits_root(root):
        gr.Markdown("### No benchmark results for this model\nThe LDS and counterfactual evaluations retrain the "
                    "model on subsets of its training data, so they run for models trained by dtrak (the embedded "
                    "digits default), not for a model built with `python -m dtrak_core build`.")
    elif not shown:
        gr.Markdown(
            "### No benchmark results yet\n"
            f"Nothing under `{bench}/` or `{cf_dir}/`. The LDS tables and the counterfactual medians are "
            f"produced by the evaluation harnesses (`python -m dtrak_core lds <step>{root_option(root)}` writes "
            f"`benchmarks/lds_results.json`, `python -m dtrak_core counterfactual{root_option(root)}` writes "
            "`counterfactual/summary.json`; see `python -m dtrak_core --help`); restart the app to show them.")
    return charts


def draw_charts(charts: list, cache: OnceCache):
    """The figures of `benchmarks_blocks`' charts, drawn once per process (as one value when there
    is one chart, as Gradio expects for a single output)."""
    figures = cache.get("figures", lambda: [draw() for _, draw in charts])
    return figures[0] if len(figures) == 1 else figures
