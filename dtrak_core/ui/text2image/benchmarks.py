"""The Benchmarks tab of a text-to-image folder: the miniature's sample quality, the evidence against
the model-free baselines and the LoRA-retrain LDS results, each shown only as its writer wrote it.
"""
import os
import shlex

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.text2image.data import digit_caption
from dtrak_core.ui.benchmarks import TITLES, damaged_section, drawn, evidence_blocks, result_part
from dtrak_core.ui.text2image.folder import LDS_FOLDER, TextToImageAssets

# ---------------------------------------------------------------- Benchmarks: quality and LDS

QUALITY_MODELS = {"lora": "base + LoRA (what the app samples)", "base_on_pretraining_digits": "base model alone",
                  "base_on_finetuning_digits": "base model alone"}  # the base was measured on 0-4 and on 5-9


def quality_rows(manifest: dict) -> list[dict]:
    """One row per prompted digit: the share of samples the digit classifier reads as that digit,
    for each model the build measured (the LoRA on 5-9; the base on its own 0-4 and asked for 5-9),
    then one row per set of prompts measured together with its overall share."""
    quality = manifest.get("quality") or {}
    per_digit, overall = {}, {}
    for key, q in quality.items():
        if not isinstance(q, dict) or "prompt_accuracy_per_digit" not in q:
            continue
        model = QUALITY_MODELS.get(key, key)
        digits = sorted(int(d) for d in q["prompt_accuracy_per_digit"])
        for d, v in q["prompt_accuracy_per_digit"].items():
            per_digit.setdefault(int(d), {})[model] = f"{float(v):.1%}"
        overall.setdefault((digits[0], digits[-1]), {})[model] = f"{float(q['prompt_accuracy']):.1%}"
    models = list(dict.fromkeys(m for d in per_digit.values() for m in d))
    models.sort(key=lambda m: list(QUALITY_MODELS.values()).index(m) if m in QUALITY_MODELS.values() else 99)
    rows = [{"prompt": f"“{digit_caption(d)}”", **{m: per_digit[d].get(m, "") for m in models}}
            for d in sorted(per_digit)]
    rows += [{"prompt": f"all of “{lo}” .. “{hi}”", **{m: shares.get(m, "") for m in models}}
             for (lo, hi), shares in sorted(overall.items(), key=lambda kv: -kv[0][0])]
    return rows


def digit_span(digits) -> str:
    """Digits as the texts name them: "5-9" for a run of consecutive ones, else "1, 3, 5"."""
    ds = sorted(int(d) for d in digits)
    if len(ds) > 2 and ds == list(range(ds[0], ds[-1] + 1)):
        return f"{ds[0]}-{ds[-1]}"
    return ", ".join(str(d) for d in ds)


def miniature_digits(manifest: dict) -> tuple[list, list]:
    """(the digits the base model was pretrained on, those the LoRA was fine-tuned on), as the
    miniature's manifest records them ([] where it does not)."""
    recipe, data = manifest.get("recipe"), manifest.get("dataset")
    pre = recipe.get("pretrain_digits") if isinstance(recipe, dict) else None
    fine = data.get("digits") if isinstance(data, dict) else None
    return (list(pre) if isinstance(pre, list) else []), (list(fine) if isinstance(fine, list) else [])


def quality_markdown(a: TextToImageAssets) -> str:
    q = (a.manifest.get("quality") or {}).get("lora")
    if not isinstance(q, dict) and not a.digits:
        return ("### Sample quality\nNot measured for this model: the build measures it only where a classifier "
                "can read the samples (the miniature built by `python -m dtrak_core build-text2image`).")
    if not isinstance(q, dict):
        return ("### Sample quality\nNo sample-quality measurement for this folder: the build measures it with the "
                f"digit classifier for the digits miniature (`python -m dtrak_core build-text2image --root "
                f"{shlex.quote(a.root)}`).")
    _, fine = miniature_digits(a.manifest)
    seeds = str(q.get("seeds", "?")).replace(" each", "")
    confident = float(q.get("prompt_accuracy_confident", 0))
    return (f"### Sample quality: does the model draw the digit it is asked for?\n"
            f"{q.get('n')} samples of the LoRA (seeds {seeds} for each prompt, sampler {q.get('sampler', '?')}, "
            f"guidance {q.get('guidance_scale', '?')}), each read by the digit classifier (logistic regression, 97% "
            f"on held-out digits): **{float(q['prompt_accuracy']):.1%}** are the prompted digit ({confident:.1%} "
            f"with confidence ≥ {q.get('confidence_threshold', 0.8)}). The base model alone draws the digits "
            f"{digit_span(fine) if fine else 'of the fine-tuning set'} almost never: they come from the LoRA, whose "
            "fine-tuning set is what the Attribute tab attributes. "
            "Measured by the build and recorded in the folder's `manifest.json`.")


def read_lds(root: str) -> dict:
    """The LDS results under `root/lds`, verified against the checksum its writer recorded (`sup.read_benchmark`):
    {'folder', 'data', 'markdown' (the report, drawn from the verified data by `lds.format_table`), 'error'
    (unreadable, edited or unrecorded: the file named with its fix)}, each None when absent."""
    folder = os.path.join(root, LDS_FOLDER)
    out = {"folder": folder, "data": None, "markdown": None, "error": None}
    path = os.path.join(folder, "lds_results.json")
    if os.path.isfile(path) or os.path.basename(path) in sup.recorded_names(folder):  # gone though recorded: named
        item = sup.read_benchmark(path)
        out["data"], out["error"] = item.get("data"), item.get("error")
    if out["data"] is not None:
        from dtrak_core.text2image.lds import format_table

        out["markdown"] = drawn(format_table, out["data"])
    return out


PARTS = {"evidence": "Benchmarks: evidence against the model-free baselines",
         "lds": "Benchmarks: LDS with LoRA retrains"}


def results_damage(root: str) -> dict:
    """{part: why it is off} for the precomputed results the Benchmarks tab shows (every JSON of
    benchmarks/, lds/lds_results.json): each verified, as the pixel folders' banner does."""
    damaged = {PARTS.get(i["name"], result_part(i["name"])): i["error"]
               for i in sup.read_benchmarks(os.path.join(root, "benchmarks")) if "error" in i}
    lds = read_lds(root)
    if lds["error"]:
        damaged[PARTS["lds"]] = lds["error"]
    return damaged


def lds_rows(data: dict) -> list[dict]:
    """One row per (method, test set): the TRAK family with its honest and paper lambda, then the baselines."""
    return sup.lds_rows(data) + sup.table_rows(data.get("baselines") or {})


def lds_intro(data: dict) -> str:
    done, planned = data.get("subsets_done"), data.get("subsets_planned")
    seeds = len(data.get("train_seeds") or []) or "?"
    cost = data.get("seconds_per_model") or {}
    text = (f"The LoRA retrained on **{done}** random half subsets of its fine-tuning set ({seeds} training seeds "
            "each); LDS x 100, higher is better.")
    if data.get("partial"):
        text = (f"**Provisional:** {done} of {planned} half subsets were retrained when these numbers were written. "
                + text)
    if cost:
        text += (f" Cost per retrained model: {cost.get('train_mean', float('nan')):.1f} s LoRA fine-tuning + "
                 f"{cost.get('eval_mean', float('nan')):.1f} s ground truth on this CPU.")
    return text


LDS_NOT_RUN = ("### LDS: not run yet\nNo `{folder}/lds_results.json`. The linear datamodeling score retrains the LoRA "
               "on random half subsets of its fine-tuning set: `{run}` (resumable, `--max-jobs N` runs it in pieces), "
               "then `{evaluate}` writes `lds_results.json` and `results.md` there. Restart the app to show them.")
LDS_OWN_LORA = ("### LDS: not measured for this model\nThe linear datamodeling score retrains the LoRA on random half "
                "subsets of its fine-tuning set. `python -m dtrak_core lds-text2image` runs those retrains for a LoRA "
                "fine-tuned by dtrak (`build-text2image` records its recipe in the folder); this folder's LoRA was "
                "fine-tuned by your own script, whose recipe dtrak does not know, so no command here retrains it.")


def lds_command(root: str, action: str) -> str:
    """The `lds-text2image` command (run, evaluate) for the folder `root`, whose LDS results the
    Benchmarks tab reads from root/lds: --root and --out named, so that it runs as printed."""
    return (f"python -m dtrak_core lds-text2image {action} --root {shlex.quote(root)} --out "
            f"{shlex.quote(os.path.join(root, LDS_FOLDER))}")


def lds_not_run(a: TextToImageAssets, folder: str) -> str:
    """What the Benchmarks tab says without LDS results: how to run it, where dtrak can."""
    if not a.dtrak_lora:
        return LDS_OWN_LORA
    return LDS_NOT_RUN.format(folder=folder, run=lds_command(a.root, "run"), evaluate=lds_command(a.root, "evaluate"))



def benchmarks_blocks(a: TextToImageAssets, gr) -> None:
    """Sample quality (from the build) and the LDS results of `lds-text2image`, or that it has not run."""
    gr.Markdown(quality_markdown(a))
    rows = quality_rows(a.manifest)
    if rows:
        headers = list(dict.fromkeys(h for r in rows for h in r))
        gr.Dataframe(value=[["" if r.get(h) is None else r.get(h) for h in headers] for r in rows], headers=headers,
                     label="share of samples classified as the prompted digit", interactive=False, wrap=True,
                     elem_id="quality-table")
    items = {i["name"]: i for i in sup.read_benchmarks(os.path.join(a.root, "benchmarks"))}
    lds = read_lds(a.root)
    evidence = items.pop("evidence", None) or {}
    if evidence.get("data"):  # every method beside the strong model-free baselines (strong_baselines.py)
        evidence_blocks(evidence["data"], (lds["data"] or {}).get("noise_ceiling"),
                        lambda draw: gr.Plot(draw(), show_label=False))
    for name, item in ([("evidence", evidence)] if "error" in evidence else []) + list(items.items()):
        if "error" in item:  # named in place of its section (and in the banner), never silently left out
            damaged_section(TITLES.get(name, name), item["error"])
    if lds["data"] is None:
        if lds["error"]:
            damaged_section("LDS: D-TRAK, TRAK and the baselines", lds["error"], elem_id="lds-status")
        else:
            gr.Markdown(lds_not_run(a, lds["folder"]), elem_id="lds-status")
        return
    gr.Markdown("### LDS: D-TRAK, TRAK and the baselines, with LoRA retrains", elem_id="lds-status")
    gr.Markdown(lds_intro(lds["data"]))
    rows = lds_rows(lds["data"])
    if rows:
        headers = list(dict.fromkeys(h for r in rows for h in r))
        gr.Dataframe(value=[["" if r.get(h) is None else r.get(h) for h in headers] for r in rows], headers=headers,
                     label="LDS x 100 (higher is better), mean over test images", interactive=False, wrap=True,
                     elem_id="lds-table")
        gr.Plot(viz.lds_chart(rows, lds["data"].get("noise_ceiling")), show_label=False)
    if lds["markdown"]:
        with gr.Accordion("The evaluation's report", open=False):
            gr.Markdown(sup.relabel_tables(lds["markdown"]))
