"""DAS against a direct computation of its definition on a tiny model (torch.func gradients,
a dense primal solve), and its residual weights against the public code's formula."""
import os

import numpy as np
import pytest
import torch
from conftest import filled_store
from torch.func import functional_call, grad

from dtrak_core.attribution.das import das_scores, residual_weights, training_losses
from dtrak_core.attribution.exact import GradientSetting, KernelTRAK, TimestepGradients, gram
from dtrak_core.attribution.gradients import timestep_noise, timesteps_for, trainable_params
from dtrak_core.model.unet import build_unet


@pytest.fixture(scope="module")
def micro_unet():
    return build_unet(block_out_channels=(2, 4), seed=4).eval()


def direct_features(unet, scheduler, images, K, unit):
    """phi(x) = mean over the K timesteps of grad_theta mean(eps_theta(x_t, t)), each at unit norm if `unit`."""
    params = {k: v.double() for k, v in trainable_params(unet).items()}
    ts = timesteps_for(K)
    noise = timestep_noise(ts, images.shape[1:]).double()
    abar = scheduler.alphas_cumprod.double()
    model = unet.double()
    rows = []
    try:
        for x in images.double():
            acc = 0
            for k, t in enumerate(ts):
                xt = abar[t].sqrt() * x + (1 - abar[t]).sqrt() * noise[k]
                g = grad(lambda p: functional_call(model, p, (xt[None], t[None]), {"return_dict": False})[0].mean())(params)
                g = torch.cat([v.flatten() for v in g.values()])
                acc = acc + (g / g.norm() if unit else g)
            rows.append(acc / K)
    finally:
        unet.float()
    return torch.stack(rows)


@pytest.mark.parametrize("unit", [False, True])
@pytest.mark.parametrize("method", ["das", "das-squared"])
def test_das_matches_its_definition_on_a_tiny_model(micro_unet, scheduler, digits, one_thread, unit, method):
    train, queries = digits.images[:5], digits.images[100:103]
    K, lam = 2, 1e-3
    phi_train = direct_features(micro_unet, scheduler, train, K, unit)
    phi_q = direct_features(micro_unet, scheduler, queries, K, unit)
    # the published score, computed directly in the primal: phi_q (Phi^T Phi + lam I)^-1 phi_i r_i
    d = phi_train.shape[1]
    solved = torch.linalg.solve(phi_train.T @ phi_train + lam * torch.eye(d, dtype=torch.float64), phi_train.T)
    ts = torch.tensor([5, 505, 905])
    losses = training_losses(micro_unet, scheduler, train, ts, noise_seed=3)
    r = residual_weights(losses, "code")
    want = ((phi_q @ solved).numpy() * r) ** (2 if method == "das-squared" else 1)

    feats = TimestepGradients(micro_unet, scheduler, GradientSetting("avg", K, normalize_timesteps=unit))
    g_train, g_q = feats(train).numpy(), feats(queries).numpy()
    got = das_scores(KernelTRAK().fit(gram(g_train)).scores(gram(g_q, g_train), lam), r, method)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6 * np.abs(want).max())


def test_training_losses_and_the_code_residual(micro_unet, scheduler, digits):
    images, ts = digits.images[:3], torch.tensor([10, 600])
    losses = training_losses(micro_unet, scheduler, images, ts, noise_seed=7)
    noise = torch.randn((len(ts) * len(images), *images.shape[1:]), generator=torch.Generator().manual_seed(7))
    abar = scheduler.alphas_cumprod.float()
    for j, t in enumerate(ts):
        for i, x in enumerate(images):
            eps = noise[j * len(images) + i]
            with torch.no_grad():
                pred = micro_unet((abar[t].sqrt() * x + (1 - abar[t]).sqrt() * eps)[None], t[None]).sample[0]
            assert abs(float((pred - eps).pow(2).mean()) - losses[i, j]) < 1e-5
    rho = np.sqrt(losses)
    np.testing.assert_allclose(residual_weights(losses, "code"), rho.mean(1) / np.sqrt((rho ** 2).sum(1)))
    np.testing.assert_allclose(residual_weights(losses, "rms"), rho.mean(1))
    flat = residual_weights(np.full((2, 4), 0.3), "code")
    np.testing.assert_allclose(flat, 0.5)  # constant residuals over T = 4 timesteps: 1 / sqrt(4)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="residual"):
        residual_weights(np.ones((2, 3)), "signed")
    with pytest.raises(ValueError, match="non-negative"):
        residual_weights(-np.ones((2, 3)))
    with pytest.raises(ValueError, match="variant"):
        das_scores(np.ones((1, 2)), np.ones(2), "das-cubed")
    with pytest.raises(ValueError, match="weights"):
        das_scores(np.ones((1, 2)), np.ones(3))


def test_the_registry_scores_the_papers_squared_das_over_the_avg_store(tmp_path, tiny_unet, scheduler, digits, one_thread):
    from dtrak_core.attribution import methods
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.das import REGISTRY_LAMBDA, RESIDUAL_TIMESTEPS
    from dtrak_core.attribution.features import FeatureSetting, Featurizer
    from dtrak_core.attribution.scoring import TRAKScorer
    from dtrak_core.errors import MethodUnavailable

    train = digits.subset(range(6))
    queries = digits.images[200:202]
    bare = Attributor(tiny_unet, scheduler, train, [])
    assert "das" in methods.unavailable(bare) and "das" not in methods.available(bare)
    with pytest.raises(MethodUnavailable, match="avg"):
        methods.scores(bare, "das", queries)
    setting = FeatureSetting("avg", K=4, k=32)
    store = filled_store(tmp_path / "avg", tiny_unet, scheduler, train, setting)
    featurize = Featurizer(tiny_unet, scheduler, setting)
    att = Attributor(tiny_unet, scheduler, train, [store])
    assert "das" in methods.available(att)
    got = methods.scores(att, "DAS", queries)
    base = TRAKScorer(lam=REGISTRY_LAMBDA).fit(np.array(store.features())).scores(featurize(queries))
    r = residual_weights(training_losses(tiny_unet, scheduler, train.images, RESIDUAL_TIMESTEPS), "code")
    np.testing.assert_allclose(got, (base * r) ** 2, rtol=1e-6, atol=1e-12)
    assert methods.get("das").family == "successor" and methods.label("das") == "DAS"
    # the counterfactual harness ranks by it: its strongest proponents are the highest squared scores
    from dtrak_core.evaluation import counterfactual as cf

    assert cf.ranking_name(" DAS ") == "das"
    assert list(cf.removal(att, queries[0], 0, "das", 3)) == list(np.argsort(-got[0], kind="stable")[:3])


def test_model_residuals_are_built_explicitly_and_checked(tmp_path, tiny_unet, scheduler, digits, one_thread):
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.das import RESIDUAL_TIMESTEPS, RESIDUALS_FILE, build_residuals, model_residuals
    from dtrak_core.errors import IntegrityError, MethodUnavailable
    from dtrak_core.model.unet import build_unet

    att = Attributor(tiny_unet, scheduler, digits.subset(range(3)), [])
    att.root = str(tmp_path)
    # missing: unavailable, naming the command that builds it; nothing is computed into the folder
    with pytest.raises(MethodUnavailable, match=f"build them with `python -m dtrak_core build-das --root {tmp_path}`"):
        model_residuals(att)
    assert os.listdir(tmp_path) == []
    path, computed = build_residuals(att)  # the explicit writer (`build-das`)
    assert computed and path == str(tmp_path / RESIDUALS_FILE)
    first = model_residuals(att)
    np.testing.assert_array_equal(first, training_losses(tiny_unet, scheduler, att.train.images, RESIDUAL_TIMESTEPS))
    np.testing.assert_array_equal(model_residuals(att), first)  # read back
    assert build_residuals(att) == (path, False)  # a valid file is kept
    other = Attributor(build_unet(block_out_channels=(4, 8), seed=9), scheduler, att.train, [])
    other.root = str(tmp_path)
    with pytest.raises(IntegrityError, match=f"^{path} .*another model.*build-das --root {tmp_path}"):
        model_residuals(other)
    (tmp_path / RESIDUALS_FILE).write_bytes(b"not a zip")
    with pytest.raises(IntegrityError, match=f"^{path} .*cannot be read.*build-das"):
        model_residuals(att)
    assert build_residuals(att) == (path, True)  # the fix it names
    np.testing.assert_array_equal(model_residuals(att), first)


def _flip_last_data_byte(path):
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo("losses.npy")
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.compress_size - 1)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0xFF]))


@pytest.mark.parametrize("damage", ["truncate", "empty", "bit-flip"])
def test_a_damaged_residuals_file_is_an_integrity_error_naming_it(tmp_path, tiny_unet, scheduler, digits, one_thread,
                                                                   damage):
    """The reported defect: a truncated das_residuals.npz raised an uncaught BadZipFile ("File is not
    a zip file") that broke DAS and every drill-down."""
    from dtrak_core.attribution import methods
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.das import build_residuals, model_residuals
    from dtrak_core.attribution.features import FeatureSetting
    from dtrak_core.errors import IntegrityError

    train = digits.subset(range(3))
    store = filled_store(tmp_path / "avg", tiny_unet, scheduler, train, FeatureSetting("avg", K=2, k=16))
    att = Attributor(tiny_unet, scheduler, train, [store])
    att.root = str(tmp_path)
    path, _ = build_residuals(att)
    if damage == "bit-flip":
        _flip_last_data_byte(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(0 if damage == "empty" else os.path.getsize(path) // 2)
    with pytest.raises(IntegrityError, match=f"^{path} \\(DAS training losses\\) cannot be read") as e:
        model_residuals(att)
    assert e.value.path == path
    with pytest.raises(IntegrityError, match=f"^{path} "):
        methods.scores(att, "das", digits.images[200:201])
