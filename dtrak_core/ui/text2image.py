"""The tabs of a text-to-image model folder (Text to image in the page's navigation bar).

The same views as a pixel folder's where they apply, with a prompt: Generate (prompt + seeds ->
samples), Attribute (a sample or an upload with its prompt -> proponents and opponents, score
histogram, per-class mass, method choice, the score split by noise level, comparison of two methods,
a training image's rank under every method), Benchmarks (the miniature's sample quality and its LDS
results) and About. Remove-and-retrain is not offered here: the Counterfactual tab says why.

Concurrency as in the default app: the loaded folder is shared read-only (sampling is a plain
forward under `no_grad`; the LoRA gradients run on private replicas inside the featurizer, see
`dtrak_core.shared`), and every result is cached by its whole request in an `OnceCache`.

Two layers, both tested without a server: functions of (root, request values) that compute
(`generate_samples`, `attribution_for`, `noise_levels`, ...), and the page's handlers, plain functions
of the request values run on the page's folder (`state.bound`), which `create_ui` and
`create_event_handlers` lay out and wire.
"""

import html
import os
import shlex
from dataclasses import dataclass, field

import gradio as gr
import numpy as np
import torch

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.attributor import Attribution
from dtrak_core.folder import read_manifest
from dtrak_core.images import load_user_image, to_pil
from dtrak_core.query import Query
from dtrak_core.shared import OnceCache
from dtrak_core.text2image.attributor import TextToImageAttributor
from dtrak_core.text2image.data import digit_caption
from dtrak_core.ui import texts
from dtrak_core.ui.attribute import compare_text, following, method_line, noise_summary, opponent_note
from dtrak_core.ui.banner import damage_banner
from dtrak_core.ui.benchmarks import TITLES, damaged_section, drawn, evidence_blocks, result_part
from dtrak_core.ui.state import cards_html, current_root, listed, no_query, readable

MAX_PROMPT_CHARS = 200
QUERY_PX = 192
LDS_FOLDER = "lds"  # under the model folder: what `lds-text2image evaluate` writes

# The registry's text-to-image baselines, in its order; `baseline_scores` scores them on this
# setting's own inputs (the image and its VAE latent; the LoRA gradients of the image with its prompt).
BASELINES = [m.name for m in registry.all("baseline", "text2image")]
NOT_HERE = {
    "clip-dot / clip-cosine": "not offered on this page (the default model's page runs them when local CLIP "
                              "weights are present)",
    "TracInCP / GAS": "they need the LoRA's intermediate checkpoints and their stores, which the folder does not keep",
    "Journey-TRAK": "it follows the default model's pixel-space sampling trajectory; not implemented for latent, "
                    "prompted sampling",
}


# ---------------------------------------------------------------- the loaded folder (one per process)

@dataclass
class TextToImageAssets:
    root: str
    attributor: TextToImageAttributor
    methods: list  # TRAK family (one per store), then the baselines that run here
    unavailable: dict  # {method: why it cannot run here}
    manifest: dict = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return len(self.attributor.train)

    @property
    def digits(self) -> bool:
        """The digits miniature (or a folder like it): the digit classifier applies."""
        return self.attributor.train.name.startswith("digits") and self.attributor.image_shape == (1, 8, 8)

    @property
    def class_word(self) -> str:
        return "digit" if self.digits else "class"

    @property
    def class_names(self) -> tuple | None:
        """Training label -> class name (a captioned folder's class sub-folders, the digits' "0".."9")."""
        return self.attributor.train.classes

    @property
    def kind(self) -> tuple[str, str]:
        return ("digit", "digits") if self.digits else ("image", "images")

    @property
    def words(self) -> dict:
        """The fill values of the texts that speak of the data (`texts.words`)."""
        return texts.words(self.digits, self.kind[1])

    @property
    def prompts(self) -> list[str]:
        """The fine-tuning set's distinct captions, sorted: the prompts the LoRA was fine-tuned on."""
        return sorted(set(self.attributor.train.captions))

    @property
    def default_prompt(self) -> str:
        """The page's first prompt: the middle one of the fine-tuning captions (the miniature's
        "a handwritten digit 7")."""
        prompts = self.prompts
        return prompts[len(prompts) // 2] if prompts else "a picture"

    @property
    def dtrak_lora(self) -> bool:
        """The LoRA was fine-tuned by dtrak (the miniature: its recipe is recorded), so the LDS
        harness `lds-text2image` can retrain it."""
        return lora_recipe(self.manifest)

    def scale(self, px: int) -> int:
        return max(1, px // self.attributor.image_shape[-1])


def lora_recipe(manifest: dict) -> bool:
    """Whether a text-to-image manifest records the recipe its LoRA was fine-tuned with (dtrak's own)."""
    recipe = manifest.get("recipe")
    return isinstance(recipe, dict) and "lora" in recipe


_folders = OnceCache()


def load(root: str) -> TextToImageAssets:
    """The folder, loaded and verified once per process; ValueError with the reason when it is damaged."""
    def make():
        attributor = TextToImageAttributor.load(root)
        baselines = [registry.get(m) for m in BASELINES]
        methods = list(attributor.methods) + [m.name for m in baselines
                                              if m.store is None or m.store in attributor.methods]
        unavailable = {m.name: f"needs the folder's `{m.store}` ({registry.get(m.store).label}) store"
                       for m in baselines if m.store is not None and m.store not in attributor.methods}
        return TextToImageAssets(root, attributor, methods, {**unavailable, **NOT_HERE}, read_manifest(root))
    return _folders.get(os.path.abspath(root), make)


# ---------------------------------------------------------------- requests

def parse_prompt(prompt, example: str | None = None) -> str:
    """A prompt, its whitespace collapsed; `example` (the folder's own caption) in the message that
    asks for one."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"type a prompt, e.g. “{example}”" if example else
                         "type a prompt (one like the captions the model was fine-tuned on)")
    prompt = " ".join(prompt.split())
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS}")
    return prompt


def parse_guidance(value) -> float:
    try:
        g = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"guidance must be a number in 0..20, got {sup._shown(value)}") from None
    if not 0 <= g <= 20:
        raise ValueError(f"guidance must be a number in 0..20, got {sup._shown(value)}")
    return round(g, 2)


def prompt_warning(a: TextToImageAssets, prompt: str) -> str | None:
    """What the model will not read of a prompt: words outside its vocabulary (a word-level
    tokenizer maps them all to one unknown token) and words past its token limit."""
    tok = a.attributor.pipeline.tokenizer
    notes = []
    if tok.unk_token_id is not None and tok.unk_token_id not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        vocab = tok.get_vocab()
        unknown = [w for w in prompt.lower().split() if w not in vocab]
        if unknown:
            notes.append(f"the model does not know the word{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(repr(w) for w in unknown[:5])} (it reads each as one unknown word)")
    n = len(tok(prompt, truncation=False).input_ids)
    if n > tok.model_max_length:
        notes.append(f"only the first {tok.model_max_length - 2} words are read (the text encoder's limit)")
    return "; ".join(notes) if notes else None


_samples = OnceCache(64)  # (root, prompt, seeds, steps, guidance) -> images (B, C, H, W)
_attributions = OnceCache(256)  # (root, query, method) -> Attribution


def samples(a: TextToImageAssets, prompt: str, seeds, steps: int, guidance: float | None = None) -> torch.Tensor:
    """DDIM samples of one prompt for these seeds, computed once per request."""
    guidance = a.attributor.guidance_scale if guidance is None else guidance
    return _samples.get((a.root, prompt, tuple(seeds), steps, guidance), lambda: a.attributor.generate(
        list(seeds), prompt, steps=steps, guidance_scale=guidance))


def digit_labels(a: TextToImageAssets, images: np.ndarray):
    """(labels, confidences) from the digit classifier, or None when the folder is not digits."""
    if not a.digits:
        return None
    from dtrak_core.evaluation.quality import classify

    return classify(images)


def generate_samples(root: str, prompt, mode, seed, start, end, count, steps, guidance=None):
    """(images (B, C, H, W) numpy, captions, batch) for a Generate request."""
    a = load(root)
    prompt = parse_prompt(prompt, a.default_prompt)
    seeds = sup.parse_seeds(mode, seed, start, end, count)
    steps = sup.parse_steps(steps)
    guidance = a.attributor.guidance_scale if guidance is None else parse_guidance(guidance)
    images = samples(a, prompt, seeds, steps, guidance).numpy()
    found = digit_labels(a, images)
    captions = [f"seed {s}" + ("" if found is None else f": {found[0][i]}") for i, s in enumerate(seeds)]
    return images, captions, {"seeds": seeds, "steps": steps, "prompt": prompt, "guidance": guidance, "images": images}


def sample_query(batch: dict, i: int) -> Query:
    seed = batch["seeds"][i]
    return Query.sample(seed, batch["steps"], batch["images"][i], prompt=batch["prompt"],
                        title=f"Generated sample, seed {int(seed)} (DDIM {batch['steps']} steps, guidance "
                              f"{batch['guidance']:g}), prompt “{batch['prompt']}”")


def with_prompt(q: Query, prompt, example: str | None = None) -> Query:
    """The same image asked about with another prompt (`example`: as in `parse_prompt`)."""
    return q.with_prompt(parse_prompt(prompt, example))


def _query_key(q: Query) -> tuple:
    return q.pixels_key, q.prompt


def query_feature(a: TextToImageAssets, q: Query, output_fn: str) -> torch.Tensor:
    """The projected LoRA gradient (1, k) of the query with its prompt, for one store (kept by the
    attributor for recent queries, so every method over the store shares it)."""
    setting, _ = a.attributor.setting(output_fn)
    return a.attributor.query_features(torch.as_tensor(q.pixels)[None], [q.prompt], setting)


def baseline_scores(a: TextToImageAssets, q: Query, method: str) -> np.ndarray:
    """(N,) scores of one of `BASELINES` for the query (`TextToImageAttributor.baseline_scores`)."""
    x = torch.as_tensor(q.pixels, dtype=torch.float32)[None]
    return a.attributor.baseline_scores(x, method, prompts=[q.prompt])[0]


def attribution_for(root: str, q: Query, method: str) -> Attribution:
    """Scores of any method here for a query (image + prompt), cached per (query, method)."""
    a = load(root)
    known = registry.find(method) if isinstance(method, str) else None  # 'd-trak', 'TRAK': the registry's aliases
    method = sup.parse_method(known.name if known is not None and known.name in a.methods else method, a.methods)

    def compute():
        if method in BASELINES:
            scores = baseline_scores(a, q, method)
        else:
            scores = a.attributor.scorer(method).scores(query_feature(a, q, method))[0]
        return Attribution(method, np.asarray(scores, dtype=np.float64), a.attributor.train.labels.numpy(),
                           a.attributor.train)
    return _attributions.get((a.root, _query_key(q), method), compute)


NOISE_BUCKETS = 10
_noise = OnceCache(128)  # (root, query, method) -> NoiseLevels


def noise_levels(root: str, q: Query, method: str):
    """A TRAK-family score of the query split by noise level (`app_support.NoiseLevels`); None for a
    method without a store (a baseline has no timesteps)."""
    a = load(root)
    method = attribution_for(root, q, method).method  # checked, canonical, and the score it splits cached
    if method not in a.attributor.methods:
        return None
    return _noise.get((a.root, _query_key(q), method), lambda: sup.noise_levels(
        a.attributor, torch.as_tensor(q.pixels), method, NOISE_BUCKETS, prompt=q.prompt,
        reference=noise_reference(root, method)))


_references = OnceCache(16)  # (root, store setting, size) -> NoiseReference, the same for every query
REFERENCE_QUERIES = sup.REFERENCE_QUERIES  # prompted samples the noise-level view is centred on


def noise_reference(root: str, method: str):
    """The noise-level view's reference for a store: the mean per noise level over the folder's own
    prompted samples (`app_support.reference_features`), computed once per folder and store."""
    a = load(root)
    setting, _ = a.attributor.setting(method)
    return _references.get((a.root, setting, REFERENCE_QUERIES), lambda: sup.reference_features(
        a.attributor, method, NOISE_BUCKETS, *sup.reference_queries(a.attributor, REFERENCE_QUERIES)))


def all_attributions(root: str, q: Query) -> dict:
    out = {}
    for method in load(root).methods:
        try:
            out[method] = attribution_for(root, q, method)
        except ValueError as e:
            out[method] = e
    return out


def attribute_prompt(root: str, prompt, seed=0, steps=50, method=None, k=8) -> dict:
    """The generated sample of (prompt, seed) attributed with `method` (None: the registry's default
    among this folder's methods): its top-k proponents and opponents among the fine-tuning images,
    as JSON (the page's API, like `attribute --prompt --json`)."""
    a = load(root)
    method = registry.default_method(a.methods) if method is None else method
    prompt, k = parse_prompt(prompt, a.default_prompt), sup.parse_top_k(k)
    images, _, batch = generate_samples(root, prompt, "single", seed, None, None, None, steps)
    result = attribution_for(root, sample_query(batch, 0), method)
    found = digit_labels(a, images)
    query = {"prompt": prompt, "seed": batch["seeds"][0], "steps": batch["steps"], "guidance": batch["guidance"]}
    return {**result.table(k), "query": query | ({} if found is None else {"label": int(found[0][0])}),
            "n_train": a.n_train}


def summary_text(a: TextToImageAssets, q: Query, result: Attribution, k: int) -> str:
    label = sup.method_label(result.method)
    prop, opp = result.proponents(k), result.opponents(k) if result.signed else []
    found = digit_labels(a, q.pixels[None])
    if found is None:
        return (f"**{label}**: the top-{k} proponents{' and opponents' * result.signed} of this image with the "
                f"prompt “{q.prompt}”.")
    digit = int(found[0][0])
    opposed = f" and **{int((result.labels[opp] == digit).sum())} of {k}** top opponents" * result.signed
    return (f"**{label}**: **{int((result.labels[prop] == digit).sum())} of {k}** top proponents{opposed} are "
            f"{digit}s, the digit the classifier sees in the query (prompt “{q.prompt}”).")


def upload_query(root: str, path: str, prompt, invert: bool | None = None) -> tuple[Query, bool]:
    """An uploaded image file with a prompt -> (query, inverted). invert None: detected from the
    image's border (the digits are light ink on black; a drawing on paper is the other way round)."""
    a = load(root)
    c, r, _ = a.attributor.image_shape
    name = os.path.basename(path)
    try:
        if invert is None:
            invert = a.digits and sup.light_paper(load_user_image(path, r, c, invert=False).numpy())
        pixels = load_user_image(path, r, c, invert=bool(invert)).numpy()
    except ValueError as e:
        raise ValueError(f"Could not use {name}: {e}") from None
    return Query.upload(pixels, f"Your image {name}{' (inverted)' if invert else ''}, as the model sees it "
                                f"({pixels.shape[-1]}x{pixels.shape[-2]})", parse_prompt(prompt, a.default_prompt)), \
        bool(invert)


def training_query(root: str, index) -> Query:
    """A training image as the query, with its own caption as the prompt."""
    a = load(root)
    index = sup.parse_int(index, "training image index", 0, a.n_train - 1)
    caption = a.attributor.train.captions[index]
    return Query.training(index, a.attributor.train.images[index].numpy(), f"Training image #{index}, caption “{caption}”",
                          caption)


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
    ra, rb = attribution_for(current_root(), q, method_a), attribution_for(current_root(), q, method_b)
    text = compare_text(ra, rb, k)
    return (cards(ra, ra.proponents(k), f"{sup.method_label(method_a)}: top-{k} proponents"),
            cards(rb, rb.proponents(k), f"{sup.method_label(method_b)}: top-{k} proponents"), text)


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
                    with gr.Row():
                        method = gr.Dropdown(choices, value=default_method, label="Method", min_width=200)
                        topk = gr.Slider(1, sup.MAX_TOP_K, 8, step=1, label="Top-k shown", min_width=200,
                                         elem_id="topk")
                    about = gr.Markdown(method_line(default_method, a.methods), elem_id="method-about")
                    summary = gr.Markdown(elem_id="summary")
                    with gr.Accordion("How to read this", open=False):
                        gr.Markdown(texts.fill(texts.get("how_to_read.md"), **a.words))
                    prop_cards = cards_html("proponents")
                    opp_cards = cards_html("opponents")
                    with gr.Column(visible=False, elem_id="drill") as drill_box:
                        drill = gr.HTML(elem_id="drill-details")
                        with gr.Row():
                            use_btn = gr.Button("Use as query", variant="primary", size="sm")
                            close_btn = gr.Button("Close", size="sm")
                    with gr.Row():
                        hist = gr.Plot(show_label=False, elem_id="histogram", min_width=280)
                        mass = gr.Plot(show_label=False, elem_id="class-mass", min_width=280)
            with gr.Accordion("Across noise levels: which fine-tuning images matter at high and at low noise",
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
                prop_cards=prop_cards, opp_cards=opp_cards, drill_box=drill_box, drill=drill, use_btn=use_btn,
                close_btn=close_btn, hist=hist, mass=mass, noise_text=noise_text, noise_plot=noise_plot,
                noise_cards=noise_cards, method_b=method_b, compare_btn=compare_btn, compare_text=compare_text,
                gal_a=gal_a, gal_b=gal_b)


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
