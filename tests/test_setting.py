"""The paper's CIFAR-2 setting as a config: the preset itself (35.7M UNet built locally, M = 64 x 3),
the documented commands (they parse), and their code paths end to end on a scaled-down copy of the
config on the CPU: fake CIFAR-10 batches -> data folders -> base model -> model folder -> LDS jobs
-> sharded retrains -> ground truth."""
import json
import os
import pickle
import re
import shlex
import shutil

import numpy as np
import pytest
import torch

from dtrak_core import setting as st
from dtrak_core.cli import build_parser, main

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs", "CIFAR2.md")


def test_the_cifar2_preset_is_the_papers_setting():
    s = st.load_setting("cifar2")
    with torch.device("meta"):
        unet = s.build_unet()
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307  # google/ddpm-cifar10-32's architecture
    assert s.lds_config.num_subsets == 64 and s.lds_config.train_seeds == (1, 2, 3)
    assert s.lds_config.eval_timesteps == 1000 and s.lds_config.generated == 1000
    assert s.train_config.steps == 8000 and s.train_config.batch_size == 128 and s.train_config.lr == 1e-4
    assert s.data["classes"] == ["automobile", "horse"] and 2 * s.data["train_per_class"] == 5000
    assert [f.output_fn for f in s.feature_settings] == ["square", "loss"] and s.feature_settings[0].K == 100


def test_the_documented_commands_parse():
    text = open(DOCS).read()
    commands = re.findall(r"^(?:python|torchrun[^\n]*?) -m dtrak_core (.+)$", text, flags=re.M)
    assert len(commands) >= 15
    parser = build_parser()
    for line in commands:
        args = parser.parse_args(shlex.split(line.replace('"$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT"', "0/64")))
        assert args.func is not None


def test_a_broken_config_is_refused(tmp_path):
    raw = json.load(open(os.path.join(st.CONFIGS, "cifar2.json")))
    del raw["lds"]
    json.dump(raw, open(tmp_path / "c.json", "w"))
    with pytest.raises(ValueError, match="lacks lds"):
        st.load_setting(str(tmp_path / "c.json"))
    raw = json.load(open(os.path.join(st.CONFIGS, "cifar2.json")))
    raw["train"]["learning_rate"] = 1
    json.dump(raw, open(tmp_path / "c.json", "w"))
    with pytest.raises(ValueError, match="learning_rate"):
        st.load_setting(str(tmp_path / "c.json"))
    with pytest.raises(ValueError, match="not a preset"):
        st.load_setting("cifar3")
    raw["train"].pop("learning_rate")
    raw["unet"] = "nobody/no-such-model"  # an architecture from the Hugging Face cache, never downloaded
    json.dump(raw, open(tmp_path / "c.json", "w"))
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        st.load_setting(str(tmp_path / "c.json"))


def test_the_architecture_from_a_local_model_folder(tmp_path):
    raw = json.load(open(os.path.join(st.CONFIGS, "cifar2.json")))
    with torch.device("meta"):
        st.load_setting("cifar2").build_unet().save_config(str(tmp_path / "ddpm" / "unet"))
    raw["unet"] = str(tmp_path / "ddpm")
    json.dump(raw, open(tmp_path / "c.json", "w"))
    s = st.load_setting(str(tmp_path / "c.json"))
    assert s.unet["block_out_channels"] == [128, 256, 256, 256] and "35,746,307 parameters" in st.describe(s)


def tiny_config(path) -> str:
    """cifar2.json with every size scaled down: the same keys, the same code paths."""
    raw = json.load(open(os.path.join(st.CONFIGS, "cifar2.json")))
    raw["name"] = "cifar2-tiny"
    raw["data"].update(train_per_class=6, validation_per_class=2)
    raw["unet"].update(sample_size=8, block_out_channels=[4, 8], layers_per_block=1, norm_num_groups=4,
                       down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    raw["train"].update(steps=2, batch_size=4)
    raw["features"].update(K=2, k=16)
    raw["lds"].update(num_subsets=3, train_seeds=[1], eval_timesteps=10, noise_seeds=[0], generated=3, sample_steps=3)
    raw["counterfactual"].update(targets=1, k=[3], rankings=["d-trak", "random"])
    json.dump(raw, open(path, "w"))
    return str(path)


def fake_cifar10(folder) -> None:
    """The layout of cifar-10-batches-py: five training batches and a test batch of 20 images each."""
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(20)]
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data}, f, protocol=2)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """The documented one-GPU commands up to the LDS jobs, on the CPU, for a scaled-down cifar2.json."""
    tmp_path = tmp_path_factory.mktemp("cifar2-tiny")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = tiny_config(tmp_path / "tiny.json")
    src, data, model, root = (str(tmp_path / n) for n in ("cifar-10-batches-py", "data", "model", "root"))
    fake_cifar10(src)
    assert main(["setting", "data", "--config", config, "--source", src, "--data", data]) == 0
    assert main(["setting", "train", "--config", config, "--data", data, "--model", model]) == 0
    assert main(["setting", "build", "--config", config, "--data", data, "--model", model, "--root", root]) == 0
    lds = str(tmp_path / "lds")
    assert main(["lds-own", "prepare", "--config", config, "--root", root, "--out", lds,
                 "--validation", os.path.join(data, "validation")]) == 0
    yield {"config": config, "src": src, "data": data, "model": model, "root": root, "lds": lds}
    torch.set_num_threads(threads)


def test_the_cifar2_commands_on_a_tiny_stand_in(stand_in, tmp_path):
    config, src, data, model, root, lds = (stand_in[k] for k in ("config", "src", "data", "model", "root", "lds"))
    assert sorted(os.listdir(os.path.join(data, "train", "horse"))) == [f"{i:05d}.png" for i in range(6)]
    assert len(os.listdir(os.path.join(data, "validation", "automobile"))) == 2
    # horse images are CIFAR-10 label 7: the first written one is a label-7 image of the batches
    from PIL import Image

    first = np.asarray(Image.open(os.path.join(data, "train", "horse", "00000.png")))
    batches = [st._cifar_batch(os.path.join(src, f"data_batch_{i}")) for i in range(1, 6)]
    horses = np.concatenate([x[y == 7] for x, y in batches])
    assert any(np.array_equal(first, h) for h in horses)
    assert json.load(open(os.path.join(model, st.MODEL_MARKER)))["setting"]["name"] == "cifar2-tiny"

    jobs = json.load(open(os.path.join(lds, "jobs.json")))["jobs"]
    assert [j["id"] for j in jobs] == ["m000-s1", "m001-s1", "m002-s1"] and all(len(j["keep"]) == 6 for j in jobs)
    ckpts = str(tmp_path / "ckpts")
    for shard in ("0/2", "1/2"):  # two SLURM array tasks
        assert main(["setting", "retrain", "--config", config, "--data", data, "--jobs", os.path.join(lds, "jobs.json"),
                     "--checkpoints", ckpts, "--shard", shard]) == 0
    assert sorted(os.listdir(ckpts)) == ["m000-s1", "m001-s1", "m002-s1"]
    bad = json.load(open(os.path.join(lds, "jobs.json")))
    bad["jobs"][0]["keep"] = [0, 99]
    json.dump(bad, open(tmp_path / "bad.json", "w"))
    with pytest.raises(ValueError, match=r"bad.json: job 'm000-s1' must keep .* in 0\.\.11"):
        st.retrain(st.load_setting(config), data, str(tmp_path / "bad.json"), ckpts)
    # a retrain is the setting's recipe on the kept images with the job's seed
    from dataclasses import replace

    from dtrak_core.evaluation.lds_own import load_retrained
    from dtrak_core.evaluation.retrain import retrain
    from dtrak_core.model.unet import checkpoint_hash, load_checkpoint

    s = st.load_setting(config)
    base, _ = load_checkpoint(model)
    expected = retrain(st.training_images(s, data).images, jobs[1]["keep"], s.scheduler(),
                       replace(s.train_config, seed=1), unet_config=s.unet, show_bar=False)
    assert checkpoint_hash(load_retrained(os.path.join(ckpts, "m001-s1"), base)) == checkpoint_hash(expected)
    assert main(["lds-own", "ground-truth", "--root", root, "--out", lds, "--checkpoints", ckpts]) == 0
    from dtrak_core.evaluation.lds_run import collect

    col = collect(lds)
    assert col["F"]["validation"].shape == (3, 4) and col["F"]["generated"].shape == (3, 3)

    # the counterfactual's removals, retrained with the base recipe's own seed (as the paper retrains)
    cf = str(tmp_path / "cf")
    assert main(["counterfactual-own", "prepare", "--config", config, "--root", root, "--out", cf]) == 0
    removals = json.load(open(os.path.join(cf, "removals.json")))["jobs"]
    assert [j["id"] for j in removals] == ["d-trak-k3-seed1000", "random-k3-seed1000"]
    assert main(["setting", "retrain", "--config", config, "--data", data, "--jobs", os.path.join(cf, "removals.json"),
                 "--checkpoints", str(tmp_path / "cf-ckpts")]) == 0
    expected = retrain(st.training_images(s, data).images, removals[0]["keep"], s.scheduler(), s.train_config,
                       unet_config=s.unet, show_bar=False)
    assert checkpoint_hash(load_retrained(str(tmp_path / "cf-ckpts" / removals[0]["id"]), base)) == \
        checkpoint_hash(expected)


def test_a_cifar_batch_that_calls_anything_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing.*system"):
        st._cifar_batch(str(tmp_path / "data_batch_1"))


@pytest.mark.slow
def test_torchrun_retrains_and_ground_truth_equal_one_process(stand_in, tmp_path):
    """The cluster commands: `setting retrain` and `lds-own ground-truth` under torchrun (2 CPU
    processes, each rank its own jobs) give the single process's checkpoints and ground truth."""
    import subprocess
    import sys

    from dtrak_core.evaluation.lds_run import collect

    root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root_dir, "OMP_NUM_THREADS": "1"}
    jobs = os.path.join(stand_in["lds"], "jobs.json")
    out = {}
    for name, launcher in (("one", []), ("ranks", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])):
        lds = str(tmp_path / f"lds-{name}")
        shutil.copytree(stand_in["lds"], lds, ignore=shutil.ignore_patterns("jobs"))
        ckpts = str(tmp_path / f"ckpts-{name}")
        for command in (["setting", "retrain", "--config", stand_in["config"], "--data", stand_in["data"], "--jobs",
                         jobs, "--checkpoints", ckpts],
                        ["lds-own", "ground-truth", "--root", stand_in["root"], "--out", lds, "--checkpoints", ckpts]):
            res = subprocess.run([sys.executable, *(launcher or ["-m", "dtrak_core"]),
                                  *(["-m", "dtrak_core"] if launcher else []), *command],
                                 env=env, capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stdout + res.stderr
        if launcher:
            assert "shard 0/2" in res.stdout and "shard 1/2" in res.stdout
        out[name] = ckpts, collect(lds)
    for j in ("m000-s1", "m001-s1", "m002-s1"):
        a, b = (open(os.path.join(c, j, "diffusion_pytorch_model.safetensors"), "rb").read() for c, _ in out.values())
        assert a == b
    for s in ("validation", "generated"):
        assert np.array_equal(out["one"][1]["F"][s], out["ranks"][1]["F"][s])


def test_a_changed_evaluation_plan_keeps_the_base_model(stand_in, tmp_path):
    """The base model is made by the data, the UNet, the scheduler and the recipe: a setting whose
    stores, LDS or counterfactual plan changed reuses it; one whose recipe changed is refused."""
    raw = json.load(open(stand_in["config"]))
    raw["counterfactual"]["rankings"] = ["d-trak", "pixel-rbf", "random"]
    raw["lds"]["num_subsets"] = 4
    json.dump(raw, open(tmp_path / "plan.json", "w"))
    assert main(["setting", "train", "--config", str(tmp_path / "plan.json"), "--data", stand_in["data"],
                 "--model", stand_in["model"]]) == 0
    raw["train"]["steps"] = 3
    json.dump(raw, open(tmp_path / "recipe.json", "w"))
    with pytest.raises(ValueError, match="trained with another setting"):
        st.train_base(st.load_setting(str(tmp_path / "recipe.json")), stand_in["data"], stand_in["model"])


def test_build_baselines_replays_a_setting_trained_model(stand_in, tmp_path, monkeypatch):
    """TracInCP's checkpoints for a model trained from a setting: the run replayed with the setting's
    recipe and architecture reaches the model's own weights, and the attributor scores TracInCP
    with them; a folder whose training run is not known is refused with the reason."""
    from dtrak_core.attribution import methods
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.tracin import load_tracin

    work = tmp_path / "work"
    shutil.copytree(os.path.dirname(stand_in["root"]), work)
    root = str(work / "root")
    assert main(["build-baselines", "--root", root, "--threads", "1"]) == 0
    index = json.load(open(os.path.join(root, "tracin", "index.json")))
    assert [c["step"] for c in index["checkpoints"]] == [1, 2]  # a 2-step recipe: one checkpoint per step
    attributor = Attributor.load(root)
    final = load_tracin(root, attributor)[-1]
    assert final.train_features.shape == (12, 512)
    assert "tracin" not in methods.problems(attributor, root)
    scores = methods.scores(attributor, "tracin", attributor.train.images[:2], root=root)
    assert scores.shape == (2, 12) and np.isfinite(scores).all()

    # the LDS scores TracInCP and GAS with them
    lds = str(work / "lds")
    assert main(["setting", "retrain", "--config", stand_in["config"], "--data", stand_in["data"], "--jobs",
                 os.path.join(lds, "jobs.json"), "--checkpoints", str(work / "ckpts")]) == 0
    assert main(["lds-own", "ground-truth", "--root", root, "--out", lds, "--checkpoints", str(work / "ckpts")]) == 0
    assert main(["lds-own", "evaluate", "--root", root, "--out", lds, "--bootstrap", "10", "--no-journey"]) == 0
    table = json.load(open(os.path.join(lds, "tables.json")))["methods"]
    for name in ("tracin", "gas"):
        assert -100 <= table[name]["validation"]["lds"] <= 100, table[name]

    shutil.rmtree(os.path.join(root, "tracin"))
    monkeypatch.setattr(st, "MODEL_MARKER", "no-such-description.json")  # a model not trained from a setting
    with pytest.raises(ValueError, match="its training run cannot be replayed"):
        st.build_baselines(root, show_bar=False)
