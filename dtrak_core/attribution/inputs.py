"""What the methods need beyond a query, computed once per attributor and model folder.

`inputs_for(attributor, root, clip_path)` returns the one `MethodInputs` for that triple: the
training-set features of a store as float64, CLIP and its training-set embeddings, the TracInCP
checkpoints, the Journey-TRAK featurizer. Each is built on first use, once, whichever thread asks
first (`shared.OnceCache`), and then only read; a failed build (an absent input) is retried on the
next request. An attributor's inputs go when the attributor does.
"""
from __future__ import annotations

import os
import threading
import weakref

import numpy as np
import torch

from dtrak_core.attribution.clip_encoder import ClipImageEncoder, ClipUnavailable
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.journey import JourneyFeaturizer
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.attribution.tracin import TracInCheckpoint, load_tracin, tracin_index
from dtrak_core.errors import MethodUnavailable
from dtrak_core.shared import QUERY_FEATURES_KEPT, OnceCache, image_digest


class MethodInputs:
    """Lazily computed inputs of the methods for one attributor (`base.StoreAttributor`), model folder
    and CLIP location.

    root: the model folder holding the TracInCP checkpoints (None: none).
    clip_path: local CLIP weights (None: `clip_encoder.find_clip` looks for them).
    """

    def __init__(self, attributor, root: str | None, clip_path: str | None):
        self.attributor, self.root, self.clip_path = attributor, root, clip_path
        self._cache = OnceCache()
        self._queries = OnceCache(QUERY_FEATURES_KEPT)  # recent queries' TracInCP features (tracin and gas share them)

    def cached(self, key, make):
        """`make()` once per key (see `shared.OnceCache`)."""
        return self._cache.get(key, make)

    def store(self, output_fn: str, K: int | None = None) -> tuple[FeatureSetting, FeatureStore]:
        """The attributor's store of `output_fn` (with K timesteps; None: the largest K);
        `MethodUnavailable` when there is none."""
        try:
            return self.attributor.setting(output_fn, K)
        except ValueError as e:
            raise MethodUnavailable(str(e)) from e

    def train_features(self, output_fn: str, K: int | None = None) -> torch.Tensor:
        """(N, k) float64 training features of that store."""
        setting, store = self.store(output_fn, K)
        return self.cached(("train", setting), lambda: torch.from_numpy(np.array(store.features())).double())

    def query_features(self, images: torch.Tensor, output_fn: str, K: int | None = None) -> torch.Tensor:
        """(Q, k) float64 features of query images (Q, C, H, W), with that store's featurizer."""
        setting, _ = self.store(output_fn, K)
        return self.attributor.query_features(images, setting).double()

    def inputs_in(self, space: str, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries, training set) in a model-free method's `space` ('pixel': the images themselves;
        'latent': a text-to-image folder's VAE latents, the training set's encoded once)."""
        if space == "pixel":
            return images, self.attributor.train.images
        encode = getattr(self.attributor, "encode", None)
        if encode is None:
            raise MethodUnavailable(f"{space} baselines compare VAE latents; this model has no VAE (use the pixel-* ones)")
        return encode(images), self.cached(("train", space), lambda: encode(self.attributor.train.images))

    def clip(self) -> ClipImageEncoder:
        """The CLIP image encoder; `MethodUnavailable` (cached, so not searched again) when absent."""
        def load():
            try:
                return ClipImageEncoder.load(self.clip_path)
            except ClipUnavailable as e:
                return e
        enc = self.cached("clip", load)
        if isinstance(enc, ClipUnavailable):
            raise MethodUnavailable(str(enc)) from enc
        return enc

    def clip_train(self) -> torch.Tensor:
        """(N, D) CLIP embeddings of the training images."""
        enc = self.clip()
        return self.cached("clip-train", lambda: enc(self.attributor.train.images))

    def tracin(self) -> list[TracInCheckpoint]:
        """The TracInCP checkpoints under the model folder, checked to belong to this model."""
        if self.root is None:
            raise MethodUnavailable("TracInCP needs the training run's checkpoints, which live in a model folder; "
                                    "this attributor was not loaded from one (pass root=)")
        return self.cached("tracin", lambda: load_tracin(self.root, self.attributor))

    def tracin_query_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(Q, k) features of query images under each TracInCP checkpoint, kept for recent queries."""
        checkpoints = self.tracin()
        images = images.float()
        return self._queries.get(("tracin", image_digest(images)), lambda: [c.featurizer(images) for c in checkpoints])

    def tracin_index(self) -> dict:
        """The TracInCP index, checked as `tracin` checks it but without loading (and hashing)
        the checkpoints: a quick check of whether TracInCP can run."""
        if self.root is None:
            self.tracin()  # (raises why)
        return self.cached("tracin-index", lambda: tracin_index(self.root, self.attributor)[0])

    def journey(self, setting: FeatureSetting) -> JourneyFeaturizer:
        """Journey-TRAK's featurizer, projecting with the projector of the store of `setting`."""
        att = self.attributor
        return self.cached(("journey", setting),
                           lambda: JourneyFeaturizer(att.unet, att.scheduler, att.featurizer(setting).projector))


_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attributor -> {(root, clip_path): MethodInputs}
_INPUTS_LOCK = threading.Lock()


def inputs_for(attributor, root: str | None = None, clip_path: str | None = None) -> MethodInputs:
    """The one `MethodInputs` of (attributor, model folder, CLIP location), shared by every thread."""
    root = attributor.root if root is None else root
    key = (None if root is None else os.path.abspath(root), clip_path)
    with _INPUTS_LOCK:
        per = _INPUTS.setdefault(attributor, {})
        if key not in per:
            per[key] = MethodInputs(attributor, root, clip_path)
        return per[key]
