import io

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
