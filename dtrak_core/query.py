"""What is attributed: one query, the same for every kind of model folder.

    Query.sample(seed=3, steps=50, pixels=x)                 # a generated sample (a pixel folder)
    Query.sample(3, 50, x, prompt="a handwritten digit 7")   # ... of a text-to-image folder
    Query.upload(pixels, "Your image scan.png")              # an uploaded file, as the model sees it
    Query.training(12, pixels, "Training image #12")         # a training image
    q.with_prompt("a handwritten digit 2")                   # the same image, asked about another prompt

A folder turns a query into its model's inputs: a pixel folder scores `q.images()` (1, C, H, W), a
text-to-image folder the same image with `q.prompt`. `q.key` says where the query came from (a
sample by its seed and steps, anything else by its pixels) and `q.pixels_key` what it is, so caches
keyed by both give every visitor who asks the same thing the same answer.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch

SOURCES = ("sample", "upload", "training")


@dataclass(frozen=True)
class QueryKey:
    """What identifies an attribution query: a generated sample (seed, steps), a training image
    (its index) or an upload (its pixels' hash)."""
    kind: str  # 'sample', 'train' or 'upload'
    ident: str

    @staticmethod
    def for_sample(seed: int, steps: int) -> "QueryKey":
        return QueryKey("sample", f"{int(seed)}:{int(steps)}")

    @staticmethod
    def for_pixels(pixels: np.ndarray) -> "QueryKey":
        digest = hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float32).tobytes()).hexdigest()[:16]
        return QueryKey("upload", digest)


@dataclass(frozen=True, eq=False)  # (eq on an array field would be ambiguous: compare `key`s)
class Query:
    """One image to attribute, where it came from, and the prompt it is asked about (text-to-image)."""

    pixels: np.ndarray  # (C, H, W) float32 in [-1, 1]: the image as the model sees it
    title: str  # what the page calls it
    source: str  # one of SOURCES
    seed: int | None = None  # a sample's generation seed (Journey-TRAK follows its trajectory)
    steps: int | None = None  # a sample's DDIM steps
    index: int | None = None  # a training image's index
    prompt: str | None = None  # the caption it is attributed under (text-to-image folders)
    key: QueryKey = field(default=None)  # where it came from; set by the constructors

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"a query's source is one of {SOURCES}, got {self.source!r}")
        object.__setattr__(self, "pixels", np.asarray(self.pixels, dtype=np.float32))
        if self.key is None:
            key = (QueryKey.for_sample(self.seed, self.steps) if self.source == "sample" else
                   QueryKey("train", str(self.index)) if self.source == "training" else self.pixels_key)
            object.__setattr__(self, "key", key)

    @classmethod
    def sample(cls, seed: int, steps: int, pixels, title: str | None = None, prompt: str | None = None) -> "Query":
        title = title or f"Generated sample, seed {int(seed)} (DDIM {int(steps)} steps)"
        return cls(pixels, title, "sample", seed=int(seed), steps=int(steps), prompt=prompt)

    @classmethod
    def upload(cls, pixels, title: str, prompt: str | None = None) -> "Query":
        return cls(pixels, title, "upload", prompt=prompt)

    @classmethod
    def training(cls, index: int, pixels, title: str, prompt: str | None = None) -> "Query":
        return cls(pixels, title, "training", index=int(index), prompt=prompt)

    @property
    def pixels_key(self) -> QueryKey:
        """The image's identity (a seed's sample differs in the last bits with the batch it was made in)."""
        return QueryKey.for_pixels(self.pixels)

    def with_prompt(self, prompt: str) -> "Query":
        return replace(self, prompt=prompt)

    def images(self) -> torch.Tensor:
        """(1, C, H, W) float32: the batch a model scores."""
        return torch.as_tensor(self.pixels)[None]
