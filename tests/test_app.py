"""The Gradio app's handlers, called directly on a tiny model folder (no server, no browser),
the app's small core helpers (dtrak_core.app_support) against brute-force references, and the
figures and cards of dtrak_core.viz."""
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import ASSETS, EXAMPLE_K, EXAMPLE_SEED, EXAMPLE_TRAIN

from dtrak_core import app_support as sup
from dtrak_core.attribution.base import RULE
from dtrak_core.query import Query
from dtrak_core.shared import OnceCache


class Select:
    """Stands in for gr.SelectData (the handlers read .index / .row_value)."""

    def __init__(self, index, row_value=None):
        self.index, self.row_value = index, row_value


class Clicked:
    """Stands in for gr.EventData of a card click (the page sends {"index": i})."""

    def __init__(self, data):
        self._data = data


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
    """Every benchmark JSON is read only as its writer wrote it: a sealed one reads (without its
    checksum field); one that is edited, unsealed and unrecorded, or not JSON is an error naming it,
    with no data; the sidecar itself is not a result."""
    from dtrak_core import checksums

    assert sup.read_benchmarks(str(tmp_path / "missing")) == []
    lds = {"k": 2048, "methods": [{"method": "TRAK", "lds": 10.5}, {"method": "D-TRAK", "lds": 20.1}],
           "by_K": {"10": {"lds": 1.0}, "100": {"lds": 2.0}}}
    checksums.write_sealed_json(str(tmp_path / "lds.json"), lds)
    checksums.write_sealed_json(str(tmp_path / "edited.json"), {"lds": 1.0})
    (tmp_path / "edited.json").write_text((tmp_path / "edited.json").read_text().replace("1.0", "9.0"))
    (tmp_path / "plain.json").write_text(json.dumps({"lds": 1.0}))  # written by hand: no checksum anywhere
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "lds.md").write_text("# not read: reports are drawn from the verified data")
    items = {i["name"]: i for i in sup.read_benchmarks(str(tmp_path))}
    assert set(items) == {"lds", "edited", "plain", "broken"} and items["lds"]["data"] == lds
    for name, why in (("edited", "does not match its own content_sha256"), ("plain", "has no recorded checksum"),
                      ("broken", "is not valid JSON")):
        assert "data" not in items[name] and items[name]["error"].startswith(f"{tmp_path / name}.json (benchmark "
                                                                            f"result) {why}"), items[name]
    checksums.record(str(tmp_path), ["plain.json"])  # a legacy file recorded in the sidecar reads; once gone, named
    os.remove(tmp_path / "plain.json")
    items = {i["name"]: i for i in sup.read_benchmarks(str(tmp_path))}
    assert "checksums" not in items and "is missing" in items["plain"]["error"]
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
    assert sup.method_choices(methods)[0] == ("D-TRAK", "square")


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
    assert q.seed == 4 and cf_seed == 4 and "seed 4" in q.title and "looks like" in info
    assert img.size == (app.QUERY_PX,) * 2


def test_select_sample_refuses_bad_indices_with_a_readable_message(app):
    """The reported defect: index -1 selected the last sample, and bad indices were answered with raw
    Python messages ("list indices must be integers or slices, not str")."""
    import gradio as gr

    _, batch = app.generate_samples("range", 0, 3, 5, 1, 10)
    for bad in (-1, 3, 10 ** 30, "abc", True, 1.5, float("nan"), [7, 0], {"i": 1}):
        with pytest.raises(gr.Error, match=r"Click one of the 3 samples shown: sample must be a whole number in "
                                           r"0\.\.2, got "):
            app.select_sample(batch, Select(bad))
    with pytest.raises(gr.Error, match="Generate samples first"):
        app.select_sample(batch, Select(None))
    with pytest.raises(gr.Error, match="Generate samples first"):
        app.select_sample({"seeds": [], "steps": 10, "images": batch["images"][:0]}, Select(0))
    assert app.select_sample(batch, Select([2, 0]))[0].seed == 5  # a gallery's [row, col]
    assert app.select_sample(batch, Select(0))[0].seed == 3


def test_a_new_page_opens_with_the_samples_its_controls_show(app):
    items, batch = app.first_page()
    assert batch["seeds"] == app.FIRST_SEEDS == list(range(16)) and batch["steps"] == app.FIRST_STEPS == 50
    shown = {b.label: b.value for b in app.demo.blocks.values()
             if getattr(b, "label", None) in ("First seed", "Last seed", "DDIM steps")}
    assert shown == {"First seed": 0, "Last seed": 15, "DDIM steps": 50}
    _, again = app.generate_samples("range", 0, 0, 15, 1, 50)
    np.testing.assert_array_equal(again["images"], batch["images"])  # the Generate button's batch: the same key


def test_attribute_and_compare(app):
    import gradio as gr

    _, batch = app.generate_samples("range", 0, 0, 1, 1, 10)
    q = app.select_sample(batch, Select(0))[0]
    props, opps, hist, mass, summary = app.attribute(q, "square", 5)
    expected = app.assets().attributor.attribute(torch.as_tensor(q.pixels), "square")
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
    other = app.assets().attributor.attribute(torch.as_tensor(q.pixels), "loss")
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
    x = q.pixels.reshape(-1).astype(np.float64)
    cos = [x @ t / np.linalg.norm(x) / np.linalg.norm(t) for t in train]
    assert card_indices(app.attribute(q, "pixel-cosine", 5)[0]) == sorted(range(len(cos)), key=lambda i: -cos[i])[:5]
    upload = Query.upload(q.pixels, q.title)
    with pytest.raises(gr.Error, match="generated samples only"):
        app.attribute(upload, "journey-trak", 4)


def test_opponents_only_for_signed_methods_and_the_ranking_menu_is_what_retrain_accepts(app):
    import gradio as gr

    from dtrak_core.attribution import methods as registry

    _, batch = app.generate_samples("range", 0, 0, 1, 1, 10)
    q = app.select_sample(batch, Select(0))[0]
    _, opps, hist, _, summary = app.attribute(q, "pixel-dot", 4)  # a similarity of the pixels: no sign
    assert card_indices(opps) == [] and "No opponents" in opps and "opponents" not in summary
    assert [t.name for t in hist.data] == ["all training images", "top-4 proponents"]
    assert len(card_indices(app.attribute(q, "square", 4)[1])) == 4
    # the Counterfactual tab's menu (its "Ranking A" choices) is exactly what its handler accepts
    menu = next(b.choices for b in app.demo.blocks.values() if getattr(b, "label", None) == "Ranking A")
    assert [name for _, name in menu] == registry.counterfactual_rankings(app.assets().methods)
    assert {"avg-sharp", "d-trak-sharp", "das"} & set(app.assets().methods) <= {name for _, name in menu}
    with pytest.raises(gr.Error, match="ranking A"):
        app.run_counterfactual(1001, 40, "clip-dot", "none", None)


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
    assert q.pixels.shape == (1, 8, 8) and q.pixels[0, 4, 4] > 0.5 and q.pixels[0, 4, 0] < -0.5
    assert preview.size == (app.QUERY_PX,) * 2 and "inverted" in info
    q2 = app.use_upload(str(good), False)[0]
    np.testing.assert_allclose(q2.pixels, -q.pixels, atol=1e-6)
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
    assert cancelled and out[-1].startswith("Cancelled") and (app.ASSETS, 1001, "square", 40) not in app._counterfactual_cache
    assert len(out) == 8 and all(o == app.gr.update() for o in out[:-1])  # what was shown stays, named by its heading

    before, after_a, after_b, rows, removed_a, removed_b, shown, status = app.run_counterfactual(
        1001, 40, "square", "none", None)
    assert len(rows) == 1 and rows[0][0] == "D-TRAK" and rows[0][-1].endswith(" s")
    assert "Shown: seed 1001, 40 of" in shown
    view = app._counterfactual_cache.peek((app.ASSETS, 1001, "square", 40))
    assert rows[0][1] == round(view.l2, 3)
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
    found = app.outcomes(app.ASSETS)
    square, rand = found[(EXAMPLE_SEED, "square", EXAMPLE_K)], found[(EXAMPLE_SEED, "random", EXAMPLE_K)]
    label = sup.method_label
    assert rows == [[EXAMPLE_SEED, EXAMPLE_K,
                     f"{label('square')}: {square['l2']:.2f}, {square['label_before']} → {square['label_after']}",
                     f"{label('random')}: {rand['l2']:.2f}, {rand['label_before']} → {rand['label_after']}"]]
    first = app.first_example()
    assert first[:3] == (EXAMPLE_SEED, EXAMPLE_K, "square")  # ranking B keeps its own value ("none")
    table = first[3 + 3]
    assert [r[-1] for r in table] == ["precomputed", "precomputed"]
    assert first[-2]["value"] == rows and "pixel L2" in first[-1]
    from dtrak_core.evaluation import counterfactual

    monkeypatch.setattr(counterfactual, "remove_and_retrain", lambda *a, **k: pytest.fail("precomputed: no retrain"))
    visit = app.first_visit(False, None)  # (gr.Image outputs compare by identity: the rest is compared)
    assert visit[:3] == first[:3] and visit[6] == table and visit[9:-1] == first[9:] and visit[-1] is True
    picked = app.first_visit(False, Query.sample(5, 50, np.zeros((1, 8, 8))))  # a picked sample's seed stays in the box
    assert picked[0] == app.gr.update() and picked[6] == table and picked[9:-1] == first[9:]
    assert all(o == app.gr.update() for o in app.first_visit(True, None)[:-1])  # once per visitor
    out = app.run_counterfactual(EXAMPLE_SEED, EXAMPLE_K, "square", "random", None)
    assert out[3] == table
    shown = app.show_example(Select([0, 2], rows[0]))
    assert shown[:3] == (EXAMPLE_SEED, EXAMPLE_K, "square") and shown[3 + 3] == table
    assert app.retrain_plan(EXAMPLE_SEED, EXAMPLE_K, "square", "random").startswith("Every result asked for is precomputed")
    plan = app.retrain_plan(EXAMPLE_SEED + 7, EXAMPLE_K, "square", "random")
    assert "One retrain takes about" in plan and "2 retrains" in plan
    assert app.retrain_plan("not a seed", EXAMPLE_K, "square", "none") == ""


def test_committed_harness_jobs_show_without_retraining(app, tiny_root, tmp_path, monkeypatch):
    """Finished `counterfactual` jobs under assets/counterfactual/jobs are served instantly, but only
    when a live retrain here would reproduce them (same recipe, model, stores)."""
    import shutil

    from dtrak_core.evaluation import counterfactual

    root = str(tmp_path / "assets")
    shutil.copytree(tiny_root, root)
    shutil.rmtree(os.path.join(root, "counterfactual", "gallery"))
    os.rename(os.path.join(root, "counterfactual", "runs"), os.path.join(root, "counterfactual", "jobs"))
    monkeypatch.setattr(app.module_of("ASSETS"), "ASSETS", root)
    monkeypatch.setattr(counterfactual, "remove_and_retrain", lambda *a, **k: pytest.fail("committed: no retrain"))
    app.outcomes.cache_clear()
    assert app.committed(root) == {}  # the jobs used another recipe than the model's manifest: never shown
    assert app.example_targets(root) == []

    from dtrak_core.folder import ModelFolder

    ModelFolder.edit(root, train_config=EXAMPLE_TRAIN)  # (a writer: sealed; a hand edit of the recipe is refused)
    app.committed.cache_clear()
    app.outcomes.cache_clear()
    assert sorted(app.committed(root)) == [(EXAMPLE_SEED, "random", EXAMPLE_K), (EXAMPLE_SEED, "square", EXAMPLE_K)]
    rows = app.example_targets(root)
    assert [(r[0], r[1], r[2].split(":")[0], r[3].split(":")[0]) for r in rows] == [
        (EXAMPLE_SEED, EXAMPLE_K, sup.method_label("square"), sup.method_label("random"))]
    out = app.run_counterfactual(EXAMPLE_SEED, EXAMPLE_K, "square", "random", None)
    job = counterfactual.load_job(os.path.join(root, "counterfactual", "jobs", f"d-trak-k{EXAMPLE_K}-seed{EXAMPLE_SEED}.npz"))
    assert [r[-1] for r in out[3]] == ["precomputed", "precomputed"] and out[3][0][1] == round(job.l2, 3)
    assert f": {job.l2:.2f}, " in rows[0][2]
    app.committed.cache_clear()
    app.outcomes.cache_clear()


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
    from dtrak_core.checksums import seal, write_sealed_json  # (as their writers do: the app shows only results
    # with their checksum)
    write_sealed_json(str(tmp_path / "benchmarks" / "lds_results.json"),
                      {"partial": True, "subsets_done": 10, "subsets_planned": 64,
                       "methods": {"square": {"validation": study, "generated": study, "setting": {"K": 100}}}})
    write_sealed_json(str(tmp_path / "benchmarks" / "other.json"),
                      {"rows": [{"method": "TRAK", "lds": 10.5}, {"method": "D-TRAK", "lds": 20.1}]})
    (tmp_path / "benchmarks" / "README.md").write_text("protocol notes")

    (tmp_path / "counterfactual" / "summary.json").write_text(json.dumps(seal({"cells": [
        {"k": 300, "ranking": "square", "method": "D-TRAK", "label_changed": 0.5,
         "l2": {"median": 2.0, "p25": 1.5, "p75": 2.5, "n": 2},
         "per_target": [{"seed": 1000, "l2": 1.5, "label_before": 3, "label_after": 3},
                        {"seed": 1001, "l2": 2.5, "label_before": 4, "label_after": 9}]}]})))
    (tmp_path / "counterfactual" / "results.md").write_text("| removed k | D-TRAK |")
    (tmp_path / "benchmarks" / "tables.json").write_text(json.dumps(seal(
        {"subsets_done": 10, "subsets_planned": 64, "partial": True, "train_seeds": [0, 1], "num_bootstrap": 20,
         "test_sets": {"validation": 3, "generated": 3},
         "methods": {"d-trak/K100": {"validation": study, "generated": study}, "pixel-cosine": {
             "validation": {"lds": 5.0, "pm": 2.0}, "generated": {"lds": 4.0, "pm": 2.0}}, "clip-dot": {"unavailable": "x"}}})))
    # not read: the report is drawn from the verified tables.json
    (tmp_path / "benchmarks" / "tables.md").write_text("# title\n| method | validation |\n| pixel-cosine | 7.0 ± 1.0 |")
    with gr.Blocks() as full:
        charts = app.benchmarks_blocks(str(tmp_path))
    kinds = [type(b).__name__ for b in full.blocks.values()]
    assert kinds.count("Plot") == 4 and kinds.count("Dataframe") == 2  # LDS, tables, counterfactual, other.json
    assert [p for p, _ in charts] == [b for b in full.blocks.values() if isinstance(b, gr.Plot)]
    assert all(p.value is None for p, _ in charts)  # drawn when the tab is first shown, not at start-up
    cache = app.OnceCache(1)
    figures = app.draw_charts(charts, cache)
    assert len(figures) == 4 and all(f.data for f in figures) and app.draw_charts(charts, cache)[0] is figures[0]
    bars = figures[0].data[0]
    assert bars.orientation == "h" and list(bars.x) == [28.0]  # the honest λ
    assert app.draw_charts(charts[:1], app.OnceCache(1)).data[0].orientation == "h"  # one chart: one value
    text = texts(full)
    assert "Provisional" in text and "protocol notes" in text and "Higher is better" in text
    assert "| Pixel cosine | 5.0 ± 2.0 |" in text and "# title" not in text and "7.0 ± 1.0" not in text
    assert "| 300 | median pixel L2 [p25, p75] |" in text and "| removed | measure | D-TRAK |" in text and "50% of 2" in text
    assert "the same λ was best on both halves" not in text  # paper 30.0 vs honest 28.0: they differ here


def test_table_rows():
    study = {"paper": {"lds": 30.0, "pm": 1.0}, "honest": {"lds": 28.04, "pm": 1.5}}
    rows = sup.table_rows({"d-trak/K10": {"generated": study}, "pixel-dot": {"validation": {"lds": 3.0, "pm": 1.0}},
                           "clip-dot": {"unavailable": "no weights"}, "trak/K1000": {"missing": "cmd"}})
    assert rows == [{"method": "D-TRAK, K=10", "test set": "generated", sup.HONEST: 28.0, sup.PM: 1.5},
                    {"method": "Pixel dot product", "test set": "validation", sup.HONEST: 3.0, sup.PM: 1.0}]


def test_benchmark_rows():
    study = {"paper": {"lds": 30.0, "pm": 1.0}, "honest": {"lds": 28.04, "pm": 1.5}, "default": {"lds": 25.0, "pm": 1.2}}
    rows = sup.lds_rows({"methods": {"loss": {"generated": study, "validation": study, "setting": {"K": 10}}}})
    assert rows == [{"method": "TRAK", "test set": test_set, sup.HONEST: 28.0, sup.PM: 1.5, sup.PAPER: 30.0,
                     sup.DEFAULT: 25.0} for test_set in ("validation", "generated")]  # the real digits first
    assert not sup.lambdas_coincide(rows)
    assert sup.lambdas_coincide(sup.lds_rows({"methods": {"trak": {"validation": dict(study, paper=study["honest"])}}}))


def test_counterfactual_chart_shows_every_target():
    from dtrak_core import viz

    cell = lambda k, method, l2s: {"k": k, "ranking": method.lower(), "method": method, "per_target": [
        {"seed": 1000 + i, "l2": v, "label_before": 1, "label_after": 1 + (v > 2)} for i, v in enumerate(l2s)]}
    fig = viz.counterfactual_chart({"cells": [cell(75, "Random", [0.5, 1.0]), cell(300, "Random", [1.0, 1.5]),
                                              cell(300, "D-TRAK", [2.0, 3.0, 2.5])]})
    boxes = {t.name: t for t in fig.data}
    assert list(boxes) == ["300 removed", "75 removed"] and all(t.boxpoints == "all" for t in fig.data)
    rand, dtrak = sup.method_label("random"), sup.method_label("square")  # one name per method, as everywhere
    assert list(boxes["300 removed"].x) == [rand, rand, dtrak, dtrak, dtrak]
    assert list(boxes["300 removed"].y) == [1.0, 1.5, 2.0, 3.0, 2.5] and list(boxes["75 removed"].y) == [0.5, 1.0]
    assert boxes["300 removed"].text[3] == "seed 1001: label 1 -> 2"
    assert list(fig.layout.xaxis.categoryarray) == [rand, dtrak]  # the paper's column order


# ---------------------------------------------------------------- one name per method

def test_one_name_per_method_whatever_the_spelling():
    assert {sup.method_label(n) for n in ("square", "d-trak", "D-TRAK", "dtrak")} == {"D-TRAK"}
    assert {sup.method_label(n) for n in ("loss", "trak", "TRAK")} == {"TRAK"}
    assert sup.method_label("d-trak/K100") == "D-TRAK, K=100"
    assert sup.method_label("trak/S4") == "TRAK, 4 models"
    assert sup.method_label("random") == sup.method_label("Random")
    assert sup.method_label("renorm-ip") == "Renormalised IP" and sup.method_label("journey-trak") == "Journey-TRAK"
    md = "| method | a |\n|---|---|\n| d-trak | 1 |\n| trak | 2 |\n\ntext | d-trak\n| output function | b |\n|---|---|\n| loss | 3 |"
    assert sup.relabel_tables(md).splitlines() == [
        "| method | a |", "|---|---|", "| D-TRAK | 1 |", "| TRAK | 2 |", "", "text | d-trak",
        "| output function | b |", "|---|---|", "| TRAK | 3 |"]
    # a committed report's cells: a method with what was measured of it, or a former label
    md = ("| method | a |\n|---|---|\n| gas (4 checkpoints, K=10) | 1 |\n| D-TRAK (square), exact | 2 |\n"
          "| squared avg proponent scores, exact | 3 |\n| avg, sharpened | 4 |")
    assert [line.split("|")[1].strip() for line in sup.relabel_tables(md).splitlines()[2:]] == [
        "GAS (4 checkpoints, K=10)", "D-TRAK, exact", "squared avg proponent scores, exact", "D-TRAK (Avg), sharpened"]


def test_about_methods_table_keeps_every_description_whole(app):
    md = app.methods_markdown(app.assets().methods, {"clip-dot": "CLIP similarity is unavailable: no local CLIP "
                                                                 "weights (looked at the cache (LocalEntryNotFoundError)). "
                                                                 "Nothing is downloaded; put the weights there."})
    row = next(line for line in md.splitlines() if line.startswith("| Relative IP"))
    cells = [c for c in re.split(r"(?<!\\)\|", row)[1:-1]]
    assert len(cells) == 2 and "Barshan" in cells[1]  # its '||' is escaped, not a cell border
    assert "- **CLIP dot product**: CLIP similarity is unavailable: no local CLIP weights." in md
    assert "LocalEntryNotFoundError" not in md


# ---------------------------------------------------------------- drill-down

def test_rank_of_matches_sorting():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=50)
    scores[[4, 9, 20]] = scores[7]  # ties: the lower index ranks first, as in scoring.top_k
    order = sorted(range(50), key=lambda i: (-scores[i], i))
    assert [sup.rank_of(scores, i) for i in range(50)] == [order.index(i) + 1 for i in range(50)]


def test_a_card_click_shows_the_image_under_every_method_and_can_become_the_query(app, monkeypatch):
    import gradio as gr

    from dtrak_core.shared import OnceCache

    monkeypatch.setattr(app.module_of("preview_training"), "_attribution_cache", OnceCache(256))  # nothing known yet

    _, batch = app.generate_samples("single", 2, 0, 0, 1, 50)
    q = app.select_sample(batch, Select(0))[0]
    result = app.attribution_for(q, "square")
    index = int(result.proponents(3)[2])
    # at once: the image, and the ranks of the methods computed so far; the others say so
    picked, html, box = app.preview_training(q, Clicked({"index": index}))
    assert picked == index and box.visible is True and f"Training image #{index}" in html
    assert f"<td>{sup.method_label('square')}</td><td>3 of " in html
    assert html.count("Computing its scores for this query.") == len(app.assets().methods) - 1
    html = app.rank_training(q, picked)  # then every method's
    assert f"Training image #{index}" in html and "Computing" not in html
    for method in app.assets().methods:
        scores = app.attribution_for(q, method).scores
        assert f"<td>{sup.method_label(method)}</td><td>{sup.rank_of(scores, index):,} of {len(scores):,}</td>" in html
    assert f"<td>{sup.method_label('square')}</td><td>3 of " in html
    for bad in ({"index": -1}, {"index": app.assets().n_train}, {"index": "x"}, {}, None):
        with pytest.raises(gr.Error, match="training image index"):
            app.preview_training(q, Clicked(bad))
        with pytest.raises(gr.Error, match="training image index"):
            app.rank_training(q, (bad or {}).get("index"))
    new_q, img, info, hidden = app.use_training_image(index)
    np.testing.assert_array_equal(new_q.pixels, app.assets().attributor.train.images[index].numpy())
    assert f"Training image #{index}" in info and hidden.visible is False and new_q.seed is None
    assert card_indices(app.attribute(new_q, "square", 3)[0])[0] == index  # its own strongest proponent


def test_the_drill_down_featurizes_each_store_once_per_query(app, monkeypatch):
    """TRAK and the gradient and IP baselines all score the query's loss features: asked
    under every method, an image is featurized once per store, with a fresh featurizer's scores."""
    from dtrak_core.attribution.features import Featurizer

    calls = []
    plain = Featurizer.__call__
    monkeypatch.setattr(Featurizer, "__call__", lambda self, images: calls.append(self.setting) or plain(self, images))
    _, batch = app.generate_samples("single", 6, 0, 0, 1, 50)
    q = app.select_sample(batch, Select(0))[0]
    found = app.all_attributions(q)
    a = app.assets().attributor
    assert "gradient-dot" in found and sorted(s.output_fn for s in calls) == sorted(a.methods)
    fresh = Featurizer(a.unet, a.scheduler, a.setting("loss")[0])
    expected = a.scorer("loss").scores(plain(fresh, torch.as_tensor(q.pixels)[None]))[0]
    np.testing.assert_allclose(found["loss"].scores, expected, rtol=1e-6, atol=1e-9 * np.abs(expected).max())


def test_uploads_for_journey_trak_say_why_in_the_drill_down(app, tmp_path):
    from PIL import Image

    Image.new("L", (16, 16), 0).save(tmp_path / "black.png")
    q = app.use_upload(str(tmp_path / "black.png"), False)[0]
    html = app.rank_training(q, 0)
    assert "Journey-TRAK</td><td colspan=\"2\" class=\"muted\">Journey-TRAK attributes generated samples only" in html


# ---------------------------------------------------------------- noise levels

def test_noise_levels_sum_to_the_score_and_match_per_timestep_gradients(app):
    """Each bucket against an independent slow reference: plain autograd of the output function at
    that bucket's timesteps, projected and scored; the buckets together give the full score."""
    from dtrak_core.attribution.gradients import timestep_noise, timesteps_for
    from dtrak_core.attribution.output_functions import elbo_weights, get_output_function

    a = app.assets().attributor
    _, batch = app.generate_samples("single", 4, 0, 0, 1, 20)
    x = torch.as_tensor(batch["images"][0])
    levels = sup.noise_levels(a, x, "square", buckets=10)
    setting, _ = a.setting("square")
    assert len(levels.timesteps) == min(10, setting.K) and levels.contributions.shape == (len(levels.timesteps), len(a.train))
    # float32 gradients: the buckets' one batched pass rounds differently from the whole query's
    np.testing.assert_allclose(levels.scores, a.attribute(x, "square").scores, rtol=1e-4, atol=3e-6 * np.abs(levels.scores).max())

    ts = timesteps_for(setting.K, a.scheduler.config.num_train_timesteps)
    noise = timestep_noise(ts, x.shape)
    f, w = get_output_function("square"), elbo_weights(a.scheduler)
    abar = a.scheduler.alphas_cumprod.float()
    params = [p for p in a.unet.parameters() if p.requires_grad]
    per_t = []
    for t, eps in zip(ts, noise):
        xt = abar[t].sqrt() * x + (1 - abar[t]).sqrt() * eps
        out = f(a.unet(xt[None], t[None], return_dict=False)[0], eps[None], w[t][None]).sum()
        per_t.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params)]))
    projector, scorer = a.featurizer(setting).projector, a.scorer("square")
    for b, (first, last) in enumerate(levels.timesteps):
        inside = [i for i, t in enumerate(ts.tolist()) if first <= t <= last]
        mean = torch.stack([per_t[i] for i in inside]).mean(0)
        expected = scorer.scores(projector.project(mean[None]))[0] * len(inside) / len(ts)
        np.testing.assert_allclose(levels.contributions[b], expected, rtol=1e-3,
                                   atol=1e-5 * np.abs(expected).max())
    assert levels.labels()[0].startswith(f"t {ts[0]}")


def test_noise_view_handler(app):
    _, batch = app.generate_samples("single", 5, 0, 0, 1, 20)
    q = app.select_sample(batch, Select(0))[0]
    fig, cards, text = app.noise_view(q, "square")
    assert fig.data[0].type == "heatmap" and fig.data[0].z.shape[1] == len(fig.data[0].x)
    assert "At low noise" in text and len(card_indices(cards)) == len(fig.data[0].x)
    fig, cards, text = app.noise_view(q, "pixel-cosine")
    assert fig is None and cards == "" and "has no timesteps to split" in text
    # a sharpened method: the split of the signed score it sharpens (s|s| of a sum is not a sum)
    fig, cards, text = app.noise_view(q, "d-trak-sharp")
    assert fig.data[0].type == "heatmap" and "splits the signed D-TRAK score" in text
    levels = app._noise_cache.get((app.ASSETS, q.key, q.pixels_key, "d-trak-sharp", app.NOISE_BUCKETS),
                                  None)
    signed = app.assets().attributor.scores(torch.as_tensor(q.pixels)[None], "square")[0]
    np.testing.assert_allclose(levels.scores, signed, rtol=1e-4, atol=3e-6 * np.abs(signed).max())


# ---------------------------------------------------------------- uploads: ink

def test_ink_polarity_is_read_from_the_border(app, tmp_path):
    from PIL import Image, ImageDraw

    img = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(img).rectangle([24, 8, 39, 55], fill=0)  # a dark "1" on white paper
    img.save(tmp_path / "paper.png")
    Image.eval(img, lambda v: 255 - v).save(tmp_path / "light.png")  # the training digits' polarity
    q, _, info, invert = app.read_upload(str(tmp_path / "paper.png"))
    assert invert is True and "inverted" in info and q.pixels[0, 4, 4] > 0.5 and q.pixels[0, 0, 0] < -0.5
    q2, _, info2, invert2 = app.read_upload(str(tmp_path / "light.png"))
    assert invert2 is False and "used as it is" in info2
    np.testing.assert_allclose(q2.pixels, q.pixels, atol=1e-6)  # the same digit either way round
    assert app.use_upload(str(tmp_path / "paper.png"), False)[0].pixels[0, 0, 0] > 0.5  # the box overrides


def test_invert_takes_only_true_or_false(app, tmp_path):
    """The reported defect: any truthy `invert` (1, "yes", [0]) counted as ticked."""
    import gradio as gr
    from PIL import Image, ImageDraw

    img = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(img).rectangle([24, 8, 39, 55], fill=0)
    path = str(tmp_path / "paper.png")
    img.save(path)
    ticked, plain = app.use_upload(path, True)[0], app.use_upload(path, False)[0]
    for value, want in (("true", ticked), (" FALSE ", plain), (np.True_, ticked), ("False", plain)):
        np.testing.assert_array_equal(app.use_upload(path, value)[0].pixels, want.pixels)
    for bad in (1, 0, "yes", "1", "on", "", None, [True], 2.0):
        with pytest.raises(gr.Error, match="the ink setting \\(invert\\) must be true or false, got "):
            app.use_upload(path, bad)
    assert sup.parse_bool("true", "x") is True and sup.parse_bool(False, "x") is False


def test_unusual_ink_warns():
    train = -np.ones((5, 1, 8, 8))
    for i in range(5):
        train[i, 0, 2:6, 3 + i % 2] = 1  # 4 to 8 of 64 pixels are ink
    assert sup.unusual_ink(train[0], train) is None
    assert "every training image has" in sup.unusual_ink(np.ones((1, 8, 8)), train)
    assert sup.light_paper(-train[0]) and not sup.light_paper(train[0])


def test_example_uploads_are_written_and_usable(app):
    examples = app.example_uploads()
    assert len(examples) == 3 and all(os.path.isfile(p) for p, _ in examples)
    out = app.use_example(2)
    assert out[3] is True and out[4] == examples[2][0] and "drawn-2.png (inverted)" in out[0].title


# ---------------------------------------------------------------- counterfactual examples and cost

def test_example_rows_start_on_a_changed_digit():
    o = lambda l2, a, b: {"l2": l2, "label_before": a, "label_after": b}
    outcomes = {(1000, "square", 300): o(2.0, 8, 8), (1000, "loss", 300): o(1.0, 8, 8), (1000, "random", 300): o(0.5, 8, 8),
                (1001, "square", 300): o(3.0, 4, 7), (1001, "random", 300): o(1.0, 4, 4),
                (1002, "loss", 75): o(1.5, 3, 5)}
    rows = sup.example_rows(outcomes, first={(1000, "square", 300)})
    assert [(r["seed"], r["k"]) for r in rows] == [(1001, 300), (1000, 300), (1002, 75)]
    assert rows[0]["rankings"] == ["square", "random"] and rows[1]["rankings"] == ["square", "random"]
    assert rows[2]["rankings"] == ["loss"]
    assert sup.l2_examples(outcomes, (1.0, 3.0)) == [(1.0, (1000, "loss", 300)), (3.0, (1001, "square", 300))]


def test_retrain_cost_is_measured(app):
    from dtrak_core.model.training import TrainConfig

    cost = sup.measure_retrain(app.assets().attributor.train.images, app.assets().attributor.scheduler,
                               TrainConfig(steps=300, batch_size=16, block_out_channels=(4, 8)), probe_steps=2)
    assert cost.seconds_per_step > 0 and cost.steps == 300 and cost.fixed_seconds >= 0
    assert cost.seconds == pytest.approx(cost.fixed_seconds + cost.seconds_per_step * 300)
    assert "2 retrains" in cost.text(2) and "2 retrains" not in cost.text(1) and "precomputed" in cost.text(0)
    seen = sup.RetrainCost.from_retrain(172.0, 1500)  # a live retrain here calibrates the next estimate
    assert seen.seconds == pytest.approx(172.0) and "from the last retrain" in seen.text(1) and "2.9 min" in seen.text(1)


def test_the_first_example_is_one_that_random_removal_leaves_alone():
    o = lambda l2, a, b: {"l2": l2, "label_before": a, "label_after": b}
    outcomes = {(1000, "square", 75): o(3.0, 4, 7), (1000, "random", 75): o(2.0, 4, 9),  # chance changes it too
                (1001, "square", 75): o(2.5, 3, 5), (1001, "random", 75): o(0.8, 3, 3)}
    assert [r["seed"] for r in sup.example_rows(outcomes)] == [1001, 1000]


# ---------------------------------------------------------------- generate, compare, viz

def test_a_generate_mistake_is_caught_before_the_gallery_changes(app):
    import gradio as gr

    assert app.check_generate("range", 0, 0, 15, 1, 50) is None
    with pytest.raises(gr.Error, match="smaller than the first"):
        app.check_generate("range", 0, 5, 2, 1, 50)
    with pytest.raises(gr.Error, match="DDIM steps"):
        app.check_generate("single", 1, 0, 0, 1, 0)


def test_the_comparison_follows_the_query_once_asked_for(app):
    _, batch = app.generate_samples("range", 0, 0, 1, 1, 10)
    q = app.select_sample(batch, Select(1))[0]
    assert all(o == app.gr.update() for o in app.follow_compare(q, "square", "loss", 4, False))
    assert app.follow_compare(q, "square", "loss", 4, True) == app.compare(q, "square", "loss", 4)


def test_viz_has_no_gradio():
    import subprocess
    import sys

    code = "import sys, dtrak_core.viz; assert 'gradio' not in sys.modules, 'viz imports gradio'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr[-2000:]


def test_lds_chart_sorts_methods_and_marks_the_ceiling():
    from dtrak_core import viz

    rows = [{"method": m, "test set": t, sup.HONEST: v, sup.PM: 1.0}
            for m, v in (("a", 10.0), ("b", 30.0), ("c", 20.0)) for t in ("generated", "validation")]
    fig = viz.lds_chart(rows, {"validation": {"ceiling": 80.0}, "generated": {"ceiling": 60.0}})
    assert [t.name for t in fig.data] == ["validation", "generated"]
    assert list(fig.data[0].y) == ["a", "c", "b"]  # plotly draws bottom-up: the best method on top
    assert sorted(s.x0 for s in fig.layout.shapes) == [60.0, 80.0]


def test_a_drawing_becomes_the_query_like_an_upload(app):
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (280, 280), (0, 0, 0, 0))  # the canvas: transparent, black strokes
    ImageDraw.Draw(img).line([(150, 40), (150, 240)], fill=(0, 0, 0, 255), width=18)
    q, _, info, invert = app.use_drawing({"background": None, "layers": [img], "composite": img})
    assert invert is True and "Your drawing" in q.title and q.pixels.shape == (1, 8, 8)
    assert q.pixels[0, :, 3:5].max() > 0.5 and q.pixels[0, :, 0].max() < -0.5  # a centred stroke
    assert app.use_drawing({"background": None, "layers": [], "composite": None})[0] is not None  # blank: no change
    assert app.drawing_png(Image.new("RGBA", (50, 50), (0, 0, 0, 0))) is None


def test_the_about_numbers_come_from_the_folders_evidence(app):
    """No prose constants: the digits paragraph's LDS numbers are the committed evidence's, and a
    folder without evidence gets the paragraph without them (never stale numbers)."""
    import json
    import types

    text = app.digits_about(app.assets())  # the tiny folder has no evidence
    assert "{{" not in text and "validation LDS" not in text and "The default method" in text
    rows = {r["method"]: r for r in json.load(open(os.path.join(ASSETS, "benchmarks", "evidence.json")))["rows"]}
    text = app.digits_about(types.SimpleNamespace(root=ASSETS, n_train=1500, methods=["square", "avg"]))
    for m in ("pixel-rbf", "square", "avg"):
        assert f"{rows[m]['validation/signed']:.1f}" in text
    assert "1,500 tiny images" in text and "*D-TRAK (Avg)*" in text
