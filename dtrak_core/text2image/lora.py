"""LoRA adapters on the UNet's attention projections, through peft, as diffusers does.

Published setting (Stable Diffusion on ArtBench): rank 128 on every attention's q/k/v/out
projections; the base UNet, the VAE and the text encoder frozen; only the LoRA weights are
trained and featurized. peft's LoRA layers keep their trainable weights in plain `nn.Linear`
modules (`lora_A`, `lora_B`), so the exact per-sample gradient engines apply unchanged.

Files are diffusers' LoRA format (`pytorch_lora_weights.safetensors`, keys `unet.<module>.lora.down/up`,
the peft config in the safetensors metadata), what `StableDiffusionPipeline.save_lora_weights`
writes and `load_lora_weights` reads.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

import torch

from dtrak_core.errors import IntegrityError

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # every attention's q/k/v/out projections, as published
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTER = "default"


@dataclass(frozen=True)
class LoraSetting:
    rank: int = 4  # published: 128 for Stable Diffusion's 320-1280-wide attention; the miniature's is 16-32 wide
    alpha: float = 4.0  # LoRA output scale alpha / rank (diffusers' script: alpha = rank)
    targets: tuple = LORA_TARGETS  # module names that get an adapter

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1 or not self.alpha > 0 or not self.targets:
            raise ValueError(f"LoRA needs rank >= 1, alpha > 0 and target modules, got {self}")

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def add_lora(unet, setting: LoraSetting = LoraSetting(), seed: int = 0):
    """A copy of `unet` with fresh LoRA adapters (peft's Gaussian init: A random from `seed`, B = 0,
    so the adapted model starts equal to the base); the base weights frozen, the adapters trainable."""
    from peft import LoraConfig

    if getattr(unet, "peft_config", None):
        raise ValueError("the UNet already has a LoRA adapter; start from the base UNet")
    unet = copy.deepcopy(unet)
    unet.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=setting.rank, lora_alpha=setting.alpha, init_lora_weights="gaussian",
                                target_modules=list(setting.targets)))
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)
    if not any(p.requires_grad for p in unet.parameters()):
        raise ValueError(f"no module of the UNet matches the LoRA targets {list(setting.targets)}")
    return unet


def lora_setting_of(unet) -> LoraSetting:
    config = unet.peft_config[ADAPTER]
    return LoraSetting(rank=int(config.r), alpha=float(config.lora_alpha), targets=tuple(sorted(config.target_modules)))


def lora_parameters(unet) -> dict[str, torch.Tensor]:
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def lora_hash(unet) -> str:
    """Content hash of the LoRA adapters' weights of `unet` (a model folder records it in
    `component_hash`, to tell a changed LoRA from a changed base pipeline)."""
    import hashlib

    h = hashlib.sha256()
    for key, tensor in sorted(lora_state_dict(unet).items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapters' weights in diffusers' key format (`<module>.lora.down.weight`, ...)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in
            convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER)).items()}


def save_lora(path: str, unet) -> None:
    """Write `path`/pytorch_lora_weights.safetensors atomically (a temporary folder, then a rename)."""
    from diffusers import StableDiffusionPipeline

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-lora-", dir=parent)
    try:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora_state_dict(unet),
                                                  unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
                                                  safe_serialization=True)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_lora(unet, path: str):
    """A copy of the base `unet` with the LoRA weights of `path` (a folder or .safetensors file in
    diffusers' or peft's format), adapters trainable and base frozen, in eval mode."""
    from diffusers import StableDiffusionPipeline

    from dtrak_core.remedies import lora_remedy

    folder, weight_name = (os.path.dirname(path), os.path.basename(path)) if os.path.isfile(path) else (path, WEIGHTS_NAME)
    file = os.path.join(folder, weight_name)
    remedy = lora_remedy(file)
    if not os.path.isfile(file):
        raise IntegrityError(file, f"(LoRA weights) is missing: no LoRA weights at this path (expected {WEIGHTS_NAME}, "
                             f"as diffusers' save_lora_weights writes)", remedy)
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(folder, weight_name=weight_name,
                                                                          return_lora_metadata=True)
    except Exception as e:
        raise IntegrityError(file, f"(LoRA weights) cannot be read ({type(e).__name__}: {e})", remedy) from None
    prefixed = any(k.startswith("unet.") for k in state)
    if any(k.startswith(("text_encoder.", "te_")) for k in state):
        raise ValueError(f"{file}: holds text-encoder LoRA weights; dtrak attributes UNet LoRA adapters only")
    if getattr(unet, "peft_config", None):
        raise ValueError("the UNet already has a LoRA adapter; load LoRA weights into the base UNet")
    unet = copy.deepcopy(unet)
    unet.requires_grad_(False)
    try:
        unet.load_lora_adapter(state, prefix="unet" if prefixed else None, network_alphas=alphas, metadata=metadata,
                               adapter_name=ADAPTER)
    except Exception as e:
        raise IntegrityError(file, f"(LoRA weights) do not fit this UNet ({type(e).__name__}: {e})", remedy) from None
    if not getattr(unet, "peft_config", None):
        raise IntegrityError(file, "(LoRA weights) match no module of this UNet", remedy)
    for name, p in unet.named_parameters():
        p.requires_grad_(".lora_" in name)
    return unet.eval()
