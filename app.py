"""D-TRAK explorer: generate digits with the embedded diffusion model, see which training images
made them, and check by removing those images and retraining.

    python app.py                          # http://127.0.0.1:7860, assets from ./assets
    DTRAK_ASSETS=path/to/assets python app.py

Layout and thin handlers only: every computation is a `dtrak_core` call. The model, training set
and feature stores are loaded once per process (`load_assets`) and shared by all sessions;
per-user selections live in `gr.State`.

Many visitors at once: handlers share only read-only state (the model is run read-only; the
gradient engines work on private replicas, see `dtrak_core.shared`) and caches keyed by the whole
request (`OnceCache`: built once, identical for everyone). The queue is bounded per session and per
client address, a retrain stops when its visitor leaves, cancels or runs past a time limit, and
the upload cache is swept.
"""
from __future__ import annotations

import html
import io
import os
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import dtrak_core  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads)
import gradio as gr
import numpy as np
import plotly.graph_objects as go
import torch

from dtrak_core import app_support as sup
from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.attributor import Attribution, Attributor
from dtrak_core.build import read_manifest
from dtrak_core.images import MAX_UPLOAD_BYTES, grid, load_user_image, to_pil
from dtrak_core.evaluation.quality import classify
from dtrak_core.model.sampling import generate
from dtrak_core.shared import OnceCache
from dtrak_core.errors import Cancelled

ASSETS = os.environ.get("DTRAK_ASSETS", "assets")
QUERY_PX, THUMB_PX = 192, 64  # display sizes; images are upscaled by whole factors (crisp pixels)
DEFAULT_K = 8
MAX_K = sup.MAX_TOP_K
NO_RANKING = "none"
PROPONENT, OPPONENT, NEUTRAL = "#16a34a", "#dc2626", "#94a3b8"

# Limits for a public server (environment variables override them)
MAX_PENDING_PER_SESSION = int(os.environ.get("DTRAK_MAX_PENDING_PER_SESSION", 4))  # queued + running
MAX_PENDING_PER_CLIENT = int(os.environ.get("DTRAK_MAX_PENDING_PER_CLIENT", 12))  # per address, all its sessions
MAX_RETRAIN_SECONDS = float(os.environ.get("DTRAK_MAX_RETRAIN_SECONDS", 900))  # wall time of one retrain request
CACHE_SWEEP = (600, 1800)  # every 10 min, delete uploads and outputs older than 30 min


# ---------------------------------------------------------------- shared state (one per process)

@dataclass
class Assets:
    root: str
    attributor: Attributor
    methods: list  # every method that can run here: TRAK family (one per store) and baselines
    unavailable: dict  # {baseline: why it cannot run here}
    damaged: dict  # {baseline: the damaged file that stops it} (a subset of `unavailable`)

    @property
    def n_train(self) -> int:
        return len(self.attributor.train)

    @property
    def digits(self) -> bool:
        """The embedded digits model (or one like it): the digit classifier applies."""
        return self.attributor.train.name.startswith("digits") and tuple(self.attributor.train.images.shape[1:]) == (1, 8, 8)

    @property
    def can_retrain(self) -> bool:
        """Remove-and-retrain needs the recipe the model was trained with (models trained by dtrak)."""
        return self.digits and "train_config" in read_manifest(self.root)

    @property
    def class_word(self) -> str:
        return "digit" if self.digits else "class"

    def scale(self, px: int) -> int:
        return max(1, px // int(self.attributor.unet.config.sample_size))


@lru_cache(maxsize=None)
def load_assets(root: str) -> Assets:
    """The model folder, loaded once; raises ValueError with a readable reason when missing."""
    attributor = Attributor.load(root)
    if attributor.methods:  # build the default method's featurizer and scorer now, not on the first click
        cfg = attributor.unet.config
        attributor.scores(torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size), sup.method_choices(attributor.methods)[0][1])
    problems = registry.problems(attributor, root)
    methods = list(attributor.methods) + [m.name for m in registry.all("baseline") if m.name not in problems]
    return Assets(root, attributor, methods, {m: str(e) for m, e in problems.items()},
                  {m: str(e) for m, e in problems.items() if not isinstance(e, registry.MethodUnavailable)})


def assets() -> Assets:
    try:
        return load_assets(ASSETS)
    except (ValueError, OSError) as e:
        raise gr.Error(f"The model assets could not be loaded: {e}") from None


# Results keyed by the whole request, so they are the same for every visitor who asks
_samples_cache = OnceCache(64)  # (seeds, steps) -> images (B, C, H, W)
_attribution_cache = OnceCache(256)  # (QueryKey, method) -> Attribution
_counterfactual_cache = OnceCache(64)  # (seed, ranking, k) -> CounterfactualView
_cancelled_at: dict[str, float] = {}  # session -> time.monotonic() of its last Cancel
_cancel_lock = threading.Lock()


def _counterfactual():
    """The counterfactual core, imported at call time so the rest of the app works without it."""
    try:
        from dtrak_core.evaluation import counterfactual
    except ImportError as e:
        raise gr.Error(f"The counterfactual engine (dtrak_core.evaluation.counterfactual) is not available: {e}") from None
    return counterfactual


def readable(fn):
    """Turn a core ValueError into a message in the UI (never a stack trace)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise gr.Error(str(e)) from None
    return wrapper


# ---------------------------------------------------------------- formatting

def sample_query(seed: int, steps: int, pixels: np.ndarray) -> dict:
    return {"key": sup.QueryKey.for_sample(seed, steps), "pixels": pixels, "seed": int(seed), "steps": int(steps),
            "title": f"Generated sample, seed {int(seed)} (DDIM {int(steps)} steps)"}


def digit_labels(images: np.ndarray):
    """(labels, confidences) from the digit classifier, or None when the model is not a digits model."""
    return classify(images) if assets().digits else None


def classifier_text(pixels: np.ndarray) -> str:
    found = digit_labels(pixels[None])
    return "" if found is None else f"looks like a **{found[0][0]}** ({found[1][0]:.0%} by the digit classifier)"


def png_data_uri(img) -> str:
    import base64

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def training_cards(attribution, indices, title: str) -> str:
    """Training images as an HTML grid of cards: the pixels (nearest-neighbour) with index, label
    and score underneath (gallery captions would cover the image and get cut off)."""
    train = assets().attributor.train
    cards = []
    for i in indices:
        score = attribution.scores[i]
        cards.append(
            f'<figure class="card"><img src="{png_data_uri(to_pil(train.images[i], assets().scale(THUMB_PX)))}" '
            f'alt="training image {i}"><figcaption><b>#{i}</b><br>'
            f'{f"{assets().class_word} {attribution.labels[i]}<br>" if attribution.labels[i] >= 0 else ""}'
            f'<span class="{"pos" if score >= 0 else "neg"}">{score:+.3g}</span></figcaption></figure>')
    return f'<div class="cards-title">{html.escape(title)}</div><div class="cards">{"".join(cards)}</div>'


def score_histogram(attribution, k: int) -> go.Figure:
    scores = attribution.scores
    prop, opp = attribution.proponents(k), attribution.opponents(k)
    fig = go.Figure()
    fig.add_histogram(x=scores, nbinsx=80, marker_color=NEUTRAL, name="all training images",
                      hovertemplate="score %{x}<br>%{y} images<extra></extra>")
    for idx, color, name in ((prop, PROPONENT, f"top-{k} proponents"), (opp, OPPONENT, f"top-{k} opponents")):
        fig.add_scatter(x=scores[idx], y=np.zeros(len(idx)), mode="markers", name=name, customdata=idx,
                        marker=dict(color=color, size=11, symbol="triangle-up", line=dict(width=1, color="white")),
                        hovertemplate="#%{customdata}<br>score %{x:.4g}<extra></extra>")
    lo, hi = sup.top_k_thresholds(scores, k)
    fig.add_vline(x=hi, line=dict(color=PROPONENT, dash="dash", width=1))
    fig.add_vline(x=lo, line=dict(color=OPPONENT, dash="dash", width=1))
    fig.update_layout(template="plotly_white", height=320, margin=dict(l=10, r=10, t=40, b=10), bargap=0.05,
                      xaxis_title=f"attribution score ({len(scores):,} training images)", yaxis_title="images",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0))
    return fig


def class_mass_figure(attribution, word: str = "digit") -> go.Figure:
    fig = go.Figure()
    layout = dict(template="plotly_white", height=320, margin=dict(l=10, r=10, t=40, b=10))
    if (attribution.labels < 0).any():
        fig.add_annotation(text="The training images have no class labels<br>(one sub-folder per class gives them)",
                           showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(**layout, xaxis=dict(visible=False), yaxis=dict(visible=False))
        return fig
    mass = sup.class_mass(attribution.scores, attribution.labels)
    classes = [str(c) for c in range(len(mass["count"]))]
    base = mass["count"] / mass["count"].sum()
    fig.add_bar(x=classes, y=mass["positive"], name="proponent mass", marker_color=PROPONENT,
                hovertemplate=word + " %{x}: %{y:.1%} of the positive score<extra></extra>")
    fig.add_bar(x=classes, y=mass["negative"], name="opponent mass", marker_color=OPPONENT,
                hovertemplate=word + " %{x}: %{y:.1%} of the negative score<extra></extra>")
    fig.add_scatter(x=classes, y=base, mode="markers", name="share of training set",
                    marker=dict(symbol="line-ew-open", size=22, color="#334155", line=dict(width=2)),
                    hovertemplate=word + " %{x}: %{y:.1%} of the training images<extra></extra>")
    fig.update_layout(**layout, barmode="group", xaxis_title=f"training {word}",
                      yaxis=dict(tickformat=".0%", title="share of the mass"),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0))
    return fig


def method_description(name: str) -> str:
    return registry.description(name)


def methods_markdown(methods, unavailable) -> str:
    lines = ["## Methods in this app", "", "| method | scores by |", "|---|---|"]
    lines += [f"| {sup.method_label(m)} | {method_description(m)} |" for m in methods]
    if unavailable:
        lines += ["", "Not available with these assets:", ""]
        lines += [f"- **{m}**: {why}" for m, why in unavailable.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- handlers: generate

@readable
def generate_samples(mode, seed, start, end, count, steps, progress=gr.Progress()):
    """Seeds + DDIM steps -> gallery items and the batch (kept in session state)."""
    a = assets()
    seeds = sup.parse_seeds(mode, seed, start, end, count)
    steps = sup.parse_steps(steps)
    images = samples(seeds, steps, progress=lambda i, n: progress((i, n), desc="DDIM sampling"))
    found = digit_labels(images.numpy())
    captions = [f"seed {s}" + ("" if found is None else f": {found[0][i]}") for i, s in enumerate(seeds)]
    items = [(to_pil(img, a.scale(2 * THUMB_PX)), c) for img, c in zip(images, captions)]
    return items, {"seeds": seeds, "steps": steps, "images": images.numpy()}


def samples(seeds, steps: int, progress=None) -> torch.Tensor:
    """The DDIM samples (B, C, H, W) of these seeds, computed once per (seeds, steps)."""
    a = assets()
    return _samples_cache.get((tuple(seeds), steps), lambda: generate(
        a.attributor.unet, a.attributor.scheduler, seeds, steps=steps, progress=progress))


def select_sample(batch, evt: gr.SelectData):
    """A click on a gallery item -> it becomes the query; switch to the Attribute tab."""
    if not batch or evt.index is None:
        raise gr.Error("Generate samples first, then click one.")
    i = evt.index if isinstance(evt.index, int) else evt.index[0]
    q = sample_query(batch["seeds"][i], batch["steps"], batch["images"][i])
    return (q, gr.Tabs(selected="attribute"), *query_view(q), q["seed"])


def query_view(q):
    return to_pil(torch.as_tensor(q["pixels"]), assets().scale(QUERY_PX)), f"**{q['title']}**  \n{classifier_text(q['pixels'])}"


# ---------------------------------------------------------------- handlers: attribute

def attribution_for(q, method: str) -> Attribution:
    """Scores of any method (TRAK family or baseline) for a query, cached per (query, method)."""
    a = assets()
    method = sup.parse_method(method, a.methods)

    def compute():
        seeds = None if q["seed"] is None else [q["seed"]]  # journey-trak follows the sample's own trajectory
        scores = registry.scores(a.attributor, method, torch.as_tensor(q["pixels"])[None], seeds, root=a.root)[0]
        return Attribution(method, scores, a.attributor.train.labels.numpy())
    # the pixels too: a seed's sample differs in the last bits with the batch it was generated in
    return _attribution_cache.get((q["key"], sup.QueryKey.for_pixels(q["pixels"]), method), compute)


@readable
def attribute(q, method, k, progress=gr.Progress()):
    """Query + method -> proponents, opponents, histogram, per-class mass, summary."""
    if q is None:
        raise gr.Error("No query yet: generate samples and click one, or upload an image.")
    k = sup.parse_top_k(k)
    progress(0, desc=f"attributing with {sup.method_label(method)}")
    result = attribution_for(q, method)
    prop = result.proponents(k)
    found = digit_labels(q["pixels"][None])
    same = (" and opponents are below" if found is None else
            f" include **{int((result.labels[prop] == found[0][0]).sum())} of {k}** training images of the digit "
            f"the classifier sees")
    summary = (f"**{sup.method_label(method)}** ({method_description(method)}) on the query ({q['title']}): its "
               f"top-{k} proponents{same}.")
    return (training_cards(result, prop, f"Top-{k} proponents (index · training label · score)"),
            training_cards(result, result.opponents(k), f"Top-{k} opponents"),
            score_histogram(result, k), class_mass_figure(result, assets().class_word), summary)


@readable
def attribute_seed(seed: int, steps: int = 50, method: str = "square", k: int = 8) -> dict:
    """Attribute the generated sample of one seed (DDIM, `steps` steps) with `method`: its top-k
    proponents and opponents among the training images, as JSON."""
    a = assets()
    seed = sup.parse_seeds("single", seed)[0]
    steps, k = sup.parse_steps(steps), sup.parse_top_k(k)
    pixels = samples([seed], steps)[0].numpy()
    result = attribution_for(sample_query(seed, steps, pixels), method)
    found = digit_labels(pixels[None])
    query = {"seed": seed, "steps": steps} | ({} if found is None else {"label": int(found[0][0])})
    return {**result.table(k), "query": query, "n_train": a.n_train}


@readable
def compare(q, method_a, method_b, k, progress=gr.Progress()):
    """Two methods on the same query: both top-k grids, their overlap and rank correlation."""
    if q is None:
        raise gr.Error("No query yet: generate samples and click one, or upload an image.")
    k = sup.parse_top_k(k)
    progress(0, desc="attributing with both methods")
    ra, rb = attribution_for(q, method_a), attribution_for(q, method_b)
    overlap = sup.top_k_overlap(ra.scores, rb.scores, k)
    rho = sup.rank_correlation(ra.scores, rb.scores)
    text = (f"**{sup.method_label(method_a)}** vs **{sup.method_label(method_b)}**: "
            f"top-{k} overlap **{overlap} of {k}**; Spearman rank correlation of all "
            f"{len(ra.scores):,} scores **ρ = {rho:.3f}**.")
    return (training_cards(ra, ra.proponents(k), f"{sup.method_label(method_a)}: top-{k} proponents"),
            training_cards(rb, rb.proponents(k), f"{sup.method_label(method_b)}: top-{k} proponents"),
            text)


@readable
def use_upload(path, invert):
    """An uploaded file -> validated, converted query (shown upscaled), or a readable error."""
    if not path:
        return gr.update(), gr.update(), gr.update()
    unet = assets().attributor.unet
    try:
        image = load_user_image(path, unet.config.sample_size, unet.config.in_channels, invert=bool(invert))
    except ValueError as e:
        raise gr.Error(f"Could not use {os.path.basename(path)}: {e}", title="Not a usable image") from None
    pixels = image.numpy()
    q = {"key": sup.QueryKey.for_pixels(pixels), "pixels": pixels, "seed": None, "steps": None,
         "title": f"Your image {os.path.basename(path)}{' (inverted)' if invert else ''}, "
                  f"as the model sees it ({pixels.shape[-1]}x{pixels.shape[-2]})"}
    return (q, *query_view(q))


# ---------------------------------------------------------------- handlers: counterfactual

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
        scale = assets().scale(QUERY_PX)
        return cls(r.seed, r.ranking, r.k, to_pil(r.before, scale), to_pil(r.after, scale),
                   np.asarray(r.removed_indices), r.l2, r.label_before, r.confidence_before, r.label_after,
                   r.confidence_after, r.train_seconds if live else None, "live" if live else "precomputed")

    @classmethod
    def from_gallery(cls, e: dict) -> "CounterfactualView":
        from PIL import Image

        def load(path):
            img = Image.open(path).convert("L")
            return img.resize((img.width * assets().scale(QUERY_PX), img.height * assets().scale(QUERY_PX)),
                              Image.Resampling.NEAREST)
        return cls(int(e["seed"]), e["ranking"], int(e["k"]), load(e["before_png"]), load(e["after_png"]),
                   np.asarray(e["removed_indices"]), float(e["l2"]), int(e["label_before"]),
                   float(e["confidence_before"]), int(e["label_after"]), float(e["confidence_after"]), None,
                   "precomputed")


@lru_cache(maxsize=None)
def precomputed(root: str) -> dict:
    """(seed, ranking, k) -> CounterfactualView for every gallery entry shipped under the assets."""
    return {(v.seed, v.ranking, v.k): v for v in map(CounterfactualView.from_gallery, sup.counterfactual_gallery(root))}


@lru_cache(maxsize=None)
def committed(root: str) -> dict:
    """(seed, ranking, k) -> job file of the counterfactual harness's finished jobs under the assets
    that a live retrain here would reproduce (same model, recipe and stores); {} otherwise."""
    from dtrak_core.errors import IntegrityError

    try:
        cf = _counterfactual()
        return cf.committed_results(load_assets(root).attributor, os.path.join(root, "counterfactual", "jobs"),
                                    cf.train_config_from_manifest(root))
    except IntegrityError as e:  # damaged, not absent: shown in the banner, never silently dropped
        _damaged_results[root] = str(e)
        return {}
    except (gr.Error, ValueError, OSError):
        return {}


_damaged_results: dict[str, str] = {}  # root -> why its precomputed counterfactual results cannot be used


def stored_view(root: str, key: tuple) -> CounterfactualView | None:
    """A finished result for (seed, ranking, k) without retraining: the gallery's, else the harness's."""
    view = precomputed(root).get(key)
    if view is None and key in committed(root):
        view = CounterfactualView.from_result(_counterfactual().load_job(committed(root)[key]), live=False)
    return view


def example_targets(root: str) -> list[list]:
    """Rows for the examples table: one per precomputed (seed, k) with its rankings (D-TRAK first);
    the gallery's first, then every other target the harness finished."""
    groups = {}
    for seed, ranking, k in [*precomputed(root), *committed(root)]:
        groups.setdefault((seed, k), set()).add(ranking)
    order = {"square": 0, "loss": 1, "random": 9}
    gallery = {(seed, k) for seed, _, k in precomputed(root)}
    return [[seed, k, *(sorted(r, key=lambda n: order.get(n, 5)) + [NO_RANKING])[:2]]
            for (seed, k), r in sorted(groups.items(), key=lambda g: (g[0] not in gallery, g[0][0], -g[0][1]))]


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def cancel_retrain(request: gr.Request = None):
    """Cancel: stops this session's retrain, running or still waiting in the queue."""
    with _cancel_lock:
        _cancelled_at[_session(request)] = time.monotonic()
    return "Cancelled: the retrain was stopped; nothing was changed."


def forget_session(request: gr.Request = None):
    """The visitor closed the page: their retrain (if any) stops."""
    cancel_retrain(request)


class RetrainGuard:
    """When a retrain request must stop: its visitor pressed Cancel after submitting it (even while
    it was still queued), closed the page or the API stream, or it ran past MAX_RETRAIN_SECONDS."""

    def __init__(self, request: gr.Request | None):
        self.session = _session(request)
        self.event = _queue_event(request)
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


def _queue_event(request: gr.Request | None):
    """The queue's record of the running retrain request of this session (None outside a server):
    Gradio marks it not alive when the visitor's stream closes."""
    session = getattr(request, "session_hash", None)
    queue = getattr(demo, "_queue", None)
    if session is None or queue is None:
        return None
    for events in list(queue.active_jobs):
        for event in events or ():
            if event.session_hash == session and event.fn.name == "run_counterfactual":
                return event
    return None


def counterfactual_outputs(views: list, status: str) -> tuple:
    """Before / after images, a table and the removed images for 1 or 2 results on the same target."""
    train = assets().attributor.train
    after = [gr.Image(value=v.after, label=f"after removing {v.k} by {sup.method_label(v.ranking)}") for v in views]
    removed = [gr.Image(value=grid(train.images[torch.as_tensor(v.removed[:48], dtype=torch.long)], columns=16, scale=4),
                        label=f"removed by {sup.method_label(v.ranking)}: the first {min(48, v.k)} of {v.k}")
               for v in views]
    if len(views) == 1:
        after.append(gr.Image(value=None, label="after (no second ranking)"))
        removed.append(gr.Image(value=None, label="(no second ranking)"))
    rows = [[sup.method_label(v.ranking), v.k, round(v.l2, 3), f"{v.label_before} ({v.confidence_before:.0%})",
             f"{v.label_after} ({v.confidence_after:.0%})", "yes" if v.label_after != v.label_before else "no",
             "precomputed" if v.seconds is None else f"{v.seconds:.0f} s"] for v in views]
    return (gr.Image(value=views[0].before, label=f"before: seed {views[0].seed}"), *after, rows, *removed, status)


@readable
def run_counterfactual(seed, k, ranking_a, ranking_b, request: gr.Request = None, progress=gr.Progress()):
    """Remove the target's top-k under one or two rankings, retrain, regenerate; cached per request."""
    a = assets()
    cf = _counterfactual()
    stop = RetrainGuard(request)
    seed, k = sup.parse_seeds("single", seed)[0], sup.parse_removal_k(k, a.n_train)
    allowed = [*a.attributor.methods, "random"]
    rankings = [sup.parse_method(ranking_a, allowed, "ranking A")]
    if ranking_b not in (NO_RANKING, None, ranking_a):
        rankings.append(sup.parse_method(ranking_b, allowed, "ranking B"))
    config = cf.train_config_from_manifest(a.root)
    views = []
    for j, ranking in enumerate(rankings):
        key = (seed, ranking, k)
        view = _counterfactual_cache.peek(key) or stored_view(a.root, key)
        if view is None:
            label = f"{sup.method_label(ranking)} ({j + 1}/{len(rankings)})"
            try:
                if stop():
                    raise Cancelled(stop.reason)
                result = cf.remove_and_retrain(a.attributor, seed, ranking, k, config=config,
                                               progress=lambda f, msg: progress(f, desc=f"{label}: {msg}"),
                                               should_stop=stop)
            except Cancelled:
                return (*[gr.update()] * 6, stop.reason or "Cancelled: the retrain was stopped; nothing was changed.")
            view = CounterfactualView.from_result(result)
            _counterfactual_cache.put(key, view)
        views.append(view)
    live = [v.seconds for v in views if v.seconds is not None]
    took = f"retrain + regenerate took {sum(live):.0f} s; repeating this request is instant" if live else "precomputed"
    return counterfactual_outputs(views, f"Seed {seed}: {k} of {a.n_train:,} training images removed per ranking ({took}).")


def show_example(evt: gr.SelectData):
    """A click on a precomputed example -> its inputs and results, instantly."""
    seed, k, label_a, label_b = evt.row_value
    names = {sup.method_label(n): n for n in [*assets().methods, "random", NO_RANKING]}
    seed, k, ranking_a, ranking_b = int(seed), int(k), names.get(label_a, label_a), names.get(label_b, label_b)
    views = [v for v in (stored_view(ASSETS, (seed, r, k)) for r in (ranking_a, ranking_b)) if v is not None]
    return (seed, k, ranking_a, ranking_b,
            *counterfactual_outputs(views, f"Precomputed example: seed {seed}, {k} training images removed."))


def first_example():
    """What the Counterfactual tab shows on first visit: the first precomputed example, if any."""
    rows = example_targets(ASSETS)
    if not rows:
        return (*[gr.update()] * 11,)
    seed, k, ranking_a, ranking_b = rows[0]
    views = [v for v in (stored_view(ASSETS, (seed, r, k)) for r in (ranking_a, ranking_b)) if v is not None]
    return (seed, k, ranking_a, ranking_b,
            *counterfactual_outputs(views, f"Precomputed example: seed {seed}, {k} training images removed. "
                                           "Pick a sample or a seed and press **Remove and retrain** for your own."))


# ---------------------------------------------------------------- layout

HEADER = """# D-TRAK explorer
Which training images made this digit? A small diffusion model trained on 1,500 8x8 digits;
**TRAK** and **D-TRAK** scores say how much each training image is responsible for a generated
(or uploaded) image. Pick a sample in **Generate**, read its attribution in **Attribute**, and test
it in **Counterfactual** by removing the top proponents and retraining."""


def header_markdown(a: Assets | None) -> str:
    """The digits default's header, or one that describes the user's own model folder."""
    if a is None or a.digits:
        return HEADER
    manifest = read_manifest(a.root)
    c, h, w = a.attributor.train.images.shape[1:]
    source = manifest.get("model_source", manifest.get("checkpoint", "?"))
    data = manifest.get("dataset", {})
    data = data.get("folder", "?") if isinstance(data, dict) else data
    return (f"# D-TRAK explorer\nWhich training images made this image? Model `{source}` ({w}x{h}, {c} channel"
            f"{'s' if c > 1 else ''}), trained on the {a.n_train:,} images of `{data}`. **TRAK** and **D-TRAK** "
            "scores say how much each training image is responsible for a generated (or uploaded) image. Pick a "
            "sample in **Generate** and read its attribution in **Attribute**. (Remove-and-retrain needs the "
            "model's training recipe, so it is offered for models trained by dtrak only.)")

ABOUT = r"""
## What the scores are

Both methods give every training image $x_i$ a score for a query image $x$: a first-order
estimate of how much training on $x_i$ made the model produce $x$.

**Features.** For an output function $f$, a sample's feature is a random projection of the
gradient of $f$ with respect to all model parameters $\theta$, averaged over $K$ timesteps
$t \in \{0, \tfrac{1000}{K}, 2\tfrac{1000}{K}, \dots\}$:

$$\phi(x) = P^\top \frac{1}{K}\sum_t \nabla_\theta f(x, t; \theta), \qquad x_t = \sqrt{\bar\alpha_t}\,x + \sqrt{1-\bar\alpha_t}\,\epsilon .$$

**Scores.** With the training features stacked in $\Phi$ ($N \times k$):

$$\tau(x, x_i) = \phi(x)^\top \left(\Phi^\top\Phi + \lambda I\right)^{-1} \phi(x_i).$$

A high score marks a *proponent* (removing it would make $x$ less likely), a very negative one an *opponent*.

**TRAK vs D-TRAK.** They differ only in $f$:

| method | output function $f(x, t)$ |
|---|---|
| TRAK | $\lVert \epsilon - \epsilon_\theta(x_t, t) \rVert^2$ (the training loss) |
| D-TRAK | $\lVert \epsilon_\theta(x_t, t) \rVert^2$ (the *square* of the predicted noise) |

D-TRAK's finding (Zheng et al., *Intriguing Properties of Data Attribution on Diffusion Models*,
ICLR 2024) is that the theoretically motivated loss is **not** the best choice: the square and
other variants attribute better, as measured by the linear datamodeling score (LDS) and by
removing the top proponents and retraining (the Counterfactual tab).
"""

ABOUT_DEFAULT = r"""
**This app.** The model is a diffusers UNet trained from scratch on scikit-learn's digits; the
projection is a sparse Johnson-Lindenstrauss transform; $\lambda$ is the value that was best on the
validation digits' LDS (recorded in `assets/manifest.json`; without it, 0.1 times the mean squared
training feature norm). The counterfactual rankings always use that data-free rule, so they do not
depend on the LDS data. Everything runs on a CPU.
"""

CSS = """
img { image-rendering: pixelated; }
.cards-title { font-weight: 600; margin: 4px 0 6px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(86px, 1fr)); gap: 10px; }
.card { margin: 0; text-align: center; }
.card img { width: 100%; border-radius: 4px; display: block; }
.card figcaption { font-size: 12px; line-height: 1.3; margin-top: 3px; font-variant-numeric: tabular-nums; }
.card .pos { color: #15803d; } .card .neg { color: #b91c1c; }
.pixel img { padding-top: 2.4em; box-sizing: border-box; }
#summary, #cf-status { min-height: 2.5em; }
"""


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def _table(rows: list[dict], label: str) -> None:
    headers = list(dict.fromkeys(h for r in rows for h in r))
    gr.Dataframe(value=[[r.get(h, "") for h in headers] for r in rows], headers=headers, label=label,
                 interactive=False, wrap=True)


def lds_chart(rows: list[dict]) -> go.Figure:
    fig = go.Figure()
    for test_set in dict.fromkeys(r["test set"] for r in rows):
        sub = [r for r in rows if r["test set"] == test_set]
        fig.add_bar(x=[r["method"] for r in sub], y=[r["LDS (honest lambda)"] for r in sub], name=test_set,
                    error_y=dict(type="data", array=[r["+- (honest)"] for r in sub]))
    fig.update_layout(template="plotly_white", height=320, margin=dict(l=10, r=10, t=40, b=10), barmode="group",
                      yaxis_title="LDS x 100 (honest lambda)",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0))
    return fig


def counterfactual_chart(summary: dict) -> go.Figure:
    """Per removal size and ranking, the distribution of before/after pixel L2 over the targets: a
    box (median, quartiles) with every target as a point."""
    fig = go.Figure()
    cells = summary.get("cells", [])
    for k in sorted({c["k"] for c in cells}, reverse=True):
        x, y, text = [], [], []
        for c in (c for c in cells if c["k"] == k):
            for t in c.get("per_target", []):
                x.append(c.get("method", c["ranking"]))
                y.append(t["l2"])
                text.append(f"seed {t['seed']}: label {t['label_before']} -> {t['label_after']}")
        fig.add_box(x=x, y=y, text=text, name=f"{k} removed", boxpoints="all", jitter=0.4, pointpos=0,
                    marker=dict(size=4), hovertemplate="%{text}<br>L2 %{y:.2f}<extra></extra>")
    methods = list(dict.fromkeys(c.get("method", c["ranking"]) for c in cells))
    order = {"Random": 0, "TRAK": 1, "D-TRAK": 3}  # as in the paper's table; other rankings in between
    fig.update_xaxes(categoryorder="array", categoryarray=sorted(methods, key=lambda m: order.get(m, 2)))
    fig.update_layout(template="plotly_white", height=340, margin=dict(l=10, r=10, t=40, b=10), boxmode="group",
                      yaxis_title="pixel L2, before vs after (one point per target)",
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0))
    return fig


def _digits_root(root: str) -> bool:
    try:
        return load_assets(root).digits
    except (ValueError, OSError):
        return True  # nothing loadable: the default's instructions apply


def benchmarks_blocks(root: str) -> None:
    """The LDS and counterfactual results under `root` (tables, charts, the harnesses' reports) and
    any other assets/benchmarks/*.json as generic tables; an empty state when there are none."""
    bench, cf_dir = os.path.join(root, "benchmarks"), os.path.join(root, "counterfactual")
    items = {i["name"]: i for i in sup.read_benchmarks(bench)}
    cf_items = {i["name"]: i for i in sup.read_benchmarks(cf_dir)}
    lds, cf_summary = items.pop("lds_results", None), cf_items.get("summary")
    shown = False
    if lds is not None and lds.get("data"):
        shown = True
        gr.Markdown("## Linear datamodeling score (LDS)")
        data = lds["data"]
        if data.get("partial"):
            gr.Markdown(f"**Provisional:** only {data.get('subsets_done')} of {data.get('subsets_planned')} "
                        "retrained subsets were finished when these numbers were written.")
        rows = sup.lds_rows(data)
        if rows:
            _table(rows, "LDS x 100, mean over test samples, +- bootstrap over subsets")
            gr.Plot(lds_chart(rows), show_label=False)
    tables = items.pop("tables", None)
    if tables is not None and tables.get("data"):
        shown = True
        gr.Markdown("## LDS of every method: baselines, output functions x K, ensembles")
        if tables.get("markdown"):
            gr.Markdown(tables["markdown"].split("\n", 1)[-1])  # without its own title
        rows = sup.table_rows(tables["data"].get("methods", {}))
        if rows:
            gr.Plot(lds_chart(rows), show_label=False)
    if cf_summary is not None and cf_summary.get("data"):
        shown = True
        gr.Markdown("## Counterfactual: remove the top proponents and retrain")
        report = _read_text(os.path.join(cf_dir, "results.md"))
        if report:
            gr.Markdown(report)
        if cf_summary["data"].get("cells"):
            gr.Plot(counterfactual_chart(cf_summary["data"]), show_label=False)
    for item in items.values():  # any other benchmark file, as generic tables
        shown = True
        with gr.Accordion(item["name"], open=False):
            if "error" in item:
                gr.Markdown(f"Could not read `{item['error']}`")
                continue
            for path, rows in sup.records(item["data"]):
                _table(rows, path)
                fig = benchmark_chart(rows, list(dict.fromkeys(h for r in rows for h in r)), path)
                if fig is not None:
                    gr.Plot(fig, show_label=False)
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
            "produced by the evaluation harnesses (`python -m dtrak_core lds ...` writes "
            "`benchmarks/lds_results.json`, `python -m dtrak_core counterfactual ...` writes "
            "`counterfactual/summary.json`; see `python -m dtrak_core --help`); restart the app to show them.")


def benchmark_chart(rows, headers, title) -> go.Figure | None:
    """A bar chart of a table's first numeric column against its first text column, if it has both."""
    text = [h for h in headers if all(isinstance(r.get(h), str) for r in rows)]
    numeric = [h for h in headers if all(isinstance(r.get(h), (int, float)) and not isinstance(r.get(h), bool)
                                         for r in rows)]
    if not text or not numeric or len(rows) < 2:
        return None
    fig = go.Figure(go.Bar(x=[r[text[0]] for r in rows], y=[r[numeric[0]] for r in rows], marker_color="#2563eb"))
    fig.update_layout(template="plotly_white", height=280, margin=dict(l=10, r=10, t=30, b=10),
                      title=dict(text=f"{title}: {numeric[0]}", font=dict(size=13)))
    return fig


def error_page(error: str) -> gr.Blocks:
    """What the app shows when its model folder cannot be loaded: what is wrong and how to fix it."""
    with gr.Blocks(title="D-TRAK explorer", delete_cache=CACHE_SWEEP) as page:
        gr.Markdown(HEADER)
        gr.Markdown(f"## The model assets could not be loaded\n\n**Folder:** `{ASSETS}`\n\n**What is wrong:** "
                    f"{html.escape(error)}\n\n**How to fix it:** point `DTRAK_ASSETS` at a complete model folder, "
                    "restore the embedded default with `git checkout -- assets` (or `git lfs pull` if it came "
                    "without its binaries), or rebuild it with `python -m dtrak_core build-default` "
                    "(a model of your own: `python -m dtrak_core build --root FOLDER --model M --data D`). "
                    "Then restart the app.", elem_id="assets-error")
    return page


def build_demo() -> gr.Blocks:
    try:
        a = load_assets(ASSETS)
    except Exception as e:  # any damage to the folder: the page says what, instead of a dead server
        import traceback

        traceback.print_exc()
        return error_page(str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}")
    methods, ranked, n_train, unavailable = a.methods, a.attributor.methods, a.n_train, a.unavailable
    choices = sup.method_choices(methods)
    default_method = choices[0][1] if choices else None
    rankings = sup.method_choices(ranked) + [("random", "random")]  # the counterfactual retrains on TRAK-family rankings
    second = "loss" if "loss" in methods and default_method != "loss" else (choices[-1][1] if choices else None)

    with gr.Blocks(title="D-TRAK explorer", delete_cache=CACHE_SWEEP) as demo:
        batch = gr.State(None)  # the last generated batch: seeds, steps, images
        query = gr.State(None)  # the current query: key, pixels, title, seed, steps
        gr.Markdown(header_markdown(a))
        committed(ASSETS)  # (checks the precomputed counterfactual results before the banner is drawn)
        damaged = {**a.damaged, **({"precomputed counterfactuals": _damaged_results[ASSETS]}
                                   if ASSETS in _damaged_results else {})}
        if damaged:
            gr.Markdown("**Some files under the model folder are damaged**, so these parts are off until they "
                        "are restored or rebuilt:\n\n" + "\n".join(f"- **{m}**: {html.escape(why)}"
                                                                for m, why in damaged.items()),
                        elem_id="damaged")
        with gr.Tabs() as tabs:
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        mode = gr.Radio(["single", "range", "random"], value="range", label="Seeds")
                        seed = gr.Number(0, precision=0, label="Seed", visible=False)
                        with gr.Row() as range_row:
                            start = gr.Number(0, precision=0, label="First seed", min_width=100)
                            end = gr.Number(15, precision=0, label="Last seed", min_width=100)
                        count = gr.Slider(1, sup.MAX_SAMPLES, 16, step=1, label="Number of random seeds", visible=False)
                        steps = gr.Slider(1, sup.MAX_DDIM_STEPS, 50, step=1, label="DDIM steps")
                        gen_btn = gr.Button("Generate", variant="primary")
                    with gr.Column(scale=3):
                        gr.Markdown("**Samples** (seed: the digit the classifier sees). Click one to see which "
                                    "training images made it." if a.digits else
                                    "**Samples** (by seed). Click one to see which training images made it.")
                        gallery = gr.Gallery(label="Samples", show_label=False, columns=6,
                                             format="png", object_fit="contain", allow_preview=False, height="auto")
            with gr.Tab("Attribute", id="attribute"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=240):
                        query_img = gr.Image(label="Query", format="png", interactive=False, height=220,
                                             buttons=[], elem_classes="pixel")
                        query_info = gr.Markdown("No query yet: click a sample in **Generate**, or upload an image.")
                        upload = gr.File(label="Your own image (PNG, JPEG, ...)", file_types=["image"],
                                         type="filepath", height=150, elem_id="upload")
                        invert = gr.Checkbox(a.digits, label="invert (dark ink on light paper)")
                    with gr.Column(scale=3):
                        with gr.Row():
                            method = gr.Dropdown(choices, value=default_method, label="Method")
                            topk = gr.Slider(1, MAX_K, DEFAULT_K, step=1, label="Top-k shown")
                        summary = gr.Markdown(elem_id="summary")
                        prop_gallery = gr.HTML(elem_id="proponents")
                        opp_gallery = gr.HTML(elem_id="opponents")
                        with gr.Row():
                            hist = gr.Plot(label="Scores over the training set", show_label=False, elem_id="histogram")
                            mass = gr.Plot(label="Attribution mass per class", show_label=False, elem_id="class-mass")
                with gr.Accordion("Compare two methods", open=True):
                    with gr.Row():
                        method_b = gr.Dropdown(choices, value=second, label="Second method", scale=3)
                        compare_btn = gr.Button("Compare", scale=1)
                    compare_text = gr.Markdown()
                    with gr.Row():
                        gal_a = gr.HTML(elem_id="compare-a")
                        gal_b = gr.HTML(elem_id="compare-b")
            with gr.Tab("Counterfactual", id="counterfactual", visible=a.can_retrain):
                gr.Markdown("Remove a generated sample's top proponents from the training set, retrain the model "
                            "from scratch with the same recipe, and regenerate the same seed (DDIM 50 steps, as "
                            "published). If the attribution is right, the digit should change more than when "
                            "removing as many random images. One retrain runs at a time on this server; others "
                            "wait in the queue (their position is shown).")
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        cf_seed = gr.Number(0, precision=0, label="Target seed (set by clicking a sample)")
                        cf_k = gr.Slider(1, max(1, n_train // 2), max(1, n_train // 5), step=1,
                                         label="Training images to remove")
                        rank_a = gr.Dropdown(rankings, value=default_method, label="Ranking A")
                        rank_b = gr.Dropdown(rankings + [("none", NO_RANKING)], value="random",
                                             label="Ranking B (side by side)")
                        with gr.Row():
                            run_btn = gr.Button("Remove and retrain", variant="primary")
                            cancel_btn = gr.Button("Cancel", variant="stop")
                        cf_status = gr.Markdown(elem_id="cf-status")
                    with gr.Column(scale=3):
                        with gr.Row():
                            before_img = gr.Image(label="before", format="png", interactive=False, height=200,
                                                  buttons=[], elem_classes="pixel")
                            after_a = gr.Image(label="after (ranking A)", format="png", interactive=False,
                                               height=200, buttons=[], elem_classes="pixel")
                            after_b = gr.Image(label="after (ranking B)", format="png", interactive=False,
                                               height=200, buttons=[], elem_classes="pixel")
                        cf_table = gr.Dataframe(headers=["ranking", "removed", "pixel L2", "label before",
                                                         "label after", "changed", "retrain"],
                                                interactive=False, label="before vs after", elem_id="cf-table")
                        with gr.Row():
                            removed_a = gr.Image(label="removed by ranking A", format="png", interactive=False,
                                                 buttons=[], elem_classes="pixel")
                            removed_b = gr.Image(label="removed by ranking B", format="png", interactive=False,
                                                 buttons=[], elem_classes="pixel")
                examples = example_targets(ASSETS)
                cf_examples = gr.Dataframe(value=[[s, k, sup.method_label(a), sup.method_label(b)]
                                                  for s, k, a, b in examples] or None, headers=["seed", "removed", "ranking A", "ranking B"],
                                           interactive=False, visible=bool(examples),
                                           label="Precomputed examples (click a row: instant)")
            with gr.Tab("Benchmarks", id="benchmarks"):
                benchmarks_blocks(ASSETS)
            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT + (ABOUT_DEFAULT if a.digits else ""), latex_delimiters=[{"left": "$$", "right": "$$", "display": True},
                                                     {"left": "$", "right": "$", "display": False}])
                gr.Markdown(methods_markdown(methods, unavailable))

        # -- wiring
        def seed_inputs(m):
            return gr.Number(visible=m == "single"), gr.Row(visible=m == "range"), gr.Slider(visible=m == "random")
        mode.change(seed_inputs, mode, [seed, range_row, count], queue=False)
        gen_inputs = [mode, seed, start, end, count, steps]
        gen_btn.click(generate_samples, gen_inputs, [gallery, batch], concurrency_id="compute")
        demo.load(generate_samples, gen_inputs, [gallery, batch], concurrency_id="compute")

        attr_inputs, attr_outputs = [query, method, topk], [prop_gallery, opp_gallery, hist, mass, summary]
        gallery.select(select_sample, batch, [query, tabs, query_img, query_info, cf_seed]).success(
            attribute, attr_inputs, attr_outputs, concurrency_id="compute")
        upload.upload(use_upload, [upload, invert], [query, query_img, query_info], show_progress="hidden").success(
            attribute, attr_inputs, attr_outputs, concurrency_id="compute")
        invert.input(use_upload, [upload, invert], [query, query_img, query_info], show_progress="hidden").success(
            attribute, attr_inputs, attr_outputs, concurrency_id="compute")
        method.input(attribute, attr_inputs, attr_outputs, concurrency_id="compute")
        topk.release(attribute, attr_inputs, attr_outputs, concurrency_id="compute")
        cmp_inputs = [query, method, method_b, topk]
        compare_btn.click(compare, cmp_inputs, [gal_a, gal_b, compare_text], concurrency_id="compute")
        method_b.input(compare, cmp_inputs, [gal_a, gal_b, compare_text], concurrency_id="compute")

        cf_outputs = [before_img, after_a, after_b, cf_table, removed_a, removed_b, cf_status]
        run_event = run_btn.click(run_counterfactual, [cf_seed, cf_k, rank_a, rank_b], cf_outputs,
                                  concurrency_id="retrain", concurrency_limit=1, show_progress_on=[cf_status])
        cancel_btn.click(cancel_retrain, None, cf_status, cancels=[run_event], queue=False)
        demo.unload(forget_session)
        gr.api(attribute_seed, api_name="attribute_seed", concurrency_id="compute")
        cf_examples.select(show_example, None, [cf_seed, cf_k, rank_a, rank_b, *cf_outputs], queue=False)
        demo.load(first_example, None, [cf_seed, cf_k, rank_a, rank_b, *cf_outputs], queue=False)
    return demo


# ---------------------------------------------------------------- serving

def client_address(request) -> str:
    """The visitor's address: the socket's peer, or, when that peer is a proxy on a private or
    loopback address (a hosted Space sits behind one), the address that proxy recorded last in
    X-Forwarded-For. A client reaching the server directly cannot choose its address this way."""
    import ipaddress

    client = getattr(request, "client", None)
    peer = getattr(client, "host", None) or "unknown"
    try:
        behind_proxy = ipaddress.ip_address(peer).is_private  # loopback addresses count as private
    except ValueError:
        behind_proxy = False
    forwarded = request.headers.get("x-forwarded-for", "") if request is not None else ""
    if behind_proxy and forwarded.strip():
        return forwarded.split(",")[-1].strip()
    return peer


def bound_queue_per_visitor(queue, per_session: int = MAX_PENDING_PER_SESSION,
                            per_client: int = MAX_PENDING_PER_CLIENT) -> None:
    """Refuse a queue join when its session, or its address over all its sessions, already has
    that many requests queued or running, so that one visitor cannot fill the queue for everyone.

    Gradio bounds only the whole queue (`max_size`); this wraps its `push`, which every queued event
    goes through, and counts the events the queue still holds (queued and running). The refusal is
    an "error" join (HTTP 400), whose message the page shows as it is ("queue_full" would show
    Gradio's generic text).
    """
    push = queue.push

    async def bounded_push(body, request, username):
        session = body.session_hash
        address = client_address(request)
        events = list(queue.event_ids_to_events.values())
        mine = sum(1 for e in events if session is not None and e.session_hash == session)
        theirs = sum(1 for e in events if client_address(e.request) == address)
        if mine >= per_session or theirs >= per_client:
            return False, (f"You already have {max(mine, 1) if mine >= per_session else theirs} requests waiting or running; "
                           "wait for them to finish (this server is shared by every visitor)."), "error"
        return await push(body, request, username)

    queue.push = bounded_push


def configure(demo: gr.Blocks, per_session: int = MAX_PENDING_PER_SESSION,
              per_client: int = MAX_PENDING_PER_CLIENT) -> gr.Blocks:
    """Queue and limits for serving `demo` to many visitors (also used by the tests' servers)."""
    demo.queue(max_size=64, default_concurrency_limit=2)
    bound_queue_per_visitor(demo._queue, per_session, per_client)
    return demo


demo = build_demo()

if __name__ == "__main__":
    configure(demo).launch(max_file_size=MAX_UPLOAD_BYTES, show_error=True, css=CSS, theme=gr.themes.Soft(),
                           footer_links=["gradio"])
