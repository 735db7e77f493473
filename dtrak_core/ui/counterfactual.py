"""The Counterfactual tab: remove a generated sample's top proponents, retrain with the model's own
recipe, regenerate the same seed and show how far it moved; the precomputed results (the gallery and
the harness's committed jobs) are shown instantly."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import gradio as gr
import numpy as np
import torch

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.attribution import methods as registry
from dtrak_core.errors import Cancelled
from dtrak_core.files import read_json
from dtrak_core.images import grid, to_pil
from dtrak_core.shared import OnceCache
from dtrak_core.ui import serving
from dtrak_core.ui.state import QUERY_PX, assets, current_root, load_assets, once_per_root, readable

NO_RANKING = "none"
MAX_RETRAIN_SECONDS = float(os.environ.get("DTRAK_MAX_RETRAIN_SECONDS", 900))  # wall time of one retrain request
_counterfactual_cache = OnceCache(64)  # (root, seed, ranking, k) -> CounterfactualView
_retrain_cost = OnceCache(4)  # (root, recipe, 10-minute period) -> RetrainCost measured on this machine
_last_retrain: dict = {}  # (root, recipe) -> RetrainCost of the last live retrain (a whole value, replaced at once)
RETRAIN_COST_SECONDS = 600
_cancelled_at: dict[str, float] = {}  # session -> time.monotonic() of its last Cancel
_cancel_lock = threading.Lock()
DIM_RESULTS_JS = "(...args) => { document.querySelector('#cf-results')?.classList.add('stale'); return args; }"
UNDIM_RESULTS_JS = "(...args) => { document.querySelector('#cf-results')?.classList.remove('stale'); return args; }"


def engine():
    """The counterfactual core, imported at call time so the rest of the app works without it."""
    try:
        from dtrak_core.evaluation import counterfactual
    except ImportError as e:
        raise gr.Error(f"The counterfactual engine (dtrak_core.evaluation.counterfactual) is not available: {e}") from None
    return counterfactual


@dataclass
class CounterfactualView:
    """One before/after result ready to show, from a live run or from the precomputed gallery."""
    seed: int
    ranking: str
    k: int
    before: object  # PIL image, upscaled
    after: object  # PIL image, upscaled
    removed: np.ndarray  # (k,) training indices, strongest proponent first
    l2: float
    label_before: int
    confidence_before: float
    label_after: int
    confidence_after: float
    seconds: float | None  # retrain wall time; None for precomputed results
    source: str  # 'live' or 'precomputed'

    @classmethod
    def from_result(cls, r, live: bool = True) -> "CounterfactualView":
        scale, value_range = assets().scale(QUERY_PX), assets().attributor.input_range
        return cls(r.seed, r.ranking, r.k, to_pil(r.before, scale, value_range), to_pil(r.after, scale, value_range),
                   np.asarray(r.removed_indices), r.l2, r.label_before, r.confidence_before, r.label_after,
                   r.confidence_after, r.train_seconds if live else None, "live" if live else "precomputed")

    @classmethod
    def from_gallery(cls, e: dict) -> "CounterfactualView":
        """A gallery entry (`app_support.counterfactual_gallery`, verified); an image that cannot be
        decoded is an `IntegrityError` naming the PNG."""
        from PIL import Image

        from dtrak_core.errors import IntegrityError
        from dtrak_core.evaluation.counterfactual_report import gallery_remedy

        def load(path):
            try:
                with Image.open(path) as img:
                    img = img.convert("L")
            except Exception as exc:  # PIL raises many types ("image file is truncated", ...)
                raise IntegrityError(path, f"(counterfactual gallery image) cannot be read ({type(exc).__name__}: "
                                     f"{exc})", gallery_remedy(path)) from None
            return img.resize((img.width * assets().scale(QUERY_PX), img.height * assets().scale(QUERY_PX)),
                              Image.Resampling.NEAREST)
        return cls(int(e["seed"]), e["ranking"], int(e["k"]), load(e["before_png"]), load(e["after_png"]),
                   np.asarray(e["removed_indices"]), float(e["l2"]), int(e["label_before"]),
                   float(e["confidence_before"]), int(e["label_after"]), float(e["confidence_after"]), None,
                   "precomputed")


@once_per_root
def precomputed(root: str) -> dict:
    """(seed, ranking, k) -> CounterfactualView for every entry of the galleries shipped under the
    assets, each gallery verified against the checksums its writer recorded. A damaged or edited
    gallery is left out and reported (`damaged_gallery`, the banner); the others are shown."""
    from dtrak_core.errors import IntegrityError

    galleries, damaged = sup.counterfactual_gallery(root)
    views = {}
    for index_path, entries in galleries:
        try:
            found = [CounterfactualView.from_gallery(e) for e in entries]
        except IntegrityError as e:
            damaged[index_path] = str(e)
            continue
        views.update({(v.seed, v.ranking, v.k): v for v in found})
    damaged_gallery[root] = {f"precomputed gallery ({os.path.relpath(os.path.dirname(p), root)})": why
                              for p, why in damaged.items()}
    return views
damaged_gallery: dict[str, dict] = {}  # root -> {"precomputed gallery (<folder>)": why it is off}


@once_per_root
def committed(root: str) -> dict:
    """(seed, ranking, k) -> job file of the counterfactual harness's finished jobs under the assets
    that a live retrain here would reproduce (same model, recipe and stores); {} otherwise."""
    from dtrak_core.errors import IntegrityError

    try:
        cf = engine()
        return cf.committed_results(load_assets(root).attributor, os.path.join(root, "counterfactual", "jobs"),
                                    cf.train_config_from_manifest(root))
    except IntegrityError as e:  # damaged, not absent: shown in the banner, never silently dropped
        damaged_results[root] = str(e)
        return {}
    except (gr.Error, ValueError, OSError):
        return {}
damaged_results: dict[str, str] = {}  # root -> why its precomputed counterfactual results cannot be used


def stored_view(root: str, key: tuple) -> CounterfactualView | None:
    """A finished result for (seed, ranking, k) without retraining: the gallery's, else the harness's."""
    view = precomputed(root).get(key)
    if view is None and key in committed(root):
        view = _counterfactual_cache.get(("stored", root, key), lambda: CounterfactualView.from_result(
            engine().load_job(committed(root)[key]), live=False))
    return view


@once_per_root
def outcomes(root: str) -> dict:
    """(seed, ranking, k) -> {'l2', 'label_before', 'label_after'} of every stored result (read
    from the results, without drawing their pictures)."""
    out = {key: {"l2": v.l2, "label_before": v.label_before, "label_after": v.label_after}
           for key, v in precomputed(root).items()}
    for key, path in committed(root).items():
        if key not in out:
            r = engine().load_job(path)
            out[key] = {"l2": r.l2, "label_before": r.label_before, "label_after": r.label_after}
    return out
EXAMPLE_HEADERS = ["seed", "removed", "ranking A: pixel L2, digit", "ranking B: pixel L2, digit"]
EXAMPLE_WIDTHS = ["64px", "84px", "220px", "220px"]


def examples(root: str) -> list[dict]:
    """The precomputed counterfactual examples, one per (seed, k), in the table's order (see
    `app_support.example_rows`)."""
    return sup.example_rows(outcomes(root), set(precomputed(root)))


def example_targets(root: str) -> list[list]:
    """Rows of the examples table: seed, removed, and per ranking its pixel L2 and the digit
    before -> after; the first row is the first example whose digit changes under ranking A."""
    def outcome(ranking, o):
        return f"{sup.method_label(ranking)}: {o['l2']:.2f}, {o['label_before']} → {o['label_after']}"

    return [[r["seed"], r["k"], *(outcome(rk, o) for rk, o in zip(r["rankings"], r["outcomes"])),
             *([NO_RANKING] if len(r["rankings"]) == 1 else [])] for r in examples(root)]


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def cancel_retrain(request: gr.Request = None):
    """Cancel: stops this session's retrain, running or still waiting in the queue."""
    with _cancel_lock:
        _cancelled_at[_session(request)] = time.monotonic()
    return "Cancelled: the retrain was stopped; nothing was changed. The pictures show the result named above them."


def forget_session(request: gr.Request = None):
    """The visitor closed the page: their retrain (if any) stops."""
    cancel_retrain(request)


class RetrainGuard:
    """When a retrain request must stop: its visitor pressed Cancel after submitting it (even while
    it was still queued), closed the page or the API stream, or it ran past MAX_RETRAIN_SECONDS."""

    def __init__(self, request: gr.Request | None):
        self.session = _session(request)
        self.event = serving.running_event(request, "run_counterfactual")
        # a Cancel pressed after the request was queued applies to it
        self.since = self.event.enqueue_time if self.event is not None else time.monotonic()
        self.deadline = time.monotonic() + MAX_RETRAIN_SECONDS
        self.reason = None

    def __call__(self) -> bool:
        with _cancel_lock:
            cancelled = _cancelled_at.get(self.session, -1.0) >= self.since
        if cancelled:
            self.reason = "Cancelled: the retrain was stopped; nothing was changed."
        elif self.event is not None and not self.event.alive:
            self.reason = "Stopped: the page or API stream that asked for this retrain was closed."
        elif time.monotonic() > self.deadline:
            self.reason = (f"Stopped after {MAX_RETRAIN_SECONDS:.0f} s, the time limit of one retrain request "
                           "on this server; nothing was changed. Try again when the server is less busy.")
        return self.reason is not None
CF_HEADERS = ["ranking", "pixel L2", "digit before → after", "retrain"]
# in pixels, not shares: on a phone the table scrolls sideways instead of breaking words inside cells
CF_WIDTHS = ["110px", "72px", "200px", "124px"]


def counterfactual_outputs(views: list, status: str) -> tuple:
    """Before / after images, a table, the removed images and a heading naming what is shown, for 1
    or 2 results on the same target."""
    train = assets().attributor.train
    after = [gr.Image(value=v.after, label=f"after removing {v.k} by {sup.method_label(v.ranking)}") for v in views]
    removed = [gr.Image(value=grid(train.images[torch.as_tensor(v.removed[:48], dtype=torch.long)], columns=16, scale=4,
                                         value_range=train.value_range),
                        label=f"removed by {sup.method_label(v.ranking)}: the first {min(48, v.k)} of {v.k}")
               for v in views]
    if len(views) == 1:
        after.append(gr.Image(value=None, label="after (no second ranking)"))
        removed.append(gr.Image(value=None, label="(no second ranking)"))
    rows = [[sup.method_label(v.ranking), round(v.l2, 3),
             f"{v.label_before} ({v.confidence_before:.0%}) → {v.label_after} ({v.confidence_after:.0%})"
             + (" changed" if v.label_after != v.label_before else ""),
             "precomputed" if v.seconds is None else f"{v.seconds:.0f} s"] for v in views]
    v = views[0]
    shown = (f"**Shown: seed {v.seed}, {v.k} of {assets().n_train:,} training images removed** "
             f"({' and '.join(sup.method_label(x.ranking) for x in views)})")
    return (gr.Image(value=v.before, label=f"before: seed {v.seed}"), *after, rows, *removed, shown, status)


def retrain_cost():
    """This machine's retrain time for the model's recipe: the last live retrain's when one ran
    here in the last RETRAIN_COST_SECONDS, else a probe of a few training steps, measured when first
    asked for and again every RETRAIN_COST_SECONDS (the machine's load changes)."""
    a = assets()
    cf = engine()
    config = cf.train_config_from_manifest(a.root)
    seen = _last_retrain.get((a.root, config))
    if seen is not None and time.time() - seen.measured_at < RETRAIN_COST_SECONDS:
        return seen
    period = int(time.time() // RETRAIN_COST_SECONDS)
    return _retrain_cost.get((a.root, config, period), lambda: sup.measure_retrain(
        a.attributor.train.images, a.attributor.scheduler, config))


def retrain_plan(seed, k, ranking_a, ranking_b) -> str:
    """What pressing 'Remove and retrain' will cost: how many retrains (precomputed results are
    instant), and how long one takes on this server, measured here."""
    a = assets()
    try:
        seed, k = sup.parse_seeds("single", seed)[0], sup.parse_removal_k(k, a.n_train)
        rankings = list(dict.fromkeys(r for r in (ranking_a, ranking_b) if r not in (None, NO_RANKING)))
        todo = [r for r in rankings if _counterfactual_cache.peek((a.root, seed, r, k)) is None
                and stored_view(a.root, (seed, r, k)) is None]
        return retrain_cost().text(len(todo))
    except (ValueError, gr.Error):
        return ""


@readable
def run_counterfactual(seed, k, ranking_a, ranking_b, request: gr.Request = None, progress=gr.Progress()):
    """Remove the target's top-k under one or two rankings, retrain, regenerate; cached per request."""
    a = assets()
    cf = engine()
    stop = RetrainGuard(request)
    seed, k = sup.parse_seeds("single", seed)[0], sup.parse_removal_k(k, a.n_train)
    allowed = registry.counterfactual_rankings(a.methods)  # the tab's menu (`sup.ranking_choices`)
    rankings = [sup.parse_method(ranking_a, allowed, "ranking A")]
    if ranking_b not in (NO_RANKING, None, ranking_a):
        rankings.append(sup.parse_method(ranking_b, allowed, "ranking B"))
    config = cf.train_config_from_manifest(a.root)
    views = []
    for j, ranking in enumerate(rankings):
        key = (seed, ranking, k)
        view = _counterfactual_cache.peek((a.root, *key)) or stored_view(a.root, key)
        if view is None:
            label = f"{sup.method_label(ranking)} ({j + 1}/{len(rankings)})"
            try:
                if stop():
                    raise Cancelled(stop.reason)
                result = cf.remove_and_retrain(a.attributor, seed, ranking, k, config=config,
                                               progress=lambda f, msg: progress(f, desc=f"{label}: {msg}"),
                                               should_stop=stop)
            except Cancelled:
                return (*[gr.update()] * 7, stop.reason or "Cancelled: the retrain was stopped; nothing was changed.")
            view = CounterfactualView.from_result(result)
            # a measurement, not a result: the next estimate on this folder and recipe uses it
            _last_retrain[(a.root, config)] = sup.RetrainCost.from_retrain(result.train_seconds, config.steps)
            _counterfactual_cache.put((a.root, *key), view)
        views.append(view)
    live = [v.seconds for v in views if v.seconds is not None]
    took = f"retrain + regenerate took {sum(live):.0f} s; repeating this request is instant" if live else "precomputed"
    return counterfactual_outputs(views, f"Seed {seed}: {k} of {a.n_train:,} training images removed per ranking ({took}).")


def _example_views(seed, k, rankings) -> list:
    return [v for v in (stored_view(current_root(), (seed, r, k)) for r in rankings) if v is not None]


def show_example(evt: gr.SelectData):
    """A click on a precomputed example (its row) -> its inputs and results, instantly. Only ranking
    A is set: ranking B keeps its own value, so the next 'Remove and retrain' runs what the controls say."""
    rows = examples(current_root())
    i = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    r = rows[sup.parse_int(i, "example row", 0, max(0, len(rows) - 1))]
    return (r["seed"], r["k"], r["rankings"][0],
            *counterfactual_outputs(_example_views(r["seed"], r["k"], r["rankings"]),
                                    f"Precomputed example: seed {r['seed']}, {r['k']} training images removed."))


def first_example():
    """What the Counterfactual tab shows on first visit: the first precomputed example (one whose
    digit changes, when there is one), the examples table and what pixel L2 distances look like."""
    rows = examples(current_root())
    if not rows:
        return (*[gr.update()] * 11, gr.update(visible=False), "")
    r = rows[0]
    views = _example_views(r["seed"], r["k"], r["rankings"])
    return (r["seed"], r["k"], r["rankings"][0],
            *counterfactual_outputs(views, f"Precomputed example: seed {r['seed']}, {r['k']} training images "
                                           "removed. Pick a sample or a seed and press **Remove and retrain** for "
                                           "your own."),
            gr.update(value=example_targets(current_root()), visible=True), l2_examples_html(current_root()))


def first_visit(done, q):
    """The Counterfactual tab opened: on this session's first visit, the first example and the
    examples table (computed here rather than when the page loads, which they would slow down).
    The controls take the example's seed only while no generated sample has been picked (a picked
    sample's seed stays in the box; the heading above the pictures says what they show)."""
    if done:
        return (*[gr.update()] * 13, True)
    out = first_example()
    if q is not None and q.seed is not None:
        out = (gr.update(), gr.update(), gr.update(), *out[3:])
    return (*out, True)


def l2_examples_html(root: str) -> str:
    """Before / after pictures of stored results with a pixel L2 near 1 and near 3."""
    found = outcomes(root)
    pairs = []
    for target, key in sup.l2_examples(found, (1.0, 3.0)):
        v = stored_view(root, key)
        seed, ranking, k = key
        pairs.append((f"pixel L2 {v.l2:.2f} (seed {seed}, {k} removed by {sup.method_label(ranking)}; "
                      f"digit {v.label_before} → {v.label_after})", v.before, v.after))
    if not pairs:
        return ""
    return ("<p>Pixel L2 is the distance between the 64 pixel values (each in [-1, 1]) before and after. "
            "Around 1 the digit is the same with a few pixels changed; around 3 strokes move and the digit often "
            "reads differently.</p>" + viz.image_pairs(pairs))


def retrain_note(a) -> str:
    """Why this folder offers no live remove-and-retrain: a setting's model (its recipe in
    model/setting.json) is retrained offline, too slow for a visitor; a model of your own has no
    recipe here."""
    marker = os.path.join(a.root, "model", "setting.json")
    if os.path.isfile(marker):
        try:
            took = f" (training it took {float(read_json(marker, 'base model description', '')['train_seconds']) / 60:.0f} " \
                   "minutes of a CPU core)"
        except (ValueError, KeyError, TypeError):
            took = ""
        return ("(No live remove-and-retrain here: one retrain of this model is beyond a visitor's patience"
                f"{took}; its LDS and counterfactuals are computed offline by resumable jobs.)")
    return "(Remove-and-retrain needs the model's training recipe, so it is offered for models trained by dtrak only.)"


@once_per_root
def offline_results(root: str) -> dict:
    """{target seed: {ranking: CounterfactualResult}} of the folder's offline counterfactual run
    (counterfactual/jobs/, each verified against its recorded checksum; the largest removal size of
    each), for a folder retrained offline (`counterfactual-own`); {} when it has none. A damaged
    job file leaves the view out and is reported in the banner."""
    from dtrak_core.errors import IntegrityError
    from dtrak_core.evaluation.counterfactual_report import load_results

    jobs = os.path.join(root, "counterfactual", "jobs")
    if not os.path.isdir(jobs):
        return {}
    try:
        rows = load_results(jobs)
    except IntegrityError as e:
        damaged_results[root] = str(e)
        return {}
    out = {}
    for r in sorted(rows, key=lambda r: r.k):  # the largest k last: it is the one kept
        out.setdefault(r.seed, {})[r.ranking] = r
    return out


def _offline_rankings(results: dict) -> list[str]:
    return sorted({rk for per in results.values() for rk in per}, key=registry.sort_key, reverse=True)  # random last


def _offline_planned(root: str) -> int | None:
    try:
        return len(read_json(os.path.join(root, "counterfactual", "removals.json"), "counterfactual removals", "")["jobs"])
    except (ValueError, KeyError, TypeError):
        return None


def offline_views(seed) -> list[tuple]:
    """(image, label) of the before image and, per ranking of the run, of the regenerated target and
    of the removed images' first 32, labelled with the pixel L2 and the class the folder's classifier
    reads; (None, why) where a ranking's retrain is not measured yet."""
    a = assets()
    results = offline_results(a.root)
    per = results.get(int(seed)) if seed is not None else None
    rankings = _offline_rankings(results)
    if not per:
        return [(None, "no such target")] * (1 + 2 * len(rankings))
    scale, value_range = a.scale(QUERY_PX), a.attributor.input_range
    first = next(iter(per.values()))
    reads = {}
    if a.classifier is not None:
        labels = a.classifier.classify(torch.stack([first.before, *(r.after for r in per.values())]).numpy())[0]
        reads = {"before": a.label_name(labels[0]), **{rk: a.label_name(lb) for rk, lb in zip(per, labels[1:])}}
    before = (to_pil(first.before, scale, value_range),
              f"before: seed {first.seed}" + (f", read as {reads['before']}" if reads else ""))
    afters, removed = [], []
    train = a.attributor.train
    for rk in rankings:
        r, name = per.get(rk), sup.method_label(rk)
        if r is None:
            afters.append((None, f"{name}: not retrained yet"))
            removed.append((None, f"{name}: not retrained yet"))
            continue
        afters.append((to_pil(r.after, scale, value_range), f"after removing {r.k} by {name}: pixel L2 {r.l2:.2f}"
                       + (f", read as {reads[rk]}" if reads else "")))
        shown = torch.as_tensor(np.asarray(r.removed_indices)[:32], dtype=torch.long)
        removed.append((grid(train.images[shown], columns=8, scale=2, value_range=train.value_range),
                        f"removed by {name}: the first {len(shown)} of {r.k}"))
    return [before, *afters, *removed]


def show_offline(seed) -> list:
    return [gr.Image(value=image, label=label) for image, label in offline_views(seed)]


def offline_ui(a) -> dict:
    """For a folder retrained offline: its precomputed counterfactuals, one target at a time; {}
    (nothing drawn) when it has none."""
    results = offline_results(a.root)
    if not results:
        return {}
    rankings = _offline_rankings(results)
    done, planned = sum(len(per) for per in results.values()), _offline_planned(a.root)
    complete = [s for s in sorted(results) if len(results[s]) == len(rankings)]
    k = max(r.k for per in results.values() for r in per.values())
    gr.Markdown(f"### Precomputed counterfactuals\nEach target's top {k} training images removed under "
                f"{', '.join(sup.method_label(rk) for rk in rankings)}, the model retrained offline without them "
                "(same recipe and seed) and the target's seed regenerated. **Pixel L2**: how far the removal moved "
                "the sample (higher = further); random removal of as many images is the reference. "
                + (f"**Provisional:** {done} of {planned} retrains are measured; the Benchmarks tab has the medians "
                   "and the paired tests." if planned and done < planned else
                   "The Benchmarks tab has the medians and the paired tests."), elem_id="cf-offline")
    target = gr.Dropdown([(f"seed {s}" + ("" if s in complete else f" ({len(results[s])} of {len(rankings)} "
                                          "rankings)"), s) for s in sorted(results)],
                         value=(complete or sorted(results))[0], label="Target", elem_id="cf-offline-target")
    views = offline_views(target.value)
    with gr.Row():
        images = [gr.Image(value=image, label=label, format="png", interactive=False, height=200, buttons=[],
                           elem_classes="pixel", min_width=110) for image, label in views[:1 + len(rankings)]]
    for image, label in views[1 + len(rankings):]:
        images.append(gr.Image(value=image, label=label, format="png", interactive=False, buttons=[],
                               elem_classes="pixel"))
    return {"cf_offline_target": target, "cf_offline_images": images}


def create_offline_handlers(c: dict, bind) -> None:
    if "cf_offline_target" in c:
        c["cf_offline_target"].change(bind(show_offline), c["cf_offline_target"], c["cf_offline_images"],
                                      queue=False, show_progress="hidden")


def create_ui(a) -> dict:
    """The tab's components (inside a gr.Tab)."""
    rankings = sup.ranking_choices(a.methods)  # exactly what "Remove and retrain" accepts; the default first
    default_ranking = rankings[0][1]
    n_train = a.n_train
    gr.Markdown("Remove a generated sample's top proponents from the training set, retrain the model "
                "from scratch with the same recipe, and regenerate the same seed (DDIM 50 steps, as "
                "published). If the attribution is right, the digit changes more than when removing as "
                "many random images (**pixel L2**, higher = a bigger change). One retrain runs at a time "
                "on this server; others wait in the queue (their position is shown).")
    with gr.Row():
        with gr.Column(scale=1, min_width=260):
            cf_seed = gr.Number(0, precision=0, label="Target seed (set by clicking a sample)")
            cf_k = gr.Slider(1, max(1, n_train // 2), max(1, n_train // 5), step=1, label="Training images to remove")
            rank_a = gr.Dropdown(rankings, value=default_ranking, label="Ranking A")
            # random beside the ranking by default: one L2 alone says nothing (its cost is in the estimate)
            rank_b = gr.Dropdown(rankings + [("none", NO_RANKING)], value="random" if "random" in dict(rankings).values() else NO_RANKING,
                                 label="Ranking B (side by side; each one is a retrain)")
            cf_estimate = gr.Markdown(elem_id="cf-estimate")
            with gr.Row():
                run_btn = gr.Button("Remove and retrain", variant="primary")
                cancel_btn = gr.Button("Cancel", variant="stop")
            cf_status = gr.Markdown(elem_id="cf-status")
        with gr.Column(scale=3, elem_id="cf-results"):
            cf_progress = gr.HTML(elem_id="cf-progress")
            cf_shown = gr.Markdown(elem_id="cf-shown")
            with gr.Row():
                before_img = gr.Image(label="before", format="png", interactive=False, height=200,
                                      buttons=[], elem_classes="pixel", min_width=110)
                after_a = gr.Image(label="after (ranking A)", format="png", interactive=False,
                                   height=200, buttons=[], elem_classes="pixel", min_width=110)
                after_b = gr.Image(label="after (ranking B)", format="png", interactive=False,
                                   height=200, buttons=[], elem_classes="pixel", min_width=110)
            cf_table = gr.Dataframe(headers=CF_HEADERS, interactive=False, label="before vs after",
                                    elem_id="cf-table", wrap=True, column_widths=CF_WIDTHS)
            with gr.Row():
                removed_a = gr.Image(label="removed by ranking A", format="png", interactive=False,
                                     buttons=[], elem_classes="pixel", height=170, min_width=240)
                removed_b = gr.Image(label="removed by ranking B", format="png", interactive=False,
                                     buttons=[], elem_classes="pixel", height=170, min_width=240)
    cf_examples = gr.Dataframe(headers=EXAMPLE_HEADERS, interactive=False, visible=False, wrap=True,
                               label="Precomputed examples (click a row: instant)", elem_id="cf-examples",
                               max_height=420, column_widths=EXAMPLE_WIDTHS)
    with gr.Accordion("What a pixel L2 of 1 or 3 looks like", open=False):
        l2_html = gr.HTML(elem_id="l2-examples")
    return dict(cf_seed=cf_seed, cf_k=cf_k, rank_a=rank_a, rank_b=rank_b, cf_estimate=cf_estimate, run_btn=run_btn,
                cancel_btn=cancel_btn, cf_status=cf_status, cf_progress=cf_progress, cf_shown=cf_shown,
                before_img=before_img, after_a=after_a, after_b=after_b, cf_table=cf_table, removed_a=removed_a,
                removed_b=removed_b, cf_examples=cf_examples, l2_html=l2_html)


def follow_method(method, ranking):
    """Ranking A follows the Attribute tab's method when the retrain accepts it."""
    allowed = registry.counterfactual_rankings(assets().methods)
    return method if method in allowed and method != "random" else ranking


def create_event_handlers(c: dict, bind) -> None:
    """c: the page's components (with the tab `cf_tab`, the Attribute tab's `method` and the states
    `query`, `cf_visited`); bind(fn): fn run on this page's folder."""
    c["method"].change(bind(follow_method), [c["method"], c["rank_a"]], c["rank_a"], queue=False,
                       show_progress="hidden")
    cf_outputs = [c[n] for n in ("before_img", "after_a", "after_b", "cf_table", "removed_a", "removed_b", "cf_shown",
                                 "cf_status")]
    plan_inputs = [c["cf_seed"], c["cf_k"], c["rank_a"], c["rank_b"]]
    run_event = c["run_btn"].click(bind(run_counterfactual), plan_inputs, cf_outputs, concurrency_id="retrain",
                                   concurrency_limit=1, show_progress_on=[c["cf_progress"]], js=DIM_RESULTS_JS)
    run_event.then(None, js=UNDIM_RESULTS_JS)
    c["cancel_btn"].click(cancel_retrain, None, c["cf_status"], cancels=[run_event], queue=False, js=UNDIM_RESULTS_JS)
    plan = bind(retrain_plan)
    for control in plan_inputs:
        control.change(plan, plan_inputs, c["cf_estimate"], queue=False, show_progress="hidden")
    c["cf_tab"].select(plan, plan_inputs, c["cf_estimate"], queue=False, show_progress="hidden")
    run_event.then(plan, plan_inputs, c["cf_estimate"], queue=False, show_progress="hidden")
    c["cf_examples"].select(bind(show_example), None, [c["cf_seed"], c["cf_k"], c["rank_a"], *cf_outputs], queue=False)
    c["cf_tab"].select(bind(first_visit), [c["cf_visited"], c["query"]],
                       [c["cf_seed"], c["cf_k"], c["rank_a"], *cf_outputs, c["cf_examples"], c["l2_html"],
                        c["cf_visited"]], queue=False)
