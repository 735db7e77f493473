"""The Attribute tab: a query (a clicked sample, an upload, a drawing, a training image) and its
proponents, opponents, score histogram, per-class mass, noise-level view and a second method beside it."""
from __future__ import annotations

import io
import os
import tempfile

import gradio as gr
import numpy as np
import torch

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.attributor import Attribution
from dtrak_core.images import load_user_image
from dtrak_core.model.data import to_input_range
from dtrak_core.query import Query
from dtrak_core.shared import OnceCache
from dtrak_core.ui import texts
from dtrak_core.ui.generate import samples, select_sample
from dtrak_core.ui.state import (
    ERROR_SECONDS,
    assets,
    cards_html,
    current_root,
    digit_labels,
    load_assets,
    no_query,
    once_per_root,
    query_view,
    readable,
    sample_query,
    training_cards,
)

DEFAULT_K = 8
MAX_K = sup.MAX_TOP_K
NOISE_BUCKETS = 10
# results keyed by the whole request (the folder too), so they are the same for every visitor who asks
_attribution_cache = OnceCache(256)  # (root, QueryKey, pixels key, method) -> Attribution
_noise_cache = OnceCache(128)  # (root, QueryKey, pixels key, method, buckets) -> NoiseLevels
_reference_cache = OnceCache(16)  # (root, store setting, buckets) -> NoiseReference, the same for every query



def attribution_for(q, method: str) -> Attribution:
    """Scores of any method (TRAK family or baseline) for a query, cached per (query, method)."""
    a = assets()
    method = sup.parse_method(method, a.methods)

    def compute():
        seeds = None if q.seed is None else [q.seed]  # journey-trak follows the sample's own trajectory
        scores = registry.scores(a.attributor, method, torch.as_tensor(q.pixels)[None], seeds, root=a.root)[0]
        return Attribution(method, scores, a.attributor.train.labels.numpy(), a.attributor.train)
    # the pixels too: a seed's sample differs in the last bits with the batch it was generated in
    return _attribution_cache.get((current_root(), q.key, q.pixels_key, method), compute)


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


OPPONENT_NOTE = ("Opponents are often the query's own class: an image like the query but {unlike} pulls the "
                 "model towards its own version, so the largest scores of both signs go to similar images.")


def opponent_note(digits: bool) -> str:
    """Why opponents share the query's class, in the words of the folder's data."""
    return OPPONENT_NOTE.format(unlike=texts.words(digits)["unlike"])


@readable
def attribute(q, method, k, progress=gr.Progress()):
    """Query + method -> proponents, opponents, histogram, per-class mass, summary."""
    if q is None:
        raise no_query()
    k = sup.parse_top_k(k)
    progress(0, desc=f"attributing with {sup.method_label(method)}")
    result = attribution_for(q, method)
    prop, opp = result.proponents(k), result.opponents(k) if result.signed else []
    found, a = digit_labels(q.pixels[None]), assets()
    if found is None:
        summary = f"**{sup.method_label(method)}**: the top-{k} proponents{' and opponents' * result.signed} of this query."
    else:
        digit = found[0][0]
        shown = f"{digit}s" if a.digits else f"of the class **{a.label_name(digit)}**"
        opposed = f" and **{int((result.labels[opp] == digit).sum())} of {k}** top opponents" * result.signed
        summary = (f"**{sup.method_label(method)}**: **{int((result.labels[prop] == digit).sum())} of {k}** top "
                   f"proponents{opposed} are {shown}, the {a.class_word} the classifier sees in the query.")
    summary += "\n\n" + lookalike_line(q, method, k)
    opp_note = (opponent_note(a.digits) if found is not None else "") if result.signed else sup.no_opponents(method)
    return (training_cards(result, prop, f"Top-{k} proponents (index · class · score)"),
            training_cards(result, opp, f"Top-{k} opponents" if result.signed else "No opponents", opp_note),
            viz.score_histogram(result, k), viz.class_mass_figure(result, a.class_word, a.class_names), summary)


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


def method_line(method, available) -> str:
    """One line under the method menu: the method's group, whether its scores are signed, whether it
    is the default among `available`, and what it scores by (all from the registry)."""
    try:
        m = registry.get(method)
    except ValueError:
        return ""
    default = " · **the default**" if method == registry.default_method(available) else ""
    sign = "signed: proponents and opponents" if m.signed else "unsigned: proponents only"
    return f"*{m.group}* · {sign}{default} — {m.description}"


def method_about(method) -> str:
    return method_line(method, assets().methods)


SCALE_NOTE = (" The two rank the whole training set on different scales ({why}), so most of the {n:,} scores order "
              "differently even where their top-{k} agree: compare the overlap, not ρ.")


def scale_note(method_a: str, method_b: str, k: int, n: int) -> str:
    """Why a high top-k overlap can come with a low rank correlation: a sharpened (s|s|) or unsigned
    method beside a signed one."""
    a, b = registry.get(method_a), registry.get(method_b)
    sharp = [m for m in (a, b) if m in registry.sharpened(m.store or "")]
    if a.signed != b.signed:
        why = "one is signed, the other a similarity with no sign"
    elif sharp and len(sharp) == 1:
        why = f"{sharp[0].label} squares each score's size, s|s|, keeping its sign"
    else:
        return ""
    return SCALE_NOTE.format(why=why, n=n, k=k)


def compare_text(ra, rb, k: int) -> str:
    """Two attributions of one query side by side: their top-k overlap and rank correlation, and
    why the two can disagree on the whole ranking (`scale_note`)."""
    return (f"**{sup.method_label(ra.method)}** vs **{sup.method_label(rb.method)}**: "
            f"top-{k} overlap **{sup.top_k_overlap(ra.scores, rb.scores, k)} of {k}**; Spearman rank correlation "
            f"of all {len(ra.scores):,} scores **ρ = {sup.rank_correlation(ra.scores, rb.scores):.3f}**."
            + scale_note(ra.method, rb.method, k, len(ra.scores)))


@readable
def compare(q, method_a, method_b, k, progress=gr.Progress()):
    """Two methods on the same query: both top-k grids, their overlap and rank correlation."""
    if q is None:
        raise no_query()
    k = sup.parse_top_k(k)
    progress(0, desc="attributing with both methods")
    return compare_views(attribution_for(q, method_a), attribution_for(q, method_b), k, training_cards)


def compare_views(ra, rb, k: int, card_fn) -> tuple:
    """Compare's outputs on either folder kind: both top-k grids (drawn by the page's `card_fn`)
    and the text that relates them."""
    return (card_fn(ra, ra.proponents(k), f"{sup.method_label(ra.method)}: top-{k} proponents"),
            card_fn(rb, rb.proponents(k), f"{sup.method_label(rb.method)}: top-{k} proponents"),
            compare_text(ra, rb, k))


def following(compare_fn):
    """A page's follow-compare handler: keeps its comparison (`compare_fn(q, a, b, k)`) in step with
    the query, methods and top-k once it has been asked for (`shown`); a failure is said in its text."""
    def follow_compare(q, method_a, method_b, k, shown):
        if not shown or q is None:
            return gr.update(), gr.update(), gr.update()
        try:
            return compare_fn(q, method_a, method_b, k)
        except gr.Error as e:
            return "", "", f"Comparison not available: {e.message}"
    return follow_compare


follow_compare = following(compare)


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
    levels = _noise_cache.get((current_root(), q.key, q.pixels_key, method, NOISE_BUCKETS), lambda: sup.noise_levels(
        a.attributor, torch.as_tensor(q.pixels), split, NOISE_BUCKETS, lam=lam, reference=noise_reference(split)))
    labels = a.attributor.train.labels.numpy()
    text = noise_summary(levels, note)
    return (viz.noise_level_figure(levels, labels, a.class_word, class_names=a.class_names),
            viz.noise_level_cards(a.attributor.train, levels, a.class_word, a.class_names), text)


def noise_summary(levels, note: str = "", gradient: str = "gradient", image: str = "training image") -> str:
    """What the noise-level view of `levels` (centred on its reference) shows, in one paragraph."""
    last = len(levels.timesteps) - 1
    low, high = int(levels.top(0, 1)[0]), int(levels.top(last, 1)[0])
    shared = int(np.argmax(levels.reference[last]))
    share = np.abs(levels.centred).sum(1)
    share = share / share.sum()
    return (f"Each column is one range of the {len(levels.timesteps)} noise levels the query's {gradient} is averaged "
            f"over, minus that range's average over {levels.references} generated samples. At high noise the noisy "
            f"image is almost all noise, the same for every query, so that part of the score barely depends on the "
            f"query (uncentred, {image} #{shared} would lead there for any query); centred, the columns show "
            f"what is specific to this query and no longer sum to its score. At low noise ({levels.labels()[0]}) "
            f"{image} **#{low}** matters most, at high noise ({levels.labels()[-1]}) **#{high}**; of the "
            f"query-specific score mass the lowest-noise range carries {percent(share[0])}, the highest "
            f"{percent(share[-1])}.{note}")


def percent(share: float) -> str:
    """A share as a whole percentage, 'under 1%' for a small non-zero one (not a misleading '0%')."""
    return "under 1%" if 0 < share < 0.005 else f"{share:.0%}"


def noise_reference(method: str):
    """The noise-level view's reference for a store (`app_support.reference_features`), computed once
    per folder, store and bucket count: a few seconds, then shared by every query."""
    a = assets()
    setting, _ = a.attributor.setting(method)
    return _reference_cache.get((current_root(), setting, NOISE_BUCKETS),
                                lambda: sup.reference_features(a.attributor, method, NOISE_BUCKETS))


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


COMPUTING = "Computing its scores for this query"


def _details(q, index: int, attributions: dict) -> str:
    a = assets()
    return viz.training_image_details(a.attributor.train, index, sup.ranks_under_methods(attributions, index),
                                      a.class_word)


@readable
def preview_training(q, evt: gr.EventData):
    """A click on a training card, answered at once: that image large, its class, and its rank and
    score under every method already computed for the query (the others say they are computing;
    `rank_training`, chained after it, fills them in)."""
    if q is None:
        raise no_query()
    index = clicked_index(evt)
    root = current_root()
    known = {m: _attribution_cache.peek((root, q.key, q.pixels_key, m)) for m in assets().methods}
    known = {m: ValueError(COMPUTING) if r is None else r for m, r in known.items()}
    return index, _details(q, index, known), gr.Column(visible=True)


@readable
def rank_training(q, index):
    """Training image `index` (the card clicked) under every method for the current query."""
    if q is None:
        raise no_query()
    index = sup.parse_int(index, "training image index", 0, assets().n_train - 1)
    return _details(q, index, all_attributions(q))


@readable
def use_training_image(index):
    """'Use as query': the inspected training image becomes the query."""
    a = assets()
    index = sup.parse_int(index, "training image index", 0, a.n_train - 1)
    pixels = a.attributor.train.images[index].numpy()
    label = int(a.attributor.train.labels[index])
    q = Query.training(index, pixels, f"Training image #{index}" + (f" ({a.class_text(label)})" if label >= 0 else ""))
    return (q, *query_view(q), gr.Column(visible=False))


def _load_upload(path, invert: bool, name: str | None = None):
    """The one path every upload, example upload and drawing goes through: validated, and for the
    digits model normalised to the training digits' form (cropped to the ink, centred, scaled, contrast
    and strokes normalised: `images.normalise_digit`); other models' images are centre-cropped and resized."""
    attributor = assets().attributor
    unet = attributor.unet
    try:
        return to_input_range(load_user_image(path, unet.config.sample_size, unet.config.in_channels, invert=invert,
                                              normalise=assets().digits), attributor.input_range)
    except ValueError as e:
        raise gr.Error(f"Could not use {name or os.path.basename(path)}: {e}", title="Not a usable image",
                       duration=ERROR_SECONDS) from None


def _upload_query(path, invert: bool, name: str | None = None):
    invert = sup.parse_bool(invert, "the ink setting (invert)" if assets().digits else "the invert setting")
    pixels = _load_upload(path, invert, name).numpy()
    name = name or f"Your image {os.path.basename(path)}"
    q = Query.upload(pixels, f"{name}{' (inverted)' if invert else ''}, "
                             f"as the model sees it ({pixels.shape[-1]}x{pixels.shape[-2]})")
    img, info = query_view(q)
    warning = sup.unusual_ink(pixels, assets().attributor.train.images.numpy(), digits=assets().digits)
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
    digits = assets().digits
    invert = digits and sup.light_paper(plain.numpy())
    q, img, info = _upload_query(path, invert, name)
    if not digits:  # no ink to detect: used as it is, unless the visitor ticks invert
        return q, img, info, invert
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


def example_uploads() -> list:
    """[(path, caption)] of the folder's example uploads, written once per process into a temporary folder."""
    return _example_uploads(current_root())


@once_per_root
def _example_uploads(root: str) -> list:
    if not load_assets(root).digits:
        return []
    from dtrak_core.model.data import load_digits

    return sup.write_example_uploads(tempfile.mkdtemp(prefix="dtrak-examples-"), load_digits("validation"))


# ---------------------------------------------------------------- handlers: counterfactual


def create_ui(a) -> dict:
    """The tab's components (inside a gr.Tab)."""
    choices = sup.method_choices(a.methods)
    default_method = choices[0][1] if choices else None
    # compare the default with the paper's D-TRAK (or D-TRAK with TRAK)
    second = next((m for m in ("square", "loss") if m in a.methods and m != default_method),
                  choices[-1][1] if choices else None)
    examples = example_uploads()
    # on a phone: the query, then its results, then the controls for an image of your own (texts/style.css)
    with gr.Row(elem_id="attr-row"):
        with gr.Column(scale=1, min_width=240, elem_id="attr-left"):
            query_img = gr.Image(label="Query", format="png", interactive=False, height=220,
                                 buttons=[], elem_classes="pixel", elem_id="query-image")
            query_info = gr.Markdown("No query yet: click a sample in **Generate**, or upload an image.",
                                     elem_id="query-info")
            with gr.Column(elem_id="own-image"):
                upload = gr.File(label="Your own image (PNG, JPEG, ...)", file_types=["image"],
                                 type="filepath", height=150, elem_id="upload")
                sketch = gr.Sketchpad(label="Or draw a digit" if a.digits else "Or draw", type="pil", image_mode="RGBA",
                                      canvas_size=(280, 280), height=260, elem_id="sketch",
                                      brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"),
                                      layers=False, transforms=(), visible=a.digits)
                invert = gr.Checkbox(False, label="dark ink on light paper (invert)" if a.digits else
                                     "use the image's negative (invert)", elem_id="invert",
                                     info="set from each upload's border; untick or tick to override" if a.digits else
                                     "for an image whose brightness is the other way round from the training images'")
                example_set = gr.Dataset(components=[gr.Image(render=False, type="filepath")],
                                         samples=[[p] for p, _ in examples], label="Try an example upload",
                                         type="index", visible=bool(examples), elem_id="example-uploads",
                                         sample_labels=[c for _, c in examples] or None)
        with gr.Column(scale=3, min_width=300, elem_id="attr-results"):
            method, topk, about, summary, prop_gallery, opp_gallery = ranking_blocks(
                a, choices, default_method, MAX_K, DEFAULT_K)
            results = drill_and_charts()
    results.update(noise_and_compare(a, choices, second, "training images"))
    return dict(query_img=query_img, query_info=query_info, upload=upload, sketch=sketch, invert=invert,
                example_set=example_set, method=method, topk=topk, summary=summary, prop_gallery=prop_gallery,
                opp_gallery=opp_gallery, about=about, **results)


def ranking_blocks(a, choices, default_method, max_k: int, default_k: int) -> tuple:
    """A query's ranking on either folder kind: the method menu and top-k slider, the method's line,
    the summary, how to read it, and the proponent and opponent cards."""
    with gr.Row():
        method = gr.Dropdown(choices, value=default_method, label="Method", min_width=200)
        topk = gr.Slider(1, max_k, default_k, step=1, label="Top-k shown", min_width=200, elem_id="topk")
    about = gr.Markdown(method_line(default_method, a.methods), elem_id="method-about")
    summary = gr.Markdown(elem_id="summary")
    with gr.Accordion("How to read this", open=False):
        gr.Markdown(texts.fill(texts.get("how_to_read.md"), **a.words))
    return method, topk, about, summary, cards_html("proponents"), cards_html("opponents")


def drill_and_charts() -> dict:
    """Under the cards, on either folder kind: the drill-down box (hidden until a card is clicked)
    and the two charts of the whole ranking."""
    with gr.Column(visible=False, elem_id="drill") as drill_box:
        drill = gr.HTML(elem_id="drill-details")
        with gr.Row():
            use_btn = gr.Button("Use as query", variant="primary", size="sm")
            close_btn = gr.Button("Close", size="sm")
    with gr.Row():
        hist = gr.Plot(label="Scores over the training set", show_label=False, elem_id="histogram", min_width=280)
        mass = gr.Plot(label="Attribution mass per class", show_label=False, elem_id="class-mass", min_width=280)
    return dict(drill_box=drill_box, drill=drill, use_btn=use_btn, close_btn=close_btn, hist=hist, mass=mass)


def noise_and_compare(a, choices, second, images: str) -> dict:
    """The two accordions below a query's results, on either folder kind: the noise-level view and
    Compare. `images` names what the folder attributes to ("training images", "fine-tuning images")."""
    with gr.Accordion(f"Across noise levels: which {images} matter at high and at low noise",
                      open=True, elem_id="noise-levels"):
        gr.Markdown(texts.fill(texts.get("noise_help.md"), **a.words) + "\n" + texts.get("noise_centred.md"))
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
    return dict(noise_text=noise_text, noise_plot=noise_plot, noise_cards=noise_cards, method_b=method_b,
                compare_btn=compare_btn, compare_text=compare_text, gal_a=gal_a, gal_b=gal_b)


def create_event_handlers(c: dict, bind, api_name: str = "attribute_seed") -> None:
    """c: the page's components (with the states `query`, `picked`, `compare_on`, `batch`, the
    `tabs` and the counterfactual's `cf_seed`); bind(fn): fn run on this page's folder."""
    query = c["query"]
    attr_inputs = [query, c["method"], c["topk"]]
    attr_outputs = [c["prop_gallery"], c["opp_gallery"], c["hist"], c["mass"], c["summary"]]
    busy = dict(concurrency_id="compute", show_progress="minimal", show_progress_on=[c["summary"]])
    cmp_inputs, cmp_outputs = [query, c["method"], c["method_b"], c["topk"]], [c["gal_a"], c["gal_b"], c["compare_text"]]
    query_outputs = [query, c["query_img"], c["query_info"]]

    def after_attribute(shown):
        """Once the cards and charts are shown: the noise-level view, then the comparison (if shown)."""
        shown.success(bind(noise_view), [query, c["method"]], [c["noise_plot"], c["noise_cards"], c["noise_text"]],
                      concurrency_id="compute", show_progress="hidden").then(
            bind(follow_compare), [*cmp_inputs, c["compare_on"]], cmp_outputs, concurrency_id="compute",
            show_progress="hidden")

    def show_query(event):
        """A new query: close the inspected training image, attribute, then the rest."""
        event.then(lambda: gr.Column(visible=False), None, c["drill_box"], queue=False)
        after_attribute(event.success(bind(attribute), attr_inputs, attr_outputs, **busy))

    # (unqueued: picking the query is cheap, and the attribution it leads to waits in the queue anyway)
    show_query(c["gallery"].select(bind(select_sample), c["batch"],
                                   [query, c["tabs"], c["query_img"], c["query_info"], c["cf_seed"]], queue=False))
    uploaded = c["upload"].upload(bind(read_upload), [c["upload"]], [*query_outputs, c["invert"]],
                                  show_progress="hidden")
    show_query(uploaded)
    uploaded.failure(clear_upload, None, c["upload"], queue=False)
    # a finished stroke on the canvas -> the query (the same normalisation as an upload)
    show_query(c["sketch"].change(bind(use_drawing), [c["sketch"]], [*query_outputs, c["invert"]],
                                  show_progress="hidden", trigger_mode="always_last"))
    show_query(c["invert"].input(bind(use_upload), [c["upload"], c["invert"]], query_outputs, show_progress="hidden"))
    show_query(c["example_set"].click(bind(use_example), c["example_set"], [*query_outputs, c["invert"], c["upload"]],
                                      show_progress="hidden"))
    c["method"].change(bind(method_about), c["method"], c["about"], queue=False, show_progress="hidden")
    for trigger in (c["method"].input, c["topk"].release):  # a burst of changes runs once, with the last value
        after_attribute(trigger(bind(attribute), attr_inputs, attr_outputs, trigger_mode="always_last", **busy))
    c["compare_btn"].click(bind(compare), cmp_inputs, cmp_outputs, concurrency_id="compute").success(
        lambda: True, None, c["compare_on"], queue=False)
    c["method_b"].input(bind(compare), cmp_inputs, cmp_outputs, concurrency_id="compute",
                        trigger_mode="always_last").success(lambda: True, None, c["compare_on"], queue=False)
    for cards in (c["prop_gallery"], c["opp_gallery"], c["gal_a"], c["gal_b"], c["noise_cards"]):
        # the image and what is known at once (unqueued, nothing computed), then every method's rank
        cards.click(bind(preview_training), [query], [c["picked"], c["drill"], c["drill_box"]], queue=False,
                    show_progress="hidden", trigger_mode="always_last").success(
            bind(rank_training), [query, c["picked"]], c["drill"], concurrency_id="compute", show_progress="minimal")
    show_query(c["use_btn"].click(bind(use_training_image), [c["picked"]], [*query_outputs, c["drill_box"]]))
    c["close_btn"].click(lambda: gr.Column(visible=False), None, c["drill_box"], queue=False)
    gr.api(bind(attribute_seed), api_name=api_name, concurrency_id="compute")
