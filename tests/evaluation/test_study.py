"""The study's reports: its own Markdown, and its rows in the committed tables' Markdown."""
from dtrak_core.evaluation.study import format_report
from dtrak_core.evaluation.tables_report import BEYOND
from dtrak_core.evaluation.tables_report import format_report as tables_report


def _cell(v, g):
    def one(x):
        return {"honest": {"lds": x, "pm": 0.5, "lambdas": [0.1, 0.2]}, "paper": {"lds": x + 0.1, "lambda": 0.1}}
    return {"validation": one(v), "generated": one(g)}


def test_study_report_has_each_table_and_cost():
    cells = {"square/k2048": {**_cell(58.2, 34.0), "spearman_vs_exact": {"validation": 0.835, "generated": 0.865},
                              "cost": {"kernel_seconds": 6.9, "score_seconds": 5.9, "train_feature_mb": 12}},
             "square/exact": {**_cell(62.7, 38.3), "spearman_vs_exact": None,
                              "cost": {"kernel_seconds": 39.7, "score_seconds": 18.9, "train_feature_mb": 914}},
             "das/avg-K100-full/exact": {**_cell(67.9, 46.7), "cost": {"score_seconds": 3.0}},
             "ekfac/loss-x-loss": {**_cell(57.6, 41.4), "relative_damping": {"validation": [1e-3, 1e-3], "generated": [2e-3, 1e-3]},
                                   "cost": {"fit_seconds": 357, "score_seconds": 400}}}
    text = format_report({"cells": cells, "subsets": 64, "test_sets": {"validation": 297, "generated": 256},
                          "missing": ["python -m dtrak_core study gradients --output-fn avg"]})
    lines = text.splitlines()
    k2048 = next(i for i, l in enumerate(lines) if l.startswith("| square | k2048 |"))
    assert lines[k2048 + 1].startswith("| square | exact |")  # exact after every k
    assert "58.2 ± 0.5 (58.3)" in lines[k2048] and "0.835 / 0.865" in lines[k2048]
    assert any(l.startswith("| das | avg-K100-full exact | 67.9 ± 0.5 (68.0)") for l in lines)
    assert any(l.startswith("| loss-x-loss | 57.6") and "0.001/0.001; 0.002/0.001" in l for l in lines)
    assert "Missing inputs" in text


def test_tables_report_shows_the_rows_beyond_the_paper():
    t = {"subsets_done": 64, "subsets_planned": 64, "test_sets": {"validation": 297, "generated": 256},
         "train_seeds": [1, 2], "num_bootstrap": 1000,
         BEYOND: {"rows": [{"label": "DAS, exact", **_cell(67.9, 46.7), "feature_seconds": 135.0,
                            "scoring_seconds": 90.4}]}}
    text = tables_report(t)
    assert "## Beyond the paper" in text
    assert "| DAS, exact | 67.9 ± 0.5 (68.0) | 46.7 ± 0.5 (46.8) | 135 | 90 |" in text
    assert "Beyond the paper" not in tables_report({k: v for k, v in t.items() if k != BEYOND})
