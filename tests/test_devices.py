"""Devices and the precision policy: CPU by default, clear errors for what this machine lacks,
bf16 autocast where it is safe; the GPU smoke tests run only with -m gpu on a CUDA machine."""
import json

import numpy as np
import pytest
import torch

from dtrak_core import cli
from dtrak_core.attribution.chunked import ChunkedTRAKScorer
from dtrak_core.attribution.features import FeatureSetting, Featurizer
from dtrak_core.attribution.scoring import TRAKScorer
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.devices import autocast, check_precision, describe, resolve_device
from dtrak_core.model.sampling import generate
from dtrak_core.model.training import TrainConfig, train

SETTING = FeatureSetting("square", K=4, k=32)
TINY_TRAIN = TrainConfig(steps=3, batch_size=8, block_out_channels=(4, 8))


def test_devices_resolve_or_say_what_to_use():
    assert resolve_device("cpu") == torch.device("cpu") and describe("cpu") == "cpu"
    for bad in ("tpu", "gpu", 7.5):
        with pytest.raises(ValueError, match="device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available.*--device cpu"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="on the CPU use 'bf16'"):
        check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        check_precision("int8")
    assert check_precision("bf16", "cpu") == "bf16"
    with autocast("cpu", "bf16"):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32


def test_cpu_defaults_are_unchanged_and_bf16_sampling_stays_close(tiny_unet, scheduler, one_thread):
    plain = generate(tiny_unet, scheduler, [0, 1], steps=5)
    explicit = generate(tiny_unet, scheduler, [0, 1], steps=5, device="cpu", precision="fp32")
    assert torch.equal(plain, explicit)
    half = generate(tiny_unet, scheduler, [0, 1], steps=5, precision="bf16")
    assert half.dtype == torch.float32 and not torch.equal(half, plain)  # autocast did run
    assert (half - plain).abs().mean() < 0.05  # bf16 keeps ~3 digits: close, not equal
    with pytest.raises(ValueError, match="fp16"):
        generate(tiny_unet, scheduler, [0], steps=2, precision="fp16")


def test_training_with_bf16_autocast_runs_and_fp32_is_the_default(digits, scheduler, one_thread):
    images = digits.images[:32]
    a = train(images, scheduler, TINY_TRAIN, show_bar=False)
    b = train(images, scheduler, TINY_TRAIN, show_bar=False, device="cpu", precision="fp32")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = train(images, scheduler, TINY_TRAIN, show_bar=False, precision="bf16")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in c.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_cli_refuses_an_unavailable_device_before_any_work(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tiny_root = str(tmp_path / "no-model-needed")
    assert cli.main(["featurize", "--root", tiny_root, "--K", "4", "--k", "32", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert cli.main(["generate", "--root", tiny_root, "--seed", "0", "--precision", "fp16", "--steps", "2"]) == 2
    assert "fp16" in capsys.readouterr().err
    assert cli.main(["attribute", "--root", tiny_root, "--seed", "0", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_smoke_featurize_sample_train_score_match_cpu(tiny_unet, scheduler, digits):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    images = digits.images[:8]
    cpu = Featurizer(tiny_unet, scheduler, SETTING)(images)
    gpu = Featurizer(tiny_unet, scheduler, SETTING, device="cuda")(images)
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4 * cpu.abs().max().item())
    assert next(tiny_unet.parameters()).device.type == "cpu"  # the caller's model was not moved
    samples = generate(tiny_unet, scheduler, [0, 1], steps=5, device="cuda")
    torch.testing.assert_close(samples, generate(tiny_unet, scheduler, [0, 1], steps=5), rtol=1e-3, atol=1e-3)
    for precision in ("bf16", "fp16"):
        half = generate(tiny_unet, scheduler, [0, 1], steps=5, device="cuda", precision=precision)
        assert (half - samples).abs().mean() < 0.05
        model = train(digits.images[:32], scheduler, TINY_TRAIN, show_bar=False, device="cuda", precision=precision)
        assert all(torch.isfinite(p).all() and p.device.type == "cpu" for p in model.parameters())
    phi = np.random.default_rng(0).normal(size=(300, 32)).astype(np.float32)
    q = phi[:2]
    dense = TRAKScorer(lam=1.0).fit(phi).scores(q)
    on_gpu = TRAKScorer(lam=1.0, device="cuda").fit(phi)
    assert on_gpu.weights_.device.type == "cpu"
    np.testing.assert_allclose(on_gpu.scores(q), dense, rtol=1e-9, atol=1e-12)  # float64 there too
    scorer = ChunkedTRAKScorer(lam=1.0, chunk_rows=64, device="cuda").fit(phi)
    np.testing.assert_allclose(scorer.scores(q), dense, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")  # before the tiny model is built
def test_gpu_smoke_out_of_core_store_and_attribute_cli_match_cpu(tmp_path, tiny_root, capsys):
    phi = np.random.default_rng(1).normal(size=(5000, 64)).astype(np.float16)
    identity = FeatureStore.identity(FeatureSetting("square", K=4, k=64), checkpoint="c0ffee", dataset="d4t4")
    store = FeatureStore.create(str(tmp_path / "s"), identity, n=len(phi), k=64, slice_size=1000, dtype="float16")
    store.fill(lambda rows: rows, phi, show_bar=False)
    q = np.random.default_rng(2).normal(size=(3, 64))
    cpu = ChunkedTRAKScorer(lam=5.0, chunk_rows=1024).fit(store)
    gpu = ChunkedTRAKScorer(lam=5.0, chunk_rows=1024, device="cuda").fit(store)
    assert gpu.kernel_source_ == "loaded"  # the kernel saved by the CPU fit serves the GPU one
    want = cpu.scores(q)
    np.testing.assert_allclose(gpu.scores(q), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(gpu.top_k(q, 5)[0], cpu.top_k(q, 5)[0])
    runs = {}
    for device in ("cpu", "cuda"):
        assert cli.main(["attribute", "--root", tiny_root, "--seed", "3", "--top", "4", "--json", "--device", device]) == 0
        runs[device] = json.loads(capsys.readouterr().out)
    for kind in ("proponents", "opponents"):
        got, ref = runs["cuda"][kind], runs["cpu"][kind]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in ref], rtol=1e-3,
                                   atol=1e-4 * max(abs(r["score"]) for r in ref))
