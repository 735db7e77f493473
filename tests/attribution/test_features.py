"""A researcher's own data through the Featurizer and the feature store: sequences, torch Datasets and
DataLoaders give the stacked tensor's features bit for bit, read one batch at a time; wrong items
are named; the optional input-range check; features of several checkpoints for an ensemble."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from dtrak_core.attribution.features import FeatureSetting, Featurizer, featurize_checkpoints, model_image_shape
from dtrak_core.attribution.scoring import EnsembleScorer, TRAKScorer
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.errors import Cancelled, InputImagesError
from dtrak_core.model.unet import build_unet

SETTING = FeatureSetting("square", K=2, k=16)
N = 11  # not a multiple of the batch size (4) nor of the store's slice size (4 or 6)


@pytest.fixture(scope="module")
def images(digits):
    return digits.images[:N].clone()


@pytest.fixture(scope="module")
def featurizer(tiny_unet, scheduler, one_thread):
    return Featurizer(tiny_unet, scheduler, SETTING, batch_size=4)


@pytest.fixture(scope="module")
def stacked(featurizer, images):
    return featurizer(images)


class Items(Dataset):
    """A map-style Dataset returning what `make(i)` builds, recording which items were read."""

    def __init__(self, n, make):
        self.n, self.make, self.read = n, make, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(i)
        return self.make(i)


class Batches(IterableDataset):
    def __init__(self, images, size):
        self.images, self.size = images, size

    def __iter__(self):
        return (self.images[i:i + self.size] for i in range(0, len(self.images), self.size))


def as_uint8_hwc(images):
    """What a folder of PNGs holds: (H, W, C) uint8 0..255."""
    return [((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy() for x in images]


def to_model(array):
    """A transform: (H, W, C) uint8 -> (C, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1


def test_every_form_gives_the_stacked_tensors_features_bit_for_bit(featurizer, images, stacked):
    labels = torch.arange(N)
    forms = {
        "list of tensors": list(images),
        "tuple of arrays": tuple(x.numpy() for x in images),
        "(image, label) tuples": [(x, i) for i, x in enumerate(images)],
        "dicts with 'image'": [{"image": x, "label": i} for i, x in enumerate(images)],
        "dicts with 'pixel_values'": [{"pixel_values": x} for x in images],
        "TensorDataset": TensorDataset(images, labels),
        "map-style Dataset": Items(N, lambda i: (images[i], int(labels[i]))),
        "DataLoader of (images, labels)": DataLoader(TensorDataset(images, labels), batch_size=3),
        "DataLoader of dicts": DataLoader(Items(N, lambda i: {"image": images[i], "label": i}), batch_size=5),
        "IterableDataset of batches": Batches(images, 7),
        "generator of batches": (images[i:i + 2] for i in range(0, N, 2)),
        "4-d array": images.numpy(),
    }
    for name, form in forms.items():
        assert torch.equal(featurizer(form), stacked), name
    # a per-item transform: the images as uint8 files hold them, converted by the caller's transform
    raw = as_uint8_hwc(images)
    converted = torch.stack([to_model(a) for a in raw])
    expected = featurizer(converted)
    assert torch.equal(featurizer(raw, transform=to_model), expected)
    assert torch.equal(featurizer(Items(N, lambda i: (raw[i], 0)), transform=to_model), expected)
    assert torch.equal(featurizer(DataLoader(Items(N, lambda i: (torch.from_numpy(raw[i]), 0)), batch_size=3),
                                  transform=lambda t: to_model(t.numpy())), expected)
    assert featurizer([]).shape == (0, SETTING.k)


def test_a_dataset_is_read_one_batch_at_a_time(featurizer, images, stacked, monkeypatch):
    dataset = Items(N, lambda i: images[i])
    read_before_each_pass = []
    gradients = featurizer.gradients
    monkeypatch.setattr(featurizer, "gradients", lambda batch: (read_before_each_pass.append(len(dataset.read)),
                                                                gradients(batch))[1])
    assert torch.equal(featurizer(dataset), stacked)
    assert read_before_each_pass == [4, 8, 11] and dataset.read == list(range(N))


def test_wrong_items_are_named_with_what_was_expected(featurizer, images, monkeypatch):
    def with_item(i, value):
        items = list(images)
        items[i] = value
        return items

    cases = [
        (with_item(5, torch.zeros(3, 8, 8)), r"item 5 has shape \(3, 8, 8\), expected \(1, 8, 8\)"),
        (with_item(6, torch.zeros(1, 4, 4)), r"item 6 has shape \(1, 4, 4\), expected \(1, 8, 8\)"),
        (with_item(2, torch.zeros(8, 8)), r"item 2 has shape \(8, 8\), expected an image \(C, H, W\)"),
        (with_item(3, "seven.png"), r"item 3 is a str, expected a \(C, H, W\) tensor or array; pass transform="),
        (with_item(9, {"img": images[0]}), r"item 9 is a dict without an 'image' or 'pixel_values' key \(its keys: 'img'\)"),
        (with_item(1, ()), r"item 1 is an empty tuple"),
        ([x.numpy().astype(object) for x in images], r"item 0 is an array of object"),
        (DataLoader(list(images), batch_size=None), r"batch 0 \(from item 0\) has shape \(1, 8, 8\), expected a batch "
                                                    r"\(b, C, H, W\).*pass single images as a list or a Dataset"),
        (iter([images[:4], images[4:6, :, :, :4]]), r"item 4 has shape \(1, 8, 4\), expected \(1, 8, 8\)"),
        (42, r"images must be a \(N, C, H, W\) tensor, a sequence or torch Dataset .* got a int"),
        ("my-images/", r"got a str \(a folder of image files: `model.data.load_image_folder"),
        (DataLoader(TensorDataset(images), batch_size=4, shuffle=True), r"shuffles.*pass shuffle=False"),
        (images[0], r"expected images \(B, C, H, W\), got \(1, 8, 8\)"),
    ]
    for form, message in cases:
        with pytest.raises(InputImagesError, match=message):
            featurizer(form)
    with pytest.raises(InputImagesError, match=r"item 4 is a Image.*the transform must return one"):
        featurizer(Items(N, lambda i: i), transform=lambda i: images[i] if i != 4 else Image())
    # a model without a known input shape: every image must have the first one's
    assert model_image_shape(torch.nn.Conv2d(1, 1, 3)) is None
    with monkeypatch.context() as m:
        m.setattr(featurizer, "image_shape", None)
        with pytest.raises(InputImagesError, match=r"item 7 has shape \(1, 8, 6\), but item 0 has \(1, 8, 8\)"):
            featurizer(with_item(7, torch.zeros(1, 8, 6)))


class Image:
    """Not a tensor (what a transform that forgot to convert returns)."""


def test_the_featurizer_checks_an_input_range_when_given(tiny_unet, scheduler, images, stacked, one_thread):
    checked = Featurizer(tiny_unet, scheduler, SETTING, batch_size=4, input_range=(-1, 1))
    assert torch.equal(checked(list(images)), stacked)  # in range: the same features
    pixels = list(images)
    pixels[6] = (pixels[6] + 1) * 127.5  # one image a caller forgot to scale
    with pytest.raises(ValueError, match=r"images must lie in \[-1, 1\], this Featurizer's input_range, got values "
                                         r"in \[-1, 255\] \(item 6 is the first outside it\); scale them .*"
                                         r"from 0..255: x / 127.5 - 1"):
        checked(pixels)
    zero_one = Featurizer(tiny_unet, scheduler, SETTING, batch_size=4, input_range=(0, 1))
    shifted = (images + 1) / 2
    assert torch.equal(zero_one(shifted), Featurizer(tiny_unet, scheduler, SETTING, batch_size=4)(shifted))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*item 0 is the first.*from \[-1, 1\]: \(x \+ 1\) / 2"):
        zero_one(images)
    nan = images.clone()
    nan[9, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) \(item 9 is the first outside it\)"):
        zero_one(DataLoader(TensorDataset((nan + 1) / 2), batch_size=5))
    with pytest.raises(ValueError, match="low < high"):
        Featurizer(tiny_unet, scheduler, SETTING, input_range=(1, -1))


def store_at(path, slice_size=4):
    identity = FeatureStore.identity(SETTING, checkpoint="tiny", dataset="eleven-digits")
    return FeatureStore.create(str(path), identity, n=N, k=SETTING.k, slice_size=slice_size)


def test_a_store_fills_from_a_dataset_and_resumes_from_a_dataloader(featurizer, images, stacked, tmp_path):
    one_shot = store_at(tmp_path / "tensor").fill(featurizer, images, show_bar=False)
    np.testing.assert_array_equal(one_shot.features(), stacked.numpy())

    dataset = Items(N, lambda i: {"image": images[i], "label": i})
    with pytest.raises(Cancelled):  # killed after the first slice
        store_at(tmp_path / "resumed").fill(featurizer, dataset, show_bar=False,
                                            should_stop=iter([False, True]).__next__)
    assert sorted(set(dataset.read)) == [0, 1, 2, 3]  # only the first slice's items were read
    reopened = store_at(tmp_path / "resumed")
    assert reopened.done.sum() == 4 and not reopened.complete
    calls = []
    featurize = lambda rows: (calls.append(len(rows)), featurizer(rows))[1]  # noqa: E731
    reopened.fill(featurize, DataLoader(TensorDataset(images, torch.arange(N)), batch_size=3), show_bar=False)
    assert calls == [4, 3]  # the done slice was read past, not featurized again
    assert FeatureStore.open(reopened.path).features().tobytes() == one_shot.features().tobytes()
    assert reopened.metadata["features_sha256"] == one_shot.metadata["features_sha256"]

    # a transform, and a slice size that is not a multiple of the featurizer's batch size
    raw = as_uint8_hwc(images)
    converted = torch.stack([to_model(a) for a in raw])
    with_transform = store_at(tmp_path / "transform", slice_size=6).fill(
        featurizer, Items(N, lambda i: (raw[i], i)), show_bar=False, transform=to_model)
    direct = store_at(tmp_path / "direct", slice_size=6).fill(featurizer, converted, show_bar=False)
    assert with_transform.features().tobytes() == direct.features().tobytes()


def test_a_store_refuses_images_of_another_count(featurizer, images, tmp_path):
    with pytest.raises(ValueError, match="store expects 11 inputs, got 10"):
        store_at(tmp_path / "a").fill(featurizer, TensorDataset(images[:10]), show_bar=False)
    with pytest.raises(ValueError, match="store expects 11 inputs, got 10"):  # a DataLoader's dataset is counted first
        store_at(tmp_path / "b").fill(featurizer, DataLoader(TensorDataset(images[:10]), batch_size=4), show_bar=False)
    with pytest.raises(InputImagesError, match="the images hold 10 images, the store was made for 11"):
        store_at(tmp_path / "c").fill(featurizer, Batches(images[:10], 4), show_bar=False)
    with pytest.raises(InputImagesError, match="more than the 11"):
        store_at(tmp_path / "d").fill(featurizer, Batches(torch.cat([images, images[:2]]), 4), show_bar=False)


def test_features_of_several_checkpoints_for_an_ensemble(scheduler, images, tmp_path, one_thread):
    unets = [build_unet(block_out_channels=(4, 8), seed=s).eval() for s in (1, 2)]
    folders = []
    for i, unet in enumerate(unets):
        unet.save_pretrained(tmp_path / f"ckpt{i}")
        folders.append(str(tmp_path / f"ckpt{i}"))
    direct = [Featurizer(unet, scheduler, SETTING, batch_size=4)(images) for unet in unets]
    loaded = featurize_checkpoints(folders, scheduler, SETTING, TensorDataset(images), batch_size=4)
    assert len(loaded) == 2 and all(torch.equal(a, b) for a, b in zip(loaded, direct))
    assert torch.equal(featurize_checkpoints(unets[:1], scheduler, SETTING, list(images), batch_size=4)[0], direct[0])
    with pytest.raises(InputImagesError, match="one-shot iterator"):
        featurize_checkpoints(unets, scheduler, SETTING, (x for x in [images]))
    with pytest.raises(ValueError, match="not a saved UNet"):
        featurize_checkpoints([str(tmp_path)], scheduler, SETTING, images)

    # train on 8 images, score 3 queries: the ensemble's scores are the mean of each checkpoint's TRAKScorer
    train = [f[:8] for f in loaded]
    queries = [f[8:] for f in loaded]
    ensemble = EnsembleScorer(lam=0.5).fit(train)
    each = [TRAKScorer(lam=0.5).fit(t).scores(q) for t, q in zip(train, queries)]
    np.testing.assert_allclose(ensemble.scores(queries), (each[0] + each[1]) / 2, rtol=1e-12, atol=0)
