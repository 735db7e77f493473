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

from dtrak_core.errors import UploadError
from dtrak_core.model.data import INPUT_RANGE, from_input_range, image_to_tensor

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 4096 * 4096
MIN_SIDE = 4  # pixels; smaller images carry too little to attribute
MAX_ASPECT = 4.0  # longer side / shorter side; the centre square must keep at least 1/4 of the image

# Pillow plugins an upload may be decoded by, and nothing else: Pillow would otherwise try every
# plugin it has, some of which run external programs (EPS and PS start Ghostscript) or parse rarely
# used formats. JPEG files with a multi-picture extension open as MPO.
UPLOAD_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
_DECODED_AS = set(UPLOAD_FORMATS) | {"MPO"}
_FORMATS_TEXT = "PNG, JPEG, GIF, BMP, WebP or TIFF"
# colour modes that convert to grayscale / RGB without guessing; 16-bit and float modes do not
# (Pillow clips them to 8 bits instead of rescaling)
_MODES = {"1", "L", "P", "RGB", "CMYK", "YCbCr", "RGBX", "LA", "PA", "RGBA", "RGBa"}
# what a refused file most likely is, for the error message
_SIGNATURES = ((b"%!PS", "PostScript / EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
               (b"8BPS", "Photoshop (PSD)"), (b"\x00\x00\x01\x00", "ICO icon"), (b"<svg", "SVG"),
               (b"<?xml", "XML / SVG"), (b"<!doctype html", "HTML"), (b"<html", "HTML"),
               (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"qoif", "QOI"))
_ALLOWED_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
                       (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def _allowed_kind(data: bytes | None) -> str | None:
    """The allowed format `data` starts like, if any."""
    if data is None:
        return None
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _ALLOWED_SIGNATURES if data.startswith(magic)), None)


def _unidentified(data: bytes) -> str:
    """Why no allowed plugin opened `data`: a damaged file of an allowed format, or another kind of file."""
    allowed = _allowed_kind(data)
    if allowed:
        return f"not a readable image file (a damaged or truncated {allowed} file)"
    head = data[:64].lstrip().lower()
    kind = next((name for magic, name in _SIGNATURES if head.startswith(magic.lower())), None)
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        kind = "AVIF / HEIC"
    return f"not a readable image file (not {_FORMATS_TEXT} data{f'; this looks like {kind} data' if kind else ''})"


def _read_upload(source) -> bytes:
    """The bytes of a path or bytes-like upload, size-checked before anything is decoded."""
    if isinstance(source, (str, os.PathLike)):
        try:
            path = os.fspath(source)
        except TypeError:
            raise UploadError(f"not a usable file name: {source!r}") from None
        if os.path.isdir(path):
            raise UploadError(f"{path} is a folder, not an image file")
        if not os.path.exists(path):
            raise UploadError(f"no such file: {path}")
        if not os.path.isfile(path):  # a device or pipe: reading it could block forever
            raise UploadError(f"{path} is not a regular file")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_UPLOAD_BYTES + 1)  # never more than the limit, whatever the size said
        except OSError as e:
            raise UploadError(f"cannot read {path} ({e.strerror or e})") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise UploadError(f"expected an image file (a path, bytes or a PIL image), got {type(source).__name__}")
    if not data:
        raise UploadError("the file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"the file is over {MAX_UPLOAD_BYTES // 2**20} MB, the upload limit")
    return data


def _check_geometry(img) -> None:
    """Size limits on the declared size, before any pixel is decoded."""
    w, h = img.size
    if w == 0 or h == 0:
        raise UploadError(f"the image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise UploadError(f"the image is too large ({w}x{h}; the limit is {MAX_PIXELS:,} pixels)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise UploadError(f"the image is {w}x{h}, too elongated: the longer side may be at most {MAX_ASPECT:g} "
                          f"times the shorter one (the model sees the centre square); crop it first")
    if min(w, h) < MIN_SIDE:
        raise UploadError(f"the image is too small ({w}x{h}); each side needs at least {MIN_SIDE} pixels")


def _check_mode(img) -> None:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        raise UploadError(f"16-bit or floating-point images (mode {img.mode}) are not supported; "
                          f"save it as 8-bit PNG or JPEG")
    if img.mode not in _MODES:
        raise UploadError(f"images in colour mode {img.mode} are not supported; "
                          f"save it as RGB or grayscale PNG or JPEG")


def _drop_opaque_alpha(img):
    """An image with an alpha channel or a transparent colour -> the same image without it, when every
    pixel is fully opaque; transparent pixels have no colour the model could see, so they are refused."""
    has_alpha = img.mode in ("LA", "PA", "RGBA", "RGBa") or "transparency" in img.info or (
        img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
    if not has_alpha:
        return img
    rgba = img.convert("RGBA")
    if rgba.getchannel("A").getextrema()[0] < 255:
        raise UploadError("the image has transparency (an alpha channel); flatten it onto a background first")
    return rgba.convert("L") if img.mode == "LA" else rgba.convert("RGB")


# ---------------------------------------------------------------- digit normalisation
# scikit-learn's digits (UCI optdigits) were made from NIST's 32x32 binary bitmaps, counted in 4x4 blocks
# to 8x8: ink is bright, strokes a few bitmap pixels thick. What the training digits show of that form:
# every digit fills the height (all 8 rows); every class but the 1 is about 20 of the 32 pixels wide
# whatever its shape (every 0 spans exactly columns 1-6; the median ink width is 18.5-21 pixels for each
# class), so the bounding box was stretched to 20x32 rather than scaled with its aspect; the 1s were not
# stretched (2 to 7 columns wide, by their flags and feet); and every class carries the same ink, 19-20.6
# full pixels of the 64. An upload (a drawing, a scan, a photo) is mapped to that form.
_WORK_SIDE = 256  # longest side the normaliser works at (larger images are area-averaged down first)
_MIN_CONTRAST = 24  # of 255: ink must differ this much from the paper, else the image is blank
_INK_MASS = 19.5  # ink of a training digit, in full 8x8 pixels (19.0-20.6 for every class)
_BOX_WIDTH = 0.625  # of the height: the 20x32 box every digit but a 1 is stretched to
_NARROW = 0.4  # of the height: a digit narrower than this (a 1 drawn as a stroke) keeps its own width
_PEN_STEPS = 6  # most pixels the strokes are thickened or thinned by, at 32x32


def light_paper_image(img) -> bool:
    """True when a PIL image's border is mostly lighter than its contrast midpoint: dark ink on light
    paper, the opposite of the training digits."""
    g = np.asarray(img.convert("L"), dtype=np.uint8)
    ring = np.concatenate([g[0], g[-1], g[1:-1, 0], g[1:-1, -1]])
    lo, hi = np.percentile(g, [1, 99])
    return float(np.median(ring)) > (float(lo) + float(hi)) / 2


def normalise_digit(img, resolution: int = 8, dark_ink: bool | None = None):
    """A drawing or photo of a digit (PIL image) -> a `resolution` x `resolution` grayscale PIL image in
    the training digits' form: light ink on black, contrast stretched, cropped to the ink's bounding
    box, which is stretched to the training digits' 20x32 box (a digit narrower than `_NARROW` of its
    height, a 1, keeps its width) and fills the height, centred on its centre of mass, binarised at
    32x32, its strokes brought to the training digits' weight, and counted in 4x4 blocks like the
    original bitmaps.

    `dark_ink`: the image is dark ink on light paper; None: read it from the border. An image without
    visible ink gives a black image."""
    from PIL import Image, ImageFilter

    g = img.convert("L")
    if max(g.size) > _WORK_SIDE:  # speed, and the noise of a photo averages out
        f = _WORK_SIDE / max(g.size)
        g = g.resize((max(1, round(g.width * f)), max(1, round(g.height * f))), Image.Resampling.BOX)
    g = g.filter(ImageFilter.MedianFilter(3))  # specks of noise and JPEG ringing
    if dark_ink is None:
        dark_ink = light_paper_image(g)
    m = np.asarray(g, dtype=np.uint8)
    m = (255 - m) if dark_ink else m  # ink bright
    m = m.astype(np.float64)
    paper, ink = float(np.median(m)), float(np.percentile(m, 99.5))
    stage = 4 * resolution  # the original bitmaps' size
    blank = Image.new("L", (resolution, resolution), 0)
    if ink - paper < _MIN_CONTRAST:
        return blank
    s = np.clip((m - paper) / (ink - paper), 0.0, 1.0)  # paper 0, ink 1
    mask = s > 0.5
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    s = s[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = s.shape
    if w >= _NARROW * h:  # stretched to the training digits' 20x32 box, as NIST's bitmaps were
        s = np.asarray(Image.fromarray(s).resize((max(1, round(_BOX_WIDTH * h)), h), Image.Resampling.BOX))
        w = s.shape[1]
    side = max(h, w)
    square = np.zeros((side, side))
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = s
    bitmap = Image.fromarray(np.round(square * 255).astype(np.uint8)).resize((stage, stage), Image.Resampling.BOX)
    b = np.asarray(bitmap) > 96  # a binary bitmap, as NIST's
    if not b.any():
        return blank
    # centred left-right on the ink's centre of mass (a 1's flag does not push its stem off centre),
    # as far as the frame allows
    cols = np.flatnonzero(b.any(0))
    shift = round((stage - 1) / 2 - float(np.average(np.arange(stage), weights=b.sum(0))))
    shift = int(np.clip(shift, -cols[0], stage - 1 - cols[-1]))
    b = np.roll(b, shift, axis=1)
    # strokes to the training digits' weight: the pen thickened or thinned a pixel at a time until the
    # digit carries the training digits' ink (the same for every class)
    candidates = [b]
    for erode in (False, True):
        c = b
        for step in range(_PEN_STEPS):
            c = _pen_step(c, step, erode)
            if not c.any():
                break
            candidates.append(c)
    target = _INK_MASS * (resolution / 8) ** 2
    counts = [c.reshape(resolution, 4, resolution, 4).sum((1, 3)) for c in candidates]  # 0..16 a block
    best = min(counts, key=lambda n: abs(n.sum() / 16 - target))
    return Image.fromarray(np.round(best * (255 / 16)).astype(np.uint8))


def _pen_step(b: np.ndarray, step: int, erode: bool) -> np.ndarray:
    """A binary bitmap dilated (or eroded) by a 2x2 square, anchored at its top left on even steps and
    its bottom right on odd ones: every step moves each stroke's edge out (in) by one pixel on one side,
    two steps make the 3x3 square. Outside the frame counts as the nearest pixel, so strokes touching
    the frame stay there."""
    n0, n1 = b.shape
    p = np.pad(b, 1, mode="edge")
    d = 1 if step % 2 == 0 else -1
    shifted = [p[1 + dy:1 + dy + n0, 1 + dx:1 + dx + n1] for dy in (0, d) for dx in (0, d)]
    return np.logical_and.reduce(shifted) if erode else np.logical_or.reduce(shifted)


def load_user_image(source, resolution: int, channels: int = 1, invert: bool = False,
                    normalise: bool = False) -> torch.Tensor:
    """A path, bytes or PIL image -> (C, H, W) float32 in [-1, 1]; UploadError (a ValueError) with a
    readable reason for anything else.

    Only PNG, JPEG, GIF, BMP, WebP and TIFF data are decoded, whatever the file name says; anything else
    (EPS, PDF, SVG, ICO, PSD, ...) is refused without being parsed. Files over MAX_UPLOAD_BYTES and images
    over MAX_PIXELS are refused before decoding, as are images with a side under MIN_SIDE pixels or a
    longer side over MAX_ASPECT times the shorter (the model sees the centre square, resized to
    `resolution`). Refused too: animated or multi-page files, 16-bit grayscale and floating-point images,
    any transparent pixel. Accepted and converted: 1-bit, palette, CMYK and 48-bit RGB images, and alpha
    channels that are fully opaque. The EXIF orientation tag is applied (a photo reads as it displays).

    `invert`: the image has dark ink on light paper (a scan or a drawing); the model's digits have
    light ink on black.

    `normalise` (1-channel digit models): the image is mapped to the training digits' form by
    `normalise_digit` (cropped to the ink, centred, scaled, contrast and strokes normalised). The ink is
    found whichever way round it is, and the result keeps the file's tone (a light-paper drawing comes
    out as light paper), so `invert` is still a plain negation of the result.
    """
    from PIL import Image, ImageOps

    if isinstance(source, Image.Image):
        img, data = source, None
        if img.format is not None and img.format not in _DECODED_AS:  # opened elsewhere but not decoded yet
            raise UploadError(f"{img.format} images are not supported; upload {_FORMATS_TEXT}")
    else:
        data = _read_upload(source)
        img = None
    # Pillow's parsers meet hostile bytes here; whatever they raise (OSError, SyntaxError, struct.error,
    # IndexError, a too-large warning turned error, ...) means the file cannot be used.
    try:
        if data is not None:
            try:
                img = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            except Image.DecompressionBombError:
                raise UploadError(f"the image is too large (over {MAX_PIXELS:,} pixels)") from None
            except Image.UnidentifiedImageError:
                raise UploadError(_unidentified(data)) from None
        _check_geometry(img)
        if img.is_animated if hasattr(img, "is_animated") else getattr(img, "n_frames", 1) > 1:
            raise UploadError("the image is animated or has several pages; upload a single still frame")
        _check_mode(img)
        img.load()
        _check_geometry(img)  # the size as decoded, in case a format changed it while loading
        try:
            img = ImageOps.exif_transpose(img)
        except Exception:
            raise UploadError("its EXIF metadata (which says how to rotate the image) is unreadable; "
                              "save the image again without metadata") from None
        img = _drop_opaque_alpha(img)
    except UploadError:
        raise
    except MemoryError:
        raise UploadError("the image is too large to decode") from None
    except Exception as e:
        reason = str(e).strip()
        reason = reason if reason and "BytesIO" not in reason else type(e).__name__
        kind = getattr(img, "format", None) or _allowed_kind(data)
        raise UploadError(f"not a readable image file ({f'a damaged {kind} file: ' if kind else ''}{reason})") from None
    if normalise and channels == 1:
        light = light_paper_image(img)
        x = image_to_tensor(normalise_digit(img, resolution, dark_ink=light), resolution, channels)
        x = -x if light else x  # the file's own tone
    else:
        x = image_to_tensor(img, resolution, channels)
    return -x if invert else x


def to_uint8(images: torch.Tensor, value_range=INPUT_RANGE) -> np.ndarray:
    """(B, C, H, W) or (C, H, W) in `value_range` ([-1, 1], or a model's own input range) -> uint8
    (B, H, W) / (B, H, W, 3): low is black, high is white."""
    x = images if images.ndim == 4 else images[None]
    x = ((from_input_range(x.detach().float(), value_range).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def to_pil(image: torch.Tensor, scale: int = 1, value_range=INPUT_RANGE):
    """One image (C, H, W) in `value_range` -> PIL image, upscaled by `scale` with nearest neighbour
    (crisp pixels)."""
    from PIL import Image

    img = Image.fromarray(to_uint8(image, value_range)[0])
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale > 1 else img


def grid(images: torch.Tensor, columns: int = 16, scale: int = 1, pad: int = 1, value_range=INPUT_RANGE):
    """Images (B, C, H, W) in `value_range` tiled into one PIL image."""
    from PIL import Image

    arr = to_uint8(images, value_range)
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
