"""D-TRAK explorer: generate digits with the embedded diffusion model, see which training images
made them, and check by removing those images and retraining.

    python app.py                          # http://127.0.0.1:7860, assets from ./assets
    DTRAK_ASSETS=path/to/assets python app.py
    DTRAK_ASSETS=assets/text2image python app.py   # the text-to-image miniature: prompts, LoRA attribution

Layout and thin handlers only: every computation is a `dtrak_core` call (figures and HTML cards
come from `dtrak_core.viz`, small helpers from `dtrak_core.app_support`). The model, training set
and feature stores are loaded once per process (`load_assets`) and shared by all sessions;
per-user selections live in `gr.State`.

Many visitors at once: handlers share only read-only state (the model is run read-only; the
gradient engines work on private replicas, see `dtrak_core.shared`) and caches keyed by the whole
request (`OnceCache`: built once, identical for everyone). The queue is bounded per session and per
client address, a retrain stops when its visitor leaves, cancels or runs past a time limit, uploads
are bounded per address before they reach the disk (`UploadGate`), and the upload cache is bounded
in size and swept.

Start-up: `python app.py` serves as soon as the model folder is loaded and checked by its small
files (stores, the TracInCP index, the precomputed results' identity). A background warm-up
computes the first page's samples while the page is built, then what a first click needs (the
default method's scorer, plotly's figure classes) and last the full check of the large files
(TracInCP checkpoints, every precomputed result), whose findings the page's banner reports. The
Benchmarks charts are drawn when that tab is first shown.
"""
from __future__ import annotations

import dtrak_core  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads)

# isort: split
import functools
import html
import io
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

STARTED = time.perf_counter()  # the start-up log says how long each stage took from here
from functools import lru_cache

import gradio as gr
import numpy as np
import torch

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.attributor import Attribution, Attributor
from dtrak_core.errors import Cancelled
from dtrak_core.evaluation.quality import classify
from dtrak_core.files import read_json
from dtrak_core.folder import default_root, read_manifest
from dtrak_core.images import MAX_UPLOAD_BYTES, grid, load_user_image, to_pil
from dtrak_core.model.sampling import generate
from dtrak_core.shared import OnceCache

ASSETS = default_root()


# ---------------------------------------------------------------- shared state (one per process)

@dataclass
class Assets:
    root: str
    attributor: Attributor
    methods: list  # every method that can run here: TRAK family (one per store) and baselines
    unavailable: dict  # {baseline: why it cannot run here}
    damaged: dict  # {baseline: the damaged file that stops it} (a subset of `unavailable`)
    classifier: object = None  # the folder's own sample classifier (<root>/classifier/), if it has one

    def label_name(self, label: int) -> str:
        """A class label as people read it: the digit, or the folder classifier's class name."""
        if self.classifier is not None and 0 <= int(label) < len(self.classifier.classes):
            return self.classifier.classes[int(label)]
        return str(int(label))

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


def _load_assets(root: str) -> Assets:
    # a damaged or mismatched feature store is left out (as long as one loads): only the methods that
    # need it are turned off, and the banner names it (the CLI refuses the folder instead)
    damaged_stores = {}
    attributor = Attributor.load(root, damaged=damaged_stores)
    # quick: TracInCP by its index, not by loading its checkpoints (`full_check` does that after
    # the first page is shown)
    problems = dict(registry.problems(attributor, root, quick=True))
    problems.update(store_problems(attributor, damaged_stores, problems))
    methods = list(attributor.methods) + [m.name for m in registry.all(kind="pixel")
                                          if m.family in registry.SCORED_FAMILIES and m.name not in problems]
    classifier = None
    if os.path.isdir(os.path.join(root, "classifier")):
        from dtrak_core.model.classifier import ImageClassifier

        classifier = ImageClassifier.load(os.path.join(root, "classifier"))
    return Assets(root, attributor, methods, {m: str(e) for m, e in problems.items()},
                  {m: str(e) for m, e in problems.items() if not isinstance(e, registry.MethodUnavailable)}, classifier)


def _store_output_fn(path: str) -> str:
    """The output function a store folder was built for: its metadata's, else its name's
    (`FeatureSetting.slug`, '<output_fn>-K<K>-...') when the metadata is what is damaged."""
    import json

    try:
        with open(os.path.join(path, "metadata.json")) as f:
            fn = json.load(f).get("output_fn")
        if isinstance(fn, str) and fn:
            return fn
    except (OSError, ValueError, AttributeError):
        pass
    return os.path.basename(os.path.normpath(path)).rsplit("-K", 1)[0]


def store_problems(attributor, damaged_stores: dict, problems: dict) -> dict:
    """{method: the damaged store's error} for the methods that a damaged store (left out by
    `Attributor.load(damaged=...)`) turns off: its TRAK-family method, when no other store serves
    it, and the registered methods that score with that store (which `registry.problems` reports
    as merely unavailable: here the damaged file is named)."""
    found = {}
    for path, error in damaged_stores.items():
        fn = _store_output_fn(path)
        if fn in attributor.stores:  # another store (another K) still serves the method
            continue
        found[fn] = error
        for m in registry.all():
            if m.store == fn and m.family in registry.SCORED_FAMILIES and \
                    (m.name not in problems or isinstance(problems[m.name], registry.MethodUnavailable)):
                found[m.name] = error
    return found


def once_per_root(fn):
    """fn(root), computed once per model folder even when several threads ask at once (the page's
    load events and the warm-up do); `.cache_clear()` forgets every folder. A failure is not kept."""
    caches = [OnceCache()]

    @functools.wraps(fn)
    def cached(root: str):
        return caches[0].get(root, lambda: fn(root))
    cached.cache_clear = lambda: caches.__setitem__(0, OnceCache())
    return cached


@once_per_root
def load_assets(root: str) -> Assets:
    """The model folder, loaded once; raises ValueError with a readable reason when it is missing
    or damaged."""
    return _load_assets(root)



QUERY_PX, THUMB_PX = 192, viz.THUMB_PX  # display sizes; images are upscaled by whole factors (crisp pixels)
DEFAULT_K = 8
MAX_K = sup.MAX_TOP_K
NO_RANKING = "none"
NOISE_BUCKETS = 10

# Limits for a public server (environment variables override them)
MAX_PENDING_PER_SESSION = int(os.environ.get("DTRAK_MAX_PENDING_PER_SESSION", 4))  # queued + running
MAX_PENDING_PER_CLIENT = int(os.environ.get("DTRAK_MAX_PENDING_PER_CLIENT", 12))  # per address, all its sessions
MAX_RETRAIN_SECONDS = float(os.environ.get("DTRAK_MAX_RETRAIN_SECONDS", 900))  # wall time of one retrain request


def trusted_proxies(environ=os.environ) -> int:
    """How many reverse proxies stand in front of the server, each appending to X-Forwarded-For the
    address it was reached from: $DTRAK_TRUSTED_PROXIES (a whole number), else 1 on a Hugging Face
    Space (which sets $SPACE_ID and serves through one proxy), else 0 (reached directly)."""
    raw = environ.get("DTRAK_TRUSTED_PROXIES")
    if raw is None or not raw.strip():
        return 1 if environ.get("SPACE_ID") else 0
    try:
        n = int(raw.strip())
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"DTRAK_TRUSTED_PROXIES must be a whole number >= 0 (the reverse proxies in front of the "
                         f"server: 0 when reached directly, 1 on a Hugging Face Space), got {raw!r}")
    return n


TRUSTED_PROXIES = trusted_proxies()  # X-Forwarded-For hops to trust (`client_address`)
# Uploads (Gradio's /gradio_api/upload), bounded per address before a byte reaches the disk (`UploadGate`)
UPLOAD_WINDOW_SECONDS = float(os.environ.get("DTRAK_UPLOAD_WINDOW_SECONDS", 600))  # the window of the two below
UPLOADS_PER_WINDOW = int(os.environ.get("DTRAK_UPLOADS_PER_WINDOW", 30))  # files per address per window
UPLOAD_MB_PER_WINDOW = float(os.environ.get("DTRAK_UPLOAD_MB_PER_WINDOW", 50))  # MB per address per window
UPLOAD_CACHE_MB = float(os.environ.get("DTRAK_UPLOAD_CACHE_MB", 500))  # Gradio's upload cache, all visitors
CACHE_SWEEP = (600, 1800)  # every 10 min, delete uploads and outputs older than 30 min
ERROR_SECONDS = 8  # an error message fades after this long (they would pile up otherwise)


def assets() -> Assets:
    try:
        return load_assets(ASSETS)
    except (ValueError, OSError) as e:
        raise gr.Error(f"The model assets could not be loaded: {e}") from None


# Results keyed by the whole request, so they are the same for every visitor who asks
_samples_cache = OnceCache(64)  # (seeds, steps) -> images (B, C, H, W)
_attribution_cache = OnceCache(256)  # (QueryKey, method) -> Attribution
_noise_cache = OnceCache(128)  # (QueryKey, method, buckets) -> NoiseLevels
_counterfactual_cache = OnceCache(64)  # (seed, ranking, k) -> CounterfactualView
_retrain_cost = OnceCache(4)  # (root, recipe, 10-minute period) -> RetrainCost measured on this machine
RETRAIN_COST_SECONDS = 600
_cancelled_at: dict[str, float] = {}  # session -> time.monotonic() of its last Cancel
_page_served = threading.Event()  # a page has had its samples (the warm-up's later steps wait for it)
_warming, _warm_done = threading.Event(), threading.Event()  # the warm-up thread is running / has finished
WARM_UP_WAIT = 120  # seconds a page waits at most for the warm-up before checking the files itself
FIRST_PAGE_WAIT = 30  # seconds the warm-up waits for a first visitor before warming the rest anyway
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
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise gr.Error(str(e), duration=ERROR_SECONDS) from None
    return wrapper


def no_query():
    return gr.Error("No query yet: generate samples and click one, or upload an image.", duration=ERROR_SECONDS)


# ---------------------------------------------------------------- formatting

def sample_query(seed: int, steps: int, pixels: np.ndarray) -> dict:
    return {"key": sup.QueryKey.for_sample(seed, steps), "pixels": pixels, "seed": int(seed), "steps": int(steps),
            "title": f"Generated sample, seed {int(seed)} (DDIM {int(steps)} steps)"}


def digit_labels(images: np.ndarray):
    """(labels, confidences) from the digit classifier (or the folder's own classifier), or None
    when the folder has none."""
    a = assets()
    if a.digits:
        return classify(images)
    return None if a.classifier is None else a.classifier.classify(images)


def classifier_text(pixels: np.ndarray) -> str:
    found = digit_labels(pixels[None])
    a = assets()
    return "" if found is None else (f"looks like a **{a.label_name(found[0][0])}** ({found[1][0]:.0%} by the "
                                     f"{a.class_word} classifier)")


def training_cards(attribution, indices, title: str, note: str = "") -> str:
    a = assets()
    names = None if a.classifier is None else a.classifier.classes
    return viz.training_cards(a.attributor.train, attribution, indices, title, a.class_word, note, names)


# ---------------------------------------------------------------- handlers: generate

@readable
def generate_samples(mode, seed, start, end, count, steps, progress=gr.Progress()):
    """Seeds + DDIM steps -> gallery items and the batch (kept in session state)."""
    a = assets()
    seeds = sup.parse_seeds(mode, seed, start, end, count)
    steps = sup.parse_steps(steps)
    images = samples(seeds, steps, progress=lambda i, n: progress((i, n), desc="DDIM sampling"))
    found = digit_labels(images.numpy())
    captions = [f"seed {s}" + ("" if found is None else f": {a.label_name(found[0][i])}") for i, s in enumerate(seeds)]
    items = [(to_pil(img, a.scale(2 * THUMB_PX)), c) for img, c in zip(images, captions)]
    _page_served.set()
    return items, {"seeds": seeds, "steps": steps, "images": images.numpy()}


FIRST_SEEDS, FIRST_STEPS = list(range(16)), 50  # what the Generate tab's controls show on a new page


@readable
def first_page():
    """The samples a new page opens with (the Generate tab's default seeds and steps)."""
    return generate_samples("range", FIRST_SEEDS[0], FIRST_SEEDS[0], FIRST_SEEDS[-1], len(FIRST_SEEDS), FIRST_STEPS,
                            progress=lambda *args, **kwargs: None)


@readable
def check_generate(mode, seed, start, end, count, steps):
    """A generate request's parameters, checked before the gallery is touched: a mistake shows its
    message and leaves the samples on screen."""
    sup.parse_seeds(mode, seed, start, end, count, rng_seed=0)
    sup.parse_steps(steps)


def samples(seeds, steps: int, progress=None) -> torch.Tensor:
    """The DDIM samples (B, C, H, W) of these seeds, computed once per (seeds, steps)."""
    a = assets()
    return _samples_cache.get((tuple(seeds), steps), lambda: generate(
        a.attributor.unet, a.attributor.scheduler, seeds, steps=steps, progress=progress))


def select_sample(batch, evt: gr.SelectData):
    """A click on a gallery item -> it becomes the query; switch to the Attribute tab."""
    if not batch or not batch.get("seeds") or evt.index is None:
        raise gr.Error("Generate samples first, then click one.", duration=ERROR_SECONDS)
    try:
        i = sup.parse_index(evt.index, "sample", len(batch["seeds"]))
    except ValueError as e:
        raise gr.Error(f"Click one of the {len(batch['seeds'])} samples shown: {e}.", duration=ERROR_SECONDS) from None
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


@once_per_root
def evidence(root: str) -> dict | None:
    return sup.read_evidence(root)


def lookalike_line(q, method: str, k: int) -> str:
    """How much of the top-k the strongest model-free pixel baseline shares (the similarity flag)."""
    a = assets()
    found = evidence(a.root)
    baseline = sup.lookalike_baseline(found)
    try:
        base = attribution_for(q, baseline)
    except ValueError:
        return ""
    return sup.similarity_flag(method, attribution_for(q, method).scores, baseline, base.scores, k, found)


OPPONENT_NOTE = ("Opponents are often the query's own class: an image like the query but drawn differently pulls the "
                 "model towards its own version, so the largest scores of both signs go to similar images.")


@readable
def attribute(q, method, k, progress=gr.Progress()):
    """Query + method -> proponents, opponents, histogram, per-class mass, summary."""
    if q is None:
        raise no_query()
    k = sup.parse_top_k(k)
    progress(0, desc=f"attributing with {sup.method_label(method)}")
    result = attribution_for(q, method)
    prop, opp = result.proponents(k), result.opponents(k) if result.signed else []
    found = digit_labels(q["pixels"][None])
    if found is None:
        summary = f"**{sup.method_label(method)}**: the top-{k} proponents{' and opponents' * result.signed} of this query."
    else:
        digit, a = found[0][0], assets()
        shown = f"{digit}s" if a.digits else f"{a.label_name(digit)}"
        opposed = f" and **{int((result.labels[opp] == digit).sum())} of {k}** top opponents" * result.signed
        summary = (f"**{sup.method_label(method)}**: **{int((result.labels[prop] == digit).sum())} of {k}** top "
                   f"proponents{opposed} are {shown}, the {a.class_word} the classifier sees in the query.")
    summary += "\n\n" + lookalike_line(q, method, k)
    opp_note = (OPPONENT_NOTE if found is not None else "") if result.signed else sup.no_opponents(method)
    return (training_cards(result, prop, f"Top-{k} proponents (index · training label · score)"),
            training_cards(result, opp, f"Top-{k} opponents" if result.signed else "No opponents", opp_note),
            viz.score_histogram(result, k), viz.class_mass_figure(result, assets().class_word), summary)


@readable
def attribute_seed(seed: int, steps: int = 50, method: str | None = None, k: int = 8) -> dict:
    """Attribute the generated sample of one seed (DDIM, `steps` steps) with `method` (None: the
    registry's default among this folder's methods): its top-k proponents and opponents among the
    training images, as JSON."""
    a = assets()
    method = registry.default_method(a.methods) if method is None else method
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
        raise no_query()
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


def follow_compare(q, method_a, method_b, k, shown):
    """Keeps the comparison in step with the query, method and top-k once it has been asked for."""
    if not shown or q is None:
        return gr.update(), gr.update(), gr.update()
    try:
        return compare(q, method_a, method_b, k)
    except gr.Error as e:
        return "", "", f"Comparison not available: {e.message}"


@readable
def noise_view(q, method):
    """The query's score split by noise level: a heatmap of the strongest training images' score by
    timestep bucket, the strongest one per bucket, and a line that says what it shows."""
    a = assets()
    if q is None:
        raise no_query()
    method = sup.parse_method(method, a.methods)
    split, lam, note = method, None, ""
    chosen = registry.get(method)
    if chosen.store in a.attributor.methods and chosen in registry.sharpened(chosen.store):
        # s|s| of a sum is not a sum of parts: split the signed score it sharpens, at its lambda
        split = chosen.store
        lam = a.attributor.tuned_lambdas.get(registry.sharpened_lambda_key(method, a.attributor.setting(split)[0].slug))
        note = (f" It splits the signed {sup.method_label(split)} score that {sup.method_label(method)} sharpens "
                "(same ranking).")
    if split not in a.attributor.methods:
        return (None, "", f"The noise-level view splits a TRAK-family score (a method with a feature store: "
                          f"{', '.join(sup.method_label(m) for m in a.attributor.methods)}); "
                          f"{sup.method_label(method)} has no timesteps to split.")
    levels = _noise_cache.get((q["key"], sup.QueryKey.for_pixels(q["pixels"]), method, NOISE_BUCKETS), lambda: sup.noise_levels(
        a.attributor, torch.as_tensor(q["pixels"]), split, NOISE_BUCKETS, lam=lam))
    labels = a.attributor.train.labels.numpy()
    low, high = int(levels.top(0, 1)[0]), int(levels.top(len(levels.timesteps) - 1, 1)[0])
    share = np.abs(levels.contributions).sum(1)
    share = share / share.sum()
    text = (f"Each column is one range of the {len(levels.timesteps)} noise levels the query's gradient is averaged "
            f"over (the columns sum to the score). At low noise ({levels.labels()[0]}) training image **#{low}** "
            f"matters most, at high noise ({levels.labels()[-1]}) **#{high}**; the lowest-noise range carries "
            f"{share[0]:.0%} of all score mass, the highest {share[-1]:.0%}.{note}")
    return viz.noise_level_figure(levels, labels, a.class_word), viz.noise_level_cards(a.attributor.train, levels,
                                                                                       a.class_word), text


def clicked_index(evt) -> int:
    """The training index a card click carries (from the page, or any API client)."""
    data = getattr(evt, "_data", None) or {}
    return sup.parse_int(data.get("index") if isinstance(data, dict) else None, "training image index", 0,
                         assets().n_train - 1)


def all_attributions(q) -> dict:
    """Every method's attribution of the query ({method: Attribution or the ValueError that stops it})."""
    out = {}
    for method in assets().methods:
        try:
            out[method] = attribution_for(q, method)
        except ValueError as e:
            out[method] = e
    return out


@readable
def inspect_training(q, evt: gr.EventData):
    """A click on a training card -> that image large, its class, and its rank and score under
    every method for the current query."""
    if q is None:
        raise no_query()
    index = clicked_index(evt)
    a = assets()
    rows = sup.ranks_under_methods(all_attributions(q), index)
    return index, viz.training_image_details(a.attributor.train, index, rows, a.class_word), gr.Column(visible=True)


@readable
def use_training_image(index):
    """'Use as query': the inspected training image becomes the query."""
    a = assets()
    index = sup.parse_int(index, "training image index", 0, a.n_train - 1)
    pixels = a.attributor.train.images[index].numpy()
    label = int(a.attributor.train.labels[index])
    q = {"key": sup.QueryKey("train", str(index)), "pixels": pixels, "seed": None, "steps": None,
         "title": f"Training image #{index}" + (f" ({a.class_word} {label})" if label >= 0 else "")}
    return (q, *query_view(q), gr.Column(visible=False))


def _load_upload(path, invert: bool, name: str | None = None):
    """The one path every upload, example upload and drawing goes through: validated, and for the
    digits model normalised to the training digits' form (cropped to the ink, centred, scaled, contrast
    and strokes normalised: `images.normalise_digit`); other models' images are centre-cropped and resized."""
    unet = assets().attributor.unet
    try:
        return load_user_image(path, unet.config.sample_size, unet.config.in_channels, invert=invert,
                               normalise=assets().digits)
    except ValueError as e:
        raise gr.Error(f"Could not use {name or os.path.basename(path)}: {e}", title="Not a usable image",
                       duration=ERROR_SECONDS) from None


def _upload_query(path, invert: bool, name: str | None = None):
    invert = sup.parse_bool(invert, "the ink setting (invert)")
    pixels = _load_upload(path, invert, name).numpy()
    name = name or f"Your image {os.path.basename(path)}"
    q = {"key": sup.QueryKey.for_pixels(pixels), "pixels": pixels, "seed": None, "steps": None,
         "title": f"{name}{' (inverted)' if invert else ''}, "
                  f"as the model sees it ({pixels.shape[-1]}x{pixels.shape[-2]})"}
    img, info = query_view(q)
    warning = sup.unusual_ink(pixels, assets().attributor.train.images.numpy())
    return q, img, info + (f"  \n⚠️ {warning}" if warning else "")


@readable
def use_upload(path, invert):
    """An uploaded file with the ink setting as given -> validated, converted query (shown upscaled)."""
    if not path:
        return gr.update(), gr.update(), gr.update()
    return _upload_query(path, invert)


@readable
def read_upload(path):
    """A fresh upload -> the query, with the ink polarity detected from the image's border (the
    training digits are light ink on black; a scan or drawing is usually dark ink on paper)."""
    if not path:
        return gr.update(), gr.update(), gr.update(), gr.update()
    return _read_source(path)


def _read_source(path, name: str | None = None):
    plain = _load_upload(path, False, name)
    invert = assets().digits and sup.light_paper(plain.numpy())
    q, img, info = _upload_query(path, invert, name)
    detected = "dark ink on light paper: inverted" if invert else "light ink on a dark background: used as it is"
    return q, img, info + f"  \nInk detected: {detected} (change it with the box below).", invert


def drawing_png(value) -> bytes | None:
    """The drawing canvas's value (an EditorValue dict of PIL images, or an image) -> PNG bytes of the
    drawing flattened onto white paper; None when nothing is drawn."""
    from PIL import Image

    img = value.get("composite") if isinstance(value, dict) else value
    if img is None:
        return None
    img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
    rgba = img.convert("RGBA")
    if not rgba.getchannel("A").getextrema()[1]:  # nothing drawn on a transparent canvas
        return None
    paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    buf = io.BytesIO()
    Image.alpha_composite(paper, rgba).convert("L").save(buf, format="PNG")
    return buf.getvalue()


@readable
def use_drawing(value):
    """The drawing canvas -> the query, through the same path as an upload."""
    data = drawing_png(value)
    if data is None:
        return gr.update(), gr.update(), gr.update(), gr.update()
    return _read_source(data, "Your drawing")


def clear_upload():
    """A refused upload leaves the box empty (not showing the name of a file that was not used)."""
    return None


def use_example(index):
    """A click on an example upload -> as if that file had been uploaded."""
    examples = example_uploads()
    i = sup.parse_int(index, "example", 0, max(0, len(examples) - 1))
    return (*read_upload(examples[i][0]), examples[i][0])


@lru_cache(maxsize=None)
def example_uploads() -> list:
    """[(path, caption)] of the example uploads, written once per process into a temporary folder."""
    if not assets().digits:
        return []
    from dtrak_core.model.data import load_digits

    return sup.write_example_uploads(tempfile.mkdtemp(prefix="dtrak-examples-"), load_digits("validation"))


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
    gallery is left out and reported (`_damaged_gallery`, the banner); the others are shown."""
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
    _damaged_gallery[root] = {f"precomputed gallery ({os.path.relpath(os.path.dirname(p), root)})": why
                              for p, why in damaged.items()}
    return views


_damaged_gallery: dict[str, dict] = {}  # root -> {"precomputed gallery (<folder>)": why it is off}


def verified_results(root: str) -> dict:
    """{name: {"path", and "data" or "error"}} for the benchmark results the app shows whole:
    benchmarks/tables.json and counterfactual/summary.json (when present), each verified against
    the checksum its writer recorded. "error" (unreadable, edited, unrecorded) turns off that part
    of the Benchmarks tab, which then says why, as the banner does. (Two small files: read each
    time it is asked, when the page is built and by the banner's checks.)"""
    from dtrak_core import checksums
    from dtrak_core.errors import IntegrityError
    from dtrak_core.evaluation.counterfactual_report import summary_remedy
    from dtrak_core.evaluation.tables_report import TABLES_REMEDY

    out = {}
    for name, path, what, remedy in (
            ("tables", os.path.join(root, "benchmarks", "tables.json"), "benchmark tables", TABLES_REMEDY),
            ("summary", os.path.join(root, "counterfactual", "summary.json"), "counterfactual summary",
             summary_remedy(os.path.join(root, "counterfactual", "summary.json")))):
        if not os.path.exists(path):
            continue
        try:
            out[name] = {"path": path, "data": checksums.read_sealed_json(path, what, remedy)}
        except IntegrityError as e:
            out[name] = {"path": path, "error": str(e)}
    return out


RESULT_PARTS = {"tables": "Benchmarks: LDS tables", "summary": "Benchmarks: counterfactual summary"}


def results_damage(root: str) -> dict:
    """{part: why it is off} for the precomputed results (galleries, tables, summary)."""
    precomputed(root)
    damaged = dict(_damaged_gallery.get(root, {}))
    damaged.update({RESULT_PARTS[name]: r["error"] for name, r in verified_results(root).items() if "error" in r})
    return damaged


@once_per_root
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


def quick_damage(root: str) -> dict:
    """{part: why it is off} from the checks that cost no more than reading a few small files:
    the stores and the TracInCP index (`load_assets`), the precomputed counterfactual results'
    identity.json, the galleries and the benchmark tables and summary (their checksums). What they
    miss (a replaced checkpoint, a damaged job file) `full_check` finds."""
    from dtrak_core.errors import IntegrityError

    a = load_assets(root)
    damaged = {**a.damaged, **results_damage(root)}
    if root in _damaged_results:
        damaged["precomputed counterfactuals"] = _damaged_results[root]
    elif a.can_retrain:
        try:
            cf = _counterfactual()
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
    committed(root)
    if root in _damaged_results:
        damaged["precomputed counterfactuals"] = _damaged_results[root]
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
    if _warming.is_set():
        _warm_done.wait(WARM_UP_WAIT)
    try:
        damaged = full_check(ASSETS)
    except (ValueError, OSError):
        return gr.update()
    return gr.Markdown(damage_banner(damaged), visible=bool(damaged))


def stored_view(root: str, key: tuple) -> CounterfactualView | None:
    """A finished result for (seed, ranking, k) without retraining: the gallery's, else the harness's."""
    view = precomputed(root).get(key)
    if view is None and key in committed(root):
        view = _counterfactual_cache.get(("stored", root, key), lambda: CounterfactualView.from_result(
            _counterfactual().load_job(committed(root)[key]), live=False))
    return view


@once_per_root
def outcomes(root: str) -> dict:
    """(seed, ranking, k) -> {'l2', 'label_before', 'label_after'} of every stored result (read
    from the results, without drawing their pictures)."""
    out = {key: {"l2": v.l2, "label_before": v.label_before, "label_after": v.label_after}
           for key, v in precomputed(root).items()}
    for key, path in committed(root).items():
        if key not in out:
            r = _counterfactual().load_job(path)
            out[key] = {"l2": r.l2, "label_before": r.label_before, "label_after": r.label_after}
    return out


EXAMPLE_HEADERS = ["seed", "removed", "ranking A: pixel L2, digit", "ranking B: pixel L2, digit"]


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


CF_HEADERS = ["ranking", "pixel L2", "digit before → after", "retrain"]


def counterfactual_outputs(views: list, status: str) -> tuple:
    """Before / after images, a table, the removed images and a heading naming what is shown, for 1
    or 2 results on the same target."""
    train = assets().attributor.train
    after = [gr.Image(value=v.after, label=f"after removing {v.k} by {sup.method_label(v.ranking)}") for v in views]
    removed = [gr.Image(value=grid(train.images[torch.as_tensor(v.removed[:48], dtype=torch.long)], columns=16, scale=4),
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
    """This machine's retrain time for the model's recipe, measured when first asked for and again
    every RETRAIN_COST_SECONDS (the machine's load changes; a measurement costs a few training steps)."""
    a = assets()
    cf = _counterfactual()
    config = cf.train_config_from_manifest(a.root)
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
        todo = [r for r in rankings if _counterfactual_cache.peek((seed, r, k)) is None
                and stored_view(a.root, (seed, r, k)) is None]
        return retrain_cost().text(len(todo))
    except (ValueError, gr.Error):
        return ""


@readable
def run_counterfactual(seed, k, ranking_a, ranking_b, request: gr.Request = None, progress=gr.Progress()):
    """Remove the target's top-k under one or two rankings, retrain, regenerate; cached per request."""
    a = assets()
    cf = _counterfactual()
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
                return (*[gr.update()] * 7, stop.reason or "Cancelled: the retrain was stopped; nothing was changed.")
            view = CounterfactualView.from_result(result)
            _counterfactual_cache.put(key, view)
        views.append(view)
    live = [v.seconds for v in views if v.seconds is not None]
    took = f"retrain + regenerate took {sum(live):.0f} s; repeating this request is instant" if live else "precomputed"
    return counterfactual_outputs(views, f"Seed {seed}: {k} of {a.n_train:,} training images removed per ranking ({took}).")


def _example_views(seed, k, rankings) -> list:
    return [v for v in (stored_view(ASSETS, (seed, r, k)) for r in rankings) if v is not None]


def show_example(evt: gr.SelectData):
    """A click on a precomputed example (its row) -> its inputs and results, instantly. Only ranking
    A is set: ranking B keeps its own value, so the next 'Remove and retrain' runs what the controls say."""
    rows = examples(ASSETS)
    i = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    r = rows[sup.parse_int(i, "example row", 0, max(0, len(rows) - 1))]
    return (r["seed"], r["k"], r["rankings"][0],
            *counterfactual_outputs(_example_views(r["seed"], r["k"], r["rankings"]),
                                    f"Precomputed example: seed {r['seed']}, {r['k']} training images removed."))


def first_example():
    """What the Counterfactual tab shows on first visit: the first precomputed example (one whose
    digit changes, when there is one), the examples table and what pixel L2 distances look like."""
    rows = examples(ASSETS)
    if not rows:
        return (*[gr.update()] * 11, gr.update(visible=False), "")
    r = rows[0]
    views = _example_views(r["seed"], r["k"], r["rankings"])
    return (r["seed"], r["k"], r["rankings"][0],
            *counterfactual_outputs(views, f"Precomputed example: seed {r['seed']}, {r['k']} training images "
                                           "removed. Pick a sample or a seed and press **Remove and retrain** for "
                                           "your own."),
            gr.update(value=example_targets(ASSETS), visible=True), l2_examples_html(ASSETS))


def first_visit(done, q):
    """The Counterfactual tab opened: on this session's first visit, the first example and the
    examples table (computed here rather than when the page loads, which they would slow down).
    The controls take the example's seed only while no generated sample has been picked (a picked
    sample's seed stays in the box; the heading above the pictures says what they show)."""
    if done:
        return (*[gr.update()] * 13, True)
    out = first_example()
    if q is not None and q.get("seed") is not None:
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


# ---------------------------------------------------------------- layout

HEADER = """# D-TRAK explorer
Which training images made this digit? A small diffusion model trained on 1,500 8x8 digits; **TRAK** and
**D-TRAK** score how much each training image is responsible for a generated (or uploaded) image.
**Generate** a sample and click it: **Attribute** shows which training images made it, **Counterfactual** tests
that by removing them and retraining."""


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
            "sample in **Generate** and read its attribution in **Attribute**. " + retrain_note(a))


def retrain_note(a: Assets) -> str:
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


HOW_TO_READ = """**Proponents** are the training images whose presence made the model more likely to produce the
query (a positive score); **opponents** made it less likely (a negative score). Scores are relative:
compare them within one query and one method. Click any card for that image's rank under every method,
and to use it as the query.

*Why opponents often share the query's class:* a training image very like the query but drawn
differently pulls the model towards its own version of the digit. Images far from the query barely
matter either way, so both the largest positive and the largest negative scores go to similar images."""

NOISE_HELP = """A diffusion model learns to denoise at every noise level, and a training image can matter at one
level and not at another: at **high noise** (large t) the model decides the rough shape, at **low noise**
(small t) the strokes. This view splits the query's score into the timestep ranges its gradient is
averaged over; the columns add up to the score shown above."""

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
Because $\phi(x)$ is a mean over timesteps, the score is a sum over timesteps too: the Attribute tab's
noise-level view shows that sum by timestep range.

**TRAK vs D-TRAK.** They differ only in $f$:

| method | output function $f(x, t)$ |
|---|---|
| TRAK (loss) | $\lVert \epsilon - \epsilon_\theta(x_t, t) \rVert^2$ (the training loss) |
| D-TRAK (square) | $\lVert \epsilon_\theta(x_t, t) \rVert^2$ (the *square* of the predicted noise) |

D-TRAK's finding (Zheng et al., *Intriguing Properties of Data Attribution on Diffusion Models*,
ICLR 2024) is that the theoretically motivated loss is **not** the best choice: the square and
other variants attribute better, as measured by the linear datamodeling score (LDS) and by
removing the top proponents and retraining (the Counterfactual tab; both are explained in Benchmarks).
"""

ABOUT_DEFAULT = r"""
**This app.** The model is a diffusers UNet trained from scratch on scikit-learn's digits; the
projection is a sparse Johnson-Lindenstrauss transform; $\lambda$ is the value that was best on the
validation digits' LDS (recorded in `assets/manifest.json`; without it, 0.1 times the mean squared
training feature norm). The counterfactual's TRAK-family rankings use that data-free rule, so they
do not depend on the LDS data. Everything runs on a CPU.

**Attribution or look-alikes?** On this 8x8 model a model-free kernel on raw pixels (RBF kernel
ridge, `pixel-rbf`) predicts the retrained models as well as any gradient method (validation LDS
77.2 against D-TRAK's 58.2 and avg's 63.6), and its removals move the samples about as far: a small
model trained on 1,500 tiny images behaves much like the training set's optimal denoiser, whose
output is a similarity-weighted average of training images, so "which images made it" and "which
images look like it" nearly coincide. The line under the proponents says how many of them are also
the pixel kernel's. The Fashion-MNIST folder is the setting where the two can come apart.

**The default method** is *avg* (the gradient of $\mathrm{mean}(\epsilon_\theta)$, a D-TRAK variant
of the paper's ablation), chosen by a rule fixed before it was applied: among the methods that use
the model, the highest LDS of each query's top 1% (a measure no monotone transform of the scores can
change) on the validation digits; it is reported on the generated ones. *Sharpened* methods
($s|s|$) keep every ranking: their higher LDS is what the metric rewards for concentrating the
predicted effect on a few images, and it lifts pixel kernels just as much.
"""

BENCHMARKS_HELP = """### How to read these numbers
- **LDS (linear datamodeling score)** asks whether the scores predict what retraining does. The model is
  retrained on many random halves of the training set; for a test image, the sum of its scores over each
  half should rank the halves the way the retrained models' loss on that image does. LDS is that rank
  correlation (Spearman), averaged over test images, x 100. **Higher is better**; 0 is chance.
- **Noise ceiling:** two retrains on the same half with different seeds already disagree, so no method can
  reach 100. The ceiling (dashed lines) is the **best LDS reachable** against these retrained models.
- **Two test sets:** *validation* digits (real, never trained on) and *generated* samples of the model.
- **Counterfactual:** remove a sample's top proponents, retrain, regenerate the same seed and measure the
  **pixel L2** distance between before and after. **Higher is better**: the removed images mattered.
  Removing as many random images is the baseline. The Counterfactual tab shows what L2 = 1 or 3 looks like."""

CSS = """
img { image-rendering: pixelated; }
.cards-title { font-weight: 600; margin: 4px 0 6px; }
.cards-note { font-size: 13px; color: var(--body-text-color-subdued); margin: -2px 0 6px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(76px, 1fr)); gap: 10px; }
.cards-small { grid-template-columns: repeat(auto-fill, minmax(62px, 1fr)); gap: 8px; }
.card { margin: 0; text-align: center; cursor: pointer; border-radius: 6px; padding: 2px; }
.card:hover, .card:focus { outline: 2px solid var(--color-accent); }
.card img { width: 100%; border-radius: 4px; display: block; }
.card figcaption { font-size: 12px; line-height: 1.3; margin-top: 3px; font-variant-numeric: tabular-nums; }
.pos { color: #15803d; } .neg { color: #b91c1c; } .muted { color: var(--body-text-color-subdued); font-size: 12px; }
.pixel img { padding-top: 2.4em; box-sizing: border-box; }
#summary, #cf-status { min-height: 2.5em; }
/* samples: captions under the pixels, every row shown, fewer columns on narrow screens */
#samples .grid-wrap { max-height: none !important; overflow: visible !important; height: auto !important; }
#samples .grid-container { grid-template-columns: repeat(auto-fill, minmax(112px, 1fr)) !important; }
#samples .thumbnail-item { flex-direction: column; aspect-ratio: auto; height: auto; }
#samples .thumbnail-item img { aspect-ratio: 1 / 1; width: 100%; height: auto; }
#samples .caption-label { position: static; max-width: 100%; margin: 4px auto 2px; background: none;
  border: none; padding: 0; font-size: 13px; color: var(--body-text-color); }
/* one training image, large */
.details { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
.details-image img { width: 160px; border-radius: 6px; }
.details-text { flex: 1 1 240px; min-width: 0; }
.details-title { font-weight: 600; font-size: 16px; margin-bottom: 4px; }
.ranks { border-collapse: collapse; margin-top: 6px; font-size: 13px; width: 100%; }
.ranks td, .ranks th { padding: 3px 8px; border-bottom: 1px solid var(--border-color-primary); text-align: left; }
.ranks td:nth-child(2), .ranks td:nth-child(3) { font-variant-numeric: tabular-nums; white-space: nowrap; }
/* counterfactual: the old result dims while a new one computes */
#cf-results { transition: opacity 0.2s; }
#cf-results.stale > *:not(#cf-progress) { opacity: 0.35; }
#cf-progress { min-height: 3.2em; }
.pairs { display: flex; flex-wrap: wrap; gap: 18px; }
.pair { margin: 0; max-width: 320px; }
.pair-images { display: flex; align-items: center; gap: 8px; }
.pair-images img { width: 96px; border-radius: 4px; }
.pair figcaption { font-size: 13px; margin-top: 4px; }
.arrow { font-size: 22px; }
/* phones: every tab in the bar, nothing wider than the screen */
@media (max-width: 640px) {
  .tab-container button { padding: 6px 7px !important; font-size: 13px !important; }
  #samples .grid-container { grid-template-columns: repeat(4, minmax(0, 1fr)) !important; gap: 6px !important; }
  #samples .caption-label { font-size: 11px; }
  .table-wrap table, .table-wrap { font-size: 12px; }
  .gradio-container { padding-left: 8px !important; padding-right: 8px !important; }
  .prose table { display: block; overflow-x: auto; max-width: 100%; font-size: 12px; }
  .prose th, .prose td { white-space: nowrap; padding: 4px 6px !important; }
}
"""

CARD_CLICK_JS = """
function pick(e) {
  const card = e.target.closest('[data-index]');
  if (!card || !element.contains(card)) return;
  if (e.type === 'keydown') { if (e.key !== 'Enter' && e.key !== ' ') return; e.preventDefault(); }
  trigger('click', {index: Number(card.dataset.index)});
}
element.addEventListener('click', pick);
element.addEventListener('keydown', pick);
"""

DIM_RESULTS_JS = "(...args) => { document.querySelector('#cf-results')?.classList.add('stale'); return args; }"
UNDIM_RESULTS_JS = "(...args) => { document.querySelector('#cf-results')?.classList.remove('stale'); return args; }"


# Enter in a slider's number box applies it at once (the slider otherwise waits until the box loses focus)
ENTER_APPLIES_JS = ("document.addEventListener('keydown', (e) => { if (e.key === 'Enter' && "
                    "e.target.matches('#topk input[type=number]')) e.target.blur(); });")


def page_head() -> str:
    """Scripts for the page's head: Enter in the top-k box, and the plotly bundle loaded while the
    visitor is still on the Generate tab (once its samples are shown), so the first attribution's charts arrive with its cards
    instead of seconds later. Gradio loads its plot component only when a plot is first shown;
    importing the same module early fills the browser's module cache (the file name changes with
    Gradio, so it is looked up, not hard-coded)."""
    import glob

    folder = os.path.join(os.path.dirname(gr.__file__), "templates", "frontend", "assets")
    found = sorted(glob.glob(os.path.join(folder, "PlotlyPlot-*.js")))
    # after the first samples are drawn: parsing plotly takes the browser seconds on a busy machine,
    # which would otherwise delay the page itself
    preload = "" if not found else (
        "(() => { const url = new URL('assets/" + os.path.basename(found[0]) + "', document.baseURI).href; "
        "const since = Date.now(); const wait = () => { "
        "if (document.querySelector('#samples img') || Date.now() - since > 30000) "
        "setTimeout(() => import(url).catch(() => {}), 300); else setTimeout(wait, 250); }; wait(); })();")
    return f"<script>{ENTER_APPLIES_JS}{preload}</script>"


def _read_text(path: str) -> str | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def _table(rows: list[dict], label: str) -> None:
    headers = list(dict.fromkeys(h for r in rows for h in r))
    gr.Dataframe(value=[["" if r.get(h) is None else r.get(h) for h in headers] for r in rows], headers=headers,
                 label=label, interactive=False, wrap=True)


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
        gr.Markdown("## Attribution or look-alikes?\n" + sup.evidence_headline(evidence["data"]))
        chart(functools.partial(viz.lds_chart, sup.evidence_rows(evidence["data"])))
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
        gr.Markdown(BENCHMARKS_HELP)
    for title, x in broken:
        gr.Markdown(f"## {title}\n\n**Not shown: this result file is unreadable, or not the one its writer wrote.** "
                    f"{html.escape(x['error'])}", elem_classes="damaged-result")
    if lds is not None and lds.get("data"):
        data = lds["data"]
        gr.Markdown("## LDS: D-TRAK and TRAK")
        if data.get("partial"):
            gr.Markdown(f"**Provisional:** only {data.get('subsets_done')} of {data.get('subsets_planned')} "
                        "retrained subsets were finished when these numbers were written.")
        rows = sup.lds_rows(data)
        if rows:
            same = ("Here the two coincide: the same λ was best on both halves of every test set, so choosing it on "
                    "the test set (as the paper does) cost nothing. " if sup.lambdas_coincide(rows) else "")
            gr.Markdown(f"λ is the ridge term of the scores. *Honest λ*: chosen on one half of the test images and "
                        f"reported on the other (cross-fitted). *Paper λ*: best on the reported images themselves, as "
                        f"in the paper (optimistic). {same}*Default λ*: a rule that uses no evaluation data. "
                        "± is the bootstrap spread over the retrained subsets.")
            _table(rows, "LDS x 100 (higher is better), mean over test images")
            chart(functools.partial(viz.lds_chart, rows, data.get("noise_ceiling")))
    if tables is not None and tables.get("data"):
        gr.Markdown("## LDS of every method: baselines, output functions x K, ensembles")
        if tables.get("markdown"):
            gr.Markdown(sup.relabel_tables(tables["markdown"].split("\n", 1)[-1]))  # without its own title
        rows = sup.table_rows(tables["data"].get("methods", {}))
        if rows:
            gr.Markdown("The poster's methods, best on the validation digits at the top:")
            chart(functools.partial(viz.lds_chart, rows, tables["data"].get("noise_ceiling")))
    if cf_summary is not None and cf_summary.get("data"):
        gr.Markdown("## Counterfactual: remove the top proponents and retrain")
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
            "produced by the evaluation harnesses (`python -m dtrak_core lds ...` writes "
            "`benchmarks/lds_results.json`, `python -m dtrak_core counterfactual ...` writes "
            "`counterfactual/summary.json`; see `python -m dtrak_core --help`); restart the app to show them.")
    return charts


def draw_charts(charts: list, cache: OnceCache):
    """The figures of `benchmarks_blocks`' charts, drawn once per process (as one value when there
    is one chart, as Gradio expects for a single output)."""
    figures = cache.get("figures", lambda: [draw() for _, draw in charts])
    return figures[0] if len(figures) == 1 else figures


def error_page(error: str, text2image: bool = False) -> gr.Blocks:
    """What the app shows when its model folder cannot be loaded: what is wrong and how to fix it
    (text2image: a text-to-image folder, rebuilt by `build-text2image`)."""
    rebuild = ("rebuild it with `python -m dtrak_core build-text2image` (your own Stable Diffusion and LoRA: "
               "`python -m dtrak_core build-text2image --root FOLDER --pipeline SD --lora L --data D`)" if text2image else
               "rebuild it with `python -m dtrak_core build-default` (a model of your own: `python -m dtrak_core build "
               "--root FOLDER --model M --data D`)")
    with gr.Blocks(title="D-TRAK explorer", delete_cache=CACHE_SWEEP) as page:
        gr.Markdown(HEADER)
        gr.Markdown(f"## The model assets could not be loaded\n\n**Folder:** `{ASSETS}`\n\n**What is wrong:** "
                    f"{html.escape(error)}\n\n**How to fix it:** do what the message above says, point "
                    "`DTRAK_ASSETS` at a complete model folder, restore the embedded default with `git checkout -- "
                    f"assets` (or `git lfs pull` if it came without its binaries), or {rebuild}. "
                    "Then restart the app.", elem_id="assets-error")
    return page


def cards_html(elem_id: str) -> gr.HTML:
    """A grid of training cards; a click on a card (or Enter on it) inspects that training image."""
    return gr.HTML(elem_id=elem_id, js_on_load=CARD_CLICK_JS)


def text2image_folder(root: str) -> bool:
    """A text-to-image model folder (its own page: `dtrak_core.text2image.app_views`), by its
    manifest; one whose manifest cannot be read or checked is, when what remains of it or the
    folder's layout says so (`folder.manifest_remedy`), so that its error page says how to rebuild
    it (`build-text2image`)."""
    from dtrak_core.folder import TEXT2IMAGE_REMEDY, manifest_remedy

    try:
        return read_manifest(root).get("kind") == "text2image"
    except (ValueError, OSError):
        return os.path.isfile(os.path.join(root, "manifest.json")) and manifest_remedy(root) == TEXT2IMAGE_REMEDY


def text2image_demo() -> gr.Blocks:
    from dtrak_core.text2image import app_views

    try:
        app_views.load(ASSETS)
    except Exception as e:  # as for the default: the page says what is wrong
        import traceback

        traceback.print_exc()
        return error_page(str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}",
                          text2image=True)
    return app_views.build_demo(ASSETS, cards_html=cards_html, about=ABOUT, how_to_read=HOW_TO_READ,
                                opponent_note=OPPONENT_NOTE, noise_help=NOISE_HELP, cache_sweep=CACHE_SWEEP)


def since_start() -> str:
    return f"{time.perf_counter() - STARTED:.1f} s"


def build_demo() -> gr.Blocks:
    print(f"dtrak: libraries imported ({since_start()}); loading the model folder {ASSETS} ...", file=sys.stderr,
          flush=True)
    if text2image_folder(ASSETS):
        return text2image_demo()
    try:
        a = load_assets(ASSETS)
    except Exception as e:  # any damage to the folder: the page says what, instead of a dead server
        import traceback

        traceback.print_exc()
        return error_page(str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}")
    methods, n_train, unavailable = a.methods, a.n_train, a.unavailable
    choices = sup.method_choices(methods)
    default_method = choices[0][1] if choices else None
    rankings = sup.ranking_choices(methods)  # exactly what "Remove and retrain" accepts; the default first
    default_ranking = rankings[0][1]
    # compare the default with the paper's D-TRAK (or D-TRAK with TRAK)
    second = next((m for m in ("square", "loss") if m in methods and m != default_method),
                  choices[-1][1] if choices else None)
    examples = example_uploads()
    print(f"dtrak: model folder loaded and checked ({since_start()}); building the page", file=sys.stderr, flush=True)

    with gr.Blocks(title="D-TRAK explorer", delete_cache=CACHE_SWEEP) as demo:
        batch = gr.State(None)  # the last generated batch: seeds, steps, images
        query = gr.State(None)  # the current query: key, pixels, title, seed, steps
        picked = gr.State(None)  # the training image being inspected
        compare_on = gr.State(False)  # the visitor asked for a comparison: keep it in step with the query
        cf_visited = gr.State(False)  # the Counterfactual tab has shown its first example to this visitor
        gr.Markdown(header_markdown(a))
        damaged = quick_damage(ASSETS)  # what reading a few small files finds; the rest after the samples
        damaged_md = gr.Markdown(damage_banner(damaged), visible=bool(damaged), elem_id="damaged")
        with gr.Tabs(overflow_behavior="wrap") as tabs:  # every tab in sight, on a phone too
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        mode = gr.Radio(["single", "range", "random"], value="range", label="Seeds")
                        seed = gr.Number(0, precision=0, label="Seed", visible=False)
                        with gr.Row() as range_row:
                            start = gr.Number(FIRST_SEEDS[0], precision=0, label="First seed", min_width=100)
                            end = gr.Number(FIRST_SEEDS[-1], precision=0, label="Last seed", min_width=100)
                        count = gr.Slider(1, sup.MAX_SAMPLES, 16, step=1, label="Number of random seeds", visible=False)
                        steps = gr.Slider(1, sup.MAX_DDIM_STEPS, FIRST_STEPS, step=1, label="DDIM steps")
                        gen_btn = gr.Button("Generate", variant="primary")
                    with gr.Column(scale=3):
                        gr.Markdown("**Samples** (seed: the digit the classifier sees). Click one to see which "
                                    "training images made it." if a.digits else
                                    "**Samples** (by seed). Click one to see which training images made it.")
                        gallery = gr.Gallery(label="Samples", show_label=False, columns=6, fit_columns=False,
                                             format="png", object_fit="contain", allow_preview=False, height="auto",
                                             elem_id="samples", buttons=[])
            with gr.Tab("Attribute", id="attribute"):
                with gr.Row():
                    with gr.Column(scale=1, min_width=240):
                        query_img = gr.Image(label="Query", format="png", interactive=False, height=220,
                                             buttons=[], elem_classes="pixel")
                        query_info = gr.Markdown("No query yet: click a sample in **Generate**, or upload an image.",
                                                 elem_id="query-info")
                        upload = gr.File(label="Your own image (PNG, JPEG, ...)", file_types=["image"],
                                         type="filepath", height=150, elem_id="upload")
                        sketch = gr.Sketchpad(label="Or draw a digit", type="pil", image_mode="RGBA",
                                              canvas_size=(280, 280), height=260, elem_id="sketch",
                                              brush=gr.Brush(default_size=18, colors=["#000000"],
                                                             color_mode="fixed"),
                                              layers=False, transforms=(), visible=a.digits)
                        invert = gr.Checkbox(False, label="dark ink on light paper (invert)", elem_id="invert",
                                             info="set from each upload's border; untick or tick to override")
                        example_set = gr.Dataset(components=[gr.Image(render=False, type="filepath")],
                                                 samples=[[p] for p, _ in examples], label="Try an example upload",
                                                 type="index", visible=bool(examples), elem_id="example-uploads",
                                                 sample_labels=[c for _, c in examples] or None)
                    with gr.Column(scale=3, min_width=300):
                        with gr.Row():
                            method = gr.Dropdown(choices, value=default_method, label="Method", min_width=200)
                            topk = gr.Slider(1, MAX_K, DEFAULT_K, step=1, label="Top-k shown", min_width=200,
                                             elem_id="topk")
                        summary = gr.Markdown(elem_id="summary")
                        with gr.Accordion("How to read this", open=False):
                            gr.Markdown(HOW_TO_READ)
                        prop_gallery = cards_html("proponents")
                        opp_gallery = cards_html("opponents")
                        with gr.Column(visible=False, elem_id="drill") as drill_box:
                            drill = gr.HTML(elem_id="drill-details")
                            with gr.Row():
                                use_btn = gr.Button("Use as query", variant="primary", size="sm")
                                close_btn = gr.Button("Close", size="sm")
                        with gr.Row():
                            hist = gr.Plot(label="Scores over the training set", show_label=False, elem_id="histogram",
                                           min_width=280)
                            mass = gr.Plot(label="Attribution mass per class", show_label=False, elem_id="class-mass",
                                           min_width=280)
                with gr.Accordion("Across noise levels: which training images matter at high and at low noise",
                                  open=True, elem_id="noise-levels"):
                    gr.Markdown(NOISE_HELP)
                    noise_text = gr.Markdown(elem_id="noise-text")
                    noise_plot = gr.Plot(show_label=False, elem_id="noise-plot")
                    noise_cards = cards_html("noise-cards")
                with gr.Accordion("Compare two methods", open=True):
                    with gr.Row():
                        method_b = gr.Dropdown(choices, value=second, label="Second method", scale=3, min_width=200)
                        compare_btn = gr.Button("Compare", scale=1, min_width=120)
                    compare_text = gr.Markdown()
                    with gr.Row():
                        gal_a = cards_html("compare-a")
                        gal_b = cards_html("compare-b")
            with gr.Tab("Counterfactual", id="counterfactual", visible=a.can_retrain) as cf_tab:
                gr.Markdown("Remove a generated sample's top proponents from the training set, retrain the model "
                            "from scratch with the same recipe, and regenerate the same seed (DDIM 50 steps, as "
                            "published). If the attribution is right, the digit changes more than when removing as "
                            "many random images (**pixel L2**, higher = a bigger change). One retrain runs at a time "
                            "on this server; others wait in the queue (their position is shown).")
                with gr.Row():
                    with gr.Column(scale=1, min_width=260):
                        cf_seed = gr.Number(0, precision=0, label="Target seed (set by clicking a sample)")
                        cf_k = gr.Slider(1, max(1, n_train // 2), max(1, n_train // 5), step=1,
                                         label="Training images to remove")
                        rank_a = gr.Dropdown(rankings, value=default_ranking, label="Ranking A")
                        rank_b = gr.Dropdown(rankings + [("none", NO_RANKING)], value=NO_RANKING,
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
                                                elem_id="cf-table", wrap=True,
                                                column_widths=["30%", "18%", "34%", "18%"])
                        with gr.Row():
                            removed_a = gr.Image(label="removed by ranking A", format="png", interactive=False,
                                                 buttons=[], elem_classes="pixel", height=170, min_width=240)
                            removed_b = gr.Image(label="removed by ranking B", format="png", interactive=False,
                                                 buttons=[], elem_classes="pixel", height=170, min_width=240)
                cf_examples = gr.Dataframe(headers=EXAMPLE_HEADERS, interactive=False, visible=False, wrap=True,
                                           label="Precomputed examples (click a row: instant)", elem_id="cf-examples",
                                           max_height=420, column_widths=["14%", "16%", "35%", "35%"])
                with gr.Accordion("What a pixel L2 of 1 or 3 looks like", open=False):
                    l2_html = gr.HTML(elem_id="l2-examples")
            with gr.Tab("Benchmarks", id="benchmarks") as bench_tab:
                charts = benchmarks_blocks(ASSETS)
            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT + (ABOUT_DEFAULT if a.digits else ""), latex_delimiters=[{"left": "$$", "right": "$$", "display": True},
                                                     {"left": "$", "right": "$", "display": False}])
                gr.Markdown(methods_markdown(methods, unavailable))
                if unavailable:
                    with gr.Accordion("Why some methods are unavailable, in full", open=False):
                        gr.Markdown(unavailable_details(unavailable))

        # -- wiring
        def seed_inputs(m):
            return gr.Number(visible=m == "single"), gr.Row(visible=m == "range"), gr.Slider(visible=m == "random")
        mode.change(seed_inputs, mode, [seed, range_row, count], queue=False)
        gen_inputs = [mode, seed, start, end, count, steps]
        gen_btn.click(check_generate, gen_inputs, None, concurrency_id="checks", concurrency_limit=None).success(
            generate_samples, gen_inputs, [gallery, batch], concurrency_id="compute")
        # unqueued: the first page's samples take no input and are computed once, by the warm-up
        demo.load(first_page, None, [gallery, batch], queue=False).then(
            show_damage, None, damaged_md, concurrency_id="checks", show_progress="hidden")
        if charts:
            bench_tab.select(functools.partial(draw_charts, charts, OnceCache(1)), None, [p for p, _ in charts],
                             queue=False, show_progress="hidden")

        attr_inputs, attr_outputs = [query, method, topk], [prop_gallery, opp_gallery, hist, mass, summary]
        busy = dict(concurrency_id="compute", show_progress="minimal", show_progress_on=[summary])
        cmp_inputs, cmp_outputs = [query, method, method_b, topk], [gal_a, gal_b, compare_text]

        def after_attribute(shown):
            """Once the cards and charts are shown: the noise-level view, then the comparison (if shown)."""
            shown.success(noise_view, [query, method], [noise_plot, noise_cards, noise_text], concurrency_id="compute",
                          show_progress="hidden").then(
                follow_compare, [*cmp_inputs, compare_on], cmp_outputs, concurrency_id="compute", show_progress="hidden")

        def show_query(event):
            """A new query: close the inspected training image, attribute, then the rest."""
            event.then(lambda: gr.Column(visible=False), None, drill_box, queue=False)
            after_attribute(event.success(attribute, attr_inputs, attr_outputs, **busy))

        # (unqueued: picking the query is cheap, and the attribution it leads to waits in the queue anyway)
        show_query(gallery.select(select_sample, batch, [query, tabs, query_img, query_info, cf_seed], queue=False))
        uploaded = upload.upload(read_upload, [upload], [query, query_img, query_info, invert], show_progress="hidden")
        show_query(uploaded)
        uploaded.failure(clear_upload, None, upload, queue=False)
        # a finished stroke on the canvas -> the query (the same normalisation as an upload)
        show_query(sketch.change(use_drawing, [sketch], [query, query_img, query_info, invert],
                                 show_progress="hidden", trigger_mode="always_last"))
        show_query(invert.input(use_upload, [upload, invert], [query, query_img, query_info], show_progress="hidden"))
        show_query(example_set.click(use_example, example_set, [query, query_img, query_info, invert, upload],
                                     show_progress="hidden"))
        for trigger in (method.input, topk.release):  # a burst of changes runs once, with the last value
            after_attribute(trigger(attribute, attr_inputs, attr_outputs, trigger_mode="always_last", **busy))
        compare_btn.click(compare, cmp_inputs, cmp_outputs, concurrency_id="compute").success(
            lambda: True, None, compare_on, queue=False)
        method_b.input(compare, cmp_inputs, cmp_outputs, concurrency_id="compute", trigger_mode="always_last").success(
            lambda: True, None, compare_on, queue=False)
        for cards in (prop_gallery, opp_gallery, gal_a, gal_b, noise_cards):
            cards.click(inspect_training, [query], [picked, drill, drill_box], concurrency_id="compute",
                        show_progress="minimal", trigger_mode="always_last")
        show_query(use_btn.click(use_training_image, [picked], [query, query_img, query_info, drill_box]))
        close_btn.click(lambda: gr.Column(visible=False), None, drill_box, queue=False)

        cf_outputs = [before_img, after_a, after_b, cf_table, removed_a, removed_b, cf_shown, cf_status]
        run_event = run_btn.click(run_counterfactual, [cf_seed, cf_k, rank_a, rank_b], cf_outputs,
                                  concurrency_id="retrain", concurrency_limit=1, show_progress_on=[cf_progress],
                                  js=DIM_RESULTS_JS)
        run_event.then(None, js=UNDIM_RESULTS_JS)
        cancel_btn.click(cancel_retrain, None, cf_status, cancels=[run_event], queue=False, js=UNDIM_RESULTS_JS)
        plan_inputs = [cf_seed, cf_k, rank_a, rank_b]
        for control in (cf_seed, cf_k, rank_a, rank_b):
            control.change(retrain_plan, plan_inputs, cf_estimate, queue=False, show_progress="hidden")
        cf_tab.select(retrain_plan, plan_inputs, cf_estimate, queue=False, show_progress="hidden")
        run_event.then(retrain_plan, plan_inputs, cf_estimate, queue=False, show_progress="hidden")
        demo.unload(forget_session)
        gr.api(attribute_seed, api_name="attribute_seed", concurrency_id="compute")
        cf_examples.select(show_example, None, [cf_seed, cf_k, rank_a, *cf_outputs], queue=False)
        cf_tab.select(first_visit, [cf_visited, query], [cf_seed, cf_k, rank_a, *cf_outputs, cf_examples, l2_html,
                                                         cf_visited], queue=False)
    return demo


# ---------------------------------------------------------------- serving

def client_address(request, proxies: int | None = None) -> str:
    """The visitor's address, for the per-address limits: the socket's peer when no proxy is
    trusted (`TRUSTED_PROXIES` 0, the default: X-Forwarded-For is ignored, since any client can
    write it, on a LAN too); behind n trusted proxies (1 on a Space), the n-th entry from the end
    of X-Forwarded-For, the one the outermost trusted proxy appended (what a client wrote into the
    header itself lies further left). A header with fewer entries did not pass every trusted
    proxy: the peer then. proxies: overrides `TRUSTED_PROXIES`."""
    proxies = TRUSTED_PROXIES if proxies is None else proxies
    client = getattr(request, "client", None)
    peer = getattr(client, "host", None) or "unknown"
    if proxies <= 0 or request is None:
        return peer
    headers = request.headers
    values = headers.getlist("x-forwarded-for") if hasattr(headers, "getlist") else [headers.get("x-forwarded-for", "")]
    hops = [h.strip() for h in ",".join(v for v in values if v).split(",")]
    if len(hops) < proxies or not hops[-proxies]:
        return peer
    return hops[-proxies]


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


class UploadLimits:
    """What one address may upload through Gradio's upload route, and how large the upload cache may
    grow, checked before the body is read (`admit`, from Content-Length) and once it is buffered in
    memory (`count_files`), never after it is written. Thread-safe; times are `time.monotonic()`.

    per window of `window` seconds, per address: `files` files and `mb` MB (what was admitted
    counts, whether Gradio then kept it or not); per request: `max_file_bytes` (the per-file limit)
    plus the multipart framing; all visitors together: the upload cache (Gradio's folder, swept of
    files older than 30 minutes by `CACHE_SWEEP`) at most `cache_mb` MB, uploads in flight included.
    """

    FRAMING = 64 * 1024  # multipart headers and boundaries around a file's bytes

    def __init__(self, files: int = UPLOADS_PER_WINDOW, mb: float = UPLOAD_MB_PER_WINDOW,
                 window: float = UPLOAD_WINDOW_SECONDS, cache_mb: float = UPLOAD_CACHE_MB,
                 max_file_bytes: int = MAX_UPLOAD_BYTES, cache_dir: str | None = None):
        self.files, self.bytes, self.window = int(files), int(mb * 2**20), float(window)
        self.cache_bytes, self.max_request = int(cache_mb * 2**20), int(max_file_bytes) + self.FRAMING
        self.max_file_bytes = int(max_file_bytes)
        self._cache_dir = cache_dir
        self._lock = threading.Lock()
        self._recent: dict[str, list] = {}  # address -> [[time, files, bytes], ...] in the window
        self._in_flight = 0  # bytes admitted and not yet finished
        self._measured = (-1e9, 0)  # (when, bytes) of the last walk of the cache folder

    @property
    def cache_dir(self) -> str:
        if self._cache_dir is None:
            from gradio.utils import get_upload_folder

            self._cache_dir = get_upload_folder()
        return self._cache_dir

    def cache_size(self, max_age: float = 2.0) -> int:
        """Bytes in the upload cache folder, walked at most every `max_age` seconds."""
        now = time.monotonic()
        with self._lock:
            when, size = self._measured
        if now - when <= max_age:
            return size
        size = 0
        for folder, _, names in os.walk(self.cache_dir):
            for name in names:
                try:
                    size += os.lstat(os.path.join(folder, name)).st_size
                except OSError:  # swept meanwhile
                    pass
        with self._lock:
            self._measured = (now, size)
        return size

    def _used(self, address: str, now: float) -> tuple[int, int, float]:
        """(files, bytes, seconds until the oldest leaves the window) of `address` in the window."""
        recent = [r for r in self._recent.get(address, []) if now - r[0] < self.window]
        if recent:
            self._recent[address] = recent
        else:
            self._recent.pop(address, None)
        wait = self.window - (now - recent[0][0]) if recent else 0.0
        return sum(r[1] for r in recent), sum(r[2] for r in recent), wait

    def admit(self, address: str, length: int | None):
        """(entry, None) when a request of `length` bytes from `address` may go on (the entry is what
        `count_files` and `done` take), else (None, (status, message, retry-after seconds or None))."""
        mb = _size
        if length is None:
            return None, (411, "An upload must say its size (Content-Length).", None)
        if length > self.max_request:
            return None, (413, f"The file is over {mb(self.max_file_bytes)}, the upload limit of this server.", None)
        cached = self.cache_size()
        now = time.monotonic()
        with self._lock:
            if len(self._recent) > 1000:  # forget the addresses that have left the window
                for other in list(self._recent):
                    self._used(other, now)
            files, used, wait = self._used(address, now)
            if files + 1 > self.files or used + length > self.bytes:
                return None, (429, f"Too many uploads from your address: {files} file(s), {mb(used)} in the last "
                                   f"{self.window / 60:.0f} minutes (the limit is {self.files} files and "
                                   f"{mb(self.bytes)}). Try again in {wait:.0f} s.", max(1, int(wait + 1)))
            if cached + self._in_flight + length > self.cache_bytes:
                return None, (503, "The server's upload space is full (uploads are kept 30 minutes); try again in a "
                                   "few minutes.", 60)
            entry = [now, 1, length]
            self._recent.setdefault(address, []).append(entry)
            self._in_flight += length
        return entry, None

    def count_files(self, address: str, entry: list, files: int):
        """None when the `files` files of an admitted request fit the address's window, else its refusal."""
        with self._lock:
            entry[1] = max(1, files)
            total, _, wait = self._used(address, time.monotonic())
            if total > self.files:
                return (429, f"Too many files from your address: this request holds {files}, and the limit is "
                             f"{self.files} files in {self.window / 60:.0f} minutes. Try again in {wait:.0f} s.",
                        max(1, int(wait + 1)))
        return None

    def done(self, entry: list) -> None:
        with self._lock:
            self._in_flight -= entry[2]
            when, size = self._measured  # what it wrote counts until the next walk of the folder
            self._measured = (when, size + entry[2])


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{max(1, round(n / 1024))} KB"


def _multipart_parts(content_type: str, body: bytes) -> int:
    """How many parts (files) a multipart body holds, counted by its boundary (1 when it has none)."""
    import re

    found = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if not found:
        return 1
    return max(1, body.count(b"--" + found.group(1).strip().encode("latin-1")) - 1)


class UploadGate:
    """ASGI middleware in front of Gradio's upload route (POST .../gradio_api/upload): an upload over
    its address's window or the cache's size is refused (HTTP 429, 413, 411 or 503, with a message
    a person can read, and Retry-After) before its body is written to disk; an admitted one is read
    into memory (at most the per-file limit plus framing), its files counted, and then handed to
    Gradio as it came. Everything else passes untouched. `limits`: an `UploadLimits`."""

    def __init__(self, app, limits: UploadLimits):
        self.app, self.limits = app, limits

    @staticmethod
    def is_upload(scope) -> bool:
        return (scope["type"] == "http" and scope.get("method") == "POST"
                and scope.get("path", "").rstrip("/").endswith("/gradio_api/upload"))

    async def __call__(self, scope, receive, send):
        if not self.is_upload(scope):
            return await self.app(scope, receive, send)
        from starlette.requests import Request

        request = Request(scope)
        address = client_address(request)
        try:
            length = int(request.headers["content-length"])
            length = length if length >= 0 else None
        except (KeyError, ValueError):
            length = None
        entry, refusal = self.limits.admit(address, length)
        if refusal is not None:
            if length is not None and length <= self.limits.max_request:
                await self._drain(receive)  # so that the client reads the answer instead of a reset connection
            return await self._refuse(send, *refusal)
        try:
            body, complete = await self._read(receive, length)
            if not complete:
                return await self._refuse(send, 400, "The upload's body does not match its Content-Length.", None)
            refusal = self.limits.count_files(address, entry, _multipart_parts(request.headers.get("content-type"),
                                                                                body))
            if refusal is not None:
                return await self._refuse(send, *refusal)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: the disconnect, when it comes
            return await self.app(scope, replay, send)
        finally:
            self.limits.done(entry)

    async def _read(self, receive, length: int) -> tuple[bytes, bool]:
        """(the body, whether it came whole): at most `length` bytes, which must all come."""
        chunks, got = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", False
            chunk = message.get("body", b"")
            got += len(chunk)
            if got > length:
                return b"", False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), got == length

    async def _drain(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return

    async def _refuse(self, send, status: int, message: str, retry_after) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if retry_after is not None:
            headers.append((b"retry-after", str(int(retry_after)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": message.encode()})


def bound_uploads(demo: gr.Blocks, limits: UploadLimits | None = None) -> UploadLimits:
    """Put `UploadGate` in front of the upload route of every server `demo.launch` starts from now
    on, with the per-file limit (max_file_size) set: Gradio builds its FastAPI app inside `launch`,
    so the gate goes in through launch's public `app_kwargs` (FastAPI's `middleware`). Returns the
    limits in force (their counts are shared by every launch of this demo)."""
    from starlette.middleware import Middleware

    limits = UploadLimits() if limits is None else limits
    launch = getattr(demo, "_dtrak_unbounded_launch", None) or demo.launch
    demo._dtrak_unbounded_launch = launch
    demo.upload_limits = limits

    def bounded_launch(*args, app_kwargs=None, max_file_size=None, **kwargs):
        app_kwargs = dict(app_kwargs or {})
        app_kwargs["middleware"] = [*app_kwargs.get("middleware", []), Middleware(UploadGate, limits=demo.upload_limits)]
        return launch(*args, app_kwargs=app_kwargs, max_file_size=demo.upload_limits.max_file_bytes
                      if max_file_size is None else max_file_size, **kwargs)

    demo.launch = bounded_launch
    return limits


def configure(demo: gr.Blocks, per_session: int = MAX_PENDING_PER_SESSION,
              per_client: int = MAX_PENDING_PER_CLIENT, uploads: UploadLimits | None = None) -> gr.Blocks:
    """Queue and limits for serving `demo` to many visitors (also used by the tests' servers): the
    queue bounded per session and per address (`bound_queue_per_visitor`), uploads per address and
    the upload cache (`bound_uploads`; uploads: the limits, default from the DTRAK_UPLOAD_*
    environment variables).

    The visitor's address is decided by `client_address` alone, from DTRAK_TRUSTED_PROXIES: uvicorn's
    own X-Forwarded-For handling, which believes the header from any loopback peer by default, is
    turned off (FORWARDED_ALLOW_IPS, read when the server starts)."""
    os.environ["FORWARDED_ALLOW_IPS"] = ""
    demo.queue(max_size=64, default_concurrency_limit=2)
    bound_queue_per_visitor(demo._queue, per_session, per_client)
    bound_uploads(demo, uploads)
    return demo


def warm_up() -> None:
    """What a first visitor would otherwise wait for, computed once in the background after the
    server is up: the page's first samples and the digit classifier; then, once a page has shown
    its samples (or after FIRST_PAGE_WAIT), the default method's scorer and featurizer and the full
    check of the files (the page's banner waits for it). No more: on a busy server the warm-up
    competes with real requests (the second method, the counterfactual examples and the
    retrain-time measurement are made when first asked for)."""
    def step(what, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a cache stays cold; the request that needs it computes (or reports) it
            print(f"dtrak: warm-up of {what} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return
        print(f"dtrak: warmed {what} in {time.perf_counter() - t0:.1f} s ({since_start()} after start)", file=sys.stderr)

    if text2image_folder(ASSETS):
        from dtrak_core.text2image import app_views

        return app_views.warm_up(ASSETS)
    _warming.set()
    try:
        _warm(step)
    finally:
        _warm_done.set()


def _warm(step) -> None:
    try:
        a = load_assets(ASSETS)
    except (ValueError, OSError):
        return  # the error page is up: nothing to warm
    first = []
    step("the first page's samples", lambda: first.append(samples(FIRST_SEEDS, FIRST_STEPS)))
    if not first:
        return
    step("the digit classifier", lambda: digit_labels(first[0].numpy()))
    # the scorer and featurizer take seconds of both cores: not while a first visitor's browser is
    # still drawing the page and asking for its samples
    _page_served.wait(FIRST_PAGE_WAIT)
    q = sample_query(FIRST_SEEDS[0], FIRST_STEPS, first[0][0].numpy())
    for _, m in sup.method_choices(a.methods)[:1]:
        # the charts too: plotly builds its figure classes on first use, which a first click would wait for
        step(f"{sup.method_label(m)} and its charts", lambda m=m: (
            viz.score_histogram(attribution_for(q, m), DEFAULT_K), viz.class_mass_figure(attribution_for(q, m))))
    step("the full check of the files (TracInCP checkpoints, precomputed results)", lambda: full_check(ASSETS))


def serve(demo: gr.Blocks) -> None:
    """`python app.py`: serve at once, then warm the caches in a background thread."""
    configure(demo)
    demo.launch(max_file_size=MAX_UPLOAD_BYTES, show_error=True, css=CSS, theme=gr.themes.Soft(),
                footer_links=["gradio"], head=page_head(), prevent_thread_lock=True)
    print(f"dtrak: serving ({since_start()} after start)", file=sys.stderr, flush=True)
    start_warm_up()
    demo.block_thread()


_warm_up_started = threading.Lock()


def start_warm_up() -> None:
    """`warm_up` in a background thread, once per process."""
    if _warm_up_started.acquire(blocking=False):
        threading.Thread(target=warm_up, name="dtrak-warm-up", daemon=True).start()


if __name__ == "__main__":  # the first page's samples are computed while the page is built
    start_warm_up()
demo = build_demo()

if __name__ == "__main__":
    serve(demo)
