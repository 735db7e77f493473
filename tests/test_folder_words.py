"""The app speaks of the folder it shows: on a model of your own (16x16 colour shapes in four class
folders) and on Fashion-MNIST, no digit, ink or stroke in any text of the page or its handlers; the
class names on the cards, the charts' axes and the header; the Benchmarks tab gives the exact
`lds-own` / `counterfactual-own` commands on the folder, and how far a run under it has come."""
import json
import os
import re

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.build import build_from
from tests.conftest import app_on, torch_threads

SHAPES = ("circle", "square", "star", "triangle")
DIGIT_WORDS = re.compile(r"\bdigits?\b|\bink\b|strokes?\b|handwrit", re.IGNORECASE)


class Select:
    def __init__(self, index):
        self.index = index


def page_texts(blocks: gr.Blocks) -> str:
    """Every text a visitor can read in a page's components: values, labels, help lines, example captions."""
    out = []
    for b in blocks.blocks.values():
        for name in ("value", "label", "info", "placeholder"):
            v = getattr(b, name, None)
            if isinstance(v, str):
                out.append(v)
        out += [str(x) for x in (getattr(b, "sample_labels", None) or [])]
    return "\n".join(out)


def digit_words(text: str) -> list[str]:
    return sorted({m.group(0).lower() for m in DIGIT_WORDS.finditer(text)})


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """A model folder of your own: a tiny RGB 16x16 DDIM pipeline saved by diffusers and 16 images
    in four class folders (built with `build --data`)."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    model = str(tmp_path_factory.mktemp("shapes-ddim"))
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")).save_pretrained(model)
    data = tmp_path_factory.mktemp("shapes-images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(SHAPES):
        os.makedirs(data / name)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) // (1 + c)).save(data / name / f"{i}.png")
    root = str(tmp_path_factory.mktemp("shapes-root"))
    with torch_threads(1):
        build_from(root, model, str(data), (FeatureSetting("square", K=2, k=16), FeatureSetting("loss", K=2, k=16)),
                   show_bar=False)
    return root


@pytest.fixture(scope="module")
def shapes_app(shapes_root):
    with app_on(shapes_root) as handlers:
        yield handlers


def test_the_page_of_your_own_folder_names_its_classes_and_no_digits(shapes_app, shapes_root):
    a = shapes_app.assets()
    assert not a.digits and a.class_names == SHAPES and a.kind == ("image", "images")
    header = shapes_app.header_markdown(a)
    assert "16 images" in header and "in 4 classes (circle, square, star, triangle)" in header
    text = page_texts(shapes_app.demo)
    assert digit_words(text) == []
    assert "Which training images made this image?" in text and "**This model.**" in text
    assert "Or draw a digit" not in text and "use the image's negative (invert)" in text


def test_the_handlers_speak_of_the_folders_classes(shapes_app, tmp_path):
    items, batch = shapes_app.generate_samples("range", 0, 0, 1, 2, 3)
    q = shapes_app.sample_query(batch["seeds"][0], batch["steps"], batch["images"][0])
    props, opps, hist, mass, summary = shapes_app.attribute(q, "square", 4)
    assert sum(props.count(f"{name}<br>") for name in SHAPES) == 4  # each card names its class
    assert list(mass.data[0].x) == list(SHAPES) and mass.layout.xaxis.title.text == "training class"
    assert all(h.split(":")[0] in SHAPES for h in mass.data[0].customdata)
    figure, cards, noise_text = shapes_app.noise_view(q, "square")
    assert all(re.fullmatch(r"#\d+ \((circle|square|star|triangle)\)", y) for y in figure.data[0].y)
    assert sum(cards.count(f"{name}<br>") for name in SHAPES) == len(re.findall('class="card"', cards))
    index = int(props.split('data-index="')[1].split('"')[0])
    used = shapes_app.use_training_image(index)
    assert re.search(r"Training image #\d+ \((circle|square|star|triangle)\)", used[0].title)
    Image.fromarray(np.full((16, 16, 3), 250, dtype=np.uint8)).save(tmp_path / "white.png")
    q2, _, info, invert = shapes_app.read_upload(str(tmp_path / "white.png"))
    assert invert is False and "brighter than mid-grey" in info  # an unusual image, said without ink
    for text in (*[c for _, c in items], props, opps, summary, noise_text, info, used[2],
                 str(hist.layout.xaxis.title.text)):
        assert digit_words(text) == [], text


def test_benchmarks_say_how_to_fill_them_with_the_exact_commands(shapes_app, shapes_root):
    root = shapes_root

    def shown():
        with gr.Blocks() as bench:
            shapes_app.benchmarks_blocks(root)
        return page_texts(bench)

    text = shown()
    assert digit_words(text) == []
    lds, cf = os.path.join(root, "lds"), os.path.join(root, "counterfactual")
    for command in (f"python -m dtrak_core lds-own prepare --root {root} --out {lds}",
                    f"python -m dtrak_core lds-own ground-truth --root {root} --out {lds} --checkpoints "
                    f"{os.path.join(root, 'lds-models')}",
                    f"python -m dtrak_core lds-own evaluate --root {root} --out {lds} --dest "
                    f"{os.path.join(root, 'benchmarks')}",
                    f"python -m dtrak_core counterfactual-own prepare --root {root} --out {cf}",
                    f"python -m dtrak_core counterfactual-own measure --root {root} --out {cf} --checkpoints "
                    f"{os.path.join(root, 'counterfactual-models')}"):
        assert command in text, command
    assert "Under way" not in text
    # a run prepared under the folder: how far it has come
    os.makedirs(os.path.join(lds, "jobs"))
    with open(os.path.join(lds, "jobs.json"), "w") as f:
        json.dump({"jobs": [{"id": "m000-s1", "keep": [0]}, {"id": "m001-s1", "keep": [1]}]}, f)
    open(os.path.join(lds, "jobs", "m000-s1.npz"), "wb").close()
    assert "listed 2 retrains in" in shown() and "the ground truth of 1 is measured" in shown()
    # the LDS evaluated into the tab, the counterfactual not yet: only its commands remain
    from dtrak_core.checksums import seal

    os.makedirs(os.path.join(root, "benchmarks"))
    cell = {"honest": {"lds": 12.0, "pm": 1.0}, "paper": {"lds": 13.0, "pm": 1.0}, "default": {"lds": 11.0, "pm": 1.0}}
    with open(os.path.join(root, "benchmarks", "tables.json"), "w") as f:
        json.dump(seal({"methods": {"d-trak/K2": {"generated": cell}, "pixel-cosine": {
            "generated": {"lds": 4.0, "pm": 2.0}}}}), f)
    text = shown()
    assert digit_words(text) == [] and "Every method, best on the generated samples at the top:" in text
    assert "Not measured yet: the counterfactual" in text and "lds-own prepare" not in text
    assert f"python -m dtrak_core counterfactual-own prepare --root {root} --out {cf}" in text


def test_each_cli_option_the_benchmarks_tab_names_exists():
    """The commands the tab prints use the CLI's real options."""
    from dtrak_core.cli import build_parser

    parser = build_parser()
    for argv in (["lds-own", "prepare", "--root", "R", "--out", "O"],
                 ["lds-own", "ground-truth", "--root", "R", "--out", "O", "--checkpoints", "C"],
                 ["lds-own", "evaluate", "--root", "R", "--out", "O", "--dest", "D"],
                 ["lds-own", "tune-lambda", "--root", "R", "--out", "O"],
                 ["counterfactual-own", "prepare", "--root", "R", "--out", "O"],
                 ["counterfactual-own", "measure", "--root", "R", "--out", "O", "--checkpoints", "C"]):
        parser.parse_args(argv)


def test_the_fashion_page_speaks_of_clothes(fashion_app):
    a = fashion_app.assets()
    assert a.kind == ("clothing image", "clothing images") and "ankle-boot" in a.class_names
    text = page_texts(fashion_app.demo)
    assert digit_words(text) == []
    assert "1,000 clothing images" in text and "ankle-boot" in text
    _, batch = fashion_app.generate_samples("single", 7, 0, 0, 1, 5)
    q = fashion_app.select_sample(batch, Select(0))[0]
    props, opps, _, mass, summary = fashion_app.attribute(q, "square", 4)
    assert set(mass.data[0].x) <= set(a.class_names)
    for text in (props, opps, summary):
        assert digit_words(text) == [], text
