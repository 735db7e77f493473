"""What featurizers and feature stores take as "images", read in fixed batches, and their range check.

Besides a tensor (N, C, H, W) (or an array):

    a sequence or a map-style torch `Dataset`    item i: a (C, H, W) tensor or array, an (image, label, ...)
                                                 tuple or list, or a dict with an "image" or "pixel_values" key
    an iterable of batches (a `DataLoader`,      each a (b, C, H, W) tensor or array, an (images, labels, ...)
    an `IterableDataset`, a generator)           tuple or list, or a dict with such a key

`transform(image) -> (C, H, W)` (optional) is applied to each item's image first (a torchvision
transform of a PIL image, say); items become float32. `image_batches` reads the images
`batch_size` at a time from item 0, so the batches are the stacked tensor's `images[i:i + batch_size]`
whatever the source (hence bit-identical features), and holds one batch at a time. A wrong item is
an `InputImagesError` naming its index and what was expected.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset, RandomSampler

from dtrak_core.errors import InputImagesError

IMAGE_KEYS = ("image", "pixel_values")  # where a dict item keeps its image (torchvision / Hugging Face datasets)
FORMS = ("a (C, H, W) tensor or array, an (image, label, ...) tuple, or a dict with an 'image' or 'pixel_values' "
         "key")


def is_stream(images) -> bool:
    """True for images read as an iterable of batches (a DataLoader, an IterableDataset, a generator);
    False for a tensor, an array, a sequence or a map-style Dataset (read item by item)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return False
    if isinstance(images, IterableDataset):
        return True
    if hasattr(images, "__len__") and hasattr(images, "__getitem__") and not isinstance(images, (str, bytes, dict)):
        return False
    if hasattr(images, "__iter__") and not isinstance(images, (str, bytes, dict)):
        return True
    folder = (" (a folder of image files: `model.data.load_image_folder(path, resolution, channels)` prepares them "
              "as `build` does)" if isinstance(images, str) else "")
    raise InputImagesError(f"images must be a (N, C, H, W) tensor, a sequence or torch Dataset of images, or an "
                           f"iterable of batches (a DataLoader), got a {type(images).__name__}{folder}")


def stream_length(images) -> int | None:
    """The number of images of a stream when it is known up front (a DataLoader's dataset), else None."""
    dataset = getattr(images, "dataset", None)
    if dataset is not None and not isinstance(dataset, IterableDataset):
        try:
            return len(dataset)
        except TypeError:
            return None
    return None


class Items:
    """Items [start, stop) of a map-style source (a sequence or torch Dataset), read lazily:
    `view[i]` is `transform(image of source[start + i])` (the image as the source holds it without
    a transform). A feature store hands these to its featurizer instead of slicing the source."""

    def __init__(self, source, start: int = 0, stop: int | None = None, transform=None):
        self.source, self.start, self.transform = source, start, transform
        self.stop = len(source) if stop is None else stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i):
        if isinstance(i, slice):
            a, b, step = i.indices(len(self))
            if step != 1:
                raise ValueError("Items supports contiguous slices only")
            return Items(self.source, self.start + a, self.start + max(a, b), self.transform)
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} of {len(self)}")
        index = self.start + (i % len(self))
        item = self.source[index]
        return item if self.transform is None else _transformed(item, self.transform, f"item {index}")


def rows(images, start: int, stop: int, transform=None, lazy: bool = False):
    """Rows [start, stop) of map-style `images` as a featurizer takes them: `images[start:stop]`, or
    an `Items` view with a `transform`, for a torch Dataset (which does not slice), and with `lazy`
    for any source but a tensor or an array (a `Featurizer` reads items; other callables get slices)."""
    sliced = isinstance(images, (torch.Tensor, np.ndarray)) or not (lazy or isinstance(images, TorchDataset))
    if transform is None and sliced:
        return images[start:stop]
    return Items(images, start, stop, transform)


def _image_of(item, where: str):
    """The image part of an item (or batch): a dict's 'image' / 'pixel_values', a tuple's first element."""
    if isinstance(item, dict):
        key = next((k for k in IMAGE_KEYS if k in item), None)
        if key is None:
            raise InputImagesError(f"{where} is a dict without an 'image' or 'pixel_values' key (its keys: "
                                   f"{', '.join(map(repr, item))}); expected {FORMS}", where)
        return item[key]
    if isinstance(item, (tuple, list)):
        if not item:
            raise InputImagesError(f"{where} is an empty {type(item).__name__}; expected {FORMS}", where)
        return item[0]
    return item


def _tensor(x, ndim: int, where: str, transformed: bool) -> torch.Tensor:
    shape = "(C, H, W)" if ndim == 3 else "(b, C, H, W)"
    form = "an image (C, H, W)" if ndim == 3 else "a batch (b, C, H, W)"
    if isinstance(x, np.ndarray):
        try:
            x = torch.from_numpy(np.ascontiguousarray(x))
        except TypeError:
            raise InputImagesError(f"{where} is an array of {x.dtype}, expected numbers", where) from None
    if not isinstance(x, torch.Tensor):
        hint = ("the transform must return one" if transformed else
                "pass transform= to convert it (e.g. torchvision's ToTensor, then scaling to the model's input range)")
        raise InputImagesError(f"{where} is a {type(x).__name__}, expected a {shape} tensor or array; {hint}", where)
    if x.ndim != ndim:
        extra = (" (an iterable is read as batches, as a DataLoader yields them: pass single images as a list or "
                 "a Dataset)" if ndim == 4 and x.ndim == 3 else "")
        raise InputImagesError(f"{where} has shape {tuple(x.shape)}, expected {form}{extra}", where)
    if x.is_complex() or x.dtype == torch.bool:
        raise InputImagesError(f"{where} has dtype {x.dtype}, expected real pixel values", where)
    return x.detach().to(torch.float32)


def _transformed(item, transform, where: str) -> torch.Tensor:
    return _tensor(transform(_image_of(item, where)), 3, where, True)


def _item(item, transform, where: str) -> torch.Tensor:
    if transform is not None:
        return _transformed(item, transform, where)
    return _tensor(_image_of(item, where), 3, where, False)


class _Shapes:
    """Every image must have the first one's shape (and the model's, when known)."""

    def __init__(self, expected: tuple | None):
        self.expected, self.first, self.first_index = expected, None, 0

    def check(self, shape: tuple, index: int) -> None:
        if self.expected is not None and shape != self.expected:
            raise InputImagesError(f"item {index} has shape {shape}, expected {self.expected} (C, H, W): the model "
                                   f"takes {self.expected[0]} channels at {self.expected[1]}x{self.expected[2]}; "
                                   f"resize it (or pass a transform that does)", f"item {index}")
        if self.first is None:
            self.first, self.first_index = shape, index
        elif shape != self.first:
            raise InputImagesError(f"item {index} has shape {shape}, but item {self.first_index} has {self.first}; "
                                   f"every image must have the same shape (C, H, W)", f"item {index}")


def image_batches(images, batch_size: int, transform=None, expected_shape: tuple | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]]:
    """(index, batch (b, C, H, W)) for consecutive batches of `batch_size` images (the last may be
    shorter), from any of the module's forms; index: the batch's first image's index in the source
    (an `Items` view's counts from its start). `expected_shape` (C, H, W): what the model takes.

    A tensor without a transform is sliced as it is (its dtype kept); every other source becomes
    float32. Only one batch (and, for a stream, the source's current batch) is held at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shapes = _Shapes(None if expected_shape is None else tuple(expected_shape))
    if isinstance(images, np.ndarray) and images.ndim == 4 and transform is None:
        images = torch.from_numpy(np.ascontiguousarray(images))
    if isinstance(images, torch.Tensor) and transform is None:
        if images.ndim != 4:
            raise InputImagesError(f"expected images (B, C, H, W), got {tuple(images.shape)}")
        if len(images):
            shapes.check(tuple(images.shape[1:]), 0)
        for start in range(0, len(images), batch_size):
            yield start, images[start:start + batch_size]
        return
    if not is_stream(images):
        n, offset = len(images), images.start if isinstance(images, Items) else 0
        for start in range(0, n, batch_size):
            batch = []
            for i in range(start, min(start + batch_size, n)):
                x = _item(images[i], transform, f"item {offset + i}")
                shapes.check(tuple(x.shape), offset + i)
                batch.append(x)
            yield offset + start, torch.stack(batch)
        return
    if isinstance(getattr(images, "sampler", None), RandomSampler):
        raise InputImagesError("the DataLoader shuffles (shuffle=True), so its images come in a random order, not the "
                               "dataset's, and the features would match no index; pass shuffle=False")
    pending, held, start = [], 0, 0
    for j, batch in enumerate(images):
        where = f"batch {j} (from item {start + held})"
        x = _image_of(batch, where)
        if transform is not None:
            x = torch.stack([_transformed(x[i], transform, f"item {start + held + i}") for i in range(len(x))])
        else:
            x = _tensor(x, 4, where, False)
        if len(x):
            shapes.check(tuple(x.shape[1:]), start + held)
        pending.append(x)
        held += len(x)
        while held >= batch_size:
            joined = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield start, joined[:batch_size]
            rest = joined[batch_size:]
            pending, held, start = ([rest] if len(rest) else []), len(rest), start + batch_size
    if held:
        yield start, torch.cat(pending)


def check_range(images: torch.Tensor, input_range, *, what: str = "images", source: str = "",
                hint: str = "", first: int | None = None) -> None:
    """A ValueError unless every pixel of `images` (B, C, H, W) is finite and inside `input_range`
    (low, high): features of images scaled otherwise (0..255 for a [-1, 1] model, [-1, 1] for a
    [0, 1] one) are silently wrong. The message gives the range found, the range expected (and
    `source`, where it comes from), how to scale (and `hint`); `first`: the index of images[0] in
    the caller's input, to name the first item outside the range."""
    lo, hi = (float(v) for v in input_range)
    if not images.numel():
        return
    x = images.detach()
    slack = 1e-5 * (hi - lo)  # float rounding of a conversion that clamps to the range
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        got, bad = "non-finite values (NaN or inf)", ~finite
    elif float(x.min()) < lo - slack or float(x.max()) > hi + slack:
        got, bad = f"values in [{float(x.min()):.4g}, {float(x.max()):.4g}]", (x < lo - slack) | (x > hi + slack)
    else:
        return
    if first is not None:
        got += f" (item {first + int(bad.reshape(len(x), -1).any(1).nonzero()[0, 0])} is the first outside it)"
    scale = ("from 0..255: x / 127.5 - 1; from [0, 1]: x * 2 - 1" if (lo, hi) == (-1.0, 1.0)
             else f"from [0, 1]: x * {hi - lo:g} + {lo:g}" if (lo, hi) != (0.0, 1.0)
             else "from 0..255: x / 255; from [-1, 1]: (x + 1) / 2")
    raise ValueError(f"{what} must lie in [{lo:g}, {hi:g}]{f', {source}' if source else ''}, got {got}; scale them "
                     f"as the model's training images were ({scale}){f', {hint}' if hint else ''}")
