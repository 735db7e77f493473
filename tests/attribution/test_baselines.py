"""Baselines on a tiny case, each against a direct computation written out here.

One tiny model (channels (4, 8)) trained 6 steps on 10 digits, a loss store (K=2, k=16), and the
TracInCP checkpoints of the same run at steps 2, 4, 6. Reference features come from plain
autograd, one sample and one timestep at a time, projected with the projector's explicit matrix.
"""
import json
import math

import numpy as np
import pytest
import torch
from conftest import filled_store

from dtrak_core.attribution import methods
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.clip_encoder import ClipImageEncoder, ClipUnavailable, find_clip
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.journey import JourneyFeaturizer
from dtrak_core.attribution.projectors import make_projector
from dtrak_core.attribution.tracin import build_tracin, tracin_steps
from dtrak_core.errors import MethodUnavailable
from dtrak_core.model.sampling import generate
from dtrak_core.model.training import TrainConfig, train
from dtrak_core.model.unet import checkpoint_hash, load_checkpoint

CONFIG = TrainConfig(steps=6, batch_size=8, block_out_channels=(4, 8), seed=3)
SETTING = FeatureSetting("loss", K=2, k=16)
TRACIN = FeatureSetting("loss", K=2, k=8, seed=7)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def case(one_thread, tmp_path_factory, digits, scheduler):
    root = str(tmp_path_factory.mktemp("assets"))
    train_set = digits.subset(range(10))
    unet = train(train_set.images, scheduler, CONFIG, show_bar=False)
    store = filled_store(f"{root}/stores/loss", unet, scheduler, train_set, SETTING)
    build_tracin(root, train_set, scheduler, CONFIG, expected_final=checkpoint_hash(unet), steps=(2, 4, 6),
                 setting=TRACIN, show_bar=False)
    attributor = Attributor(unet, scheduler, train_set, [store])
    queries = digits.images[100:103]
    return {"root": root, "train": train_set, "unet": unet, "att": attributor, "queries": queries,
            "empty": str(tmp_path_factory.mktemp("no-clip"))}


def scores_of(case, name, images=None, **kw):
    kw.setdefault("clip_path", case["empty"])
    return methods.scores(case["att"], name, case["queries"] if images is None else images, root=case["root"], **kw)


# -- references --------------------------------------------------------------------------------
def loss_gradient(unet, scheduler, items):
    """Mean over (x0, t) pairs of grad_theta mean((eps_theta(x_t, t) - eps_t)^2), eps_t seeded by t."""
    params = [p for p in unet.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    abar = scheduler.alphas_cumprod.float()
    for x0, t in items:
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(t)))
        xt = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
        pred = unet(xt[None], torch.tensor([int(t)]), return_dict=False)[0][0]
        for acc, g in zip(total, torch.autograd.grad(((pred - eps) ** 2).mean(), params)):
            acc += g
    return torch.cat([g.flatten() for g in total]).double() / len(items)


def projected(unet, scheduler, images, setting):
    """Reference features (B, k): loss gradients at setting.K timesteps times the explicit projector matrix."""
    ts = range(0, 1000, 1000 // setting.K)
    g = torch.stack([loss_gradient(unet, scheduler, [(x, t) for t in ts]) for x in images])
    P = make_projector(setting.projector, g.shape[1], setting.k, setting.seed).matrix().double()
    return (g @ P).numpy()


def brute_similarity(Q, T, kind):
    out = np.zeros((len(Q), len(T)))
    for i in range(len(Q)):
        for n in range(len(T)):
            d = sum(float(a) * float(b) for a, b in zip(Q[i], T[n]))
            if kind == "cosine":
                d /= math.sqrt(sum(float(a) ** 2 for a in Q[i])) * math.sqrt(sum(float(b) ** 2 for b in T[n]))
            out[i, n] = d
    return out


def brute_trak(Q, Phi):
    """(scores, A^-1 phi_n columns) with A = Phi^T Phi + lam I, lam = 0.1 x mean squared norm."""
    lam = 0.1 * np.mean(np.sum(Phi ** 2, axis=1))
    Ainv = np.linalg.inv(Phi.T @ Phi + lam * np.eye(Phi.shape[1]))
    return Q @ Ainv @ Phi.T, Ainv @ Phi.T


def close(a, b, rtol=2e-4):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# -- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_pixel_baselines(case, kind):
    q = case["queries"].flatten(1).numpy()
    t = case["train"].images.flatten(1).numpy()
    close(scores_of(case, f"pixel-{kind}"), brute_similarity(q, t, kind), rtol=1e-6)


def test_gradient_baselines_and_ip(case, scheduler):
    unet = case["unet"]
    Phi = projected(unet, scheduler, case["train"].images, SETTING)
    Q = projected(unet, scheduler, case["queries"], SETTING)
    for kind in ("dot", "cosine"):
        close(scores_of(case, f"gradient-{kind}"), brute_similarity(Q, Phi, kind))
    trak, cols = brute_trak(Q, Phi)
    close(scores_of(case, "trak"), trak)
    close(scores_of(case, "relative-ip"), trak / np.linalg.norm(cols, axis=0))
    close(scores_of(case, "renorm-ip"), trak / np.linalg.norm(Phi, axis=1))


def test_tracin_and_gas(case, scheduler):
    ckpts = [load_checkpoint(f"{case['root']}/tracin/checkpoints/step-{s:05d}")[0] for s in (2, 4, 6)]
    assert checkpoint_hash(ckpts[-1]) == checkpoint_hash(case["unet"])  # the replay ends at the model
    assert checkpoint_hash(ckpts[0]) != checkpoint_hash(ckpts[1])
    feats = [(projected(u, scheduler, case["queries"], TRACIN), projected(u, scheduler, case["train"].images, TRACIN))
             for u in ckpts]
    close(scores_of(case, "tracin"), sum(brute_similarity(q, t, "dot") for q, t in feats))
    close(scores_of(case, "gas"), sum(brute_similarity(q, t, "cosine") for q, t in feats))


def test_journey_trak(case, scheduler):
    unet, seeds = case["unet"], [5, 11]
    images = generate(unet, scheduler, seeds)
    abar = scheduler.alphas_cumprod.float()  # float32 as the sampler: an unconverged model's DDIM path amplifies rounding
    Phi = projected(unet, scheduler, case["train"].images, SETTING)
    d = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    P = make_projector(SETTING.projector, d, SETTING.k, SETTING.seed).matrix().double()
    # DDIM, 50 steps, eta 0, written out for the batch of seeds (as `generate` runs it: the same batch keeps
    # the float rounding identical, which matters for a 6-step model whose trajectory amplifies it):
    # x0 = (x - sqrt(1 - ab_t) eps) / sqrt(ab_t), clipped to [-1, 1]; x <- sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps
    x = torch.cat([torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    items = [[] for _ in seeds]
    for t in range(980, -1, -20):
        with torch.no_grad():
            eps = unet(x, torch.tensor([t]), return_dict=False)[0]
        x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        for i in range(len(seeds)):
            items[i].append((x0[i], t))
        ab_prev = abar[t - 20] if t >= 20 else torch.tensor(1.0)
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    torch.testing.assert_close(x.clamp(-1, 1), images, atol=1e-5, rtol=0)
    rows = [(loss_gradient(unet, scheduler, it) @ P).numpy() for it in items]
    close(scores_of(case, "journey-trak", images, seeds=seeds), brute_trak(np.stack(rows), Phi)[0])
    with pytest.raises(MethodUnavailable, match="seeds"):
        scores_of(case, "journey-trak", images)
    with pytest.raises(ValueError, match="not the DDIM-50 samples"):
        scores_of(case, "journey-trak", images, seeds=[5, 12])


def test_journey_reads_the_trajectory_of_generate(case, scheduler):
    unet = case["unet"]
    final, x0s, ts = JourneyFeaturizer(unet, scheduler, make_projector("sparse-jl", 10, 4)).trajectory([5, 11])
    assert torch.equal(final, generate(unet, scheduler, [5, 11]))  # the same loop: the same bits
    assert x0s.shape == (2, 50, 1, 8, 8) and ts.tolist() == list(range(980, -1, -20))


def test_training_checkpoint_hook(digits, scheduler):
    cfg = TrainConfig(steps=4, batch_size=4, block_out_channels=(4, 8), seed=1)
    seen = []
    final = train(digits.images[:8], scheduler, cfg, show_bar=False, checkpoint_steps=[2, 4],
                  on_checkpoint=lambda s, u: seen.append((s, checkpoint_hash(u))))
    plain = train(digits.images[:8], scheduler, cfg, show_bar=False)
    assert [s for s, _ in seen] == [2, 4]
    assert seen[1][1] == checkpoint_hash(final) == checkpoint_hash(plain)  # the hook does not perturb training
    assert seen[0][1] != seen[1][1]
    with pytest.raises(ValueError, match="checkpoint_steps"):
        train(digits.images[:8], scheduler, cfg, checkpoint_steps=[5], on_checkpoint=lambda s, u: None)
    assert tracin_steps(1500) == [375, 750, 1125, 1500]


def test_tracin_replay_mismatch_and_unavailable(case, scheduler, tmp_path):
    with pytest.raises(ValueError, match="not reproducible"):
        build_tracin(str(tmp_path / "a"), case["train"], scheduler, CONFIG, expected_final="0" * 16, steps=(3, 6),
                     setting=TRACIN, show_bar=False)
    assert not (tmp_path / "a" / "tracin" / "checkpoints").exists()
    missing = methods.unavailable(case["att"], root=str(tmp_path), clip_path=case["empty"])
    # (the successors score with `avg` or `square` stores, which this tiny folder lacks)
    assert set(missing) - {"das", "avg-sharp", "d-trak-sharp"} == {"tracin", "gas", "clip-dot", "clip-cosine"}
    assert "build-baselines" in missing["tracin"]
    with pytest.raises(MethodUnavailable, match="build-baselines"):
        methods.scores(case["att"], "gas", case["queries"], root=str(tmp_path))
    other = Attributor(train(case["train"].images, scheduler, TrainConfig(steps=2, batch_size=8, block_out_channels=(4, 8)),
                             show_bar=False), scheduler, case["train"], [])
    reasons = methods.unavailable(other, root=case["root"], clip_path=case["empty"])
    # the index names the model it was built for: it is what is wrong, and build-baselines rebuilds it
    assert "built for another model" in reasons["tracin"] and "build-baselines" in reasons["tracin"]
    assert "no feature store" in reasons["relative-ip"]


def test_registry_and_interface(case):
    names = methods.available(case["att"], root=case["root"], clip_path=case["empty"])
    assert names == ["loss"] + [m.name for m in methods.all("baseline", "pixel") if not m.name.startswith("clip")]
    for name in names:
        if name != "journey-trak":
            assert scores_of(case, name).shape == (3, 10)
    with pytest.raises(ValueError, match="unknown method"):
        scores_of(case, "nearest-neighbour")
    with pytest.raises(ValueError, match="images must be"):
        scores_of(case, "pixel-dot", case["queries"][0])


# -- CLIP --------------------------------------------------------------------------------------
def test_clip_unavailable_is_reported(case, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("DTRAK_CLIP_PATH", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ClipUnavailable, match="Hugging Face cache"):
        find_clip()
    with pytest.raises(ClipUnavailable, match="no config.json"):
        ClipImageEncoder.load(case["empty"])
    for name in ("clip-dot", "clip-cosine"):
        with pytest.raises(MethodUnavailable, match="CLIP similarity is unavailable"):
            scores_of(case, name)
        assert name not in methods.available(case["att"], root=case["root"], clip_path=case["empty"])


def bicubic_matrix(n_in, n_out, A=-0.75):
    """1-D bicubic interpolation (Keys kernel, half-pixel centres, edge-clamped taps) as an (out, in) matrix."""
    def kernel(s):
        s = abs(s)
        if s <= 1:
            return (A + 2) * s ** 3 - (A + 3) * s ** 2 + 1
        return A * s ** 3 - 5 * A * s ** 2 + 8 * A * s - 4 * A if s < 2 else 0.0
    M = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for j in range(base - 1, base + 3):
            M[o, min(max(j, 0), n_in - 1)] += kernel(src - j)
    return M


@pytest.fixture(scope="module", params=["clip", "vision-only"])
def tiny_clip(request, tmp_path_factory):
    """A randomly initialised CLIP saved offline: whole (text + vision, as published) or the vision tower only."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    if request.param == "clip":
        text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    else:
        model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision, projection_dim=16))
    path = str(tmp_path_factory.mktemp("tiny-clip"))
    model.eval().save_pretrained(path)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    with open(f"{path}/preprocessor_config.json", "w") as f:
        json.dump({"image_mean": mean, "image_std": std}, f)
    return path, model, np.array(mean), np.array(std)


def test_clip_plumbing_on_a_tiny_random_clip(case, tiny_clip):
    path, model, mean, std = tiny_clip
    enc = ClipImageEncoder.load(path)
    imgs = case["queries"]
    # reference pixels: [-1,1] -> [0,1], bicubic 8 -> 32, clamp, gray -> RGB, (x - mean) / std
    M = bicubic_matrix(8, 32)
    ref = np.stack([np.stack([(np.clip(M @ ((im[0].numpy() + 1) / 2) @ M.T, 0, 1) - mean[c]) / std[c]
                              for c in range(3)]) for im in imgs])
    px = enc.preprocess(imgs)
    np.testing.assert_allclose(px.numpy(), ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=torch.from_numpy(ref).float()).pooler_output)
    torch.testing.assert_close(enc(imgs), emb, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        train_emb = model.visual_projection(model.vision_model(pixel_values=enc.preprocess(case["train"].images)).pooler_output)
    for kind in ("dot", "cosine"):
        close(scores_of(case, f"clip-{kind}", clip_path=path), brute_similarity(emb.numpy(), train_emb.numpy(), kind), rtol=1e-4)
    assert {"clip-dot", "clip-cosine"} <= set(methods.available(case["att"], root=case["root"], clip_path=path))
