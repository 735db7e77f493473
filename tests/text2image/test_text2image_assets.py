"""The committed text-to-image miniature loads, verifies and attributes sensibly."""
import numpy as np

from dtrak_core.text2image import TextToImageAttributor
from dtrak_core.text2image.build import MINIATURE_ROOT


def test_miniature_loads_and_attributes_its_own_digits():
    attributor = TextToImageAttributor.load(MINIATURE_ROOT)  # every hash and store checked
    assert attributor.methods == ["loss", "square"] and len(attributor.train) == 747
    idx = np.array([0, 150, 300, 450, 600])
    scores = attributor.scores(attributor.train.images[idx], "d-trak", prompts=[attributor.train.captions[i] for i in idx])
    assert (scores.argmax(1) == idx).all()  # a fine-tuning digit asked with its caption is its own top proponent
    image = attributor.generate([0], "a handwritten digit 7")[0]
    result = attributor.attribute(image, "d-trak", prompt="a handwritten digit 7")
    assert (result.labels[result.proponents(5)] == 7).all()
