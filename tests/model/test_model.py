import numpy as np
import pytest
import torch

from dtrak_core.errors import Cancelled
from dtrak_core.model.data import digits_split, load_digits, load_image_folder
from dtrak_core.model.sampling import generate
from dtrak_core.model.training import TrainConfig, train
from dtrak_core.model.unet import checkpoint_hash, load_checkpoint, save_checkpoint

TINY = TrainConfig(steps=6, batch_size=16, block_out_channels=(4, 8), seed=3)


def test_digits_split_is_fixed_stratified_and_scaled():
    train_idx, val_idx = digits_split()
    assert len(train_idx) == 1500 and len(val_idx) == 297
    assert not set(train_idx) & set(val_idx)
    train, val = load_digits("train"), load_digits("validation")
    assert train.images.shape == (1500, 1, 8, 8) and val.images.shape == (297, 1, 8, 8)
    assert train.images.min() == -1 and train.images.max() == 1
    counts = np.bincount(val.labels.numpy(), minlength=10)
    assert counts.min() >= 28 and counts.max() <= 31  # stratified
    assert train.fingerprint == load_digits("train").fingerprint != val.fingerprint
    with pytest.raises(ValueError, match="unknown digits split"):
        load_digits("test")


def test_training_is_deterministic_for_a_seed(scheduler, digits):
    a = train(digits.images[:64], scheduler, TINY, show_bar=False)
    b = train(digits.images[:64], scheduler, TINY, show_bar=False)
    c = train(digits.images[:64], scheduler, TrainConfig(**{**TINY.to_dict(), "seed": 4}), show_bar=False)
    assert checkpoint_hash(a) == checkpoint_hash(b) != checkpoint_hash(c)


def test_training_can_be_cancelled(scheduler, digits):
    with pytest.raises(Cancelled):
        train(digits.images[:64], scheduler, TINY, should_stop=lambda: True, show_bar=False)
    with pytest.raises(ValueError, match="empty"):
        train(digits.images[:0], scheduler, TINY, show_bar=False)


def test_checkpoint_round_trip(tmp_path, tiny_unet, scheduler):
    save_checkpoint(str(tmp_path / "ckpt"), tiny_unet, scheduler)
    assert (tmp_path / "ckpt" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    unet, sched = load_checkpoint(str(tmp_path / "ckpt"))
    assert checkpoint_hash(unet) == checkpoint_hash(tiny_unet)
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "linear"
    save_checkpoint(str(tmp_path / "ckpt"), tiny_unet, scheduler)  # overwrite is atomic and works
    with pytest.raises(ValueError, match="not a diffusers checkpoint"):
        load_checkpoint(str(tmp_path))


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_add_noise_is_the_forward_formula_bit_for_bit(scheduler, kind):
    """Training, featurizing, Journey-TRAK, the LDS ground truth and the batched retrains noise with
    `scheduler.add_noise`; the committed weights and stores were made with the formula written out.
    Both give the same bits, at every timestep, in each shape those callers use."""
    from diffusers import DDIMScheduler

    sched = scheduler if kind == "ddpm" else DDIMScheduler.from_config(scheduler.config)
    abar = scheduler.alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    t = torch.arange(1000)
    x, eps = torch.randn((1000, 1, 8, 8), generator=g), torch.randn((1000, 1, 8, 8), generator=g)
    a = abar[t].view(-1, 1, 1, 1)
    assert torch.equal(sched.add_noise(x, eps, t), a.sqrt() * x + (1 - a).sqrt() * eps)  # a batch, one t each
    k = t[::100]  # one sample at K timesteps (the gradient features)
    assert torch.equal(sched.add_noise(x[0].expand_as(eps[k]), eps[k], k), a[k].sqrt() * x[0] + (1 - a[k]).sqrt() * eps[k])
    tm = torch.randint(0, 1000, (3, 5), generator=g)  # (models, batch), as the batched retrains draw them
    xm, em, am = x[:15].view(3, 5, 1, 8, 8), eps[:15].view(3, 5, 1, 8, 8), abar[tm].view(3, 5, 1, 1, 1)
    noised = sched.add_noise(xm.flatten(0, 1), em.flatten(0, 1), tm.flatten()).view_as(xm)
    assert torch.equal(noised, am.sqrt() * xm + (1 - am).sqrt() * em)


def test_same_seed_same_image_whatever_the_batch(tiny_unet, scheduler):
    a = generate(tiny_unet, scheduler, [5, 6, 7], steps=10)
    b = generate(tiny_unet, scheduler, [7], steps=10)
    torch.testing.assert_close(a[2:], b, rtol=0, atol=2e-3)  # float reassociation only
    assert torch.equal(generate(tiny_unet, scheduler, [5], steps=10), generate(tiny_unet, scheduler, [5], steps=10))
    d1 = generate(tiny_unet, scheduler, [5, 6], steps=10, sampler="ddpm")
    d2 = generate(tiny_unet, scheduler, [6], steps=10, sampler="ddpm")
    torch.testing.assert_close(d1[1:], d2, rtol=0, atol=2e-3)
    assert a.shape == (3, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    with pytest.raises(ValueError, match="sampler"):
        generate(tiny_unet, scheduler, [1], sampler="euler")


def test_step_callback_sees_every_step_and_changes_nothing(tiny_unet, scheduler):
    seen = []

    def record(i, t, out):
        seen.append((i, int(t), out.pred_original_sample.clone()))

    x = generate(tiny_unet, scheduler, [5, 6], steps=10, on_step=record)
    assert torch.equal(x, generate(tiny_unet, scheduler, [5, 6], steps=10))
    assert [(i, t) for i, t, _ in seen] == list(zip(range(10), range(900, -1, -100)))
    assert all(x0.shape == (2, 1, 8, 8) and x0.abs().max() <= 1 for _, _, x0 in seen)  # clipped predictions
    assert torch.equal(seen[-1][2], x)  # DDIM's last step lands on its prediction


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("L", (20, 30), color=40 * i).save(tmp_path / cls / f"{i}.png")
    ds = load_image_folder(str(tmp_path), resolution=8)
    assert ds.images.shape == (4, 1, 8, 8) and ds.labels.tolist() == [0, 0, 1, 1]
    (tmp_path / "a" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image_folder(str(tmp_path), resolution=8)
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(str(tmp_path / "missing"), resolution=8)
