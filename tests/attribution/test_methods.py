"""The method registry: names, aliases, labels, the paper's column order, typed errors."""
import os

import pytest
import torch
from conftest import filled_store

from dtrak_core.attribution import methods
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.output_functions import OUTPUT_FUNCTIONS, canonical_name
from dtrak_core.errors import MethodUnavailable, UnknownMethod

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets")


def test_names_aliases_and_parametric_eta():
    assert methods.get("D-TRAK").name == methods.get(" dtrak ").name == methods.get("square").name == "square"
    assert methods.get("TRAK").name == "loss" and methods.get("Pixel-Cosine").name == "pixel-cosine"
    eta = methods.get("eta=0.50")
    assert (eta.name, eta.family, eta.store, eta.slug) == ("eta=0.5", "trak", "eta=0.5", "eta0.5")
    assert methods.get("eta=0.5") == eta  # made on request, equal each time
    for bad in ("nearest-neighbour", "", None, 3):
        with pytest.raises(UnknownMethod, match="unknown method"):
            methods.get(bad)
    with pytest.raises(UnknownMethod, match="bad eta"):
        methods.get("eta=half")
    assert methods.find("nearest-neighbour") is None


def test_every_spelling_names_one_method():
    spelled = [m.name for m in methods.all()] + [a for m in methods.all() for a in m.aliases]
    assert len(spelled) == len(set(spelled)) and all(s == s.strip().lower() for s in spelled)
    assert {m.name for m in methods.all("trak")} == set(OUTPUT_FUNCTIONS)  # each output function is registered


def test_labels_keep_the_names_people_and_reports_read():
    assert methods.label("d-trak") == "D-TRAK" and methods.label("loss") == "TRAK"
    assert [methods.label(n) for n in ("journey-trak", "gas", "renorm-ip", "pixel-rbf", "tracin", "avg", "eta=0.5")] \
        == ["Journey-TRAK", "GAS", "Renormalised IP", "Pixel RBF kernel", "TracInCP", "D-TRAK (Avg)", "D-TRAK (eta=0.5)"]
    assert [methods.get(n).slug for n in ("square", "loss", "random")] == ["d-trak", "trak", "random"]
    labels = [m.label for m in methods.all()]
    assert len(labels) == len(set(labels))  # one label a method
    for m in methods.all():  # one style: a proper name or a capitalised description, never the code name
        assert m.label[0].isupper() and m.label != m.name, m
    # what results written before the labels had one style say reads as today's label
    assert [methods.label(n) for n in ("D-TRAK (square)", "TRAK (loss)", "avg, sharpened")] == \
        ["D-TRAK", "TRAK", "D-TRAK (Avg), sharpened"]
    assert methods.label("not-a-method") == "not-a-method" and methods.description("eta=x") == "eta=x"
    assert all(m.description for m in methods.all())


def test_sort_key_is_the_papers_column_order():
    poster = ["pixel-dot", "pixel-cosine", "clip-dot", "clip-cosine", "tracin", "gas", "gradient-dot",
              "gradient-cosine", "journey-trak", "relative-ip", "renorm-ip", "trak", "d-trak"]  # the LDS table's rows
    assert sorted(poster[::-1], key=methods.sort_key) == poster
    report = os.path.join(ASSETS, "benchmarks", "tables.md")
    if os.path.isfile(report):  # the committed report lists them so
        text = open(report).read().split("## Methods")[1].split("\n## ")[0]
        rows = [line.split("|")[1].strip().split(" (")[0] for line in text.splitlines()[4:] if line.startswith("| ")]
        assert rows == poster
    assert sorted(["square", "random", "avg", "loss"], key=methods.sort_key) == ["random", "avg", "loss", "square"]
    assert sorted(["random", "trak", "d-trak"], key=methods.sort_key, reverse=True) == ["d-trak", "trak", "random"]
    assert methods.sort_key("unregistered") == (methods.VARIANT_ORDER, "unregistered")


def test_needs_and_families():
    assert methods.get("journey-trak").needs == {"seeds"} and methods.get("journey-trak").store == "loss"
    assert methods.get("tracin").needs == {"tracin"} and methods.get("clip-dot").needs == {"clip"}
    assert methods.get("pixel-dot").store is None and methods.get("square").store == "square"
    assert [m.name for m in methods.all("control")] == ["random"]
    with pytest.raises(ValueError, match="family"):
        methods.all("nope")


def test_output_function_names_come_from_the_registry():
    assert canonical_name("D-TRAK") == "square" and canonical_name("eta=0.50") == "eta=0.5"
    with pytest.raises(UnknownMethod, match="unknown output function 'pixel-dot'.*baseline"):
        canonical_name("pixel-dot")


def test_scores_errors_are_typed(tiny_unet, scheduler, digits):
    att = Attributor(tiny_unet, scheduler, digits.subset(range(4)), [])
    images = digits.images[:2]
    with pytest.raises(UnknownMethod):
        methods.scores(att, "nearest-neighbour", images)
    with pytest.raises(ValueError, match="no scores"):
        methods.scores(att, "random", images)
    with pytest.raises(MethodUnavailable, match="no feature store"):
        methods.scores(att, "gradient-dot", images)
    with pytest.raises(MethodUnavailable, match="model folder"):  # an in-memory attributor has no checkpoints
        methods.scores(att, "tracin", images)
    assert methods.scores(att, "pixel-dot", images).shape == (2, 4)
    assert torch.equal(torch.as_tensor(methods.scores(att, "pixel-dot", images)),
                       images.flatten(1).double() @ att.train.images.flatten(1).double().T)
    assert methods.available(att, clip_path="/nonexistent") == [
        "pixel-dot", "pixel-cosine", "pixel-nn", "pixel-trak", "pixel-rbf", "pixel-arccos", "optimal-denoiser"]


def test_model_free_baselines_score_as_their_formulas(tiny_unet, scheduler, digits):
    import numpy as np

    from dtrak_core.attribution.kernels import KernelRidge, optimal_denoiser_scores

    train = digits.subset(range(30))
    images = digits.images[40:43]
    att = Attributor(tiny_unet, scheduler, train, [])
    x, q = train.images.flatten(1).double(), images.flatten(1).double()
    np.testing.assert_allclose(methods.scores(att, "pixel-nn", images), -torch.cdist(q, x).pow(2).numpy(), atol=1e-9)
    ridge = KernelRidge("rbf").fit(train.images)
    np.testing.assert_allclose(methods.scores(att, "pixel-rbf", images), ridge.scores(images), rtol=1e-9)
    np.testing.assert_allclose(methods.scores(att, "optimal-denoiser", images),
                               optimal_denoiser_scores(images, train.images, scheduler.alphas_cumprod), rtol=1e-9)
    # tuned hyperparameters from the manifest's entry are used
    att.tuned_params = {"pixel-rbf": {"lambda": 0.5, "gamma": 3.0}}
    np.testing.assert_allclose(methods.scores(att, "pixel-rbf", images),
                               KernelRidge("rbf", 3.0).fit(train.images).scores(images, 0.5), rtol=1e-9)
    # the TRAK formula on pixels is TRAK's scorer on the pixels as features
    from dtrak_core.attribution.scoring import TRAKScorer

    lam = KernelRidge("linear").fit(train.images).default_lambda
    np.testing.assert_allclose(methods.scores(att, "pixel-trak", images),
                               TRAKScorer(lam=lam).fit(x.float()).scores(q.float()), rtol=1e-6, atol=1e-9)


def test_sharpened_scores_are_s_abs_s_and_keep_every_ranking(tmp_path, tiny_unet, scheduler, digits, one_thread):
    import numpy as np

    from dtrak_core.attribution.attributor import Attribution
    from dtrak_core.attribution.features import FeatureSetting, Featurizer
    from dtrak_core.attribution.scoring import TRAKScorer
    from dtrak_core.evaluation import counterfactual as cf

    train, queries = digits.subset(range(40)), digits.images[200:203]
    bare = Attributor(tiny_unet, scheduler, train, [])
    with pytest.raises(MethodUnavailable, match="square"):
        methods.scores(bare, "d-trak-sharp", queries)
    setting = FeatureSetting("square", K=4, k=64)
    store = filled_store(tmp_path / "square", tiny_unet, scheduler, train, setting)
    featurize = Featurizer(tiny_unet, scheduler, setting)
    att = Attributor(tiny_unet, scheduler, train, [store])
    got = methods.scores(att, "sharp-d-trak", queries)
    # the closed form, from the store's features and the attributor's lambda
    s = TRAKScorer(lam=att.lambda_for(setting)).fit(np.array(store.features())).scores(featurize(queries))
    np.testing.assert_allclose(got, s * np.abs(s), rtol=1e-6, atol=1e-15)
    signed = methods.scores(att, "d-trak", queries)
    labels = train.labels.numpy()
    for q in range(len(queries)):
        sharp, plain = Attribution("d-trak-sharp", got[q], labels), Attribution("square", signed[q], labels)
        assert list(sharp.proponents(10)) == list(plain.proponents(10))
        assert list(sharp.opponents(10)) == list(plain.opponents(10))
        assert list(cf.removal(att, queries[q], 0, "d-trak-sharp", 12)) == list(cf.removal(att, queries[q], 0, "square", 12))
    assert methods.get("d-trak-sharp").family == "successor" and methods.label("avg-sharp") == "D-TRAK (Avg), sharpened"


def test_the_default_is_what_its_rule_picks_from_the_committed_evidence():
    """The rule of `methods.DEFAULT` re-applied to assets/benchmarks/evidence.json: among the methods
    that use the model and need only the query, the highest validation top-1% LDS (a sharpened
    method ties with its base, which is kept)."""
    import json
    import os

    from tests.conftest import ASSETS

    with open(os.path.join(ASSETS, "benchmarks", "evidence.json")) as f:
        rows = json.load(f)["rows"]
    candidates = [r for r in rows if methods.find(r["method"]) is not None
                  and methods.get(r["method"]).family in methods.DEFAULT_CANDIDATE_FAMILIES
                  and "seeds" not in methods.get(r["method"]).needs]
    assert {"square", "loss", "avg", "das"} <= {r["method"] for r in candidates}
    best = max(candidates, key=lambda r: r["validation/top-1%"])
    assert best["method"] == methods.DEFAULT
    assert methods.default_method(["loss", "square", methods.DEFAULT]) == methods.DEFAULT
    assert methods.default_method(["loss", "square"]) == "square"
