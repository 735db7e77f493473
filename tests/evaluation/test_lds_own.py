"""LDS and the counterfactual on a model dtrak did not train: a tiny saved pipeline and image folder,
subsets retrained by "the user's own training script" (a plain diffusers loop here), ground truth,
every method's LDS, and the errors for a missing checkpoint, bad masks and another architecture."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.build import build_from
from dtrak_core.cli import main
from dtrak_core.evaluation import lds_own, lds_own_report, lds_run
from dtrak_core.evaluation.lds import lds
from dtrak_core.evaluation.lds_run import LDSConfig, collect

N = 24
TINY_LDS = LDSConfig(num_subsets=4, train_seeds=(1,), eval_timesteps=10, noise_seeds=(0,), generated=6, sample_steps=4)


def tiny_unet(block_out_channels=(4, 8), seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=block_out_channels,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       norm_num_groups=4, add_attention=False)


def user_training_script(base_unet, scheduler, images: torch.Tensor, jobs: list, out: str, steps: int = 3) -> None:
    """What a user's own script does: a fresh UNet from the base config per job, a few AdamW steps on
    the kept images, `save_pretrained` to out/<id>/ (nothing of dtrak's training code)."""
    from diffusers import UNet2DModel

    for job in jobs:
        torch.manual_seed(job.get("seed", 0))
        unet = UNet2DModel.from_config(base_unet.config)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        x0 = images[torch.as_tensor(job["keep"])]
        for _ in range(steps):
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (len(x0),))
            loss = (unet(scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        unet.save_pretrained(os.path.join(out, job["id"]))


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """(model folder, run folder, checkpoints folder, training images) after prepare + the user's retrains."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from dtrak_core.attribution.attributor import Attributor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("own")
    pipeline = str(base / "pipeline")
    DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
                 ).save_pretrained(pipeline)
    data = base / "images"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(data / c)
        for i in range(N // 2):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8) // (1 + (c == "b"))).save(data / c / f"{i}.png")
    root = str(base / "root")
    build_from(root, pipeline, str(data), [FeatureSetting(fn, K=2, k=16) for fn in ("square", "loss", "avg")],
               show_bar=False)
    run_dir = str(base / "run")
    lds_own.prepare(root, run_dir, TINY_LDS)
    jobs = json.load(open(os.path.join(run_dir, lds_own.JOBS)))["jobs"]
    attributor = Attributor.load(root)
    ckpts = str(base / "checkpoints")
    user_training_script(attributor.unet, attributor.scheduler, attributor.train.images, jobs, ckpts)
    yield root, run_dir, ckpts, attributor
    torch.set_num_threads(threads)


def test_ground_truth_and_lds_of_user_retrained_checkpoints(own, tmp_path, capsys):
    root, run_dir, ckpts, attributor = own
    jobs = json.load(open(os.path.join(run_dir, lds_own.JOBS)))
    assert [j["id"] for j in jobs["jobs"]] == ["m000-s1", "m001-s1", "m002-s1", "m003-s1"] and jobs["num_train"] == N
    masks = np.load(os.path.join(run_dir, lds_own.MASKS))["masks"]
    assert masks.shape == (4, N) and all(np.array_equal(np.flatnonzero(masks[j["subset"]]), j["keep"])
                                         for j in jobs["jobs"])

    # a missing checkpoint is refused by name, unless --partial
    moved = os.path.join(str(tmp_path), "m003-s1")
    shutil.move(os.path.join(ckpts, "m003-s1"), moved)
    assert main(["lds-own", "ground-truth", "--root", root, "--out", run_dir, "--checkpoints", ckpts]) == 2
    assert "'m003-s1'" in capsys.readouterr().err
    assert main(["lds-own", "ground-truth", "--root", root, "--out", run_dir, "--checkpoints", ckpts, "--partial",
                 "--shard", "0/2"]) == 0
    assert sorted(os.listdir(os.path.join(run_dir, "jobs"))) == ["m000-s1.npz", "m002-s1.npz"]
    shutil.move(moved, os.path.join(ckpts, "m003-s1"))
    assert main(["lds-own", "ground-truth", "--root", root, "--out", run_dir, "--checkpoints", ckpts]) == 0
    assert len(os.listdir(os.path.join(run_dir, "jobs"))) == 4

    # the ground truth is the built-in harness's measurement of each checkpoint
    from dtrak_core.evaluation.lds_run import compact_losses, eps_losses, eval_timesteps, load_test_sets

    col = collect(run_dir)
    assert np.array_equal(col["masks"], masks) and col["F"]["generated"].shape == (4, 6)
    unet = lds_own.load_retrained(os.path.join(ckpts, "m002-s1"), attributor.unet)
    expected = compact_losses("generated", eps_losses(unet, attributor.scheduler, load_test_sets(run_dir)["generated"],
                                                      eval_timesteps(10), (0,)))["F_generated"][0]
    np.testing.assert_allclose(col["F"]["generated"][2], expected, rtol=1e-6)

    assert main(["build-das", "--root", root]) == 0  # DAS's training losses: built by their one writer only
    assert main(["lds-own", "evaluate", "--root", root, "--out", run_dir, "--bootstrap", "20", "--no-journey"]) == 0
    t = json.load(open(os.path.join(run_dir, "tables.json")))
    report = open(os.path.join(run_dir, "tables.md")).read()
    assert t["subsets_done"] == 4 and set(t["test_sets"]) == {"generated"}
    for row in ("d-trak/K2", "trak/K2", "pixel-cosine", "gradient-dot/K2", "relative-ip/K2"):
        cell = t["methods"][row]["generated"]
        assert -100 <= cell.get("honest", cell)["lds"] <= 100 and cell.get("honest", cell)["pm"] >= 0
    assert "unavailable" in t["methods"]["tracin"]  # no replayable training run for a model dtrak did not train
    assert -100 <= t["methods"]["das"]["generated"]["lds"] <= 100  # the registry's successor, over the avg store
    assert set(t["ablation"]) == {"avg/K2"}  # another output function with a store in the folder
    assert "| das |" in report and "| avg |" in report
    assert report.startswith(f"# {lds_own_report.TABLES_TITLE}") and "| d-trak |" in report and "validation digits" not in report
    # the missing Journey-TRAK cell names the command that fills it for this run, with its --root and --out
    assert f"python -m dtrak_core lds-own evaluate --root {root} --out {run_dir}" in report
    assert "lds features --journey" not in report

    # D-TRAK's cell is lds.lds of its scores at the cell's lambda, against this ground truth
    from dtrak_core.evaluation import tables as bm

    bench = bm.Bench(run_dir, root, method_Ks=(2,))
    (phi,), queries = bench.trak_sweep_inputs(bench.setting("square", 2))
    lam = t["methods"]["d-trak/K2"]["generated"]["paper"]["lambda"]
    from dtrak_core.attribution.scoring import TRAKScorer

    scores = TRAKScorer(lam=lam).fit(phi).scores(queries["generated"][0])
    value, _ = lds(scores, masks, col["F"]["generated"], num_bootstrap=0)
    assert value == pytest.approx(t["methods"]["d-trak/K2"]["generated"]["paper"]["lds"], abs=1e-6)


def test_a_replaced_or_foreign_checkpoint_is_refused(own, tmp_path, capsys):
    root, run_dir, ckpts, attributor = own
    other = str(tmp_path / "ckpts")
    shutil.copytree(ckpts, other)
    shutil.rmtree(os.path.join(other, "m001-s1"))
    tiny_unet((8, 16)).save_pretrained(os.path.join(other, "m001-s1"))
    fresh = str(tmp_path / "run")
    lds_own.prepare(root, fresh, TINY_LDS)
    assert main(["lds-own", "ground-truth", "--root", root, "--out", fresh, "--checkpoints", other]) == 2
    err = capsys.readouterr().err
    assert "m001-s1" in err and "another architecture" in err and "block_out_channels" in err

    # a checkpoint listing instead of the naming convention; a checkpoint replaced after measuring is noticed
    listing = {j: os.path.join("..", "ckpts", j) for j in ("m000-s1", "m002-s1", "m003-s1")}
    os.makedirs(tmp_path / "listed")
    json.dump(listing, open(tmp_path / "listed" / lds_own.CHECKPOINTS, "w"))
    assert lds_own.ground_truth(root, fresh, str(tmp_path / "listed"), partial=True, show_bar=False) == \
        ["m000-s1", "m002-s1", "m003-s1"]
    shutil.rmtree(os.path.join(other, "m002-s1"))
    tiny_unet(seed=5).save_pretrained(os.path.join(other, "m002-s1"))
    with pytest.raises(ValueError, match="another checkpoint"):
        lds_own.ground_truth(root, fresh, str(tmp_path / "listed"), partial=True, show_bar=False)


def test_masks_are_validated(own, tmp_path, capsys):
    root, run_dir, ckpts, attributor = own
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones((4, N + 1), dtype=bool))
    assert main(["lds-own", "prepare", "--root", root, "--out", str(tmp_path / "r"), "--masks", str(wrong)]) == 2
    assert f"has {N + 1} columns but the training set has {N} images" in capsys.readouterr().err
    for bad, match in ((np.zeros((4, N), dtype=np.float32) + 0.5, "values other than 0 and 1"),
                       (np.ones((2, N), dtype=bool), "at least 3"), (np.ones(N, dtype=bool), "two dimensions")):
        np.save(wrong, bad)
        with pytest.raises(ValueError, match=match):
            lds_run.read_masks(str(wrong), N)
    lists = tmp_path / "subsets.json"
    json.dump([[0, 1, 2], [3, 4], [5, 6, 7, 8]], open(lists, "w"))
    m = lds_run.read_masks(str(lists), N)
    assert m.shape == (3, N) and m.sum() == 9 and m[2, 8]
    json.dump([[0, N]], open(lists, "w"))
    with pytest.raises(ValueError, match="outside"):
        lds_run.read_masks(str(lists), N)
    # a user's masks drive the jobs and the ground truth's masks
    given = np.zeros((3, N), dtype=bool)
    given[0, :12], given[1, 12:], given[2, ::2] = True, True, True
    np.savez(tmp_path / "given.npz", masks=given)
    run = lds_own.prepare(root, str(tmp_path / "given-run"), TINY_LDS, masks=str(tmp_path / "given.npz"))
    assert [j.id for j in run.jobs()] == ["m000-s1", "m001-s1", "m002-s1"]
    assert np.array_equal(run.jobs()[1].keep, np.arange(12, N))


def test_counterfactual_of_user_retrained_checkpoints(own, tmp_path, capsys):
    root, run_dir, ckpts, attributor = own
    out = str(tmp_path / "cf")
    assert main(["counterfactual-own", "prepare", "--root", root, "--out", out, "--targets", "1", "--rankings",
                 "d-trak,random", "--k", "6", "--k", "3"]) == 0
    removals = json.load(open(os.path.join(out, lds_own.REMOVALS)))
    assert [j["id"] for j in removals["jobs"]] == ["d-trak-k6-seed1000", "random-k6-seed1000", "d-trak-k3-seed1000",
                                                   "random-k3-seed1000"]
    assert all(len(j["removed"]) == j["k"] and sorted(j["removed"] + j["keep"]) == list(range(N)) for j in removals["jobs"])
    assert removals["jobs"][2]["removed"] == removals["jobs"][0]["removed"][:3]  # the top 3 of the same ranking
    user_training_script(attributor.unet, attributor.scheduler, attributor.train.images, removals["jobs"],
                         str(tmp_path / "cf-ckpts"), steps=1)
    capsys.readouterr()
    assert main(["counterfactual-own", "measure", "--root", root, "--out", out, "--checkpoints",
                 str(tmp_path / "cf-ckpts")]) == 0
    table = open(os.path.join(out, "results.md")).read()
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert {(c["method"], c["k"]) for c in summary["cells"]} == {(m, k) for m in ("D-TRAK", "Random") for k in (6, 3)}
    # the L2 recorded is the target's distance to its regeneration by the job's checkpoint
    from dtrak_core.evaluation.counterfactual import load_job, pixel_l2, sample

    r = load_job(os.path.join(out, "jobs", "d-trak-k6-seed1000.npz"))
    unet = lds_own.load_retrained(str(tmp_path / "cf-ckpts" / "d-trak-k6-seed1000"), attributor.unet)
    assert r.l2 == pytest.approx(pixel_l2(sample(attributor.unet, attributor.scheduler, 1000),
                                          sample(unet, attributor.scheduler, 1000)), rel=1e-6)
    assert "median L2" in table and "digit label changed" not in table  # no digit classifier for these images


def _copy_root(root: str, dest: str) -> str:
    """A copy of the model folder (its stores inside it; the model and images stay where they are), so
    a test that records lambdas in its manifest leaves the module's folder as it was."""
    shutil.copytree(root, dest)
    return dest


def test_the_lambda_measured_on_your_model_is_recorded_and_used(own, tmp_path, capsys):
    """`lds-own tune-lambda` records each store's lambda (no validation set: chosen on the generated
    samples, its LDS cross-fitted, said so) in the manifest, sealed by its writer; `attribute` and
    `Attributor.load` use it; tables.md says which lambda the answers use, before and after."""
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.scoring import default_lambda
    from dtrak_core.evaluation.tables import LAMBDA_GRID
    from dtrak_core.folder import ModelFolder

    root, run_dir, ckpts, _ = own
    lds_own.ground_truth(root, run_dir, ckpts, show_bar=False)  # (resumable: measured already when run in order)
    mine = _copy_root(root, str(tmp_path / "root"))
    dest = str(tmp_path / "report")
    square = Attributor.load(mine).setting("square")
    rule = default_lambda(square[1].features())

    assert main(["lds-own", "evaluate", "--root", mine, "--out", run_dir, "--dest", dest, "--bootstrap", "20",
                 "--no-journey"]) == 0
    report = open(os.path.join(dest, "tables.md")).read()
    assert "## The lambda of the shipped answers" in report and "the data-free rule" in report
    assert f"`python -m dtrak_core lds-own tune-lambda --root {mine} --out {run_dir}`" in report
    t = json.load(open(os.path.join(dest, "tables.json")))
    assert t["shipped_lambda"][square[0].slug]["source"] == "rule"
    assert t["shipped_lambda"][square[0].slug]["lambda"] == pytest.approx(rule)
    assert t["shipped_lambda"][square[0].slug]["generated_lds"] == pytest.approx(
        t["methods"]["d-trak/K2"]["generated"]["default"]["lds"])
    capsys.readouterr()
    assert main(["attribute", "--root", mine, "--seed", "3", "--method", "d-trak", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before["lambda"] == pytest.approx(rule) and "data-free rule" in before["lambda_source"]

    # the one command: recorded in the manifest through ModelFolder.edit (sealed), used by every answer;
    # the kernel baselines' entries (their own writer, experiments/strong_baselines.py) are kept
    from dtrak_core.evaluation.tuning import record_kernel_params

    kernel = {"lambda": 2.0, "gamma": 4.0, "relative": 1.0, "chosen_on": "validation LDS of the signed scores"}
    record_kernel_params(mine, {"pixel-rbf": kernel})
    assert main(["lds-own", "tune-lambda", "--root", mine, "--out", run_dir, "--dest", dest, "--bootstrap", "20"]) == 0
    assert ModelFolder.load(mine).tuned_lambda["pixel-rbf"] == kernel
    out = capsys.readouterr().out
    assert f"recorded under 'tuned_lambda' in {os.path.join(mine, 'manifest.json')}" in out
    folder = ModelFolder.load(mine)  # the seals match: written by the manifest's writer
    entry = folder.tuned_lambda[square[0].slug]
    assert set(folder.tuned_lambda) >= {s.slug for v in Attributor.load(mine).stores.values() for s, _ in v}
    assert f"tuned_lambda/{square[0].slug}" in folder.settings_hash
    assert entry["lambda"] in LAMBDA_GRID and entry["validation_lds"] is None
    assert "no validation set" in entry["chosen_on"] and "cross-fitted" in entry["chosen_on"]
    cell = t["methods"]["d-trak/K2"]["generated"]  # the evaluate table's own numbers, on the same samples
    assert entry["lambda"] == cell["paper"]["lambda"] and entry["generated_lds"] == pytest.approx(cell["honest"]["lds"])
    assert entry["fold_lambdas"] == cell["honest"]["lambdas"] and entry["rule_lambda"] == pytest.approx(rule)
    assert Attributor.load(mine).lambda_for(square[0]) == entry["lambda"]
    assert main(["attribute", "--root", mine, "--seed", "3", "--method", "d-trak", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["lambda"] == entry["lambda"] and after["lambda_source"].startswith("recorded in manifest.json")
    report = open(os.path.join(dest, "tables.md")).read()  # the report now says the answers use it
    assert "recorded in manifest.json (generated-sample LDS (no validation set)" in report
    assert "data-free rule" not in report
    assert json.load(open(os.path.join(dest, "tables.json")))["shipped_lambda"][square[0].slug]["source"] == "recorded"

    # `lds tune-lambda` on a folder built with `build`: given the own run it records the same; without, it names it
    assert main(["lds", "tune-lambda", "--root", mine, "--out", run_dir, "--bootstrap", "20"]) == 0
    assert ModelFolder.load(mine).tuned_lambda[square[0].slug] == entry
    capsys.readouterr()
    assert main(["lds", "tune-lambda", "--root", mine]) == 2
    assert f"lds-own tune-lambda --root {mine} --out RUN" in capsys.readouterr().err


def test_with_a_validation_set_the_lambda_is_chosen_on_it(own, tmp_path):
    from dtrak_core.folder import ModelFolder

    root, _, ckpts, _ = own
    mine = _copy_root(root, str(tmp_path / "root"))
    run = str(tmp_path / "run")
    lds_own.prepare(mine, run, TINY_LDS, validation=ModelFolder.load(mine).dataset["folder"])
    lds_own.ground_truth(mine, run, ckpts, show_bar=False)  # the same masks: the same checkpoints
    tuned = lds_own_report.tune_lambda(mine, run, num_bootstrap=10, show_bar=False)
    entry = ModelFolder.load(mine).tuned_lambda["square-K2-sparse-jl-k16-s42"]
    assert entry == json.loads(json.dumps(tuned["square-K2-sparse-jl-k16-s42"]))
    assert entry["chosen_on"] == "validation LDS, 4 subsets" and -100 <= entry["validation_lds"] <= 100
    with pytest.raises(ValueError, match="holds no LDS run of your checkpoints"):
        lds_own_report.tune_lambda(mine, str(tmp_path / "nothing"))


def test_seeds_are_named_for_what_they_seed(own, tmp_path):
    """jobs.json: the training seed `train_seed`; removals.json: the target's sampling seed
    `target_seed`; both keep `seed` for readers of older files, which are still read."""
    root, run_dir, _, _ = own
    jobs = json.load(open(os.path.join(run_dir, lds_own.JOBS)))
    assert all(j["train_seed"] == j["seed"] == 1 for j in jobs["jobs"]) and "train_seed" in jobs["note"]
    out = str(tmp_path / "cf")
    removals = lds_own.counterfactual_prepare(root, out, [1000, 1001], ["random"], [3])
    assert [(j["target_seed"], j["seed"]) for j in removals["jobs"]] == [(1000, 1000), (1001, 1001)]
    assert "target_seed is the sampling seed" in removals["note"]
    assert lds_own.target_seed({"seed": 7}) == 7 and lds_own.target_seed({"target_seed": 8, "seed": 8}) == 8
    assert lds_own.train_seed({"seed": 2}) == 2 and lds_own.train_seed({"train_seed": 3, "seed": 3}) == 3


def test_a_ranking_added_to_a_prepared_counterfactual_is_appended(own, tmp_path):
    """Preparing again with one more ranking keeps the jobs already listed, in their order (a
    running shard numbers them), and appends the new ranking's; preparing again with nothing new
    leaves the file alone; other targets are refused."""
    from dtrak_core.evaluation import counterfactual as cf

    root, _, _, attributor = own
    out = str(tmp_path / "cf")
    first = lds_own.counterfactual_prepare(root, out, [1000, 1001], ["random"], [3])
    path = os.path.join(out, lds_own.REMOVALS)
    written = open(path, "rb").read()
    assert lds_own.counterfactual_prepare(root, out, [1000, 1001], ["random"], [3]) == first
    assert open(path, "rb").read() == written
    more = lds_own.counterfactual_prepare(root, out, [1000, 1001], ["random", "d-trak"], [3])
    assert more["jobs"][:2] == first["jobs"] and json.load(open(path)) == json.loads(json.dumps(more))
    added = more["jobs"][2:]
    assert [(j["ranking"], j["target_seed"]) for j in added] == [("square", 1000), ("square", 1001)]
    for j in added:
        before = cf.sample(attributor.unet, attributor.scheduler, j["target_seed"])
        assert j["removed"] == cf.removal(attributor, before, j["target_seed"], "square", 3).tolist()
        assert sorted(j["keep"] + j["removed"]) == list(range(len(attributor.train)))
    assert set(json.load(open(os.path.join(out, "identity.json")))["stores"]) == {"square"}
    with pytest.raises(ValueError, match="holds targets"):
        lds_own.counterfactual_prepare(root, out, [1000, 1002], ["random"], [3])
    json.dump({"jobs": {"not": "a list"}}, open(path, "w"))  # an edited list is named, and left as it is
    with pytest.raises(ValueError, match="is not a removals list this tool wrote"):
        lds_own.counterfactual_prepare(root, out, [1000, 1001], ["random", "d-trak"], [3])
    assert json.load(open(path)) == {"jobs": {"not": "a list"}}


def test_a_partial_counterfactual_is_marked_partial(own, tmp_path, capsys):
    root, _, _, attributor = own
    out = str(tmp_path / "cf")
    assert main(["counterfactual-own", "prepare", "--root", root, "--out", out, "--targets", "2", "--rankings",
                 "random", "--k", "3"]) == 0
    removals = json.load(open(os.path.join(out, lds_own.REMOVALS)))
    ckpts = str(tmp_path / "cf-ckpts")
    user_training_script(attributor.unet, attributor.scheduler, attributor.train.images, removals["jobs"][:1], ckpts,
                         steps=1)
    assert main(["counterfactual-own", "measure", "--root", root, "--out", out, "--checkpoints", ckpts,
                 "--partial"]) == 0
    table = open(os.path.join(out, "results.md")).read()
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert table.startswith("**PARTIAL: 1 of 2 retrains measured**")
    assert f"counterfactual-own measure --root {root} --out {out} --checkpoints DIR" in table
    assert "another model and dataset" in table  # the published CIFAR-2 row's caveat
    assert summary["partial"] and (summary["jobs_done"], summary["jobs_planned"]) == (1, 2)
    from dtrak_core.evaluation.counterfactual_report import read_summary

    assert read_summary(os.path.join(out, "summary.json"))["partial"]  # sealed with the keys added last (the app reads it)
    user_training_script(attributor.unet, attributor.scheduler, attributor.train.images, removals["jobs"][1:], ckpts,
                         steps=1)
    assert main(["counterfactual-own", "measure", "--root", root, "--out", out, "--checkpoints", ckpts]) == 0
    assert "PARTIAL" not in open(os.path.join(out, "results.md")).read()
    assert not json.load(open(os.path.join(out, "summary.json")))["partial"]


def test_the_noise_ceiling_from_a_second_seed_run(own, tmp_path, capsys):
    """Three of the run's subsets retrained with another seed (a run of their own): `evaluate
    --ceiling-run` reports how well one seed's ground truth predicts the other's, paired by subset, and
    the ceiling of an LDS against one seed, sqrt(r)."""
    from dataclasses import replace

    from dtrak_core.evaluation.lds import noise_ceiling

    root, run_dir, ckpts, attributor = own
    assert main(["lds-own", "ground-truth", "--root", root, "--out", run_dir, "--checkpoints", ckpts]) == 0
    masks = np.load(os.path.join(run_dir, lds_own.MASKS))["masks"]
    given = str(tmp_path / "subsets.npy")
    np.save(given, masks[[2, 0, 1]])  # in another order than the run's
    second = str(tmp_path / "ceiling")
    lds_own.prepare(root, second, replace(TINY_LDS, train_seeds=(2,)), masks=given)
    jobs = json.load(open(os.path.join(second, lds_own.JOBS)))["jobs"]
    second_ckpts = str(tmp_path / "ceiling-checkpoints")
    user_training_script(attributor.unet, attributor.scheduler, attributor.train.images,
                         [{**j, "seed": j["train_seed"]} for j in jobs], second_ckpts)
    assert main(["lds-own", "ground-truth", "--root", root, "--out", second, "--checkpoints", second_ckpts]) == 0
    dest = str(tmp_path / "report")
    assert main(["lds-own", "evaluate", "--root", root, "--out", run_dir, "--ceiling-run", second, "--dest", dest,
                 "--bootstrap", "20", "--no-journey"]) == 0
    got = json.load(open(os.path.join(dest, "tables.json")))["noise_ceiling"]["generated"]
    first, other = collect(run_dir), collect(second)
    want = noise_ceiling(np.stack([first["F"]["generated"][[2, 0, 1]], other["F"]["generated"]]), 20, target_seeds=1)
    assert got["subsets"] == 3 and got["target_seeds"] == 1
    assert got["seed_vs_seed"] == pytest.approx(want["seed_vs_seed"])
    # (these tiny models' two seeds disagree, r < 0: no ceiling, written as null)
    assert got["ceiling"] == (None if np.isnan(want["ceiling"]) else pytest.approx(want["ceiling"]))
    assert "Noise ceiling" in open(os.path.join(dest, "tables.md")).read()
    # fewer than 3 subsets measured in both runs: named, with what to do
    for job in jobs[1:]:
        os.remove(os.path.join(second, "jobs", f"{job['id']}.npz"))
    assert main(["lds-own", "evaluate", "--root", root, "--out", run_dir, "--ceiling-run", second,
                 "--bootstrap", "20", "--no-journey", "--dest", ""]) == 2
    assert "only 1 subsets are measured in both" in capsys.readouterr().err
