"""The app on the committed Fashion-MNIST folder: class names from the folder's classifier, every
method whose inputs the folder has, the look-alike line under the proponents."""


CLASSES = ("ankle-boot", "bag", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "trouser", "tshirt-top")


class Select:
    def __init__(self, index):
        self.index = index


def test_fashion_samples_are_captioned_with_class_names(fashion_app):
    a = fashion_app.assets()
    assert a.n_train == 1000 and not a.digits and a.classifier is not None
    assert tuple(a.classifier.classes) == CLASSES and a.class_word == "class"
    items, batch = fashion_app.generate_samples("range", 0, 0, 2, 1, 10)
    assert batch["images"].shape == (3, 1, 28, 28)
    assert all(caption.split(": ")[1] in CLASSES for _, caption in items)
    q, _, _, info, _ = fashion_app.select_sample(batch, Select(1))
    assert "looks like a **" in info and "class classifier" in info


def test_fashion_attribution_reads_its_classes_and_flags_look_alikes(fashion_app):
    _, batch = fashion_app.generate_samples("single", 7, 0, 0, 1, 10)
    q = fashion_app.select_sample(batch, Select(0))[0]
    methods = fashion_app.assets().methods
    assert {"square", "loss", "pixel-rbf", "optimal-denoiser"} <= set(methods)
    cards, *_, summary = fashion_app.attribute(q, "square", 8)
    assert sum(cards.count(f"{name}<br>") for name in CLASSES) == 8  # each card names its class
    assert "Look-alike check" in summary and "top proponents are also in the top 8 of" in summary
    assert any(name in summary for name in CLASSES)


def test_the_header_says_why_there_is_no_live_retrain(fashion_app):
    text = fashion_app.header_markdown(fashion_app.assets())
    assert "No live remove-and-retrain here" in text and "minutes of a CPU core" in text
