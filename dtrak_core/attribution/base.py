"""What every attributor shares, whatever its model: the training set's feature stores by output
function, the ridge lambda of each and the `TRAKScorer`s fitted on them, the inputs of the registry's
methods, and the `Attribution` a query returns.

    Attributor (attributor.py)                  an unconditional UNet queried by an image
    TextToImageAttributor (text2image/)         a LoRA-adapted pipeline queried by an image and its prompt

Each is a `StoreAttributor` and brings the query side: `featurizer`, `query_features`, `scores`,
`attribute`, `load`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.batches import check_range
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.inputs import MethodInputs, inputs_for
from dtrak_core.attribution.output_functions import canonical_name
from dtrak_core.attribution.scoring import TRAKScorer, top_k
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.errors import root_option
from dtrak_core.model.data import INPUT_RANGE

RULE = "rule"  # lam=RULE: the data-free `scoring.default_lambda` rule, whatever the manifest says


@dataclass
class Attribution:
    """One query's scores over the training set, with its top proponents and opponents; `train`, the
    training set (a `data.Dataset`), lets `table` name each image (path, class, caption)."""

    method: str  # canonical method name ('square' for D-TRAK)
    scores: np.ndarray  # (N,) one score per training image; higher = stronger proponent
    labels: np.ndarray  # (N,) training labels (-1 when unknown)
    # the scored training set (None: rows carry index, label and score only)
    train: Any = field(default=None, repr=False, compare=False)

    def proponents(self, n: int) -> np.ndarray:
        """(n,) training indices with the highest scores, strongest first."""
        return top_k(self.scores, n)[0]

    def opponents(self, n: int) -> np.ndarray:
        """(n,) training indices with the lowest scores, strongest first (opponents only when `signed`)."""
        return top_k(self.scores, n)[1]

    @property
    def signed(self) -> bool:
        """Whether the method's negative scores mark opponents (`methods.is_signed`)."""
        return registry.is_signed(self.method)

    def describe(self, index: int) -> dict:
        """What names training image `index` beyond its label: {"path", "class", "caption"}, those known
        (`Dataset.describe`; {} without `train`)."""
        return {} if self.train is None else self.train.describe(int(index))

    def table(self, n: int) -> dict:
        """Top-n proponents and opponents as plain lists (for JSON and display): each row's index,
        label, the `describe` keys known (file path relative to the data folder, class name,
        caption) and score; no opponents for a method whose scores carry no sign (its lowest scores
        are the least alike, not opponents)."""
        def rows(idx):
            return [{"index": int(i), "label": int(self.labels[i]), **self.describe(i), "score": float(self.scores[i])}
                    for i in idx]
        return {"method": self.method, "proponents": rows(self.proponents(n)),
                "opponents": rows(self.opponents(n)) if self.signed else []}


class StoreAttributor:
    """The feature stores of one model's training set and their scorers (`stores`: output function ->
    [(setting, store)], several K per output function possible); `root`, `lam`, `tuned_lambdas` and
    `tuned_params` as `Attributor` documents them. Featurizers and fitted scorers are built on first
    use, once, and shared by every thread."""

    device = "cpu"
    kind = "pixel"  # the folder kind (`methods.KINDS`): which registered methods apply
    input_range = INPUT_RANGE  # (low, high) of the pixels the model was trained on: query images must lie in it

    def check_input_range(self, images: torch.Tensor) -> None:
        """A ValueError unless every pixel of the query `images` is finite and inside `input_range`:
        the features of images scaled otherwise (0..255 for a [-1, 1] model, [-1, 1] for a [0, 1] one)
        are silently wrong, so they are refused, saying how to scale them."""
        check_range(images, self.input_range, what="query images",
                    source="the input range this model was trained on (manifest.json input_range; [-1, 1] when not "
                           "recorded)",
                    hint="or pass an image file or PIL image, which is converted (`images.load_user_image`, the "
                         "CLI's --image)")

    def _index_stores(self, stores: list[FeatureStore], checkpoint: str, fingerprint: str) -> None:
        """`self.stores` from complete stores, each checked to be built for this checkpoint and training set."""
        self.stores = {}
        for store in stores:
            setting = FeatureSetting(**{f: store.metadata[f] for f in FeatureSetting.__dataclass_fields__})
            store.check_identity(FeatureStore.identity(setting, checkpoint, fingerprint))
            self.stores.setdefault(setting.output_fn, []).append((setting, store))

    @property
    def methods(self) -> list[str]:
        """The output functions with a store, sorted: the TRAK-family methods this attributor runs."""
        return sorted(self.stores)

    def setting(self, method: str, K: int | None = None) -> tuple[FeatureSetting, FeatureStore]:
        """(setting, store) of a TRAK-family method (any spelling: 'd-trak', 'square') with K
        timesteps (None: the largest K present); ValueError naming the stores present otherwise."""
        name = canonical_name(method)
        options = [s for s in self.stores.get(name, []) if K is None or s[0].K == K]
        if not options:
            have = ", ".join(f"{s.output_fn} (K={s.K})" for v in self.stores.values() for s, _ in v) or "none"
            raise ValueError(f"no feature store for method {method!r}" + (f" with K={K}" if K else "")
                             + f"; stores present: {have}. Build one with `python -m dtrak_core featurize"
                             f"{root_option(self.root)} --output-fn {name}" + (f" --K {K}" if K else "") + "`")
        return max(options, key=lambda s: s[0].K)  # the most accurate one by default

    def lambda_for(self, setting: FeatureSetting, lam=None) -> float | None:
        """The ridge lambda for a store: `lam` if given (RULE: the data-free rule), else the
        attributor's override, else the lambda tuned on validation LDS (manifest 'tuned_lambda'),
        else None (TRAKScorer then applies the rule)."""
        if lam == RULE:
            return None
        if lam is not None:
            return float(lam)
        if self.lam is not None:
            return self.lam
        return self.tuned_lambdas.get(setting.slug)

    def scorer(self, method: str, K: int | None = None, lam=None) -> TRAKScorer:
        """The `TRAKScorer` fitted on that store's training features (N, k), with `lambda_for`'s lambda."""
        setting, store = self.setting(method, K)
        key = (setting, self.lambda_for(setting, lam))
        return self._scorers.get(key, lambda: TRAKScorer(lam=key[1], device=self.device).fit(store.features()))

    def method_inputs(self, root: str | None = None, clip_path: str | None = None) -> MethodInputs:
        """The inputs of the registry's methods for this attributor (`inputs.inputs_for`): root, the
        model folder of the TracInCP checkpoints (None: this attributor's); clip_path, local CLIP weights."""
        return inputs_for(self, root, clip_path)
