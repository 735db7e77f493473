"""The About tab: what the scores are, how they are evaluated, and which methods this folder runs."""
from __future__ import annotations

import html

import gradio as gr

from dtrak_core import app_support as sup
from dtrak_core.attribution import methods as registry
from dtrak_core.ui import texts

LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]


def methods_markdown(methods, unavailable) -> str:
    lines = ["## Methods in this app", "", "| method | scores by |", "|---|---|"]
    lines += [f"| {sup.escape_table_cell(sup.method_label(m))} | {sup.escape_table_cell(sup.method_description(m))} |"
              for m in methods]
    if unavailable:
        lines += ["", "Not available with these assets:", ""]
        lines += [f"- **{sup.method_label(m)}**: {sup.short_reason(why)}" for m, why in unavailable.items()]
    return "\n".join(lines)


def unavailable_details(unavailable) -> str:
    """The full reasons (what was looked for, how to fix it), for whoever wants them."""
    if not unavailable:
        return ""
    return "\n\n".join(f"**{sup.method_label(m)}**: {html.escape(why)}" for m, why in unavailable.items())


def digits_about(a) -> str:
    """The digits folder's paragraph, its numbers read from the folder: the signed validation LDS
    of benchmarks/evidence.json, the training set's size and the registry's default. Without the
    evidence (a rebuilt folder before its evaluation), the paragraph says less, never old numbers."""
    rows = {r.get("method"): r for r in (sup.read_evidence(a.root) or {}).get("rows", []) if isinstance(r, dict)}
    values = {m.replace("-", "_"): rows.get(m, {}).get("validation/signed") for m in ("pixel-rbf", "square", "avg")}
    text = texts.get("about_digits.md")
    if any(not isinstance(v, (int, float)) for v in values.values()):
        text = "\n\n".join(p for p in text.split("\n\n") if "{{pixel_rbf}}" not in p)
        values = {}
    return texts.fill(text, **{k: f"{v:.1f}" for k, v in values.items()}, n_train=a.n_train,
                      default=registry.label(registry.default_method(a.methods)))


def folder_about(a) -> str:
    """Another folder's paragraph, in its own words: what it was trained on and which lambda ranks."""
    classes = f" {a.classes_phrase}" if a.classes_phrase else ""
    lam = ("the one measured on this model's LDS (`lds-own tune-lambda`, recorded in its `manifest.json`)"
           if a.attributor.tuned_lambdas else "the data-free rule, 0.1 times the mean squared training feature "
           "norm, until `lds-own tune-lambda` records one measured on this model")
    return (f"**This model.** The scores rank the {a.n_train:,} {a.kind[1]} it was trained on{classes}; $\\lambda$ is {lam}. "
            "**Benchmarks** shows what was measured on it, or the commands that measure it.")


def create_ui(a) -> None:
    about = texts.get("about.md") + "\n\n" + (digits_about(a) if a.digits else folder_about(a))
    gr.Markdown(about, latex_delimiters=LATEX)
    gr.Markdown(methods_markdown(a.methods, a.unavailable))
    if a.unavailable:
        with gr.Accordion("Why some methods are unavailable, in full", open=False):
            gr.Markdown(unavailable_details(a.unavailable))
