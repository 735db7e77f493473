"""Sharing one model and its derived state between concurrent requests (threads of one server).

The rule that makes it safe: a module that several threads can reach is only ever *read* (a plain
forward under `torch.no_grad`). Every computation that changes a module while it runs (forward
hooks for per-sample gradients, `torch.func.functional_call`, which swaps the module's parameters
for the duration of a call) borrows a private replica from `ModelReplicas` instead, so nothing it
does is visible to another thread. Lazily built values (scorers, featurizers, cached results) go
through `OnceCache`, which builds each key once even when many threads ask at the same time.
"""
from __future__ import annotations

import copy
import hashlib
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator

import torch


class ModelReplicas:
    """Private copies of one module, handed to one computation at a time.

    `borrow()` yields a replica no other thread holds: an idle one, or a fresh deep copy of the
    source (so at most one copy per concurrent computation exists). The source itself is never
    handed out, so it stays safe to run read-only from any thread.
    """

    def __init__(self, module: torch.nn.Module):
        self.source = module
        self._idle: list[torch.nn.Module] = []
        self._lock = threading.Lock()

    @contextmanager
    def borrow(self) -> Iterator[torch.nn.Module]:
        with self._lock:
            replica = self._idle.pop() if self._idle else None
        if replica is None:
            replica = copy.deepcopy(self.source).eval()  # reads the source only
        try:
            yield replica
        finally:
            with self._lock:
                self._idle.append(replica)

    def __len__(self) -> int:
        """Idle replicas (for tests)."""
        return len(self._idle)


QUERY_FEATURES_KEPT = 64  # recent queries' features kept per attributor (several methods share one store's)


def image_digest(images: torch.Tensor) -> tuple:
    """A key for a batch of images: its shape and the digest of its float32 values."""
    x = images.detach().to("cpu", torch.float32).contiguous()
    return tuple(x.shape), hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest()



class OnceCache:
    """key -> value, built once per key by `get(key, make)`, safe under concurrent callers.

    Callers asking for a key under construction wait for it instead of building it twice (a scorer
    fit or a model load costs seconds); different keys build in parallel. A failed build is not
    cached, so the next caller retries. `max_items` bounds it, least recently used first out.
    """

    def __init__(self, max_items: int | None = None):
        self.max_items = max_items
        self._values: OrderedDict = OrderedDict()
        self._building: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], object]):
        while True:
            with self._lock:
                if key in self._values:
                    self._values.move_to_end(key)
                    return self._values[key]
                building = self._building.get(key)
                if building is None:
                    building = self._building[key] = threading.Lock()
                    building.acquire()
                    break
            with building:  # another thread is building this key: wait for it, then look again
                pass
        try:
            value = make()
            with self._lock:
                self._values[key] = value
                if self.max_items is not None:
                    while len(self._values) > self.max_items:
                        self._values.popitem(last=False)
            return value
        finally:
            with self._lock:
                del self._building[key]
            building.release()

    def peek(self, key: Hashable, default=None):
        """The value for `key` if built, else `default` (never builds)."""
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            return default

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            if self.max_items is not None:
                while len(self._values) > self.max_items:
                    self._values.popitem(last=False)

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._values

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)
