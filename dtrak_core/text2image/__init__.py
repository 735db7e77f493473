"""Text-to-image attribution: latent diffusion with LoRA, the paper's Stable Diffusion + ArtBench setting.

    pipeline     TextToImagePipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, tokenizer,
                 scheduler; the diffusers folder layout) and tiny component builders
    tokenizer    a word-level tokenizer built locally (transformers format)
    lora         LoRA adapters through peft on the attention projections; diffusers' LoRA file format
    data         captioned image sets (the digits with "a handwritten digit <d>", folders with captions)
    training     the VAE, the base model (UNet + text encoder), LoRA fine-tuning
    sampling     DDIM from a prompt and a seed, classifier-free guidance
    features     LoRA-gradient features of (VAE latent, text hidden states) pairs
    attributor   TextToImageAttributor: a text-to-image model folder queried by (image, prompt)
    build        the embedded miniature (assets/text2image) and folders for your own SD + LoRA
    lds          LDS with LoRA retrains on half subsets
    cli          the build-text2image, generate-text2image and lds-text2image commands of `python -m dtrak_core`

    from dtrak_core.text2image import TextToImageAttributor
    attributor = TextToImageAttributor.load("assets/text2image")
    image = attributor.generate([0], "a handwritten digit 7")[0]
    attributor.attribute(image, "d-trak", prompt="a handwritten digit 7").proponents(5)

The names below are imported on first use (PEP 562), so the command line can register the
text-to-image commands (`cli`) without loading torch or transformers.
"""
import importlib
import os

MINIATURE_ROOT = os.path.join("assets", "text2image")  # where the embedded miniature lives (`build-text2image`)

_EXPORTS = {
    "TextToImageAttributor": "dtrak_core.text2image.attributor",
    "TextToImagePipeline": "dtrak_core.text2image.pipeline",
}

__all__ = ["TextToImageAttributor", "TextToImagePipeline"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
