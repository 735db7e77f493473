"""The banner over the page that names the damaged files of a model folder and the parts they turn
off: first from the quick checks (small files), then from the full check made after the first page."""
from __future__ import annotations

import html
import os
import threading

import gradio as gr

from dtrak_core.attribution import methods as registry
from dtrak_core.ui import counterfactual as cfui
from dtrak_core.ui.benchmarks import result_part, verified_results
from dtrak_core.ui.state import current_root, load_assets, once_per_root

WARM_UP_WAIT = 120  # seconds a page waits at most for the warm-up before checking the files itself
warming, warm_done = threading.Event(), threading.Event()  # the warm-up thread is running / has finished


def results_damage(root: str) -> dict:
    """{part: why it is off} for the precomputed results (galleries, every JSON of benchmarks/, the
    counterfactual summary)."""
    cfui.precomputed(root)
    damaged = dict(cfui.damaged_gallery.get(root, {}))
    damaged.update({result_part(name): r["error"] for name, r in verified_results(root).items() if "error" in r})
    return damaged


def quick_damage(root: str) -> dict:
    """{part: why it is off} from the checks that cost no more than reading a few small files:
    the stores and the TracInCP index (`load_assets`), the precomputed counterfactual results'
    identity.json, the galleries and the benchmark results and summary (their checksums). What they
    miss (a replaced checkpoint, a damaged job file) `full_check` finds."""
    from dtrak_core.errors import IntegrityError

    a = load_assets(root)
    damaged = {**a.damaged, **results_damage(root)}
    if root in cfui.damaged_results:
        damaged["precomputed counterfactuals"] = cfui.damaged_results[root]
    elif a.can_retrain:
        try:
            cf = cfui.engine()
            cf.reproducible_rankings(a.attributor, os.path.join(root, "counterfactual", "jobs"),
                                     cf.train_config_from_manifest(root))
        except IntegrityError as e:
            damaged["precomputed counterfactuals"] = str(e)
        except (gr.Error, ValueError, OSError):
            pass
    return damaged


@once_per_root
def full_check(root: str) -> dict:
    """{part: why it is off}, every file read: the TracInCP checkpoints loaded and hashed, every
    precomputed counterfactual job read (its zip checksums too). Made once, after the first page's
    samples are shown (it costs seconds), and shown in the page's banner."""
    a = load_assets(root)
    full = registry.problems(a.attributor, root)
    damaged = {m: str(e) for m, e in full.items() if not isinstance(e, registry.MethodUnavailable)}
    cfui.committed(root)
    if root in cfui.damaged_results:
        damaged["precomputed counterfactuals"] = cfui.damaged_results[root]
    return {**quick_damage(root), **damaged}


def damage_banner(damaged: dict) -> str:
    if not damaged:
        return ""
    return ("**Some files under the model folder are damaged**, so these parts are off until they are restored or "
            "rebuilt:\n\n" + "\n".join(f"- **{m}**: {html.escape(why)}" for m, why in damaged.items()))


def show_damage():
    """The banner once every file has been checked (the page starts with the quick checks' findings).
    While the server's warm-up runs, it waits for it: the warm-up makes the full check after the
    default method's scorer, which a first click needs sooner."""
    if warming.is_set():
        warm_done.wait(WARM_UP_WAIT)
    try:
        damaged = full_check(current_root())
    except (ValueError, OSError):
        return gr.update()
    return gr.Markdown(damage_banner(damaged), visible=bool(damaged))
