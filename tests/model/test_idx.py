"""The IDX reader on tiny files made here: round trip, gzip, and every damage named by its file."""
import gzip
import struct

import numpy as np
import pytest

from dtrak_core.model.idx import IDXError, read_idx, read_images_and_labels


def write_idx(path, array, compress=True, type_code=0x08):
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)
    return path


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    return images, labels, write_idx(tmp_path / "img.gz", images), write_idx(tmp_path / "lab.gz", labels)


def test_round_trip_gzip_and_plain(pair, tmp_path):
    images, labels, img, lab = pair
    got_images, got_labels = read_images_and_labels(str(img), str(lab))
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert got_labels.dtype == np.int64
    assert np.array_equal(read_idx(str(write_idx(tmp_path / "plain", images, compress=False))), images)


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw[:-5], "truncated or padded"),
    (lambda raw: raw + b"\0", "truncated or padded"),
    (lambda raw: b"\1" + raw[1:], "magic number"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "type 0x0d"),
    (lambda raw: raw[:6], "truncated header"),
])
def test_damaged_files_are_named(tmp_path, pair, damage, words):
    images = pair[0]
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", *images.shape) + images.tobytes()
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(damage(raw)))
    with pytest.raises(IDXError, match=words) as e:
        read_idx(str(path))
    assert str(path) in str(e.value) and "reinstall" in str(e.value)


def test_broken_gzip_and_missing_file_and_disagreeing_counts(tmp_path, pair):
    images, labels, img, lab = pair
    broken = tmp_path / "broken.gz"
    broken.write_bytes(img.read_bytes()[:40])
    with pytest.raises(IDXError, match="damaged gzip") as e:
        read_idx(str(broken))
    assert str(broken) in str(e.value)
    with pytest.raises(IDXError, match="no such file"):
        read_idx(str(tmp_path / "absent.gz"))
    with pytest.raises(IDXError, match="3 dimensions, expected 1"):
        read_images_and_labels(str(img), str(img))
    short = write_idx(tmp_path / "short.gz", labels[:3])
    with pytest.raises(IDXError, match="3 labels for the 7 images") as e:
        read_images_and_labels(str(img), str(short))
    assert str(short) in str(e.value)
