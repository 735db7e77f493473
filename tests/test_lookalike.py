"""The similarity flag: how much of a method's top-k the strongest model-free baseline shares."""
import json

import numpy as np
import pytest

from dtrak_core import app_support as sup
from dtrak_core import checksums


def test_similarity_flag_counts_the_shared_top_k_and_reads_it():
    base = np.arange(20, dtype=float)  # top 4: 19, 18, 17, 16
    same = base.copy()
    other = -base
    half = base.copy()
    half[[19, 18]] = -100
    half[[0, 1]] = 100
    assert "**4 of 4**" in sup.similarity_flag("square", same, "pixel-rbf", base, 4) and "little beyond" in \
        sup.similarity_flag("square", same, "pixel-rbf", base, 4)
    assert "**0 of 4**" in sup.similarity_flag("square", other, "pixel-rbf", base, 4)
    assert "not the query's pixel look-alikes" in sup.similarity_flag("square", other, "pixel-rbf", base, 4)
    assert "**2 of 4**" in sup.similarity_flag("avg", half, "pixel-rbf", base, 4)
    assert "itself" in sup.similarity_flag("pixel-rbf", base, "pixel-rbf", base, 4)


def test_the_baseline_and_the_measured_lds_come_from_the_folders_evidence(tmp_path):
    assert sup.read_evidence(str(tmp_path)) is None
    assert sup.lookalike_baseline(None) == sup.LOOKALIKE_FALLBACK
    (tmp_path / "benchmarks").mkdir()
    rows = [{"method": "pixel-arccos", "group": "model-free", "validation/signed": 70.0},
            {"method": "pixel-nn", "group": "model-free", "validation/signed": 20.0},
            {"method": "square", "group": "model", "validation/signed": 80.0}]
    path = str(tmp_path / "benchmarks" / "evidence.json")
    checksums.write_sealed_json(path, {"rows": rows})  # as experiments/strong_baselines.py writes it
    evidence = sup.read_evidence(str(tmp_path))
    assert sup.lookalike_baseline(evidence) == "pixel-arccos"  # the best model-free row, not the best row
    text = sup.similarity_flag("d-trak", np.arange(5.0), "pixel-arccos", np.arange(5.0), 2, evidence)
    assert "validation LDS" in text and "80.0" in text and "70.0" in text
    # an edited number is not used: the flag says less, and the page's banner names the file
    edited = json.load(open(path))
    edited["rows"][0]["validation/signed"] = 95.0
    json.dump(edited, open(path, "w"))
    assert sup.read_evidence(str(tmp_path)) is None
    from dtrak_core.ui.banner import results_damage

    damaged = results_damage(str(tmp_path))
    assert path in damaged["Benchmarks: evidence against the model-free baselines, the similarity flag's LDS line "
                           "and About's numbers"]
    (tmp_path / "benchmarks" / "evidence.json").write_text(json.dumps({"rows": rows}))  # no checksum at all
    assert sup.read_evidence(str(tmp_path)) is None
    (tmp_path / "benchmarks" / "evidence.json").write_text("{not json")
    assert sup.read_evidence(str(tmp_path)) is None


def test_the_benchmarks_headline_reads_the_evidence_both_ways():
    def row(method, group, v, t):
        return {"method": method, "group": group, "validation/signed": v, "validation/signed pm": 0.5,
                "validation/top-1%": t, "validation/top-1% pm": 0.5}

    close = {"rows": [row("square", "model", 78.0, 64.0), row("pixel-rbf", "model-free", 77.0, 65.0)]}
    text = sup.evidence_headline(close)
    assert "D-TRAK 78.0 against Pixel RBF kernel 77.0 (+1.0)" in text and "look like the query" in text
    ahead = {"rows": [row("square", "model", 80.0, 70.0), row("pixel-rbf", "model-free", 40.0, 50.0)]}
    text = sup.evidence_headline(ahead)
    assert "better than any look-alike baseline" in text and "(+40.0)" in text and "standard error" not in text
    # each test set's best of each group, whichever method it is; a lead inside the noise is said so
    split = {"rows": [{**row("square", "model", 50.0, 40.0), "generated/signed": 20.0, "generated/signed pm": 2.0,
                       "generated/top-1%": 16.0, "generated/top-1% pm": 2.0},
                      {**row("avg", "model", 45.0, 38.0), "generated/signed": 22.0, "generated/signed pm": 2.0,
                       "generated/top-1%": 25.0, "generated/top-1% pm": 2.0},
                      {**row("pixel-rbf", "model-free", 40.0, 37.0), "generated/signed": 21.0,
                       "generated/signed pm": 1.8, "generated/top-1%": 23.0, "generated/top-1% pm": 1.8}]}
    text = sup.evidence_headline(split)
    assert "generated: D-TRAK (Avg) 22.0 against Pixel RBF kernel 21.0 (+1.0)" in text
    assert "validation: D-TRAK 40.0 against Pixel RBF kernel 37.0 (+3.0)" in text
    assert "within one standard error on LDS generated, top-1% LDS generated." in text
    rows = sup.evidence_rows(close, "top-1%")
    assert [(r["method"], r[sup.HONEST]) for r in rows] == [("D-TRAK", 64.0), ("Pixel RBF kernel (no model)", 65.0)]
    assert sup.evidence_headline({}) == "" and sup.evidence_rows({}) == []


def test_the_page_opens_on_the_folder_that_shows_attribution_best(tmp_path):
    """The rule fixed in advance: the largest positive lead of a method that uses the model over the
    strongest model-free baseline (signed LDS, the smaller lead of the test sets); else the order given."""
    from dtrak_core import checksums
    from dtrak_core.files import atomic_write_json
    from dtrak_core.ui.state import opening_first

    def folder(name, model, free):
        root = tmp_path / name
        (root / "benchmarks").mkdir(parents=True)
        rows = [{"method": "square", "group": "model", "validation/signed": model[0], "generated/signed": model[1]},
                {"method": "pixel-rbf", "group": "model-free", "validation/signed": free[0], "generated/signed": free[1]}]
        atomic_write_json(str(root / "benchmarks" / "evidence.json"), checksums.seal({"rows": rows}))
        return str(root)

    digits = folder("digits", (78.6, 58.8), (77.2, 59.8))  # behind on the generated samples: lead -1.0
    fashion = folder("fashion", (40.0, 30.0), (30.0, 28.0))  # lead 2.0 (the smaller of 10 and 2)
    wide = folder("wide", (50.0, 50.0), (20.0, 49.0))  # lead 1.0
    unmeasured = str(tmp_path / "none")
    assert sup.attribution_lead(sup.read_evidence(digits)) == pytest.approx(-1.0)
    assert sup.attribution_lead(sup.read_evidence(fashion)) == pytest.approx(2.0)
    assert sup.attribution_lead(None) is None and sup.attribution_lead({"rows": [{"group": "model"}]}) is None
    assert opening_first([digits, unmeasured, wide, fashion]) == [fashion, digits, unmeasured, wide]
    assert opening_first([digits, unmeasured]) == [digits, unmeasured]  # no positive lead: as given


def test_the_counterfactual_table_has_the_look_alike_baselines_row(tmp_path):
    """The digits' counterfactual (D-TRAK, TRAK, random) shown with the strongest model-free
    baseline's removals on the same targets, paired per target; an edited look-alike summary is
    named and left out, never shown."""
    import os
    import shutil

    from dtrak_core import viz
    from dtrak_core.checksums import read_sealed_json
    from dtrak_core.ui.benchmarks import LOOKALIKE_SUMMARY, with_lookalike

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench = os.path.join(root, "assets", "benchmarks")
    base = read_sealed_json(os.path.join(root, "assets", "counterfactual", "summary.json"), "summary", "")
    shown, error = with_lookalike(bench, base)
    assert error is None and {c["ranking"] for c in shown["cells"]} == {c["ranking"] for c in base["cells"]} | {"pixel-rbf"}
    pair = next(p for p in shown["paired"] if p["a"] == "D-TRAK" and p["b"] == sup.method_label("pixel-rbf"))
    dtrak = {t["seed"]: t["l2"] for c in base["cells"] if c["ranking"] == "square" and c["k"] == 300 for t in c["per_target"]}
    rbf = {t["seed"]: t["l2"] for c in shown["cells"] if c["ranking"] == "pixel-rbf" for t in c["per_target"]}
    assert pair["n"] == len(set(dtrak) & set(rbf)) == 60
    assert pair["share_a_moves_more"] == pytest.approx(np.mean([dtrak[s] > rbf[s] for s in rbf]))
    assert sup.method_label("pixel-rbf") in viz.counterfactual_summary(shown, 1500)
    copy = tmp_path / "benchmarks"
    os.makedirs(copy / os.path.dirname(LOOKALIKE_SUMMARY))
    text = open(os.path.join(bench, LOOKALIKE_SUMMARY)).read()
    (copy / LOOKALIKE_SUMMARY).write_text(text.replace('"median": ', '"median": 1', 1))  # one number edited
    kept, error = with_lookalike(str(copy), base)
    assert kept == base and "summary.json" in error
    shutil.rmtree(copy)
    assert with_lookalike(str(copy), base) == (base, None)  # none measured: the harness's table as it is
