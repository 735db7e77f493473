"""Image files in and out: validated user uploads, and pixel-exact PNGs of model images.

Model images are (C, H, W) tensors in [-1, 1] with ink = +1 (as in scikit-learn's digits).
Uploads are validated strictly: a file we cannot interpret unambiguously is refused with a clear
message rather than guessed at.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch

from .data import image_to_tensor

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 4096 * 4096


def load_user_image(source, resolution: int, channels: int = 1, invert: bool = False) -> torch.Tensor:
    """A path, bytes or PIL image -> (C, H, W) in [-1, 1]. Raises ValueError with a readable reason.

    `invert`: the image has dark ink on light paper (a scan or a drawing); the model's digits have
    light ink on black.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        img = source
    else:
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise ValueError(f"no such file: {source}")
            size = os.path.getsize(source)
            if size == 0:
                raise ValueError("the file is empty")
            if size > MAX_UPLOAD_BYTES:
                raise ValueError(f"the file is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
            with open(source, "rb") as f:
                data = f.read()
        else:
            data = bytes(source)
            if not data:
                raise ValueError("the file is empty")
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            img = Image.open(io.BytesIO(data))
            img.load()
        except Image.DecompressionBombError:
            raise ValueError(f"the image is too large (over {MAX_PIXELS:,} pixels)") from None
        except UnidentifiedImageError:
            raise ValueError("not a readable image file (not PNG, JPEG, GIF, BMP, WebP or TIFF data)") from None
        except (OSError, SyntaxError) as e:  # e.g. a truncated file: PIL's message says what is wrong
            raise ValueError(f"not a readable image file ({e})") from None
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError("the image has no pixels")
    if w * h > MAX_PIXELS:
        raise ValueError(f"the image is too large ({w}x{h}; limit {MAX_PIXELS:,} pixels)")
    if getattr(img, "n_frames", 1) > 1:
        raise ValueError(f"the image is animated ({img.n_frames} frames); upload a single still frame")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F") or img.mode.startswith("I;16"):
        raise ValueError(f"16-bit or floating-point images (mode {img.mode}) are not supported; save it as 8-bit PNG or JPEG")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        raise ValueError("the image has transparency (an alpha channel); flatten it onto a background first")
    x = image_to_tensor(img, resolution, channels)
    return -x if invert else x


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) or (C, H, W) in [-1, 1] -> uint8 (B, H, W) / (B, H, W, 3)."""
    x = images if images.ndim == 4 else images[None]
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def to_pil(image: torch.Tensor, scale: int = 1):
    """One image (C, H, W) -> PIL image, upscaled by `scale` with nearest neighbour (crisp pixels)."""
    from PIL import Image

    img = Image.fromarray(to_uint8(image)[0])
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale > 1 else img


def grid(images: torch.Tensor, columns: int = 16, scale: int = 1, pad: int = 1):
    """Images (B, C, H, W) tiled into one PIL image."""
    from PIL import Image

    arr = to_uint8(images)
    b, h, w = arr.shape[:3]
    rows = -(-b // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad) + arr.shape[3:], 128, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale > 1 else img


def save_png(img, path: str) -> None:
    """Atomically write a PIL image as PNG."""
    tmp = f"{path}.tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
