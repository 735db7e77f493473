"""Output functions f(x; theta) whose parameter gradients become attribution features.

Each takes the predicted noise `eps_pred` (K, C, H, W) at K timesteps, the true noise `eps`
(K, C, H, W) and the ELBO weights w_t (K,), and returns one value per timestep (K,). The feature
is the gradient of their mean over timesteps.

| name       | f per timestep                          | used by                |
|------------|-----------------------------------------|------------------------|
| loss       | mean((eps_pred - eps)^2)  (L_Simple)     | TRAK                   |
| square     | mean(eps_pred^2)                        | D-TRAK (default)       |
| avg        | mean(eps_pred)                          | D-TRAK variant         |
| l1-norm    | ||eps_pred||_1                          | D-TRAK variant         |
| l2-norm    | ||eps_pred||_2 (not squared)            | D-TRAK variant         |
| linf-norm  | ||eps_pred||_inf                        | D-TRAK variant         |
| elbo       | w_t * mean((eps_pred - eps)^2)          | ablation               |
| eta=<e>    | e*L_Square + (1-e)*(L_Simple - L_Square) | poster's interpolation |

`eta=<e>` has gradient 2 (e*eps_pred - (1-e)*eps)^T d eps_pred: e=1 is `square`, e=0.5 is half
of `loss`'s gradient.
"""
from __future__ import annotations

import torch

from dtrak_core.attribution import methods
from dtrak_core.errors import UnknownMethod


def _flat(x):
    return x.flatten(1)


OUTPUT_FUNCTIONS = {
    "loss": lambda p, e, w: (_flat(p) - _flat(e)).pow(2).mean(1),
    "square": lambda p, e, w: _flat(p).pow(2).mean(1),
    "avg": lambda p, e, w: _flat(p).mean(1),
    "l1-norm": lambda p, e, w: _flat(p).abs().sum(1),
    "l2-norm": lambda p, e, w: _flat(p).pow(2).sum(1).sqrt(),
    "linf-norm": lambda p, e, w: _flat(p).abs().amax(1),
    "elbo": lambda p, e, w: w * (_flat(p) - _flat(e)).pow(2).mean(1),
}


def canonical_name(name: str) -> str:
    """'d-trak' -> 'square', 'trak' -> 'loss', 'eta=0.50' -> 'eta=0.5' (names and aliases of the
    method registry's TRAK family); `UnknownMethod` for any name that is not an output function."""
    method = methods.find(name)
    if method is None or method.family != "trak":
        other = "" if method is None else f" ({method.name!r} is a {method.family} method, scored by `methods.scores`)"
        raise UnknownMethod(f"unknown output function {name!r}{other}; choose one of {methods.spellings('trak')}")
    return method.name


def get_output_function(name: str):
    name = canonical_name(name)
    if name.startswith("eta="):
        eta = float(name[4:])

        def interpolated(p, e, w):
            p, e = _flat(p), _flat(e)
            square = p.pow(2).mean(1)
            return eta * square + (1 - eta) * ((p - e).pow(2).mean(1) - square)

        return interpolated
    return OUTPUT_FUNCTIONS[name]


def elbo_weights(scheduler) -> torch.Tensor:
    """w_t = beta_t / (2 alpha_t (1 - alphabar_t)) for every training timestep (T,)."""
    betas = scheduler.betas.double()
    alphas = 1 - betas
    alphabar = torch.cumprod(alphas, 0)
    return (betas / (2 * alphas * (1 - alphabar))).float()
