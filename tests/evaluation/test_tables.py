"""The benchmark tables (evaluation/tables.py), their report (tables_report.py) and the lambda tuner
(tuning.py) on a tiny model folder and LDS run, each cell checked against a direct computation."""
import json
import os

import numpy as np
import pytest
import torch

from dtrak_core.attribution import methods
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.scoring import TRAKScorer
from dtrak_core.attribution.similarity import similarity
from dtrak_core.build import build_store
from dtrak_core.evaluation import tables as bm
from dtrak_core.evaluation import tables_report
from dtrak_core.evaluation.lds import lds
from dtrak_core.evaluation.lds_run import LDSConfig, LDSRun, subset_indices
from dtrak_core.evaluation.tuning import tune_lambdas
from dtrak_core.files import atomic_write_json
from dtrak_core.model.sampling import generate
from dtrak_core.model.training import TrainConfig, train
from dtrak_core.model.unet import build_scheduler, checkpoint_hash, save_checkpoint

TINY = TrainConfig(steps=6, batch_size=16, block_out_channels=(4, 8))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("k", [5, 20])  # primal (k < N) and dual (k > N) regimes
def test_spectral_trak_equals_trak_scorer(k):
    from dtrak_core.attribution.scoring import SpectralTRAK

    rng = np.random.default_rng(5)
    phi, q = rng.normal(size=(12, k)), rng.normal(size=(3, k))
    spec = SpectralTRAK().fit(phi)
    for lam in (1e-3, 0.7, 50.0):
        ref = TRAKScorer(lam=lam).fit(phi)
        np.testing.assert_allclose(spec.scores(q, lam), ref.scores(q), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(spec.weight_norms(lam).numpy(), ref.weights_.norm(dim=0).numpy(), rtol=1e-8)


@pytest.mark.parametrize("normalize", [None, "relative", "renorm"])
def test_trak_g_fn_averages_models_and_normalizes(normalize):
    from dtrak_core.attribution.similarity import ip_norms

    rng = np.random.default_rng(2)
    trains = [rng.normal(size=(12, 5)) for _ in range(3)]
    queries = {"v": [rng.normal(size=(2, 5)) for _ in range(3)]}
    masks = rng.random((4, 12)) < 0.5
    got = bm.trak_g_fn(trains, queries, masks, normalize)(0.5)["v"]
    scores = []
    for t, q in zip(trains, queries["v"]):
        scorer = TRAKScorer(lam=0.5).fit(t)
        scores.append(scorer.scores(q) / (ip_norms(scorer, normalize) if normalize else 1))
    np.testing.assert_allclose(got, masks @ np.mean(scores, axis=0).T, rtol=1e-8)


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory, digits):
    """A tiny model folder (tiny UNet trained on all 1500 digits, K=2 k=32 stores) and its LDS run."""
    base = tmp_path_factory.mktemp("bench")
    root, run_dir = str(base / "root"), str(base / "run")
    torch.set_num_threads(1)
    scheduler = build_scheduler()
    unet = train(digits.images, scheduler, TINY, show_bar=False)
    save_checkpoint(os.path.join(root, "model"), unet, scheduler)
    from dtrak_core.model.unet import load_checkpoint

    unet, scheduler = load_checkpoint(os.path.join(root, "model"))
    atomic_write_json(os.path.join(root, "manifest.json"), {"checkpoint": "model", "dataset": "digits-train",
                                                             "train_config": TINY.to_dict(), "stores": []})
    for fn in ("square", "loss"):
        build_store(root, unet, scheduler, FeatureSetting(fn, K=2, k=32), show_bar=False)
    config = LDSConfig(num_subsets=5, train_seeds=(1, 2), eval_timesteps=10, noise_seeds=(0,), generated=4)
    test_sets = {"validation": load_validation()[:6], "generated": generate(unet, scheduler, range(4))}
    LDSRun(run_dir, digits.images, scheduler, TINY, config, test_sets,
           {"checkpoint": checkpoint_hash(unet)}).run(show_bar=False)
    options = dict(ablation_fns=("square", "avg"), ablation_Ks=(1, 2), method_Ks=(2,), ensemble_sizes=(1, 2),
                   ensemble_K=2, journey_K=2)
    return root, run_dir, options


def load_validation():
    from dtrak_core.model.data import load_digits

    return load_digits("validation").images


def test_tables_end_to_end(tiny_bench, tmp_path):
    root, run_dir, options = tiny_bench
    bench = bm.Bench(run_dir, root, **options)
    assert bench.base == FeatureSetting("square", K=2, k=32)
    # nothing computed yet beyond the root's own stores: the cells say what is missing and how to fill it
    t = tables_report.tables(run_dir, root, num_bootstrap=20, which=("ablation", "ensembles"), **options)
    assert t["ablation"]["avg/K1"]["missing"].startswith("python -m dtrak_core lds features --output-fn avg --K 1")
    assert "missing" in t["ensembles"]["d-trak/S1"]
    # fill: ablation features, journey features, two ensemble members
    for fn in ("square", "avg"):
        for K in (1, 2):
            bench.features.compute(bench.setting(fn, K), show_bar=False)
    bench.features.compute(bench.setting("loss", 2), show_bar=False)
    bm.journey_features(bench, bench.setting("loss", 2), compute=True, show_bar=False)
    for j in range(2):
        member = bench.member(j, train=True, show_bar=False)
        for fn in ("loss", "square"):
            member.compute(bench.setting(fn, 2), show_bar=False)
    dest = str(tmp_path / "out")
    t = tables_report.tables(run_dir, root, dest=dest, num_bootstrap=20, **options)
    assert os.path.isfile(os.path.join(dest, tables_report.TABLES)) and os.path.isfile(os.path.join(dest, tables_report.REPORT))
    masks, F = bench.truth["masks"], bench.truth["F"]
    # D-TRAK cell: its test-set lambda's LDS equals a direct computation
    cell = t["methods"]["d-trak/K2"]["validation"]
    phi = bench.features.train(bench.setting("square", 2))
    q = bench.features.query("validation", bench.setting("square", 2))
    direct = lds(TRAKScorer(lam=cell["paper"]["lambda"]).fit(phi).scores(q), masks, F["validation"], 20)
    assert cell["paper"]["lds"] == pytest.approx(direct[0]) and cell["paper"]["pm"] == pytest.approx(direct[1])
    assert len(cell["lds_by_lambda"]) == len(bm.LAMBDA_GRID)
    # a fixed baseline equals its direct computation
    pix = similarity(bench.test_sets["generated"].flatten(1), bench.attributor.train.images.flatten(1), "cosine")
    assert t["methods"]["pixel-cosine"]["generated"]["lds"] == pytest.approx(lds(pix, masks, F["generated"], 20)[0])
    # the ensemble of 2 is the mean of the two members' TRAK scores, each member on its own half
    assert not np.array_equal(subset_indices(1500, 0, 0.5, bm.ENSEMBLE_SUBSET_SEED), subset_indices(1500, 0, 0.5, 0))
    members = [bench.member(j) for j in range(2)]
    lam = t["ensembles"]["trak/S2"]["generated"]["paper"]["lambda"]
    s = setting = bench.setting("loss", 2)
    mean = np.mean([TRAKScorer(lam=lam).fit(m.train(s)).scores(m.query("generated", setting)) for m in members], axis=0)
    assert t["ensembles"]["trak/S2"]["generated"]["paper"]["lds"] == pytest.approx(lds(mean, masks, F["generated"], 20)[0])
    # journey-trak: generated samples only; CLIP without weights: unavailable, never replaced
    assert "generated" in t["methods"]["journey-trak/K2"] and "validation" not in t["methods"]["journey-trak/K2"]
    for name in ("gradient-dot", "gradient-cosine", "relative-ip", "renorm-ip", "trak", "d-trak"):
        assert "validation" in t["methods"][f"{name}/K2"]
    assert "unavailable" in t["methods"]["clip-cosine"]
    assert "unavailable" in t["methods"]["tracin"]  # no checkpoints registered for the tiny model
    report = open(os.path.join(dest, tables_report.REPORT)).read()
    assert "| d-trak |" in report and "| avg |" in report and "| pixel-dot |" in report and "Missing cells" not in report
    # recomputing one table keeps the others, and the rows other writers put there (the evidence rows)
    rows = [{"method": "pixel-rbf", "label": "Pixel RBF kernel", "group": "model-free", "cost": "", "seconds": 1.0,
             "validation/signed": 60.0, "validation/signed pm": 0.5}]
    assert tables_report.publish_evidence(dest, rows, ["validation"], "python x.py --write")
    t2 = tables_report.tables(run_dir, root, dest=dest, num_bootstrap=20, which=("ensembles",), **options)
    kept = tables_report.load_tables(os.path.join(dest, tables_report.TABLES), required=True)
    assert t2["ablation"] == kept["ablation"]
    assert kept[tables_report.EVIDENCE] == {"rows": rows, "sets": ["validation"], "source": "python x.py --write"}
    assert "python x.py --write" in open(os.path.join(dest, tables_report.REPORT)).read()
    # tables.json carries its writer's checksum; a number edited by hand is refused, naming the file
    from dtrak_core import checksums
    from dtrak_core.errors import IntegrityError

    path = os.path.join(dest, tables_report.TABLES)
    written = json.load(open(path))
    assert written[checksums.FIELD] == checksums.json_digest({k: v for k, v in written.items() if k != checksums.FIELD})
    assert tables_report.load_tables(path, required=True) == {k: v for k, v in written.items() if k != checksums.FIELD}
    written["methods"]["pixel-cosine"]["generated"]["lds"] = 99.0
    with open(path, "w") as f:
        json.dump(written, f)
    with pytest.raises(IntegrityError, match=f"^{path} \\(benchmark tables\\) does not match its own content_sha256.*"
                                             f"lds tables"):
        tables_report.load_tables(path)


def test_bench_refuses_a_run_of_another_model(tiny_bench, tmp_path):
    root, run_dir, options = tiny_bench
    import json
    import shutil

    other = str(tmp_path / "run")
    shutil.copytree(run_dir, other)
    with open(os.path.join(other, "setup.json")) as f:
        setup = json.load(f)
    setup["checkpoint"] = "0123456789abcdef"
    atomic_write_json(os.path.join(other, "setup.json"), setup)
    with pytest.raises(ValueError, match="was made for model 0123456789abcdef"):
        bm.Bench(other, root, **options)


def test_tuned_lambda_is_chosen_on_validation_and_used_by_default(tiny_bench):
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.base import RULE
    from dtrak_core.attribution.scoring import default_lambda

    root, run_dir, _ = tiny_bench
    tuned = tune_lambdas(run_dir, root, num_bootstrap=10)
    att = Attributor.load(root)
    sharp = "d-trak-sharp/square-K2-sparse-jl-k32-s42"  # the sharpened D-TRAK's own lambda, over the square store
    assert set(tuned) == set(att.tuned_lambdas) == {"square-K2-sparse-jl-k32-s42", "loss-K2-sparse-jl-k32-s42", sharp}
    setting, store = att.setting("d-trak")
    entry = tuned[setting.slug]
    # the pick is the validation sweep's best lambda, for the signed and for the sharpened scores
    bench = bm.Bench(run_dir, root)
    q = bench.features.query("validation", setting)
    scores = [TRAKScorer(lam=lam).fit(store.features()).scores(q) for lam in bm.LAMBDA_GRID]
    masks, F = bench.truth["masks"], bench.truth["F"]["validation"]
    sweep = [lds(s, masks, F, 0)[0] for s in scores]
    assert entry["lambda"] == bm.LAMBDA_GRID[int(np.argmax(sweep))]
    sharp_sweep = [lds(methods.sharpen(s), masks, F, 0)[0] for s in scores]
    assert tuned[sharp]["lambda"] == bm.LAMBDA_GRID[int(np.argmax(sharp_sweep))]
    got = methods.scores(att, "d-trak-sharp", bench.test_sets["validation"][:2])
    np.testing.assert_allclose(got, methods.sharpen(att.scores(bench.test_sets["validation"][:2], "d-trak",
                                                               lam=tuned[sharp]["lambda"])))
    att.lam = 0.37  # (off the grid) an explicit override (`attribute --lambda`) wins over the tuned lambda
    try:
        np.testing.assert_allclose(methods.scores(att, "d-trak-sharp", bench.test_sets["validation"][:2]),
                                   methods.sharpen(att.scores(bench.test_sets["validation"][:2], "d-trak", lam=0.37)))
    finally:
        att.lam = None
    assert att.scorer("d-trak").lam_ == entry["lambda"]
    assert att.scorer("d-trak", lam=RULE).lam_ == pytest.approx(default_lambda(store.features()))
    assert att.scorer("d-trak", lam=3.0).lam_ == 3.0
    att.lam = 5.0  # an explicit override beats the tuned value
    assert att.scorer("d-trak").lam_ == 5.0


def test_a_hand_edited_tuned_lambda_is_refused_until_tune_lambda_reseals_it(tiny_bench, capsys):
    """The reported defect: a tuned lambda edited by hand (0.05 -> 50) silently changed a method's
    ranking. The manifest seals it; the fix the error names, `lds tune-lambda`, re-seals it."""
    import json

    from dtrak_core import cli
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.errors import IntegrityError

    root, run_dir, _ = tiny_bench
    tuned = tune_lambdas(run_dir, root, num_bootstrap=10)
    path = os.path.join(root, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    key = "d-trak-sharp/square-K2-sparse-jl-k32-s42"
    assert f"tuned_lambda/{key}" in manifest["settings_hash"]
    manifest["tuned_lambda"][key]["lambda"] = 1234.5  # (off the grid)
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(IntegrityError, match=f"^{path} \\(model manifest\\) entry tuned_lambda\\['{key}'\\] hashes to .*"
                                             f"re-run `python -m dtrak_core lds tune-lambda --root {root}`"):
        Attributor.load(root)
    assert cli.main(["lds", "tables", "--out", run_dir, "--root", root]) == 2  # what uses the lambdas refuses
    assert f"tuned_lambda['{key}'] hashes to" in capsys.readouterr().err
    assert cli.main(["lds", "tune-lambda", "--out", run_dir, "--root", root]) == 0  # the fix
    assert f"recorded under 'tuned_lambda' in {path}" in capsys.readouterr().out
    assert Attributor.load(root).tuned_lambdas[key] == tuned[key]["lambda"]
