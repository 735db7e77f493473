"""Concurrent requests on one shared model give exactly the results of the same requests alone.

The threads below mix everything a server runs at once on one `Attributor`: the hooks and vmap
gradient engines, Journey-TRAK (whose gradients swap the module's parameters), every baseline and
plain sampling. Each result is compared with the same call made on its own before any thread ran.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import filled_store

from dtrak_core.attribution import methods
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.gradients import GradientFeaturizer
from dtrak_core.model.sampling import generate
from dtrak_core.shared import ModelReplicas, OnceCache

SETTINGS = (FeatureSetting("square", K=4, k=32), FeatureSetting("loss", K=4, k=32))
METHODS = ("square", "loss", "journey-trak", "pixel-dot", "gradient-cosine", "relative-ip", "renorm-ip")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def attributor(tiny_unet, scheduler, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrency")
    train = digits.subset(range(24))
    stores = [filled_store(root / s.slug, tiny_unet, scheduler, train, s) for s in SETTINGS]
    return Attributor(tiny_unet, scheduler, train, stores), str(root)


def test_mixed_concurrent_requests_equal_the_same_requests_alone(attributor):
    att, root = attributor
    jobs = [(m, seed) for seed in (3, 4) for m in METHODS] * 2
    alone = {}
    for m, seed in dict.fromkeys(jobs):
        alone[m, seed] = _request(att, root, m, seed)
    params_before = {n: p.detach().clone() for n, p in att.unet.named_parameters()}
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: _request(att, root, *job), jobs))
    for job, scores in zip(jobs, together):
        np.testing.assert_allclose(scores, alone[job], rtol=1e-5, atol=1e-9, err_msg=str(job))
    # the shared model is untouched: same tensors, still trainable, no hooks left behind
    for n, p in att.unet.named_parameters():
        assert p.requires_grad and torch.equal(p, params_before[n]), n
    assert not any(m._forward_hooks for m in att.unet.modules())


def _request(att, root, method, seed):
    """One visitor's query: the DDIM-50 sample of `seed` (journey-trak checks it is) attributed by `method`."""
    image = generate(att.unet, att.scheduler, [seed], steps=50)
    return methods.scores(att, method, image, [seed] if method == "journey-trak" else None, root=root)


def test_gradients_during_other_forward_passes(tiny_unet, scheduler, digits):
    """The failure a server saw: another thread's forward passes ran through the hooks the gradient
    engine had put on the shared model."""
    images = digits.images[:3]
    featurizer = GradientFeaturizer(tiny_unet, scheduler, "square", K=4, engine="hooks")
    reference = featurizer(images)
    stop = threading.Event()

    def sample_forever():
        while not stop.is_set():
            generate(tiny_unet, scheduler, [0, 1], steps=5)

    threads = [threading.Thread(target=sample_forever) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            torch.testing.assert_close(featurizer(images), reference, rtol=1e-5, atol=1e-8)
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_replicas_are_private_and_reused(tiny_unet):
    pool = ModelReplicas(tiny_unet)
    with pool.borrow() as a, pool.borrow() as b:
        assert a is not b and a is not tiny_unet and b is not tiny_unet
    assert len(pool) == 2
    with pool.borrow() as c:
        assert c in (a, b)


def test_once_cache_builds_each_key_once_under_contention():
    cache, calls, lock = OnceCache(), [], threading.Lock()
    gate = threading.Barrier(8)

    def make(key):
        with lock:
            calls.append(key)
        return key * 2

    def ask(i):
        gate.wait()
        return cache.get(i % 2, lambda: make(i % 2))

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(ask, range(8))) == [0] * 4 + [2] * 4
    assert sorted(calls) == [0, 1]

    def boom():
        raise RuntimeError("no")
    with pytest.raises(RuntimeError):
        cache.get("bad", boom)
    assert cache.get("bad", lambda: 5) == 5  # a failed build is retried, not cached

    lru = OnceCache(max_items=2)
    for key in "abc":
        lru.get(key, lambda: key)
    assert "a" not in lru and len(lru) == 2
