"""The counterfactual harness's report: the paper's table, distributions, paired comparisons and a
before/after gallery, from the finished job files of `counterfactual.run_counterfactual`.

    summary = summarize(jobs_dir, train_labels)       # medians and distributions per (k, ranking), paired tests
    print(format_table(summary, n_train))              # Markdown
    write_gallery(jobs_dir, gallery_dir, train_set)   # PNGs + gallery.json for the first targets
    entries = read_gallery(gallery_dir)                # verified against the checksums write_gallery recorded

Every result carries a checksum from its writer: `summarize` returns the summary sealed
(`checksums.seal`: summary.json holds its own checksum), `write_gallery` records the sha256 of
gallery.json and of every PNG in gallery/checksums.json; `read_summary` and `read_gallery` refuse
what does not match, naming the file.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from scipy.stats import wilcoxon

from dtrak_core import checksums
from dtrak_core.attribution import methods as registry
from dtrak_core.errors import IntegrityError
from dtrak_core.evaluation.counterfactual import (
    CONTROL_ID,
    CounterfactualResult,
    display_name,
    job_files,
    load_job,
    slug,
)
from dtrak_core.files import atomic_write_json, json_safe, load_result
from dtrak_core.images import grid, save_png, to_pil

PUBLISHED_CIFAR2 = {"l2": {"Random": 4.71, "TRAK": 5.90, "D-TRAK": 8.97},
                    "clip_cosine": {"Random": 0.968, "TRAK": 0.943, "D-TRAK": 0.881}}
GALLERY_FIELDS = ("seed", "ranking", "method", "k", "removed_indices", "l2", "label_before", "confidence_before",
                  "label_after", "confidence_after", "clip_cosine", "clip_status")  # of a result, per gallery entry

def load_results(out_dir: str) -> list[CounterfactualResult]:
    """Every finished (target, ranking, k) job in out_dir (sorted by file name), as results."""
    return [load_job(path) for path in job_files(out_dir)]


def _quantiles(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    q = np.quantile(v, [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
    return {"n": int(len(v)), "median": float(q[3]), "mean": float(v.mean()), "min": float(q[0]), "p10": float(q[1]),
            "p25": float(q[2]), "p75": float(q[4]), "p90": float(q[5]), "max": float(q[6])}


def holm(paired: list[dict], key: str = "wilcoxon_p") -> list[dict]:
    """Add "holm_p" to each comparison: its p-value adjusted by Holm's step-down method over every
    comparison reported beside it (the family), so a table of many paired tests does not read one
    lucky p < 0.05 as a finding. None where the test was not run."""
    tested = sorted((p for p in paired if p.get(key) is not None), key=lambda p: p[key])
    running = 0.0
    for i, p in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - i) * p[key]))
        p["holm_p"] = running
    for p in paired:
        p.setdefault("holm_p", None)
    return paired


def harness_command(results_dir: str) -> str:
    """The command that rewrites summary.json, results.md and gallery/ in `results_dir` (the
    harness's --out) from its finished jobs."""
    root = os.path.dirname(os.path.abspath(results_dir))
    in_folder = os.path.isfile(os.path.join(root, "manifest.json"))
    return (f"`python -m dtrak_core counterfactual {'--root ' + os.path.dirname(results_dir) + ' ' if in_folder else ''}"
            f"--out {results_dir} --summary-only`")


def summary_remedy(path: str) -> str:
    return f"rewrite it from the finished jobs with {harness_command(os.path.dirname(path) or '.')}"


def gallery_remedy(path: str) -> str:
    """What to do about a damaged or edited gallery file (gallery.json or one of its PNGs)."""
    return (f"rewrite the gallery from the finished jobs with "
            f"{harness_command(os.path.dirname(os.path.dirname(os.path.abspath(path))))}")


def read_summary(path: str) -> dict:
    """A summary.json written from `summarize`, verified (its own checksum, or its folder's
    checksums.json); an `IntegrityError` naming it when it is unreadable, edited or unrecorded."""
    return checksums.read_sealed_json(path, "counterfactual summary", summary_remedy(path))


def summarize(out_dir: str, train_labels=None, classifier=None) -> dict:
    """Medians and distributions per (k, ranking), paired per-target comparisons, and the control,
    of the finished jobs in `out_dir`, as strict JSON sealed with its checksum (`checksums.seal`:
    summary.json is this dict; `read_summary` verifies it).

    With `train_labels`, each cell also reports the share of removed images whose label is the
    target's (classifier) label: with 10 classes of ~150 digits, removing 300 can empty a class.
    `classifier` (an `ImageClassifier` of the folder, labels in the order of `train_labels`) reads
    the before and after images of jobs measured without one (`counterfactual-own`), from the
    images each job file keeps.
    """
    rows = load_results(out_dir)
    if classifier is not None:
        rows = [classify_result(r, classifier) if r.label_before < 0 else r for r in rows]
    cells, by_target = {}, {}
    for r in rows:
        cells.setdefault((r.k, r.ranking), []).append(r)
        by_target.setdefault(r.k, {}).setdefault(r.ranking, {})[r.seed] = r
    summary = {"cells": [], "paired": [], "published_cifar2_medians": PUBLISHED_CIFAR2}
    for (k, ranking), group in sorted(cells.items(), key=lambda kv: (-kv[0][0], display_name(kv[0][1]))):
        group.sort(key=lambda r: r.seed)
        clip = [r.clip_cosine for r in group if r.clip_cosine is not None]
        labelled = any(r.label_before >= 0 for r in group)
        summary["cells"].append({
            "k": int(k), "ranking": ranking, "method": display_name(ranking),
            "l2": _quantiles([r.l2 for r in group]),
            # None: no classifier for these images (a model of your own, `lds_own`)
            "label_changed": None if not labelled else float(np.mean([r.label_changed for r in group])),
            "median_confidence_before": None if not labelled else float(np.median([r.confidence_before for r in group])),
            "median_confidence_after": None if not labelled else float(np.median([r.confidence_after for r in group])),
            "clip_cosine": _quantiles(clip) if clip else group[0].clip_status,
            "median_train_seconds": float(np.median([r.train_seconds for r in group])),
            "removed_same_label_share": None if train_labels is None or k == 0 or not labelled else float(np.mean(
                [np.mean(np.asarray(train_labels)[r.removed_indices] == r.label_before) for r in group])),
            "per_target": [{"seed": r.seed, "l2": r.l2, "label_before": r.label_before, "label_after": r.label_after}
                           for r in group],
        })
    for k, per in sorted(by_target.items(), reverse=True):
        names = sorted(per, key=registry.sort_key, reverse=True)  # D-TRAK first, random last
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                common = sorted(set(per[a]) & set(per[b]))
                if not common:
                    continue
                diff = np.array([per[a][s].l2 - per[b][s].l2 for s in common])
                p = float(wilcoxon(diff).pvalue) if len(common) >= 6 and np.any(diff != 0) else None
                # how different the two removals are: a comparison of rankings that remove the
                # same images cannot tell them apart
                shared = [len(set(np.asarray(per[a][s].removed_indices).tolist())
                              & set(np.asarray(per[b][s].removed_indices).tolist())) for s in common]
                summary["paired"].append({"k": int(k), "a": display_name(a), "b": display_name(b), "n": len(common),
                                          "share_a_moves_more": float(np.mean(diff > 0)),
                                          "median_difference": float(np.median(diff)), "wilcoxon_p": p,
                                          "median_removed_by_both": float(np.median(shared))})
    holm(summary["paired"])
    control = os.path.join(out_dir, f"{CONTROL_ID}.npz")
    if os.path.isfile(control):
        z = load_result(control, keys=("l2", "same_weights", "train_seconds", "threads"))
        checksums.verify(control, "counterfactual control job", "delete it and rerun the counterfactual harness",
                         required=False)
        summary["control"] = {"n": int(len(z["l2"])), "same_weights": bool(z["same_weights"]),
                              "median_l2": float(np.median(z["l2"])), "max_l2": float(np.max(z["l2"])),
                              "train_seconds": float(z["train_seconds"]), "threads": int(z["threads"])}
    return checksums.seal(json_safe(summary))


def classify_result(r, classifier):
    """The result `r` with its before and after images' labels and confidences as `classifier` reads them."""
    from dataclasses import replace

    labels, confidences = classifier.classify(torch.stack([r.before, r.after]).numpy())
    return replace(r, label_before=int(labels[0]), label_after=int(labels[1]),
                   confidence_before=float(confidences[0]), confidence_after=float(confidences[1]))


def format_table(summary: dict, n_train: int = 1500, word: str = "digit") -> str:
    """Markdown: the paper's table (median L2 per ranking, n per cell), then paired comparisons."""
    by_column = sorted(summary["cells"], key=lambda c: registry.sort_key(c["ranking"]))  # the paper's column order
    methods = list(dict.fromkeys(c["method"] for c in by_column))
    ks = sorted({c["k"] for c in summary["cells"]}, reverse=True)
    cell = {(c["k"], c["method"]): c for c in summary["cells"]}
    lines = ["| removed k | metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    pub = summary["published_cifar2_medians"]
    lines.append("| 20% (CIFAR-2, published) | median L2 | "
                 + " | ".join(f"{pub['l2'][m]:.2f}" if m in pub["l2"] else "" for m in methods) + " |")
    for k in ks:
        label = f"{k} ({100 * k / n_train:g}%)"
        def fmt(m, f):
            c = cell.get((k, m))
            return f(c) if c else "-"
        lines.append(f"| {label} | median L2 [p25, p75] (n) | " + " | ".join(fmt(m, lambda c: (
            f"**{c['l2']['median']:.2f}** [{c['l2']['p25']:.2f}, {c['l2']['p75']:.2f}] (n={c['l2']['n']})")) for m in methods) + " |")
        if any(c["label_changed"] is not None for c in summary["cells"] if c["k"] == k):
            lines.append(f"| {label} | {word} label changed | " + " | ".join(fmt(m, lambda c: (
                "-" if c["label_changed"] is None else f"{100 * c['label_changed']:.0f}%")) for m in methods) + " |")
        if any(c.get("removed_same_label_share") is not None for c in summary["cells"] if c["k"] == k):
            lines.append(f"| {label} | removed images with the target's label | " + " | ".join(fmt(m, lambda c: (
                "-" if c["removed_same_label_share"] is None else f"{100 * c['removed_same_label_share']:.0f}%"))
                for m in methods) + " |")
        lines.append(f"| {label} | median CLIP cosine | " + " | ".join(fmt(m, lambda c: (
            f"{c['clip_cosine']['median']:.3f}" if isinstance(c["clip_cosine"], dict) else "unavailable")) for m in methods) + " |")
    if summary["paired"]:
        tests = sum(p["wilcoxon_p"] is not None for p in summary["paired"])
        lines += ["", f"| k | comparison (same targets) | n | removed by both (median) | A moves more | "
                      f"median L2(A) - L2(B) | Wilcoxon p | Holm-adjusted p ({tests} test{'' if tests == 1 else 's'}) |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in summary["paired"]:
            pv = "-" if p["wilcoxon_p"] is None else f"{p['wilcoxon_p']:.2g}"
            hv = "-" if p.get("holm_p") is None else f"{p['holm_p']:.2g}"
            both = "-" if p.get("median_removed_by_both") is None else f"{p['median_removed_by_both']:g}"
            lines.append(f"| {p['k']} | {p['a']} vs {p['b']} | {p['n']} | {both} | {100 * p['share_a_moves_more']:.0f}% | "
                         f"{p['median_difference']:+.2f} | {pv} | {hv} |")
    if "control" in summary:
        c = summary["control"]
        lines += ["", f"Control (nothing removed, {c['threads']} thread(s)): same weights as the committed model: "
                      f"{c['same_weights']}; median L2 to the targets {c['median_l2']:.2g} (max {c['max_l2']:.2g}, n={c['n']})."]
    return "\n".join(lines) + "\n"


def write_gallery(out_dir: str, gallery_dir: str, train, n_targets: int = 3, k: int | None = None,
                  scale: int = 16) -> dict:
    """Before/after PNGs (and the removed images) for the first `n_targets` targets finished under every
    ranking at k (None: the largest k), written to gallery_dir with gallery.json describing them;
    `train`: the training `Dataset` (for the removed images). Returns gallery.json's content.
    The sha256 of gallery.json and of every PNG are recorded in gallery_dir/checksums.json (which
    then lists exactly this gallery's files), for `read_gallery`."""
    rows = load_results(out_dir)
    if not rows:
        raise ValueError(f"no finished counterfactual jobs in {out_dir!r}")
    k = max(r.k for r in rows) if k is None else k
    rows = [r for r in rows if r.k == k]
    rankings = sorted({r.ranking for r in rows}, key=registry.sort_key, reverse=True)  # D-TRAK first, random last
    by = {(r.seed, r.ranking): r for r in rows}
    seeds = sorted(s for s in {r.seed for r in rows} if all((s, n) in by for n in rankings))[:n_targets]
    if not seeds:
        raise ValueError(f"no target has finished jobs for every ranking at k={k} in {out_dir!r}")
    os.makedirs(gallery_dir, exist_ok=True)
    entries, tiles = [], []
    vr = getattr(train, "value_range", (-1.0, 1.0))  # the model's pixel range: low is black, high white
    for s in seeds:
        before = by[(s, rankings[0])].before
        before_png = f"seed{s}-before.png"
        save_png(to_pil(before, scale, vr), os.path.join(gallery_dir, before_png))
        tiles.append(before)
        for name in rankings:
            r = by[(s, name)]
            after = r.after
            tiles.append(after)
            stem = f"seed{s}-{slug(name)}-k{k}"
            save_png(to_pil(after, scale, vr), os.path.join(gallery_dir, f"{stem}-after.png"))
            top = train.images[torch.as_tensor(r.removed_indices[:32], dtype=torch.long)]
            save_png(grid(top, columns=16, scale=scale // 2, value_range=vr), os.path.join(gallery_dir, f"{stem}-removed.png"))
            record = r.to_dict()
            entries.append({**{key: record[key] for key in GALLERY_FIELDS}, "before_png": before_png,
                            "after_png": f"{stem}-after.png", "removed_png": f"{stem}-removed.png",
                            "removed_png_shows": "the first 32 removed, strongest first"})
    save_png(grid(torch.stack(tiles), columns=1 + len(rankings), scale=scale, value_range=vr), os.path.join(gallery_dir, "gallery.png"))
    index = {"k": int(k), "seeds": [int(s) for s in seeds], "columns": ["before"] + [display_name(n) for n in rankings],
             "grid_png": "gallery.png", "entries": entries}
    atomic_write_json(os.path.join(gallery_dir, GALLERY), index)
    written = [GALLERY, "gallery.png"] + [e[key] for e in entries for key in ("after_png", "removed_png")] + \
        [f"seed{s}-before.png" for s in seeds]
    checksums.record(gallery_dir, sorted(set(written)), replace=True)
    return index


GALLERY = "gallery.json"


def read_gallery(gallery_dir: str) -> list[dict]:
    """The entries of gallery_dir/gallery.json (written by `write_gallery`), each with its image
    paths ("before_png", "after_png", "removed_png") made absolute, gallery.json and every image it
    names verified against gallery_dir/checksums.json. A missing, unreadable, edited or unrecorded
    file is an `IntegrityError` naming it, with the fix."""
    path = os.path.join(gallery_dir, GALLERY)
    remedy = gallery_remedy(path)
    index = checksums.read_sealed_json(path, "counterfactual gallery index", remedy)
    entries = index.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise IntegrityError(path, "(counterfactual gallery index) has no valid 'entries' list", remedy)
    out = []
    for i, e in enumerate(entries):
        paths = {}
        for key in ("before_png", "after_png", "removed_png"):
            name = e.get(key)
            if key == "removed_png" and name is None:
                continue
            if not isinstance(name, str) or os.path.basename(name) != name or not name.endswith(".png"):
                raise IntegrityError(path, f"(counterfactual gallery index) entries[{i}] has no valid {key!r}", remedy)
            image = os.path.join(gallery_dir, name)
            checksums.verify(image, "counterfactual gallery image", gallery_remedy(image))
            paths[key] = image
        out.append({**e, **paths})
    return out
