import json
import os

import pytest
import torch

from dtrak_core.text2image.lora import load_lora, lora_setting_of, save_lora
from dtrak_core.text2image.pipeline import TextToImagePipeline
from dtrak_core.text2image.sampling import generate
from dtrak_core.text2image.tokenizer import build_word_tokenizer, tokenize


def test_tokenizer_frames_pads_and_maps_unknown_words(tmp_path):
    tok = build_word_tokenizer(max_length=8)
    ids = tokenize(tok, ["a handwritten digit 7", "A HANDWRITTEN cat 7 7 7 7 7 7", ""])
    vocab = tok.get_vocab()
    assert ids.shape == (3, 8)
    assert ids[0].tolist() == [0, vocab["a"], vocab["handwritten"], vocab["digit"], vocab["7"], 1, 1, 1]
    assert ids[1, 3].item() == vocab["<|unk|>"] and ids[1, -1].item() == 1  # truncated, still ends with the end token
    assert ids[2].tolist() == [0] + [1] * 7
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert torch.equal(tokenize(AutoTokenizer.from_pretrained(tmp_path), ["a handwritten digit 7"]), ids[:1])
    with pytest.raises(ValueError, match="non-empty"):
        tokenize(tok, [])


def test_pipeline_round_trips_and_loads_in_diffusers(pipeline, tmp_path):
    pipeline.save(tmp_path / "p")
    loaded = TextToImagePipeline.load(str(tmp_path / "p"))
    assert loaded.weights_hash() == pipeline.weights_hash()
    assert (loaded.resolution, loaded.channels, loaded.latent_shape) == (8, 1, (4, 4, 4))
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(str(tmp_path / "p"), safety_checker=None)
    assert sd.unet.config.cross_attention_dim == 8


def test_pipeline_save_refuses_lora_adapters(lora_pipeline, tmp_path):
    with pytest.raises(ValueError, match="save the base pipeline"):
        lora_pipeline.save(str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


def test_pipeline_load_names_what_is_missing_or_damaged(pipeline, tmp_path):
    with pytest.raises(ValueError, match="lacks vae, text_encoder"):
        os.makedirs(tmp_path / "half" / "unet")
        TextToImagePipeline.load(str(tmp_path / "half"))
    pipeline.save(tmp_path / "p")
    weights = tmp_path / "p" / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="vae"):
        TextToImagePipeline.load(str(tmp_path / "p"))


def test_weights_hash_covers_every_component(pipeline, make_pipeline):
    other = make_pipeline()
    assert other.weights_hash() == pipeline.weights_hash()
    with torch.no_grad():
        next(other.text_encoder.parameters()).add_(1e-3)
    assert other.weights_hash() != pipeline.weights_hash()


def test_lora_round_trips_in_diffusers_format(pipeline, lora_pipeline, tmp_path):
    save_lora(str(tmp_path / "lora"), lora_pipeline.unet)
    assert os.listdir(tmp_path / "lora") == ["pytorch_lora_weights.safetensors"]
    unet = load_lora(pipeline.unet, str(tmp_path / "lora"))
    assert lora_setting_of(unet) == lora_setting_of(lora_pipeline.unet)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    x, t, h = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 8, 8)
    with torch.no_grad():
        assert torch.allclose(unet(x, t, h).sample, lora_pipeline.unet(x, t, h).sample, atol=1e-6)
        assert not torch.allclose(unet(x, t, h).sample, pipeline.unet(x, t, h).sample, atol=1e-4)
    # diffusers' own loader reads the same file
    from diffusers import StableDiffusionPipeline

    pipeline.save(tmp_path / "p")
    sd = StableDiffusionPipeline.from_pretrained(str(tmp_path / "p"), safety_checker=None)
    sd.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        assert torch.allclose(sd.unet(x, t, h).sample, unet(x, t, h).sample, atol=1e-6)


def test_load_lora_refuses_missing_and_damaged_files(pipeline, lora_pipeline, tmp_path):
    with pytest.raises(ValueError, match="no LoRA weights"):
        load_lora(pipeline.unet, str(tmp_path))
    save_lora(str(tmp_path / "lora"), lora_pipeline.unet)
    f = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(ValueError, match="LoRA weights"):
        load_lora(pipeline.unet, str(tmp_path / "lora"))


def test_generate_is_per_seed_deterministic(pipeline):
    a = generate(pipeline, ["a handwritten digit 3", "a handwritten digit 8"], [5, 6], steps=4)
    b = generate(pipeline, "a handwritten digit 8", [6], steps=4)
    assert a.shape == (2, 1, 8, 8) and a.abs().max() <= 1
    assert torch.allclose(a[1], b[0], atol=1e-5)
    c = generate(pipeline, "a handwritten digit 3", [5], steps=4, guidance_scale=1.0)
    assert not torch.allclose(a[0], c[0], atol=1e-4)  # guidance changes the sample
    with pytest.raises(ValueError, match="one prompt per seed"):
        generate(pipeline, ["a", "b"], [1, 2, 3], steps=2)
