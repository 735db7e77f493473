"""The noise-level view centred on reference queries: at high noise the noisy input is almost all
noise, the same for every query, so the uncentred split led with one training image whatever the
query; centred, the leaders follow the query."""
import os

import numpy as np
import pytest
import torch
from conftest import ASSETS, torch_threads

from dtrak_core import app_support as sup
from dtrak_core.model.data import load_digits


class Select:
    """Stands in for gr.SelectData."""

    def __init__(self, index):
        self.index = index


def one_per_class(classes):
    """Held-out real digits, one of each class in `classes` (first found)."""
    val = load_digits("validation")
    labels = val.labels.numpy()
    return torch.stack([val.images[int(np.flatnonzero(labels == c)[0])] for c in classes])


def test_centring_on_the_reference_zeroes_its_mean_and_keeps_the_raw_split(app):
    a = app.assets().attributor
    images = one_per_class([0, 3, 7])
    reference = sup.reference_features(a, "square", 10, images=images)
    assert reference.queries == 3 and reference.method == "square"
    plain = [sup.noise_levels(a, x, "square", 10) for x in images]
    levels = [sup.noise_levels(a, x, "square", 10, reference=reference) for x in images]
    for p, c in zip(plain, levels):  # the raw parts (and the score) are the same with or without a reference
        np.testing.assert_array_equal(c.contributions, p.contributions)
        assert c.references == 3 and p.reference is None and p.centred is p.contributions
    centred = np.stack([c.centred for c in levels])  # (Q, B, N)
    scale = np.abs(np.stack([c.contributions for c in levels])).max()
    # over the reference queries themselves the centred parts average to zero (float32 gradients)
    np.testing.assert_allclose(centred.mean(0), 0, atol=1e-5 * scale)
    assert np.abs(centred).max() > 1e-3 * scale  # and each query keeps a part of its own
    with pytest.raises(ValueError, match="reference"):
        sup.noise_levels(a, images[0], "loss", 10, reference=reference)


def test_the_view_is_centred_and_says_why(app):
    _, batch = app.generate_samples("single", 5, 0, 0, 1, 20)
    q = app.select_sample(batch, Select(0))[0]
    fig, cards, text = app.noise_view(q, "square")
    levels = app._noise_cache.get((app.ASSETS, q.key, q.pixels_key, "square",
                                   app.NOISE_BUCKETS), None)
    assert levels.references == sup.REFERENCE_QUERIES
    np.testing.assert_allclose(fig.data[0].z[0], levels.centred[:, int(fig.data[0].customdata[0][0])])
    assert "no longer sum to its score" in text and "the same for every query" in text
    assert f"at high noise ({levels.labels()[-1]}) **#{int(levels.top(len(levels.timesteps) - 1, 1)[0])}**" in text
    # the reference is computed once per folder and store, whatever the query
    assert app.noise_reference("square") is app.noise_reference("d-trak")


def test_top_high_noise_proponent_follows_the_query_on_the_tiny_folder(app):
    a = app.assets().attributor
    images = one_per_class([0, 1, 4, 7])
    reference = app.noise_reference("square")
    levels = [sup.noise_levels(a, x, "square", 10, reference=reference) for x in images]
    raw = {int(np.argmax(lv.contributions[-1])) for lv in levels}
    centred = {int(lv.top(-1, 1)[0]) for lv in levels}
    assert len(centred) > 1 and len(centred) > len(raw)


@pytest.mark.slow
def test_top_high_noise_proponent_follows_the_query_on_the_committed_folder():
    """The committed digits under the default method: uncentred, one training image leads the
    highest-noise range for every query; centred, the leader differs across classes."""
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.methods import default_method

    if not os.path.isdir(os.path.join(ASSETS, "stores")):
        pytest.skip("no committed model folder")
    with torch_threads(1):
        a = Attributor.load(ASSETS)
        method = default_method(a.methods)
        reference = sup.reference_features(a, method)
        levels = [sup.noise_levels(a, x, method, reference=reference) for x in one_per_class([0, 2, 4, 7])]
    raw = {int(np.argmax(lv.contributions[-1])) for lv in levels}
    centred = [int(lv.top(-1, 1)[0]) for lv in levels]
    assert len(raw) == 1 and len(set(centred)) >= 3
