"""Diffusion Attribution Score (DAS).

Lin, Tao, Dong and Xu, "Diffusion Attribution Score: Evaluating Training Data Influence in
Diffusion Models" (ICLR 2025; public code Jinxu-Lin/DAS, built on the D-TRAK code).

DAS scores a training sample z_i by how much removing it changes the model's *predicted noise* at
a query x, rather than a loss (the KL between the two models' Gaussian reverse steps is
proportional to it):

    DAS(x, z_i) = E_t || eps_theta(x_t, t) - eps_theta\\i(x_t, t) ||^2.

Linearising eps_theta in the parameters and taking one Newton step on the linearised training
objective (least squares on the noise) gives theta\\i - theta ~ -(J^T J + lam I)^-1 J_i^T r_i, with
J the stacked Jacobians of the training outputs and r_i = eps - eps_theta(z_i) the residual, so

    DAS(x, z_i) ~ E_t || J_t(x) (J^T J + lam I)^-1 J(z_i)^T r(z_i) ||^2.

The published speed-ups, as the public code applies them: the output is compressed to one number
(the mean of the predicted noise, so J_t(x) becomes the gradient of `avg`), the Jacobian is averaged
over K timesteps (optionally each timestep's gradient at unit norm: `exact.GradientSetting.
normalize_timesteps`), JL-projected, and the residual is summarised by one number per training
sample. With phi these features and Phi the training features:

    das(x, z_i)         = phi(x)^T (Phi^T Phi + lam I)^-1 phi(z_i) * r_i      (the code's "DAS1")
    das-squared(x, z_i) = das(x, z_i)^2                                        (its "DAS1squ", the ||.||^2)

with r_i from the per-timestep training losses MSE_t(z_i): `residual="code"` is the public code's
mean_t rho_t / ||rho||_2 with rho_t = sqrt(MSE_t) (a positive number in [1/T, 1/sqrt(T)]),
`residual="rms"` the plain mean_t rho_t (the residual norm the Newton step scales with).
Higher = stronger proponent, as for TRAK; `das` keeps TRAK's sign, `das-squared` ranks by magnitude.
"""
from __future__ import annotations

import numpy as np
import torch

RESIDUALS = ("code", "rms", "none")
RESIDUAL_TIMESTEPS = torch.arange(5, 1000, 10)  # the midpoints of 100 equal timestep bins
REGISTRY_LAMBDA = 0.05  # the app's DAS lambda: best on the validation LDS at k = 2048 (assets/benchmarks/study.md)
POWERS = {"das": 1, "das-squared": 2}


def residual_weights(losses, kind: str = "code") -> np.ndarray:
    """(N,) DAS residual weights from per-timestep training losses (N, T) (mean-squared errors)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] < 1:
        raise ValueError(f"training losses must be (N, T), got {losses.shape}")
    if not np.isfinite(losses).all() or (losses < 0).any():
        raise ValueError("training losses must be finite and non-negative (mean-squared errors)")
    rho = np.sqrt(losses)
    if kind == "code":
        return rho.mean(1) / np.maximum(np.linalg.norm(rho, axis=1), 1e-300)
    if kind == "rms":
        return rho.mean(1)
    if kind == "none":
        return np.ones(len(losses))
    raise ValueError(f"unknown DAS residual {kind!r}; choose one of {list(RESIDUALS)}")


@torch.no_grad()
def training_losses(unet, scheduler, images: torch.Tensor, timesteps: torch.Tensor, noise_seed: int = 0,
                    chunk: int = 4096) -> np.ndarray:
    """(N, T) eps-prediction MSE of each training image at each timestep. The noise is one
    (T * N, C, H, W) draw from a generator seeded by `noise_seed`, row t * N + n for (timestep t,
    image n): the convention of the LDS ground truth's `lds_run.eps_losses`."""
    unet.eval()
    N, T = len(images), len(timesteps)
    noise = torch.randn((T * N, *images.shape[1:]), generator=torch.Generator().manual_seed(int(noise_seed)))
    t_flat = timesteps.repeat_interleave(N)
    x_flat = images.repeat(T, 1, 1, 1)
    out = torch.empty(T * N)
    for a in range(0, T * N, chunk):
        b = min(a + chunk, T * N)
        xt = scheduler.add_noise(x_flat[a:b], noise[a:b], t_flat[a:b])
        out[a:b] = (unet(xt, t_flat[a:b], return_dict=False)[0] - noise[a:b]).pow(2).flatten(1).mean(1)
    return out.view(T, N).T.numpy()


def das_scores(trak_scores, weights, method: str = "das") -> np.ndarray:
    """DAS scores (Q, N) from TRAK-form scores phi_q (Phi^T Phi + lam I)^-1 phi_i of the compressed
    output's features (Q, N) and the residual weights (N,)."""
    if method not in POWERS:
        raise ValueError(f"unknown DAS variant {method!r}; choose one of {sorted(POWERS)}")
    s = np.asarray(trak_scores, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if s.ndim != 2 or w.shape != (s.shape[1],):
        raise ValueError(f"need scores (Q, N) and weights (N,), got {s.shape} and {w.shape}")
    return (s * w) ** POWERS[method]


RESIDUALS_FILE = "das_residuals.npz"  # in a model folder: its training losses at RESIDUAL_TIMESTEPS


def residuals_command(root: str) -> str:
    """The command that writes a model folder's DAS training losses (`build_residuals`)."""
    return f"python -m dtrak_core build-das --root {root}"


def _identity(attributor) -> dict:
    from dtrak_core.model.unet import checkpoint_hash

    return {"checkpoint": checkpoint_hash(attributor.unet), "dataset": attributor.train.fingerprint}


def _read_residuals(path: str, attributor, remedy: str) -> np.ndarray:
    """The (N, T) losses saved at `path`, checked: an unreadable file (truncated, not a zip, a
    failed checksum) or one computed for another model, training set or timesteps is an
    `IntegrityError` naming it, with `remedy`."""
    from dtrak_core.errors import IntegrityError

    try:
        with np.load(path, allow_pickle=False) as z:
            saved = {k: z[k] for k in z.files}
    except Exception as e:  # OSError, ValueError, EOFError, zipfile.BadZipFile (a CRC error too), zlib.error...
        raise IntegrityError(path, f"(DAS training losses) cannot be read ({type(e).__name__}: {e}): it is truncated "
                             f"or corrupt", remedy) from None
    same = all(str(saved.get(k)) == v for k, v in _identity(attributor).items()) and "timesteps" in saved and \
        np.array_equal(saved["timesteps"], RESIDUAL_TIMESTEPS.numpy())
    losses = saved.get("losses", np.zeros(0))
    if not same or losses.shape != (len(attributor.train), len(RESIDUAL_TIMESTEPS)):
        raise IntegrityError(path, "(DAS training losses) was computed for another model, training set or timesteps",
                             remedy)
    if not np.isfinite(losses).all() or (losses < 0).any():
        raise IntegrityError(path, "(DAS training losses) holds losses that are not finite and non-negative", remedy)
    return losses


def model_residuals(attributor) -> np.ndarray:
    """(N, T) training losses at RESIDUAL_TIMESTEPS for DAS's residuals, read from
    <model folder>/das_residuals.npz (`build_residuals` writes it). Nothing is computed into a
    model folder here, on a visitor's request: a missing file is a `MethodUnavailable` naming the
    command that builds it, a damaged one an `IntegrityError` naming it. An attributor with no
    model folder (built in memory) computes them (N x 100 forward passes) and keeps nothing."""
    import os

    from dtrak_core.errors import MethodUnavailable

    if attributor.root is None:
        return training_losses(attributor.unet, attributor.scheduler, attributor.train.images, RESIDUAL_TIMESTEPS)
    path = os.path.join(attributor.root, RESIDUALS_FILE)
    command = residuals_command(attributor.root)
    if not os.path.isfile(path):
        raise MethodUnavailable(f"DAS needs the model's training losses ({path}), which are not built; build them "
                                f"with `{command}`")
    return _read_residuals(path, attributor, f"rebuild it with `{command}`")


def build_residuals(attributor) -> tuple[str, bool]:
    """Write <model folder>/das_residuals.npz (atomically) for the attributor's model and training
    set, unless a valid one is there; (its path, whether it was computed). `python -m dtrak_core
    build-das`: the one writer of the file, run by the folder's owner, never by a request."""
    import io
    import os

    from dtrak_core.errors import IntegrityError
    from dtrak_core.files import atomic_write_bytes

    if attributor.root is None:
        raise ValueError("the attributor has no model folder to write DAS's training losses into")
    path = os.path.join(attributor.root, RESIDUALS_FILE)
    if os.path.isfile(path):
        try:
            _read_residuals(path, attributor, "")
            return path, False
        except IntegrityError:  # damaged or stale: rebuilt below (what its error message says to do)
            pass
    losses = training_losses(attributor.unet, attributor.scheduler, attributor.train.images, RESIDUAL_TIMESTEPS)
    buf = io.BytesIO()
    np.savez(buf, losses=losses, timesteps=RESIDUAL_TIMESTEPS.numpy(), **_identity(attributor))
    atomic_write_bytes(path, buf.getvalue())
    return path, True


def registry_scores(method, inputs, images: torch.Tensor, seeds, K) -> np.ndarray:
    """The method registry's DAS: the paper's squared score over the model folder's `avg` store
    (JL-projected, K timesteps), residuals from the training losses at RESIDUAL_TIMESTEPS
    (`model_residuals`: read from the model folder, built by `build-das`), lambda REGISTRY_LAMBDA."""
    from dtrak_core.attribution.scoring import TRAKScorer

    setting, _ = inputs.store(method.store, K)
    scorer = inputs.cached(("das-scorer", setting),
                           lambda: TRAKScorer(lam=REGISTRY_LAMBDA).fit(inputs.train_features(method.store, K)))
    weights = inputs.cached("das-residuals", lambda: residual_weights(model_residuals(inputs.attributor), "code"))
    return das_scores(scorer.scores(inputs.query_features(images, method.store, K)), weights, "das-squared")
