"""What the registry says of each method beyond its name: folder kinds, sign, counterfactual use,
menu group, the one default. Menus, handlers and harnesses read these; here they are held to what
the methods compute."""
import numpy as np
import pytest
from conftest import filled_store

from dtrak_core.attribution import methods
from dtrak_core.attribution.attributor import Attribution, Attributor
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.evaluation import counterfactual as cf


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_unet, scheduler, digits):
    """An in-memory attributor over 24 digits with the stores every successor and gradient
    baseline scores with (avg, square, loss), and two of its queries."""
    train = digits.subset(range(24))
    root = tmp_path_factory.mktemp("semantics")
    stores = [filled_store(root / fn, tiny_unet, scheduler, train, FeatureSetting(fn, K=2, k=32))
              for fn in ("avg", "square", "loss")]
    return Attributor(tiny_unet, scheduler, train, stores), digits.images[300:302]


def test_every_entry_states_its_semantics():
    for m in methods.all():
        assert m.kinds and set(m.kinds) <= set(methods.KINDS) and m.group in methods.GROUPS and m.description
    assert methods.DEFAULT in {m.name for m in methods.all("trak")}
    with pytest.raises(ValueError, match="kinds"):
        methods.Method("x", "x", "x", "baseline", 1, kinds=frozenset({"audio"}))
    with pytest.raises(ValueError, match="group"):
        methods.Method("x", "x", "x", "baseline", 1, group="Misc")
    # opponents only where a negative score means one: TRAK's family, gradients, kernel ridges, s|s|
    unsigned = {m.name for m in methods.all() if not m.signed}
    assert unsigned == {"pixel-dot", "pixel-cosine", "clip-dot", "clip-cosine", "latent-dot", "latent-cosine",
                        "pixel-nn", "latent-nn", "optimal-denoiser", "latent-optimal-denoiser", "das", "random"}
    # every model-free baseline of a pixel folder has its twin on a text-to-image folder's VAE latents
    free = [m for m in methods.all("baseline", "pixel") if m.store is None and not m.needs]
    assert all("text2image" in m.kinds for m in free)
    assert {"latent-" + m.name.removeprefix("pixel-") for m in free} == \
        {m.name for m in methods.all("baseline", "text2image") if m.space == "latent"}
    with pytest.raises(ValueError, match="space"):
        methods.Method("x", "x", "x", "baseline", 1, space="audio")
    assert methods.is_signed("d-trak") and methods.is_signed("tracin") and methods.is_signed("eta=0.5")
    assert not methods.is_signed("DAS") and methods.is_signed("not-registered")  # a TRAK-family variant
    assert Attribution("das", np.array([3.0, 1.0, 2.0]), np.zeros(3)).table(2)["opponents"] == []
    assert [r["index"] for r in Attribution("square", np.array([3.0, -1.0, 2.0]), np.zeros(3)).table(1)["opponents"]] == [1]


def test_unsigned_scores_have_one_sign_on_real_queries(scored):
    """Where the registry says "no sign", the scores indeed never change sign (pixel similarity:
    any two digits are mostly background). (Signed ones may happen to keep one sign on a model this
    small: an untrained model's loss gradients all point one way.)"""
    att, queries = scored
    unsigned = [m for m in methods.available(att, clip_path="/nonexistent") if not methods.is_signed(m)]
    assert set(unsigned) == {"pixel-dot", "pixel-cosine", "pixel-nn", "optimal-denoiser", "das"}
    for name in unsigned:
        s = methods.scores(att, name, queries)
        assert (s >= 0).all() or (s <= 0).all(), name
    s = methods.scores(att, "d-trak", queries)  # a ridge regression's weights take both signs
    assert (s > 0).any() and (s < 0).any()


def test_menu_groups_the_available_methods_default_first():
    available = ["avg", "loss", "square", "pixel-dot", "tracin", "pixel-nn", "das", "avg-sharp", "latent-cosine"]
    assert methods.choices(available)[:3] == [methods.DEFAULT, "square", "loss"]
    menu = methods.menu(available)
    assert [g for g, _ in menu] == ["TRAK family", "After the paper", "Gradient baselines", "Similarity baselines",
                                    "Nonparametric baselines (no model)"]
    assert dict(menu)["TRAK family"] == ["avg", "square", "loss"] and dict(menu)["Similarity baselines"] == ["pixel-dot"]
    t2i = dict(methods.menu(available, "text2image"))
    assert t2i["Similarity baselines"] == ["pixel-dot", "latent-cosine"] and "After the paper" not in t2i
    assert methods.choices([]) == [] and methods.menu([]) == []


def test_text_to_image_baselines_are_the_registrys():
    """The text-to-image page, CLI and LDS read the registry: similarities, the gradient baselines over
    the loss (TRAK) store, and the model-free bar on pixels and on VAE latents."""
    t2i = methods.all("baseline", "text2image")
    assert [m.name for m in t2i] == [
        "pixel-dot", "pixel-cosine", "latent-dot", "latent-cosine", "gradient-dot", "gradient-cosine", "relative-ip",
        "renorm-ip", "pixel-nn", "pixel-trak", "pixel-rbf", "pixel-arccos", "optimal-denoiser", "latent-nn",
        "latent-trak", "latent-rbf", "latent-arccos", "latent-optimal-denoiser"]
    assert {m.name for m in t2i if m.store == "loss"} == {"gradient-dot", "gradient-cosine", "relative-ip", "renorm-ip"}
    assert "latent-cosine" not in [m.name for m in methods.all(kind="pixel")]
    with pytest.raises(methods.MethodUnavailable, match="text2image folders only"):
        methods.get("latent-cosine").scores(None, None)


def test_the_counterfactual_accepts_exactly_its_menu(scored):
    """Every ranking the counterfactual's menu offers is accepted and ranks (no retrain: the check
    and the removal it would make); a sharpened method removes what its base removes; what the menu
    leaves out is refused before any sampling."""
    att, queries = scored
    available = methods.available(att, clip_path="/nonexistent")
    menu = methods.counterfactual_rankings(available)
    assert menu[-1] == "random" and {"avg-sharp", "d-trak-sharp", "das"} <= set(menu)
    assert menu[0] == methods.default_method(menu)
    target = cf.sample(att.unet, att.scheduler, 7)  # the seed's DDIM-50 sample (Journey-TRAK follows its trajectory)
    for name in menu:
        assert cf.check_ranking(att, name) == name
        removed = cf.removal(att, target, 7, name, 5)
        assert len(set(removed.tolist())) == 5, name
    assert "tracin" not in menu and "clip-dot" not in menu
    assert list(cf.removal(att, queries[1], 7, "avg-sharp", 6)) == list(cf.removal(att, queries[1], 7, "avg", 6))
    for refused, why in (("latent-cosine", "cannot drive a counterfactual"), ("tracin", "model folder"),
                         ("l1-norm", "no feature store")):
        with pytest.raises(ValueError, match=why):
            cf.check_ranking(att, refused)


def test_the_app_menus_read_the_registry():
    from dtrak_core import app_support as sup

    available = ["loss", "square", "pixel-dot", "das"]
    assert [n for _, n in sup.method_choices(available)] == methods.choices(available)
    assert [n for _, n in sup.ranking_choices(available)] == methods.counterfactual_rankings(available)
    assert "no opponents" in sup.no_opponents("das")
