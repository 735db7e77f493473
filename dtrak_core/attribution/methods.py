"""The attribution methods by name: the one registry the CLI, the app, the harnesses and the reports read.

    from dtrak_core.attribution import methods

    methods.get("D-TRAK")                     # Method(name='square', label='D-TRAK', ...)
    methods.label("trak")                     # 'TRAK'
    methods.label("renorm-ip")                # 'Renormalised IP'
    methods.all("baseline")                   # the registered baselines, in registry order
    sorted(names, key=methods.sort_key)       # the paper's column order: Random, baselines, ..., TRAK, D-TRAK
    methods.scores(attributor, "pixel-cosine", images)   # (Q, N) scores of any method
    methods.available(attributor), methods.unavailable(attributor)   # what can run here, and why not
    methods.menu(available, "pixel")          # [('TRAK family', ['avg', 'square', 'loss']), ...], the default first
    methods.is_signed("das")                  # False: DAS lists no opponents
    methods.counterfactual_rankings(available)   # what remove-and-retrain offers and accepts, then 'random'

Each `Method` belongs to one family:

- 'trak': an output function (see `output_functions`) whose projected gradients TRAK scores over
  the attributor's feature store of that output function. 'square' is D-TRAK and 'loss' TRAK;
  'eta=<e>' names the interpolation for any e (built on request, not listed by `all`).
- 'baseline': the methods the paper compares against (formulas in `baselines`).
- 'successor': methods after the paper, scored like the baselines through their own `score`
  ('das': the Diffusion Attribution Score, in `das`; 'd-trak-sharp' and 'avg-sharp': TRAK-family
  scores sharpened as s|s|, which keeps their rankings and lifts their LDS).
- 'control': the counterfactual's 'random' ranking, a seeded permutation of the training set; it
  has no scores.

Besides how it scores, each entry says what callers must not guess:

- `kinds`: the folder kinds it applies to ('pixel': an unconditional pixel-space model such as the
  digits; 'text2image': a LoRA-fine-tuned text-to-image folder, whose attributor scores the entries
  over its stores with the query's prompt, `TextToImageAttributor.baseline_scores`). `for_kind`, `menu`.
- `space`: what a model-free entry compares: the pixels, or a text-to-image folder's VAE latents
  ('latent-*', what its UNet sees); `inputs.MethodInputs.inputs_in` hands either to the same scorer.
- `signed`: its scores estimate an influence, so a negative score marks an opponent (the training
  image made the query less likely). False for a score of one sign by construction (DAS is a squared
  norm, the optimal denoiser's posterior weights are >= 0, pixel-nn is minus a distance) and for a
  similarity of the inputs themselves (pixels, CLIP or VAE latents), whose lowest scores are the
  least alike, not opponents (pixel similarity is > 0 on any two images that are mostly background).
  Opponents are listed only for signed methods (`is_signed`).
- `counterfactual`: its ranking can drive remove-top-k-and-retrain (`counterfactual_rankings`; the
  harness, `evaluation.counterfactual`, accepts exactly these).
- `group`: its heading in a grouped menu (`GROUPS`, `menu`).

`DEFAULT` is the one default method of the app, the CLI and the API, chosen by a rule that a
monotone transform of the scores cannot game and that is measured on data it does not report on:
among the methods that use the model and need nothing but the query, the highest top-1% LDS
(`evaluation.lds.top_share`: the LDS of an indicator of each query's top 1%, the same for any
increasing transform) on the digits folder's *validation* set, every lambda cross-fitted
(`experiments/strong_baselines.py`, assets/benchmarks/evidence.json); a sharpened method has its
base's ranking, so it ties with it and the base is kept. Its numbers are reported on the generated
set. `default_method(available)` is the default among what a folder can run.

Names are case-insensitive and accept the aliases ('d-trak', 'trak'). The canonical name is what
stores, job files and JSON results record, and what the CLI and the API take; the label is what
people read, the one display name every menu, text, table and chart shows. Labels have one style:
a method's proper name as its paper writes it ('TRAK', 'D-TRAK', 'Journey-TRAK', 'TracInCP', 'GAS',
'DAS'), with a TRAK-family variant's output function in parentheses ('D-TRAK (Avg)') and a
modifier after a comma ('D-TRAK, sharpened'); a method without one is described in sentence case
('Pixel RBF kernel', 'Renormalised IP', 'Gradient cosine').
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from dtrak_core.attribution import baselines, das
from dtrak_core.errors import MethodUnavailable, UnknownMethod  # noqa: F401 (what the registry raises)

FAMILIES = ("trak", "baseline", "successor", "control")
KINDS = ("pixel", "text2image")  # folder kinds (`folder` tells them apart)
GROUPS = ("TRAK family", "After the paper", "Gradient baselines", "Similarity baselines",
          "Nonparametric baselines (no model)", "Control")  # menu headings, in menu order
SCORED_FAMILIES = ("baseline", "successor")  # families scored by their own `score`, checked by `problems`
SPACES = ("pixel", "latent")  # the inputs a model-free method compares (`MethodInputs.inputs_in`)
NEEDS = ("seeds", "clip", "tracin")  # inputs a method may need besides a feature store
VARIANT_ORDER = 50  # `order` of TRAK-family variants and of names the registry does not know


@dataclass(frozen=True)
class Method:
    """One attribution method: its names, what it needs, and how it scores.

    `score(method, inputs, images, seeds, K) -> (Q, N)` is called by `scores` with the method
    itself, the attributor's `inputs.MethodInputs`, query images (Q, C, H, W) float32 in [-1, 1],
    their generation seeds (or None) and the store's K (None: the largest).
    """

    name: str  # canonical name, as stores, job files and results record it: 'square', 'pixel-dot', 'random'
    label: str  # the one display name (app, CLI, reports, harnesses): 'D-TRAK', 'Pixel RBF kernel'
    description: str  # what it scores by, in one line
    family: str  # 'trak', 'baseline' or 'control' (see the module docstring)
    order: int  # place in the paper's columns, lowest first (see `sort_key`)
    aliases: tuple[str, ...] = ()  # other accepted spellings, lower case: 'd-trak', 'dtrak'
    slug: str = ""  # file-name form ('d-trak' names the counterfactual job files); default: name without '='
    store: str | None = None  # output function of the feature store it scores with ('loss' for gradient baselines)
    needs: frozenset = frozenset()  # further inputs, from NEEDS: 'seeds' (generated samples only), 'clip', 'tracin'
    kind: str = ""  # the scorer's variant: 'dot' or 'cosine' similarity, 'relative' or 'renorm' IP
    score: Callable | None = field(default=None, repr=False)  # (method, inputs, images, seeds, K) -> (Q, N), pixel folders
    kinds: frozenset = frozenset({"pixel"})  # folder kinds it applies to, from KINDS
    signed: bool = True  # a negative score marks an opponent (see the module docstring); False: no opponents
    counterfactual: bool = True  # its ranking can drive remove-and-retrain (pixel folders)
    group: str = ""  # menu heading, from GROUPS; default: by family
    space: str = "pixel"  # what a model-free method compares: 'pixel' or 'latent' (a text-to-image folder's VAE latents)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"method {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        if not set(self.needs) <= set(NEEDS):
            raise ValueError(f"method {self.name!r}: needs must be drawn from {NEEDS}, got {sorted(self.needs)}")
        if not set(self.kinds) <= set(KINDS):
            raise ValueError(f"method {self.name!r}: kinds must be drawn from {KINDS}, got {sorted(self.kinds)}")
        default_group = {"trak": "TRAK family", "successor": "After the paper", "control": "Control"}
        object.__setattr__(self, "group", self.group or default_group.get(self.family, "Similarity baselines"))
        if self.group not in GROUPS:
            raise ValueError(f"method {self.name!r}: group must be one of {GROUPS}, got {self.group!r}")
        if self.space not in SPACES:
            raise ValueError(f"method {self.name!r}: space must be one of {SPACES}, got {self.space!r}")
        object.__setattr__(self, "slug", self.slug or self.name.replace("=", ""))

    def scores(self, attributor, images: torch.Tensor, seeds=None, *, K: int | None = None, root: str | None = None,
               clip_path: str | None = None) -> np.ndarray:
        """Scores (Q, N) float64 of query images (Q, C, H, W) in [-1, 1] against the N training images.

        seeds: the images' generation seeds (Journey-TRAK needs them). K: the feature store's K for
        store-based methods (default: the largest). root: the model folder holding the TracInCP
        checkpoints (default: the attributor's). clip_path: local CLIP weights (default: found
        by `clip_encoder.find_clip`). Raises `MethodUnavailable` (a ValueError) when an input
        is absent, saying which and how to build it.
        """
        kind = getattr(attributor, "kind", "pixel")
        if kind not in self.kinds or (kind != "pixel" and self.store is not None):
            # a store-based method of a text-to-image folder needs the query's prompt: its attributor scores it
            raise MethodUnavailable(f"{self.label} applies to {' and '.join(sorted(self.kinds))} folders only"
                                    if kind not in self.kinds else
                                    f"{self.label} scores a text-to-image query with its prompt: "
                                    "TextToImageAttributor.baseline_scores")
        if self.score is None:
            raise ValueError(f"{self.label!r} is a {self.family} ranking with no scores (see the counterfactual)")
        expected = tuple(attributor.image_shape)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"images must be a tensor (Q, {', '.join(map(str, expected))}), got {shape}")
        if hasattr(attributor, "check_input_range"):
            attributor.check_input_range(images)
        return self.score(self, attributor.method_inputs(root, clip_path), images.float(), seeds, K)


def _das_scores(method: Method, inputs, images, seeds, K) -> np.ndarray:
    return das.registry_scores(method, inputs, images, seeds, K)


def _das_residuals(inputs):
    return inputs.cached("das-residuals-check", lambda: das.model_residuals(inputs.attributor))


def _trak(method: Method, inputs, images, seeds, K) -> np.ndarray:
    return inputs.attributor.scores(images, method.name, K)


def sharpen(scores) -> np.ndarray:
    """s |s|: strictly increasing, so every ranking of s (proponents, opponents, the counterfactual's
    removals) is kept, while the strongest scores weigh more in any sum of them (the LDS's)."""
    s = np.asarray(scores, dtype=np.float64)
    return s * np.abs(s)


def sharpened_lambda_key(method_name: str, store_slug: str) -> str:
    """The manifest's `tuned_lambda` key of a sharpened method over one store (`lds tune-lambda`)."""
    return f"{method_name}/{store_slug}"


def _sharpened(method: Method, inputs, images, seeds, K) -> np.ndarray:
    """`sharpen` of the TRAK scores of the method's store, at the attributor's lambda override when
    set (`attribute --lambda`), else the lambda tuned for the sharpened scores when the folder has
    one (the best lambda moves with the transform), else the store's."""
    setting, _ = inputs.store(method.store, K)  # MethodUnavailable, naming the store to build, when absent
    lam = inputs.attributor.lam
    if lam is None:
        lam = inputs.attributor.tuned_lambdas.get(sharpened_lambda_key(method.name, setting.slug))
    return sharpen(inputs.attributor.scores(images, method.store, K, lam))


def sharpened(store: str) -> list["Method"]:
    """The registered sharpened methods over a store's output function ('square' -> [d-trak-sharp])."""
    return [m for m in _REGISTRY if m.score is _sharpened and m.store == store]


def _output_function(name, label, description, aliases=(), slug="", order=VARIANT_ORDER) -> Method:
    return Method(name, label, description, "trak", order, aliases, slug, store=name, score=_trak,
                  kinds=frozenset(KINDS))


PIXEL, T2I, BOTH = frozenset({"pixel"}), frozenset({"text2image"}), frozenset(KINDS)


def _baseline(name, label, description, order, score, kind="", store=None, needs=(), *, group, signed, kinds=PIXEL,
              counterfactual=True, space="pixel") -> Method:
    return Method(name, label, description, "baseline", order, store=store, needs=frozenset(needs), kind=kind,
                  score=score, kinds=kinds, signed=signed, counterfactual=counterfactual, group=group, space=space)


def _latent(name, label, description, order, score, kind="", *, group, signed) -> Method:
    """A model-free baseline on a text-to-image folder's VAE latents, what its UNet sees."""
    return _baseline(name, label, description, order, score, kind, group=group, signed=signed, kinds=T2I,
                     counterfactual=False, space="latent")


GRADIENT, SIMILARITY, NONPARAMETRIC = GROUPS[2], GROUPS[3], GROUPS[4]


# Registry order is listing order (the app's menu, `available`); `order` is the paper's column order.
_REGISTRY = (
    _output_function("loss", "TRAK", "gradient of the training loss ||eps - eps_theta||^2", ("trak",), slug="trak",
                     order=90),
    _output_function("square", "D-TRAK", "gradient of mean(eps_theta^2), the square of the predicted noise",
                     ("d-trak", "dtrak"), slug="d-trak", order=100),
    _output_function("avg", "D-TRAK (Avg)", "gradient of mean(eps_theta), the mean of the predicted noise "
                     "(a D-TRAK variant)"),
    _output_function("l1-norm", "D-TRAK (L1-norm)", "gradient of ||eps_theta||_1 (a D-TRAK variant)"),
    _output_function("l2-norm", "D-TRAK (L2-norm)", "gradient of ||eps_theta||_2, not squared (a D-TRAK variant)"),
    _output_function("linf-norm", "D-TRAK (Linf-norm)", "gradient of ||eps_theta||_inf (a D-TRAK variant)"),
    _output_function("elbo", "TRAK (ELBO-weighted)", "gradient of the ELBO-weighted loss w_t ||eps - eps_theta||^2 "
                     "(an ablation)"),
    _baseline("pixel-dot", "Pixel dot product", "dot product of flattened pixels", 10, baselines.inputs_similarity, "dot",
              group=SIMILARITY, signed=False, kinds=BOTH),
    _baseline("pixel-cosine", "Pixel cosine", "cosine of flattened pixels", 11, baselines.inputs_similarity, "cosine",
              group=SIMILARITY, signed=False, kinds=BOTH),
    _baseline("clip-dot", "CLIP dot product", "dot product of CLIP ViT-B/32 image embeddings", 12, baselines.clip,
              "dot", needs=("clip",), group=SIMILARITY, signed=False),
    _baseline("clip-cosine", "CLIP cosine", "cosine of CLIP ViT-B/32 image embeddings", 13, baselines.clip, "cosine",
              needs=("clip",), group=SIMILARITY, signed=False),
    _latent("latent-dot", "VAE latent dot product", "dot product of the VAE latents (what the UNet sees)", 26,
            baselines.inputs_similarity, "dot", group=SIMILARITY, signed=False),
    _latent("latent-cosine", "VAE latent cosine", "cosine of the VAE latents (what the UNet sees)", 27,
            baselines.inputs_similarity, "cosine", group=SIMILARITY, signed=False),
    _baseline("gradient-dot", "Gradient dot product", "dot product of loss gradients at the final checkpoint", 16,
              baselines.gradients, "dot", store="loss", group=GRADIENT, signed=True, kinds=BOTH),
    _baseline("gradient-cosine", "Gradient cosine", "cosine of loss gradients at the final checkpoint "
              "(Charpiat et al.)", 17, baselines.gradients, "cosine", store="loss", group=GRADIENT, signed=True,
              kinds=BOTH),
    _baseline("tracin", "TracInCP", "TracInCP: loss-gradient dot products summed over training checkpoints", 14,
              baselines.tracin, "dot", needs=("tracin",), group=GRADIENT, signed=True),
    _baseline("gas", "GAS", "GAS: loss-gradient cosines summed over training checkpoints", 15, baselines.tracin,
              "cosine", needs=("tracin",), group=GRADIENT, signed=True),
    _baseline("relative-ip", "Relative IP", "TRAK score / ||(Phi^T Phi + lam I)^-1 phi_n|| (Barshan et al.)", 19,
              baselines.inner_product, "relative", store="loss", group=GRADIENT, signed=True, kinds=BOTH),
    _baseline("renorm-ip", "Renormalised IP", "TRAK score / ||phi_n||", 20, baselines.inner_product, "renorm",
              store="loss", group=GRADIENT, signed=True, kinds=BOTH),
    _baseline("journey-trak", "Journey-TRAK", "TRAK on loss gradients averaged along the DDIM trajectory "
              "(generated samples)", 18, baselines.journey, store="loss", needs=("seeds",), group=GRADIENT,
              signed=True),
    _baseline("pixel-nn", "Pixel nearest neighbours", "nearest neighbours in pixel space: minus the squared distance "
              "(no model)", 21, baselines.nearest, group=NONPARAMETRIC, signed=False, kinds=BOTH),
    _baseline("pixel-trak", "Pixel linear kernel", "the TRAK formula on raw pixels: linear kernel ridge (no model)",
              22, baselines.kernel_ridge, "linear", group=NONPARAMETRIC, signed=True, kinds=BOTH),
    _baseline("pixel-rbf", "Pixel RBF kernel", "RBF kernel ridge on raw pixels, its bandwidth and lambda tuned like "
              "TRAK's (no model)", 23, baselines.kernel_ridge, "rbf", group=NONPARAMETRIC, signed=True, kinds=BOTH),
    _baseline("pixel-arccos", "Pixel arc-cosine kernel", "arc-cosine kernel ridge on raw pixels: an infinitely wide "
              "ReLU layer (no model)", 24, baselines.kernel_ridge, "arccos", group=NONPARAMETRIC, signed=True, kinds=BOTH),
    _baseline("optimal-denoiser", "Optimal denoiser", "posterior weight in the training set's empirical optimal "
              "denoiser, averaged over noise levels (no model)", 25, baselines.optimal_denoiser, group=NONPARAMETRIC,
              signed=False, kinds=BOTH),
    _latent("latent-nn", "VAE latent nearest neighbours", "nearest neighbours among the VAE latents: minus the "
            "squared distance (no model)", 28, baselines.nearest, group=NONPARAMETRIC, signed=False),
    _latent("latent-trak", "VAE latent linear kernel", "the TRAK formula on the VAE latents: linear kernel ridge "
            "(no model)", 29, baselines.kernel_ridge, "linear", group=NONPARAMETRIC, signed=True),
    _latent("latent-rbf", "VAE latent RBF kernel", "RBF kernel ridge on the VAE latents (no model)", 30,
            baselines.kernel_ridge, "rbf", group=NONPARAMETRIC, signed=True),
    _latent("latent-arccos", "VAE latent arc-cosine kernel", "arc-cosine kernel ridge on the VAE latents (no model)",
            31, baselines.kernel_ridge, "arccos", group=NONPARAMETRIC, signed=True),
    _latent("latent-optimal-denoiser", "VAE latent optimal denoiser", "posterior weight in the empirical optimal "
            "denoiser of the VAE latents: the memorising latent model (no model)", 32, baselines.optimal_denoiser,
            group=NONPARAMETRIC, signed=False),
    Method("das", "DAS", "Diffusion Attribution Score (Lin et al. 2025): squared TRAK-form scores of the gradients "
           "of mean(eps_theta), times each training sample's residual", "successor", 110, store="avg",
           score=_das_scores, signed=False),  # (s r)^2 >= 0: a magnitude, no opponents
    Method("d-trak-sharp", "D-TRAK, sharpened", "D-TRAK's scores s as s|s|: its proponents and opponents in its "
           "order, the strongest weighted up (the squaring of DAS's score, sign kept)", "successor", 112,
           ("sharp-d-trak",), store="square", score=_sharpened),
    Method("avg-sharp", "D-TRAK (Avg), sharpened", "the avg output function's TRAK scores s as s|s| (DAS's features and "
           "squaring, sign kept, without its residual)", "successor", 111, store="avg", score=_sharpened),
    Method("random", "Random", "a random ranking of the training set, seeded by the target (the counterfactual's "
           "control)", "control", 0, signed=False),
)
_BY_NAME = {m.name: m for m in _REGISTRY}
DEFAULT = "avg"  # by the rule in the module docstring; tests/attribution/test_methods.py re-applies it
DEFAULT_CANDIDATE_FAMILIES = ("trak", "successor")  # the rule's candidates: methods that use the model
_BY_SPELLING = {**_BY_NAME, **{alias: m for m in _REGISTRY for alias in m.aliases}}


def _eta(name: str) -> Method:
    try:
        eta = float(name[4:])
    except ValueError:
        raise UnknownMethod(f"bad eta in {name!r}; write e.g. eta=0.5") from None
    canonical = f"eta={eta:g}"
    return _output_function(canonical, f"D-TRAK ({canonical})", f"gradient of {eta:g} L_square + {1 - eta:g} (L_simple - L_square): "
                            "eta=1 is D-TRAK, eta=0.5 half of TRAK's gradient")


def default_method(available) -> str:
    """`DEFAULT` when it can run here, else D-TRAK, else TRAK, else the first available method."""
    available = list(available)
    for name in (DEFAULT, "square", "loss"):
        if name in available:
            return name
    if not available:
        raise MethodUnavailable("no attribution method can run on this model folder (no feature store)")
    return available[0]


def find(name) -> Method | None:
    """The method a name (any case, an alias, 'eta=<e>') stands for, or None when it names none;
    `UnknownMethod` for a malformed 'eta=' name."""
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    if key in _BY_SPELLING:
        return _BY_SPELLING[key]
    return _eta(key) if key.startswith("eta=") else None


def get(name) -> Method:
    """The method a name stands for: `find`, with `UnknownMethod` (a ValueError) for an unknown name."""
    method = find(name)
    if method is None:
        raise UnknownMethod(f"unknown method {name!r}; choose one of {', '.join(spellings())}")
    return method


def spellings(family: str | None = None) -> list[str]:
    """Every accepted name of the registered methods of `family`: canonical names, 'eta=<e>', aliases."""
    listed = all(family)
    eta = ["eta=<e>"] if family in (None, "trak") else []
    return [m.name for m in listed] + eta + [alias for m in listed for alias in m.aliases]


def all(family: str | None = None, kind: str | None = None) -> tuple[Method, ...]:  # noqa: A001 (the registry's own namespace)
    """The registered methods of `family` ('trak', 'baseline', 'successor', 'control'; None: every
    one) that apply to folders of `kind` ('pixel', 'text2image'; None: any), in registry order
    ('eta=<e>' methods are made on request and not listed)."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return tuple(m for m in _REGISTRY if (family is None or m.family == family) and (kind is None or kind in m.kinds))


# labels that results written before the labels had one style carry ('D-TRAK (square)' in a committed
# report), so that they read as the method's label today
_FORMER_LABELS = {"D-TRAK (square)": "square", "TRAK (loss)": "loss", "avg, sharpened": "avg-sharp"}


def label(name) -> str:
    """The display label of a method ('d-trak' -> 'D-TRAK', 'renorm-ip' -> 'Renormalised IP'), from any
    spelling `find` accepts or a former label; any other text as it is."""
    try:
        method = find(name)
    except UnknownMethod:
        method = None
    if method is None and isinstance(name, str) and name.strip() in _FORMER_LABELS:
        method = _BY_NAME[_FORMER_LABELS[name.strip()]]
    return method.label if method is not None else str(name)


def description(name) -> str:
    """What a method scores by, in one line; any other name as it is."""
    try:
        method = find(name)
    except UnknownMethod:
        method = None
    return method.description if method is not None else str(name)


def is_signed(name) -> bool:
    """Whether a method's negative scores mark opponents (`Method.signed`): only then are opponents
    listed. A name the registry does not know is taken as a TRAK-family variant (signed)."""
    try:
        method = find(name)
    except UnknownMethod:
        method = None
    return True if method is None else method.signed


def choices(available) -> list[str]:
    """The names of a method menu over `available` (what a folder can run): the default first
    (`default_method`), then D-TRAK and TRAK, then the rest in the given order."""
    available = list(dict.fromkeys(available))
    if not available:
        return []
    first = list(dict.fromkeys(m for m in (default_method(available), "square", "loss") if m in available))
    return first + [m for m in available if m not in first]


def menu(available, kind: str = "pixel") -> list[tuple[str, list[str]]]:
    """The method menu of a folder of `kind` over `available`, grouped: (heading from GROUPS, names
    in `choices` order) for each non-empty group, in GROUPS order. A name the registry does not know
    ('eta=0.5' is known) is left out; so is one that does not apply to `kind`."""
    known = [m for m in choices(available) if find(m) is not None and kind in get(m).kinds]
    return [(g, names) for g in GROUPS if (names := [m for m in known if get(m).group == g])]


def counterfactual_rankings(available) -> list[str]:
    """The rankings remove-and-retrain accepts among `available` (what a pixel folder can run), in
    `choices` order, then 'random': the counterfactual's menu, and exactly what it accepts."""
    scored = [m for m in choices(available) if m != "random" and find(m) is not None
              and get(m).counterfactual and "pixel" in get(m).kinds]
    return scored + ["random"]


def sort_key(name) -> tuple[int, str]:
    """Sort key for method names in the paper's column order: Random, the baselines, the TRAK-family
    variants (and unregistered names), TRAK, D-TRAK; ties by canonical name. Reverse it for D-TRAK first."""
    try:
        method = find(name)
    except UnknownMethod:
        method = None
    return (method.order, method.name) if method is not None else (VARIANT_ORDER, str(name))


# -- running methods -------------------------------------------------------------------------------
def scores(attributor, name: str, images: torch.Tensor, seeds=None, *, K: int | None = None, root: str | None = None,
           clip_path: str | None = None) -> np.ndarray:
    """Scores (Q, N) of any method by name for query images (Q, C, H, W) in [-1, 1]; see `Method.scores`.

    Raises `UnknownMethod` for a name the registry does not know and `MethodUnavailable` when
    the method's weights, stores or seeds are not present (both ValueErrors).
    """
    return get(name).scores(attributor, images, seeds, K=K, root=root, clip_path=clip_path)


def problems(attributor, root: str | None = None, clip_path: str | None = None,
             quick: bool = False, names=None) -> dict[str, ValueError]:
    """{baseline name: why it cannot run here}: a `MethodUnavailable` when its inputs are absent,
    another ValueError (naming the file) when they are present but damaged. Each input is checked
    once; a need for seeds is a property of the query and is not checked here. names: check only
    these registered names (None: every baseline and successor of a pixel folder).

    quick: check the TracInCP checkpoints by their index only (present, complete, this model's),
    not by loading and hashing their weights; damaged weights are then found when TracInCP first
    runs (or by a full check)."""
    inputs = attributor.method_inputs(root, clip_path)

    def needed(method):  # (input, its check) for each input the method needs, its store first
        if method.store:
            yield ("store", method.store), lambda: inputs.train_features(method.store)
        for need in ("clip", "tracin"):
            if need in method.needs:
                yield need, getattr(inputs, "tracin_index" if quick and need == "tracin" else need)
        if method.score is _das_scores:  # its training losses, a file of the model folder (`build-das`)
            yield "das-residuals", lambda: _das_residuals(inputs)

    outcome, found = {}, {}  # input -> the ValueError that stops it, or None when it is present
    for method in (m for m in _REGISTRY if m.family in SCORED_FAMILIES and "pixel" in m.kinds
                   and (names is None or m.name in names)):
        for key, check in needed(method):
            if key not in outcome:
                try:
                    check()
                    outcome[key] = None
                except ValueError as e:
                    outcome[key] = e
            if outcome[key] is not None:
                found[method.name] = outcome[key]
                break
    return found


def unavailable(attributor, root: str | None = None, clip_path: str | None = None) -> dict[str, str]:
    """{baseline name: why it cannot run here} for this attributor, as text."""
    return {name: str(e) for name, e in problems(attributor, root, clip_path).items()}


def available(attributor, root: str | None = None, clip_path: str | None = None) -> list[str]:
    """The methods that can run now: the attributor's TRAK family (one per output function with a
    store, sorted by name), then the baselines whose inputs are present, in registry order."""
    missing = problems(attributor, root, clip_path)
    return list(attributor.methods) + [m.name for m in _REGISTRY if m.family in SCORED_FAMILIES
                                       and "pixel" in m.kinds and m.name not in missing]
