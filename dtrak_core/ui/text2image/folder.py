"""A text-to-image model folder as the page uses it: loaded once per process and shared read-only,
and the computations of a request, functions of (root, request values): samples, attributions,
noise levels, queries from uploads and training images. No layout here.
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from dtrak_core import app_support as sup
from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.attributor import Attribution
from dtrak_core.folder import read_manifest
from dtrak_core.images import load_user_image
from dtrak_core.query import Query
from dtrak_core.shared import OnceCache
from dtrak_core.text2image.attributor import TextToImageAttributor
from dtrak_core.ui import texts

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
