"""Small non-UI helpers behind the Gradio app (`app.py`): seed parsing, the display name of each
method, summaries of a score vector (per-class mass, top-k thresholds), comparisons of two methods
(overlap, rank correlation), a training image's rank under every method, the split of a TRAK-family
score by noise level, upload polarity checks, the counterfactual examples and the retrain-time
estimate, and validation of request parameters. No gradio here.
"""
from __future__ import annotations

import numbers
import os
import re
import time
from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import spearmanr

from dtrak_core.attribution import methods as registry
from dtrak_core.attribution.output_functions import canonical_name

MAX_SAMPLES = 64  # images one "generate" request may ask for (CPU-only hosting)
MAX_SEED = 2**31 - 1


def method_label(name) -> str:
    """The one display name of a method, whatever spelling it arrives in: 'square', 'd-trak' and
    'D-TRAK' all read 'D-TRAK'; 'trak' and 'loss' read 'TRAK'; a benchmark variant 'd-trak/K100'
    reads 'D-TRAK, K=100' and an ensemble 'trak/S4' 'TRAK, 4 models'. Other names read as the method
    registry labels them ('random' reads 'Random', 'renorm-ip' 'Renormalised IP'); text that names no
    method stays as it is."""
    if not isinstance(name, str):
        return str(name)
    base, _, variant = name.partition("/")
    if variant and re.fullmatch(r"[KS]\d+", variant):
        extra = f"K={variant[1:]}" if variant[0] == "K" else f"{variant[1:]} models"
        return f"{method_label(base)}, {extra}"
    return registry.label(name)


def method_description(name: str) -> str:
    """What a method scores by, in one line."""
    return registry.description(name)


def no_opponents(name) -> str:
    """Why a method whose scores carry no sign (`methods.is_signed`) lists no opponents."""
    return (f"{method_label(name)} lists no opponents: its scores carry no sign (a similarity or a magnitude), so "
            "its lowest scores mark the training images least like the query, not ones that made it less likely.")


def short_reason(text: str) -> str:
    """The first sentence of an 'unavailable' reason, without the exception names and file lookups
    in parentheses (the full text stays available for the curious)."""
    first = re.split(r"(?<=[.;])\s", str(text).strip(), maxsplit=1)[0]
    first = re.sub(r"\s*\((?:[^()]|\([^()]*\))*\)", "", first).rstrip(" .;:")
    return first + "."


def method_choices(methods) -> list[tuple[str, str]]:
    """(label, name) pairs of a method menu (`methods.choices`): the registry's default first, then
    D-TRAK and TRAK, then the rest in the given order."""
    return [(method_label(m), m) for m in registry.choices(methods)]


def ranking_choices(methods) -> list[tuple[str, str]]:
    """(label, name) pairs of the counterfactual's menu over the methods a folder can run
    (`methods.counterfactual_rankings`): exactly the rankings "Remove and retrain" accepts."""
    return [(method_label(m), m) for m in registry.counterfactual_rankings(methods)]


def parse_seeds(mode: str, seed=None, start=None, end=None, count=None, rng_seed=None) -> list[int]:
    """Seeds for one generate request: 'single' (seed), 'range' (start..end inclusive) or
    'random' (count seeds drawn from `rng_seed`, fresh entropy when None)."""
    def as_int(value, name):
        return parse_int(value, name, 0, MAX_SEED)

    if not isinstance(mode, str):
        raise ValueError(f"unknown seed mode {_shown(mode)}; choose single, range or random")
    if mode == "single":
        return [as_int(seed, "seed")]
    if mode == "range":
        a, b = as_int(start, "first seed"), as_int(end, "last seed")
        if b < a:
            raise ValueError(f"the last seed ({b}) is smaller than the first ({a})")
        if b - a + 1 > MAX_SAMPLES:
            raise ValueError(f"at most {MAX_SAMPLES} samples per request; {a}..{b} is {b - a + 1}")
        return list(range(a, b + 1))
    if mode == "random":
        n = parse_int(count, "number of samples", 1, MAX_SAMPLES)
        draw = None if rng_seed is None else parse_int(rng_seed, "seed of the draw", 0, 2**63 - 1)
        rng = np.random.default_rng(draw)
        return sorted(int(s) for s in rng.choice(100_000, size=n, replace=False))
    raise ValueError(f"unknown seed mode {_shown(mode)}; choose single, range or random")


def class_mass(scores: np.ndarray, labels: np.ndarray, n_classes: int | None = None) -> dict:
    """How the attribution mass splits across classes.

    'positive': share of the total positive score (proponent mass) carried by each class;
    'negative': share of the total |negative score| (opponent mass); each sums to 1 (or is all 0
    when there is no mass of that sign). 'count': training images per class.
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D of equal length, got {scores.shape} and {labels.shape}")
    if (labels < 0).any():
        raise ValueError("class mass needs a label for every training image")
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    pos = np.bincount(labels, weights=np.clip(scores, 0, None), minlength=n_classes)
    neg = np.bincount(labels, weights=np.clip(-scores, 0, None), minlength=n_classes)
    return {"positive": pos / pos.sum() if pos.sum() > 0 else pos,
            "negative": neg / neg.sum() if neg.sum() > 0 else neg,
            "count": np.bincount(labels, minlength=n_classes)}


def top_k_thresholds(scores: np.ndarray, k: int) -> tuple[float, float]:
    """(score of the k-th opponent, score of the k-th proponent): the top-k lie outside this interval."""
    scores = np.sort(np.asarray(scores))
    k = int(np.clip(k, 1, len(scores)))
    return float(scores[k - 1]), float(scores[-k])


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> int:
    """Number of training images among the top-k proponents of both score vectors."""
    k = int(np.clip(k, 1, len(a)))
    return len(set(np.argsort(-np.asarray(a), kind="stable")[:k]) & set(np.argsort(-np.asarray(b), kind="stable")[:k]))


# -- look-alikes ------------------------------------------------------------------------------------
EVIDENCE = os.path.join("benchmarks", "evidence.json")  # a folder's evidence table (experiments/strong_baselines.py)
LOOKALIKE_FALLBACK = "pixel-rbf"  # the strongest model-free baseline on the digits, when a folder has measured none


def read_evidence(root: str) -> dict | None:
    """<root>/benchmarks/evidence.json, verified against the checksum its writer recorded
    (`read_benchmark`); None when absent, unreadable, edited or unrecorded (the flag then says less,
    and the page's banner names the file: `ui.benchmarks.verified_results`)."""
    path = os.path.join(root, EVIDENCE)
    if not os.path.isfile(path):
        return None
    data = read_benchmark(path).get("data")
    return data if isinstance(data, dict) and isinstance(data.get("rows"), list) else None


def lookalike_baseline(evidence: dict | None) -> str:
    """The model-free baseline with the highest signed validation LDS (generated when there is no
    validation set) in a folder's evidence, else `LOOKALIKE_FALLBACK`."""
    rows = [r for r in (evidence or {}).get("rows", []) if isinstance(r, dict) and r.get("group") == "model-free"]
    key = "validation/signed" if any("validation/signed" in r for r in rows) else "generated/signed"
    rows = [r for r in rows if isinstance(r.get(key), (int, float)) and registry.find(r.get("method")) is not None]
    return max(rows, key=lambda r: r[key])["method"] if rows else LOOKALIKE_FALLBACK


def similarity_flag(method: str, scores: np.ndarray, baseline: str, baseline_scores: np.ndarray, k: int,
                    evidence: dict | None = None) -> str:
    """One line: how many of the method's top-k proponents are also the look-alike baseline's top-k,
    what that means, and, where the folder measured both, their LDS side by side."""
    if registry.find(method) is not None and registry.get(method).name == registry.get(baseline).name:
        return f"This is the model-free look-alike baseline itself ({method_label(baseline)})."
    shared = top_k_overlap(scores, baseline_scores, k)
    if shared >= 0.75 * k:
        verdict = "here the attribution says little beyond pixel similarity"
    elif shared <= 0.25 * k:
        verdict = "most proponents are not the query's pixel look-alikes"
    else:
        verdict = "partly pixel look-alikes"
    text = (f"Look-alike check: **{shared} of {k}** top proponents are also in the top {k} of "
            f"{method_label(baseline)}, a model-free pixel baseline: {verdict}.")
    rows = {r.get("method"): r for r in (evidence or {}).get("rows", []) if isinstance(r, dict)}
    mine, base = rows.get(registry.find(method).name if registry.find(method) else method), rows.get(baseline)
    for test_set in ("validation", "generated"):
        key = f"{test_set}/signed"
        if mine and base and isinstance(mine.get(key), (int, float)) and isinstance(base.get(key), (int, float)):
            text += (f" Measured on this model ({test_set} LDS): {method_label(method)} {mine[key]:.1f}, "
                     f"{method_label(baseline)} {base[key]:.1f}.")
            break
    return text


def evidence_rows(evidence: dict, transform: str = "signed") -> list[dict]:
    """`table_rows`-shaped rows (method, test set, LDS, +-) of a folder's evidence for one transform
    ("signed", "sharpened", "rank", "top-1%"), the model-free methods marked in their label."""
    rows = []
    for r in (evidence or {}).get("rows", []):
        if not isinstance(r, dict):
            continue
        label = method_label(r.get("method", "?")) + (" (no model)" if r.get("group") == "model-free" else "")
        for test_set in ("validation", "generated"):
            value, pm = r.get(f"{test_set}/{transform}"), r.get(f"{test_set}/{transform} pm")
            if isinstance(value, (int, float)) and isinstance(pm, (int, float)):
                rows.append({"method": label, "test set": test_set, HONEST: round(float(value), 1),
                             PM: round(float(pm), 1)})
    return rows


def attribution_lead(evidence: dict | None) -> float | None:
    """How far the best method that uses the model leads the strongest model-free baseline in a
    folder's evidence: the smaller of its signed-LDS leads (LDS x 100 points) over the test sets
    measured; negative when a look-alike baseline does as well; None when nothing was measured."""
    rows = [r for r in (evidence or {}).get("rows", []) if isinstance(r, dict)]
    leads = []
    for test in ("validation", "generated"):
        key = f"{test}/signed"
        best = {g: max((r[key] for r in rows if r.get("group") == g and isinstance(r.get(key), (int, float))),
                       default=None) for g in ("model", "model-free")}
        if None not in best.values():
            leads.append(best["model"] - best["model-free"])
    return min(leads) if leads else None


def evidence_headline(evidence: dict) -> str:
    """Three lines: per test set, the best method that uses the model against the strongest
    model-free one, with the lead in points, on the signed LDS and on the top-1% LDS (which no
    monotone transform of the scores changes); then the verdict, saying which leads are within one
    standard error (the larger of the two rows' bootstrap +-)."""
    rows = [r for r in (evidence or {}).get("rows", []) if isinstance(r, dict)]
    sets = [t for t in ("validation", "generated") if any(f"{t}/signed" in r for r in rows)]
    if not rows or not sets:
        return ""

    def best(group, key):
        members = [r for r in rows if r.get("group") == group and isinstance(r.get(key), (int, float))]
        return max(members, key=lambda r: r[key]) if members else None

    lines, leads, close = [], [], []
    for transform, what in (("signed", "LDS"), ("top-1%", "top-1% LDS (the head of each ranking; no monotone "
                                                          "transform of the scores changes it)")):
        parts = []
        for t in sets:
            key = f"{t}/{transform}"
            model, free = best("model", key), best("model-free", key)
            if model is None or free is None:
                continue
            lead = model[key] - free[key]
            leads.append(lead)
            if abs(lead) <= max(model.get(f"{key} pm") or 0.0, free.get(f"{key} pm") or 0.0):
                close.append(f"{what.split(' (')[0]} {t}")
            parts.append(f"{t}: {method_label(model['method'])} {model[key]:.1f} against "
                         f"{method_label(free['method'])} {free[key]:.1f} ({lead:+.1f})")
        if parts:
            lines.append(f"- **{what}**, the best method that uses the model against the strongest model-free "
                         f"baseline: " + "; ".join(parts) + ".")
    if leads and len(leads) == 2 * len(sets):
        if all(lead > 0 for lead in leads):
            lines.append("- A method that uses the model predicts the retrained models better than any look-alike "
                         "baseline here, on both measures and every test set"
                         + (f", though within one standard error on {', '.join(close)}." if close else "."))
        else:
            lines.append("- Here a kernel on raw inputs predicts the retrained models as well as any gradient "
                         "method: the attributions mostly say which training images look like the query.")
    return "\n".join(lines)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors over the training set."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two 1-D score vectors of equal length >= 2, got {a.shape} and {b.shape}")
    return float(spearmanr(a, b).statistic)


BENCHMARK_WHAT = {"tables.json": "benchmark tables", "evidence.json": "evidence against the model-free baselines",
                  "lds_results.json": "LDS results", "sharpening.json": "LDS of sharpened scores",
                  "study.json": "study results"}


def benchmark_remedy(path: str) -> str:
    """How to fix the benchmark result `path`: the command that writes it, on its folder."""
    if os.path.basename(path) == "tables.json":
        from dtrak_core.evaluation.tables_report import tables_remedy

        return tables_remedy(path)
    from dtrak_core.remedies import result_remedy

    return result_remedy(path)


def read_benchmark(path: str) -> dict:
    """{'name', 'path', and 'data' or 'error'}: the JSON result `path` verified against the checksum
    its writer recorded (its own, else its folder's checksums.json: `checksums.read_sealed_json`);
    'error' (unreadable, edited, unrecorded) names the file and the fix, and no data comes with it."""
    from dtrak_core import checksums
    from dtrak_core.errors import IntegrityError

    name = os.path.basename(path)
    item = {"name": name[:-5], "path": path}
    try:
        item["data"] = checksums.read_sealed_json(path, BENCHMARK_WHAT.get(name, "benchmark result"),
                                                  benchmark_remedy(path))
    except IntegrityError as e:
        item["error"] = str(e)
    return item


def recorded_names(folder: str) -> set[str]:
    """The files folder/checksums.json lists (none when it is absent or damaged: each file it would
    have verified then names it)."""
    from dtrak_core import checksums
    from dtrak_core.errors import IntegrityError

    try:
        return set(checksums.read_sidecar(folder) or {})
    except IntegrityError:
        return set()


def read_benchmarks(folder: str) -> list[dict]:
    """Every JSON result under `folder` (not its checksums.json), each verified (`read_benchmark`):
    [{'name', 'path', 'data' or 'error'}]; one its checksums.json lists but that is gone is an error
    too. [] when the folder is absent. The reports are drawn from the verified data, never read
    from the .md files beside them."""
    from dtrak_core.checksums import SIDECAR

    if not os.path.isdir(folder):
        return []
    names = {n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))}
    names = {n for n in names | recorded_names(folder) if n.endswith(".json") and n != SIDECAR}
    return [read_benchmark(os.path.join(folder, n)) for n in sorted(names)]


def _flatten(row: dict) -> dict:
    """Scalars of a dict, with one level of nested dicts as 'outer.inner' columns."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items() if not isinstance(v2, (dict, list))})
        elif not isinstance(v, list):
            out[k] = v
    return out


def records(data) -> list[tuple[str, list[dict]]]:
    """Tables inside a benchmark JSON: every list of flat dicts found (with its key path)."""
    found = []

    def walk(node, path):
        if isinstance(node, list) and node and all(isinstance(r, dict) for r in node):
            flat = [_flatten(r) for r in node]
            if any(flat):
                found.append((path or "results", flat))
                return
        if isinstance(node, dict):
            scalars = {k: v for k, v in node.items() if not isinstance(v, (dict, list))}
            values = [v for v in node.values() if isinstance(v, dict)]
            # a dict of dicts of scalars (e.g. {method: {lds: .., se: ..}}) is one table
            if values and len(values) == len(node) and all(not any(isinstance(x, (dict, list)) for x in v.values())
                                                           for v in values):
                found.append((path or "results", [{"name": k, **v} for k, v in node.items()]))
                return
            for k, v in node.items():
                if isinstance(v, (dict, list)):
                    walk(v, f"{path}.{k}" if path else str(k))
            if scalars and not path:
                found.insert(0, ("summary", [scalars]))

    walk(data, "")
    return found


def counterfactual_gallery(root: str) -> tuple[list[tuple[str, list[dict]]], dict[str, str]]:
    """The precomputed counterfactual galleries under `root` (every gallery.json, written by
    `counterfactual_report.write_gallery`), each verified against the checksums its writer recorded
    (`counterfactual_report.read_gallery`): ([(gallery.json, its entries with absolute image
    paths)], {gallery.json: why it cannot be used}). A damaged, edited or unrecorded gallery is
    reported, never shown and never silently dropped; the others are unaffected."""
    import glob

    from dtrak_core.errors import IntegrityError
    from dtrak_core.evaluation.counterfactual_report import read_gallery

    found, damaged = [], {}
    for index_path in sorted(glob.glob(os.path.join(root, "**", "gallery.json"), recursive=True)):
        try:
            found.append((index_path, read_gallery(os.path.dirname(index_path))))
        except IntegrityError as e:
            damaged[index_path] = str(e)
    return found, damaged


HONEST, PM, PAPER, DEFAULT = "LDS (honest λ)", "±", "LDS (paper λ)", "LDS (default λ)"


def lds_rows(results: dict) -> list[dict]:
    """One row per (method, test set) of `lds.py`'s lds_results.json: LDS x 100 with its +- for the
    honest (cross-fitted) lambda, and the LDS at the paper's lambda (best on the test set itself)
    and at the data-free default rule."""
    rows = []
    for method, per_set in results.get("methods", {}).items():
        for test_set, study in per_set.items():
            if not isinstance(study, dict) or "honest" not in study:
                continue
            rows.append({"method": method_label(method), "test set": test_set,
                         HONEST: round(float(study["honest"]["lds"]), 1), PM: round(float(study["honest"]["pm"]), 1),
                         PAPER: round(float(study["paper"]["lds"]), 1),
                         DEFAULT: round(float(study["default"]["lds"]), 1) if "default" in study else None})
    return sorted(rows, key=lambda r: r["test set"] != "validation")  # the real digits first, stable per method


def lambdas_coincide(rows: list[dict]) -> bool:
    """True when the paper's and the honest lambda give the same LDS in every row (the same lambda
    won on both halves of every test set, so the optimistic choice cost nothing here)."""
    return bool(rows) and all(r[PAPER] == r[HONEST] for r in rows)


def table_rows(table: dict) -> list[dict]:
    """One row per (method, test set) of a `benchmark.tables` table with a number: the honest-lambda
    LDS for swept methods, the plain LDS for methods without a lambda; missing cells are skipped."""
    rows = []
    for name, cell in table.items():
        if not isinstance(cell, dict):
            continue
        for test_set in ("validation", "generated"):
            c = cell.get(test_set)
            if not isinstance(c, dict):
                continue
            value = c["honest"] if "honest" in c else c
            rows.append({"method": method_label(name), "test set": test_set, HONEST: round(float(value["lds"]), 1),
                         PM: round(float(value["pm"]), 1)})
    return rows


def _relabel_cell(text: str) -> str:
    """A report's first-column cell under the method's display name: the whole cell when it names a
    method ('renorm-ip' -> 'Renormalised IP'), else its longest head before ', ' or ' (' that does
    ('gas (4 checkpoints)' -> 'GAS (4 checkpoints)', 'D-TRAK (square), exact' -> 'D-TRAK, exact')."""
    if method_label(text) != text:
        return method_label(text)
    for cut in sorted((m.start() for m in re.finditer(r", | \(", text)), reverse=True):
        head = text[:cut]
        if method_label(head) != head:
            return method_label(head) + text[cut:]
    return text


def relabel_tables(markdown: str) -> str:
    """A benchmark report's Markdown with every method in the first column of its tables under its
    one display name (`method_label`): the harnesses write 'd-trak' or 'renorm-ip', the app says
    'D-TRAK' and 'Renormalised IP'."""
    out, relabel = [], False
    for line in markdown.splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            first = cells[1].strip()
            if first in ("method", "output function"):
                relabel = True
            elif relabel and not set(first) <= set("-: "):
                cells[1] = f" {_relabel_cell(first)} "
                line = "|".join(cells)
        else:
            relabel = False
        out.append(line)
    return "\n".join(out)


def escape_table_cell(text: str) -> str:
    """Text that stays inside one Markdown table cell (a '|' would end it)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------- request parameters
# Every number a visitor sends passes through these: Gradio's sliders bound the UI, not the API,
# which accepts any JSON (null, strings, 1e308, true, ...).

MAX_DDIM_STEPS = 200
MAX_TOP_K = 32


def _shown(value, limit: int = 40) -> str:
    """repr(value) cut to `limit` characters, for messages (a request may send anything)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return "a number too long to show"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_int(value, name: str, lo: int, hi: int) -> int:
    """A whole number in lo..hi from a request value; ValueError with a message for the visitor otherwise.

    Accepted: ints, integral floats (a slider may send 50.0), numpy numbers and short strings that
    spell one ("50", " 7 ", "1e3"). Refused: None, booleans, NaN, infinities, fractions, anything else.
    """
    error = ValueError(f"{name} must be a whole number in {lo}..{hi}, got {_shown(value)}")
    if isinstance(value, str) and len(value) <= 40:
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise error from None
    if isinstance(value, (bool, np.bool_)):
        raise error
    if isinstance(value, numbers.Integral):
        v = int(value)
    elif isinstance(value, numbers.Real):
        try:
            f = float(value)
        except (OverflowError, TypeError, ValueError):
            raise error from None
        if not np.isfinite(f) or not f.is_integer():
            raise error
        v = int(f)
    else:
        raise error
    if not lo <= v <= hi:
        raise error
    return v


def parse_bool(value, name: str) -> bool:
    """A tick box's value from a request: True or False (numpy's too), or the strings "true" and
    "false" (any case, spaces around); ValueError with a message for the visitor otherwise (1, "yes",
    "0", a list: a truthy value is not a tick)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {_shown(value)}")


def parse_index(value, name: str, n: int) -> int:
    """A 0-based position among n items from a request (a gallery click's index; [row, col] gives its
    row): a whole number in 0..n-1 (-1 is not "the last" here); ValueError for the visitor otherwise."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    if n < 1:
        raise ValueError(f"there is no {name} to select")
    return parse_int(value, name, 0, n - 1)


def parse_steps(value) -> int:
    """DDIM sampling steps of a generate request, 1..MAX_DDIM_STEPS."""
    return parse_int(value, "DDIM steps", 1, MAX_DDIM_STEPS)


def parse_top_k(value, n_train: int | None = None) -> int:
    """How many proponents / opponents to show, 1..MAX_TOP_K (and at most the training-set size)."""
    return parse_int(value, "top-k", 1, MAX_TOP_K if n_train is None else max(1, min(MAX_TOP_K, int(n_train))))


def parse_removal_k(value, n_train: int) -> int:
    """Training images a counterfactual removes, 1..n_train // 2 (at least half the set stays)."""
    return parse_int(value, "number of training images to remove", 1, max(1, int(n_train) // 2))


def parse_method(value, choices, name: str = "method") -> str:
    """A method name from a request, checked against `choices` (names, or (label, name) pairs as
    `method_choices` gives); a label is accepted too. ValueError naming the valid choices otherwise."""
    pairs = [tuple(c) if isinstance(c, (tuple, list)) else (method_label(c), c) for c in choices]
    if isinstance(value, str):
        for label, method in pairs:
            if value == method:
                return method
        for label, method in pairs:
            if value == label:
                return method
    if not pairs:
        raise ValueError(f"no {name} is available here")
    raise ValueError(f"{name} must be one of {', '.join(label for label, _ in pairs)}; got {_shown(value)}")


# ---------------------------------------------------------------- one training image under every method

def rank_of(scores: np.ndarray, index: int) -> int:
    """1-based rank of training image `index` among all scores, highest first (1 = top proponent);
    ties go to the lower index, as in `scoring.top_k`."""
    scores = np.asarray(scores)
    s = scores[index]
    return int((scores > s).sum() + (scores[:index] == s).sum() + 1)


def ranks_under_methods(attributions: dict, index: int) -> list[dict]:
    """One row per method for training image `index`: its rank (1 = strongest proponent, N =
    strongest opponent), its score, and the share of training images it outranks.
    `attributions`: {method: Attribution or a ValueError saying why that method cannot run here}."""
    rows = []
    for method, result in attributions.items():
        if isinstance(result, Exception):
            rows.append({"method": method_label(method), "rank": None, "score": None, "why": short_reason(result)})
            continue
        n = len(result.scores)
        rank = rank_of(result.scores, index)
        rows.append({"method": method_label(method), "rank": rank, "of": n, "score": float(result.scores[index]),
                     "side": "proponent" if rank <= n // 2 else "opponent", "top_share": rank / n})
    return rows


# ---------------------------------------------------------------- the score by noise level

@dataclass(frozen=True)
class NoiseLevels:
    """A TRAK-family score split by the noise level of the query's gradient.

    The query feature is the projected gradient averaged over K timesteps; split the timesteps
    into buckets and the feature is the size-weighted sum of the buckets' mean gradients, so (the
    score being linear in the query feature) each training image's score is the sum of one
    contribution per bucket. `contributions[b, i]`: bucket b's part of training image i's score;
    summed over buckets it is the score the Attribute tab shows.

    At high noise the noisy input is almost all noise, and that noise is the same for every query
    (`gradients.timestep_noise`), so a high-noise bucket's part is nearly the same whatever the
    query. `reference[b, i]`: bucket b's part averaged over reference queries (`reference_features`);
    `centred` subtracts it, keeping what is specific to this query (its rows no longer sum to the
    score). `top` ranks by `centred`."""
    method: str
    timesteps: tuple  # ((first, last), ...) training timesteps of each bucket, low noise first
    contributions: np.ndarray  # (B, N)
    reference: np.ndarray | None = None  # (B, N) the mean contribution over reference queries; None: not centred
    references: int = 0  # how many reference queries the mean is over

    @property
    def scores(self) -> np.ndarray:
        return self.contributions.sum(0)

    @property
    def centred(self) -> np.ndarray:
        """(B, N) each bucket's part minus the reference queries' mean part (the raw parts when there
        is no reference)."""
        return self.contributions if self.reference is None else self.contributions - self.reference

    def top(self, bucket: int, n: int) -> np.ndarray:
        """The n training images with the largest (centred) contribution in one bucket, strongest first."""
        return np.argsort(-self.centred[bucket], kind="stable")[:n]

    def labels(self) -> list[str]:
        return [f"t {a}-{b}" if a != b else f"t {a}" for a, b in self.timesteps]


def _bucket_gradients(gradients, sl: slice):
    """A copy of a `GradientFeaturizer` that averages over the timesteps in `sl` only (same noise,
    same model replicas): its output is that bucket's mean gradient."""
    return gradients.subset(sl)


def bucket_edges(K: int, buckets: int) -> np.ndarray:
    """The bucket boundaries (n + 1,) over K timesteps, n = min(buckets, K) (at least 1)."""
    n = max(1, min(int(buckets), K))
    return np.linspace(0, K, n + 1).round().astype(int)


def bucket_features(attributor, images, method: str, buckets: int = 10, prompts=None, batch: int = 8):
    """(Q, B, k) float32: each query image's (Q, C, H, W) projected mean gradient over each of the
    `bucket_edges` buckets of a TRAK-family method's K timesteps (`prompts`: one per image, a
    text-to-image attributor's). About one featurization per image: the buckets together run the
    K timesteps once (in batched passes when they are equal)."""
    import torch

    setting, _ = attributor.setting(method)
    featurizer = attributor.featurizer(setting)
    gradients = featurizer.gradients
    K = gradients.K
    edges = bucket_edges(K, buckets)
    n = len(edges) - 1
    images = torch.as_tensor(images, dtype=torch.float32)
    out = []
    for s in range(0, len(images), batch):
        inputs, conditioning = attributor.gradient_inputs(images[s:s + batch],
                                                          None if prompts is None else list(prompts[s:s + batch]))
        q = len(inputs)
        if K % n == 0:  # equal buckets: one batched pass, row (j, b) averaged over bucket b of image j only
            rows = torch.arange(K).reshape(n, K // n).repeat(q, 1)
            copies = {name: c.repeat_interleave(n, 0) for name, c in conditioning.items()}
            feats = featurizer.projector.project(gradients(inputs.repeat_interleave(n, 0), timesteps=rows, **copies))
            out.append(feats.reshape(q, n, -1))
        else:
            feats = [featurizer.projector.project(_bucket_gradients(gradients, slice(a, b))(inputs, **conditioning))
                     for a, b in zip(edges, edges[1:])]
            out.append(torch.stack(feats, 1))
    return torch.cat(out)


REFERENCE_QUERIES = 32  # generated samples (seeds 0..31) whose mean part per noise level is subtracted
REFERENCE_STEPS = 50  # their DDIM steps (the Generate tab's default)


def reference_queries(attributor, n: int = REFERENCE_QUERIES, steps: int = REFERENCE_STEPS):
    """(images, prompts) of the noise-level view's reference queries: the model's own DDIM samples of
    seeds 0..n-1 (what a visitor usually clicks); a text-to-image model's are prompted with its
    fine-tuning captions in turn (prompts None for a pixel model)."""
    if getattr(attributor, "kind", "pixel") == "text2image":
        captions = sorted(set(attributor.train.captions))
        prompts = [captions[i % len(captions)] for i in range(n)]
        return attributor.generate(range(n), prompts, steps=steps), prompts
    from dtrak_core.model.sampling import generate

    return generate(attributor.unet, attributor.scheduler, range(n), steps=steps), None


@dataclass(frozen=True)
class NoiseReference:
    """The mean of `bucket_features` over reference queries: the part of each noise level's gradient
    that every query shares (at high noise nearly all of it)."""
    method: str  # the store's output function
    features: np.ndarray  # (B, k) float64
    queries: int  # how many reference queries it is the mean of


def reference_features(attributor, method: str, buckets: int = 10, images=None, prompts=None) -> NoiseReference:
    """The `NoiseReference` of a TRAK-family method's store over reference query images (None:
    `reference_queries`; `prompts`, one per image, for a text-to-image model). Costs one
    featurization per reference image: compute it once per folder and store."""
    if images is None:
        images, prompts = reference_queries(attributor)
    feats = bucket_features(attributor, images, method, buckets, prompts).double()
    return NoiseReference(canonical_name(method), feats.mean(0).numpy(), len(feats))


def noise_levels(attributor, image, method: str, buckets: int = 10, prompt: str | None = None,
                 lam=None, reference=None) -> NoiseLevels:
    """`image` (C, H, W) attributed by a TRAK-family `method`, split into `buckets` timestep buckets
    (at most one per timestep of the method's store). Costs about one featurization of the query:
    the buckets together run the same K timesteps (in one batched pass when they are equal); the
    store's training features are reused as they are (the split is on the query side only).
    ValueError for a method without a store. `prompt`: a text-to-image attributor's query prompt
    (the gradients are then taken at the image's VAE latent, conditioned on the prompt); `lam`: the
    ridge lambda (see `Attributor.lambda_for`); `reference`: the `NoiseReference` of the same store
    and buckets (the levels are then `centred` on it, at the same lambda)."""
    import torch

    setting, _ = attributor.setting(method)
    gradients = attributor.featurizer(setting).gradients
    edges = bucket_edges(gradients.K, buckets)
    feats = bucket_features(attributor, torch.as_tensor(image, dtype=torch.float32)[None], method, buckets,
                            None if prompt is None else [prompt])[0]  # (B, k)
    scorer = attributor.scorer(method, lam=lam)
    weights = np.diff(edges) / gradients.K
    scores = scorer.scores(feats)  # (B, N), each bucket as if it were the whole query
    steps = gradients.timesteps.tolist()
    spans = tuple((int(steps[a]), int(steps[b - 1])) for a, b in zip(edges, edges[1:]))
    centre, count = None, 0
    if reference is not None:
        if reference.method != setting.output_fn or reference.features.shape != tuple(feats.shape):
            raise ValueError(f"the reference is of {reference.method} with {reference.features.shape} (buckets, k) "
                             f"features; this split is of {setting.output_fn} with {tuple(feats.shape)}")
        centre, count = scorer.scores(reference.features) * weights[:, None], reference.queries
    return NoiseLevels(canonical_name(method), spans, scores * weights[:, None], centre, count)


# ---------------------------------------------------------------- uploads: which way round is the ink

def light_paper(pixels) -> bool:
    """True when an image, converted without inverting (bright = +1), has a mostly light border:
    dark ink on light paper, the opposite of the training digits (light ink on black)."""
    x = np.asarray(pixels, dtype=np.float64)
    ring = np.concatenate([x[..., 0, :].ravel(), x[..., -1, :].ravel(), x[..., 1:-1, 0].ravel(), x[..., 1:-1, -1].ravel()])
    return float(ring.mean()) > 0


def ink_share(images) -> np.ndarray:
    """Share of pixels brighter than the middle grey, per image (B, ...) in [-1, 1]."""
    x = np.asarray(images, dtype=np.float64)
    return (x.reshape(len(x), -1) > 0).mean(1)


def unusual_ink(pixels, train_images, digits: bool = True) -> str | None:
    """A warning when the query has more or less ink than every training image: the model has seen
    nothing like it, and its scores run far larger than usual (often an image the wrong way round).
    digits=False: said of bright pixels (images that are not ink on paper)."""
    share = float(ink_share(np.asarray(pixels)[None])[0])
    lo, hi = (float(v) for v in np.quantile(ink_share(train_images), [0.0, 1.0]))
    if lo <= share <= hi:
        return None
    if not digits:
        return (f"{share:.0%} of this image is brighter than mid-grey; in every training image {lo:.0%}-{hi:.0%} is. "
                "The model has seen nothing like it, so its scores are unusually large and say little. If the image "
                "is a negative, tick invert.")
    return (f"{share:.0%} of this image is ink; every training image has {lo:.0%}-{hi:.0%}. The model has seen "
            "nothing like it, so its scores are unusually large and say little. If the ink is the wrong way "
            "round, flip the ink setting.")


# ---------------------------------------------------------------- counterfactual: examples and cost

def example_rows(outcomes: dict, first: set | None = None) -> list[dict]:
    """The counterfactual examples, one row per (seed, k) with up to two rankings and their outcomes.

    `outcomes`: {(seed, ranking, k): {'l2', 'label_before', 'label_after'}} for every stored result;
    `first`: keys shown before the others (the gallery's). Ranking A is D-TRAK when present, B the
    random baseline when present (else the next ranking). The first row is the first example whose
    digit changes under ranking A while the random removal beside it leaves it (else the first whose
    digit changes under A), so a visitor starts on a removal that visibly mattered where chance did not."""
    first = first or set()
    groups = {}
    for seed, ranking, k in outcomes:
        groups.setdefault((int(seed), int(k)), []).append(ranking)
    rows = []
    for (seed, k), rankings in groups.items():
        rankings = sorted(rankings, key=registry.sort_key, reverse=True)  # D-TRAK first, random last
        rankings = rankings[:1] + (["random"] if "random" in rankings[1:] else rankings[1:2])
        row = {"seed": seed, "k": k, "rankings": rankings,
               "outcomes": [outcomes[(seed, r, k)] for r in rankings],
               "first": any((seed, r, k) in first for r in rankings)}
        rows.append(row)
    rows.sort(key=lambda r: (not r["first"], r["seed"], -r["k"]))

    def changed(o):
        return o["label_after"] != o["label_before"]
    # first: ranking A changes the digit and the random removal beside it does not, else A changes it
    best = next((i for i, r in enumerate(rows) if changed(r["outcomes"][0]) and len(r["rankings"]) > 1
                 and r["rankings"][-1] == "random" and not changed(r["outcomes"][-1])), None)
    if best is None:
        best = next((i for i, r in enumerate(rows) if changed(r["outcomes"][0])), None)
    if best:
        rows.insert(0, rows.pop(best))
    return rows


def l2_examples(outcomes: dict, targets=(1.0, 3.0)) -> list[tuple]:
    """For each target pixel L2, the stored result closest to it: [(target, key), ...] (keys of
    `outcomes`, {(seed, ranking, k): {'l2', ...}}), so a reader can see what a distance looks like."""
    if not outcomes:
        return []
    keys = sorted(outcomes)
    return [(t, min(keys, key=lambda key: abs(outcomes[key]["l2"] - t))) for t in targets]


@dataclass(frozen=True)
class RetrainCost:
    """How long one remove-and-retrain takes on this machine: from the last live retrain here when
    there is one (`from_retrain`), else from a probe of a few training steps (`measure_retrain`)."""
    seconds_per_step: float
    steps: int  # steps of the recipe
    measured_at: float  # time.time() of the measurement
    fixed_seconds: float = 0.0  # what does not grow with the steps: set-up, ranking, regeneration
    source: str = "probe"  # 'probe' or 'retrain'

    @property
    def seconds(self) -> float:
        return self.fixed_seconds + self.seconds_per_step * self.steps

    @classmethod
    def from_retrain(cls, seconds: float, steps: int) -> "RetrainCost":
        return cls(float(seconds) / max(1, int(steps)), int(steps), time.time(), 0.0, "retrain")

    def text(self, retrains: int) -> str:
        if retrains == 0:
            return "Every result asked for is precomputed or already computed on this server: it shows at once."
        each = _duration(self.seconds)
        total = f" ({retrains} retrains: about {_duration(retrains * self.seconds)})" if retrains > 1 else ""
        how = ("from the last retrain on this server" if self.source == "retrain" else
               f"measured here: {self.seconds_per_step * 1000:.0f} ms per training step x {self.steps:,} steps")
        return (f"One retrain takes about **{each}** on this server right now{total} "
                f"({how}; slower while other visitors compute).")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


def measure_retrain(train_images, scheduler, config, probe_steps: int = 6) -> RetrainCost:
    """Time a 1-step and a (1 + probe_steps)-step training run of `config` (a `TrainConfig`) on this
    machine: their difference is the per-step cost, free of the set-up both pay (building the
    model and optimiser), which alone would make a short probe overestimate a long retrain."""
    from dtrak_core.model.training import train

    t0 = time.perf_counter()
    train(train_images, scheduler, replace(config, steps=1), show_bar=False)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    train(train_images, scheduler, replace(config, steps=1 + probe_steps), show_bar=False)
    more = time.perf_counter() - t0
    per_step = max(more - one, 1e-6) / probe_steps
    return RetrainCost(per_step, int(config.steps), time.time(), max(0.0, one - per_step))


def write_example_uploads(folder: str, validation) -> list[tuple[str, str]]:
    """Image files a visitor can try as uploads, written into `folder` from held-out digits
    (`validation`: a `data.Dataset` of 8x8 digits the model never trained on): [(path, caption)].
    Both ink polarities, so the automatic ink detection has something to show."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    from dtrak_core.images import save_png, to_pil

    os.makedirs(folder, exist_ok=True)
    labels = validation.labels.numpy()
    out = []
    for digit, dark_on_light in ((3, False), (7, True)):
        i = int(np.flatnonzero(labels == digit)[0])
        img = to_pil(validation.images[i], 8)  # 64x64, light ink on black like the training digits
        if dark_on_light:
            img = Image.eval(img, lambda v: 255 - v)
        path = os.path.join(folder, f"held-out-{digit}{'-on-paper' if dark_on_light else ''}.png")
        save_png(img, path)
        out.append((path, f"a held-out {digit}, " + ("dark ink on white paper" if dark_on_light else "light ink on black")))
    drawing = Image.new("L", (96, 96), 255)  # a digit drawn with a pen on paper, slightly blurred like a photo
    font = ImageFont.load_default(size=80)
    ImageDraw.Draw(drawing).text((48, 50), "2", fill=0, font=font, anchor="mm", stroke_width=3, stroke_fill=0)
    path = os.path.join(folder, "drawn-2.png")
    save_png(drawing.filter(ImageFilter.GaussianBlur(1.5)), path)
    out.append((path, "a 2 drawn on paper"))
    return out
