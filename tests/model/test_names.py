"""What names a training image to a reader: class names, file paths and captions ride on the
`Dataset` outside its fingerprint, and every result row carries those known."""
import numpy as np
import pytest
import torch
from PIL import Image

from dtrak_core.attribution.base import Attribution
from dtrak_core.model.data import Dataset, fingerprint, load_dataset, load_digits, load_image_folder


@pytest.fixture
def folder(tmp_path):
    """Five 6x6 images: three in "circles", two in "squares/big" (a nested class folder)."""
    rng = np.random.default_rng(0)
    for rel in ("circles/a.png", "circles/b.png", "circles/c.png", "squares/big/d.png", "squares/big/e.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(tmp_path / rel)
    return tmp_path


def test_an_image_folder_names_its_classes_and_files(folder):
    ds = load_image_folder(str(folder), resolution=4)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.classes == ("circles", "squares/big")
    assert ds.paths == ("circles/a.png", "circles/b.png", "circles/c.png", "squares/big/d.png", "squares/big/e.png")
    assert ds.describe(3) == {"path": "squares/big/d.png", "class": "squares/big"}
    # the names stay outside the fingerprint: stores and manifests built before them stay valid
    assert ds.fingerprint == fingerprint(ds.images, ds.labels)
    assert ds.fingerprint == Dataset(ds.name, ds.images, ds.labels).fingerprint
    sub = ds.subset([4, 0])
    assert sub.paths == ("squares/big/e.png", "circles/a.png") and sub.classes == ds.classes
    assert sub.describe(0) == {"path": "squares/big/e.png", "class": "squares/big"}
    # a flat folder: files, no classes
    flat = load_dataset({"folder": str(folder / "circles"), "resolution": 4})
    assert flat.classes is None and flat.describe(1) == {"path": "b.png"}


def test_the_digits_are_named_by_their_digit():
    train = load_digits("train")
    assert train.classes == tuple("0123456789") and train.paths is None
    assert train.describe(0) == {"class": str(int(train.labels[0]))}
    with pytest.raises(ValueError, match="one per image"):
        Dataset("x", train.images[:2], train.labels[:2], paths=("a.png",))


def test_result_rows_carry_path_class_and_score(folder):
    ds = load_image_folder(str(folder), resolution=4)
    result = Attribution("square", np.array([0.5, -2.0, 0.1, 3.0, -0.2]), ds.labels.numpy(), ds)
    table = result.table(1)
    assert table["proponents"] == [{"index": 3, "label": 1, "path": "squares/big/d.png", "class": "squares/big",
                                    "score": 3.0}]
    assert table["opponents"] == [{"index": 1, "label": 0, "path": "circles/b.png", "class": "circles", "score": -2.0}]
    # without the training set: index, label and score, as before
    assert Attribution("square", result.scores, result.labels).table(1)["proponents"] == [
        {"index": 3, "label": 1, "score": 3.0}]
    unlabelled = Dataset("x", ds.images, torch.full((5,), -1), paths=ds.paths)
    assert Attribution("square", result.scores, unlabelled.labels.numpy(), unlabelled).describe(0) == {
        "path": "circles/a.png"}
