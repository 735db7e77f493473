"""The model folders the app serves, loaded once per process and shared read-only by every visitor,
and the folder the current request works on.

A page may show several folders (the model picker); each tab's handlers are plain functions that
read `assets()`, the folder of the request being handled: `bound(root, fn)` runs `fn` with `root`
as that folder (a context variable, so concurrent requests on different folders never share it).
Outside a bound call it is the first of `folders()`, which `use_root` changes.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass

import gradio as gr
import numpy as np
import torch

from dtrak_core import app_support as sup
from dtrak_core import viz
from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.evaluation.quality import classify
from dtrak_core.folder import default_root, read_manifest
from dtrak_core.images import to_pil
from dtrak_core.query import Query
from dtrak_core.shared import OnceCache


def folders(environ=os.environ) -> list[str]:
    """The model folders the page serves, the first one opening: $DTRAK_ASSETS (one folder, or several
    separated by os.pathsep, in that order), else ./assets and every folder directly under it that
    holds a manifest (the committed digits, Fashion-MNIST and text-to-image folders), the one that
    shows attribution best first (`opening_first`)."""
    raw = environ.get("DTRAK_ASSETS")
    if raw and raw.strip():
        return [p for p in raw.split(os.pathsep) if p.strip()]
    root = default_root()
    subs = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else [])
                  if os.path.isfile(os.path.join(root, d, "manifest.json")))
    return opening_first([root, *(os.path.join(root, d) for d in subs)])


def opening_first(roots: list[str]) -> list[str]:
    """roots with the folder that shows attribution best first, by a rule fixed before any folder
    was measured: the largest lead of a method that uses the model over the strongest model-free
    baseline in its committed evidence (`app_support.attribution_lead`: signed LDS, the smaller lead
    of its test sets), when that lead is positive; else the order given (the digits first)."""
    leads = [(sup.attribution_lead(sup.read_evidence(r)), i) for i, r in enumerate(roots)]
    positive = [(lead, -i) for lead, i in leads if lead is not None and lead > 0]
    if not positive:
        return list(roots)
    first = -max(positive)[1]
    return [roots[first], *(r for i, r in enumerate(roots) if i != first)]


ASSETS = folders()[0]  # the folder of a call not bound to one (`bound`)
# what a setting's data is called (model/setting.json's name -> singular, plural); any other folder's
# training images are "images"
DATA_KINDS = {"fashion-mnist": ("clothing image", "clothing images")}
_root = contextvars.ContextVar("dtrak_root", default=None)

QUERY_PX, THUMB_PX = 192, viz.THUMB_PX  # display sizes; images are upscaled by whole factors (crisp pixels)
ERROR_SECONDS = 8  # an error message fades after this long (they would pile up otherwise)


def setting_name(root: str) -> str | None:
    """The name of the documented setting a folder was built from (model/setting.json), if any."""
    from dtrak_core.files import read_json

    marker = os.path.join(root, "model", "setting.json")
    if not os.path.isfile(marker):
        return None
    try:
        name = read_json(marker, "base model description", "")["setting"]["name"]
    except (ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name else None


def listed(names, most: int = 12) -> str:
    """Names as one comma-separated phrase, the first `most` of a long list and how many more."""
    names = [str(n) for n in names]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def use_root(root: str) -> None:
    """The folder of every call not bound to one (tests; a server serving one folder)."""
    global ASSETS
    ASSETS = root


def current_root() -> str:
    return _root.get() or ASSETS


def bound(root: str, fn):
    """`fn` run with `root` as the request's folder (`assets()`), keeping fn's signature (Gradio
    reads it for its Request, Progress and event-data parameters)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with bound_context(root):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def bound_context(root: str):
    """`root` as the folder of what runs inside (building a folder's tabs, warming its caches)."""
    token = _root.set(root)
    try:
        yield
    finally:
        _root.reset(token)


@dataclass
class Assets:
    root: str
    attributor: Attributor
    methods: list  # every method that can run here: TRAK family (one per store) and baselines
    unavailable: dict  # {baseline: why it cannot run here}
    damaged: dict  # {baseline: the damaged file that stops it} (a subset of `unavailable`)
    classifier: object = None  # the folder's own sample classifier (<root>/classifier/), if it has one

    def label_name(self, label: int) -> str:
        """A classifier's label as people read it: the digit, or the folder classifier's class name."""
        if self.classifier is not None and 0 <= int(label) < len(self.classifier.classes):
            return self.classifier.classes[int(label)]
        return self.class_name(label)

    @property
    def class_names(self) -> tuple | None:
        """Training label -> class name, where the folder names its classes: the training set's (a
        data folder's class sub-folders, the digits' "0".."9"), else its classifier's; None when unnamed."""
        if self.attributor.train.classes is not None:
            return tuple(self.attributor.train.classes)
        return None if self.classifier is None else tuple(self.classifier.classes)

    def class_name(self, label: int) -> str:
        """A training label's class name (the digit itself on the digits), else the label."""
        names, label = self.class_names, int(label)
        return str(names[label]) if names is not None and 0 <= label < len(names) else str(label)

    def class_text(self, label: int) -> str:
        """A training label in a sentence: "digit 3", a named class's name, else "class 3"."""
        name = self.class_name(label)
        return f"{self.class_word} {name}" if name == str(int(label)) else name

    @property
    def kind(self) -> tuple[str, str]:
        """What one training image is, singular and plural: "digit(s)", a setting's own kind
        (`DATA_KINDS`), else "image(s)"."""
        if self.digits:
            return "digit", "digits"
        return DATA_KINDS.get(setting_name(self.root), ("image", "images"))

    @property
    def words(self) -> dict:
        """The fill values of the texts that speak of the data (`texts.words`)."""
        from dtrak_core.ui import texts

        return texts.words(self.digits, self.kind[1])

    @property
    def classes_phrase(self) -> str:
        """ "in 4 classes (circle, square, star, triangle)", or "" where the classes are not named."""
        names = self.class_names
        return "" if not names else f"in {len(names)} classes ({listed(names)})"

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
    # quick: TracInCP by its index, not by loading its checkpoints (`banner.full_check` does that
    # after the first page is shown)
    problems = dict(registry.problems(attributor, root, quick=True))
    problems.update(store_problems(attributor, damaged_stores, problems))
    methods = list(attributor.methods) + [m.name for m in registry.all(kind="pixel")
                                          if m.family in registry.SCORED_FAMILIES and m.name not in problems]
    from dtrak_core.model.classifier import folder_classifier

    classifier = folder_classifier(root)
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


def assets() -> Assets:
    """The request's folder (`current_root`), loaded; a folder that cannot be loaded is a message."""
    try:
        return load_assets(current_root())
    except (ValueError, OSError) as e:
        raise gr.Error(f"The model assets could not be loaded: {e}") from None


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


# ---------------------------------------------------------------- the query and how it reads

def sample_query(seed: int, steps: int, pixels: np.ndarray) -> Query:
    return Query.sample(seed, steps, pixels)


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


def query_view(q: Query):
    return to_pil(torch.as_tensor(q.pixels), assets().scale(QUERY_PX), assets().attributor.input_range), f"**{q.title}**  \n{classifier_text(q.pixels)}"


def cards_html(elem_id: str) -> gr.HTML:
    """A grid of training cards; a click on a card (or Enter on it) inspects that training image."""
    from dtrak_core.ui import texts

    return gr.HTML(elem_id=elem_id, js_on_load=texts.get("card_click.js"))
