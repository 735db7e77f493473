"""The page's layout (`create_ui`), its wiring (`create_event_handlers`) and the warm-up of a folder.
"""

import gradio as gr

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.attribution import methods as registry
from dtrak_core.ui import texts
from dtrak_core.ui.attribute import drill_and_charts, noise_and_compare, ranking_blocks
from dtrak_core.ui.banner import damage_banner
from dtrak_core.ui.text2image.benchmarks import benchmarks_blocks, results_damage
from dtrak_core.ui.text2image.folder import all_attributions, attribution_for, load, noise_levels, sample_query, samples
from dtrak_core.ui.text2image.handlers import (
    ABOUT_TEXT2IMAGE,
    attribute,
    attribute_prompt_api,
    check_generate,
    compare,
    counterfactual_text,
    follow_compare,
    header_markdown,
    inspect_training,
    method_about,
    methods_markdown,
    noise_view,
    on_generate,
    prompt_help,
    read_upload,
    reprompt,
    select_sample,
    use_training_image,
    use_upload,
)


def create_ui(a) -> dict:
    """The tabs' components, in the current page."""
    choices = sup.method_choices(a.methods)
    default_method = choices[0][1]
    second = "loss" if "loss" in a.methods and default_method != "loss" else choices[-1][1]
    batch = gr.State(None)
    query = gr.State(None)  # pixels, prompt, seed, title
    picked = gr.State(None)
    compare_on = gr.State(False)
    gr.Markdown(header_markdown(a))
    damaged = results_damage(a.root)  # the precomputed results, as a pixel folder's banner names them
    gr.Markdown(damage_banner(damaged), visible=bool(damaged), elem_id="damaged")
    with gr.Tabs(overflow_behavior="wrap") as tabs:
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    prompt = gr.Textbox(a.default_prompt, label="Prompt", max_lines=1, elem_id="prompt",
                                        info=prompt_help(a))
                    mode = gr.Radio(["single", "range", "random"], value="range", label="Seeds")
                    seed = gr.Number(0, precision=0, label="Seed", visible=False)
                    with gr.Row() as range_row:
                        start = gr.Number(0, precision=0, label="First seed", min_width=100)
                        end = gr.Number(15, precision=0, label="Last seed", min_width=100)
                    count = gr.Slider(1, sup.MAX_SAMPLES, 16, step=1, label="Number of random seeds", visible=False)
                    steps = gr.Slider(1, sup.MAX_DDIM_STEPS, 50, step=1, label="DDIM steps")
                    guidance = gr.Slider(0, 10, a.attributor.guidance_scale, step=0.5,
                                         label="Guidance (classifier-free; 1 = none)")
                    gen_btn = gr.Button("Generate", variant="primary")
                with gr.Column(scale=3):
                    gen_note = gr.Markdown("**Samples**. Click one to see which fine-tuning images made it.",
                                           elem_id="samples-note")
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
                    query_prompt = gr.Textbox(a.default_prompt, label="Prompt of the query", max_lines=1,
                                              elem_id="query-prompt",
                                              info="the caption the image is attributed under; Enter applies it")
                    upload = gr.File(label="Your own image (PNG, JPEG, ...)", file_types=["image"],
                                     type="filepath", height=150, elem_id="upload")
                    invert = gr.Checkbox(False, label="dark ink on light paper (invert)" if a.digits else "invert",
                                         elem_id="invert", visible=a.digits,
                                         info="set from each upload's border; untick or tick to override")
                with gr.Column(scale=3, min_width=300):
                    method, topk, about, summary, prop_cards, opp_cards = ranking_blocks(
                        a, choices, default_method, sup.MAX_TOP_K, 8)
                    results = drill_and_charts()
            results.update(noise_and_compare(a, choices, second, "fine-tuning images"))
        with gr.Tab("Counterfactual", id="counterfactual"):
            gr.Markdown(counterfactual_text(a.root), elem_id="cf-not-offered")
        with gr.Tab("Benchmarks", id="benchmarks"):
            benchmarks_blocks(a, gr)
        with gr.Tab("About", id="about"):
            gr.Markdown(texts.get("about.md") + ABOUT_TEXT2IMAGE, latex_delimiters=[
                {"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}])
            gr.Markdown(methods_markdown(a))
    return dict(about=about, batch=batch, query=query, picked=picked, compare_on=compare_on, tabs=tabs, prompt=prompt,
                mode=mode, seed=seed, range_row=range_row, start=start, end=end, count=count, steps=steps, guidance=guidance,
                gen_btn=gen_btn, gen_note=gen_note, gallery=gallery, query_img=query_img, query_info=query_info,
                query_prompt=query_prompt, upload=upload, invert=invert, method=method, topk=topk, summary=summary,
                prop_cards=prop_cards, opp_cards=opp_cards, **results)


def create_event_handlers(demo, c: dict, bind) -> None:
    """c: the components of `create_ui`; bind(fn): fn run on this page's folder."""
    def seed_inputs(m):
        return gr.Number(visible=m == "single"), gr.Row(visible=m == "range"), gr.Slider(visible=m == "random")
    c["mode"].change(seed_inputs, c["mode"], [c["seed"], c["range_row"], c["count"]], queue=False)
    gen_inputs = [c["prompt"], c["mode"], c["seed"], c["start"], c["end"], c["count"], c["steps"], c["guidance"]]
    gen_outputs = [c["gallery"], c["batch"], c["gen_note"]]
    c["gen_btn"].click(bind(check_generate), gen_inputs, None, concurrency_id="checks", concurrency_limit=None).success(
        bind(on_generate), gen_inputs, gen_outputs, concurrency_id="compute")
    c["prompt"].submit(bind(check_generate), gen_inputs, None, concurrency_id="checks", concurrency_limit=None).success(
        bind(on_generate), gen_inputs, gen_outputs, concurrency_id="compute")
    demo.load(bind(on_generate), gen_inputs, gen_outputs, concurrency_id="compute")

    attr_inputs, attr_outputs = [c["query"], c["method"], c["topk"]], [c["prop_cards"], c["opp_cards"], c["hist"], c["mass"], c["summary"]]
    busy = dict(concurrency_id="compute", show_progress="minimal", show_progress_on=[c["summary"]])
    cmp_inputs, cmp_outputs = [c["query"], c["method"], c["method_b"], c["topk"]], [c["gal_a"], c["gal_b"], c["compare_text"]]

    def after(event):
        """Once the cards and charts are shown: the noise-level view, then the comparison (if shown)."""
        event.success(bind(noise_view), [c["query"], c["method"]], [c["noise_plot"], c["noise_cards"], c["noise_text"]], concurrency_id="compute",
                      show_progress="hidden").then(
            bind(follow_compare), [*cmp_inputs, c["compare_on"]], cmp_outputs, concurrency_id="compute", show_progress="hidden")

    def show_query(event):
        event.then(lambda: gr.Column(visible=False), None, c["drill_box"], queue=False)
        after(event.success(bind(attribute), attr_inputs, attr_outputs, **busy))

    show_query(c["gallery"].select(bind(select_sample), c["batch"], [c["query"], c["tabs"], c["query_img"], c["query_info"], c["query_prompt"]]))
    uploaded = c["upload"].upload(bind(read_upload), [c["upload"], c["query_prompt"]], [c["query"], c["query_img"], c["query_info"], c["query_prompt"],
                                                                 c["invert"]], show_progress="hidden")
    show_query(uploaded)
    uploaded.failure(lambda: None, None, c["upload"], queue=False)  # a refused file does not stay named in the box
    show_query(c["invert"].input(bind(use_upload), [c["upload"], c["query_prompt"], c["invert"]], [c["query"], c["query_img"], c["query_info"],
                                                                         c["query_prompt"]], show_progress="hidden"))
    show_query(c["query_prompt"].submit(bind(reprompt), [c["query"], c["query_prompt"]], [c["query"], c["query_img"], c["query_info"]],
                                   show_progress="hidden"))
    c["method"].change(bind(method_about), c["method"], c["about"], queue=False, show_progress="hidden")
    for trigger in (c["method"].input, c["topk"].release):
        after(trigger(bind(attribute), attr_inputs, attr_outputs, trigger_mode="always_last", **busy))
    for event in (c["compare_btn"].click, c["method_b"].input):
        event(bind(compare), cmp_inputs, cmp_outputs, concurrency_id="compute", trigger_mode="always_last").success(
            lambda: True, None, c["compare_on"], queue=False)
    for widget in (c["prop_cards"], c["opp_cards"], c["gal_a"], c["gal_b"], c["noise_cards"]):
        widget.click(bind(inspect_training), [c["query"]], [c["picked"], c["drill"], c["drill_box"]], concurrency_id="compute",
                     show_progress="minimal", trigger_mode="always_last")
    show_query(c["use_btn"].click(bind(use_training_image), [c["picked"]], [c["query"], c["query_img"], c["query_info"], c["query_prompt"],
                                                            c["drill_box"]]))
    c["close_btn"].click(lambda: gr.Column(visible=False), None, c["drill_box"], queue=False)

    gr.api(bind(attribute_prompt_api), api_name="attribute_prompt", concurrency_id="compute")



def warm_up(root: str, step) -> None:
    """What a first visitor of this folder would otherwise wait for, each through `step(what, fn)`
    (`page.warm_up`'s: timed, a failure logged and skipped): the first page's samples, the default
    method with its charts and its noise-level view (the reference it is centred on), then every
    other method (the drill-down)."""
    try:
        a = load(root)
    except (ValueError, OSError):
        return
    first = []
    step(f"the first page's samples of {root}", lambda: first.append(samples(a, a.default_prompt, range(16), 50)))
    if not first:
        return
    q = sample_query({"prompt": a.default_prompt, "seeds": list(range(16)), "steps": 50,
                      "guidance": a.attributor.guidance_scale, "images": first[0].numpy()}, 0)
    m = registry.default_method(a.methods)
    step(f"{sup.method_label(m)} and its charts", lambda: (
        viz.score_histogram(attribution_for(root, q, m), 8), viz.class_mass_figure(attribution_for(root, q, m))))
    step(f"the noise-level view of {sup.method_label(m)}", lambda: noise_levels(root, q, m))
    step("every other method (the drill-down)", lambda: all_attributions(root, q))
