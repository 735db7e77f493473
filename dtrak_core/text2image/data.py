"""Captioned image sets: what a text-to-image model is trained (and fine-tuned) on.

A `CaptionedDataset` is a `Dataset` (images (N, C, H, W) in [-1, 1], labels, class names and file
paths where known) with one caption per image; its fingerprint covers the captions too, so a store
built for other captions is refused (names and paths stay outside it, as for any `Dataset`).

- The miniature: scikit-learn's digits with the caption "a handwritten digit <d>", split by digit
  (0-4 pretrain the base model, 5-9 are the LoRA fine-tuning set that is attributed).
- Your own: a folder of images with captions in the Hugging Face `imagefolder` layout (a
  `metadata.jsonl` of {"file_name": ..., "text": ...} lines, what diffusers' text-to-image scripts
  read), or a `<name>.txt` caption beside each image.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from dtrak_core.model.data import IMAGE_SUFFIXES, Dataset, image_to_tensor, load_digits, relative_path

METADATA = "metadata.jsonl"


def digit_caption(digit: int) -> str:
    return f"a handwritten digit {int(digit)}"


@dataclass(frozen=True, eq=False)
class CaptionedDataset(Dataset):
    captions: tuple = ()  # (N,) one prompt per image

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "captions", tuple(self.captions))
        if len(self.captions) != len(self.images) or not all(isinstance(c, str) for c in self.captions):
            raise ValueError(f"need one caption (a string) per image: {len(self.images)} images, "
                             f"{len(self.captions)} captions")

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint.encode())
        for caption in self.captions:
            h.update(caption.encode() + b"\0")
        return h.hexdigest()[:16]

    def describe(self, index: int) -> dict:
        """`Dataset.describe` and the image's caption (what its model was fine-tuned to draw it from)."""
        return {**super().describe(index), "caption": self.captions[int(index)]}

    def subset(self, indices, name: str | None = None) -> "CaptionedDataset":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        t = torch.as_tensor(idx)
        return CaptionedDataset(name or f"{self.name}[subset of {len(idx)}]", self.images[t], self.labels[t],
                                tuple(self.captions[i] for i in idx), **self._named(idx))


def load_digit_captions(split: str = "train", digits=range(5, 10)) -> CaptionedDataset:
    """The digits of `split` ('train' or 'validation') whose class is in `digits`, captioned."""
    digits = sorted({int(d) for d in digits})
    if not digits or not all(0 <= d <= 9 for d in digits):
        raise ValueError(f"digits must be classes 0..9, got {digits}")
    base = load_digits(split)
    keep = np.flatnonzero(np.isin(base.labels.numpy(), digits))
    labels = base.labels[torch.as_tensor(keep)]
    name = f"digits-{split}-{''.join(map(str, digits))}"
    return CaptionedDataset(name, base.images[torch.as_tensor(keep)].contiguous(), labels,
                            tuple(digit_caption(d) for d in labels.tolist()), classes=base.classes)


def _read_metadata(path: str) -> dict[str, str]:
    captions = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {n}: not a JSON object ({e}); each line must be "
                                 f'{{"file_name": ..., "text": ...}}') from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
                raise ValueError(f'{path}, line {n}: needs a "file_name" and a "text" string')
            captions[os.path.normpath(row["file_name"])] = row["text"]
    return captions


def load_captioned_folder(path: str, resolution: int, channels: int = 3) -> CaptionedDataset:
    """Every image under `path` (sorted by name) with its caption, centre-cropped and resized to the
    pipeline's resolution. Captions: `metadata.jsonl` if present, else `<name>.txt` beside each image;
    an image without one is an error naming it. Labels, class names and paths (relative to `path`):
    as `load_image_folder`."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise ValueError(f"dataset folder {path!r} does not exist")
    files = sorted(os.path.relpath(os.path.join(root, f), path) for root, _, names in os.walk(path)
                   for f in names if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {path!r}")
    meta = os.path.join(path, METADATA)
    listed = _read_metadata(meta) if os.path.isfile(meta) else None
    classes = sorted({os.path.dirname(f) for f in files})
    by_class = classes != [""]
    images, captions, labels = [], [], []
    for rel in files:
        full = os.path.join(path, rel)
        if listed is not None:
            if os.path.normpath(rel) not in listed:
                raise ValueError(f"{meta} has no caption for {rel!r}; add a line "
                                 f'{{"file_name": "{rel}", "text": "..."}}')
            captions.append(listed[os.path.normpath(rel)])
        else:
            txt = os.path.splitext(full)[0] + ".txt"
            if not os.path.isfile(txt):
                raise ValueError(f"no caption for {full!r}: write {txt!r}, or a {METADATA} for the folder")
            with open(txt, encoding="utf-8") as f:
                captions.append(f.read().strip())
        try:
            with Image.open(full) as img:
                img.load()
                images.append(image_to_tensor(img, resolution, channels))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot read image {full!r}: {e}") from e
        labels.append(classes.index(os.path.dirname(rel)) if by_class else -1)
    return CaptionedDataset(f"captioned-folder:{os.path.abspath(path)}", torch.stack(images),
                            torch.tensor(labels, dtype=torch.long), tuple(captions),
                            classes=tuple(c.replace(os.sep, "/") for c in classes) if by_class else None,
                            paths=tuple(relative_path(os.path.join(path, rel), path) for rel in files))


def load_captioned_dataset(spec) -> CaptionedDataset:
    """The fine-tuning set a text-to-image model folder names: {"digits": [5, ..., 9], "split": "train"}
    (the miniature) or {"folder": path, "resolution": r, "channels": c}."""
    if isinstance(spec, dict) and "digits" in spec:
        return load_digit_captions(spec.get("split", "train"), spec["digits"])
    if isinstance(spec, dict) and "folder" in spec:
        return load_captioned_folder(spec["folder"], int(spec["resolution"]), int(spec.get("channels", 3)))
    raise ValueError(f"unknown captioned dataset {spec!r}: expected {{'digits': [...]}} or {{'folder': ..., 'resolution': ...}}")
