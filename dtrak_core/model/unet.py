"""The diffusion model: a diffusers UNet2DModel plus a DDPMScheduler, saved with save_pretrained.

Architecture and noise schedule live in diffusers' own configs (`unet.config`, `scheduler.config`);
this module only picks the defaults and handles checkpoint folders:

    <checkpoint>/unet/{config.json, diffusion_pytorch_model.safetensors}
    <checkpoint>/scheduler/scheduler_config.json
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import torch
from diffusers import DDPMScheduler, UNet2DModel


def build_unet(sample_size: int = 8, channels: int = 1, block_out_channels=(16, 32), seed: int = 0) -> UNet2DModel:
    """A small UNet for tiny images, initialised deterministically from `seed`.

    No attention: at 8x8 it adds little, and under vmap the CPU attention kernel falls back to a
    slow path.
    """
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(block_out_channels),
        up_block_types=("UpBlock2D",) * len(block_out_channels),
        norm_num_groups=min(8, block_out_channels[0]),
        add_attention=False,
    )


def build_scheduler() -> DDPMScheduler:
    """The published noise schedule: 1000 steps, linear betas, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon")


def clone_unet(unet: UNet2DModel, seed: int = 0) -> UNet2DModel:
    """A freshly initialised UNet with the same config (for retraining from scratch)."""
    torch.manual_seed(seed)
    return UNet2DModel.from_config(unet.config)


def count_parameters(unet: torch.nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def save_checkpoint(path: str, unet: UNet2DModel, scheduler: DDPMScheduler) -> None:
    """Write atomically: into a temporary sibling folder, then rename over `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=parent)
    try:
        unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=True)
        scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-ckpt-", dir=parent)
            os.replace(path, os.path.join(old, "ckpt"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(source: str) -> str:
    """A model to load -> its local folder: a folder as is, or a Hugging Face repo id ("owner/name")
    that is already in the local cache (nothing is downloaded)."""
    if os.path.isdir(source):
        return os.path.abspath(source)
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise ValueError(f"model {source!r}: no such folder, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, local_files_only=True)
    except Exception as e:  # huggingface_hub raises several types for "not in the cache"
        raise ValueError(f"model {source!r} is not in the local Hugging Face cache and nothing is downloaded "
                         f"({type(e).__name__}); download it once elsewhere (e.g. `huggingface-cli download "
                         f"{source}`) or pass a local folder") from None


def _checkpoint_remedy(path: str) -> str:
    from dtrak_core.remedies import checkpoint_folder_remedy

    return checkpoint_folder_remedy(path)


def unet_weights(unet_dir: str) -> list[str]:
    """The weights files of a UNet folder written by `save_pretrained` (sorted; [] when none)."""
    return [os.path.join(unet_dir, f) for f in sorted(os.listdir(unet_dir))
            if f.startswith("diffusion_pytorch_model") and f.endswith((".safetensors", ".bin"))]


def weights_named(unet_dir: str) -> str:
    """'the weights file <path>' of a UNet folder, for an error about weights that load but hash to
    something else: the folder's name alone does not tell which file to restore."""
    files = unet_weights(unet_dir) if os.path.isdir(unet_dir) else []
    if len(files) == 1:
        return f"the weights file {files[0]}"
    return f"one of the weights files {', '.join(files)}" if files else f"the weights in {unet_dir}"


def load_unet(unet_dir: str, remedy: str) -> UNet2DModel:
    """The UNet2DModel `save_pretrained` wrote to unet_dir (config.json + weights), in eval mode; an
    `IntegrityError` naming the file, with `remedy`, when the weights are absent or cannot be loaded."""
    from dtrak_core.errors import IntegrityError

    weights = unet_weights(unet_dir)
    if not weights:
        raise IntegrityError(unet_dir, "has no weights file (diffusion_pytorch_model.safetensors)", remedy)
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, low_cpu_mem_usage=False)
    except Exception as e:  # diffusers and safetensors raise OSError, ValueError, RuntimeError, SafetensorError...
        while (e.__cause__ or e.__context__) is not None:  # the root cause, not diffusers' wrapper naming the path
            e = e.__cause__ or e.__context__
        reason = (str(e).strip().splitlines() or [""])[0]
        raise IntegrityError(weights[0] if len(weights) == 1 else unet_dir, f"(UNet weights) cannot be loaded "
                             f"({type(e).__name__}: {reason}): it is truncated or corrupt, or does not fit "
                             f"config.json", remedy) from None
    return unet.eval()


def load_checkpoint(path: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """A folder with unet/ and scheduler/ (a dtrak checkpoint or a saved diffusers DDPM/DDIM pipeline).

    A damaged config or weights file is an `IntegrityError` (a ValueError) naming the file."""
    from dtrak_core.errors import IntegrityError
    from dtrak_core.files import read_json

    config_path = os.path.join(path, "unet", "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} is not a diffusers checkpoint (expected unet/config.json inside)")
    kind = read_json(config_path, "UNet config", _checkpoint_remedy(path)).get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise ValueError(f"{config_path}: a {kind}; dtrak attributes unconditional UNet2DModel pipelines only")
    if not os.path.isdir(os.path.join(path, "scheduler")):
        raise ValueError(f"{path!r} has no scheduler/ folder (the noise schedule the model was trained with)")
    scheduler_config = os.path.join(path, "scheduler", "scheduler_config.json")
    read_json(scheduler_config, "noise schedule config", _checkpoint_remedy(path))
    unet = load_unet(os.path.join(path, "unet"), _checkpoint_remedy(path))
    # any DDPM-family schedule (DDPM, DDIM, PNDM configs) gives the same betas and alphas_cumprod
    try:
        scheduler = DDPMScheduler.from_pretrained(os.path.join(path, "scheduler"))
    except Exception as e:
        raise IntegrityError(scheduler_config, f"(noise schedule config) cannot be loaded ({type(e).__name__}: {e})",
                             _checkpoint_remedy(path)) from None
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError(f"{path!r}: prediction_type {scheduler.config.prediction_type!r}; the output functions "
                         f"are defined for epsilon prediction")
    unet.eval()
    return unet, scheduler


# the config files that, besides the weights, shape every answer (relative to a checkpoint folder -> what it is)
CONFIG_FILES = {"unet/config.json": "UNet config", "scheduler/scheduler_config.json": "noise schedule config"}


# what each sealed config file of a checkpoint folder is (the text-to-image pipeline's too: its
# text encoder, VAE, tokenizer and pipeline index change answers as much as the UNet's config)
CONFIG_NAMES = {**CONFIG_FILES, "text_encoder/config.json": "text encoder config", "vae/config.json": "VAE config",
                "tokenizer/tokenizer.json": "tokenizer vocabulary", "tokenizer/tokenizer_config.json": "tokenizer config",
                "tokenizer/vocab.json": "tokenizer vocabulary", "tokenizer/merges.txt": "tokenizer merges",
                "tokenizer/special_tokens_map.json": "tokenizer special tokens", "model_index.json": "pipeline index"}


def config_file_hash(path: str, rel: str, remedy: str | None = None) -> str:
    """`files.json_hash` of the content of the config file `rel` (a key of CONFIG_NAMES) of the
    checkpoint folder `path` (a file that is not JSON, such as a tokenizer's merges.txt: 16 hex
    digits of the sha256 of its bytes); a damaged file is an `IntegrityError` naming it."""
    import hashlib

    from dtrak_core.errors import IntegrityError
    from dtrak_core.files import json_hash, read_json

    file, what = os.path.join(path, *rel.split("/")), CONFIG_NAMES.get(rel, "checkpoint config")
    remedy = _checkpoint_remedy(path) if remedy is None else remedy
    if rel.endswith(".json"):
        return json_hash(read_json(file, what, remedy))
    try:
        with open(file, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except FileNotFoundError:
        raise IntegrityError(file, f"({what}) is missing", remedy) from None
    except OSError as e:
        raise IntegrityError(file, f"({what}) cannot be read ({e.strerror or e})", remedy) from None


def config_hashes(path: str) -> dict[str, str]:
    """{config file: `config_file_hash`} for CONFIG_FILES of the checkpoint folder `path`: the
    architecture and the noise schedule, which change every answer as much as the weights do (a
    model folder records them as `config_hash`, canonical JSON: indentation and key order aside)."""
    return {rel: config_file_hash(path, rel) for rel in CONFIG_FILES}


def checkpoint_hash(unet: torch.nn.Module) -> str:
    """Content hash of the weights (not of the file), so a store knows which model it belongs to."""
    h = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
