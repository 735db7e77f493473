"""Small non-UI helpers behind the Gradio app (`app.py`): seed parsing, summaries of a score
vector (per-class mass, top-k thresholds), comparisons of two methods (overlap, rank correlation),
removal sets for the counterfactual, and validation of request parameters. No gradio here.
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr


MAX_SAMPLES = 64  # images one "generate" request may ask for (CPU-only hosting)
MAX_SEED = 2**31 - 1

# Display names for methods whose output function has a name in the papers.
METHOD_LABELS = {"square": "D-TRAK (square)", "loss": "TRAK (loss)"}


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name)


def method_choices(methods) -> list[tuple[str, str]]:
    """(label, name) pairs, D-TRAK and TRAK first, then the rest in the given order."""
    first = [m for m in ("square", "loss") if m in methods]
    return [(method_label(m), m) for m in first + [m for m in methods if m not in first]]


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


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors over the training set."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two 1-D score vectors of equal length >= 2, got {a.shape} and {b.shape}")
    return float(spearmanr(a, b).statistic)


def read_benchmarks(folder: str) -> list[dict]:
    """Every *.json (and its sibling *.md) under `folder`, as {'name', 'data', 'markdown'}; [] when absent.
    Files that are not valid JSON are reported with an 'error' instead of raising."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        item = {"name": name[:-5], "data": None, "markdown": None}
        try:
            with open(os.path.join(folder, name)) as f:
                item["data"] = json.load(f)
        except (OSError, ValueError) as e:
            item["error"] = f"{name}: {e}"
        md = os.path.join(folder, name[:-5] + ".md")
        if os.path.isfile(md):
            with open(md) as f:
                item["markdown"] = f.read()
        out.append(item)
    return out


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


@dataclass(frozen=True)
class QueryKey:
    """What identifies an attribution query: a generated sample (seed, steps) or an upload (pixel hash)."""
    kind: str  # 'sample' or 'upload'
    ident: str

    @staticmethod
    def for_sample(seed: int, steps: int) -> "QueryKey":
        return QueryKey("sample", f"{int(seed)}:{int(steps)}")

    @staticmethod
    def for_pixels(pixels: np.ndarray) -> "QueryKey":
        import hashlib
        return QueryKey("upload", hashlib.sha256(np.ascontiguousarray(pixels, dtype=np.float32).tobytes()).hexdigest()[:16])




def counterfactual_gallery(root: str) -> list[dict]:
    """Precomputed counterfactual entries from every gallery.json under `root` (written by
    `counterfactual.write_gallery`), with image paths made absolute; [] when there are none.
    Entries whose images are missing are skipped."""
    import glob

    entries = []
    for index_path in sorted(glob.glob(os.path.join(root, "**", "gallery.json"), recursive=True)):
        folder = os.path.dirname(index_path)
        try:
            with open(index_path) as f:
                index = json.load(f)
        except (OSError, ValueError):
            continue
        for e in index.get("entries", []):
            paths = {key: os.path.join(folder, str(e.get(key, "")).split(" ")[0]) for key in ("before_png", "after_png")}
            if not all(os.path.isfile(p) for p in paths.values()):
                continue
            entries.append({**e, **paths})
    return entries


def lds_rows(results: dict) -> list[dict]:
    """One row per (method, test set) of `lds.py`'s lds_results.json: LDS x 100 with +- for the
    paper's lambda (best on the test set), the honest (cross-fitted) lambda and the default rule."""
    rows = []
    for method, per_set in results.get("methods", {}).items():
        for test_set, study in per_set.items():
            if not isinstance(study, dict) or "honest" not in study:
                continue
            row = {"method": method_label(method), "test set": test_set}
            for which in ("paper", "honest", "default"):
                row[f"LDS ({which} lambda)"] = round(float(study[which]["lds"]), 2)
                row[f"+- ({which})"] = round(float(study[which]["pm"]), 2)
            rows.append(row)
    return rows


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
            rows.append({"method": name, "test set": test_set, "LDS (honest lambda)": round(float(value["lds"]), 2),
                         "+- (honest)": round(float(value["pm"]), 2)})
    return rows


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
