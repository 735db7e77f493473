"""Your own Stable Diffusion + LoRA: a pipeline folder, LoRA weights in diffusers' format and a
captioned image folder, here all tiny and random, built inside the test."""
import json

import numpy as np
import pytest
import torch

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.text2image.attributor import TextToImageAttributor, is_text2image_folder
from dtrak_core.text2image.build import build_text2image_from
from dtrak_core.text2image.lora import save_lora

SETTINGS = (FeatureSetting("square", K=4, k=32), FeatureSetting("loss", K=4, k=32))
def test_build_and_attribute_your_own_pipeline(own):
    root = str(own / "attr")
    manifest = build_text2image_from(root, str(own / "sd"), str(own / "lora"), str(own / "images"), SETTINGS,
                                     show_bar=False)
    assert manifest["kind"] == "text2image" and manifest["num_train"] == 6 and len(manifest["stores"]) == 2
    assert is_text2image_folder(root)
    attributor = TextToImageAttributor.load(root)
    assert attributor.methods == ["loss", "square"] and attributor.image_shape == (1, 8, 8)
    train = attributor.train
    # each training image, asked with its own caption, is its own top proponent
    scores = attributor.scores(train.images, "d-trak", prompts=list(train.captions))
    assert scores.shape == (6, 6) and (scores.argmax(1) == np.arange(6)).all()
    image = attributor.generate([3], "a photo of 2", steps=3)[0]
    result = attributor.attribute(image, "trak", prompt="a photo of 2")
    assert result.scores.shape == (6,) and len(result.table(3)["proponents"]) == 3
    # each row names its image: the file (relative to the data folder) and the caption it was fine-tuned on
    for row in result.table(3)["proponents"]:
        assert row["path"] == f"{row['index']}.png" and row["caption"] == train.captions[row["index"]]
        assert "class" not in row  # a flat folder: no classes
    assert manifest["input_range"] == [-1, 1] and attributor.input_range == (-1.0, 1.0)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
        attributor.scores(train.images[:1] * 127.5 + 127.5, "d-trak", prompts="a photo of 2")
    with pytest.raises(ValueError, match="prompt"):
        attributor.scores(train.images[:1], "d-trak")
    # resumable, and refuses other data
    build_text2image_from(root, str(own / "sd"), str(own / "lora"), str(own / "images"), SETTINGS, show_bar=False)
    (own / "images" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": "a photo of 9"}) + "\n" for i in range(6)))
    with pytest.raises(ValueError, match="another dataset"):
        build_text2image_from(root, str(own / "sd"), str(own / "lora"), str(own / "images"), SETTINGS, show_bar=False)


def test_replaced_lora_is_refused_on_load(own, pipeline):
    root = str(own / "attr")
    build_text2image_from(root, str(own / "sd"), str(own / "lora"), str(own / "images"), SETTINGS[:1], show_bar=False)
    from dtrak_core.text2image.lora import LoraSetting, add_lora

    other = add_lora(pipeline.unet, LoraSetting(rank=2, alpha=2.0), seed=5)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    save_lora(str(own / "lora"), other)
    with pytest.raises(ValueError, match="checkpoint_hash"):
        TextToImageAttributor.load(root)


def test_cli_attributes_a_prompt_and_seed(own, capsys):
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.cli import main

    root = str(own / "attr")
    build_text2image_from(root, str(own / "sd"), str(own / "lora"), str(own / "images"), SETTINGS, show_bar=False)
    assert isinstance(Attributor.load(root), TextToImageAttributor)
    capsys.readouterr()
    assert main(["attribute", "--root", root, "--prompt", "a photo of 1", "--seed", "0", "--method", "d-trak",
                 "--top", "3", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["prompt"] == "a photo of 1" and table["seed"] == 0 and len(table["proponents"]) == 3
    captions = Attributor.load(root).train.captions
    assert all(r["caption"] == captions[r["index"]] and r["path"] == f"{r['index']}.png" for r in table["proponents"])
    assert main(["attribute", "--root", root, "--prompt", "a photo of 1", "--seed", "0", "--method", "d-trak",
                 "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "score  path   caption" in text
    assert all(f"{r['path']}  {r['caption']}" in text for r in table["proponents"])
    assert main(["attribute", "--root", root, "--seed", "0"]) == 2
    assert "--prompt" in capsys.readouterr().err
    att = Attributor.load(root)
    image = att.generate([0], "a photo of 1")
    for method in ("pixel-cosine", "latent-rbf", "gradient-cosine"):  # the registry's text-to-image baselines
        assert main(["attribute", "--root", root, "--prompt", "a photo of 1", "--seed", "0", "--method", method,
                     "--top", "2", "--json"]) == 0
        got = [r["index"] for r in json.loads(capsys.readouterr().out)["proponents"]]
        want = np.argsort(-att.baseline_scores(image, method, prompts=["a photo of 1"])[0], kind="stable")[:2]
        assert got == want.tolist(), method
    assert main(["attribute", "--root", root, "--prompt", "a photo of 1", "--seed", "0", "--method", "tracin"]) == 2
    assert "not a text-to-image baseline" in capsys.readouterr().err


def test_build_on_a_device_refuses_an_unavailable_one_before_any_work(own, capsys):
    from dtrak_core.cli import main

    root = own / "attr-device"
    args = ["build-text2image", "--root", str(root), "--pipeline", str(own / "sd"), "--lora", str(own / "lora"),
            "--data", str(own / "images"), "--output-fn", "square", "--K", "2", "--k", "16"]
    if not torch.cuda.is_available():
        assert main(args + ["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err and not root.exists()
    assert main(["build-text2image", "--root", str(root), "--device", "cpu:0"]) == 2  # the miniature: CPU only
    assert "--device is for your own pipeline" in capsys.readouterr().err and not root.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_smoke_build_text2image_on_cuda_matches_cpu(own):
    from dtrak_core.attribution.store import FeatureStore

    setting = (FeatureSetting("square", K=4, k=32),)
    stores = {}
    for device in ("cpu", "cuda"):
        root = str(own / f"attr-{device}")
        manifest = build_text2image_from(root, str(own / "sd"), str(own / "lora"), str(own / "images"), setting,
                                         show_bar=False, device=device)
        path = f"{root}/{manifest['stores'][0]}"
        stores[device] = np.asarray(FeatureStore.open(path).features())
    np.testing.assert_allclose(stores["cuda"], stores["cpu"], rtol=1e-3, atol=1e-4 * np.abs(stores["cpu"]).max())
