"""A small image classifier that reads generated samples (sample quality, class captions).

It is trained on real images that are not in the attributed training set, so it judges samples by
what the class looks like, not by memory of the training images. Saved as safetensors plus a JSON
card (classes, input size, measured accuracy) in one folder:

    <folder>/classifier.safetensors   the weights
    <folder>/classifier.json          {"classes": [...], "size": 28, "accuracy": ..., how it was trained}

    clf = ImageClassifier.load("assets/fashion/classifier")
    labels, confidences = clf.classify(images)    # images (B, 1, H, W) in [-1, 1]
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from dtrak_core.errors import IntegrityError
from dtrak_core.files import atomic_write_bytes, atomic_write_json, read_json

WEIGHTS = "classifier.safetensors"
CARD = "classifier.json"


def _network(num_classes: int, channels: int) -> nn.Module:
    """Two conv blocks and a small linear head (~110K parameters, a 0.4 MB file)."""
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.LazyLinear(64), nn.ReLU(), nn.Dropout(0.25), nn.Linear(64, num_classes),
    )


class ImageClassifier:
    def __init__(self, classes, size: int, channels: int = 1, card: dict | None = None):
        self.classes = list(classes)
        self.size, self.channels = int(size), int(channels)
        self.net = _network(len(self.classes), self.channels)
        with torch.no_grad():  # materialise the lazy layer
            self.net(torch.zeros(1, self.channels, self.size, self.size))
        self.net.eval()
        self.card = dict(card or {})

    def fit(self, images: torch.Tensor, labels: torch.Tensor, epochs: int = 8, seed: int = 0, batch_size: int = 128):
        """Train on (N, C, H, W) images in [-1, 1] with integer labels (deterministic for a seed)."""
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.net = _network(len(self.classes), self.channels)
        self.net(torch.zeros(1, self.channels, self.size, self.size))
        opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.net.train()
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=gen)
            for i in range(0, len(images), batch_size):
                idx = order[i:i + batch_size]
                loss = nn.functional.cross_entropy(self.net(images[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def probabilities(self, images) -> np.ndarray:
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.channels, self.size, self.size):
            raise ValueError(f"the classifier takes {self.channels}x{self.size}x{self.size} images, got "
                             f"{tuple(x.shape)[1:]}")
        return torch.cat([self.net(x[i:i + 512]).softmax(1) for i in range(0, len(x), 512)]).numpy() if len(x) else \
            np.zeros((0, len(self.classes)), dtype=np.float32)

    def classify(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(labels, confidences) of images (B, C, H, W) in [-1, 1]."""
        p = self.probabilities(images)
        return p.argmax(1), p.max(1)

    def accuracy(self, images, labels) -> float:
        return float((self.classify(images)[0] == np.asarray(labels)).mean())

    def save(self, folder: str) -> None:
        from safetensors.torch import save

        os.makedirs(folder, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        atomic_write_bytes(os.path.join(folder, WEIGHTS), save(state))
        atomic_write_json(os.path.join(folder, CARD), {**self.card, "classes": self.classes, "size": self.size,
                                                       "channels": self.channels})

    @classmethod
    def load(cls, folder: str) -> "ImageClassifier":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        fix = "rebuild it with the folder's build command"
        card = read_json(os.path.join(folder, CARD), "classifier card", fix)
        try:
            clf = cls(card["classes"], card["size"], card.get("channels", 1), card)
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(os.path.join(folder, CARD), f"is not a classifier card ({e})", fix) from None
        path = os.path.join(folder, WEIGHTS)
        try:
            clf.net.load_state_dict(load_file(path))
        except (OSError, SafetensorError, RuntimeError) as e:
            raise IntegrityError(path, f"cannot be loaded as the classifier's weights ({type(e).__name__}: {e})",
                                 fix) from None
        clf.net.eval()
        return clf


def folder_classifier(root: str) -> ImageClassifier | None:
    """A model folder's own sample classifier (its classifier/, as the Fashion-MNIST folder has), None
    when it has none; a damaged one raises, naming the file."""
    folder = os.path.join(root, "classifier")
    return ImageClassifier.load(folder) if os.path.isdir(folder) else None
