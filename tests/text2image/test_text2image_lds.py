import os

import numpy as np
import torch

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.evaluation.lds_run import LDSConfig, collect
from dtrak_core.text2image.attributor import TextToImageAttributor
from dtrak_core.text2image.build import build_text2image_from
from dtrak_core.text2image.lds import TextToImageLDSRun, conditional_eps_losses, evaluate, format_table
from dtrak_core.text2image.pipeline import TextToImagePipeline
from dtrak_core.text2image.training import LoraTrainConfig

SETTINGS = (FeatureSetting("square", K=2, k=16), FeatureSetting("loss", K=2, k=16))


def test_conditional_losses_depend_on_the_prompt(lora_pipeline):
    z, h = torch.randn(3, 4, 4, 4), torch.randn(3, 8, 8)
    ts = torch.tensor([100, 600])
    a = conditional_eps_losses(lora_pipeline.unet, lora_pipeline.scheduler, z, h, ts, (0, 1))
    assert a.shape == (2, 2, 3) and (a > 0).all()
    np.testing.assert_array_equal(a, conditional_eps_losses(lora_pipeline.unet, lora_pipeline.scheduler, z, h, ts, (0, 1)))
    b = conditional_eps_losses(lora_pipeline.unet, lora_pipeline.scheduler, z, h.flip(0), ts, (0, 1))
    assert not np.allclose(a, b)


def test_lora_retrain_run_resumes_and_evaluates(own):
    root = str(own / "attr")
    build_text2image_from(root, str(own / "sd"), str(own / "lora"), str(own / "images"), SETTINGS, show_bar=False)
    attributor = TextToImageAttributor.load(root)
    base = TextToImagePipeline.load(str(own / "sd"))
    tests = {"validation": (attributor.train.images[:3], list(attributor.train.captions[:3])),
             "generated": (attributor.generate([0, 1], "a photo of 1", steps=2), ["a photo of 1"] * 2)}
    config = LDSConfig(num_subsets=3, train_seeds=(1, 2), eval_timesteps=2, noise_seeds=(0,), generated=2)
    lora = LoraTrainConfig(steps=2, batch_size=2, rank=2, alpha=2.0)
    out = str(own / "run")
    run = TextToImageLDSRun(out, base, attributor.train, lora, config, tests, {"checkpoint": "x"})
    assert run.run(max_jobs=2, show_bar=False) == ["m000-s1", "m000-s2"]  # in pieces, whole subsets first
    assert len(run.run(show_bar=False)) == 4
    assert run.run(show_bar=False) == []  # resumed: nothing left
    assert len(os.listdir(os.path.join(out, "models"))) == 6
    col = collect(out)
    assert col["masks"].shape == (3, 6) and col["masks"].sum(1).tolist() == [3, 3, 3]
    assert col["F"]["validation"].shape == (3, 3) and col["F"]["generated"].shape == (3, 2)
    # two seeds of one subset are two different LoRA fine-tunings
    assert not np.allclose(col["F_seeds"]["validation"][0], col["F_seeds"]["validation"][1])
    results = evaluate(out, attributor, num_bootstrap=10)
    assert evaluate(out, attributor, K=4, num_bootstrap=10)["methods"]["trak"]["setting"]["K"] == 4  # a K the folder lacks
    assert set(results["methods"]) == {"d-trak", "trak"} and "gradient-cosine" in results["baselines"]
    assert "| D-TRAK, K=2 |" in format_table(results)
