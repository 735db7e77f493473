"""K-FAC / EK-FAC influence functions for the UNet.

Following Mlodozeniec, Eschenhagen, Bae, Immer, Krueger and Turner, "Influence Functions for
Scalable Data Attribution in Diffusion Models" (ICLR 2025; public code BrunoKM/diffusion-influence,
which builds the curvature with curvlinops' K-FAC and EK-FAC operators):

    influence(x, z_i) = grad m(x)^T (G + lam I)^-1 grad L(z_i)

with m the measurement (here the diffusion loss of the query, or another output function), L the
training loss of z_i, and G the Gauss-Newton matrix (GGN) of the training loss
L = E_{z, t, eps} mean((eps_theta(x_t, t) - eps)^2), i.e. G = (2 / D) E[J^T J] (D = C H W outputs,
J the Jacobian of eps_theta in the parameters). Higher = the training sample lowers the query's
measurement more (a proponent), the same convention as TRAK.

G is approximated layer by layer (Martens & Grosse 2015; K-FAC-expand for convolutions, Eschenhagen
et al. 2023): for a Linear or Conv2d layer with inputs a (im2col patches for a convolution, plus a
constant 1 for the bias) and output gradients g of pseudo-losses whose GGN is G,

    G_layer ~ S (x) A,   A = E[a a^T] (mean over rows and positions),  S = E[sum over positions g g^T].

`fisher="mc"` backpropagates one v ~ N(0, (2/D) I) per row from the output (E[J^T v v^T J] = G);
`fisher="exact"` backpropagates all D output directions (exact GGN terms; D passes, for tests).
EK-FAC (George et al. 2018) keeps K-FAC's eigenbasis Q_S (x) Q_A and refits its eigenvalues to the
second moments of the per-row gradients in that basis, Lambda = E[(Q_S^T dW Q_A)^2], which is the
exact diagonal of the (estimated) GGN in that basis. GroupNorm parameters, which have no Kronecker
structure, get the diagonal of the same GGN estimate. Damping is exact: (Q diag(Lambda) Q^T + lam I)^-1
= Q diag(1 / (Lambda + lam)) Q^T, as the reference code's `use_exact_damping`.

Curvature rows are (training image, timestep, noise) triples: `samples` random timesteps and
noise draws per training image, as the reference code samples the training loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtrak_core.attribution.gradients import trainable_params

FISHER_TYPES = ("mc", "exact")


@dataclass
class _Layer:
    name: str
    kind: str  # "kron" (Linear / Conv2d) or "diag" (GroupNorm)
    slices: list  # [(start, stop, shape)] of its parameters in the flat vector: weight, then bias if any
    out: int = 0
    inp: int = 0  # input dimension including the bias column


def _layout(unet) -> list[_Layer]:
    """Each parametrised layer and where its parameters sit in the flat `named_parameters` vector."""
    offsets, start = {}, 0
    for name, p in trainable_params(unet).items():
        offsets[name] = (start, start + p.numel(), tuple(p.shape))
        start += p.numel()
    layers = []
    for mname, module in unet.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        full = [f"{mname}.{n}" if mname else n for n, _ in own]
        if type(module) is nn.Linear or type(module) is nn.Conv2d:
            if type(module) is nn.Conv2d and (module.groups != 1 or module.padding_mode != "zeros"
                                               or isinstance(module.padding, str)):
                raise ValueError(f"K-FAC supports zero-padded, ungrouped convolutions; {mname} is not one")
            order = [f for f, (n, _) in zip(full, own) if n == "weight"] + [f for f, (n, _) in zip(full, own) if n == "bias"]
            w = module.weight
            layers.append(_Layer(mname, "kron", [offsets[f] for f in order], w.shape[0],
                                 w[0].numel() + (module.bias is not None)))
        elif type(module) is nn.GroupNorm:
            layers.append(_Layer(mname, "diag", [offsets[f] for f in full]))
        else:
            raise ValueError(f"K-FAC has no rule for layer {mname} ({type(module).__name__}) with parameters")
    return layers


def _inputs(module, a: torch.Tensor) -> torch.Tensor:
    """A layer's input as (rows, positions, in) with a trailing 1 for the bias."""
    if type(module) is nn.Conv2d:
        a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    else:
        a = a.reshape(len(a), -1, a.shape[-1])
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
    return a


def _out_grads(g: torch.Tensor) -> torch.Tensor:
    """A layer's output gradient as (rows, positions, out)."""
    return g.flatten(2).transpose(1, 2) if g.ndim == 4 else g.reshape(len(g), -1, g.shape[-1])


def _groupnorm_grads(module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-row gradients (rows, 2C) of a GroupNorm's weight and bias."""
    xhat = F.group_norm(a, module.num_groups, eps=module.eps)
    return torch.cat([(g * xhat).flatten(2).sum(2), g.flatten(2).sum(2)], dim=1)


class EKFAC:
    """EK-FAC (or K-FAC, `correct_eigenvalues=False`) approximation of the training loss's GGN.

        ekfac = EKFAC(samples=16).fit(unet, scheduler, train_images)
        pre = ekfac.precondition(grads, lam)           # (G + lam I)^-1 grads, grads (n, d) flat
        rotated = ekfac.rotate(grads)                  # grads in the eigenbasis; / (eigenvalues_ + lam)

    Gradients are flat vectors over the trainable parameters in `named_parameters` order (as
    `GradientFeaturizer` makes them).
    """

    def __init__(self, samples: int = 16, fisher: str = "mc", correct_eigenvalues: bool = True, seed: int = 0,
                 batch_size: int = 32):
        self.samples, self.fisher, self.correct_eigenvalues = samples, fisher, correct_eigenvalues
        self.seed, self.batch_size = seed, batch_size

    # -- curvature rows ---------------------------------------------------------------------------
    def curvature_rows(self, scheduler, images: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The rows of both passes, [pass][batch] -> (x_t, t): `samples` random timesteps and noise
        draws per image, batch by batch, from `seed` (the same rows on every call)."""
        gen = torch.Generator().manual_seed(self.seed)
        passes = []
        for _ in range(2):
            batches = []
            for start in range(0, len(images), self.batch_size):
                x0 = images[start:start + self.batch_size].repeat_interleave(self.samples, 0)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
                eps = torch.randn(x0.shape, generator=gen)
                abar = scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
                batches.append((abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t))
            passes.append(batches)
        return passes

    def _passes(self, unet, batches, gen: torch.Generator):
        """Per batch of rows: (rows, {layer name: [(module, input, [output grad per direction])]}),
        one direction for `fisher="mc"` (drawn from `gen`), D for "exact"."""
        modules = dict(unet.named_modules())
        names = {id(m): n for n, m in modules.items()}
        for xt, t in batches:
            calls = []

            def record(module, inputs, output):
                calls.append((module, inputs[0].detach(), output))

            handles = [modules[layer.name].register_forward_hook(record) for layer in self.layers_]
            try:
                with torch.enable_grad():
                    pred = unet(xt, t, return_dict=False)[0]
            finally:
                for h in handles:
                    h.remove()
            D = pred[0].numel()
            if self.fisher == "mc":
                directions = [torch.randn(pred.shape, generator=gen) * (2.0 / D) ** 0.5]
            else:
                eye = torch.eye(D).view(D, *pred.shape[1:]) * (2.0 / D) ** 0.5
                directions = [eye[d].expand_as(pred) for d in range(D)]
            grads = [torch.autograd.grad(pred, [o for _, _, o in calls], grad_outputs=v,
                                         retain_graph=i < len(directions) - 1, allow_unused=True)
                     for i, v in enumerate(directions)]
            per = {}
            for c, (module, a, _) in enumerate(calls):
                gs = [g[c] for g in grads if g[c] is not None]
                if gs:
                    per.setdefault(names[id(module)], []).append((module, a, gs))
            yield len(xt), per

    # -- fit --------------------------------------------------------------------------------------
    def fit(self, unet, scheduler, images: torch.Tensor) -> "EKFAC":
        """Two passes over `images` (the training set), each with its own timestep and noise draws:
        K-FAC factors and their eigenbases, then (EK-FAC) the eigenvalues in that basis."""
        if self.fisher not in FISHER_TYPES:
            raise ValueError(f"unknown fisher type {self.fisher!r}; choose one of {list(FISHER_TYPES)}")
        if self.samples < 1 or self.batch_size < 1:
            raise ValueError(f"samples and batch_size must be positive, got {self.samples}, {self.batch_size}")
        unet = unet.eval()
        self.layers_ = _layout(unet)
        self.dim_ = sum(p.numel() for p in trainable_params(unet).values())
        rows_a, rows_b = self.curvature_rows(scheduler, images)
        gen = torch.Generator().manual_seed(self.seed + 1)  # MC directions
        kron = [l for l in self.layers_ if l.kind == "kron"]
        A = {l.name: torch.zeros(l.inp, l.inp, dtype=torch.float64) for l in kron}
        S = {l.name: torch.zeros(l.out, l.out, dtype=torch.float64) for l in kron}
        diag = {l.name: torch.zeros(l.slices[-1][1] - l.slices[0][0], dtype=torch.float64)
                for l in self.layers_ if l.kind == "diag"}
        positions, rows = {}, 0
        with torch.no_grad():
            for n, per in self._passes(unet, rows_a, gen):
                rows += n
                for name, uses in per.items():
                    if name in diag:
                        diag[name] += self._diag_moments(uses)
                        continue
                    for module, a, gs in uses:
                        ai = _inputs(module, a)
                        positions[name] = ai.shape[1]
                        ai = ai.reshape(-1, ai.shape[-1])
                        A[name] += (ai.T @ ai).double()
                        for g in gs:
                            gi = _out_grads(g).reshape(-1, g.shape[1])
                            S[name] += (gi.T @ gi).double()
        self.rows_ = rows
        self.A_, self.S_, self.QA_, self.QS_ = {}, {}, {}, {}
        lam = {}
        for l in kron:
            self.A_[l.name] = A[l.name] / (rows * positions[l.name])
            self.S_[l.name] = S[l.name] / rows
            ea, qa = torch.linalg.eigh(self.A_[l.name])
            es, qs = torch.linalg.eigh(self.S_[l.name])
            self.QA_[l.name], self.QS_[l.name] = qa.float(), qs.float()
            lam[l.name] = (es.clamp_min(0)[:, None] * ea.clamp_min(0)[None, :]).float()  # K-FAC's eigenvalues
        diag = {k: v / rows for k, v in diag.items()}
        if self.correct_eigenvalues:
            lam, diag = self._corrected(unet, rows_b, gen)
        self.eigenvalues_ = torch.zeros(1, self.dim_)
        for l in self.layers_:
            self._place(self.eigenvalues_, l, lam[l.name][None] if l.kind == "kron" else diag[l.name][None].float())
        self.eigenvalues_ = self.eigenvalues_[0]
        return self

    @staticmethod
    def _diag_moments(uses) -> torch.Tensor:
        """Sum over rows and directions of the squared per-row GroupNorm gradients."""
        directions = len(uses[0][2])
        return sum(sum(_groupnorm_grads(m, a, gs[d]) for m, a, gs in uses).double().pow(2).sum(0)
                   for d in range(directions))

    def _corrected(self, unet, batches, gen):
        """EK-FAC eigenvalues from fresh rows: the mean over rows of the squared per-row gradients in
        the eigenbasis (summed over calls and positions before squaring, over directions after)."""
        lam = {l.name: torch.zeros(l.out, l.inp, dtype=torch.float64) for l in self.layers_ if l.kind == "kron"}
        diag = {l.name: torch.zeros(l.slices[-1][1] - l.slices[0][0], dtype=torch.float64)
                for l in self.layers_ if l.kind == "diag"}
        rows = 0
        with torch.no_grad():
            for n, per in self._passes(unet, batches, gen):
                rows += n
                for name, uses in per.items():
                    if name in diag:
                        diag[name] += self._diag_moments(uses)
                        continue
                    qa, qs = self.QA_[name], self.QS_[name]
                    inputs = [_inputs(module, a) @ qa for module, a, _ in uses]
                    for d in range(len(uses[0][2])):
                        rot = sum(torch.bmm((_out_grads(gs[d]) @ qs).transpose(1, 2), ai)
                                  for (_, _, gs), ai in zip(uses, inputs))
                        lam[name] += rot.double().pow(2).sum(0)
        return {k: (v / rows).float() for k, v in lam.items()}, {k: v / rows for k, v in diag.items()}

    # -- flat vectors <-> layers --------------------------------------------------------------------
    @staticmethod
    def _matrix(v: torch.Tensor, layer: _Layer) -> torch.Tensor:
        """(n, out, in) weight-and-bias matrices of one Kronecker layer from flat vectors (n, d)."""
        parts = [v[:, a:b].reshape(len(v), layer.out, -1) for a, b, _ in layer.slices]
        return torch.cat(parts, dim=2)

    @staticmethod
    def _place(out: torch.Tensor, layer: _Layer, m: torch.Tensor) -> None:
        """Write (n, out, in) matrices (or (n, k) diagonal-layer values) back into flat vectors."""
        if layer.kind == "diag":
            out[:, layer.slices[0][0]:layer.slices[-1][1]] = m
            return
        col = 0
        for a, b, shape in layer.slices:
            width = (b - a) // layer.out
            out[:, a:b] = m[:, :, col:col + width].reshape(len(m), -1)
            col += width

    def _check(self, v) -> torch.Tensor:
        if not hasattr(self, "eigenvalues_"):
            raise ValueError("fit the EKFAC first")
        v = torch.as_tensor(np.array(v, dtype=np.float32))  # a copy: stored gradients are read-only memmaps
        if v.ndim != 2 or v.shape[1] != self.dim_:
            raise ValueError(f"expected flat gradients (n, {self.dim_}), got {tuple(v.shape)}")
        return v

    def rotate(self, v) -> torch.Tensor:
        """(n, d) -> (n, d): coordinates in the eigenbasis (v Q)."""
        v = self._check(v)
        out = torch.empty_like(v)
        for l in self.layers_:
            if l.kind == "diag":
                out[:, l.slices[0][0]:l.slices[-1][1]] = v[:, l.slices[0][0]:l.slices[-1][1]]
            else:
                self._place(out, l, self.QS_[l.name].T @ self._matrix(v, l) @ self.QA_[l.name])
        return out

    def unrotate(self, v) -> torch.Tensor:
        """Inverse of `rotate` (v Q^T)."""
        v = self._check(v)
        out = torch.empty_like(v)
        for l in self.layers_:
            if l.kind == "diag":
                out[:, l.slices[0][0]:l.slices[-1][1]] = v[:, l.slices[0][0]:l.slices[-1][1]]
            else:
                self._place(out, l, self.QS_[l.name] @ self._matrix(v, l) @ self.QA_[l.name].T)
        return out

    def precondition(self, v, lam: float) -> torch.Tensor:
        """(G_ekfac + lam I)^-1 v for flat vectors v (n, d)."""
        if not lam > 0:
            raise ValueError(f"damping must be positive, got {lam}")
        return self.unrotate(self.rotate(v) / (self.eigenvalues_ + lam))

    def scores(self, query_grads, train_grads, lam: float) -> np.ndarray:
        """Influence scores (Q, N): query_grads (Q, d) measurement gradients, train_grads (N, d)
        training-loss gradients; higher = stronger proponent."""
        pre = self.precondition(query_grads, lam)
        return (pre.double() @ torch.as_tensor(np.asarray(train_grads, dtype=np.float32)).double().T).numpy()
