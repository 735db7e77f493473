"""The text-to-image page on your own Stable Diffusion + LoRA speaks of that folder: its prompts come
from its captions, its header from its manifest, its class names from its class folders, and no
text says digits, ink or strokes (the miniature's page keeps its digits, read from its folder)."""
import re

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.text2image.build import MINIATURE_ROOT, build_text2image_from
from dtrak_core.ui import state
from dtrak_core.ui import text2image as views

DIGIT_WORDS = re.compile(r"\bdigits?\b|\bink\b|strokes?\b|handwrit", re.IGNORECASE)
CAPTIONS = {"cats": ["a cat asleep", "a cat on a mat", "a small cat"], "dogs": ["a dog running", "a dog", "a big dog"]}


def page_texts(blocks: gr.Blocks) -> str:
    out = []
    for b in blocks.blocks.values():
        for name in ("value", "label", "info", "placeholder"):
            v = getattr(b, name, None)
            if isinstance(v, str):
                out.append(v)
    return "\n".join(out)


def digit_words(text: str) -> list[str]:
    return sorted({m.group(0).lower() for m in DIGIT_WORDS.finditer(text)})


@pytest.fixture
def own_root(own, one_thread):
    """Your own pipeline and LoRA (the `own` fixture's), fine-tuned on captioned images in two class folders."""
    data = own / "pets"
    rng = np.random.default_rng(0)
    for name, captions in CAPTIONS.items():
        (data / name).mkdir(parents=True)
        for i, caption in enumerate(captions):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(data / name / f"{i}.png")
            (data / name / f"{i}.txt").write_text(caption)
    root = str(own / "attr")
    build_text2image_from(root, str(own / "sd"), str(own / "lora"), str(data),
                          (FeatureSetting("square", K=2, k=16), FeatureSetting("loss", K=2, k=16)), show_bar=False)
    return root


def test_your_own_stable_diffusion_page_speaks_of_its_captions_and_classes(own_root):
    a = views.load(own_root)
    every = [c for cs in CAPTIONS.values() for c in cs]
    assert not a.digits and not a.dtrak_lora and a.class_names == ("cats", "dogs")
    assert a.prompts == sorted(every) and a.default_prompt in every
    with gr.Blocks() as page, state.bound_context(own_root):
        views.create_ui(a)
    text = page_texts(page)
    assert digit_words(text) == []
    assert "captioned images" in text and "in 2 classes (cats, dogs)" in text and "pretrained on" not in text
    assert f"e.g. “{a.default_prompt}”" in text and "distinct captions" in text
    assert "LDS: not measured for this model" in text and "fine-tuned by your own script" in text
    with pytest.raises(ValueError, match=f"type a prompt, e.g. “{a.default_prompt}”"):
        views.generate_samples(own_root, " ", "single", 0, None, None, None, 3)

    def on(fn):
        return state.bound(own_root, fn)
    items, batch, note = on(views.on_generate)(a.default_prompt, "range", None, 0, 1, None, 3, None,
                                               progress=lambda *args, **kwargs: None)
    q = views.sample_query(batch, 0)
    props, opps, _, mass, summary = on(views.attribute)(q, "d-trak", 3, progress=lambda *args, **kwargs: None)
    assert list(mass.data[0].x) == ["cats", "dogs"]
    assert sum(props.count(f"{name}<br>") for name in ("cats", "dogs")) == 3
    figure, cards, noise_text = on(views.noise_view)(q, "d-trak")
    assert all(re.fullmatch(r"#\d+ \((cats|dogs)\)", y) for y in figure.data[0].y)
    for shown in (note, *[c for _, c in items], props, opps, summary, cards, noise_text):
        assert digit_words(shown) == [], shown


def test_the_miniatures_page_reads_its_digits_from_its_folder():
    a = views.load(MINIATURE_ROOT)
    assert a.default_prompt == "a handwritten digit 7" and a.dtrak_lora
    header = views.header_markdown(a)
    assert "pretrained on\nthe digits 0-4 and fine-tuned with **LoRA** on the digits 5-9" in header
    assert views.prompt_help(a) == "the miniature knows “a handwritten digit 0” .. “9”; the LoRA taught it 5-9"
