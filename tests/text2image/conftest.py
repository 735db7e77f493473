"""Tiny randomly initialised text-to-image components, built inside the tests (nothing downloaded)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dtrak_core.text2image.lora import LoraSetting, add_lora, save_lora
from dtrak_core.text2image.pipeline import (
    TextToImagePipeline,
    build_conditional_unet,
    build_latent_scheduler,
    build_text_encoder,
    build_vae,
)
from dtrak_core.text2image.tokenizer import build_word_tokenizer


def tiny_pipeline(seed: int = 0, channels: int = 1) -> TextToImagePipeline:
    tokenizer = build_word_tokenizer()
    return TextToImagePipeline(
        unet=build_conditional_unet(sample_size=4, latent_channels=4, block_out_channels=(8, 16),
                                    cross_attention_dim=8, attention_head_dim=4, seed=seed),
        vae=build_vae(channels=channels, sample_size=8, block_out_channels=(4, 8), latent_channels=4, seed=seed),
        text_encoder=build_text_encoder(len(tokenizer.get_vocab()), tokenizer.model_max_length, hidden_size=8,
                                        layers=1, heads=2, seed=seed),
        tokenizer=tokenizer, scheduler=build_latent_scheduler())


def with_random_lora(pipeline: TextToImagePipeline, seed: int = 0) -> TextToImagePipeline:
    """The pipeline with LoRA adapters whose B is random too (fresh adapters start at B = 0, where
    every gradient of A vanishes), so gradient tests see non-trivial values."""
    from dataclasses import replace

    unet = add_lora(pipeline.unet, LoraSetting(rank=2, alpha=2.0), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return replace(pipeline, unet=unet.eval())


@pytest.fixture
def pipeline():
    return tiny_pipeline()


@pytest.fixture
def lora_pipeline():
    return with_random_lora(tiny_pipeline())


@pytest.fixture
def make_pipeline():
    """tiny_pipeline itself, for tests that need several (other seeds or channels)."""
    return tiny_pipeline


CAPTIONS = ["a photo of 1", "a photo of 2", "a drawing of 3", "a drawing of 4", "the picture 5", "the picture 6"]


@pytest.fixture
def own(tmp_path, pipeline, lora_pipeline):
    """Your own model, in small: tmp_path/sd (base pipeline), tmp_path/lora, tmp_path/images (captioned)."""
    pipeline.save(str(tmp_path / "sd"))  # the base; lora_pipeline is the same base with adapters
    save_lora(str(tmp_path / "lora"), lora_pipeline.unet)
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(CAPTIONS):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")
    return tmp_path
