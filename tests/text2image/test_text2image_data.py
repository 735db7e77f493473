import json

import numpy as np
import pytest
from PIL import Image

from dtrak_core.text2image.data import (
    CaptionedDataset,
    load_captioned_dataset,
    load_captioned_folder,
    load_digit_captions,
)


def test_digit_captions_split_by_class():
    ft = load_digit_captions("train", range(5, 10))
    pre = load_digit_captions("train", range(5))
    assert len(ft) + len(pre) == 1500 and set(ft.labels.tolist()) == {5, 6, 7, 8, 9}
    assert all(c == f"a handwritten digit {d}" for c, d in zip(ft.captions, ft.labels.tolist()))
    sub = ft.subset([0, 2])
    assert sub.captions == (ft.captions[0], ft.captions[2]) and isinstance(sub, CaptionedDataset)
    d = int(ft.labels[2])
    assert sub.describe(1) == {"class": str(d), "caption": f"a handwritten digit {d}"}  # no files: no path
    with pytest.raises(ValueError, match="classes 0..9"):
        load_digit_captions("train", [12])


def test_fingerprint_covers_captions():
    ft = load_digit_captions("validation", [7])
    other = CaptionedDataset(ft.name, ft.images, ft.labels, ("a handwritten digit 1",) + ft.captions[1:])
    assert other.fingerprint != ft.fingerprint
    assert CaptionedDataset(ft.name, ft.images, ft.labels, ft.captions).fingerprint == ft.fingerprint


def _write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((12, 10, 3), 20 * i, dtype=np.uint8)).save(folder / name)


def test_captioned_folder_reads_metadata_jsonl_and_sidecars(tmp_path):
    _write_images(tmp_path / "a", ["x.png", "y.png"])
    (tmp_path / "a" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "x.png", "text": "a red cat"}) + "\n" + json.dumps({"file_name": "y.png", "text": "a dog"}) + "\n")
    ds = load_captioned_folder(str(tmp_path / "a"), resolution=8, channels=3)
    assert ds.images.shape == (2, 3, 8, 8) and ds.captions == ("a red cat", "a dog")
    _write_images(tmp_path / "b", ["p.png"])
    (tmp_path / "b" / "p.txt").write_text("a painting\n")
    assert load_captioned_dataset({"folder": str(tmp_path / "b"), "resolution": 4, "channels": 1}).captions == ("a painting",)


def test_captioned_folder_names_the_image_without_caption(tmp_path):
    _write_images(tmp_path, ["x.png", "y.png"])
    (tmp_path / "x.txt").write_text("a cat")
    with pytest.raises(ValueError, match="y.png"):
        load_captioned_folder(str(tmp_path), 8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png"}\n')
    with pytest.raises(ValueError, match="line 1"):
        load_captioned_folder(str(tmp_path), 8)


def test_captioned_folder_names_classes_files_and_captions(tmp_path):
    """Class sub-folders and files as `load_image_folder` names them, each image's caption beside."""
    _write_images(tmp_path / "cats", ["x.png"])
    _write_images(tmp_path / "dogs", ["y.png", "z.png"])
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": f"a photo of {f[:3]}"}) + "\n"
                                                     for f in ("cats/x.png", "dogs/y.png", "dogs/z.png")))
    ds = load_captioned_folder(str(tmp_path), resolution=4)
    assert ds.classes == ("cats", "dogs") and ds.paths == ("cats/x.png", "dogs/y.png", "dogs/z.png")
    assert ds.describe(2) == {"path": "dogs/z.png", "class": "dogs", "caption": "a photo of dog"}
    assert ds.subset([2]).describe(0) == ds.describe(2)
    # names and paths stay outside the fingerprint; the captions are in it
    assert ds.fingerprint == CaptionedDataset(ds.name, ds.images, ds.labels, ds.captions).fingerprint
