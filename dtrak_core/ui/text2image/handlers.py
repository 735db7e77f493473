"""The page's texts and its handlers: plain functions of the request values, run on the page's
folder (`state.bound`); `layout` wires them to the components.
"""
import html
import shlex

import gradio as gr
import torch

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.folder import read_manifest
from dtrak_core.images import to_pil
from dtrak_core.text2image.data import digit_caption
from dtrak_core.ui.attribute import compare_views, following, method_line, noise_summary, opponent_note
from dtrak_core.ui.state import current_root, listed, no_query, readable
from dtrak_core.ui.text2image.benchmarks import digit_span, lds_command, miniature_digits, read_lds
from dtrak_core.ui.text2image.folder import (
    QUERY_PX,
    TextToImageAssets,
    all_attributions,
    attribute_prompt,
    attribution_for,
    digit_labels,
    generate_samples,
    load,
    lora_recipe,
    noise_levels,
    parse_guidance,
    parse_prompt,
    prompt_warning,
    sample_query,
    summary_text,
    training_query,
    upload_query,
    with_prompt,
)

# ---------------------------------------------------------------- the page

HEADER = """# D-TRAK explorer: text to image
Which fine-tuning images made this picture? A small latent diffusion model with a text encoder, pretrained on
the digits {pre} and fine-tuned with **LoRA** on the digits {fine} (the paper's Stable Diffusion + LoRA setting, in
small). **TRAK** and **D-TRAK** score each of the {n:,} LoRA fine-tuning images by the gradient of the LoRA
weights. **Generate** from a prompt and click a sample: **Attribute** shows which fine-tuning images made it."""
OWN_HEADER = """# D-TRAK explorer: text to image
Which fine-tuning images made this picture? The Stable Diffusion pipeline `{source}` ({w}x{h} images) with its
**LoRA**, fine-tuned on the {n:,} captioned images of `{data}`{classes}. **TRAK** and **D-TRAK** score each fine-tuning
image by the gradient of the LoRA weights. **Generate** from a prompt (a caption like those of the fine-tuning
images, e.g. “{example}”) and click a sample: **Attribute** shows which fine-tuning images made it."""


def short(text: str, most: int = 60) -> str:
    """A caption shortened for a line of help text."""
    return text if len(text) <= most else text[:most - 1].rstrip() + "…"


def header_markdown(a: TextToImageAssets) -> str:
    """The page's header: the miniature's (its digits read from its manifest), or one that
    describes your own pipeline, LoRA and captioned images."""
    if a.digits:
        pre, fine = miniature_digits(a.manifest)
        return HEADER.format(n=a.n_train, pre=digit_span(pre) if pre else "of its pretraining set",
                             fine=digit_span(fine) if fine else "of its fine-tuning set")
    _, h, w = a.attributor.image_shape
    data = a.manifest.get("dataset")
    data = data.get("folder", "?") if isinstance(data, dict) else data
    names = a.class_names
    return OWN_HEADER.format(source=a.manifest.get("model_source", a.manifest.get("checkpoint", "?")), w=w, h=h,
                             n=a.n_train, data=data, example=short(a.default_prompt),
                             classes=f" in {len(names)} classes ({listed(names)})" if names else "")


def prompt_help(a: TextToImageAssets) -> str:
    """The line under the prompt box: what the model knows, from its folder."""
    if a.digits:
        pre, fine = miniature_digits(a.manifest)
        known = sorted({*pre, *fine})
        if known:
            return (f"the miniature knows “{digit_caption(known[0])}” .. “{known[-1]}”"
                    + (f"; the LoRA taught it {digit_span(fine)}" if fine else ""))
    prompts = a.prompts
    shown = ", ".join(f"“{short(p, 40)}”" for p in prompts[:3])
    return f"the LoRA was fine-tuned on {len(prompts):,} distinct caption{'s' * (len(prompts) != 1)}, e.g. {shown}"

ABOUT_TEXT2IMAGE = r"""
**This setting.** Only the LoRA weights are featurized (the base UNet, the VAE and the text encoder are frozen),
as in the paper's ArtBench experiments: a training image $x$ with caption $c$ enters as its VAE latent
$z$ (posterior mode x the scaling factor), the UNet attends to the text encoder's hidden states $h(c)$, and
$\phi(x, c) = P^\top \frac{1}{K}\sum_t \nabla_{\theta_\text{LoRA}} f(\epsilon_\theta(z_t, t, h(c)), \epsilon_t)$.
A query is an image **and its prompt**: the same image asked about with another prompt gets other scores.
Samples are DDIM in latent space with classifier-free guidance, decoded by the VAE. Everything runs on a CPU.
"""

def counterfactual_text(root: str) -> str:
    """Why the Counterfactual tab has no retrain here, with a LoRA retrain's cost when the LDS run measured it."""
    cost = (read_lds(root)["data"] or {}).get("seconds_per_model", {}).get("train_mean")
    each = f" ({cost:.0f} s per LoRA retrain in the LDS run)" if isinstance(cost, (int, float)) else ""
    try:
        own = not lora_recipe(read_manifest(root))
    except (ValueError, OSError):
        own = False
    text = ("### Remove-and-retrain is not offered for the text-to-image model\n"
            "In the default app this tab removes a sample's top proponents, retrains and regenerates the same seed. "
            f"For this model that is a LoRA fine-tuning on the rest of the fine-tuning set per request{each}; this "
            "app does not run it.")
    if own:
        return text + (" Your LoRA was fine-tuned by your own script, so the retraining is yours to run: remove a "
                       f"sample's top proponents (`python -m dtrak_core attribute --root {shlex.quote(root)} --prompt P "
                       "--seed S --top K --json` lists them) and fine-tune the LoRA without them.")
    return text + (" The same question, whether the scores predict what retraining does, is answered "
                   "over many removals at once by the **LDS** in **Benchmarks**: the LoRA retrained on random half "
                   f"subsets of its fine-tuning images (`{lds_command(root, 'run')}`).")


def methods_markdown(a: TextToImageAssets) -> str:
    """The methods of this page and what each scores by, then those that do not run here and why."""
    lines = ["## Methods for this model", "", "| method | scores by |", "|---|---|"]
    lines += [f"| {sup.escape_table_cell(sup.method_label(m))} | "
              f"{sup.escape_table_cell(sup.method_description(m))} |"
              for m in a.methods]
    lines += ["", "Not available for this model:", ""] + [f"- **{m}**: {why}." for m, why in a.unavailable.items()]
    return "\n".join(lines)


def _assets() -> TextToImageAssets:
    """The request's folder (`state.current_root`), loaded once; a folder that cannot be loaded is a message."""
    try:
        return load(current_root())
    except (ValueError, OSError) as e:
        raise gr.Error(f"The model assets could not be loaded: {e}") from None


def thumbs(images, captions):
    a = _assets()
    return [(to_pil(torch.as_tensor(img), a.scale(2 * viz.THUMB_PX)), c) for img, c in zip(images, captions)]


@readable
def on_generate(prompt, mode, seed, start, end, count, steps, guidance, progress=gr.Progress()):
    a = _assets()
    progress(0, desc="DDIM sampling")
    images, captions, batch = generate_samples(current_root(), prompt, mode, seed, start, end, count, steps, guidance)
    warning = prompt_warning(a, batch["prompt"])
    note = f"Samples of “{batch['prompt']}”" + ("" if not a.digits else " (seed: the digit the classifier sees)") + \
        ". Click one to see which fine-tuning images made it." + (f"  \n⚠️ {warning}." if warning else "")
    return thumbs(images, captions), batch, note


@readable
def check_generate(prompt, mode, seed, start, end, count, steps, guidance):
    parse_prompt(prompt, _assets().default_prompt)
    sup.parse_seeds(mode, seed, start, end, count, rng_seed=0)
    sup.parse_steps(steps)
    parse_guidance(guidance)


def query_view(q):
    a = _assets()
    found = digit_labels(a, q.pixels[None])
    seen = "" if found is None else f"  \nlooks like a **{found[0][0]}** ({found[1][0]:.0%} by the digit classifier)"
    warning = prompt_warning(a, q.prompt)
    return (to_pil(torch.as_tensor(q.pixels), a.scale(QUERY_PX)), f"**{html.escape(q.title)}**{seen}"
            + (f"  \n⚠️ {warning}." if warning else ""), q.prompt)


def select_sample(batch, evt: gr.SelectData):
    if not batch or evt.index is None:
        raise gr.Error("Generate samples first, then click one.", duration=8)
    i = evt.index if isinstance(evt.index, int) else evt.index[0]
    q = sample_query(batch, sup.parse_int(i, "sample", 0, len(batch["seeds"]) - 1))
    return (q, gr.Tabs(selected="attribute"), *query_view(q))


def cards(result, indices, title, note=""):
    a = _assets()
    return viz.training_cards(a.attributor.train, result, indices, title, a.class_word, note)


@readable
def attribute(q, method, k, progress=gr.Progress()):
    a = _assets()
    if q is None:
        raise no_query()
    k = sup.parse_top_k(k)
    progress(0, desc=f"attributing with {sup.method_label(method)}")
    result = attribution_for(current_root(), q, method)
    prop, opp = result.proponents(k), result.opponents(k) if result.signed else []
    opp_note = (opponent_note(True) if a.digits else "") if result.signed else sup.no_opponents(result.method)
    return (cards(result, prop, f"Top-{k} proponents (index · class · caption · score)"),
            cards(result, opp, f"Top-{k} opponents" if result.signed else "No opponents", opp_note),
            viz.score_histogram(result, k), viz.class_mass_figure(result, a.class_word, a.class_names),
            summary_text(a, q, result, k))


@readable
def noise_view(q, method):
    a = _assets()
    if q is None:
        raise no_query()
    levels = noise_levels(current_root(), q, method)
    if levels is None:
        return (None, "", f"The noise-level view splits a TRAK-family score (a method with a feature store: "
                          f"{', '.join(sup.method_label(m) for m in a.attributor.methods)}); "
                          f"{sup.method_label(method)} has no timesteps to split.")
    labels = a.attributor.train.labels.numpy()
    text = noise_summary(levels, gradient="LoRA gradient", image="fine-tuning image")
    return (viz.noise_level_figure(levels, labels, a.class_word, class_names=a.class_names),
            viz.noise_level_cards(a.attributor.train, levels, a.class_word, a.class_names), text)


@readable
def reprompt(q, prompt):
    """The attribution prompt edited: the same image, asked about with the new prompt."""
    if q is None:
        raise no_query()
    q = with_prompt(q, prompt, _assets().default_prompt)
    return (q, *query_view(q)[:2])


def method_about(method) -> str:
    """The line under the method menu (`attribute.method_line`), for this folder's methods."""
    return method_line(method, _assets().methods)


@readable
def compare(q, method_a, method_b, k, progress=gr.Progress()):
    if q is None:
        raise no_query()
    k = sup.parse_top_k(k)
    progress(0, desc="attributing with both methods")
    return compare_views(attribution_for(current_root(), q, method_a), attribution_for(current_root(), q, method_b),
                         k, cards)


follow_compare = following(compare)


@readable
def inspect_training(q, evt: gr.EventData):
    a = _assets()
    if q is None:
        raise no_query()
    data = getattr(evt, "_data", None) or {}
    index = sup.parse_int(data.get("index") if isinstance(data, dict) else None, "training image index", 0,
                          a.n_train - 1)
    rows = sup.ranks_under_methods(all_attributions(current_root(), q), index)
    details = viz.training_image_details(a.attributor.train, index, rows, a.class_word)  # with its caption
    return index, details, gr.Column(visible=True)


@readable
def use_training_image(index):
    q = training_query(current_root(), index)
    return (q, *query_view(q), gr.Column(visible=False))


@readable
def read_upload(path, prompt):
    a = _assets()
    if not path:
        return gr.update(), gr.update(), gr.update(), gr.update(), gr.update()
    q, inverted = upload_query(current_root(), path, prompt)
    img, info, prompt = query_view(q)
    detected = "dark ink on light paper: inverted" if inverted else "light ink on a dark background: used as it is"
    return q, img, info + (f"  \nInk detected: {detected} (change it with the box below)." if a.digits else ""), \
        prompt, inverted


@readable
def use_upload(path, prompt, invert):
    if not path:
        return gr.update(), gr.update(), gr.update(), gr.update()
    q, _ = upload_query(current_root(), path, prompt, bool(invert))
    return (q, *query_view(q))


@readable
def attribute_prompt_api(prompt: str, seed: int = 0, steps: int = 50, method: str | None = None, k: int = 8) -> dict:
    """Attribute the generated sample of (prompt, seed) (DDIM, `steps` steps) with `method` (None:
    the page's default): its top-k proponents and opponents among the fine-tuning images, as JSON."""
    return attribute_prompt(current_root(), prompt, seed, steps, method, k)
