"""Attribution end to end: a model, its training set and its feature stores, queried by method name.

    attributor = Attributor.load("assets")             # the embedded default
    result = attributor.attribute(image, "d-trak")     # image (C, H, W) in [-1, 1]
    result.proponents(10), result.opponents(10), result.scores

Methods here are the TRAK family, by output-function name (see `output_functions`): 'd-trak' is
'square', 'trak' is 'loss'; any other needs a store built with `python -m dtrak_core featurize`.
The baselines score through the method registry: `methods.scores(attributor, name, images)`.
"""
from __future__ import annotations

import numpy as np
import torch

from dtrak_core.attribution.base import Attribution, StoreAttributor
from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.attribution.output_functions import canonical_name
from dtrak_core.attribution.store import FeatureStore, open_stores
from dtrak_core.folder import ModelFolder
from dtrak_core.model.data import Dataset
from dtrak_core.model.unet import checkpoint_hash
from dtrak_core.shared import QUERY_FEATURES_KEPT, OnceCache, image_digest


def _matching(stores: list, checkpoint: str, dataset: str, damaged: dict) -> list:
    """The stores built for this checkpoint and dataset; the others are recorded in `damaged`
    ({store folder: the error}); at least one must remain, else the first error is raised."""
    kept = []
    for store in stores:
        try:
            setting = FeatureSetting(**{f: store.metadata[f] for f in FeatureSetting.__dataclass_fields__})
            store.check_identity(FeatureStore.identity(setting, checkpoint, dataset))
            kept.append(store)
        except (KeyError, TypeError, ValueError) as e:
            damaged[store.path] = e if isinstance(e, ValueError) else ValueError(f"{store.path}: {e}")
    if damaged and not kept:
        raise next(iter(damaged.values()))
    return kept


class Attributor(StoreAttributor):
    """One model, its training set and the training set's feature stores, scored by TRAK.

        attributor = Attributor.load(root)                   # or Attributor(unet, scheduler, train, stores)
        attributor.methods                                   # output functions with a store: ['loss', 'square']
        attributor.scores(images, "d-trak")                  # images (Q, C, H, W) in [-1, 1] -> (Q, N)
        attributor.attribute(image, "trak").proponents(10)   # one image (C, H, W)

    Args:
        unet, scheduler: the diffusers model and its noise scheduler (the UNet is put in eval mode
            and only ever read: gradient work runs on private replicas).
        train: the N training images the stores were built on (`model.data.Dataset`).
        stores: complete `FeatureStore`s of `train` for this model's weights (checked: their
            identity must name this checkpoint and dataset); several per output function may differ in K.
        lam: a ridge lambda for every store, overriding the tuned ones (None: see `lambda_for`).
        tuned_lambdas: {store slug: lambda} chosen on validation LDS (a model folder's manifest).
        input_range: (low, high) of the pixels the model was trained on (None: [-1, 1]; a model
            folder's manifest `input_range`); query images outside it are refused (`check_input_range`).

    Featurizers and fitted `TRAKScorer`s are built on first use, once, and shared by every thread;
    `device` ("cpu", the default, or "cuda"; set it before the first query) is where they compute the
    query's gradients and the scores.
    """

    def __init__(self, unet, scheduler, train: Dataset, stores: list[FeatureStore], lam: float | None = None,
                 tuned_lambdas: dict[str, float] | None = None, device="cpu", tuned_params: dict | None = None,
                 input_range=None):
        self.unet, self.scheduler, self.train = unet.eval(), scheduler, train
        if input_range is not None:
            self.input_range = (float(input_range[0]), float(input_range[1]))
        self.device = device
        self.root = None  # the model folder, when loaded from one (`load`)
        self.lam = lam  # overrides every store's lambda when set
        self.tuned_lambdas = dict(tuned_lambdas or {})  # store slug -> lambda chosen on validation LDS
        self.tuned_params = dict(tuned_params or {})  # the manifest's tuned entries (kernel baselines: lambda, gamma)
        self._index_stores(stores, checkpoint_hash(unet), train.fingerprint)
        # built on first use, once, whichever thread asks first (featurizers and scorers are then
        # read-only, so every request can share them)
        self._scorers, self._featurizers = OnceCache(), OnceCache()
        # the features of recent queries: TRAK and the gradient and IP baselines all score
        # the query's loss features, so an image asked about under every method featurizes once
        self._query_features = OnceCache(QUERY_FEATURES_KEPT)

    @classmethod
    def load(cls, root: str | None = None, *, tuned: bool = True, damaged: dict | None = None) -> "Attributor":
        """Load a model folder (checkpoint, training set, stores, tuned lambdas; see `folder.ModelFolder`),
        every file verified; root None: `folder.default_root()` ($DTRAK_ASSETS, else ./assets).
        tuned=False: without the manifest's tuned lambdas (unchecked, unused: `lds tune-lambda`).
        damaged: None (the default, the CLI's): a damaged store is an error naming its file; a dict:
        a store that cannot be opened or was built for another model is left out and recorded there
        ({store folder: the error}), as long as one store loads (the app: only the methods that
        need it are turned off, see `store.open_stores`).
        With no root and no model folder where the default points, the ValueError says how to name
        one (root=, or $DTRAK_ASSETS): an installed package ships none."""
        if root is None:
            import os

            from dtrak_core.errors import no_model_folder
            from dtrak_core.folder import MANIFEST, default_root

            if not os.path.isfile(os.path.join(default_root(), MANIFEST)):
                raise ValueError(no_model_folder(default_root(), "root= (Attributor.load('path/to/folder'))"))
        folder = ModelFolder.load(root, tuned=tuned)
        if cls is Attributor and folder.extra.get("kind") == "text2image":  # written by text2image/build.py
            from dtrak_core.text2image.attributor import TextToImageAttributor

            return TextToImageAttributor.load(folder.root)
        folder.require("checkpoint", "dataset", "stores")
        unet, scheduler = folder.load_model()
        train = folder.training_set()
        stores = open_stores(folder, damaged)
        if damaged is not None:
            stores = _matching(stores, checkpoint_hash(unet), train.fingerprint, damaged)
        attributor = cls(unet, scheduler, train, stores,
                         tuned_lambdas=folder.tuned_lambdas() if tuned else {},
                         tuned_params=dict(folder.tuned_lambda) if tuned else {}, input_range=folder.value_range)
        attributor.root = folder.root
        return attributor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model takes."""
        cfg = self.unet.config
        return cfg.in_channels, cfg.sample_size, cfg.sample_size

    def featurizer(self, setting: FeatureSetting) -> Featurizer:
        """The shared `Featurizer` of this model for `setting`: images (Q, C, H, W) -> (Q, k)."""
        return self._featurizers.get(setting, lambda: Featurizer(self.unet, self.scheduler, setting, device=self.device,
                                                                 input_range=self.input_range))

    def gradient_inputs(self, images: torch.Tensor, prompts=None) -> tuple[torch.Tensor, dict]:
        """(inputs, conditioning) that this model's gradient featurizers take for query images
        (B, C, H, W): the images themselves and no conditioning (an unconditional model has no prompt)."""
        if prompts is not None:
            raise ValueError("an unconditional model's query has no prompt")
        return images, {}

    def query_features(self, images: torch.Tensor, setting: FeatureSetting) -> torch.Tensor:
        """(Q, k) float32 features of query images (Q, C, H, W) under `setting`: the featurizer's
        output, kept for the QUERY_FEATURES_KEPT most recent (images, setting) pairs (the
        featurizer is deterministic, so a kept result is the one it would compute)."""
        images = images.float()
        features = self._query_features.get((setting, image_digest(images)), lambda: self.featurizer(setting)(images))
        return features.clone()  # (callers may write to theirs)

    def scores(self, images: torch.Tensor, method: str, K: int | None = None, lam=None) -> np.ndarray:
        """Scores (B, N) float64 of images (B, C, H, W) in [-1, 1] (the folder's `input_range`) under a
        TRAK-family method (K: the store's timesteps, None the largest; lam: see `lambda_for`)."""
        setting, _ = self.setting(method, K)
        expected = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        self.check_input_range(images)
        return self.scorer(method, K, lam).scores(self.query_features(images, setting))

    def attribute(self, image: torch.Tensor, method: str = "d-trak", K: int | None = None, lam=None) -> Attribution:
        """One image (C, H, W) -> its `Attribution` over the training set (`lam`: see `lambda_for`)."""
        scores = self.scores(image[None], method, K, lam)[0]
        return Attribution(canonical_name(method), scores, self.train.labels.numpy(), self.train)
