"""Counterfactual harness on a tiny model (64 digits, channels (4, 8), 6 training steps)."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import filled_store

import dtrak_core.evaluation.retrain as retrain_module
from dtrak_core import checksums
from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.errors import Cancelled
from dtrak_core.evaluation import counterfactual as cf
from dtrak_core.evaluation import counterfactual_report as report
from dtrak_core.files import atomic_write_json
from dtrak_core.model.training import TrainConfig, train
from dtrak_core.model.unet import build_scheduler

TINY = TrainConfig(steps=6, batch_size=16, block_out_channels=(4, 8), seed=3)
N = 64


@pytest.fixture(scope="module")
def attributor(tmp_path_factory, digits):
    """A real Attributor: a tiny model trained on 64 digits with TINY, D-TRAK and TRAK stores."""
    root = tmp_path_factory.mktemp("cf")
    train_set = digits.subset(np.arange(N), name="digits[:64]")
    scheduler = build_scheduler()
    unet = train(train_set.images, scheduler, TINY, show_bar=False)
    stores = []
    for fn in ("square", "loss"):
        setting = FeatureSetting(fn, K=2, k=32)
        store = filled_store(root / setting.slug, unet, scheduler, train_set, setting)
        stores.append(FeatureStore.open(store.path))
    return Attributor(unet, scheduler, train_set, stores)


@pytest.fixture
def captured(monkeypatch):
    """Every image set handed to training (through retrain.retrain) is recorded."""
    calls = []
    real = retrain_module.train

    def spy(images, scheduler, config, **kwargs):
        calls.append(images.clone())
        return real(images, scheduler, config, **kwargs)

    monkeypatch.setattr(retrain_module, "train", spy)
    return calls


def test_parse_k():
    assert cf.parse_k(300, 1500) == 300
    assert cf.parse_k("300", 1500) == 300
    assert cf.parse_k("20%", 1500) == 300
    assert cf.parse_k(0.2, 1500) == 300
    assert cf.parse_k("5%", 1500) == 75
    assert cf.parse_k(0, 1500) == 0
    for bad in (1500, -1, 1.5, "150%", "-5%", "abc", "", None, True, float("nan"), 0.1234, "1/7"):
        with pytest.raises(ValueError):
            cf.parse_k(bad, 1500)


def test_bad_k_and_ranking_rejected_before_training(attributor, captured):
    for k in (N, -1, "100%", 0.5001):
        with pytest.raises(ValueError):
            cf.remove_and_retrain(attributor, 7, "d-trak", k, config=TINY)
    with pytest.raises(ValueError, match="unknown output function"):
        cf.remove_and_retrain(attributor, 7, "nope", 4, config=TINY)
    with pytest.raises(ValueError, match="no feature store"):
        cf.remove_and_retrain(attributor, 7, "l1-norm", 4, config=TINY)
    assert captured == []
    # the shared retrain step (the harness and benchmarks call it directly) checks its ranking first too
    before = torch.zeros(1, 8, 8)
    for bad in ("nope", "", None, 3):
        with pytest.raises(ValueError, match="unknown output function|ranking must be a method name"):
            cf.retrain_and_measure(attributor, 7, before, np.arange(4), bad, TINY)
    assert captured == []


def test_pixel_l2_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 8, 8, generator=g) * 2 - 1, torch.rand(1, 8, 8, generator=g) * 2 - 1
    brute = sum((float(x) - float(y)) ** 2 for x, y in zip(a.flatten(), b.flatten())) ** 0.5
    assert cf.pixel_l2(a, b) == pytest.approx(brute, rel=1e-12)


@pytest.mark.parametrize("ranking", ["d-trak", "trak"])
def test_removes_exactly_top_k_and_retrained_model_never_saw_them(attributor, captured, ranking):
    k = 16
    result = cf.remove_and_retrain(attributor, 11, ranking, k, config=TINY)
    before = cf.sample(attributor.unet, attributor.scheduler, 11)
    assert torch.equal(result.before, before)
    scores = attributor.attribute(before, ranking).scores
    reference = sorted(range(N), key=lambda i: (-scores[i], i))[:k]  # independent top-k, strongest first
    assert result.removed_indices.tolist() == reference
    assert result.k == k and len(set(reference)) == k
    # the only training run saw exactly the other 48 images, in index order
    assert len(captured) == 1
    kept = [i for i in range(N) if i not in set(reference)]
    assert torch.equal(captured[0], attributor.train.images[kept])
    seen = {tuple(x.flatten().tolist()) for x in captured[0]}
    for i in reference:
        duplicate = any(torch.equal(attributor.train.images[i], attributor.train.images[j]) for j in kept)
        assert duplicate or tuple(attributor.train.images[i].flatten().tolist()) not in seen
    assert result.l2 == pytest.approx(cf.pixel_l2(result.before, result.after))
    assert 0 <= result.label_before <= 9 and 0 < result.confidence_before <= 1
    assert result.clip_cosine is None or -1 <= result.clip_cosine <= 1
    json.dumps(result.to_dict())
    # one record for every form: a job file's arrays read back as the same result
    back = cf.CounterfactualResult.from_arrays(result.to_arrays())
    assert back.to_dict() == result.to_dict()
    assert torch.equal(back.before, result.before) and torch.equal(back.after, result.after)


def test_nothing_removed_reproduces_model_and_image(attributor, captured):
    result = cf.remove_and_retrain(attributor, 5, "random", 0, config=TINY)
    assert result.removed_indices.size == 0
    assert torch.equal(captured[0], attributor.train.images)
    assert torch.equal(result.after, result.before) and result.l2 == 0.0
    assert result.label_after == result.label_before


def test_random_ranking_is_seeded_and_nested(attributor):
    image = cf.sample(attributor.unet, attributor.scheduler, 1)
    a = cf.removal(attributor, image, 1, "random", 20)
    assert np.array_equal(a, cf.removal(attributor, image, 1, "random", 20))
    assert np.array_equal(a[:5], cf.removal(attributor, image, 1, "random", 5))
    assert len(set(a.tolist())) == 20 and a.min() >= 0 and a.max() < N
    assert not np.array_equal(a, cf.removal(attributor, image, 2, "random", 20))


def test_progress_and_cancellation(attributor):
    seen = []
    cf.remove_and_retrain(attributor, 3, "trak", "25%", config=TINY, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    calls = []
    with pytest.raises(Cancelled):
        cf.remove_and_retrain(attributor, 3, "trak", 4, config=TINY, should_stop=lambda: calls.append(1) or len(calls) > 2)


def test_harness_resumes_after_kill_and_summarizes(attributor, tmp_path, monkeypatch):
    out = str(tmp_path / "jobs")
    seeds, rankings, ks = cf.target_seeds(2, start=40), ["d-trak", "trak", "random"], [16, "12.5%"]
    real = retrain_module.train
    count = {"n": 0}

    def dies_on_third(images, scheduler, config, **kwargs):
        count["n"] += 1
        if count["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(images, scheduler, config, **kwargs)

    monkeypatch.setattr(retrain_module, "train", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        cf.run_counterfactual(attributor, out, seeds, rankings, ks, TINY, show_bar=False)
    done = sorted(f for f in os.listdir(out) if f.endswith(".npz"))
    # k-major, then target, then ranking; the control after the first CONTROL_AFTER_TARGETS targets
    assert done == ["d-trak-k16-seed40.npz", "trak-k16-seed40.npz"]
    first = {f: open(os.path.join(out, f), "rb").read() for f in done}

    monkeypatch.setattr(retrain_module, "train", real)
    ran = cf.run_counterfactual(attributor, out, seeds, rankings, ks, TINY, show_bar=False)
    assert len(ran) == 2 * 3 * 2 + 1 - 2 and "d-trak-k16-seed40" not in ran and cf.CONTROL_ID in ran
    assert all(open(os.path.join(out, f), "rb").read() == first[f] for f in done)  # untouched
    assert cf.run_counterfactual(attributor, out, seeds, rankings, ks, TINY, show_bar=False) == []

    # a different recipe in the same folder is refused, naming the field
    with pytest.raises(ValueError, match="train_config"):
        cf.run_counterfactual(attributor, out, seeds, rankings, ks, TrainConfig(steps=7, batch_size=16,
                              block_out_channels=(4, 8), seed=3), show_bar=False)

    summary = report.summarize(out)
    assert {(c["k"], c["method"]) for c in summary["cells"]} == {(k, m) for k in (16, 8) for m in ("D-TRAK", "TRAK", "Random")}
    for c in summary["cells"]:
        l2s = [cf.load_result(os.path.join(out, f"{cf.slug(c['ranking'])}-k{c['k']}-seed{s}.npz"))["l2"] for s in seeds]
        assert c["l2"]["n"] == 2 and c["l2"]["median"] == pytest.approx(float(np.median(l2s)))
    assert summary["control"]["same_weights"] and summary["control"]["max_l2"] == 0.0
    named = {report.display_name(r): r for r in rankings}
    for p in summary["paired"]:  # how many removals the two rankings share, against the job files
        removed = {r: [set(cf.load_result(os.path.join(out, f"{cf.slug(r)}-k{p['k']}-seed{s}.npz"))["removed"]
                           .tolist()) for s in seeds] for r in rankings}
        a, b = named[p["a"]], named[p["b"]]
        assert p["median_removed_by_both"] == float(np.median([len(x & y) for x, y in zip(removed[a], removed[b])]))
    table = report.format_table(summary, N)
    assert "median L2" in table and "(n=2)" in table and "removed by both (median)" in table

    live = cf.remove_and_retrain(attributor, 41, "trak", 8, config=TINY)
    stored = cf.load_precomputed(attributor, 41, "trak", "12.5%", out_dir=out, config=TINY)
    assert torch.equal(live.after, stored.after) and live.removed_indices.tolist() == stored.removed_indices.tolist()
    assert stored.l2 == live.l2 and stored.label_after == live.label_after
    assert cf.load_precomputed(attributor, 41, "trak", 3, out_dir=out, config=TINY) is None  # not run
    committed = cf.committed_results(attributor, out, TINY)
    assert sorted(committed) == sorted((s, r, k) for s in seeds for r in ("square", "loss", "random") for k in (16, 8))
    # results of another recipe are never passed off as this one's
    other = TrainConfig(steps=7, batch_size=16, block_out_channels=(4, 8), seed=3)
    assert cf.committed_results(attributor, out, other) == {}
    assert cf.load_precomputed(attributor, 41, "trak", 8, out_dir=out, config=other) is None
    assert cf.committed_results(attributor, str(tmp_path / "nothing"), TINY) == {}
    # nor a ranking computed from another store
    ident = json.load(open(os.path.join(out, "identity.json")))
    ident["stores"]["loss"] = "loss-K99-other"
    atomic_write_json(os.path.join(out, "identity.json"), ident)
    checksums.record(out, ["identity.json"])  # (as a writer would: an identity edited by hand is refused)
    assert {r for _, r, _ in cf.committed_results(attributor, out, TINY)} == {"square", "random"}

    index = report.write_gallery(out, str(tmp_path / "gallery"), attributor.train, n_targets=2)
    assert index["k"] == 16 and index["seeds"] == seeds and len(index["entries"]) == 6
    for e in index["entries"]:
        assert os.path.isfile(tmp_path / "gallery" / e["after_png"])
    assert os.path.isfile(tmp_path / "gallery" / "gallery.png")


def test_summary_and_gallery_are_verified_against_their_writers_checksums(attributor, tmp_path):
    """The reported defects: gallery.json with l2 99 was shown as a result, and a truncated gallery PNG
    failed with "image file is truncated", naming no file. Each result now carries its writer's
    checksum and its reader names the file that does not match it, with the fix."""
    from PIL import Image

    from dtrak_core.errors import IntegrityError

    out = str(tmp_path / "cf" / "jobs")
    cf.run_counterfactual(attributor, out, cf.target_seeds(1, start=60), ["trak", "random"], [4], TINY, control=False,
                          show_bar=False)
    summary = report.summarize(out)
    assert summary[checksums.FIELD] == checksums.json_digest({k: v for k, v in summary.items() if k != checksums.FIELD})
    path = str(tmp_path / "cf" / "summary.json")
    atomic_write_json(path, summary)
    assert report.read_summary(path) == {k: v for k, v in summary.items() if k != checksums.FIELD}
    summary["cells"][0]["l2"]["median"] = 99.0
    atomic_write_json(path, summary)
    with pytest.raises(IntegrityError, match=f"^{path} \\(counterfactual summary\\) does not match its own "
                                             f"content_sha256.*--summary-only"):
        report.read_summary(path)

    gallery = str(tmp_path / "cf" / "gallery")
    index = report.write_gallery(out, gallery, attributor.train, n_targets=1)
    recorded = json.load(open(os.path.join(gallery, "checksums.json")))["sha256"]
    assert set(recorded) == {n for n in os.listdir(gallery) if n != "checksums.json"}
    entries = report.read_gallery(gallery)
    assert [e["l2"] for e in entries] == [e["l2"] for e in index["entries"]]
    assert all(os.path.isabs(e["after_png"]) and os.path.isfile(e["after_png"]) for e in entries)

    original = open(os.path.join(gallery, "gallery.json")).read()
    edited = json.loads(original)
    edited["entries"][0]["l2"] = 99.0
    with open(os.path.join(gallery, "gallery.json"), "w") as f:
        json.dump(edited, f)
    index_path = os.path.join(gallery, "gallery.json")
    with pytest.raises(IntegrityError, match=f"^{index_path} \\(counterfactual gallery index\\) hashes to .*"
                                             f"checksums.json .*rewrite the gallery .*--summary-only"):
        report.read_gallery(gallery)
    with open(index_path, "w") as f:
        f.write(original)
    png = os.path.join(gallery, index["entries"][0]["after_png"])
    with open(png, "r+b") as f:
        f.truncate(os.path.getsize(png) // 2)
    with pytest.raises(Exception, match="truncated"):
        Image.open(png).load()  # what the app used to show, naming no file
    with pytest.raises(IntegrityError, match=f"^{png} \\(counterfactual gallery image\\) hashes to"):
        report.read_gallery(gallery)


def test_shards_partition_the_jobs(attributor, tmp_path):
    out = str(tmp_path / "jobs")
    seeds = cf.target_seeds(1, start=50)
    a = cf.run_counterfactual(attributor, out, seeds, ["random", "trak"], [4], TINY, shard=(0, 2), show_bar=False)
    b = cf.run_counterfactual(attributor, out, seeds, ["random", "trak"], [4], TINY, shard=(1, 2), show_bar=False)
    assert sorted(a + b) == sorted([cf.CONTROL_ID, "random-k4-seed50", "trak-k4-seed50"]) and not set(a) & set(b)


def test_clip_cosine_with_local_weights_and_without(tmp_path, monkeypatch):
    """The CLIP metric uses local weights when $DTRAK_CLIP_PATH points at them (a tiny random CLIP
    here), and says why it is unavailable otherwise; it never downloads or substitutes."""
    transformers = pytest.importorskip("transformers")
    from dtrak_core.attribution.clip_encoder import ClipImageEncoder

    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=16))
    path = str(tmp_path / "clip")
    model.eval().save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}, f)
    before, after = torch.rand(2, 1, 8, 8) * 2 - 1
    monkeypatch.setenv("DTRAK_CLIP_PATH", path)
    cf._clip_encoder.cache_clear()
    try:
        cos, status = cf.clip_cosine(before, after)
        e = ClipImageEncoder.load(path)(torch.stack([before, after])).double()
        assert status == "ok" and cos == pytest.approx(float(torch.nn.functional.cosine_similarity(e[0], e[1], dim=0)))
        assert cf.clip_cosine(before, before)[0] == pytest.approx(1.0)
        import huggingface_hub.constants

        monkeypatch.setenv("DTRAK_CLIP_PATH", str(tmp_path / "nothing"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
        cf._clip_encoder.cache_clear()
        cos, status = cf.clip_cosine(before, after)
        assert cos is None and status.startswith("unavailable")
    finally:
        cf._clip_encoder.cache_clear()


def test_a_sharpened_ranking_is_recorded_with_its_tuned_lambda(attributor, tmp_path):
    """d-trak-sharp removes the top of D-TRAK's scores at the lambda tuned for it; results made at
    one lambda are refused once the folder's tuned lambda changes."""
    from dtrak_core.attribution import methods

    seeds = cf.target_seeds(1, start=60)
    image = cf.sample(attributor.unet, attributor.scheduler, seeds[0])
    setting, _ = attributor.setting("square")
    key = methods.sharpened_lambda_key("d-trak-sharp", setting.slug)
    att = Attributor(attributor.unet, attributor.scheduler, attributor.train,
                     [s for v in attributor.stores.values() for _, s in v], tuned_lambdas={key: 0.5})
    assert cf.ranking_name("sharp-d-trak") == "d-trak-sharp"
    removed = cf.removal(att, image, seeds[0], "d-trak-sharp", 6)
    assert list(removed) == list(att.attribute(image, "square", lam=0.5).proponents(6))
    out = str(tmp_path / "jobs")
    cf.run_counterfactual(att, out, seeds, ["d-trak-sharp"], [2], TINY, control=False, show_bar=False)
    ident = json.load(open(os.path.join(out, "identity.json")))
    assert ident["stores"]["d-trak-sharp"] == f"{setting.slug} at lambda 0.5"
    att.tuned_lambdas[key] = 0.2
    with pytest.raises(ValueError, match="at lambda 0.5"):
        cf.run_counterfactual(att, out, seeds, ["d-trak-sharp"], [2], TINY, control=False, show_bar=False)


def test_a_kernel_baseline_ranks_at_its_data_free_rules_even_when_tuned(attributor):
    """Every ranking is tuned alike in the counterfactual (D-TRAK at its rule lambda): the RBF pixel
    kernel removes the top of its scores at the data-free gamma and lambda, whatever the folder records."""
    from dtrak_core.attribution.kernels import KernelRidge

    seed = cf.target_seeds(1, start=61)[0]
    image = cf.sample(attributor.unet, attributor.scheduler, seed)
    want = np.argsort(-KernelRidge("rbf").fit(attributor.train.images).scores(image[None])[0], kind="stable")[:6]
    att = Attributor(attributor.unet, attributor.scheduler, attributor.train,
                     [s for v in attributor.stores.values() for _, s in v],
                     tuned_params={"pixel-rbf": {"lambda": 5.0, "gamma": 0.25}})
    assert list(cf.removal(att, image, seed, "pixel-rbf", 6)) == list(want)
    assert cf._identity(att, TINY, ["pixel-rbf"])["stores"]["pixel-rbf"] == "no store; data-free rules"


def test_holm_adjusts_every_reported_paired_test():
    from dtrak_core.evaluation.counterfactual_report import holm

    paired = [{"wilcoxon_p": 0.01}, {"wilcoxon_p": 0.04}, {"wilcoxon_p": None}, {"wilcoxon_p": 0.03}]
    holm(paired)
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
    assert [p["holm_p"] for p in paired] == [pytest.approx(0.03), pytest.approx(0.06), None, pytest.approx(0.06)]


def test_a_folder_classifier_labels_jobs_measured_without_one(tmp_path):
    """`counterfactual-own` measures models of other images without a classifier (labels -1); the
    summary reads the targets' class before and after from the images each job file keeps, with the
    folder's own classifier, and reports how often it changed and the removed images' class share."""
    from dtrak_core.files import save_result

    out = str(tmp_path / "jobs")
    os.makedirs(out)
    before, after = torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), 1.0)
    for seed, moved in ((1, after), (2, before)):  # target 1 moves from dark to bright, target 2 stays
        r = cf.CounterfactualResult(seed=seed, ranking="square", k=2, before=before, after=moved,
                                    removed_indices=np.array([0, 3]), l2=float((moved - before).norm()),
                                    label_before=-1, confidence_before=float("nan"), label_after=-1,
                                    confidence_after=float("nan"), clip_cosine=None, clip_status="unavailable",
                                    train_seconds=float("nan"))
        save_result(os.path.join(out, f"d-trak-k2-seed{seed}.npz"), **r.to_arrays())

    class Brightness:  # class 1 for bright images, 0 for dark ones
        def classify(self, images):
            bright = (np.asarray(images).mean(axis=(1, 2, 3)) > 0).astype(int)
            return bright, np.full(len(bright), 0.9)

    unlabelled = report.summarize(out, np.array([0, 0, 1, 1]))["cells"][0]
    assert unlabelled["label_changed"] is None and unlabelled["removed_same_label_share"] is None
    cell = report.summarize(out, np.array([0, 0, 1, 1]), Brightness())["cells"][0]
    assert cell["label_changed"] == 0.5 and cell["removed_same_label_share"] == 0.5
    assert [(t["label_before"], t["label_after"]) for t in cell["per_target"]] == [(0, 1), (0, 0)]
    assert "| class label changed | 50% |" in report.format_table(report.summarize(out, None, Brightness()), 4, "class")
