"""The one page: every model folder the server serves, each on its own route of one Gradio app (the
navigation bar at the top is the model picker), and the start-up warm-up.

A pixel folder (the digits, Fashion-MNIST, a model of your own) gets the Generate, Attribute,
Counterfactual, Benchmarks and About tabs; a text-to-image folder its own tabs
(`ui.text2image`). Every handler runs on its page's folder (`state.bound`).
"""
from __future__ import annotations

import html
import os
import sys
import threading
import time

import gradio as gr

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.folder import read_manifest
from dtrak_core.images import MAX_UPLOAD_BYTES
from dtrak_core.shared import OnceCache
from dtrak_core.ui import about, attribute, banner, benchmarks, counterfactual, generate, serving, state, texts

STARTED = time.perf_counter()  # the start-up log says how long each stage took from here
TITLE = "D-TRAK explorer"


def since_start() -> str:
    return f"{time.perf_counter() - STARTED:.1f} s"


def log(message: str) -> None:
    print(f"dtrak: {message} ({since_start()})", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- what the page says about a folder

def text2image_folder(root: str) -> bool:
    """A text-to-image model folder (its own tabs: `ui.text2image`), by its
    manifest; one whose manifest cannot be read or checked is, when what remains of it or the
    folder's layout says so (`remedies.is_text2image`), so that its error page says how to rebuild
    it (`build-text2image`)."""
    from dtrak_core.remedies import is_text2image

    try:
        return read_manifest(root).get("kind") == "text2image"
    except (ValueError, OSError):
        return os.path.isfile(os.path.join(root, "manifest.json")) and is_text2image(root)


def folder_title(root: str) -> str:
    """The folder's name in the navigation bar: what its data is."""
    try:
        manifest = read_manifest(root)
    except (ValueError, OSError):
        return os.path.basename(os.path.normpath(root)) or root
    if manifest.get("kind") == "text2image":
        return "Text to image"
    data = manifest.get("dataset")
    if isinstance(data, str) and data.startswith("digits"):
        return "Digits"
    name = state.setting_name(root)
    if name is not None:
        return {"fashion-mnist": "Fashion-MNIST"}.get(name, name)
    return os.path.basename(os.path.normpath(root)) or root


def header_markdown(a) -> str:
    """The digits default's header, or one that describes another model folder."""
    if a.digits:
        return texts.fill(texts.get("header.md"), n_train=a.n_train)
    manifest = read_manifest(a.root)
    c, h, w = a.attributor.train.images.shape[1:]
    source = manifest.get("model_source", manifest.get("checkpoint", "?"))
    data = manifest.get("dataset", {})
    data = data.get("folder", "?") if isinstance(data, dict) else data
    item, items = a.kind
    classes = f" {a.classes_phrase}" if a.classes_phrase else ""
    return (f"# {TITLE}\nWhich training images made this {item}? Model `{source}` ({w}x{h}, {c} channel"
            f"{'s' if c > 1 else ''}), trained on the {a.n_train:,} {items} of `{data}`{classes}. **TRAK** and "
            "**D-TRAK** scores say how much each training image is responsible for a generated (or uploaded) image. "
            "Pick a sample in **Generate** and read its attribution in **Attribute**. " + counterfactual.retrain_note(a))


def error_section(root: str, error: str) -> None:
    """What the page shows for a folder that cannot be loaded: what is wrong and how to fix it (the
    command that built it, on this folder: `remedies.build_command`, which tells a text-to-image
    folder by its manifest or, when that is damaged, its layout)."""
    from dtrak_core.remedies import build_command

    rebuild = f"rebuild it with `{build_command(root)}`"
    gr.Markdown(f"# {TITLE}")
    gr.Markdown(f"## The model assets could not be loaded\n\n**Folder:** `{root}`\n\n**What is wrong:** "
                f"{html.escape(error)}\n\n**How to fix it:** do what the message above says, point "
                "`DTRAK_ASSETS` at a complete model folder, restore the embedded default with `git checkout -- "
                f"assets` (or `git lfs pull` if it came without its binaries), or {rebuild}. "
                "Then restart the app.", elem_id="assets-error")


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------- one folder's tabs

def pixel_folder(demo: gr.Blocks, root: str, api_suffix: str = "") -> None:
    """The tabs of a pixel-space folder, in the current page of `demo`."""
    try:
        a = state.load_assets(root)
    except Exception as e:  # any damage to the folder: the page says what, instead of a dead server
        import traceback

        traceback.print_exc()
        return error_section(root, _reason(e))

    def bind(fn):
        return state.bound(root, fn)
    c = dict(batch=gr.State(None),  # the last generated batch: seeds, steps, images
             query=gr.State(None),  # the current query: key, pixels, title, seed, steps
             picked=gr.State(None),  # the training image being inspected
             compare_on=gr.State(False),  # the visitor asked for a comparison: keep it in step with the query
             cf_visited=gr.State(False))  # the Counterfactual tab has shown its first example to this visitor
    gr.Markdown(header_markdown(a))
    damaged = state.bound(root, banner.quick_damage)(root)  # a few small files; the rest after the samples
    damaged_md = gr.Markdown(banner.damage_banner(damaged), visible=bool(damaged), elem_id="damaged")
    with state.bound_context(root):
        with gr.Tabs(overflow_behavior="wrap") as c["tabs"]:  # every tab in sight, on a phone too
            with gr.Tab("Generate", id="generate"):
                c.update(generate.create_ui(a))
            with gr.Tab("Attribute", id="attribute"):
                c.update(attribute.create_ui(a))
            with gr.Tab("Counterfactual", id="counterfactual") as c["cf_tab"]:
                if a.can_retrain:
                    c.update(counterfactual.create_ui(a))
                else:  # the tab says why, and a picked sample's seed has a (hidden) place to go
                    gr.Markdown("### Remove and retrain is not offered for this model\n" + counterfactual.retrain_note(a),
                                elem_id="cf-not-here")
                    c.update(counterfactual.offline_ui(a))
                    c["cf_seed"] = gr.Number(0, visible=False)
            with gr.Tab("Benchmarks", id="benchmarks") as bench_tab:
                charts = benchmarks.benchmarks_blocks(root)
            with gr.Tab("About", id="about"):
                about.create_ui(a)
    generate.create_event_handlers(c, bind)
    attribute.create_event_handlers(c, bind, api_name="attribute_seed" + api_suffix)
    if a.can_retrain:
        counterfactual.create_event_handlers(c, bind)
    else:
        counterfactual.create_offline_handlers(c, bind)
    # unqueued: the first page's samples take no input and are computed once, by the warm-up
    demo.load(bind(generate.first_page), None, [c["gallery"], c["batch"]], queue=False).then(
        bind(banner.show_damage), None, damaged_md, concurrency_id="checks", show_progress="hidden")
    if charts:
        cache = OnceCache(1)
        bench_tab.select(bind(lambda: benchmarks.draw_charts(charts, cache)), None, [p for p, _ in charts],
                         queue=False, show_progress="hidden")


def text2image_folder_page(demo: gr.Blocks, root: str) -> None:
    from dtrak_core.ui import text2image

    try:
        a = text2image.load(root)
    except Exception as e:  # as for a pixel folder: the page says what is wrong
        import traceback

        traceback.print_exc()
        return error_section(root, _reason(e))
    with state.bound_context(root):
        c = text2image.create_ui(a)
    text2image.create_event_handlers(demo, c, lambda fn: state.bound(root, fn))


def folder_page(demo: gr.Blocks, root: str, api_suffix: str = "") -> None:
    log(f"building the page of {root}")
    if text2image_folder(root):
        text2image_folder_page(demo, root)
    else:
        pixel_folder(demo, root, api_suffix)


def route_path(root: str, taken: set) -> str:
    """A folder's URL path: its title as a slug, made unique."""
    base = "".join(ch if ch.isalnum() else "-" for ch in folder_title(root).lower()).strip("-") or "folder"
    path, n = base, 2
    while path in taken:
        path, n = f"{base}-{n}", n + 1
    taken.add(path)
    return path


def build_demo(roots: list[str] | None = None) -> gr.Blocks:
    """The page: the first folder at /, every other one on its own route (the navigation bar)."""
    roots = state.folders() if roots is None else list(roots)
    log(f"libraries imported; loading the model folders {', '.join(roots)}")
    with gr.Blocks(title=TITLE, delete_cache=serving.CACHE_SWEEP) as demo:
        if len(roots) > 1:
            gr.Navbar(main_page_name=folder_title(roots[0]))
        folder_page(demo, roots[0])
        demo.unload(counterfactual.forget_session)
    taken = set()
    for root in roots[1:]:
        path = route_path(root, taken)
        with demo.route(folder_title(root), path):
            gr.Navbar(main_page_name=folder_title(roots[0]))
            folder_page(demo, root, "_" + path.replace("-", "_"))
    log("page built")
    return demo


# ---------------------------------------------------------------- serving and warm-up

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


def warm_up(roots: list[str] | None = None) -> None:
    """What a first visitor would otherwise wait for, computed once in the background after the
    server is up, folder by folder (the first folder first): the page's first samples and the
    classifier; then, once a page has shown its samples (or after FIRST_PAGE_WAIT), the default
    method's scorer and featurizer, its noise-level view (the reference queries it is centred on),
    the full check of the files (the page's banner waits for it), and last every other method's
    scorer or kernel, which the first drill-down would otherwise fit (seconds) while visitors wait.
    The counterfactual examples and the retrain-time measurement are made when first asked for."""
    def step(what, fn):
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a cache stays cold; the request that needs it computes (or reports) it
            print(f"dtrak: warm-up of {what} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return
        log(f"warmed {what} in {time.perf_counter() - t0:.1f} s")

    banner.warming.set()
    try:
        for root in state.folders() if roots is None else roots:
            if text2image_folder(root):
                from dtrak_core.ui import text2image

                text2image.warm_up(root, step)
            else:
                with state.bound_context(root):
                    _warm(root, step)
    finally:
        banner.warm_done.set()


FIRST_PAGE_WAIT = 30  # seconds the warm-up waits for a first visitor before warming the rest anyway


def _warm(root: str, step) -> None:
    try:
        a = state.load_assets(root)
    except (ValueError, OSError):
        return  # the error section is up: nothing to warm
    first = []
    step(f"the first page's samples of {root}", lambda: first.append(
        generate.samples(generate.FIRST_SEEDS, generate.FIRST_STEPS)))
    if not first:
        return
    step("the classifier", lambda: state.digit_labels(first[0].numpy()))
    # the scorer and featurizer take seconds of both cores: not while a first visitor's browser is
    # still drawing the page and asking for its samples
    generate.page_served.wait(FIRST_PAGE_WAIT)
    q = state.sample_query(generate.FIRST_SEEDS[0], generate.FIRST_STEPS, first[0][0].numpy())
    for _, m in sup.method_choices(a.methods)[:1]:
        # the charts too: plotly builds its figure classes on first use, which a first click would wait for
        step(f"{sup.method_label(m)} and its charts", lambda m=m: (
            viz.score_histogram(attribute.attribution_for(q, m), attribute.DEFAULT_K),
            viz.class_mass_figure(attribute.attribution_for(q, m))))
        # the noise-level view follows every attribution, and its reference queries take seconds once
        step(f"the noise-level view of {sup.method_label(m)}", lambda m=m: attribute.noise_view(q, m))
    step("the full check of the files (TracInCP checkpoints, precomputed results)", lambda: banner.full_check(root))
    # last, every other method once: each fits its scorer or kernel on first use (about 5 s in all on
    # the digits), after which a new query's drill-down (its rank under every method) costs ~0.4 s
    step("every other method (the drill-down)", lambda: attribute.all_attributions(q))


_warm_up_started = threading.Lock()


def start_warm_up() -> None:
    """`warm_up` in a background thread, once per process."""
    if _warm_up_started.acquire(blocking=False):
        threading.Thread(target=warm_up, name="dtrak-warm-up", daemon=True).start()


def serve(demo: gr.Blocks) -> None:
    """`python app.py`: serve at once, then warm the caches in a background thread."""
    serving.configure(demo)
    demo.launch(max_file_size=MAX_UPLOAD_BYTES, show_error=True, css=texts.get("style.css"), theme=gr.themes.Soft(),
                footer_links=["gradio"], head=page_head(), prevent_thread_lock=True)
    log("serving")
    start_warm_up()
    demo.block_thread()
