"""What a public app receives from strangers: a corpus of hostile uploads, and property-based checks
of upload conversion and of every numeric request parameter.

Each upload either gives a ValueError with a short message meant for a person, or is accepted and
converted to a (C, H, W) float tensor in [-1, 1]; nothing else, never a hang, never a subprocess.
"""
import contextlib
import io
import os
import signal
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image, features

import dtrak_core.app_support as sup
from dtrak_core.errors import UploadError
from dtrak_core.images import MAX_UPLOAD_BYTES, load_user_image

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def time_limit(seconds):
    """Fail instead of hanging: SIGALRM interrupts the call (main thread, Unix)."""
    def expired(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
    """Any process started while decoding fails the test; Ghostscript is made to look installed so
    that an EPS or PS plugin reached by mistake would really try to start it."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"an upload started a process: {args}")

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)


# ---------------------------------------------------------------- building the corpus

def saved(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def new(mode, size=(16, 16), color=0):
    return Image.new(mode, size, color)


def digit(mode="L", size=(16, 16)):
    """A bright bar on black, so accepted images have content to compare."""
    img = Image.new("L", size, 0)
    img.paste(255, (size[0] // 4, 2, size[0] // 2, size[1] - 2))
    return img.convert(mode)


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declared(width, height, depth=8, colour=0, rows=b""):
    """A PNG whose header declares any size; the pixel data (rows) may be far too short."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_48bit():
    rows = b"".join(b"\x00" + b"\xff\xff\x00\x00\x80\x00" * 8 for _ in range(8))
    return png_declared(8, 8, depth=16, colour=2, rows=rows)


def png_bomb():
    """5000 x 5000 black pixels in about 25 kB."""
    return png_declared(5000, 5000, rows=b"\x00" * 5001 * 5000)


def png_text_bomb():
    """A zTXt chunk that inflates to 64 MB (in 64 kB)."""
    data = png_declared(8, 8, rows=b"\x00" * 9 * 8)
    ztxt = chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * 2**26, 9))
    return data[:33] + ztxt + data[33:]


def png_bad_crc():
    data = bytearray(saved(digit(), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR checksum
    return bytes(data)


def tiff_declared(width, height):
    """A minimal uncompressed 8-bit grayscale TIFF declaring any size, with one byte of pixels."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, 1), (278, 4, height), (279, 4, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", tag, kind, 1, value)
                                                     for tag, kind, value in entries) + b"\x00" * 4
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00"


def patched(data, offset, fmt, *values):
    data = bytearray(data)
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


def jpeg_declared(width, height):
    data = saved(digit(), "JPEG")
    sof = data.index(b"\xff\xc0")
    return patched(data, sof + 5, ">HH", height, width)


def bmp_declared(width, height):
    return patched(saved(digit(), "BMP"), 18, "<ii", width, height)


def gif_declared(width, height):
    return patched(saved(digit(), "GIF"), 6, "<HH", width, height)


def webp_declared(width, height):
    data = saved(digit("RGBA"), "WEBP", lossless=True, exif=Image.Exif().tobytes() or b"Exif\x00\x00")
    assert data[12:16] == b"VP8X"
    data = bytearray(data)
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


def animated(fmt, **kw):
    frames = [digit(), new("L", color=255)]
    return saved(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)


def with_transparent_pixel(mode):
    img = digit("RGBA")
    img.putpixel((0, 0), (0, 0, 0, 0))
    return img.convert(mode) if mode != "RGBA" else img


def palette_with_transparency(used):
    img = digit().convert("P")
    index = img.getpixel((0, 0)) if used else 200  # index 200 is in no pixel
    return saved(img, "PNG", transparency=index)


def rgb_colour_key():
    return saved(digit("RGB"), "PNG", transparency=(0, 0, 0))


def cmyk_jpeg():
    return saved(new("CMYK", color=(0, 0, 0, 0)), "JPEG")  # no ink: white paper


def eps_by_pillow():
    return saved(digit(), "EPS")


def truncated(data, keep):
    return data[:keep] if keep >= 1 else data[: int(len(data) * keep)]


def file_at(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def over_limit_file(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.write(saved(digit(), "PNG"))
        f.truncate(MAX_UPLOAD_BYTES + 1)  # sparse: the disk does not fill
    return str(path)


def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)  # opening it for reading would block forever
    return str(path)


def lazily_opened_eps():
    return Image.open(io.BytesIO(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n{ } loop\n"))


RNG = np.random.default_rng(0)
ACCEPT = None  # expected "message" of a case that must be accepted

READABLE = r"not a readable image file"
FORMATS = r"not a readable image file \(not PNG, JPEG, GIF, BMP, WebP or TIFF data"
DAMAGED = r"not a readable image file \(a damaged or truncated %s file\)"
ANIMATED = "animated or has several pages"
TRANSPARENT = "transparency"
DEEP = "16-bit or floating-point"
TOO_LARGE = "too large"

# (id, make(tmp_path) -> source, expected message regex or ACCEPT, optional reference image for ACCEPT)
CASES = [
    # nothing, noise and text
    ("zero-bytes", lambda t: b"", "the file is empty", None),
    ("one-byte", lambda t: b"\x89", FORMATS, None),
    ("random-16", lambda t: RNG.bytes(16), FORMATS, None),
    ("random-4k", lambda t: RNG.bytes(4096), FORMATS, None),
    ("random-1M", lambda t: RNG.bytes(2**20), FORMATS, None),
    ("png-signature-then-noise", lambda t: b"\x89PNG\r\n\x1a\n" + RNG.bytes(500), DAMAGED % "PNG", None),
    ("jpeg-marker-then-noise", lambda t: b"\xff\xd8\xff\xe0" + RNG.bytes(500), READABLE, None),
    ("text", lambda t: b"hello, this is not an image\n", FORMATS, None),
    ("html", lambda t: b"<!DOCTYPE html><html><body><img src=x onerror=alert(1)></body></html>",
     FORMATS + "; this looks like HTML", None),
    ("svg", lambda t: b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8"/></svg>',
     FORMATS + "; this looks like SVG", None),
    ("svg-billion-laughs", lambda t: b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 '
     b'"&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]><svg>&lol2;</svg>', FORMATS + "; this looks like XML", None),
    ("json", lambda t: b'{"pixels": [[0, 1], [1, 0]]}', FORMATS, None),
    ("shell-script", lambda t: b"#!/bin/sh\nrm -rf /\n", FORMATS, None),
    ("zip", lambda t: b"PK\x03\x04" + RNG.bytes(100), FORMATS, None),
    ("elf", lambda t: b"\x7fELF\x02\x01\x01" + b"\x00" * 57, FORMATS, None),
    # formats outside the whitelist (several run external programs or rarely used parsers)
    ("eps-endless-loop", lambda t: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n{ } loop\n",
     FORMATS + "; this looks like PostScript / EPS", None),
    ("eps-by-pillow", lambda t: eps_by_pillow(), FORMATS + "; this looks like PostScript / EPS", None),
    ("eps-binary-header", lambda t: b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIII", 30, 60, 0, 0, 0, 0) + b"\xff\xff"
     + b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n{ } loop\n", FORMATS + "; this looks like EPS", None),
    ("postscript", lambda t: b"%!PS\n/Helvetica findfont 12 scalefont setfont\n{ } loop\nshowpage\n",
     FORMATS + "; this looks like PostScript", None),
    ("pdf-by-pillow", lambda t: saved(digit("RGB"), "PDF"), FORMATS + "; this looks like PDF", None),
    ("ico", lambda t: saved(digit("RGB"), "ICO"), FORMATS + "; this looks like ICO", None),
    ("psd-header", lambda t: b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 1, 16, 16, 8, 1) + b"\x00" * 64,
     FORMATS + r"; this looks like Photoshop \(PSD\)", None),
    ("tga", lambda t: saved(digit(), "TGA"), FORMATS, None),
    ("pcx", lambda t: saved(digit(), "PCX"), FORMATS, None),
    ("ppm", lambda t: saved(digit(), "PPM"), FORMATS, None),
    ("sgi", lambda t: saved(digit(), "SGI"), FORMATS, None),
    ("im", lambda t: saved(digit(), "IM"), FORMATS, None),
    ("msp", lambda t: saved(digit("1"), "MSP"), FORMATS, None),
    ("xbm", lambda t: saved(digit("1"), "XBM"), FORMATS, None),
    ("dds", lambda t: saved(digit("RGB"), "DDS"), FORMATS, None),
    ("spider", lambda t: saved(digit("F"), "SPIDER"), FORMATS, None),
    ("blp", lambda t: saved(digit("P"), "BLP"), FORMATS, None),
    ("qoi", lambda t: saved(digit("RGB"), "QOI"), FORMATS + "; this looks like QOI", None),
    ("jpeg2000", lambda t: saved(digit("RGB"), "JPEG2000") if features.check("jpg_2000")
     else b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 32, FORMATS + "; this looks like JPEG 2000", None),
    ("avif-header", lambda t: b"\x00\x00\x00\x1cftypavif" + b"\x00" * 40, FORMATS + "; this looks like AVIF", None),
    ("heic-header", lambda t: b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40, FORMATS + "; this looks like AVIF", None),
    ("fits-header", lambda t: b"SIMPLE  =                    T" + b" " * 2850, FORMATS, None),
    ("xpm", lambda t: b'/* XPM */\nstatic char *x[] = {"1 1 1 1", "a c #000000", "a"};\n', FORMATS, None),
    # broken files of whitelisted formats
    ("png-half", lambda t: truncated(saved(digit(), "PNG"), 0.5), READABLE, None),
    ("png-header-only", lambda t: b"\x89PNG\r\n\x1a\n", DAMAGED % "PNG", None),
    ("png-no-pixel-data", lambda t: truncated(saved(digit(), "PNG"), 33), DAMAGED % "PNG", None),
    ("png-bad-checksum", lambda t: png_bad_crc(), DAMAGED % "PNG", None),
    ("png-zero-width", lambda t: png_declared(0, 5), "no pixels|" + DAMAGED % "PNG", None),
    ("png-text-bomb", lambda t: png_text_bomb(), READABLE, None),
    ("jpeg-half", lambda t: truncated(saved(digit(), "JPEG"), 0.5), READABLE, None),
    ("jpeg-soi-only", lambda t: b"\xff\xd8", DAMAGED % "JPEG", None),
    ("gif-half", lambda t: truncated(saved(digit(), "GIF"), 0.5), READABLE, None),
    ("bmp-half", lambda t: truncated(saved(digit(), "BMP"), 0.5), READABLE, None),
    ("webp-half", lambda t: truncated(saved(digit(), "WEBP"), 0.5), READABLE, None),
    ("tiff-half", lambda t: truncated(saved(digit(), "TIFF"), 0.5), READABLE, None),
    # decompression bombs: huge declared sizes, refused before decoding
    ("png-declares-100000x100000", lambda t: png_declared(100_000, 100_000), TOO_LARGE, None),
    ("png-declares-4097x4097", lambda t: png_declared(4097, 4097), TOO_LARGE, None),
    ("png-5000x5000-in-25kB", lambda t: png_bomb(), TOO_LARGE, None),
    ("jpeg-declares-65000x65000", lambda t: jpeg_declared(65000, 65000), TOO_LARGE, None),
    ("jpeg-declares-5000x5000", lambda t: jpeg_declared(5000, 5000), TOO_LARGE, None),
    ("gif-declares-65535x65535", lambda t: gif_declared(65535, 65535), TOO_LARGE, None),
    ("bmp-declares-100000x100000", lambda t: bmp_declared(100_000, 100_000), TOO_LARGE + "|" + READABLE, None),
    ("tiff-declares-100000x100000", lambda t: tiff_declared(100_000, 100_000), TOO_LARGE, None),
    ("webp-declares-16384x16384", lambda t: webp_declared(16384, 16384), TOO_LARGE + "|" + READABLE, None),
    # several frames
    ("gif-animated", lambda t: animated("GIF"), ANIMATED, None),
    ("webp-animated", lambda t: animated("WEBP", lossless=True), ANIMATED, None),
    ("apng", lambda t: animated("PNG"), ANIMATED, None),
    ("tiff-two-pages", lambda t: animated("TIFF"), ANIMATED, None),
    ("mpo-two-pictures", lambda t: animated("MPO"), ANIMATED, None),
    # depth and colour modes
    ("png-16-bit-gray", lambda t: saved(new("I;16"), "PNG"), DEEP, None),
    ("tiff-16-bit-gray", lambda t: saved(new("I;16"), "TIFF"), DEEP, None),
    ("tiff-32-bit-int", lambda t: saved(new("I"), "TIFF"), DEEP, None),
    ("tiff-float", lambda t: saved(new("F"), "TIFF"), DEEP, None),
    ("tiff-lab", lambda t: saved(new("LAB"), "TIFF"), "colour mode LAB", None),
    ("png-48-bit-rgb", lambda t: png_48bit(), ACCEPT, Image.new("RGB", (8, 8), (255, 0, 128))),
    ("cmyk-jpeg", lambda t: cmyk_jpeg(), ACCEPT, new("L", color=255)),
    ("cmyk-tiff", lambda t: saved(new("CMYK", color=(0, 0, 0, 255)), "TIFF"), ACCEPT, new("L", color=0)),
    ("1-bit-png", lambda t: saved(digit("1"), "PNG"), ACCEPT, digit()),
    ("1-bit-tiff-group4", lambda t: saved(digit("1"), "TIFF", compression="group4"), ACCEPT, digit()),
    ("1-bit-bmp", lambda t: saved(digit("1"), "BMP"), ACCEPT, digit()),
    ("palette-png", lambda t: saved(digit("P"), "PNG"), ACCEPT, digit()),
    ("progressive-jpeg", lambda t: saved(digit(), "JPEG", progressive=True, quality=100), ACCEPT, None),
    ("ycbcr-tiff", lambda t: saved(digit("RGB"), "TIFF", compression="jpeg"), ACCEPT, None),
    # transparency: refused when any pixel is transparent, dropped when all are opaque
    ("rgba-transparent-pixel", lambda t: saved(with_transparent_pixel("RGBA"), "PNG"), TRANSPARENT, None),
    ("la-transparent-pixel", lambda t: saved(with_transparent_pixel("LA"), "PNG"), TRANSPARENT, None),
    ("palette-transparent-used", lambda t: palette_with_transparency(True), TRANSPARENT, None),
    ("gif-transparent-used", lambda t: saved(digit("P"), "GIF", transparency=0), TRANSPARENT, None),
    ("rgb-colour-key-used", lambda t: rgb_colour_key(), TRANSPARENT, None),
    ("webp-transparent-pixel", lambda t: saved(with_transparent_pixel("RGBA"), "WEBP", lossless=True), TRANSPARENT,
     None),
    ("rgba-opaque", lambda t: saved(digit("RGBA"), "PNG"), ACCEPT, digit()),
    ("palette-transparent-unused", lambda t: palette_with_transparency(False), ACCEPT, digit()),
    ("tiff-rgba-opaque", lambda t: saved(digit("RGBA"), "TIFF"), ACCEPT, digit()),
    # shapes
    ("1x4000", lambda t: saved(new("L", (1, 4000)), "PNG"), "too elongated", None),
    ("4000x1", lambda t: saved(new("L", (4000, 1)), "PNG"), "too elongated", None),
    ("10x41", lambda t: saved(new("L", (10, 41)), "PNG"), "too elongated", None),
    ("3x3", lambda t: saved(new("L", (3, 3)), "PNG"), "too small", None),
    ("1x1", lambda t: saved(new("L", (1, 1)), "BMP"), "too small", None),
    ("pil-0x0", lambda t: Image.new("L", (0, 0)), "no pixels", None),
    ("pil-0x7", lambda t: Image.new("L", (0, 7)), "no pixels", None),
    ("4x16", lambda t: saved(new("L", (4, 16), 255), "PNG"), ACCEPT, new("L", color=255)),
    # metadata
    ("png-garbage-exif", lambda t: saved(digit(), "PNG", exif=b"Exif\x00\x00garbage garbage"), "EXIF metadata", None),
    ("jpeg-exif-orientation-9", lambda t: saved(digit(), "JPEG", quality=100, exif=orientation(9)), ACCEPT, None),
    # size limits
    ("bytes-over-limit", lambda t: saved(digit(), "PNG") + b"\x00" * MAX_UPLOAD_BYTES, "over 10 MB", None),
    ("file-over-limit", over_limit_file, "over 10 MB", None),
    # paths
    ("png-named-jpg", lambda t: file_at(t, "digit.jpg", saved(digit(), "PNG")), ACCEPT, digit()),
    ("eps-named-png", lambda t: file_at(t, "digit.png", eps_by_pillow()), FORMATS + "; this looks like PostScript",
     None),
    ("svg-named-png", lambda t: file_at(t, "digit.png", b"<svg/>"), FORMATS + "; this looks like SVG", None),
    ("empty-file", lambda t: file_at(t, "empty.png", b""), "the file is empty", None),
    ("directory", lambda t: str(t), "is a folder", None),
    ("missing-file", lambda t: str(t / "missing.png"), "no such file", None),
    ("empty-path", lambda t: "", "no such file", None),
    ("path-with-nul", lambda t: str(t / "a\x00b.png"), "no such file", None),
    ("fifo", fifo, "not a regular file", None),
    ("dev-zero", lambda t: "/dev/zero", "not a regular file", None),
    # objects that are not files
    ("none", lambda t: None, "got NoneType", None),
    ("int", lambda t: 5, "got int", None),
    ("huge-int", lambda t: 10**12, "got int", None),  # bytes(10**12) would allocate a terabyte
    ("float", lambda t: 3.5, "got float", None),
    ("bool", lambda t: True, "got bool", None),
    ("numpy-array", lambda t: np.zeros((8, 8), np.uint8), "got ndarray", None),
    ("list", lambda t: [0, 1, 2], "got list", None),
    ("file-object", lambda t: io.BytesIO(saved(digit(), "PNG")), "got BytesIO", None),
    ("pil-lazily-opened-eps", lambda t: lazily_opened_eps(), "EPS images are not supported", None),
    ("pil-float-image", lambda t: digit("F"), DEEP, None),
]


def orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def test_the_corpus_is_large():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,make,expected,reference", CASES, ids=[c[0] for c in CASES])
def test_hostile_upload(name, make, expected, reference, tmp_path):
    source = make(tmp_path)
    with time_limit(20):
        if expected is ACCEPT:
            for channels in (1, 3):
                x = load_user_image(source, 8, channels)
                assert x.shape == (channels, 8, 8) and x.dtype == torch.float32
                assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
                if reference is not None:
                    torch.testing.assert_close(x, load_user_image(reference, 8, channels), atol=1e-6, rtol=0)
        else:
            with pytest.raises(ValueError, match=expected) as err:
                load_user_image(source, 8)
            message = str(err.value)
            assert isinstance(err.value, UploadError)
            assert len(message) < 300 and "BytesIO object" not in message and "Traceback" not in message


# ---------------------------------------------------------------- property-based: upload conversion

@st.composite
def valid_images(draw):
    mode = draw(st.sampled_from(["L", "RGB"]))
    w = draw(st.integers(4, 48))
    h = draw(st.integers(max(4, -(-w // 4)), min(48, 4 * w)))
    pixels = draw(st.binary(min_size=w * h * len(mode), max_size=w * h * len(mode)))
    arr = np.frombuffer(pixels, np.uint8).reshape((h, w) if mode == "L" else (h, w, 3))
    return Image.fromarray(arr, mode)


def check_tensor(x, channels, resolution):
    assert x.shape == (channels, resolution, resolution) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1


@FAST
@given(img=valid_images(), fmt=st.sampled_from(["PNG", "BMP", "TIFF", "WEBP", "JPEG", None]),
       resolution=st.sampled_from([4, 8, 16]), channels=st.sampled_from([1, 3]))
def test_valid_images_convert(img, fmt, resolution, channels):
    source = img if fmt is None else saved(img, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    x = load_user_image(source, resolution, channels)
    check_tensor(x, channels, resolution)
    assert torch.equal(load_user_image(source, resolution, channels), x)  # deterministic
    assert torch.equal(load_user_image(source, resolution, channels, invert=True), -x)
    if fmt in ("PNG", "BMP", "TIFF", "WEBP"):  # lossless: the file reads as the image itself
        assert torch.equal(x, load_user_image(img, resolution, channels))


def load_or_refuse(data):
    try:
        x = load_user_image(data, 8)
    except ValueError as e:
        assert str(e) and len(str(e)) < 300
        return None
    check_tensor(x, 1, 8)
    return x


@FAST
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about damaged metadata it skips
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_convert_or_give_value_error(data):
    with time_limit(20):
        load_or_refuse(data)


SEEDS = {fmt: saved(digit("RGB"), fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.filterwarnings("ignore::UserWarning")
@given(fmt=st.sampled_from(sorted(SEEDS)), keep=st.floats(0, 1),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8))
def test_damaged_files_convert_or_give_value_error(fmt, keep, edits):
    data = bytearray(SEEDS[fmt])
    for where, value in edits:  # overwrite bytes anywhere, header included
        data[int(where * len(data))] = value
    with time_limit(20):
        load_or_refuse(bytes(data[: max(1, int(keep * len(data)))]))


# ---------------------------------------------------------------- property-based: request parameters

# what a JSON client (or a broken UI) can send where a number belongs
anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**80, 2**80), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.from_regex(r"\s*-?[0-9]{1,12}(\.[0-9]{0,3})?(e[0-9]{1,3})?\s*", fullmatch=True),
    st.sampled_from(["", "nan", "inf", "-inf", "1e400", "0x10", "١٢", "50", "5.0", "1_000"]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.integers(-2**40, 2**40).map(np.int64), st.floats(-1e6, 1e6).map(np.float32), st.just(np.bool_(True)),
    st.just(np.array([3])), st.just(10**5000), st.just(b"7"), st.just(complex(1, 0)),
)


def check_seeds(seeds):
    assert isinstance(seeds, list) and 1 <= len(seeds) <= sup.MAX_SAMPLES
    assert all(type(s) is int and 0 <= s <= sup.MAX_SEED for s in seeds)
    assert seeds == sorted(set(seeds))


@settings(max_examples=300, deadline=None)
@given(mode=st.one_of(st.sampled_from(["single", "range", "random"]), anything),
       seed=anything, start=anything, end=anything, count=anything)
def test_parse_seeds_gives_valid_seeds_or_value_error(mode, seed, start, end, count):
    try:
        seeds = sup.parse_seeds(mode, seed, start, end, count)
    except ValueError as e:
        assert len(str(e)) < 200
        return
    check_seeds(seeds)
    if mode == "single":
        assert seeds == [int(float(seed))]


@settings(max_examples=100, deadline=None)
@given(v=st.integers(-5, sup.MAX_SEED + 5), n=st.integers(-3, 70), as_float=st.booleans())
def test_parse_seeds_on_numbers(v, n, as_float):
    conv = float if as_float else int
    if 0 <= v <= sup.MAX_SEED:
        assert sup.parse_seeds("single", conv(v)) == [v]
    else:
        with pytest.raises(ValueError, match="seed must be a whole number in 0..2147483647"):
            sup.parse_seeds("single", conv(v))
    if 1 <= n <= sup.MAX_SAMPLES:
        check_seeds(sup.parse_seeds("random", count=conv(n), rng_seed=v % 1000))
        if v >= 0 and v + n - 1 <= sup.MAX_SEED:
            assert sup.parse_seeds("range", start=conv(v), end=conv(v + n - 1)) == list(range(v, v + n))
    else:
        with pytest.raises(ValueError, match=r"number of samples must be a whole number in 1..64"):
            sup.parse_seeds("random", count=conv(n))


@settings(max_examples=300, deadline=None)
@given(value=anything, lo=st.integers(-10, 10), span=st.integers(0, 300))
def test_parse_int_gives_a_bounded_int_or_value_error(value, lo, span):
    hi = lo + span
    try:
        v = sup.parse_int(value, "the knob", lo, hi)
    except ValueError as e:
        assert str(e).startswith(f"the knob must be a whole number in {lo}..{hi}, got ") and len(str(e)) < 120
        return
    assert type(v) is int and lo <= v <= hi
    assert not isinstance(value, (bool, np.bool_, type(None), list, dict, bytes, complex))
    assert v == float(value)  # only an exact whole number is accepted, never a rounded one


@settings(max_examples=200, deadline=None)
@given(value=st.one_of(st.integers(-10, 300), st.floats(-10, 300)), n_train=st.integers(1, 3000))
def test_knob_bounds(value, n_train):
    whole = float(value).is_integer()
    for parse, hi in [(sup.parse_steps, sup.MAX_DDIM_STEPS), (sup.parse_top_k, sup.MAX_TOP_K),
                      (lambda v: sup.parse_top_k(v, n_train), min(sup.MAX_TOP_K, n_train)),
                      (lambda v: sup.parse_removal_k(v, n_train), max(1, n_train // 2))]:
        if whole and 1 <= value <= hi:
            assert parse(value) == int(value)
        else:
            with pytest.raises(ValueError, match=f"must be a whole number in 1..{hi}, got"):
                parse(value)


def test_knob_messages():
    with pytest.raises(ValueError, match=r"^DDIM steps must be a whole number in 1..200, got 'abc'$"):
        sup.parse_steps("abc")
    with pytest.raises(ValueError, match=r"^top-k must be a whole number in 1..32, got 0$"):
        sup.parse_top_k(0)
    with pytest.raises(ValueError, match=r"^number of training images to remove must be a whole number in 1..750, "
                                         r"got 751$"):
        sup.parse_removal_k(751, 1500)
    assert sup.parse_steps(" 50 ") == 50 and sup.parse_steps(50.0) == 50 and sup.parse_removal_k(750, 1500) == 750
    with pytest.raises(ValueError, match="got a number too long to show"):
        sup.parse_steps(10**5000)


METHODS = sup.method_choices(["square", "loss", "tracin", "journey"])


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(anything, st.sampled_from([m for _, m in METHODS] + [lbl for lbl, _ in METHODS])))
def test_parse_method_gives_a_choice_or_names_them(value):
    try:
        method = sup.parse_method(value, METHODS)
    except ValueError as e:
        assert all(label in str(e) for label, _ in METHODS)
        return
    assert method in [m for _, m in METHODS]
    assert value in (method, sup.method_label(method))


def test_parse_method_messages():
    assert sup.parse_method("loss", METHODS) == "loss"
    assert sup.parse_method("TRAK", METHODS) == "loss"  # a label from an API client
    assert sup.parse_method("tracin", ["tracin", "random"]) == "tracin"
    for bad in (None, "", "LOSS", "nonsense", 3, ["loss"]):
        with pytest.raises(ValueError, match=r"^method must be one of D-TRAK, TRAK, TracInCP, journey; got "):
            sup.parse_method(bad, METHODS)
    with pytest.raises(ValueError, match="no ranking is available"):
        sup.parse_method("square", [], name="ranking")
