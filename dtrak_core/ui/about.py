"""The About tab: what the scores are, how they are evaluated, and which methods this folder runs."""
from __future__ import annotations

import html

import gradio as gr

from dtrak_core import app_support as sup
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


def create_ui(a) -> None:
    about = texts.get("about.md") + ("\n\n" + texts.get("about_digits.md") if a.digits else "")
    gr.Markdown(about, latex_delimiters=LATEX)
    gr.Markdown(methods_markdown(a.methods, a.unavailable))
    if a.unavailable:
        with gr.Accordion("Why some methods are unavailable, in full", open=False):
            gr.Markdown(unavailable_details(a.unavailable))
