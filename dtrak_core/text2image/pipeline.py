"""A latent text-to-image diffusion pipeline: the components of Stable Diffusion, held together.

    unet          diffusers UNet2DConditionModel: predicts the noise of VAE latents given the
                  text encoder's hidden states (cross-attention)
    vae           diffusers AutoencoderKL: images <-> latents (`latent_dist.mode()` x scaling_factor)
    text_encoder  transformers CLIPTextModel: prompt tokens -> hidden states (B, L, D)
    tokenizer     any transformers tokenizer (CLIP's, or the miniature's word-level one)
    scheduler     the training noise schedule (DDPM-family: betas and alphas_cumprod)

A pipeline folder is the diffusers layout (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`, `model_index.json`), so the miniature loads in diffusers'
`StableDiffusionPipeline.from_pretrained` and a Stable Diffusion folder loads here. Images are
(B, C, H, W) in [-1, 1] at `resolution` = the UNet's sample size x the VAE's downscaling.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from dtrak_core.errors import IntegrityError
from dtrak_core.files import atomic_write_json, read_json
from dtrak_core.text2image.tokenizer import tokenize

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_INDEX = "model_index.json"


@dataclass(eq=False)
class TextToImagePipeline:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object

    def __post_init__(self):
        for module in (self.unet, self.vae, self.text_encoder):
            module.eval()
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} channels, the VAE's latents have "
                             f"{self.vae.config.latent_channels}")
        if self.unet.config.cross_attention_dim != self.text_encoder.config.hidden_size:
            raise ValueError(f"the UNet cross-attends to {self.unet.config.cross_attention_dim}-dim states, the text "
                             f"encoder gives {self.text_encoder.config.hidden_size}")
        if self.scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"prediction_type {self.scheduler.config.prediction_type!r}: the output functions are "
                             f"defined for epsilon prediction")

    # -- shapes -----------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return int(self.unet.config.in_channels), size, size

    # -- encoders ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts) -> torch.Tensor:
        """Prompts -> the text encoder's last hidden states (B, L, D), what the UNet attends to."""
        ids = tokenize(self.tokenizer, prompts)
        return self.text_encoder(ids)[0].float()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> latents (B, c, h, w): the mode of the VAE posterior times
        the VAE's scaling factor, as the published LoRA featurization does."""
        expected = (self.channels, self.resolution, self.resolution)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        out = [self.vae.encode(images[i:i + batch_size].float()).latent_dist.mode()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, C, H, W) clamped to [-1, 1]."""
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    # -- identity ---------------------------------------------------------------------------------
    def component_hashes(self) -> dict[str, str]:
        """{component: content hash} of the UNet's, the VAE's and the text encoder's weights and of
        the tokenizer's vocabulary, one by one: a model folder records them (`component_hash`), so
        that weights that no longer match `weights_hash` are traced to the file that changed."""
        out = {}
        for name in ("unet", "vae", "text_encoder"):
            h = hashlib.sha256()
            for key, tensor in sorted(getattr(self, name).state_dict().items()):
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
            out[name] = h.hexdigest()[:16]
        h = hashlib.sha256()
        for token, index in sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{index}:{token}\n".encode())
        h.update(str(self.tokenizer.model_max_length).encode())
        out["tokenizer"] = h.hexdigest()[:16]
        return out

    def weights_hash(self) -> str:
        """Content hash of every component's weights and of the vocabulary: feature stores record it,
        so a store computed with another VAE, text encoder or LoRA is refused."""
        h = hashlib.sha256()
        for name in ("unet", "vae", "text_encoder"):
            for key, tensor in sorted(getattr(self, name).state_dict().items()):
                h.update(f"{name}.{key}".encode())
                h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
        for token, index in sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{index}:{token}\n".encode())
        h.update(str(self.tokenizer.model_max_length).encode())
        return h.hexdigest()[:16]

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the diffusers folder layout atomically (a temporary sibling folder, then a rename).
        The base pipeline only: LoRA adapters are saved apart (`lora.save_lora`)."""
        if getattr(self.unet, "peft_config", None):
            raise ValueError("this pipeline's UNet carries LoRA adapters: save the base pipeline, and the LoRA "
                             "weights apart with lora.save_lora")
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-pipeline-", dir=parent)
        try:
            for name in ("unet", "vae", "text_encoder"):
                getattr(self, name).save_pretrained(os.path.join(tmp, name), safe_serialization=True)
            self.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
            self.scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
            atomic_write_json(os.path.join(tmp, MODEL_INDEX), model_index(self))
            if os.path.exists(path):
                old = tempfile.mkdtemp(prefix=".old-pipeline-", dir=parent)
                os.replace(path, os.path.join(old, "pipeline"))
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, source: str) -> "TextToImagePipeline":
        """A pipeline folder (diffusers layout) or a Hugging Face repo id already in the local cache
        (nothing is downloaded); a missing or damaged component is an error naming its file (its
        weights or config; the tokenizer's folder)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        from dtrak_core.model.unet import resolve_model

        path = resolve_model(source)
        missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
        if missing:
            raise ValueError(f"{path!r} is not a text-to-image pipeline folder: it lacks {', '.join(missing)} "
                             f"(expected the diffusers layout {', '.join(c + '/' for c in COMPONENTS)})")
        unet_config = read_json(os.path.join(path, "unet", "config.json"), "UNet config", _remedy(path))
        if unet_config.get("_class_name") != "UNet2DConditionModel":
            raise ValueError(f"{os.path.join(path, 'unet', 'config.json')}: a {unet_config.get('_class_name')}; "
                             f"a text-to-image pipeline needs a UNet2DConditionModel")
        loaders = {"unet": lambda p: UNet2DConditionModel.from_pretrained(p, low_cpu_mem_usage=False),
                   "vae": lambda p: AutoencoderKL.from_pretrained(p, low_cpu_mem_usage=False),
                   "text_encoder": CLIPTextModel.from_pretrained,
                   "tokenizer": AutoTokenizer.from_pretrained,
                   # any DDPM-family schedule config gives the same betas and alphas_cumprod
                   "scheduler": DDPMScheduler.from_pretrained}
        for name in WEIGHTS_FILES:
            _check_weights_present(path, name)
        parts = {}
        for name, load in loaders.items():
            folder = os.path.join(path, name)
            try:
                parts[name] = load(folder)
            except Exception as e:  # diffusers, transformers and safetensors raise many types
                while (e.__cause__ or e.__context__) is not None:
                    e = e.__cause__ or e.__context__
                reason = (str(e).strip().splitlines() or [""])[0]
                if name in WEIGHTS_FILES:  # its config read above: the weights file is what failed
                    raise IntegrityError(component_file(path, name), f"({name} weights) cannot be loaded "
                                         f"({type(e).__name__}: {reason}): it is truncated or corrupt, or does not "
                                         f"fit {os.path.join(folder, 'config.json')}", _remedy(path)) from None
                raise IntegrityError(folder, f"({name}) cannot be loaded ({type(e).__name__}: {reason})",
                                     _remedy(path)) from None
        for name in ("unet", "vae", "text_encoder"):
            parts[name] = parts[name].float().eval()
        return cls(**parts)


# the files of a pipeline folder whose content `TextToImagePipeline.load` reads besides the weights:
# sealed in a model folder's manifest (`config_hash`, see `folder.ModelFolder.check_configs`)
CONFIG_CANDIDATES = ("unet/config.json", "vae/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json",
                     "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
                     "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", MODEL_INDEX)


def config_hashes(path: str) -> dict[str, str]:
    """{file: `unet.config_file_hash`} for the configs, tokenizer files and pipeline index present in
    the pipeline folder `path` (the text-to-image folder's `config_hash`)."""
    from dtrak_core.model.unet import config_file_hash

    return {rel: config_file_hash(path, rel, _remedy(path)) for rel in CONFIG_CANDIDATES
            if os.path.isfile(os.path.join(path, *rel.split("/")))}


# the weights files a component's loader looks for, the first preferred (diffusers' UNet and VAE,
# transformers' text encoder); each may also be sharded behind "<name>.index.json"
WEIGHTS_FILES = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                 "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
                 "text_encoder": ("model.safetensors", "pytorch_model.bin")}


def _check_weights_present(path: str, component: str) -> None:
    """The component's config is readable and a weights file is there; else an `IntegrityError`
    naming the file: the loaders' own errors name the folder, or a fallback file name (a missing
    safetensors file is reported as a missing .bin)."""
    folder = os.path.join(path, component)
    read_json(os.path.join(folder, "config.json"), f"{component} config", _remedy(path))
    names = WEIGHTS_FILES[component]
    if not any(os.path.isfile(os.path.join(folder, n + suffix)) for n in names for suffix in ("", ".index.json")):
        raise IntegrityError(os.path.join(folder, names[0]), f"({component} weights) is missing (the folder has no "
                             f"{' or '.join(names)})", _remedy(path))


def component_file(path: str, component: str) -> str:
    """The file of the pipeline folder `path` that holds `component`'s weights (the tokenizer: its
    vocabulary), for an error that names it; the component's folder when there is none."""
    folder = os.path.join(path, component)
    if component == "tokenizer":
        names = [n for n in ("tokenizer.json", "vocab.json", "vocab.txt") if os.path.isfile(os.path.join(folder, n))]
    else:
        names = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
                       if n.endswith((".safetensors", ".bin")))
    return os.path.join(folder, names[0]) if len(names) == 1 else folder


def _remedy(path: str) -> str:
    """How to replace the pipeline folder `path` when a file of it is damaged: a text-to-image model
    folder's own pipeline (<root>/pipeline) by `remedies.checkpoint_remedy` (with the folder's --root),
    any other by restoring it."""
    from dtrak_core.remedies import MANIFEST, checkpoint_remedy

    root = os.path.dirname(os.path.normpath(path))
    if os.path.basename(os.path.normpath(path)) == "pipeline" and os.path.isfile(os.path.join(root, MANIFEST)):
        return checkpoint_remedy(root)
    return f"restore the pipeline folder {path} (your own model: save the pipeline again)"


def model_index(pipeline: TextToImagePipeline) -> dict:
    """diffusers' model_index.json for a StableDiffusionPipeline without safety checker."""
    import diffusers

    def entry(obj):
        return [type(obj).__module__.split(".")[0], type(obj).__name__]

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            **{name: entry(getattr(pipeline, name)) for name in COMPONENTS},
            "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False}


# -- tiny components, built locally and deterministically --------------------------------------------
def build_latent_scheduler():
    """The default's noise schedule (1000 steps, linear betas, epsilon prediction) without clipping
    the predicted sample to [-1, 1] when sampling: latents are not bounded like pixels (Stable
    Diffusion's schedulers set clip_sample False too; clipping them ruins the samples)."""
    from diffusers import DDPMScheduler

    # set in the constructor: a value registered later counts as a default, which from_config drops
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon", clip_sample=False)


def build_vae(channels: int = 1, sample_size: int = 8, block_out_channels=(16, 32), latent_channels: int = 4,
              seed: int = 0):
    """An AutoencoderKL that halves the resolution once per extra block (8x8 -> 4x4 for two)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                         layers_per_block=1, latent_channels=latent_channels, sample_size=sample_size,
                         norm_num_groups=min(8, block_out_channels[0]), mid_block_add_attention=False)


def build_text_encoder(vocab_size: int, max_length: int = 8, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                       seed: int = 0):
    """A small CLIPTextModel (CLIP's architecture: causal self-attention over token + position
    embeddings) for a tokenizer with `vocab_size` tokens, start/end tokens ids 0/1."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            projection_dim=hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config)


def build_conditional_unet(sample_size: int = 4, latent_channels: int = 4, block_out_channels=(32, 64),
                           cross_attention_dim: int = 32, attention_head_dim: int = 8, seed: int = 0):
    """A UNet2DConditionModel with cross-attention at every level (and in the mid block)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DConditionModel(sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
                                layers_per_block=1, block_out_channels=tuple(block_out_channels),
                                down_block_types=("CrossAttnDownBlock2D",) * n,
                                up_block_types=("CrossAttnUpBlock2D",) * n,
                                cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
                                norm_num_groups=min(8, block_out_channels[0]))
