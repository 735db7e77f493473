"""Datasets: the embedded digits default and folders of images.

A `Dataset` holds images as a float32 tensor (N, C, H, W) scaled to [-1, 1] and integer labels
(-1 where unknown). Its `fingerprint` is a content hash (`fingerprint`, the one used for every set
of images: training sets and test sets alike), written into feature-store metadata so a store built
for other data is refused.

What names a training image to a reader rides along, outside the fingerprint (so stores and
manifests built before it was kept stay valid): `classes` (label -> class name: a folder's class
sub-folders, the digits' "0".."9") and `paths` (each image's file, relative to its data folder).
`describe(i)` gives them for one image, as results show them.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

DIGITS_VALIDATION_SIZE = 297  # 1,797 digits -> 1,500 training + 297 validation
DIGITS_SPLIT_SEED = 0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
INPUT_RANGE = (-1.0, 1.0)  # what every loader here scales pixels to: the range a model folder's model was trained on
DIGIT_CLASSES = tuple(str(d) for d in range(10))


def fingerprint(images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """The content hash of a set of images (N, C, H, W) and their labels (N,) (None: unknown, -1 each):
    16 hex digits of sha256 over the shape, the float32 pixels and the int64 labels. Feature stores,
    LDS runs and counterfactual results record it, so inputs that differ by one pixel are told apart.
    """
    if labels is None:
        labels = torch.full((len(images),), -1, dtype=torch.long)
    h = hashlib.sha256()
    h.update(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Dataset:
    name: str
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1], or in `value_range`
    labels: torch.Tensor  # (N,) int64, -1 where unknown
    classes: tuple | None = field(default=None, kw_only=True)  # label -> class name (None: unnamed)
    paths: tuple | None = field(default=None, kw_only=True)  # (N,) files relative to the data folder (None: not files)
    value_range: tuple = field(default=INPUT_RANGE, kw_only=True)  # (low, high) of the pixels: the model's input range

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != torch.float32:
            raise ValueError(f"images must be a float32 (N, C, H, W) tensor, got {tuple(self.images.shape)} {self.images.dtype}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must have shape ({len(self.images)},), got {tuple(self.labels.shape)}")
        for name, want in (("classes", None), ("paths", len(self.images))):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value)
            if not all(isinstance(v, str) for v in value) or (want is not None and len(value) != want):
                raise ValueError(f"{name} must be strings" + (f", one per image ({want})" if want is not None else "")
                                 + f", got {len(value)}")
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.images)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.images, self.labels)

    def class_name(self, label: int) -> str | None:
        """The name of class `label` (None: unlabelled, or the classes are not named)."""
        label = int(label)
        return self.classes[label] if self.classes is not None and 0 <= label < len(self.classes) else None

    def describe(self, index: int) -> dict:
        """What names training image `index` to a reader, as far as it is known: {"path": its file
        relative to the data folder, "class": its class name}; a `CaptionedDataset` adds "caption"."""
        out = {}
        if self.paths is not None:
            out["path"] = self.paths[int(index)]
        name = self.class_name(self.labels[int(index)])
        if name is not None:
            out["class"] = name
        return out

    def _named(self, idx: np.ndarray) -> dict:
        """The `classes` and `paths` keywords of a subset at `idx`."""
        return {"classes": self.classes, "paths": None if self.paths is None else tuple(self.paths[i] for i in idx),
                "value_range": self.value_range}

    def subset(self, indices, name: str | None = None) -> "Dataset":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        t = torch.as_tensor(idx, dtype=torch.long)
        return Dataset(name or f"{self.name}[subset of {len(idx)}]", self.images[t], self.labels[t], **self._named(idx))


def _digits_arrays():
    from sklearn.datasets import load_digits  # ships its data: no download

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
    return images[:, None], digits.target.astype(np.int64)


def digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split of the 1,797 digits: (1,500 train indices, 297 validation indices)."""
    from sklearn.model_selection import train_test_split

    _, labels = _digits_arrays()
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_VALIDATION_SIZE, stratify=labels, random_state=DIGITS_SPLIT_SEED
    )
    return np.sort(train_idx), np.sort(val_idx)


def load_digits(split: str = "train") -> Dataset:
    """scikit-learn's handwritten digits (8x8, one channel, ink = +1), split 'train' or 'validation'."""
    images, labels = _digits_arrays()
    train_idx, val_idx = digits_split()
    idx = {"train": train_idx, "validation": val_idx}.get(split)
    if idx is None:
        raise ValueError(f"unknown digits split {split!r}; use 'train' or 'validation'")
    return Dataset(f"digits-{split}", torch.from_numpy(images[idx]).contiguous(), torch.from_numpy(labels[idx]),
                   classes=DIGIT_CLASSES)


def image_to_tensor(img, resolution: int, channels: int = 1) -> torch.Tensor:
    """A PIL image -> (C, H, W) float32 in [-1, 1]: centre-cropped to a square, resized to `resolution`."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32) / 255.0 * 2.0 - 1.0
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


def parse_input_range(value) -> tuple[float, float]:
    """(low, high) from "-1,1", "0,1" or a pair of numbers; a ValueError unless low < high, both finite."""
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        lo, hi = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"input range must be two numbers low,high (e.g. -1,1 or 0,1), got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"input range must have low < high (e.g. -1,1 or 0,1), got {value!r}")
    return lo, hi


def to_input_range(images: torch.Tensor, input_range=INPUT_RANGE) -> torch.Tensor:
    """Images in [-1, 1] (what every loader here makes) -> the same images mapped linearly to
    `input_range` (low, high): -1 -> low, 1 -> high (unchanged for [-1, 1])."""
    lo, hi = parse_input_range(input_range)
    if (lo, hi) == INPUT_RANGE:
        return images
    return ((images + 1) * ((hi - lo) / 2) + lo).to(images.dtype)


def from_input_range(images: torch.Tensor, input_range=INPUT_RANGE) -> torch.Tensor:
    """The inverse of `to_input_range`: images in `input_range` -> [-1, 1] (what the pictures assume)."""
    lo, hi = parse_input_range(input_range)
    if (lo, hi) == INPUT_RANGE:
        return images
    return ((images - lo) * (2 / (hi - lo)) - 1).to(images.dtype)


def load_image_folder(path: str, resolution: int, channels: int = 1, invert: bool = False,
                      input_range=INPUT_RANGE) -> Dataset:
    """Every image file in `path` (sorted by name), cropped and resized to the model's resolution.

    Labels come from sub-folder names when the images sit in one sub-folder per class (sorted
    names -> 0, 1, ...; the names are the dataset's `classes`), else -1. `invert` maps dark ink on
    light paper to the digits' convention. Each image's `paths` entry is its file relative to `path`.
    The pixels are scaled to [-1, 1], then mapped to `input_range` (`to_input_range`).
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise ValueError(f"dataset folder {path!r} does not exist")
    files = sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(path)
        for f in names
        if f.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {path!r}")
    classes = sorted({os.path.relpath(os.path.dirname(f), path) for f in files})
    by_class = len(classes) > 1 or classes != ["."]
    images, labels = [], []
    for f in files:
        try:
            with Image.open(f) as img:
                img.load()
                images.append(image_to_tensor(img, resolution, channels))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {f!r}: {e}") from e
        labels.append(classes.index(os.path.relpath(os.path.dirname(f), path)) if by_class else -1)
    x = torch.stack(images)
    if invert:
        x = -x
    x = to_input_range(x, input_range)
    return Dataset(f"folder:{os.path.abspath(path)}", x, torch.tensor(labels, dtype=torch.long),
                   classes=tuple(c.replace(os.sep, "/") for c in classes) if by_class else None,
                   paths=tuple(relative_path(f, path) for f in files), value_range=parse_input_range(input_range))


def relative_path(file: str, folder: str) -> str:
    """`file` relative to `folder`, with "/" separators whatever the system (results are JSON)."""
    return os.path.relpath(file, folder).replace(os.sep, "/")


def load_dataset(spec) -> Dataset:
    """The training set a model folder's manifest names: "digits-train" (the embedded default) or
    {"folder": path, "resolution": r, "channels": c, "invert": bool, "input_range": [low, high]} (see
    `load_image_folder`; no input_range: [-1, 1], as every folder built before it was recorded)."""
    if spec == "digits-train":
        return load_digits("train")
    if isinstance(spec, dict) and "folder" in spec:
        return load_image_folder(spec["folder"], int(spec["resolution"]), int(spec.get("channels", 1)),
                                 invert=bool(spec.get("invert", False)),
                                 input_range=spec.get("input_range", INPUT_RANGE))
    raise ValueError(f"unknown dataset {spec!r}: expected 'digits-train' or {{'folder': ..., 'resolution': ...}}")
