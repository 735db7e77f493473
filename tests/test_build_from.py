"""Your own model and images: a saved diffusers pipeline (or a repo in the local Hugging Face cache)
plus a folder of training images -> feature stores -> attribution, without copying or downloading."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.build import build_from
from dtrak_core.cli import main
from dtrak_core.model.unet import load_checkpoint, resolve_model
from tests.conftest import load_app

SETTINGS = (FeatureSetting("square", K=2, k=16), FeatureSetting("loss", K=2, k=16))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny RGB 16x16 DDIM pipeline saved by diffusers itself, as a user's trained model would be."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    path = str(tmp_path_factory.mktemp("my-ddim"))
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Twelve 20x20 colour images in two class folders (resized to the model's 16x16 on load)."""
    root = tmp_path_factory.mktemp("my-images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cats", "dogs")):
        os.makedirs(root / name)
        for i in range(6):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) // (1 + c)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def built(pipeline, images, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("my-root"))
    build_from(root, pipeline, images, SETTINGS, show_bar=False)
    return root


def test_stores_for_a_saved_pipeline_and_an_image_folder(built, pipeline, images):
    attributor = Attributor.load(built)
    assert attributor.methods == ["loss", "square"]
    assert tuple(attributor.train.images.shape) == (12, 3, 16, 16)
    assert attributor.train.labels.tolist() == [0] * 6 + [1] * 6  # from the class folders
    manifest = json.load(open(os.path.join(built, "manifest.json")))
    assert manifest["checkpoint"] == os.path.abspath(pipeline) and not os.path.exists(os.path.join(built, "model"))

    # scores = phi_q (Phi (Phi^T Phi + lam I)^-1)^T, from the store's features and a fresh featurizer
    setting, store = attributor.setting("square")
    query = attributor.train.images[[3]] * 0.9
    lam = 0.1
    Phi = np.asarray(store.features(), dtype=np.float64)
    phi = Featurizer(attributor.unet, attributor.scheduler, setting)(query).numpy().astype(np.float64)
    expected = phi @ (Phi @ np.linalg.inv(Phi.T @ Phi + lam * np.eye(Phi.shape[1]))).T
    np.testing.assert_allclose(attributor.scores(query, "square", lam=lam), expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())


def test_rebuild_resumes_and_other_data_is_refused(built, pipeline, images, tmp_path):
    before = json.load(open(os.path.join(built, "manifest.json")))
    assert build_from(built, pipeline, images, SETTINGS, show_bar=False)["stores"] == before["stores"]
    more = str(tmp_path / "more")
    shutil.copytree(images, more)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(os.path.join(more, "cats", "extra.png"))
    with pytest.raises(ValueError, match="another dataset"):
        build_from(built, pipeline, more, SETTINGS, show_bar=False)
    # a folder changed after the build: the stores refuse it, naming the field
    os.remove(os.path.join(more, "cats", "extra.png"))
    Image.new("RGB", (20, 20), (0, 0, 255)).save(os.path.join(more, "cats", "0.png"))
    root = str(tmp_path / "root")
    build_from(root, pipeline, more, SETTINGS[:1], show_bar=False)
    Image.new("RGB", (20, 20), (0, 255, 0)).save(os.path.join(more, "cats", "0.png"))
    with pytest.raises(ValueError, match="dataset"):
        Attributor.load(root)


def test_models_from_the_local_hugging_face_cache_only(pipeline, images, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--me--tiny-ddim" / "snapshots" / "0123abcd"
    shutil.copytree(pipeline, snapshot)
    os.makedirs(cache / "models--me--tiny-ddim" / "refs")
    (cache / "models--me--tiny-ddim" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("me/tiny-ddim") == str(snapshot)
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        resolve_model("me/not-here")
    with pytest.raises(ValueError, match="no such folder"):
        resolve_model("./nowhere")

    root = str(tmp_path / "root")
    assert main(["build", "--root", root, "--model", "me/tiny-ddim", "--data", images, "--output-fn", "square",
                 "--K", "2", "--k", "16"]) == 0
    capsys.readouterr()
    query = os.path.join(images, "dogs", "2.png")
    assert main(["attribute", "--root", root, "--image", query, "--top", "3", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["method"] == "square" and len(table["proponents"]) == 3
    assert {r["label"] for r in table["proponents"] + table["opponents"]} <= {0, 1}


def test_unsupported_models_are_refused(pipeline, tmp_path):
    def copy_with(name, config_file, **changes):
        """The pipeline copied to tmp_path/name with `changes` written into one of its config files."""
        folder = tmp_path / name
        shutil.copytree(pipeline, folder)
        config = json.load(open(folder / config_file))
        json.dump({**config, **changes}, open(folder / config_file, "w"))
        return str(folder)

    with pytest.raises(ValueError, match="unconditional UNet2DModel"):
        load_checkpoint(copy_with("conditional", "unet/config.json", _class_name="UNet2DConditionModel"))
    with pytest.raises(ValueError, match="epsilon"):
        load_checkpoint(copy_with("v", "scheduler/scheduler_config.json", prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="unet/config.json"):
        load_checkpoint(str(tmp_path))


def test_the_app_on_your_own_model(built, monkeypatch):
    """The app adapts: no digit classifier, RGB thumbnails, no retrain tab, a header naming the model."""

    import gradio as gr

    monkeypatch.setenv("DTRAK_ASSETS", built)
    app = load_app()
    a = app.assets()
    assert not a.digits and not a.can_retrain and a.scale(192) == 12
    assert "16x16, 3 channels" in app.header_markdown(a) and "12 images" in app.header_markdown(a)
    items, batch = app.generate_samples("range", 0, 0, 2, 3, 5)
    assert [c for _, c in items] == ["seed 0", "seed 1", "seed 2"] and items[0][0].mode == "RGB"
    q = app.sample_query(batch["seeds"][1], batch["steps"], batch["images"][1])
    image, info = app.query_view(q)
    assert image.size == (192, 192) and "classifier" not in info
    props, opps, hist, mass, summary = app.attribute(q, "square", 4)
    assert "classifier" not in summary and props.count('class="card"') == 4
    assert "class 0<br>" in props + opps or "class 1<br>" in props + opps
    assert "cats<br>class 0<br>" in props + opps or "dogs<br>class 1<br>" in props + opps  # the folder's names
    assert mass.layout.xaxis.title.text == "training class"
    with gr.Blocks() as bench:
        app.benchmarks_blocks(built)
    assert any("run for models trained by dtrak" in str(getattr(b, "value", "")) for b in bench.blocks.values())
    tabs = [b for b in app.demo.blocks.values() if isinstance(b, gr.Tab)]
    assert [t.id for t in tabs].count("counterfactual") == 1  # there, saying why no retrain is offered
    why = [str(b.value) for b in app.demo.blocks.values() if getattr(b, "elem_id", None) == "cf-not-here"]
    assert len(why) == 1 and "not offered for this model" in why[0] and "training recipe" in why[0]


def test_harnesses_that_retrain_refuse_an_external_model(built, capsys):
    for argv in (["counterfactual", "--targets", "1"], ["lds", "run", "--subsets", "2"], ["quality", "--count", "2"]):
        assert main([*argv, "--root", built]) == 2
        assert "needs a digits model trained by dtrak" in capsys.readouterr().err
    # TracInCP replays a run it knows: the digits default's or a setting's (this model has neither)
    assert main(["build-baselines", "--root", built]) == 2
    assert "its training run cannot be replayed" in capsys.readouterr().err


def test_build_on_a_device_or_manifest_only_then_featurize_there(pipeline, images, tmp_path, capsys):
    """`build --device/--precision` (checked before any work) and `build --manifest-only`, whose folder
    `featurize --device` fills: the stores equal those `build` computes itself."""
    root = str(tmp_path / "manifest-only")
    assert main(["build", "--root", root, "--model", pipeline, "--data", images, "--manifest-only", "--output-fn",
                 "square", "--K", "2", "--k", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert json.load(open(os.path.join(root, "manifest.json")))["stores"] == []
    assert f"featurize --root {root} --output-fn square --K 2 --k 16 --projector sparse-jl --device cpu" in out
    assert main(["featurize", "--root", root, "--output-fn", "square", "--K", "2", "--k", "16", "--device", "cpu"]) == 0
    direct = str(tmp_path / "direct")
    assert main(["build", "--root", direct, "--model", pipeline, "--data", images, "--output-fn", "square", "--K", "2",
                 "--k", "16", "--device", "cpu", "--precision", "bf16"]) == 0
    a, b = Attributor.load(root), Attributor.load(direct)
    np.testing.assert_array_equal(np.asarray(a.setting("square")[1].features()),
                                  np.asarray(b.setting("square")[1].features()))
    capsys.readouterr()
    assert main(["attribute", "--root", root, "--image", os.path.join(images, "cats", "1.png"), "--top", "2",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["proponents"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_build_refuses_an_unavailable_device_before_any_work(pipeline, images, tmp_path, capsys):
    root = str(tmp_path / "never")
    for options, message in ((["--device", "cuda"], "CUDA is not available"), (["--device", "tpu"], "unknown device"),
                             (["--precision", "fp16"], "precision 'fp16' is for a GPU")):
        assert main(["build", "--root", root, "--model", pipeline, "--data", images, *options]) == 2
        assert message in capsys.readouterr().err
        assert not os.path.exists(root)  # nothing written, nothing loaded
    with pytest.raises(ValueError, match="CUDA is not available"):
        build_from(root, pipeline, images, SETTINGS, device="cuda", show_bar=False)
    assert not os.path.exists(root)


def test_results_name_the_training_images(built, images, capsys):
    """The JSON rows and the CLI text carry each training image's file (relative to the data folder)
    and class name; the app's cards show the class name above its label."""
    query = os.path.join(images, "dogs", "2.png")
    assert main(["attribute", "--root", built, "--image", query, "--method", "d-trak", "--top", "3", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    for row in table["proponents"] + table["opponents"]:
        assert row["class"] == ("cats", "dogs")[row["label"]]
        assert row["path"] == f"{row['class']}/{(row['index'] % 6)}.png"  # sorted: cats/0..5, dogs/0..5
        assert list(row) == ["index", "label", "path", "class", "score"]
    assert main(["attribute", "--root", built, "--image", query, "--method", "d-trak", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "  rank  train-index  label        score  class  path" in text
    for row in table["proponents"]:
        line = next(line for line in text.splitlines() if line.split()[1:2] == [str(row["index"])])
        assert line.split()[-2:] == [row["class"], row["path"]]
    # the API: the same rows, and the dataset that names them
    attributor = Attributor.load(built)
    result = attributor.attribute(attributor.train.images[7], "square")
    assert result.table(2)["proponents"][0].keys() == {"index", "label", "path", "class", "score"}
    assert result.describe(7) == {"path": "dogs/1.png", "class": "dogs"}
    from dtrak_core import viz

    cards = viz.training_cards(attributor.train, result, [0, 7], "top", "class")
    assert "cats<br>class 0<br>" in cards and "dogs<br>class 1<br>" in cards and "(dogs/1.png)" in cards


def test_queries_outside_the_recorded_input_range_are_refused(built, tmp_path):
    from dtrak_core.attribution import methods
    from dtrak_core.folder import ModelFolder

    assert json.load(open(os.path.join(built, "manifest.json")))["input_range"] == [-1, 1]
    attributor = Attributor.load(built)
    assert attributor.input_range == (-1.0, 1.0)
    image = attributor.train.images[:1]
    attributor.scores(image, "square")  # in range
    pixels = (image + 1) * 127.5  # 0..255: what a caller who skipped the scaling passes
    for call in (lambda: attributor.scores(pixels, "square"), lambda: attributor.attribute(pixels[0], "loss"),
                 lambda: methods.scores(attributor, "pixel-cosine", pixels)):
        with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*x / 127\.5 - 1.*image file"):
            call()
    with pytest.raises(ValueError, match="non-finite"):
        attributor.scores(torch.full_like(image, float("nan")), "square")
    # a model trained on [0, 1]: its folder says so, and [-1, 1] images are refused
    other = str(tmp_path / "zero-one")
    shutil.copytree(built, other)
    ModelFolder.edit(other, input_range=[0, 1])
    zero_one = Attributor.load(other)
    zero_one.scores((image + 1) / 2, "square")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        zero_one.scores(image * 0 - 1, "square")
    # a folder that records no range (built before it was recorded): [-1, 1]
    ModelFolder.edit(other, input_range=None)
    assert "input_range" not in json.load(open(os.path.join(other, "manifest.json")))
    assert Attributor.load(other).input_range == (-1.0, 1.0)
    manifest = json.load(open(os.path.join(other, "manifest.json")))
    json.dump({**manifest, "input_range": [1, -1]}, open(os.path.join(other, "manifest.json"), "w"))
    with pytest.raises(ValueError, match="input_range"):
        Attributor.load(other)


def test_a_folder_built_for_a_zero_one_model(built, pipeline, images, tmp_path, capsys):
    """`build --input-range 0,1`: the training images are mapped to [0, 1] and the stores hold their
    features; the manifest records the range (a [-1, 1] folder's dataset entry does not name it);
    query tensors outside it are refused, image files and seeds given to `attribute` are brought into it."""
    root = str(tmp_path / "zero-one")
    assert main(["build", "--root", root, "--model", pipeline, "--data", images, "--input-range", "0,1",
                 "--output-fn", "square", "--K", "2", "--k", "16"]) == 0
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    assert manifest["input_range"] == [0, 1] and manifest["dataset"]["input_range"] == [0, 1]
    assert "input_range" not in json.load(open(os.path.join(built, "manifest.json")))["dataset"]
    default, attributor = Attributor.load(built), Attributor.load(root)
    assert attributor.input_range == (0.0, 1.0)
    assert torch.equal(attributor.train.images, (default.train.images + 1) * 0.5)
    # pictures (cards, the query, counterfactual galleries) read the pixels in the model's range
    from dtrak_core import viz
    from dtrak_core.images import to_uint8

    assert attributor.train.value_range == (0.0, 1.0) and attributor.train.subset([1, 2]).value_range == (0.0, 1.0)
    np.testing.assert_array_equal(to_uint8(attributor.train.images, attributor.input_range),
                                  to_uint8(default.train.images))
    assert to_uint8(attributor.train.images).min() >= 127  # (what the pictures showed before: washed out)
    same = SimpleNamespace(scores=np.zeros(len(default.train)), labels=default.train.labels.numpy())
    shown = viz.training_cards(attributor.train, same, [3, 7], "top", "class")
    assert shown == viz.training_cards(default.train, same, [3, 7], "top", "class")
    setting, store = attributor.setting("square")
    np.testing.assert_array_equal(np.asarray(store.features()),
                                  Featurizer(attributor.unet, attributor.scheduler, setting)(attributor.train.images))

    attributor.scores(attributor.train.images[:2], "square")
    refused = r"query images must lie in \[0, 1\], the input range this model was trained on .*got values in \[-1, "
    with pytest.raises(ValueError, match=refused + r".*from \[-1, 1\]: \(x \+ 1\) / 2.*image file"):
        attributor.scores(default.train.images[:2], "square")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], this Featurizer's input_range"):
        attributor.featurizer(setting)(default.train.images[:2])  # the folder's featurizer checks it too

    # an image file: converted as the training images were, so a training image's own file scores as it does
    capsys.readouterr()
    assert main(["attribute", "--root", root, "--image", os.path.join(images, "dogs", "2.png"), "--method", "square",
                 "--top", "3", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["proponents"] == attributor.attribute(attributor.train.images[8], "square").table(3)["proponents"]
    assert main(["attribute", "--root", root, "--seed", "0", "--method", "square", "--top", "2"]) == 0

    # the range is part of what the folder is: another one is refused, and so is a range that is no range
    with pytest.raises(ValueError, match=r"built for input range \[0.0, 1.0\], not \[-1.0, 1.0\]"):
        build_from(root, pipeline, images, (), show_bar=False)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["build", "--root", root, "--model", pipeline, "--data", images, "--input-range", "1,0"])
    assert "LOW < HIGH" in capsys.readouterr().err
    with pytest.raises(ValueError, match="low < high"):
        build_from(str(tmp_path / "never"), pipeline, images, (), show_bar=False, input_range=(1, 1))
