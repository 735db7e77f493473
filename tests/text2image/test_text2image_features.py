import numpy as np
import pytest
import torch

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.gradients import GradientFeaturizer, timestep_noise, timesteps_for
from dtrak_core.attribution.output_functions import get_output_function
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.text2image.features import CaptionedInputs, ConditionalFeaturizer, featurize_fn
from dtrak_core.text2image.lora import lora_parameters


def reference_gradients(unet, scheduler, output_fn, K, latents, contexts):
    """Per-sample LoRA gradients by a plain autograd loop, one sample and one timestep at a time."""
    f = get_output_function(output_fn)
    params = lora_parameters(unet)
    ts = timesteps_for(K)
    noise = timestep_noise(ts, latents.shape[1:])
    rows = []
    for z, h in zip(latents, contexts):
        total = 0
        for t, eps in zip(ts, noise):
            zt = scheduler.add_noise(z[None], eps[None], t[None])
            pred = unet(zt, t[None], h[None], return_dict=False)[0]
            total = total + f(pred, eps[None], torch.ones(1)).sum()
        grads = torch.autograd.grad(total / K, list(params.values()))
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
@pytest.mark.parametrize("output_fn", ["square", "loss"])
def test_per_sample_lora_gradients_match_autograd(lora_pipeline, engine, output_fn):
    g = torch.Generator().manual_seed(0)
    latents, contexts = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 8, 8, generator=g)
    unet, scheduler = lora_pipeline.unet, lora_pipeline.scheduler
    featurizer = GradientFeaturizer(unet, scheduler, output_fn, K=4, engine=engine)
    assert featurizer.dim == sum(p.numel() for p in lora_parameters(unet).values())  # LoRA weights only
    got = featurizer(latents, encoder_hidden_states=contexts)
    want = reference_gradients(unet, scheduler, output_fn, 4, latents, contexts)
    assert got.shape == want.shape and want.abs().max() > 0
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() < 1e-4  # float32 rounding only
    # the conditioning matters: another context gives another gradient
    other = featurizer(latents, encoder_hidden_states=contexts.flip(0))
    assert not torch.allclose(other[0], got[0])


def test_conditioning_rows_must_match(lora_pipeline):
    featurizer = GradientFeaturizer(lora_pipeline.unet, lora_pipeline.scheduler, "square", K=2)
    with pytest.raises(ValueError, match="3 rows for 2 images"):
        featurizer(torch.zeros(2, 4, 4, 4), encoder_hidden_states=torch.zeros(3, 8, 8))


def test_featurizer_refuses_a_unet_without_trainable_weights(pipeline):
    pipeline.unet.requires_grad_(False)
    with pytest.raises(ValueError, match="LoRA"):
        ConditionalFeaturizer(pipeline.unet, pipeline.scheduler, FeatureSetting("square", K=2, k=8))


def test_store_of_captioned_inputs_fills_and_matches_direct_features(lora_pipeline, tmp_path):
    torch.manual_seed(0)
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    captions = [f"a handwritten digit {d}" for d in (5, 6, 7, 8, 9)]
    setting = FeatureSetting("square", K=4, k=16)
    inputs = CaptionedInputs.of(lora_pipeline, images, captions)
    featurizer = ConditionalFeaturizer(lora_pipeline.unet, lora_pipeline.scheduler, setting, batch_size=2)
    store = FeatureStore.create(str(tmp_path / "s"), {"x": 1}, 5, 16, slice_size=2)
    store.fill(featurize_fn(featurizer), inputs, show_bar=False)
    direct = featurizer(inputs.latents, inputs.contexts)
    np.testing.assert_allclose(np.asarray(store.features()), direct.numpy(), rtol=1e-5, atol=1e-7)
    # the caption is part of the input: a different prompt, a different feature
    other = featurizer(*CaptionedInputs.of(lora_pipeline, images[:1], ["a handwritten digit 0"])[:])
    assert not torch.allclose(other[0], direct[0])
