"""Hand-drawn digits through the upload path: a reproducible set of digits drawn in code (pen strokes of
varied width, position, size and canvas, both ink polarities, some on grey noisy paper), read by the
app's digit classifier after the upload normalisation."""
import io
import random

import numpy as np
import pytest

from dtrak_core.app_support import light_paper
from dtrak_core.evaluation.quality import classify
from dtrak_core.images import load_user_image, normalise_digit

N_DRAWN = 40


def _strokes(d: int, draw, box, width: int, ink) -> None:
    """Digit `d` drawn with a pen into `box` (left, top, right, bottom)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0

    def P(u, v):
        return (x0 + u * w, y0 + v * h)

    def arc(u0, v0, u1, v1, start, end):
        draw.arc([P(u0, v0), P(u1, v1)], start, end, fill=ink, width=width)

    def line(*pts):
        draw.line([P(u, v) for u, v in pts], fill=ink, width=width, joint="curve")

    if d == 0:
        draw.ellipse([P(0, 0), P(1, 1)], outline=ink, width=width)
    elif d == 1:
        line((0.25, 0.2), (0.55, 0), (0.55, 1))
    elif d == 2:
        arc(0, 0, 1, 0.55, 180, 360)
        arc(0, 0, 1, 0.55, 0, 40)
        line((0.93, 0.4), (0, 1), (1, 1))
    elif d == 3:
        arc(0.05, 0, 0.95, 0.5, 200, 450)
        arc(0, 0.5, 1, 1, 270, 520)
    elif d == 4:
        line((0.6, 0), (0, 0.65), (1, 0.65))
        line((0.7, 0.3), (0.7, 1))
    elif d == 5:
        line((0.95, 0), (0.1, 0), (0.05, 0.45))
        arc(0, 0.35, 1, 1, 210, 500)
    elif d == 6:
        arc(0, 0, 1.6, 1.3, 180, 260)
        draw.ellipse([P(0, 0.45), P(1, 1)], outline=ink, width=width)
    elif d == 7:
        line((0, 0), (1, 0), (0.35, 1))
    elif d == 8:
        draw.ellipse([P(0.1, 0), P(0.9, 0.47)], outline=ink, width=width)
        draw.ellipse([P(0, 0.47), P(1, 1)], outline=ink, width=width)
    elif d == 9:
        draw.ellipse([P(0, 0), P(1, 0.55)], outline=ink, width=width)
        line((1, 0.28), (0.95, 1))


def drawn_digit(i: int, seed: int = 1000):
    """The i-th hand-made digit: (PNG bytes, label). Digit i % 10; canvas 64..400 px; the digit 40-85%
    of the canvas high, anywhere on it; stroke 6..30 px (at most a fifth of the digit's height); dark
    ink on white paper, light ink on black, or dark ink on grey noisy paper. `seed` picks the set: the
    test's set is the default; another seed draws a held-out set to check a change does not just fit
    the test's 40 drawings."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed + i)
    label = i % 10
    side = rng.randint(64, 400)
    h = int(side * rng.uniform(0.4, 0.85))
    w = int(h * (0.35 if label == 1 else rng.uniform(0.5, 0.7)))
    width = max(2, min(rng.randint(6, 30), h // 5))
    pad = width // 2 + 1
    h, w = min(h, side - 2 * pad), min(w, side - 2 * pad)  # the pen stays on the canvas
    x0 = rng.randint(pad, side - w - pad)
    y0 = rng.randint(pad, side - h - pad)
    style = i % 3
    paper, ink = {0: (255, 0), 1: (0, 255), 2: (rng.randint(150, 215), rng.randint(10, 80))}[style]
    img = Image.new("L", (side, side), paper)
    _strokes(label, ImageDraw.Draw(img), (x0, y0, x0 + w, y0 + h), width, ink)
    if style == 2:  # a photo: noise on grey paper
        noise_rng = np.random.default_rng(i if seed == 1000 else (seed, i))  # the test's set as it was
        noise = noise_rng.normal(0, rng.uniform(6, 14), (side, side))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), label


def read_as_app(data: bytes, normalise: bool):
    """The app's upload path (read_upload): the ink polarity read from the file, then the query."""
    plain = load_user_image(data, 8, 1, invert=False, normalise=normalise)
    return load_user_image(data, 8, 1, invert=light_paper(plain.numpy()), normalise=normalise)


def accuracy(normalise: bool, indices=range(N_DRAWN), seed: int = 1000) -> tuple[float, list]:
    indices = list(indices)
    drawn = [drawn_digit(i, seed) for i in indices]
    x = np.stack([read_as_app(data, normalise).numpy() for data, _ in drawn])
    labels = np.array([label for _, label in drawn])
    got = classify(x)[0]
    return (float((got == labels).mean()),
            [(indices[k], int(labels[k]), int(got[k])) for k in np.flatnonzero(got != labels)])


def test_hand_drawn_digits_are_read_correctly():
    # 92.5% (37 of 40) are read: the three 8s, two loops with the lower one wider, read as 9s; 98% of
    # the 200 held-out drawings below
    acc, wrong = accuracy(normalise=True)
    before, _ = accuracy(normalise=False)
    print(f"hand-drawn digits read correctly: {acc:.0%} normalised, {before:.0%} before (the old path)")
    assert acc >= 0.9, f"{acc:.1%}; misread (index, label, read as): {wrong}"


def test_held_out_drawings_are_read_as_well():
    # drawings with other seeds than the test's 40, so that the normalisation is not fitted to those
    acc, wrong = accuracy(normalise=True, indices=range(1000, 1200), seed=777)
    print(f"held-out hand-drawn digits read correctly: {acc:.1%}")
    assert acc >= 0.9, f"{acc:.1%}; misread (index, label, read as): {wrong}"


def test_normalised_digit_has_the_training_form():
    from PIL import Image

    data, _ = drawn_digit(3)  # a 3 on light paper, somewhere on the canvas
    img = normalise_digit(Image.open(io.BytesIO(data)), 8)
    assert img.size == (8, 8) and img.mode == "L"
    x = np.asarray(img) > 64
    assert x[0].any() and x[-1].any()  # the digit fills the height, as the training digits do
    cols = np.flatnonzero(x.any(0))
    assert abs((cols[0] + cols[-1]) / 2 - 3.5) <= 1  # centred
    assert not normalise_digit(Image.new("L", (50, 50), 200), 8).getextrema()[1]  # blank paper: no ink


@pytest.mark.parametrize("i", [0, 1, 2])
def test_polarity_and_invert_still_negate(i):
    data, _ = drawn_digit(i)
    x = load_user_image(data, 8, normalise=True)
    assert np.array_equal(load_user_image(data, 8, invert=True, normalise=True).numpy(), -x.numpy())
    # light ink on black, as the training digits, whatever the file: a dark border and a block at least
    # 14/16 inked (not necessarily full: 1.8% of the training digits have no fully inked block)
    q = read_as_app(data, True).numpy()
    assert not light_paper(q) and q.max() >= 0.75


def test_the_apps_example_uploads_read_as_the_digit_they_show(tmp_path):
    from dtrak_core.app_support import write_example_uploads
    from dtrak_core.model.data import load_digits

    examples = write_example_uploads(str(tmp_path), load_digits("validation"))
    want = [int(next(ch for ch in caption if ch.isdigit())) for _, caption in examples]
    with open(examples[0][0], "rb") as f:
        assert f.read()  # written
    got = classify(np.stack([read_as_app(open(p, "rb").read(), True).numpy() for p, _ in examples]))[0]
    assert got.tolist() == want
