"""The Generate tab: seeds and DDIM steps in, a gallery of samples out; a click makes a sample the query."""
from __future__ import annotations

import threading

import gradio as gr
import torch

from dtrak_core import app_support as sup
from dtrak_core.images import to_pil
from dtrak_core.model.sampling import generate
from dtrak_core.shared import OnceCache
from dtrak_core.ui.state import (
    ERROR_SECONDS,
    THUMB_PX,
    assets,
    current_root,
    digit_labels,
    query_view,
    readable,
    sample_query,
)

FIRST_SEEDS, FIRST_STEPS = list(range(16)), 50  # what the Generate tab's controls show on a new page
_samples_cache = OnceCache(64)  # (root, seeds, steps) -> images (B, C, H, W), the same for every visitor
page_served = threading.Event()  # a page has had its samples (the warm-up's later steps wait for it)


@readable
def generate_samples(mode, seed, start, end, count, steps, progress=gr.Progress()):
    """Seeds + DDIM steps -> gallery items and the batch (kept in session state)."""
    a = assets()
    seeds = sup.parse_seeds(mode, seed, start, end, count)
    steps = sup.parse_steps(steps)
    images = samples(seeds, steps, progress=lambda i, n: progress((i, n), desc="DDIM sampling"))
    found = digit_labels(images.numpy())
    captions = [f"seed {s}" + ("" if found is None else f": {a.label_name(found[0][i])}") for i, s in enumerate(seeds)]
    items = [(to_pil(img, a.scale(2 * THUMB_PX), a.attributor.input_range), c) for img, c in zip(images, captions)]
    page_served.set()
    return items, {"seeds": seeds, "steps": steps, "images": images.numpy()}


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
    """The DDIM samples (B, C, H, W) of these seeds, computed once per (folder, seeds, steps)."""
    a = assets()
    return _samples_cache.get((current_root(), tuple(seeds), steps), lambda: generate(
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
    return (q, gr.Tabs(selected="attribute"), *query_view(q), q.seed)


def samples_note(a) -> str:
    """The line above the samples: what each caption says (the class a classifier sees, where the
    folder has one)."""
    seen = ("the digit the classifier sees" if a.digits else
            "the class the folder's classifier sees" if a.classifier is not None else None)
    return f"**Samples** ({'by seed' if seen is None else f'seed: {seen}'}). Click one to see which training images made it."


def create_ui(a) -> dict:
    """The tab's components (inside a gr.Tab)."""
    with gr.Row(elem_id="gen-row"):  # on a phone the samples come first (texts/style.css)
        with gr.Column(scale=1, min_width=260, elem_id="gen-controls"):
            mode = gr.Radio(["single", "range", "random"], value="range", label="Seeds")
            seed = gr.Number(0, precision=0, label="Seed", visible=False)
            with gr.Row() as range_row:
                start = gr.Number(FIRST_SEEDS[0], precision=0, label="First seed", min_width=100)
                end = gr.Number(FIRST_SEEDS[-1], precision=0, label="Last seed", min_width=100)
            count = gr.Slider(1, sup.MAX_SAMPLES, 16, step=1, label="Number of random seeds", visible=False)
            steps = gr.Slider(1, sup.MAX_DDIM_STEPS, FIRST_STEPS, step=1, label="DDIM steps")
            gen_btn = gr.Button("Generate", variant="primary")
        with gr.Column(scale=3, elem_id="gen-samples"):
            gr.Markdown(samples_note(a))
            gallery = gr.Gallery(label="Samples", show_label=False, columns=6, fit_columns=False,
                                 format="png", object_fit="contain", allow_preview=False, height="auto",
                                 elem_id="samples", buttons=[])
    return dict(mode=mode, seed=seed, range_row=range_row, start=start, end=end, count=count, steps=steps,
                gen_btn=gen_btn, gallery=gallery)


def create_event_handlers(c: dict, bind) -> None:
    """c: the page's components; bind(fn): fn run on this page's folder."""
    def seed_inputs(m):
        return gr.Number(visible=m == "single"), gr.Row(visible=m == "range"), gr.Slider(visible=m == "random")
    c["mode"].change(seed_inputs, c["mode"], [c["seed"], c["range_row"], c["count"]], queue=False)
    gen_inputs = [c[n] for n in ("mode", "seed", "start", "end", "count", "steps")]
    c["gen_btn"].click(bind(check_generate), gen_inputs, None, concurrency_id="checks", concurrency_limit=None).success(
        bind(generate_samples), gen_inputs, [c["gallery"], c["batch"]], concurrency_id="compute")
