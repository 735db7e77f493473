"""The app's text-to-image handlers on the committed miniature, checked against the attributor itself."""
import json
import os
import re

import numpy as np
import pytest
import torch

from dtrak_core import checksums
from dtrak_core.attribution.similarity import similarity
from dtrak_core.text2image.build import MINIATURE_ROOT
from dtrak_core.ui import text2image as views

PROMPT = "a handwritten digit 7"


@pytest.fixture(scope="module")
def t2i(one_thread):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(views.folder, "REFERENCE_QUERIES", 4)  # the noise view's reference: 4 prompted samples, not 32
        yield views.load(MINIATURE_ROOT)


@pytest.fixture(scope="module")
def sample(t2i):
    images, captions, batch = views.generate_samples(MINIATURE_ROOT, f"  {PROMPT} ", "range", None, 0, 1, None, 50)
    return images, captions, batch


def test_generate_is_the_attributors_sampling(t2i, sample):
    images, captions, batch = sample
    assert batch["prompt"] == PROMPT and batch["seeds"] == [0, 1] and images.shape == (2, 1, 8, 8)
    direct = t2i.attributor.generate([0, 1], PROMPT, steps=50).numpy()
    np.testing.assert_allclose(images, direct, atol=1e-5)
    assert captions[0].startswith("seed 0: ") and captions[1].startswith("seed 1: ")  # the classifier's digit


def test_attribute_gives_the_attributors_scores_and_follows_the_prompt(t2i, sample):
    _, _, batch = sample
    q = views.sample_query(batch, 0)
    image = torch.as_tensor(batch["images"][0])
    app = views.attribution_for(MINIATURE_ROOT, q, "d-trak")
    direct = t2i.attributor.attribute(image, "d-trak", prompt=PROMPT)
    np.testing.assert_allclose(app.scores, direct.scores, rtol=1e-6, atol=1e-12)
    assert app.method == direct.method == "square"
    assert views.attribution_for(MINIATURE_ROOT, q, "square") is app  # cached per (image, prompt, method)
    table = views.attribute_prompt(MINIATURE_ROOT, PROMPT, 0, 50, "d-trak", 5)  # the page's API
    assert table["query"]["prompt"] == PROMPT and table["query"]["seed"] == 0 and table["n_train"] == t2i.n_train
    _, _, single = views.generate_samples(MINIATURE_ROOT, PROMPT, "single", 0, None, None, None, 50)  # cached
    assert [r["index"] for r in table["proponents"]] == list(
        views.attribution_for(MINIATURE_ROOT, views.sample_query(single, 0), "square").proponents(5))
    levels = views.noise_levels(MINIATURE_ROOT, q, "d-trak")  # the same score, split by timestep range
    assert levels.contributions.shape == (views.NOISE_BUCKETS, t2i.n_train)
    np.testing.assert_allclose(levels.scores, app.scores, rtol=1e-4, atol=1e-6 * np.abs(app.scores).max())
    assert views.noise_levels(MINIATURE_ROOT, q, "pixel-cosine") is None  # a baseline has no timesteps
    assert levels.references == 4 and levels.reference.shape == levels.contributions.shape  # centred
    other = views.attribution_for(MINIATURE_ROOT, views.with_prompt(q, "a handwritten digit 5"), "d-trak")
    assert np.corrcoef(other.scores, app.scores)[0, 1] < 0.99  # the prompt is part of the query


def test_the_noise_view_is_centred_and_its_high_noise_leader_follows_the_query(t2i):
    """Centred on prompted reference samples, the highest-noise range's leading fine-tuning image
    differs across queries of different digits, and over the reference queries themselves the
    centred parts average to zero."""
    from dtrak_core import app_support as sup

    att = t2i.attributor
    labels = att.train.labels.numpy()
    idx = [int(np.flatnonzero(labels == c)[0]) for c in sorted(set(labels.tolist()))[:4]]
    images, prompts = att.train.images[idx], [att.train.captions[i] for i in idx]
    reference = sup.reference_features(att, "square", 10, images, prompts)
    levels = [sup.noise_levels(att, x, "square", 10, prompt=p, reference=reference) for x, p in zip(images, prompts)]
    mean = np.mean([lv.centred for lv in levels], axis=0)
    assert np.abs(mean).max() <= 1e-4 * max(np.abs(lv.contributions).max() for lv in levels)
    assert len({int(lv.top(-1, 1)[0]) for lv in levels}) >= 3
    images, prompts = sup.reference_queries(att, 2, steps=5)  # the page's reference: the folder's own samples
    assert images.shape == (2, *att.image_shape) and prompts == sorted(set(att.train.captions))[:2]


def test_every_method_runs_and_a_training_image_finds_itself(t2i):
    assert t2i.methods[:2] == ["loss", "square"] and set(views.BASELINES) <= set(t2i.methods)
    index = 300
    q = views.training_query(MINIATURE_ROOT, index)
    assert q.prompt == t2i.attributor.train.captions[index]
    found = views.all_attributions(MINIATURE_ROOT, q)
    for method in ("square", "loss", "pixel-cosine", "latent-cosine", "gradient-cosine"):
        assert int(np.argmax(found[method].scores)) == index, method
    pixels = torch.as_tensor(q.pixels)[None].flatten(1)
    np.testing.assert_allclose(found["pixel-dot"].scores,
                               similarity(pixels, t2i.attributor.train.images.flatten(1), "dot")[0])


def test_the_registrys_baselines_score_as_before_and_list_no_opponents_when_unsigned(t2i):
    """Each text-to-image baseline, read from the registry, gives exactly the scores of its formula
    on this setting's inputs; the unsigned ones (similarities of the inputs) list no opponents."""
    from dtrak_core.attribution import methods
    from dtrak_core.attribution.kernels import KernelRidge, optimal_denoiser_scores
    from dtrak_core.attribution.similarity import ip_norms

    assert views.BASELINES == [m.name for m in methods.all("baseline", "text2image")]
    q = views.training_query(MINIATURE_ROOT, 12)
    att, x = t2i.attributor, torch.as_tensor(q.pixels, dtype=torch.float32)[None]
    scorer, phi = att.scorer("loss"), views.query_feature(t2i, q, "loss")
    latents = att.pipeline.encode_images(att.train.images).flatten(1)
    z = att.pipeline.encode_images(x).flatten(1)
    pixels, train = x.flatten(1).double(), att.train.images.flatten(1).double()

    def ridge(name, q, X):  # kernel ridge at the folder's tuned (gamma, lambda), else the defaults
        tuned = att.tuned_params.get(name, {})
        kind = methods.get(name).kind
        return KernelRidge(kind, tuned.get("gamma", 1.0)).fit(X).scores(q, tuned.get("lambda"))[0]

    def denoiser(q, X):
        return optimal_denoiser_scores(q, X, att.scheduler.alphas_cumprod)[0]

    zd, ld = z.double(), latents.double()
    expected = {"pixel-dot": similarity(x.flatten(1), att.train.images.flatten(1), "dot")[0],
                "pixel-cosine": similarity(x.flatten(1), att.train.images.flatten(1), "cosine")[0],
                "latent-dot": similarity(z, latents, "dot")[0],
                "latent-cosine": similarity(z, latents, "cosine")[0],
                "gradient-dot": similarity(phi, scorer.train_features_, "dot")[0],
                "gradient-cosine": similarity(phi, scorer.train_features_, "cosine")[0],
                "relative-ip": scorer.scores(phi)[0] / ip_norms(scorer, "relative"),
                "renorm-ip": scorer.scores(phi)[0] / ip_norms(scorer, "renorm"),
                "pixel-nn": -torch.cdist(pixels, train)[0].pow(2).numpy(),
                "pixel-trak": ridge("pixel-trak", pixels, train),
                "pixel-rbf": ridge("pixel-rbf", pixels, train),
                "pixel-arccos": ridge("pixel-arccos", pixels, train),
                "optimal-denoiser": denoiser(x, att.train.images),
                "latent-nn": -torch.cdist(zd, ld)[0].pow(2).numpy(),
                "latent-trak": ridge("latent-trak", zd, ld),
                "latent-rbf": ridge("latent-rbf", zd, ld),
                "latent-arccos": ridge("latent-arccos", zd, ld),
                "latent-optimal-denoiser": denoiser(z, latents)}
    assert list(expected) == views.BASELINES
    for name, want in expected.items():
        np.testing.assert_allclose(views.baseline_scores(t2i, q, name), want, rtol=1e-6, atol=1e-9, err_msg=name)
        table = views.attribution_for(MINIATURE_ROOT, q, name).table(3)
        assert (table["opponents"] == []) == (not methods.is_signed(name)), name


def test_an_upload_is_read_with_its_ink_the_right_way_round(t2i, tmp_path):
    from PIL import Image

    digit = ((t2i.attributor.train.images[0, 0].numpy() + 1) * 127.5).astype(np.uint8)
    Image.fromarray(255 - digit).resize((64, 64), Image.Resampling.NEAREST).save(tmp_path / "on-paper.png")
    q, inverted = views.upload_query(MINIATURE_ROOT, str(tmp_path / "on-paper.png"), "a handwritten digit 5")
    assert inverted and q.prompt == "a handwritten digit 5" and q.pixels.shape == (1, 8, 8)
    np.testing.assert_allclose(q.pixels, t2i.attributor.train.images[0].numpy(), atol=0.02)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="Could not use notes.png"):
        views.upload_query(MINIATURE_ROOT, str(tmp_path / "notes.png"), "a handwritten digit 5")


def test_request_values_are_checked(t2i):
    with pytest.raises(ValueError, match="type a prompt"):
        views.generate_samples(MINIATURE_ROOT, "   ", "single", 0, None, None, None, 50)
    with pytest.raises(ValueError, match="at most"):
        views.parse_prompt("a" * (views.MAX_PROMPT_CHARS + 1))
    with pytest.raises(ValueError, match="guidance"):
        views.parse_guidance("lots")
    with pytest.raises(ValueError, match="method must be one of"):
        views.attribution_for(MINIATURE_ROOT, views.training_query(MINIATURE_ROOT, 0), "journey-trak")
    assert "'cat'" in views.prompt_warning(t2i, "a handwritten cat 7")
    assert views.prompt_warning(t2i, PROMPT) is None


def test_benchmarks_show_quality_and_lds_or_say_it_has_not_run(t2i, tmp_path):
    rows = views.quality_rows(t2i.manifest)
    lora, base = "base + LoRA (what the app samples)", "base model alone"
    assert [r["prompt"] for r in rows[:10]] == [f"“a handwritten digit {d}”" for d in range(10)]
    assert rows[7][lora] == "95.0%" and rows[7][base] == "5.0%" and rows[2][lora] == "" and rows[2][base] == "95.0%"
    assert list(rows[0]) == ["prompt", lora, base]
    assert rows[10] == {"prompt": "all of “5” .. “9”", lora: "88.5%", base: "3.5%"}
    assert rows[11] == {"prompt": "all of “0” .. “4”", lora: "", base: "96.5%"}
    assert views.read_lds(str(tmp_path))["data"] is None  # nothing there: the page says "not run yet"
    committed = views.read_lds(MINIATURE_ROOT)
    if committed["data"] is not None:  # verified; its report drawn from the numbers its writer wrote in results.md
        assert views.results_damage(MINIATURE_ROOT) == {}
        written = open(os.path.join(MINIATURE_ROOT, "lds", "results.md")).read()
        assert sorted(re.findall(r"\d+\.\d+", written)) == sorted(re.findall(r"\d+\.\d+", committed["markdown"]))
    study = {"honest": {"lds": 31.0, "pm": 2.0}, "paper": {"lds": 32.0, "pm": 2.0, "lambda": 0.1}}
    results = {"subsets_done": 6, "subsets_planned": 64, "partial": True, "train_seeds": [0, 1],
               "methods": {"d-trak": {"setting": {"K": 100}, "validation": study, "generated": study}},
               "baselines": {"pixel-dot": {"validation": {"lds": 20.0, "pm": 3.0},
                                           "generated": {"lds": 10.0, "pm": 3.0}}},
               "seconds_per_model": {"train_mean": 33.0, "eval_mean": 5.0}}
    (tmp_path / "lds").mkdir()
    path = str(tmp_path / "lds" / "lds_results.json")
    checksums.write_sealed_json(path, results)  # as `lds-text2image evaluate` writes it
    lds = views.read_lds(str(tmp_path))
    assert lds["error"] is None and lds["data"] == results and views.results_damage(str(tmp_path)) == {}
    got = views.lds_rows(lds["data"])
    assert [(r["method"], r["test set"]) for r in got] == [
        ("D-TRAK", "validation"), ("D-TRAK", "generated"),
        ("Pixel dot product", "validation"), ("Pixel dot product", "generated")]
    assert "Provisional" in views.lds_intro(lds["data"]) and "6 of 64" in views.lds_intro(lds["data"])
    assert "(33 s per LoRA retrain in the LDS run)" in views.counterfactual_text(str(tmp_path))
    assert "not offered" in views.counterfactual_text(MINIATURE_ROOT + "/no-such-folder")
    # an edited number, a file with no checksum or no JSON at all is not shown: named, with the command
    # that writes it, in the tab and in the page's banner
    edited = json.load(open(path))
    edited["methods"]["d-trak"]["validation"]["honest"]["lds"] = 99.0
    json.dump(edited, open(path, "w"))
    lds = views.read_lds(str(tmp_path))
    assert lds["data"] is None and lds["error"].startswith(f"{path} (LDS results) does not match its own "
                                                           "content_sha256")
    assert "python -m dtrak_core lds-text2image evaluate" not in lds["error"]  # not a text-to-image folder: no command
    assert views.results_damage(str(tmp_path)) == {"Benchmarks: LDS with LoRA retrains": lds["error"]}
    import dataclasses

    import gradio as gr

    with gr.Blocks() as blocks:  # the tab names it in place of the LDS section, its numbers not shown
        views.benchmarks_blocks(dataclasses.replace(t2i, root=str(tmp_path)), gr)
    shown = "\n".join(str(b.value) for b in blocks.blocks.values() if type(b).__name__ == "Markdown")
    assert "Not shown" in shown and path in shown and "99" not in shown.replace(path, "")
    (tmp_path / "lds" / "lds_results.json").write_text(json.dumps(results))
    assert "has no recorded checksum" in views.read_lds(str(tmp_path))["error"]
    (tmp_path / "lds" / "lds_results.json").write_text("{not json")
    assert "(LDS results) is not valid JSON" in views.read_lds(str(tmp_path))["error"]


def test_the_pages_handlers_one_by_one(t2i, sample):
    """The page's own handlers (what the events call), run on the miniature's folder as the page
    binds them: generate, pick a sample, attribute, re-prompt, compare, inspect a card, use it."""
    import gradio as gr

    from dtrak_core.ui import state

    def on(fn):
        return state.bound(MINIATURE_ROOT, fn)
    items, batch, note = on(views.on_generate)(PROMPT, "range", None, 0, 1, None, 50, None, progress=lambda *a, **k: None)
    assert len(items) == 2 and batch["prompt"] == PROMPT and "Click one" in note
    with pytest.raises(gr.Error, match="Generate samples first"):
        on(views.select_sample)(None, gr.SelectData(None, {"index": 0, "value": None}))
    q, tabs, image, info, prompt = on(views.select_sample)(batch, gr.SelectData(None, {"index": 1, "value": None}))
    assert q.seed == 1 and prompt == PROMPT and image.size[0] >= 8
    props, opps, hist, mass, summary = on(views.attribute)(q, "d-trak", 4, progress=lambda *a, **k: None)
    assert props.count('class="card"') == 4 and opps.count('class="card"') == 4
    assert props.count('class="muted card-caption"') == 4 and "a handwritten digit" in props  # each card's caption
    other, _, _ = on(views.reprompt)(q, "a handwritten digit 2")
    assert other.prompt == "a handwritten digit 2" and other.pixels is q.pixels
    a, b, text = on(views.compare)(q, "d-trak", "trak", 4, progress=lambda *a, **k: None)
    assert "top-4 overlap" in text and a.count('class="card"') == 4
    assert on(views.follow_compare)(q, "d-trak", "trak", 4, False) == (gr.update(), gr.update(), gr.update())
    index = int(views.attribution_for(MINIATURE_ROOT, q, "d-trak").proponents(1)[0])
    picked, details, box = on(views.inspect_training)(q, gr.EventData(None, {"index": index}))
    assert picked == index and "its caption" in details and box.visible
    used = on(views.use_training_image)(index)
    assert used[0].seed is None and used[-1].visible is False
    with pytest.raises(gr.Error, match="No query yet"):
        on(views.attribute)(None, "d-trak", 4)
