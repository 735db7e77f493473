"""The example of docs/OWN_MODEL_LDS.md, examples/own_model_lds.py, at its --tiny size: a shapes dataset
(not digits), a UNet trained by a plain loop, `build`, `lds-own prepare`, the retrains, `lds-own
ground-truth`, `evaluate` and `tune-lambda`, `attribute --json`, end to end; its outputs are there and sane."""
import importlib.util
import json
import math
import os

import torch

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "own_model_lds.py")


def _example():
    spec = importlib.util.spec_from_file_location("own_model_lds", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_own_model_example_runs_end_to_end(tmp_path, capsys):
    example = _example()
    threads = torch.get_num_threads()
    try:
        out = example.main(["--out", str(tmp_path), "--tiny"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out

    # the dataset: PNGs in one sub-folder per class, not digits
    data = tmp_path / "data"
    assert sorted(os.listdir(data)) == sorted(example.CLASSES)
    assert sum(len(os.listdir(data / c)) for c in example.CLASSES) == example.TINY["images"]
    # the model the plain loop saved, and the model folder's manifest naming the dataset
    assert (tmp_path / "pipeline" / "unet" / "config.json").is_file()
    assert (tmp_path / "pipeline" / "scheduler" / "scheduler_config.json").is_file()
    manifest = json.load(open(tmp_path / "attr" / "manifest.json"))
    assert os.path.samefile(manifest["dataset"]["folder"], data)
    # one retrained checkpoint per job, each measured
    jobs = json.load(open(tmp_path / "lds" / "jobs.json"))["jobs"]
    assert len(jobs) == example.TINY["subsets"] * len(example.TINY["seeds"])
    assert sorted(os.listdir(tmp_path / "lds" / "jobs")) == sorted(f"{j['id']}.npz" for j in jobs)

    # the LDS table: D-TRAK and TRAK rows with finite numbers, printed and written
    tables = out["tables"]
    assert tables["subsets_done"] == example.TINY["subsets"]
    for row in ("d-trak/K2", "trak/K2"):
        cell = tables["methods"][row]["generated"]
        for kind in ("honest", "paper"):
            assert math.isfinite(cell[kind]["lds"]) and -100 <= cell[kind]["lds"] <= 100
    assert "| d-trak |" in printed and "| trak |" in printed
    assert (tmp_path / "lds" / "tables.md").is_file()

    # the lambda measured on the run is the one the answers use; attribute --json names the training images by class and file
    assert out["attribute"]["lambda_source"].startswith("recorded in manifest.json")
    rows = out["attribute"]["proponents"]
    assert len(rows) == 5
    for row in rows:
        assert row["class"] in example.CLASSES and row["path"].startswith(row["class"] + "/")
        assert (data / row["path"]).is_file()
    assert f"{rows[0]['class']:<9} {rows[0]['path']}" in printed
