"""The app on the committed Fashion-MNIST folder: class names from the folder's classifier, every
method whose inputs the folder has, the look-alike line under the proponents, the offline
counterfactuals."""
import importlib.util
import os
import re

CLASSES = ("ankle-boot", "bag", "coat", "dress", "pullover", "sandal", "shirt", "sneaker", "trouser", "tshirt-top")


def load_test():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("load_test", os.path.join(root, "benchmarks", "load_test.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    parsed = load_test().parse_cards(cards)  # the load test reads named cards (index, label, score)
    assert [i for i, _, _ in parsed] == [int(i) for i in re.findall(r'data-index="(\d+)"', cards)]
    assert len(parsed) == 8 and all(label in range(10) for _, label, _ in parsed)
    assert "Look-alike check" in summary and "top proponents are also in the top 8 of" in summary
    assert any(name in summary for name in CLASSES)


def test_the_header_says_why_there_is_no_live_retrain(fashion_app):
    text = fashion_app.header_markdown(fashion_app.assets())
    assert "No live remove-and-retrain here" in text and "minutes of a CPU core" in text


def test_a_partial_counterfactual_summary_is_drawn_as_provisional():
    """A summary written while retrains are under way: too few targets for a test (p None), no
    classifier labels; drawn with what it has, marked provisional. A summary written before the
    Holm correction was recorded gets it computed from its p-values."""
    from dtrak_core import viz

    cell = {"k": 100, "l2": {"median": 13.3, "p25": 12.9, "p75": 13.7, "n": 2}, "label_changed": None,
            "removed_same_label_share": None}
    partial = {"partial": True, "jobs_done": 4, "jobs_planned": 48,
               "cells": [{**cell, "ranking": "square"}, {**cell, "ranking": "random"}],
               "paired": [{"k": 100, "a": "D-TRAK", "b": "Random", "n": 1, "share_a_moves_more": 1.0,
                           "median_difference": 2.26, "wilcoxon_p": None, "holm_p": None}]}
    text = viz.counterfactual_summary(partial, 1000, "class")
    assert text.startswith("**Provisional:** 4 of 48 retrains") and "| +2.26 | – | – |" in text
    assert "class changed" not in text and "removed images of the target's class" not in text
    older = {"cells": [{**cell, "ranking": "square"}],
             "paired": [{"k": 100, "a": "D-TRAK", "b": "Random", "n": 8, "share_a_moves_more": 1.0,
                         "median_difference": 2.0, "wilcoxon_p": p} for p in (0.01, 0.04)]}
    text = viz.counterfactual_summary(older, 1000, "class")
    assert "Provisional" not in text and "Holm-adjusted p (2 tests)" in text
    assert "| 0.01 | 0.02 |" in text and "| 0.04 | 0.04 |" in text
    assert "removed by both" not in text  # (not recorded in older summaries)
    partial["paired"][0]["median_removed_by_both"] = 36.5
    assert "| 1 | 36.5 of 100 | 100% | +2.26 |" in viz.counterfactual_summary(partial, 1000, "class")


def test_the_counterfactual_tab_shows_the_offline_retrains(fashion_app, tmp_path):
    """No live retrain on this folder: the tab shows the offline run's targets instead, each with its
    regenerated sample per ranking, the pixel L2 and the class read by the folder's classifier; a
    damaged job file turns the view off and names itself in the banner."""
    import shutil

    from dtrak_core.ui import counterfactual, state

    root = fashion_app.assets().root
    results = counterfactual.offline_results(root)
    assert results and all(r.k == 100 for per in results.values() for r in per.values())
    rankings = counterfactual._offline_rankings(results)
    assert [r for r in rankings if r != "das"] == ["square", "pixel-rbf", "random"] and set(rankings) <= {"square", "pixel-rbf", "random", "das"}
    seed = min(s for s, per in results.items() if {"square", "pixel-rbf", "random"} <= set(per))
    views = state.bound(root, counterfactual.offline_views)(seed)
    assert len(views) == 1 + 2 * len(rankings)
    (before, label), *afters = views
    assert label.startswith(f"before: seed {seed}, read as ") and label.rsplit(" ", 1)[1] in CLASSES
    names = {"das": "DAS", "square": "D-TRAK", "pixel-rbf": "Pixel RBF kernel", "random": "Random"}
    assert [lb.split(":")[0] for _, lb in afters[:len(rankings)]] == [f"after removing 100 by {names[r]}" for r in rankings]
    i = rankings.index("square")
    assert all(image is not None for image, _ in [views[0], *afters[:3], *afters[len(rankings):len(rankings) + 3]])
    r = results[seed]["square"]
    assert f"pixel L2 {r.l2:.2f}" in afters[i][1] and afters[len(rankings) + i][1] == "removed by D-TRAK: the first 32 of 100"
    for partial in [s for s, per in results.items() if set(per) != set(rankings)][:1]:  # (while the run goes on)
        views = state.bound(root, counterfactual.offline_views)(partial)
        for i, rk in enumerate(rankings):
            name = views[1 + i][1].split(":")[0]
            if rk in results[partial]:
                assert views[1 + i][0] is not None and name.startswith("after removing 100 by ")
            else:
                assert views[1 + i] == views[1 + len(rankings) + i] == (None, f"{name}: not retrained yet")
    assert before.size == afters[0][0].size and before.size[0] >= 28 * 4  # upscaled by a whole factor

    broken = tmp_path / "broken"
    shutil.copytree(os.path.join(root, "counterfactual", "jobs"), broken / "counterfactual" / "jobs")
    job = sorted((broken / "counterfactual" / "jobs").glob("*.npz"))[0]
    job.write_bytes(job.read_bytes()[:-100])
    assert counterfactual.offline_results(str(broken)) == {}
    assert job.name in counterfactual.damaged_results[str(broken)]
