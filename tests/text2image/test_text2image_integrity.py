"""A text-to-image model folder's identity covers what changes its answers: each component's weights,
the LoRA, the configs, the tokenizer and the manifest's guidance_scale. A damaged or edited file is
named (not the LoRA, as it used to be, whatever had changed) with the fix that fixes it, through the
loader, the command line and the app. Each test damages a copy of the committed miniature
(assets/text2image without its LDS run); the committed files are never touched."""
import html
import json
import os
import shutil

import pytest

from dtrak_core import cli
from dtrak_core.errors import IntegrityError, SealMismatch
from dtrak_core.text2image import TextToImageAttributor
from dtrak_core.text2image.build import MINIATURE_ROOT, seal_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MINIATURE = os.path.join(ROOT, MINIATURE_ROOT)
UNET = os.path.join("pipeline", "unet", "diffusion_pytorch_model.safetensors")
VAE = os.path.join("pipeline", "vae", "diffusion_pytorch_model.safetensors")
TEXT_ENCODER = os.path.join("pipeline", "text_encoder", "model.safetensors")
TOKENIZER = os.path.join("pipeline", "tokenizer", "tokenizer.json")
TEXT_CONFIG = os.path.join("pipeline", "text_encoder", "config.json")
LORA = os.path.join("lora", "pytorch_lora_weights.safetensors")

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(MINIATURE, "manifest.json")),
                                reason="assets/text2image not built")


def _copy(source, dest) -> str:
    return shutil.copytree(source, str(dest), ignore=shutil.ignore_patterns("lds"))


@pytest.fixture(scope="module")
def sealed_miniature(tmp_path_factory):
    """A copy of the miniature with every seal recorded (`seal_folder`, what `build-text2image` now writes)."""
    root = _copy(MINIATURE, tmp_path_factory.mktemp("t2i") / "sealed")
    seal_folder(root)
    return root


@pytest.fixture
def sealed(sealed_miniature, tmp_path):
    return _copy(sealed_miniature, tmp_path / "sealed")


@pytest.fixture
def unsealed(tmp_path):
    """A copy as folders built before the seals were: base_hash and checkpoint_hash only (the seals
    `seal_folder` records taken out of the manifest)."""
    root = _copy(MINIATURE, tmp_path / "unsealed")
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    for key in ("component_hash", "config_hash", "settings_hash"):
        manifest.pop(key, None)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
    return root


def _flip(path, offset=-200):
    """Flip one bit inside the tensor data (a safetensors file still loads: only its hash tells)."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(offset, os.SEEK_END)
        f.write(bytes([byte ^ 0x01]))


def _swap_token_ids(path, a="5", b="7"):
    with open(path) as f:
        tokenizer = json.load(f)
    vocab = tokenizer["model"]["vocab"]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    with open(path, "w") as f:
        json.dump(tokenizer, f)


def _edit_json(path, **changes):
    with open(path) as f:
        content = json.load(f)
    content.update(changes)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)


def test_the_seal_covers_every_config_component_and_the_guidance(sealed):
    manifest = json.load(open(os.path.join(sealed, "manifest.json")))
    assert {"text_encoder/config.json", "tokenizer/tokenizer.json", "unet/config.json", "vae/config.json",
            "scheduler/scheduler_config.json", "model_index.json"} <= set(manifest["config_hash"])
    assert set(manifest["component_hash"]) == {"unet", "vae", "text_encoder", "tokenizer", "lora"}
    assert "guidance_scale" in manifest["settings_hash"]
    attributor = TextToImageAttributor.load(sealed)
    assert attributor.guidance_scale == manifest["guidance_scale"] and attributor.methods == ["loss", "square"]


@pytest.mark.parametrize("rel, damage, what", [
    (UNET, _flip, "UNet weights"),
    (VAE, _flip, "VAE weights"),
    (TEXT_ENCODER, _flip, "text encoder weights"),
    (LORA, _flip, "LoRA weights"),
    (TOKENIZER, _swap_token_ids, "tokenizer vocabulary"),
    (TEXT_CONFIG, lambda p: _edit_json(p, layer_norm_eps=0.1), "text encoder config"),
    (os.path.join("pipeline", "vae", "config.json"), lambda p: _edit_json(p, scaling_factor=0.5), "VAE config"),
])
def test_a_damaged_or_edited_file_is_named_with_its_fix(sealed, capsys, rel, damage, what):
    """The reported defect: a bit flip in pipeline/unet/*.safetensors or swapped tokenizer ids was
    reported as "assets/text2image/lora ... hash to ..." with a fix that did not fix it."""
    path = os.path.join(sealed, rel)
    damage(path)
    with pytest.raises(IntegrityError, match=f"^{path} \\({what}\\) hash.*build-text2image --root {sealed}") as e:
        TextToImageAttributor.load(sealed)
    assert e.value.path == path
    if rel != LORA:
        assert "lora" not in str(e.value).split(";")[0]
    code = cli.main(["attribute", "--root", sealed, "--prompt", "a handwritten digit 7", "--seed", "0"])
    assert code == 2 and f"error: {path} ({what})" in capsys.readouterr().err


@pytest.mark.parametrize("rel, damage", [(UNET, _flip), (TEXT_ENCODER, _flip), (TOKENIZER, _swap_token_ids)])
def test_a_folder_sealed_before_components_were_recorded_names_its_pipeline_not_its_lora(unsealed, rel, damage):
    """The committed miniature records base_hash (the pipeline without its LoRA): a change in the
    pipeline is named as the pipeline folder's, with the fix that rebuilds it."""
    damage(os.path.join(unsealed, rel))
    pipeline = os.path.join(unsealed, "pipeline")
    with pytest.raises(IntegrityError, match=f"^{pipeline} \\(base pipeline: .*records base_hash .*delete {pipeline} "
                                             f"and run `python -m dtrak_core build-text2image"):
        TextToImageAttributor.load(unsealed)


def test_a_changed_lora_of_an_older_folder_is_named_as_the_lora(unsealed):
    lora = os.path.join(unsealed, LORA)
    _flip(lora)
    with pytest.raises(IntegrityError, match=f"^{lora} \\(LoRA weights\\) .*records checkpoint_hash"):
        TextToImageAttributor.load(unsealed)


def test_an_edited_guidance_scale_is_refused_naming_the_manifest(sealed):
    manifest = os.path.join(sealed, "manifest.json")
    _edit_json(manifest, guidance_scale=9.0)
    with pytest.raises(SealMismatch, match=f"^{manifest} \\(model manifest\\) entry 'guidance_scale' hashes to .*"
                                           f"classifier-free guidance.*build-text2image --root {sealed}"):
        TextToImageAttributor.load(sealed)


def test_the_build_the_guidance_scale_refusal_names_restores_it(sealed):
    """The fix that message names works: the build (the miniature's recipe, without its minutes of
    sample-quality measurement) accepts the folder whose guidance_scale was edited by hand, sets the
    value it builds with and reseals it; the pipeline, LoRA and stores are reused as they are."""
    import torch

    from dtrak_core.text2image.build import build_miniature

    manifest = os.path.join(sealed, "manifest.json")
    with open(manifest) as f:
        built = json.load(f)["guidance_scale"]
    _edit_json(manifest, guidance_scale=9.0)
    with pytest.raises(SealMismatch, match=f"`python -m dtrak_core build-text2image --root {sealed}`"):
        TextToImageAttributor.load(sealed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_miniature(sealed, show_bar=False, quality=False)
    finally:
        torch.set_num_threads(threads)
    assert TextToImageAttributor.load(sealed).guidance_scale == built


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9])
def test_a_truncated_manifest_suggests_build_text2image(unsealed, capsys, keep):
    """The reported defect: a truncated text-to-image manifest suggested `build-default`."""
    manifest = os.path.join(unsealed, "manifest.json")
    with open(manifest, "r+b") as f:
        f.truncate(int(os.path.getsize(manifest) * keep))
    with pytest.raises(IntegrityError, match=f"^{manifest} \\(model manifest\\) .*build-text2image") as e:
        TextToImageAttributor.load(unsealed)
    assert "build-default" not in str(e.value)
    assert cli.main(["attribute", "--root", unsealed, "--prompt", "a handwritten digit 7", "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert "build-text2image" in err and "build-default" not in err


def test_the_app_names_the_file_and_the_fix(app, sealed, unsealed, monkeypatch):
    """The app's error page for a text-to-image folder: the damaged file and `build-text2image`."""
    def page(root):
        monkeypatch.setattr(app.module_of("ASSETS"), "ASSETS", root)
        return "\n".join(str(b.value) for b in app.build_demo([root]).blocks.values() if type(b).__name__ == "Markdown")

    unet = os.path.join(sealed, UNET)
    _flip(unet)
    shown = page(sealed)
    assert "The model assets could not be loaded" in shown and html.escape(unet) in shown
    assert "build-text2image" in shown and "build-default" not in shown
    manifest = os.path.join(unsealed, "manifest.json")
    with open(manifest, "r+b") as f:
        f.truncate(100)
    shown = page(unsealed)
    assert html.escape(manifest) in shown and "build-text2image" in shown and "build-default" not in shown


def test_your_own_pipeline_is_sealed_and_its_changed_file_named(own):
    """`build-text2image --pipeline SD --lora L --data D` records the same seals: a bit flip in your
    pipeline's UNet weights names that file, in your pipeline folder."""
    from dtrak_core.attribution.features import FeatureSetting
    from dtrak_core.text2image.build import build_text2image_from

    root = str(own / "attr")
    manifest = build_text2image_from(root, str(own / "sd"), str(own / "lora"), str(own / "images"),
                                     (FeatureSetting("square", K=2, k=16),), show_bar=False)
    assert "text_encoder/config.json" in manifest["config_hash"] and "guidance_scale" in manifest["settings_hash"]
    assert set(manifest["component_hash"]) == {"unet", "vae", "text_encoder", "tokenizer", "lora"}
    TextToImageAttributor.load(root)
    unet = os.path.join(str(own / "sd"), "unet", "diffusion_pytorch_model.safetensors")
    _flip(unet)
    with pytest.raises(IntegrityError, match=f"^{unet} \\(UNet weights\\) hash to .*build a new folder"):
        TextToImageAttributor.load(root)
