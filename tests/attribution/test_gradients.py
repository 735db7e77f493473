import pytest
import torch

from dtrak_core.attribution.gradients import GradientFeaturizer, timestep_noise, timesteps_for
from dtrak_core.attribution.output_functions import canonical_name, elbo_weights, get_output_function

ALL = ["loss", "square", "avg", "l1-norm", "l2-norm", "linf-norm", "elbo", "eta=0.3"]


def loop_gradient(unet, scheduler, x, name, K):
    """Reference: plain autograd, one sample and one timestep at a time, formulas written out."""
    params = [p for p in unet.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    abar = scheduler.alphas_cumprod.float()
    betas = scheduler.betas.double()
    for t in range(0, 1000, 1000 // K):
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        xt = abar[t].sqrt() * x + (1 - abar[t]).sqrt() * eps
        pred = unet(xt[None], torch.tensor([t]), return_dict=False)[0][0]
        if name == "loss":
            f = ((pred - eps) ** 2).mean()
        elif name == "square":
            f = (pred ** 2).mean()
        elif name == "avg":
            f = pred.mean()
        elif name == "l1-norm":
            f = pred.abs().sum()
        elif name == "l2-norm":
            f = torch.sqrt((pred ** 2).sum())
        elif name == "linf-norm":
            f = pred.abs().max()
        elif name == "elbo":
            alphabar_t = torch.prod(1 - betas[: t + 1])
            w = betas[t] / (2 * (1 - betas[t]) * (1 - alphabar_t))
            f = w.float() * ((pred - eps) ** 2).mean()
        else:  # eta=0.3
            eta = 0.3
            f = eta * (pred ** 2).mean() + (1 - eta) * (((pred - eps) ** 2).mean() - (pred ** 2).mean())
        for acc, g in zip(total, torch.autograd.grad(f, params)):
            acc += g
    return torch.cat([g.flatten() for g in total]) / K


@pytest.mark.parametrize("name", ALL)
def test_per_sample_gradients_match_plain_loop(tiny_unet, scheduler, digits, name):
    x = digits.images[:3]
    K = 10
    fast = GradientFeaturizer(tiny_unet, scheduler, name, K, timestep_chunk=4, engine="vmap")(x)
    for i in range(len(x)):
        ref = loop_gradient(tiny_unet, scheduler, x[i], name, K)
        torch.testing.assert_close(fast[i], ref, rtol=1e-4, atol=1e-6 * ref.abs().max().item())


def test_timestep_chunking_does_not_change_result(tiny_unet, scheduler, digits, monkeypatch):
    from dtrak_core.attribution import gradients

    x = digits.images[:2]
    passes = []
    plain = GradientFeaturizer._hooks_grads
    monkeypatch.setattr(GradientFeaturizer, "_hooks_grads", lambda self, *a: passes.append(1) or plain(self, *a))
    a = GradientFeaturizer(tiny_unet, scheduler, "square", 10, timestep_chunk=10)(x)
    c = GradientFeaturizer(tiny_unet, scheduler, "square", 10, timestep_chunk=3)(x)  # a small batch: one pass
    assert len(passes) == 2
    monkeypatch.setattr(gradients, "MIN_ROWS_PER_PASS", 1)
    b = GradientFeaturizer(tiny_unet, scheduler, "square", 10, timestep_chunk=3)(x)
    assert len(passes) == 2 + 4
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_timestep_subsets_add_up_to_the_whole(tiny_unet, scheduler, digits, engine):
    full = GradientFeaturizer(tiny_unet, scheduler, "square", K=4, engine=engine)
    parts = [full.subset(slice(0, 1)), full.subset(slice(1, 3)), full.subset(slice(3, 4))]
    assert [p.timesteps.tolist() for p in parts] == [[0], [250, 500], [750]] and full.K == 4
    x = digits.images[:2]
    torch.testing.assert_close(sum(p.K * p(x) for p in parts) / 4, full(x), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no timesteps"):
        full.subset(slice(4, 9))


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
@pytest.mark.parametrize("min_rows", [1, 100])  # a pass per timestep column, or all in one pass
def test_per_row_timesteps_give_each_subset_in_one_pass(tiny_unet, scheduler, digits, engine, min_rows, monkeypatch):
    from dtrak_core.attribution import gradients

    monkeypatch.setattr(gradients, "MIN_ROWS_PER_PASS", min_rows)
    full = GradientFeaturizer(tiny_unet, scheduler, "square", K=4, engine=engine, timestep_chunk=1)
    x = digits.images[:2]
    rows = torch.tensor([[0, 1], [2, 3], [3, 0]])  # image 0 over two buckets, image 1 over t 750 and 0
    out = full(torch.stack([x[0], x[0], x[1]]), timesteps=rows)
    expected = torch.cat([full.subset(slice(0, 2))(x[:1]), full.subset(slice(2, 4))(x[:1]),
                          (full.subset(slice(3, 4))(x[1:]) + full.subset(slice(0, 1))(x[1:])) / 2])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    for bad in (torch.tensor([[0, 4]] * 3), torch.tensor([0, 1, 2]), torch.tensor([[0]] * 2)):
        with pytest.raises(ValueError, match="timestep"):
            full(torch.stack([x[0], x[0], x[1]]), timesteps=bad)


def test_eta_interpolation_endpoints(tiny_unet, scheduler, digits):
    x = digits.images[:2]
    g = lambda n: GradientFeaturizer(tiny_unet, scheduler, n, 10)(x)
    torch.testing.assert_close(g("eta=1"), g("square"), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(2 * g("eta=0.5"), g("loss"), rtol=1e-4, atol=1e-7)


def test_timesteps_and_noise_follow_protocol():
    assert timesteps_for(10).tolist() == list(range(0, 1000, 100))
    assert len(timesteps_for(1000)) == 1000
    with pytest.raises(ValueError):
        timesteps_for(7)
    n = timestep_noise(torch.tensor([5, 900]), (1, 8, 8))
    torch.testing.assert_close(n[1], torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(900)))


def test_names_and_elbo_weights(scheduler):
    assert canonical_name("D-TRAK") == "square" and canonical_name("trak") == "loss"
    assert canonical_name("eta=0.50") == "eta=0.5"
    with pytest.raises(ValueError, match="unknown output function"):
        get_output_function("cubic")
    w = elbo_weights(scheduler)
    b = scheduler.betas.double()
    t = 500
    expected = b[t] / (2 * (1 - b[t]) * (1 - torch.prod(1 - b[: t + 1])))
    assert w[t].item() == pytest.approx(expected.item(), rel=1e-5)


# -- the "hooks" engine against the torch.func "vmap" engine -----------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_hooks_engine_matches_plain_loop(tiny_unet, scheduler, digits, name):
    x = digits.images[3:4]
    fast = GradientFeaturizer(tiny_unet, scheduler, name, 10, timestep_chunk=4, engine="hooks")(x)
    for i in range(len(x)):
        ref = loop_gradient(tiny_unet, scheduler, x[i], name, 10)
        torch.testing.assert_close(fast[i], ref, rtol=1e-4, atol=5e-6 * ref.abs().max().item())  # rounding: another summation order


def test_hooks_engine_matches_vmap_on_default_unet(scheduler, digits):
    from dtrak_core.model.unet import build_unet

    unet = build_unet(seed=3).eval()  # the default architecture, (16, 32) channels
    g = lambda engine, name: GradientFeaturizer(unet, scheduler, name, 10, timestep_chunk=7, engine=engine)(digits.images[:2])
    assert GradientFeaturizer(unet, scheduler, "square", 10).engine == "hooks"  # what "auto" picks for our UNet
    assert not g("hooks", "avg").requires_grad  # plain numbers, ready for numpy
    for name in ("loss", "square"):
        ref = g("vmap", name)
        torch.testing.assert_close(g("hooks", name), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap reference over attention
def test_hooks_engine_matches_vmap_on_an_rgb_unet_with_attention(scheduler):
    """Users' own models (e.g. DDPM CIFAR-10 pipelines) have RGB inputs and self-attention blocks."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()
    x = torch.randn(3, 3, 8, 8)
    assert GradientFeaturizer(unet, scheduler, "square", 4).engine == "hooks"
    for name in ("loss", "square"):
        ref = GradientFeaturizer(unet, scheduler, name, 4, engine="vmap")(x)
        torch.testing.assert_close(GradientFeaturizer(unet, scheduler, name, 4, engine="hooks")(x), ref,
                                   rtol=1e-4, atol=1e-5 * ref.abs().max().item())


class _ReusingNet(torch.nn.Module):
    """A model the UNet does not exercise: a conv called twice, a grouped bias-free conv,
    a bias-free Linear on the timestep, a GroupNorm and a frozen layer."""

    def __init__(self):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(in_channels=1, sample_size=8)
        torch.manual_seed(0)
        self.inp = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.shared = torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.grouped = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False)
        self.temb = torch.nn.Linear(1, 4, bias=False)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.frozen = torch.nn.Conv2d(4, 4, 1)
        self.frozen.requires_grad_(False)
        self.out = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, t, return_dict=False):
        h = self.inp(x) + self.temb(t.float()[:, None] / 1000)[:, :, None, None]
        h = self.shared(torch.tanh(self.shared(h)))
        h = self.norm(self.frozen(h))
        h = torch.nn.functional.interpolate(self.grouped(torch.tanh(h)), scale_factor=2)
        return (self.out(h),)


def test_hooks_engine_handles_reused_grouped_and_frozen_layers(scheduler, digits):
    net = _ReusingNet().eval()
    a = GradientFeaturizer(net, scheduler, "loss", 10, engine="hooks")(digits.images[:3])
    b = GradientFeaturizer(net, scheduler, "loss", 10, engine="vmap")(digits.images[:3])
    assert a.shape == (3, sum(p.numel() for p in net.parameters() if p.requires_grad))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item())


def test_engine_choice_and_errors(tiny_unet, scheduler):
    class Scaled(torch.nn.Module):  # a parametrised layer the hooks engine does not know
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))

    net = _ReusingNet()
    net.extra = Scaled()
    assert GradientFeaturizer(net, scheduler, "square", 10).engine == "vmap"
    with pytest.raises(ValueError, match="hooks"):
        GradientFeaturizer(net, scheduler, "square", 10, engine="hooks")
    with pytest.raises(ValueError, match="unknown gradient engine"):
        GradientFeaturizer(tiny_unet, scheduler, "square", 10, engine="jit")
