"""The kernel baselines' hyperparameters: chosen from the evidence rows, recorded in the folder
(sealed), read back by the scorers; and the evidence rows published into the benchmark tables."""
import json
import os

import numpy as np
import pytest
import torch

from dtrak_core.attribution import baselines, methods
from dtrak_core.evaluation import tables_report, tuning
from dtrak_core.folder import ModelFolder


def rows():
    return [
        {"method": "pixel-rbf", "validation/signed": 70.0, "generated/signed": 50.0,
         "validation/signed best": {"gamma": 4.0, "relative": 0.5}, "generated/signed best": {"gamma": 1.0, "relative": 2.0}},
        {"method": "pixel-trak", "generated/signed": 20.0, "generated/signed best": {"gamma": 1.0, "relative": 0.2}},
        {"method": "square", "validation/signed": 58.0, "validation/signed best": {"lambda": 0.05}},  # not a kernel
        {"method": "pixel-nn", "validation/signed": 19.0},  # no hyperparameters
    ]


def test_kernel_entries_take_the_validation_choice_and_an_absolute_lambda():
    train = torch.full((5, 1, 2, 2), 0.5)  # ||x||^2 = 1 for every image
    entries = tuning.kernel_entries(rows(), {"pixel": train}, subsets=8)
    assert set(entries) == {"pixel-rbf", "pixel-trak"}
    rbf = entries["pixel-rbf"]
    assert rbf["gamma"] == 4.0 and rbf["lambda"] == pytest.approx(0.5)  # an RBF kernel's diagonal is 1
    assert rbf["chosen_on"] == "validation LDS of the signed scores, 8 subsets" and rbf["validation_lds"] == 70.0
    trak = entries["pixel-trak"]  # no validation set: the generated samples' choice, said so
    assert trak["chosen_on"].startswith("generated") and trak["lambda"] == pytest.approx(0.2 * 1.0)
    assert [m.name for m in tuning.kernel_baselines("pixel")] == ["pixel-trak", "pixel-rbf", "pixel-arccos"]
    assert "latent-rbf" in [m.name for m in tuning.kernel_baselines("text2image")]


def test_recorded_entries_are_sealed_and_used_by_the_scorer(tmp_path):
    root = str(tmp_path / "folder")
    ModelFolder.edit(root, tuned_lambda={"square-K10-sparse-jl-k64-s42": {"lambda": 0.1}})
    entries = tuning.kernel_entries(rows(), {"pixel": torch.ones(3, 1, 2, 2)}, subsets=8)
    tuning.record_kernel_params(root, entries)
    folder = ModelFolder.load(root)
    assert set(folder.tuned_lambda) == {"square-K10-sparse-jl-k64-s42", "pixel-rbf", "pixel-trak"}  # merged, kept
    assert folder.settings_hash and "tuned_lambda/pixel-rbf" in folder.settings_hash  # sealed

    class Holder:
        tuned_params = dict(folder.tuned_lambda)
    assert baselines.hyperparameters(methods.get("pixel-rbf"), Holder()) == {"lambda": 0.5, "gamma": 4.0}
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    manifest["tuned_lambda"]["pixel-rbf"]["gamma"] = 0.25  # an edit by hand is refused, naming the entry
    json.dump(manifest, open(os.path.join(root, "manifest.json"), "w"))
    with pytest.raises(ValueError, match="pixel-rbf"):
        ModelFolder.load(root)


def test_evidence_rows_are_published_into_the_tables(tmp_path):
    dest = str(tmp_path)
    assert tables_report.publish_evidence(dest, rows(), ["validation"], "a command") is False  # no tables yet
    tables = {"subsets_done": 8, "subsets_planned": 8, "train_seeds": [0], "num_bootstrap": 10,
              "test_sets": {"validation": 3, "generated": 3}}
    from dtrak_core import checksums
    from dtrak_core.files import atomic_write_json

    atomic_write_json(os.path.join(dest, tables_report.TABLES), checksums.seal(tables))
    checksums.record(dest, [tables_report.TABLES])  # as an older publish_evidence did: sealed and in the sidecar
    evidence = [{"method": "pixel-rbf", "label": "Pixel RBF kernel", "group": "model-free", "cost": "", "seconds": 1.0,
                 **{f"validation/{t}": 60.0 + i for i, t in enumerate(("signed", "sharpened", "rank", "top-1%"))},
                 **{f"validation/{t} pm": 0.5 for t in ("signed", "sharpened", "rank", "top-1%")}}]
    assert tables_report.publish_evidence(dest, evidence, ["validation"], "python x.py --write")
    t = tables_report.load_tables(os.path.join(dest, tables_report.TABLES), required=True)  # re-sealed, verified
    assert t[tables_report.EVIDENCE]["rows"] == evidence
    assert checksums.read_sidecar(dest) == {}  # one mechanism per file: sealed, so out of the sidecar
    text = open(os.path.join(dest, tables_report.REPORT)).read()
    assert "Beside the strong model-free baselines" in text and "python x.py --write" in text
    assert "Pixel RBF kernel" in text and np.isclose(float(text.split("| Pixel RBF kernel | ")[1][:4]), 60.0)
