import os

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.folder import ModelFolder
from dtrak_core.text2image.attributor import TextToImageAttributor
from dtrak_core.text2image.build import build_miniature
from dtrak_core.text2image.training import BaseConfig, LoraTrainConfig, VAEConfig

TINY = dict(vae_config=VAEConfig(steps=2, batch_size=16, block_out_channels=(4, 8)),
            base_config=BaseConfig(steps=2, batch_size=16, block_out_channels=(8, 16), attention_head_dim=4,
                                   text_hidden_size=8, text_layers=1),
            lora_config=LoraTrainConfig(steps=2, batch_size=8, rank=2, alpha=2.0),
            settings=(FeatureSetting("square", K=2, k=16),), show_bar=False, quality=False)


def test_miniature_build_resumes_and_attributes(tmp_path):
    root = str(tmp_path / "t2i")
    manifest = build_miniature(root, **TINY)
    assert manifest["kind"] == "text2image" and manifest["num_train"] == 747
    assert manifest["dataset"] == {"digits": [5, 6, 7, 8, 9], "split": "train"}
    assert sorted(os.listdir(root)) == ["lora", "manifest.json", "pipeline", "stores"]
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(os.path.join(root, "pipeline"), safety_checker=None)
    sd.load_lora_weights(os.path.join(root, "lora"))  # the formats diffusers reads
    seconds = manifest["stage_seconds"]
    again = build_miniature(root, **TINY)  # reuses the pipeline and the LoRA, the store is complete
    assert again["stage_seconds"] == seconds and again["checkpoint_hash"] == manifest["checkpoint_hash"]
    attributor = TextToImageAttributor.load(root)
    image = attributor.generate([0], "a handwritten digit 7", steps=2)[0]
    result = attributor.attribute(image, "d-trak", prompt="a handwritten digit 7")
    assert result.scores.shape == (747,) and set(result.labels.tolist()) == {5, 6, 7, 8, 9}
    # another LoRA recipe retrains the LoRA only (the base pipeline is reused)
    lora2 = LoraTrainConfig(steps=3, batch_size=8, rank=2, alpha=2.0)
    third = build_miniature(root, **{**TINY, "lora_config": lora2})
    assert third["base_hash"] == manifest["base_hash"] and third["checkpoint_hash"] != manifest["checkpoint_hash"]
    assert third["stage_seconds"]["base"] == seconds["base"]
    assert ModelFolder.load(root).extra["recipe"]["lora"]["steps"] == 3
