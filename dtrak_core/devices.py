"""Where the computation runs (a device) and in which precision (a policy).

    device = resolve_device("cuda")                  # "cpu" (the default everywhere), "cuda", "cuda:1", "mps"
    with autocast(device, "bf16"):                   # "fp32" (the default), "bf16", "fp16"
        eps = unet(x, t, return_dict=False)[0]

The policy: autocast (bf16 or fp16) only where it is safe, the model's forward passes in sampling
and training (training with fp16 scales the loss); features, gradients for attribution, kernels and
scores stay float32 (or float64), whatever the policy, because attribution ranks small differences.
Random numbers are always drawn on the CPU from the seed's generator and then moved, so a seed means
the same noise on every device.
"""
from __future__ import annotations

import contextlib

import torch

DEVICES = ("cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device="cpu") -> torch.device:
    """A torch.device for "cpu", "cuda", "cuda:<i>", "mps" (or a torch.device); a ValueError saying
    what to use instead when it is unknown or not available on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)} (or cuda:<index>)") from None
    if dev.type not in DEVICES:
        raise ValueError(f"unsupported device {device!r}; use one of {', '.join(DEVICES)}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (this torch build or machine has no "
                             f"GPU); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r}: Apple's MPS is not available here; use --device cpu")
    return dev


def check_precision(precision: str, device="cpu") -> str:
    """`precision` if it is a known policy usable on `device` (fp16 autocast is for GPUs: on a CPU use
    bf16), else a ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and resolve_device(device).type == "cpu":
        raise ValueError("precision 'fp16' is for a GPU (cuda or mps); on the CPU use 'bf16' or 'fp32'")
    return precision


def autocast(device="cpu", precision: str = "fp32"):
    """The autocast context of the policy on `device` (a no-op for fp32)."""
    dev = resolve_device(device)
    if check_precision(precision, dev) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=_DTYPES[precision])


def describe(device="cpu") -> str:
    """A one-line name of the device, for logs and benchmark headers."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)
