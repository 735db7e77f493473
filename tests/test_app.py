"""The Gradio app's handlers, called directly on a tiny model folder (no server, no browser),
and the app's small core helpers (dtrak_core.app_support) against brute-force references."""
import io
import json
import os
import re

import numpy as np
import pytest
import torch

from dtrak_core import app_support as sup
from dtrak_core.attribution.attributor import RULE
from dtrak_core.shared import OnceCache
from conftest import EXAMPLE_K, EXAMPLE_SEED, EXAMPLE_TRAIN


class Select:
    """Stands in for gr.SelectData (the handlers read .index / .row_value)."""

    def __init__(self, index, row_value=None):
        self.index, self.row_value = index, row_value


def card_indices(html):
    """Training indices shown in an HTML grid of cards, in order."""
    return [int(i) for i in re.findall(r"<b>#(\d+)</b>", html)]


# ---------------------------------------------------------------- app_support vs brute force

def test_parse_seeds():
    assert sup.parse_seeds("single", 7) == [7]
    assert sup.parse_seeds("range", start=3, end=6) == [3, 4, 5, 6]
    r = sup.parse_seeds("random", count=5, rng_seed=1)
    assert len(set(r)) == 5 and r == sup.parse_seeds("random", count=5, rng_seed=1)
    for bad in [dict(mode="range", start=5, end=2), dict(mode="range", start=0, end=100), dict(mode="single", seed=-1),
                dict(mode="single", seed=1.5), dict(mode="single", seed=None), dict(mode="random", count=0),
                dict(mode="bogus")]:
        with pytest.raises(ValueError):
            sup.parse_seeds(**bad)


def test_class_mass_matches_loops():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=200), rng.integers(0, 10, 200)
    mass = sup.class_mass(scores, labels, 10)
    pos = [sum(s for s, l in zip(scores, labels) if l == c and s > 0) for c in range(10)]
    neg = [sum(-s for s, l in zip(scores, labels) if l == c and s < 0) for c in range(10)]
    np.testing.assert_allclose(mass["positive"], np.array(pos) / sum(pos))
    np.testing.assert_allclose(mass["negative"], np.array(neg) / sum(neg))
    assert mass["count"].tolist() == [int((labels == c).sum()) for c in range(10)]
    with pytest.raises(ValueError):
        sup.class_mass(scores, np.full(200, -1))


def test_overlap_thresholds_and_rank_correlation_match_brute_force():
    rng = np.random.default_rng(1)
    a = rng.normal(size=300)
    b = a + rng.normal(scale=1.0, size=300)
    k = 20
    top_a = sorted(range(300), key=lambda i: -a[i])[:k]
    top_b = sorted(range(300), key=lambda i: -b[i])[:k]
    assert sup.top_k_overlap(a, b, k) == len(set(top_a) & set(top_b))
    assert sup.top_k_overlap(a, a, k) == k
    lo, hi = sup.top_k_thresholds(a, k)
    assert hi == a[top_a[-1]] and lo == sorted(a)[k - 1]

    def ranks(x):  # average ranks for ties, by counting
        return np.array([sum(y < v for y in x) + (sum(y == v for y in x) + 1) / 2 for v in x])
    b[:10] = b[0]  # ties
    ra, rb = ranks(a), ranks(b)
    expected = np.corrcoef(ra, rb)[0, 1]
    assert sup.rank_correlation(a, b) == pytest.approx(expected, abs=1e-12)
    assert sup.rank_correlation(a, a) == pytest.approx(1.0)
    assert sup.rank_correlation(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        sup.rank_correlation(a, b[:10])


def test_lru_cache_forgets_oldest():
    c = OnceCache(2)
    c.put("a", 1), c.put("b", 2)
    assert c.peek("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert "b" not in c and c.peek("a") == 1 and c.peek("c") == 3 and len(c) == 2


def test_benchmark_tables(tmp_path):
    assert sup.read_benchmarks(str(tmp_path / "missing")) == []
    (tmp_path / "lds.json").write_text('{"k": 2048, "methods": [{"method": "TRAK", "lds": 10.5}, '
                                       '{"method": "D-TRAK", "lds": 20.1}], "by_K": {"10": {"lds": 1.0}, "100": {"lds": 2.0}}}')
    (tmp_path / "lds.md").write_text("# LDS")
    (tmp_path / "broken.json").write_text("{")
    items = {i["name"]: i for i in sup.read_benchmarks(str(tmp_path))}
    assert "error" in items["broken"] and items["lds"]["markdown"] == "# LDS"
    tables = dict(sup.records(items["lds"]["data"]))
    assert dict(sup.records([{"a": 1, "l2": {"median": 2.0}, "xs": [1]}])) == {"results": [{"a": 1, "l2.median": 2.0}]}
    assert tables["summary"] == [{"k": 2048}]
    assert tables["methods"][1] == {"method": "D-TRAK", "lds": 20.1}
    assert tables["by_K"] == [{"name": "10", "lds": 1.0}, {"name": "100", "lds": 2.0}]


# ---------------------------------------------------------------- handlers on the tiny folder

def test_demo_builds_without_launching(app):
    import gradio as gr

    assert isinstance(app.demo, gr.Blocks)
    assert app.assets().attributor.methods == ["loss", "square"]
    methods = app.assets().methods  # discovered from the core: TRAK family + baselines that can run here
    assert methods[:2] == ["loss", "square"] and "pixel-cosine" in methods and "journey-trak" in methods
    assert "tracin" not in methods and "tracin" in app.assets().unavailable  # no checkpoints in the tiny folder
    assert sup.method_choices(methods)[0] == ("D-TRAK (square)", "square")


def test_generate_and_select(app):
    import gradio as gr

    items, batch = app.generate_samples("range", 0, 3, 5, 1, 10)
    assert batch["seeds"] == [3, 4, 5] and batch["images"].shape == (3, 1, 8, 8)
    assert [c.split(":")[0] for _, c in items] == ["seed 3", "seed 4", "seed 5"]
    assert items[0][0].size == (2 * app.THUMB_PX,) * 2  # nearest-neighbour upscaled by a whole factor
    single, b1 = app.generate_samples("single", 4, 0, 0, 1, 10)
    np.testing.assert_allclose(b1["images"][0], batch["images"][1], atol=1e-4)  # a seed is a seed, whatever the batch
    with pytest.raises(gr.Error, match="smaller than the first"):
        app.generate_samples("range", 0, 5, 2, 1, 10)
    q, tabs, img, info, cf_seed = app.select_sample(batch, Select(1))
    assert q["seed"] == 4 and cf_seed == 4 and "seed 4" in q["title"] and "looks like" in info
    assert img.size == (app.QUERY_PX,) * 2


def test_attribute_and_compare(app):
    import gradio as gr

    _, batch = app.generate_samples("range", 0, 0, 1, 1, 10)
    q = app.select_sample(batch, Select(0))[0]
    props, opps, hist, mass, summary = app.attribute(q, "square", 5)
    expected = app.assets().attributor.attribute(torch.as_tensor(q["pixels"]), "square")
    order = np.argsort(-expected.scores)
    assert card_indices(props) == order[:5].tolist()
    assert card_indices(opps) == order[::-1][:5].tolist()
    assert "D-TRAK" in summary and "of 5" in summary
    assert len(hist.data) == 3 and len(hist.data[0].x) == len(expected.scores)
    assert [t.name for t in mass.data][:2] == ["proponent mass", "opponent mass"]
    att = app.assets().attributor
    real = att.featurizer
    att.featurizer = lambda setting: pytest.fail("a repeated query must not featurize again")
    try:
        # another k, same query and method; the summary does not tell whether someone asked before
        assert "cached" not in app.attribute(q, "square", 8)[4]
    finally:
        att.featurizer = real
    ga, gb, text = app.compare(q, "square", "loss", 6)
    other = app.assets().attributor.attribute(torch.as_tensor(q["pixels"]), "loss")
    assert f"overlap **{sup.top_k_overlap(expected.scores, other.scores, 6)} of 6**" in text
    assert f"{sup.rank_correlation(expected.scores, other.scores):.3f}" in text
    assert card_indices(ga) == expected.proponents(6).tolist() and card_indices(gb) == other.proponents(6).tolist()
    assert ga.count("<img") == 6 and "data:image/png;base64," in ga
    with pytest.raises(gr.Error, match="No query yet"):
        app.attribute(None, "square", 5)


def test_every_method_attributes_and_baselines_match_a_direct_computation(app):
    import gradio as gr

    _, batch = app.generate_samples("single", 2, 0, 0, 1, 50)  # journey-trak needs the DDIM-50 trajectory
    q = app.select_sample(batch, Select(0))[0]
    for method in app.assets().methods:
        props = app.attribute(q, method, 4)[0]
        assert len(card_indices(props)) == 4, method
    train = app.assets().attributor.train.images.flatten(1).double().numpy()
    x = q["pixels"].reshape(-1).astype(np.float64)
    cos = [x @ t / np.linalg.norm(x) / np.linalg.norm(t) for t in train]
    assert card_indices(app.attribute(q, "pixel-cosine", 5)[0]) == sorted(range(len(cos)), key=lambda i: -cos[i])[:5]
    upload = dict(q, key=sup.QueryKey.for_pixels(q["pixels"]), seed=None, steps=None)
    with pytest.raises(gr.Error, match="generated samples only"):
        app.attribute(upload, "journey-trak", 4)


def _png(mode, size=(20, 20), color=0, **save):
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def test_upload_validation(app, tmp_path):
    import gradio as gr
    from PIL import Image, ImageDraw

    img = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(img).rectangle([24, 8, 39, 55], fill=0)  # a dark "1" on white paper: columns 3 and 4
    good = tmp_path / "one.jpg"
    img.save(good)
    q, preview, info = app.use_upload(str(good), True)
    assert q["pixels"].shape == (1, 8, 8) and q["pixels"][0, 4, 4] > 0.5 and q["pixels"][0, 4, 0] < -0.5
    assert preview.size == (app.QUERY_PX,) * 2 and "inverted" in info
    q2 = app.use_upload(str(good), False)[0]
    np.testing.assert_allclose(q2["pixels"], -q["pixels"], atol=1e-6)
    props = app.attribute(q, "square", 3)[0]
    assert len(card_indices(props)) == 3

    frames = [Image.new("L", (8, 8), c) for c in (0, 255)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    bad = {"notes.png": b"this is not an image", "empty.png": b"", "anim.gif": gif.getvalue(),
           "deep.png": _png("I;16"), "alpha.png": _png("RGBA"), "truncated.png": _png("L")[:40]}
    messages = {"notes.png": "not a readable image", "empty.png": "empty", "anim.gif": "animated",
                "deep.png": "16-bit", "alpha.png": "transparency", "truncated.png": "not a readable image"}
    for name, data in bad.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(gr.Error, match=messages[name]):
            app.use_upload(str(path), True)
    assert app.use_upload(None, True)[0] is not None  # nothing uploaded: no change, no error


def test_counterfactual_live_cached_and_cancelled(app, monkeypatch):
    cancelled = []

    class CancelAtFirstStep:  # a progress tracker that presses Cancel once training has started
        def __call__(self, fraction, desc=None):
            if "retraining" in (desc or "") and not cancelled:
                cancelled.append(app.cancel_retrain(None))

    out = app.run_counterfactual(1001, 40, "square", "none", None, CancelAtFirstStep())
    assert cancelled and out[-1].startswith("Cancelled") and (1001, "square", 40) not in app._counterfactual_cache

    before, after_a, after_b, rows, removed_a, removed_b, status = app.run_counterfactual(1001, 40, "square", "none", None)
    assert len(rows) == 1 and rows[0][:2] == ["D-TRAK (square)", 40] and rows[0][-1].endswith(" s")
    view = app._counterfactual_cache.peek((1001, "square", 40))
    assert rows[0][2] == round(view.l2, 3)
    a = app.assets().attributor
    target = app.generate(a.unet, a.scheduler, [1001], steps=50)[0]
    # exactly its top-40 under the counterfactual's ranking (the data-free lambda rule)
    assert view.removed.tolist() == a.attribute(target, "square", lam=RULE).proponents(40).tolist()
    assert "Seed 1001" in status and after_a.value is not None and removed_a.value is not None
    assert after_b.value is None  # no second ranking
    from dtrak_core.evaluation import counterfactual

    monkeypatch.setattr(counterfactual, "remove_and_retrain", lambda *a, **k: pytest.fail("cached: no retrain"))
    again = app.run_counterfactual(1001, 40, "square", "none", None)
    assert again[3] == rows


def test_precomputed_examples_show_instantly(app, monkeypatch):
    rows = app.example_targets(app.ASSETS)
    assert rows == [[EXAMPLE_SEED, EXAMPLE_K, "square", "random"]]
    first = app.first_example()
    assert first[:4] == (EXAMPLE_SEED, EXAMPLE_K, "square", "random")
    table = first[4 + 3]
    assert [r[-1] for r in table] == ["precomputed", "precomputed"]
    from dtrak_core.evaluation import counterfactual

    monkeypatch.setattr(counterfactual, "remove_and_retrain", lambda *a, **k: pytest.fail("precomputed: no retrain"))
    out = app.run_counterfactual(EXAMPLE_SEED, EXAMPLE_K, "square", "random", None)
    assert out[3] == table
    shown = app.show_example(Select((0, 0), [EXAMPLE_SEED, EXAMPLE_K, "D-TRAK (square)", "random"]))
    assert shown[:4] == (EXAMPLE_SEED, EXAMPLE_K, "square", "random")


def test_committed_harness_jobs_show_without_retraining(app, tiny_root, tmp_path, monkeypatch):
    """Finished `counterfactual` jobs under assets/counterfactual/jobs are served instantly, but only
    when a live retrain here would reproduce them (same recipe, model, stores)."""
    import shutil

    from dtrak_core.evaluation import counterfactual

    root = str(tmp_path / "assets")
    shutil.copytree(tiny_root, root)
    shutil.rmtree(os.path.join(root, "counterfactual", "gallery"))
    os.rename(os.path.join(root, "counterfactual", "runs"), os.path.join(root, "counterfactual", "jobs"))
    monkeypatch.setattr(app, "ASSETS", root)
    monkeypatch.setattr(counterfactual, "remove_and_retrain", lambda *a, **k: pytest.fail("committed: no retrain"))
    assert app.committed(root) == {}  # the jobs used another recipe than the model's manifest: never shown
    assert app.example_targets(root) == []

    manifest_path = os.path.join(root, "manifest.json")
    manifest = json.load(open(manifest_path))
    manifest["train_config"] = EXAMPLE_TRAIN.to_dict()
    json.dump(manifest, open(manifest_path, "w"))
    app.committed.cache_clear()
    assert sorted(app.committed(root)) == [(EXAMPLE_SEED, "random", EXAMPLE_K), (EXAMPLE_SEED, "square", EXAMPLE_K)]
    assert app.example_targets(root) == [[EXAMPLE_SEED, EXAMPLE_K, "square", "random"]]
    out = app.run_counterfactual(EXAMPLE_SEED, EXAMPLE_K, "square", "random", None)
    job = counterfactual.load_job(os.path.join(root, "counterfactual", "jobs", f"d-trak-k{EXAMPLE_K}-seed{EXAMPLE_SEED}.npz"))
    assert [r[-1] for r in out[3]] == ["precomputed", "precomputed"] and out[3][0][2] == round(job.l2, 3)
    app.committed.cache_clear()


def test_benchmarks_tab_renders(app, tmp_path):
    import gradio as gr

    def texts(blocks):
        return " ".join(str(getattr(b, "value", "")) for b in blocks.blocks.values())

    with gr.Blocks() as empty:
        app.benchmarks_blocks(str(tmp_path))
    assert "No benchmark results yet" in texts(empty)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "counterfactual").mkdir()
    study = {"paper": {"lds": 30.0, "pm": 1.0}, "honest": {"lds": 28.0, "pm": 1.5}, "default": {"lds": 25.0, "pm": 1.2}}
    (tmp_path / "benchmarks" / "lds_results.json").write_text(json.dumps(
        {"partial": True, "subsets_done": 10, "subsets_planned": 64,
         "methods": {"square": {"validation": study, "generated": study, "setting": {"K": 100}}}}))
    (tmp_path / "benchmarks" / "other.json").write_text('[{"method": "TRAK", "lds": 10.5}, {"method": "D-TRAK", "lds": 20.1}]')
    (tmp_path / "benchmarks" / "README.md").write_text("protocol notes")
    (tmp_path / "counterfactual" / "summary.json").write_text(json.dumps({"cells": [
        {"k": 300, "ranking": "square", "method": "D-TRAK", "label_changed": 0.5,
         "l2": {"median": 2.0, "p25": 1.5, "p75": 2.5, "n": 2},
         "per_target": [{"seed": 1000, "l2": 1.5, "label_before": 3, "label_after": 3},
                        {"seed": 1001, "l2": 2.5, "label_before": 4, "label_after": 9}]}]}))
    (tmp_path / "counterfactual" / "results.md").write_text("| removed k | D-TRAK |")
    (tmp_path / "benchmarks" / "tables.json").write_text(json.dumps(
        {"methods": {"d-trak/K100": {"validation": study, "generated": study}, "pixel-cosine": {
            "validation": {"lds": 5.0, "pm": 2.0}, "generated": {"lds": 4.0, "pm": 2.0}}, "clip-dot": {"unavailable": "x"}}}))
    (tmp_path / "benchmarks" / "tables.md").write_text("# title\n| method | validation |\n| pixel-cosine | 5.0 ± 2.0 |")
    with gr.Blocks() as full:
        app.benchmarks_blocks(str(tmp_path))
    kinds = [type(b).__name__ for b in full.blocks.values()]
    assert kinds.count("Plot") == 4 and kinds.count("Dataframe") == 2  # LDS, tables, counterfactual, other.json
    text = texts(full)
    assert "Provisional" in text and "| removed k | D-TRAK |" in text and "protocol notes" in text
    assert "| pixel-cosine | 5.0 ± 2.0 |" in text and "# title" not in text


def test_table_rows():
    study = {"paper": {"lds": 30.0, "pm": 1.0}, "honest": {"lds": 28.04, "pm": 1.5}}
    rows = sup.table_rows({"d-trak/K10": {"generated": study}, "pixel-dot": {"validation": {"lds": 3.0, "pm": 1.0}},
                           "clip-dot": {"unavailable": "no weights"}, "trak/K1000": {"missing": "cmd"}})
    assert rows == [{"method": "d-trak/K10", "test set": "generated", "LDS (honest lambda)": 28.04, "+- (honest)": 1.5},
                    {"method": "pixel-dot", "test set": "validation", "LDS (honest lambda)": 3.0, "+- (honest)": 1.0}]


def test_benchmark_rows():
    study = {"paper": {"lds": 30.0, "pm": 1.0}, "honest": {"lds": 28.04, "pm": 1.5}, "default": {"lds": 25.0, "pm": 1.2}}
    rows = sup.lds_rows({"methods": {"loss": {"validation": study, "setting": {"K": 10}}}})
    assert rows == [{"method": "TRAK (loss)", "test set": "validation", "LDS (paper lambda)": 30.0, "+- (paper)": 1.0,
                     "LDS (honest lambda)": 28.04, "+- (honest)": 1.5, "LDS (default lambda)": 25.0,
                     "+- (default)": 1.2}]


def test_counterfactual_chart_shows_every_target(app):
    cell = lambda k, method, l2s: {"k": k, "ranking": method.lower(), "method": method, "per_target": [
        {"seed": 1000 + i, "l2": v, "label_before": 1, "label_after": 1 + (v > 2)} for i, v in enumerate(l2s)]}
    fig = app.counterfactual_chart({"cells": [cell(75, "Random", [0.5, 1.0]), cell(300, "Random", [1.0, 1.5]),
                                              cell(300, "D-TRAK", [2.0, 3.0, 2.5])]})
    boxes = {t.name: t for t in fig.data}
    assert list(boxes) == ["300 removed", "75 removed"] and all(t.boxpoints == "all" for t in fig.data)
    assert list(boxes["300 removed"].x) == ["Random", "Random", "D-TRAK", "D-TRAK", "D-TRAK"]
    assert list(boxes["300 removed"].y) == [1.0, 1.5, 2.0, 3.0, 2.5] and list(boxes["75 removed"].y) == [0.5, 1.0]
    assert boxes["300 removed"].text[3] == "seed 1001: label 1 -> 2"
    assert list(fig.layout.xaxis.categoryarray) == ["Random", "D-TRAK"]  # the paper's column order
