import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dtrak_core.images import grid, load_user_image, to_pil


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_good_images_are_converted():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    x = load_user_image(png_bytes(img), 8)
    assert x.shape == (1, 8, 8) and torch.all(x == 1)
    assert torch.all(load_user_image(img, 8, invert=True) == -1)


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"hello, not an image", "not a readable image file (not PNG"),
    (png_bytes(Image.new("RGBA", (8, 8))), "transparency"),
    (png_bytes(Image.new("I;16", (8, 8))), "16-bit"),
])
def test_bad_images_give_clear_messages(data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        load_user_image(data, 8)
    assert "BytesIO" not in str(err.value)


def test_truncated_and_animated_and_missing(tmp_path):
    data = png_bytes(Image.new("L", (64, 64), 30))
    with pytest.raises(ValueError, match="not a readable image"):
        load_user_image(data[: len(data) // 2], 8)
    frames = [Image.new("L", (8, 8), c) for c in (0, 255)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ValueError, match="animated"):
        load_user_image(buf.getvalue(), 8)
    with pytest.raises(ValueError, match="no such file"):
        load_user_image(str(tmp_path / "missing.png"), 8)


def test_pixel_exact_upscaling():
    x = torch.tensor([[[-1.0, 1.0], [1.0, -1.0]]])
    img = to_pil(x, scale=4)
    assert img.size == (8, 8) and img.getpixel((0, 0)) == 0 and img.getpixel((4, 0)) == 255
    assert grid(torch.stack([x, x]), columns=2, pad=1).size == (7, 4)


# A PostScript program that never ends, in an EPS wrapper: decoding it means running Ghostscript.
ENDLESS_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n{ } loop\n"


def _child_pids():
    import glob
    pids = set()
    for f in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(f) as fh:
            pids |= set(fh.read().split())
    return pids


def test_eps_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    import subprocess

    from PIL import EpsImagePlugin

    started = []

    def no_subprocess(*args, **kwargs):
        started.append(args)
        raise AssertionError(f"an upload started a process: {args}")

    # pretend Ghostscript is installed, so that decoding the EPS would really start it
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    before = _child_pids()
    path = tmp_path / "digit.png"  # the wrong extension is part of the trick
    path.write_bytes(ENDLESS_EPS)
    for source in (ENDLESS_EPS, str(path)):
        with pytest.raises(ValueError, match=r"not a readable image file \(not PNG, JPEG, GIF, BMP, WebP or TIFF "
                                             r"data; this looks like PostScript / EPS data\)"):
            load_user_image(source, 8)
    # a PIL image someone opened as EPS is refused before it is decoded
    with pytest.raises(ValueError, match="EPS images are not supported"):
        load_user_image(Image.open(io.BytesIO(ENDLESS_EPS)), 8)
    assert started == [] and _child_pids() <= before


def _digit():
    """A 24x32 asymmetric 'digit' (a 7 with a foot) in 4-pixel blocks, dark on white."""
    a = np.full((32, 24), 255, np.uint8)
    a[4:8, 4:20] = 0  # top bar
    a[8:28, 16:20] = 0  # stem on the right
    a[24:28, 4:12] = 0  # foot on the left
    return a


@pytest.mark.parametrize("orientation,stored", [
    (3, lambda a: np.rot90(a, 2)),  # upside down
    (6, lambda a: np.rot90(a, 1)),  # shown after a quarter turn clockwise (a phone held upright)
    (8, lambda a: np.rot90(a, -1)),  # shown after a quarter turn anticlockwise
])
def test_exif_orientation_is_applied(orientation, stored):
    upright = _digit()
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored(upright))).save(buf, format="PNG", exif=exif)
    expected = load_user_image(Image.fromarray(upright), 8)
    assert torch.equal(load_user_image(buf.getvalue(), 8), expected)
    ignored = load_user_image(Image.fromarray(np.ascontiguousarray(stored(upright))), 8)
    assert not torch.equal(ignored, expected)  # the test would see a missing rotation


def test_exif_orientation_of_a_jpeg_photo():
    upright = _digit()
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))).save(buf, format="JPEG", quality=95, exif=exif)
    x = load_user_image(buf.getvalue(), 8, invert=True)
    expected = load_user_image(Image.fromarray(upright), 8, invert=True)
    assert (x - expected).abs().max() < 0.2
    wrong = load_user_image(Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1))), 8, invert=True)
    assert (wrong - expected).abs().max() > 1


@pytest.mark.parametrize("size,message", [
    ((1, 4000), "too elongated"), ((4000, 1), "too elongated"), ((10, 41), "too elongated"),
    ((3, 3), "too small"), ((3, 12), "too small"), ((1, 1), "too small"),
])
def test_extreme_shapes_are_refused(size, message):
    with pytest.raises(ValueError, match=message):
        load_user_image(png_bytes(Image.new("L", size, 200)), 8)


@pytest.mark.parametrize("size", [(4, 4), (4, 16), (16, 4), (10, 40), (4096, 1024)])
def test_shapes_within_bounds_are_accepted(size):
    x = load_user_image(png_bytes(Image.new("L", size, 255)), 8)
    assert x.shape == (1, 8, 8) and torch.all(x == 1)
