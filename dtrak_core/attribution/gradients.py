"""Per-sample gradient features of an output function, averaged over timesteps.

For a sample x: for each of K timesteps t in range(0, T, T // K), with noise eps_t drawn from a
generator seeded by t (the same eps_t for every sample), x_t = sqrt(abar_t) x + sqrt(1 - abar_t)
eps_t (the scheduler's `add_noise`); the feature is grad_theta mean_t f(eps_theta(x_t, t), eps_t, t) over all trainable
parameters, flattened in `named_parameters` order.

Two exact engines compute the same numbers (up to float rounding):

- "vmap" (any model): torch.func vmap over samples of grad of a function that runs the model on
  that sample's K noisy copies as one batch, so the K timesteps share one forward/backward and the
  mean over timesteps is formed inside autograd. Under vmap every backward op runs in a batched
  form; on a CPU the batched GroupNorm/SiLU backward and the grouped weight convolutions cost
  ~3-4x a plain backward.
- "hooks" (models built from Linear, Conv2d and GroupNorm, like our UNet): one plain batched
  forward over all B x K (sample, timestep) pairs, then `autograd.grad` with respect to each
  layer's *output* only (no weight gradients). A layer's per-sample weight gradient is then
  the contraction of its input with its output gradient over that sample's K copies (and the
  spatial positions): sum_k g_k^T a_k for a Linear layer (one `bmm`), one grouped weight-only
  convolution backward for a Conv2d, sum g * xhat for a GroupNorm. This is valid
  because in eval mode no layer mixes batch rows. The full per-sample gradient comes out directly,
  summed over timesteps, close to the cost of a plain forward+backward.

"auto" picks "hooks" when every trainable parameter belongs to a supported layer, else "vmap".
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dtrak_core.attribution.output_functions import elbo_weights, get_output_function
from dtrak_core.devices import resolve_device
from dtrak_core.shared import ModelReplicas


def timesteps_for(K: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    if K < 1 or num_train_timesteps % K:
        raise ValueError(f"K must divide {num_train_timesteps}, got {K}")
    return torch.arange(0, num_train_timesteps, num_train_timesteps // K)


def timestep_noise(timesteps: torch.Tensor, sample_shape) -> torch.Tensor:
    """(K, *sample_shape) noise, row k seeded by timesteps[k]."""
    return torch.stack([torch.randn(tuple(sample_shape), generator=torch.Generator().manual_seed(int(t)))
                        for t in timesteps])


def trainable_params(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in unet.named_parameters() if p.requires_grad}


def num_features(unet) -> int:
    return sum(p.numel() for p in trainable_params(unet).values())


ENGINES = ("auto", "hooks", "vmap")
# A small batch (one query) runs at least this many (sample, timestep) rows per pass: each pass costs
# a call per layer, and passes of a few rows spend most of their time in those calls (one query's
# K=100 timesteps in one pass instead of four takes about half the time on a CPU).
MIN_ROWS_PER_PASS = 100
# Layers whose per-sample weight gradients the "hooks" engine forms itself.
HOOK_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm)


def hooks_supported(unet) -> bool:
    """True when every trainable parameter is the weight/bias of a Linear, zero-padded Conv2d
    (numeric padding) or affine GroupNorm layer (exact types, so a subclass with another forward is refused)."""
    for module in unet.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if type(module) not in HOOK_LAYERS:
            return False
        if type(module) is nn.Conv2d and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
            return False
    return True


def _layer_grads(module, a: torch.Tensor, g: torch.Tensor, B: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients of one layer's parameters, summed over each sample's rows.

    a: the layer's input, g: the gradient of the summed objective w.r.t. its output, both with
    B * m rows, rows [b*m, (b+1)*m) belonging to sample b.
    """
    if type(module) is nn.Linear:
        a = a.reshape(B, -1, a.shape[-1])  # (B, m*, in)
        g = g.reshape(B, -1, g.shape[-1])  # (B, m*, out)
        out = {"weight": torch.bmm(g.transpose(1, 2), a)}
        if module.bias is not None:
            out["bias"] = g.sum(1)
        return out
    if type(module) is nn.Conv2d:
        # One weight-only convolution backward for all samples, each sample's channels made a group
        # of its own: oneDNN forms the weight gradient without an explicit im2col (unfold + bmm is
        # ~8x slower on a CPU), and one call beats a call per sample (1.5-2x with 2 threads).
        m = len(a) // B
        has_bias = module.bias is not None
        # (B*m, C, H, W) -> (m, B*C, H, W): sample b's channels become group b (times module.groups)
        a_g = a.reshape(B, m, *a.shape[1:]).transpose(0, 1).reshape(m, -1, *a.shape[2:])
        g_g = g.reshape(B, m, *g.shape[1:]).transpose(0, 1).reshape(m, -1, *g.shape[2:])
        w = module.weight.expand(B, *module.weight.shape).reshape(-1, *module.weight.shape[1:])
        _, weight, bias = torch.ops.aten.convolution_backward(
            g_g, a_g, w, [B * module.out_channels] if has_bias else None, module.stride, module.padding,
            module.dilation, False, [0, 0], B * module.groups, [False, True, has_bias])
        out = {"weight": weight.view(B, *module.weight.shape)}
        if has_bias:
            out["bias"] = bias.view(B, -1)
        return out
    # GroupNorm: y = xhat * gamma + beta per channel
    xhat = F.group_norm(a, module.num_groups, eps=module.eps)
    gs = g.reshape(B, -1, g.shape[1], g[0, 0].numel())  # (B, m, C, H*W)
    return {"weight": (gs * xhat.reshape(gs.shape)).sum((1, 3)), "bias": gs.sum((1, 3))}


class GradientFeaturizer:
    """Full (unprojected) per-sample gradients (B, d) of one output function over K timesteps.

    `engine`: "auto" (default), "hooks" or "vmap" (see the module docstring); all give the same
    gradients up to float rounding. `timestep_chunk` bounds how many timesteps share one pass, or
    for a batch of B < MIN_ROWS_PER_PASS / timestep_chunk samples, MIN_ROWS_PER_PASS / B (so a pass
    holds at most max(B * timestep_chunk, MIN_ROWS_PER_PASS) rows).

    Safe to call from several threads at once: both engines change the module while they run
    (forward hooks, `functional_call`'s parameter swap), so each call works on a private replica
    (`shared.ModelReplicas`) and `unet` itself is only read. The weights are those of `unet` when
    the featurizer was built.
    """

    def __init__(self, unet, scheduler, output_fn: str, K: int, timestep_chunk: int = 25, engine: str = "auto",
                 device="cpu"):
        if engine not in ENGINES:
            raise ValueError(f"unknown gradient engine {engine!r}; choose one of {list(ENGINES)}")
        if timestep_chunk < 1:
            raise ValueError(f"timestep_chunk must be positive, got {timestep_chunk}")
        if engine == "hooks" and not hooks_supported(unet):
            raise ValueError("the 'hooks' engine needs a model whose trainable parameters all sit in Linear, "
                             "zero-padded Conv2d or GroupNorm layers; use engine='vmap'")
        self.engine = ("hooks" if hooks_supported(unet) else "vmap") if engine == "auto" else engine
        # gradients are float32 on every device (the precision policy never autocasts them)
        self.device = resolve_device(device)
        if next(unet.parameters()).device != self.device:  # a copy: the caller's model stays where it is
            unet = copy.deepcopy(unet).to(self.device)
        self.unet = unet.eval()
        self.replicas = ModelReplicas(self.unet)
        self.output_fn_name = output_fn
        self.f = get_output_function(output_fn)
        self.K = K
        # add_noise only reads the scheduler (it re-binds alphas_cumprod to the sample's device, a no-op
        # once there), so featurizers on other threads can share it
        self.scheduler = scheduler
        timesteps = timesteps_for(K, scheduler.config.num_train_timesteps)
        self.weights = elbo_weights(scheduler)[timesteps].to(self.device)
        cfg = unet.config  # the noise is drawn on the CPU, so it is the same on every device
        self.noise = timestep_noise(timesteps, (cfg.in_channels, cfg.sample_size, cfg.sample_size)).to(self.device)
        self.timesteps = timesteps.to(self.device)
        self.params = trainable_params(unet)
        self.dim = sum(p.numel() for p in self.params.values())
        self.timestep_chunk = timestep_chunk

    def subset(self, timesteps: slice) -> "GradientFeaturizer":
        """This featurizer averaged over `self.timesteps[timesteps]` only (one bucket of the K
        timesteps): the same model, replicas and per-timestep noise, so a bucket's output is that
        bucket's mean gradient and the K-weighted buckets add up to the whole."""
        sub = copy.copy(self)
        sub.timesteps, sub.noise, sub.weights = self.timesteps[timesteps], self.noise[timesteps], self.weights[timesteps]
        sub.K = len(sub.timesteps)
        if sub.K == 0:
            raise ValueError(f"no timesteps in {timesteps} of a featurizer with K={self.K}")
        return sub

    def _objective(self, params, x, conditioning: dict, sl, unet):
        """Sum over timesteps `sl` (a slice of the K timesteps, or this sample's own (m,) indices
        into them) of f for one sample x (C, H, W) and its conditioning, run on `unet` (a replica)."""
        eps = self.noise[sl]
        xt = self.scheduler.add_noise(x.expand_as(eps), eps, self.timesteps[sl])  # (k, C, H, W)
        kwargs = {name: c.expand(len(xt), *c.shape) for name, c in conditioning.items()}  # the same for every t
        pred = functional_call(unet, params, (xt, self.timesteps[sl]), {**kwargs, "return_dict": False})[0]
        return self.f(pred, eps, self.weights[sl]).sum()

    def _hooks_grads(self, images: torch.Tensor, conditioning: dict, sl, unet) -> torch.Tensor:
        """Per-sample gradients (B, d) of the sum over timesteps `sl` (a slice of the K timesteps,
        or a (B, m) tensor of each sample's own indices into them), by per-layer contraction, with
        hooks on `unet` (a replica no other thread runs)."""
        B = len(images)
        if isinstance(sl, slice):
            m = len(range(self.K)[sl])
            eps = self.noise[sl].repeat(B, 1, 1, 1)  # (B*m, C, H, W), row b*m + j is (sample b, timestep j)
            t, w = self.timesteps[sl].repeat(B), self.weights[sl].repeat(B)
        else:
            m = sl.shape[1]
            rows = sl.reshape(-1)
            eps, t, w = self.noise[rows], self.timesteps[rows], self.weights[rows]
        xt = self.scheduler.add_noise(images.repeat_interleave(m, 0), eps, t)
        calls = []  # (module, input, output) for every call of a parametrised layer, in call order

        def record(module, inputs, output):
            calls.append((module, inputs[0].detach(), output))

        layers = {module for module in unet.modules()
                  if any(p.requires_grad for p in module.parameters(recurse=False))}
        handles = [module.register_forward_hook(record) for module in layers]
        try:
            with torch.enable_grad():
                kwargs = {name: c.repeat_interleave(m, 0) for name, c in conditioning.items()}
                pred = unet(xt, t, **kwargs, return_dict=False)[0]
                total = self.f(pred, eps, w).sum()
                # Gradients w.r.t. layer outputs only: autograd then skips every weight gradient.
                outs = torch.autograd.grad(total, [o for _, _, o in calls], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        names = {id(module): name for name, module in unet.named_modules()}
        grads: dict[str, torch.Tensor] = {}
        with torch.no_grad():  # the contractions are results, not part of any graph
            for (module, a, _), g in zip(calls, outs):
                if g is None:
                    continue
                for pname, value in _layer_grads(module, a, g, B).items():
                    key = f"{names[id(module)]}.{pname}" if names[id(module)] else pname
                    grads[key] = grads[key] + value if key in grads else value
            return torch.cat([grads[n].reshape(B, -1) if n in grads else torch.zeros(B, p.numel(), device=p.device)
                              for n, p in self.params.items()], dim=1)

    def __call__(self, images: torch.Tensor, timesteps: torch.Tensor | None = None,
                 **conditioning: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> per-sample gradients (B, d), float32 on the CPU. `conditioning`:
        per-sample tensors (B, ...) passed to the model by keyword, e.g. a text-to-image UNet's
        `encoder_hidden_states`.

        timesteps: (B, m) indices into the K timesteps, row b the ones sample b's gradient is
        averaged over (None: all K for every sample). The rows of one image with disjoint index
        sets give that image's gradient split by timestep range in one batched pass."""
        for name, c in conditioning.items():
            if len(c) != len(images):
                raise ValueError(f"conditioning {name!r} has {len(c)} rows for {len(images)} images")
        if timesteps is not None:
            timesteps = torch.as_tensor(timesteps, dtype=torch.long)
            if timesteps.ndim != 2 or len(timesteps) != len(images) or timesteps.shape[1] < 1:
                raise ValueError(f"timesteps must be (B, m) indices with B = {len(images)} images and m >= 1, "
                                 f"got shape {tuple(timesteps.shape)}")
            if timesteps.min() < 0 or timesteps.max() >= self.K:
                raise ValueError(f"timestep indices must lie in [0, {self.K - 1}] (this featurizer's K timesteps)")
            timesteps = timesteps.to(self.device)
        m = self.K if timesteps is None else timesteps.shape[1]
        images = images.to(self.device)
        conditioning = {name: c.to(self.device) for name, c in conditioning.items()}
        out = torch.zeros(len(images), self.dim, device=self.device)
        chunk = max(self.timestep_chunk, MIN_ROWS_PER_PASS // max(1, len(images)))
        with self.replicas.borrow() as unet:
            for start in range(0, m, chunk):
                sl = slice(start, min(start + chunk, m))
                if timesteps is not None:
                    sl = timesteps[:, sl]
                if self.engine == "hooks":
                    out += self._hooks_grads(images, conditioning, sl, unet)
                    continue
                objective = functools.partial(self._objective, unet=unet)
                per_row = None if isinstance(sl, slice) else 0
                g = vmap(grad(objective), in_dims=(None, 0, 0, per_row))(self.params, images, conditioning, sl)
                out += torch.cat([v.reshape(len(images), -1) for v in g.values()], dim=1)
        return (out / m).cpu()
