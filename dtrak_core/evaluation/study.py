"""Attribution quality per compute on the embedded default: exact kernels, the projection dimension,
DAS and EK-FAC influence, all scored against the committed LDS ground truth.

Resumable steps, each computing into a git-ignored run folder (default
assets/benchmarks/lds_run/study) and skipping what is already there; every step can be stopped
and rerun (`--minutes` bounds one call, so long work runs in short chunks):

    python -m dtrak_core study gradients --output-fn square loss avg --minutes 4
    python -m dtrak_core study kernels --output-fn square loss avg
    python -m dtrak_core study residuals
    python -m dtrak_core study kfac           # EK-FAC, 4 (timestep, noise) draws per image per pass
    python -m dtrak_core study lds            # -> <run>/study.json, <run>/study.md
    python -m dtrak_core study publish        # -> assets/benchmarks/study.*, rows in tables.*

    <run>/grads/<set>/<setting>/      full per-sample gradients (FeatureStore, N x d float32)
    <run>/kernels/<setting>-<proj>.npz  Gram and cross Gram matrices (exact, or JL-projected to k)
    <run>/residuals.npz               per-timestep training losses (DAS's residuals)
    <run>/ekfac-<samples>.pkl         the fitted EK-FAC of the training loss's GGN (eigenbases, eigenvalues)
    <run>/timings.json                seconds spent per artifact (the cost columns)

Ground truth: assets/benchmarks/lds_ground_truth.npz (masks, F per test set, generated samples);
test sets: the 297 validation digits and the 256 generated samples it holds.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch

from dtrak_core.attribution.exact import GradientSetting, KernelTRAK, full_gradient_store, gram, projected_kernels
from dtrak_core.errors import Cancelled
from dtrak_core.files import atomic_write_json, read_json

DEFAULT_RUN = os.path.join("assets", "benchmarks", "lds_run", "study")
GROUND_TRUTH = os.path.join("assets", "benchmarks", "lds_ground_truth.npz")
TEST_SETS = ("validation", "generated")
TRAIN = "train"
TIMINGS = "timings.json"
RESULTS, REPORT = "study.json", "study.md"
K_SWEEP = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)  # sparse-JL dimensions beside the exact kernels
SWEEPS = {"square": K_SWEEP, "loss": (2048, 32768), "avg": (2048, 32768)}  # k per output function
SHIPPED_LAMBDA = 0.05  # the app's lambda (chosen on validation LDS), where the projected-vs-exact Spearman is read
RESIDUAL_TIMESTEPS = 100  # DAS's training residuals: eps-MSE at the midpoints of 100 equal timestep bins
KFAC_SAMPLES = 4  # (timestep, noise) draws per training image in each of EK-FAC's two passes
# EK-FAC damping: multiples of the mean eigenvalue, the same 1-2-5 steps as the ridge grid
EKFAC_PAIRS = (("loss", "loss"), ("square", "loss"), ("square", "square"), ("avg", "avg"))  # (measurement, training)
RELATIVE_DAMPING = tuple(float(f"{m}e{e}") for e in range(-6, 3) for m in (1, 2, 5))


def _fingerprint(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


class Study:
    """The default model, its training set, the two test sets and the LDS ground truth."""

    def __init__(self, run_dir: str = DEFAULT_RUN, root: str = "assets", ground_truth: str = GROUND_TRUTH):
        from dtrak_core.evaluation.lds import load_ground_truth
        from dtrak_core.folder import read_manifest
        from dtrak_core.model.data import load_digits
        from dtrak_core.model.unet import checkpoint_hash, load_checkpoint

        manifest = read_manifest(root)
        if not manifest:
            raise ValueError(f"no manifest in {root!r}; the study runs on the embedded default model folder")
        if manifest.get("dataset") != "digits-train":
            raise ValueError(f"{root!r} holds a model trained on {manifest.get('dataset')!r}; the committed LDS "
                             f"ground truth is for the embedded digits default")
        self.run_dir, self.root = run_dir, root
        self.unet, self.scheduler = load_checkpoint(os.path.join(root, manifest["checkpoint"]))
        self.checkpoint = checkpoint_hash(self.unet)
        if manifest.get("checkpoint_hash") not in (None, self.checkpoint):
            raise ValueError(f"{root!r}: the model's weights ({self.checkpoint}) are not those its manifest names "
                             f"({manifest['checkpoint_hash']}); restore the model folder")
        self.gt = load_ground_truth(ground_truth)
        self.images = {TRAIN: load_digits("train").images, "validation": load_digits("validation").images,
                       "generated": torch.from_numpy(np.asarray(self.gt["generated_images"], dtype=np.float32))}
        if self.gt["masks"].shape[1] != len(self.images[TRAIN]):
            raise ValueError(f"{ground_truth}: masks cover {self.gt['masks'].shape[1]} training samples, the "
                             f"training set has {len(self.images[TRAIN])}")
        os.makedirs(run_dir, exist_ok=True)

    # -- paths and timings ------------------------------------------------------------------------
    def grad_path(self, set_name: str, setting: GradientSetting) -> str:
        return os.path.join(self.run_dir, "grads", set_name, setting.slug)

    def timings(self) -> dict:
        path = os.path.join(self.run_dir, TIMINGS)
        return read_json(path, "study timings", "delete it; it is rewritten") if os.path.isfile(path) else {}

    def add_time(self, key: str, seconds: float) -> None:
        t = self.timings()
        t[key] = t.get(key, 0.0) + float(seconds)
        atomic_write_json(os.path.join(self.run_dir, TIMINGS), t)

    # -- step 1: full gradients -------------------------------------------------------------------
    def gradients(self, setting: GradientSetting, deadline: float | None = None, sets=(TRAIN,) + TEST_SETS) -> bool:
        """Fill the full-gradient stores of `setting` for every set; False when stopped at `deadline`."""
        for set_name in sets:
            images = self.images[set_name]
            t0 = time.perf_counter()
            try:
                full_gradient_store(self.grad_path(set_name, setting), self.unet, self.scheduler, setting, images,
                                    _fingerprint(images), self.checkpoint, deadline=deadline)
            except Cancelled as e:
                print(e)
                return False
            finally:
                self.add_time(f"grads/{set_name}/{setting.slug}", time.perf_counter() - t0)
        return True

    def grads(self, set_name: str, setting: GradientSetting) -> np.ndarray:
        """The complete full-gradient matrix (memmap) of one set."""
        from dtrak_core.attribution.store import FeatureStore

        path = self.grad_path(set_name, setting)
        if not os.path.isdir(path):
            raise ValueError(f"no gradients at {path}; compute them with `python -m dtrak_core study "
                             f"gradients --output-fn {setting.output_fn}`")
        return FeatureStore.open(path, verify=False).features()


    # -- step 2: kernels ---------------------------------------------------------------------------
    def kernel_path(self, setting: GradientSetting, k: int | None) -> str:
        return os.path.join(self.run_dir, "kernels", f"{setting.slug}-{'exact' if k is None else f'sparse-jl-k{k}'}.npz")

    def kernels(self, setting: GradientSetting, k: int | None = None) -> dict:
        """Gram matrix of the training gradients and cross Gram matrices of both test sets, exact
        (k=None) or of sparse-JL projections to k (seed 42, as the stores), cached in the run folder."""
        from dtrak_core.files import load_result, save_result

        path = self.kernel_path(setting, k)
        if os.path.isfile(path):
            return load_result(path)
        train = self.grads(TRAIN, setting)
        queries = {name: self.grads(name, setting) for name in TEST_SETS}
        t0 = time.perf_counter()
        if k is None:
            out = {"train": gram(train), **{name: gram(q, train) for name, q in queries.items()}}
        else:
            from dtrak_core.attribution.projectors import make_projector

            out = projected_kernels(train, queries, make_projector("sparse-jl", train.shape[1], k, seed=42))
        out["seconds"] = np.float64(time.perf_counter() - t0)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_result(path, **out)
        return out

    # -- step 3: DAS residuals, EK-FAC curvature ---------------------------------------------------
    def residual_losses(self) -> np.ndarray:
        """(N, 100) eps-MSE of every training image at 100 timesteps (one noise draw), cached."""
        from dtrak_core.attribution.das import training_losses
        from dtrak_core.evaluation.lds_run import eval_timesteps
        from dtrak_core.files import load_result, save_result

        path = os.path.join(self.run_dir, "residuals.npz")
        if os.path.isfile(path):
            return load_result(path)["losses"]
        t0 = time.perf_counter()
        losses = training_losses(self.unet, self.scheduler, self.images[TRAIN], eval_timesteps(RESIDUAL_TIMESTEPS))
        save_result(path, losses=losses, seconds=np.float64(time.perf_counter() - t0))
        return losses

    def ekfac(self, samples: int = KFAC_SAMPLES):
        """The EK-FAC of the training loss's GGN (MC Fisher, `samples` draws per image per pass), cached."""
        import pickle

        from dtrak_core.attribution.kfac import EKFAC

        path = os.path.join(self.run_dir, f"ekfac-{samples}.pkl")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                return pickle.load(f)
        t0 = time.perf_counter()
        ekfac = EKFAC(samples=samples).fit(self.unet, self.scheduler, self.images[TRAIN])
        ekfac.fit_seconds_ = time.perf_counter() - t0
        from dtrak_core.files import atomic_write_bytes

        atomic_write_bytes(path, pickle.dumps(ekfac))
        return ekfac

    # -- step 4: LDS cells ----------------------------------------------------------------------
    def _sweep(self, g_fn, grid, num_bootstrap: int) -> dict:
        from dtrak_core.evaluation.lds import lambda_sweep

        return lambda_sweep(g_fn, {s: self.gt["F"][s] for s in TEST_SETS}, grid, num_bootstrap)

    def kernel_cell(self, kernels: dict, num_bootstrap: int, weights=None, power: int = 1,
                    positive: bool = False) -> dict:
        """TRAK (weights None, power 1) or DAS (residual weights, power 1 or 2) from kernels, every
        lambda of the ridge grid, honest and paper lambda (`lds.lambda_sweep`). positive: opponents'
        scores set to 0 before the power (a sharpening that keeps the proponents' ranking)."""
        from dtrak_core.evaluation.tables import LAMBDA_GRID

        t0 = time.perf_counter()
        kt = KernelTRAK().fit(kernels["train"])
        proj = {s: kt.project(kernels[s]) for s in TEST_SETS}
        fit_seconds = time.perf_counter() - t0
        masks = torch.as_tensor(self.gt["masks"], dtype=torch.float64)
        w = np.ones(len(kt.U_)) if weights is None else np.asarray(weights, dtype=np.float64)

        def transformed(scores):
            return (np.maximum(scores, 0) if positive else scores) ** power

        def g_fn(lam):
            if power == 1 and not positive:
                return {s: kt.subset_sums(masks, proj[s], lam, w) for s in TEST_SETS}
            return {s: (masks @ torch.as_tensor(transformed(kt.scores_from(proj[s], lam) * w)).T).numpy()
                    for s in TEST_SETS}

        out = self._sweep(g_fn, LAMBDA_GRID, num_bootstrap)
        t0 = time.perf_counter()
        for s in TEST_SETS:  # one lambda's full score matrices: the scoring cost a user pays
            kt.scores_from(proj[s], SHIPPED_LAMBDA)
        out["score_seconds"] = fit_seconds + time.perf_counter() - t0
        return out

    def ekfac_cell(self, ekfac, query: GradientSetting, train: GradientSetting, num_bootstrap: int) -> dict:
        """Influence q^T (G_ekfac + lam I)^-1 g_i over a damping grid relative to the mean eigenvalue."""
        t0 = time.perf_counter()
        masks = torch.as_tensor(self.gt["masks"], dtype=torch.float32)
        rot_train = _rotate_rows(ekfac, self.grads(TRAIN, train))
        summed = (masks @ rot_train).double()  # (M, d): masks @ training gradients, in the eigenbasis
        del rot_train
        rot_q = {s: _rotate_rows(ekfac, self.grads(s, query)).double() for s in TEST_SETS}
        prep_seconds = time.perf_counter() - t0
        eig = ekfac.eigenvalues_.double()
        scale = float(eig.mean())
        grid = tuple(scale * c for c in RELATIVE_DAMPING)
        out = self._sweep(lambda lam: {s: ((summed / (eig + lam)) @ rot_q[s].T).numpy() for s in TEST_SETS},
                          grid, num_bootstrap)
        out["relative_damping"] = {s: [lam / scale for lam in out[s]["honest"]["lambdas"]] for s in TEST_SETS}
        out["score_seconds"] = prep_seconds + ekfac.fit_seconds_
        return out

    def lds(self, num_bootstrap: int = 1000, only=None, redo: bool = False) -> dict:
        """Every cell whose inputs exist -> <run>/study.json and <run>/study.md, each written as soon as
        it is computed; cells already there are kept (recomputed with `redo`); missing inputs are listed."""
        from dtrak_core.attribution.das import residual_weights
        from dtrak_core.files import atomic_write_bytes, json_safe

        path = os.path.join(self.run_dir, RESULTS)
        previous = read_json(path, "study results", "delete it; `study lds` rewrites it") if os.path.isfile(path) else {}
        cells, missing = dict(previous.get("cells", {})), []
        timings = self.timings()

        computed = set()

        def save():
            import fcntl

            # other processes may add cells meanwhile: under a lock, keep theirs and add (or replace) ours
            with open(path + ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                on_disk = read_json(path, "study results", "delete it; `study lds` rewrites it") if os.path.isfile(path) else {}
                cells.update({**on_disk.get("cells", {}), **{n: cells[n] for n in computed}})
                merged = {"cells": cells, "missing": sorted(set(missing)), "subsets": int(len(self.gt["masks"])),
                          "num_bootstrap": num_bootstrap, "test_sets": {s: len(self.images[s]) for s in TEST_SETS}}
                atomic_write_json(path, json_safe(merged))
                atomic_write_bytes(os.path.join(self.run_dir, REPORT), format_report(merged).encode())
            return merged

        def grad_seconds(setting):
            keys = [f"grads/{s}/{setting.slug}" for s in (TRAIN,) + TEST_SETS]
            return sum(timings.get(k, 0.0) for k in keys) if all(k in timings for k in keys) else None

        def have(setting):
            return all(os.path.isfile(os.path.join(self.grad_path(s, setting), "metadata.json")) and
                       _complete(self.grad_path(s, setting)) for s in (TRAIN,) + TEST_SETS)

        def want(name):
            return only is None or any(name.startswith(o) for o in only)

        def todo(name):
            return want(name) and (redo or name not in cells)

        def done(name, cell):
            cells[name] = cell
            computed.add(name)
            save()
            print(name, {s: round(cell[s]["honest"]["lds"], 1) for s in TEST_SETS}, flush=True)

        exact_scores = {}
        for fn in ("square", "loss", "avg"):
            setting = GradientSetting(fn, 100)
            if not have(setting):
                missing.append(f"python -m dtrak_core study gradients --output-fn {fn}")
                continue
            for k in (None,) + SWEEPS[fn]:
                name = f"{fn}/{'exact' if k is None else f'k{k}'}"
                if not todo(name):
                    continue
                kern = self.kernels(setting, k)
                cell = self.kernel_cell(kern, num_bootstrap)
                cell["cost"] = {"gradient_seconds": grad_seconds(setting), "kernel_seconds": float(kern["seconds"]),
                                "score_seconds": cell.pop("score_seconds"),
                                "train_feature_mb": len(kern["train"]) * (self.grads(TRAIN, setting).shape[1]
                                                                          if k is None else k) * 4 / 2 ** 20}
                cell["spearman_vs_exact"] = self._spearman_vs_exact(setting, kern, exact_scores)
                done(name, cell)
        # DAS: the compressed output's features (avg; avg with unit timesteps) x residual weights
        losses = self.residual_losses() if want("das") else None
        for setting in (GradientSetting("avg", 100), GradientSetting("avg", 100, normalize_timesteps=True)):
            if not want("das"):
                break
            if not have(setting):
                missing.append("python -m dtrak_core study gradients --output-fn avg"
                               + (" --unit-timesteps" if setting.normalize_timesteps else ""))
                continue
            for k in (None, 2048):
                kern = self.kernels(setting, k)
                for variant, residual, power in (("das", "code", 1), ("das-squared", "code", 2), ("das-rms", "rms", 1),
                                                 ("trak-form", "none", 1)):
                    if variant == "trak-form" and not setting.normalize_timesteps:
                        continue  # avg/exact and avg/k2048 above
                    name = f"{variant}/{setting.slug}/{'exact' if k is None else f'k{k}'}"
                    if not todo(name):
                        continue
                    cell = self.kernel_cell(kern, num_bootstrap, residual_weights(losses, residual), power)
                    cell["cost"] = {"gradient_seconds": grad_seconds(setting), "kernel_seconds": float(kern["seconds"]),
                                    "score_seconds": cell.pop("score_seconds")}
                    done(name, cell)
        # Squared TRAK-form scores without DAS's residual: how much of DAS comes from squaring alone;
        # then squared proponent scores (opponents at 0), which keep the signed score's top proponents
        # and so its counterfactual removals: does the gain survive without ranking opponents up?
        for prefix, fns, positive in (("squared", ("square", "loss", "avg"), False),
                                      ("positive-squared", ("square", "avg"), True)):
            for fn in fns:
                setting = GradientSetting(fn, 100)
                for k in (None, 2048):
                    name = f"{prefix}/{fn}/{'exact' if k is None else f'k{k}'}"
                    if not todo(name) or not have(setting):
                        continue
                    kern = self.kernels(setting, k)
                    cell = self.kernel_cell(kern, num_bootstrap, None, 2, positive=positive)
                    cell["cost"] = {"gradient_seconds": grad_seconds(setting), "kernel_seconds": float(kern["seconds"]),
                                    "score_seconds": cell.pop("score_seconds")}
                    done(name, cell)
        # EK-FAC influence: measurement gradient x training-loss gradient (and D-TRAK-style pairs)
        if want("ekfac") and any(todo(f"ekfac/{q}-x-{t}") for q, t in EKFAC_PAIRS):
            ekfac = self.ekfac()
            for q_fn, t_fn in EKFAC_PAIRS:
                qs, ts = GradientSetting(q_fn, 100), GradientSetting(t_fn, 100)
                if not (have(qs) and have(ts)):
                    continue
                name = f"ekfac/{q_fn}-x-{t_fn}"
                if not todo(name):
                    continue
                cell = self.ekfac_cell(ekfac, qs, ts, num_bootstrap)
                cell["cost"] = {"gradient_seconds": (grad_seconds(qs) or 0) + (grad_seconds(ts) or 0 if ts != qs else 0),
                                "score_seconds": cell.pop("score_seconds"), "fit_seconds": ekfac.fit_seconds_}
                done(name, cell)
        return save()

    def _spearman_vs_exact(self, setting, kern, cache) -> dict | None:
        """Mean over queries of the Spearman between these scores and the exact ones at SHIPPED_LAMBDA."""
        from scipy.stats import rankdata

        exact_path = self.kernel_path(setting, None)
        if not os.path.isfile(exact_path):
            return None
        if setting not in cache:
            ex = self.kernels(setting, None)
            kt = KernelTRAK().fit(ex["train"])
            cache[setting] = {s: kt.scores(ex[s], SHIPPED_LAMBDA) for s in TEST_SETS}
        kt = KernelTRAK().fit(kern["train"])
        out = {}
        for s in TEST_SETS:
            a, b = rankdata(kt.scores(kern[s], SHIPPED_LAMBDA), axis=1), rankdata(cache[setting][s], axis=1)
            a -= a.mean(1, keepdims=True)
            b -= b.mean(1, keepdims=True)
            out[s] = float(np.mean((a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))))
        return out


# (cell, label) rows that `publish` copies into the committed tables, in this order, when computed
PUBLISHED = (
    ("square/k2048", "D-TRAK, sparse JL k=2048 (the shipped setting)"),
    ("square/k32768", "D-TRAK, sparse JL k=32768"),
    ("square/exact", "D-TRAK, exact (no projection)"),
    ("loss/exact", "TRAK, exact"),
    ("avg/k2048", "D-TRAK (Avg), sparse JL k=2048"),
    ("avg/exact", "D-TRAK (Avg), exact"),
    ("das-squared/avg-K100-full/k2048", "DAS, the paper's squared score, k=2048 (the registry's `das`)"),
    ("das-squared/avg-K100-full/exact", "DAS, squared, exact"),
    ("das-squared/avg-K100-unit-full/exact", "DAS, squared, unit-norm timesteps (public code), exact"),
    ("das/avg-K100-full/k2048", "DAS, signed (the public code's DAS1), k=2048"),
    ("das/avg-K100-full/exact", "DAS, signed, exact"),
    ("squared/square/k2048", "squared D-TRAK scores (no residual), k=2048"),
    ("squared/square/exact", "squared D-TRAK scores, exact"),
    ("squared/loss/exact", "squared TRAK scores, exact"),
    ("positive-squared/square/k2048", "squared D-TRAK proponent scores (opponents 0), k=2048"),
    ("positive-squared/square/exact", "squared D-TRAK proponent scores (opponents 0), exact"),
    ("positive-squared/avg/k2048", "squared avg proponent scores (opponents 0), k=2048"),
    ("ekfac/loss-x-loss", "EK-FAC influence, loss x loss"),
    ("ekfac/square-x-loss", "EK-FAC influence, square measurement x loss"),
    ("ekfac/square-x-square", "EK-FAC influence, square x square"),
    ("ekfac/avg-x-avg", "EK-FAC influence, avg x avg"),
)


def publish(run_dir: str = DEFAULT_RUN, dest: str = os.path.join("assets", "benchmarks")) -> dict:
    """Copy <run>/study.json (sealed: the app verifies it) and study.md to `dest` and the PUBLISHED
    rows into dest/tables.json (key "beyond"), then rewrite dest/tables.md from it."""
    from dtrak_core.checksums import write_sealed_json
    from dtrak_core.evaluation.tables_report import BEYOND, load_tables
    from dtrak_core.evaluation.tables_report import REPORT as TABLES_REPORT
    from dtrak_core.evaluation.tables_report import TABLES as TABLES_JSON
    from dtrak_core.evaluation.tables_report import format_report as tables_report
    from dtrak_core.files import atomic_write_bytes

    path = os.path.join(run_dir, RESULTS)
    if not os.path.isfile(path):
        raise ValueError(f"no {path}; compute it with `python -m dtrak_core study lds`")
    study = read_json(path, "study results", "rerun `python -m dtrak_core study lds`")
    cells = study["cells"]
    tables_path = os.path.join(dest, TABLES_JSON)
    t = load_tables(tables_path)
    if t is None:
        raise ValueError(f"no {tables_path}; write the tables first with `python -m dtrak_core lds tables`")
    residual_seconds = 0.0
    if os.path.isfile(os.path.join(run_dir, "residuals.npz")):
        from dtrak_core.files import load_result

        residual_seconds = float(load_result(os.path.join(run_dir, "residuals.npz"))["seconds"])
    rows = []
    for name, label in PUBLISHED:
        c = cells.get(name)
        if c is None:
            continue
        cost = c["cost"]
        scoring = cost["score_seconds"] + cost.get("kernel_seconds", 0.0) + (residual_seconds if name.startswith("das") else 0.0)
        rows.append({"cell": name, "label": label, "validation": c["validation"], "generated": c["generated"],
                     "feature_seconds": cost["gradient_seconds"] or 0.0, "scoring_seconds": scoring})
    t[BEYOND] = {"rows": rows, "source": "python -m dtrak_core study lds, then publish"}
    write_sealed_json(tables_path, t)  # its checksum in it (the app verifies it)
    atomic_write_bytes(os.path.join(dest, TABLES_REPORT), tables_report(t).encode())
    write_sealed_json(os.path.join(dest, RESULTS), study)
    with open(os.path.join(run_dir, REPORT), "rb") as f:
        atomic_write_bytes(os.path.join(dest, REPORT), f.read())
    return t[BEYOND]


def _complete(path: str) -> bool:
    from dtrak_core.attribution.store import FeatureStore

    return FeatureStore.open(path, verify=False).complete


def _rotate_rows(ekfac, grads, rows: int = 256) -> torch.Tensor:
    """EK-FAC eigenbasis coordinates (n, d) float32 of stored gradients, `rows` at a time."""
    return torch.cat([ekfac.rotate(np.asarray(grads[i:i + rows])) for i in range(0, len(grads), rows)])


def _cell_text(cell: dict, s: str) -> str:
    c = cell[s]
    return f"{c['honest']['lds']:.1f} ± {c['honest']['pm']:.1f} ({c['paper']['lds']:.1f})"


def format_report(results: dict) -> str:
    """study.json as Markdown: LDS per cell (honest ± pm (paper)) and its cost."""
    cells = results["cells"]
    lines = ["# Attribution quality per compute (embedded default)", "",
             f"LDS x 100 against the committed ground truth ({results['subsets']} subsets, "
             f"{results['test_sets']['validation']} validation digits, {results['test_sets']['generated']} generated "
             f"samples); cells read `honest ± pm (paper)`: honest = lambda (or damping) cross-fitted over test samples, "
             f"(paper) = best on the reported samples. Seconds on one thread of the shared machine.", ""]
    kfs = [n for n in cells if n.count("/") == 1 and not n.startswith(("ekfac", "das"))]
    if kfs:
        lines += ["## TRAK kernels: exact vs sparse-JL projection to k", "",
                  "| output fn | k | validation | generated | Spearman vs exact at λ=0.05 (val / gen) | "
                  "projection + Gram s | score s | train features MB |", "|---|---|---|---|---|---|---|---|"]
        for n in sorted(kfs, key=lambda n: (n.split("/")[0], float("inf") if n.endswith("exact") else int(n.split("/k")[1]))):
            c = cells[n]
            sp = c.get("spearman_vs_exact")
            sp_text = f"{sp['validation']:.3f} / {sp['generated']:.3f}" if sp else "-"
            fn, k = n.split("/")
            lines.append(f"| {fn} | {k} | {_cell_text(c, 'validation')} | {_cell_text(c, 'generated')} | {sp_text} | "
                         f"{c['cost']['kernel_seconds']:.1f} | {c['cost']['score_seconds']:.1f} | "
                         f"{c['cost']['train_feature_mb']:.0f} |")
        lines.append("")
    das = [n for n in cells if n.startswith(("das", "trak-form", "squared", "positive-squared"))]
    if das:
        lines += ["## DAS (avg output, residual-weighted) and squared TRAK-form scores", "",
                  "| variant | features | validation | generated | score s |",
                  "|---|---|---|---|---|"]
        for n in sorted(das):
            variant, feats, k = n.split("/")
            feats = feats if "-K" in feats else f"{feats}-K100-full"
            lines.append(f"| {variant} | {feats} {k} | {_cell_text(cells[n], 'validation')} | "
                         f"{_cell_text(cells[n], 'generated')} | {cells[n]['cost']['score_seconds']:.1f} |")
        lines.append("")
    ek = [n for n in cells if n.startswith("ekfac")]
    if ek:
        lines += ["## EK-FAC influence (measurement gradient x training gradient)", "",
                  "| pair | validation | generated | chosen damping / mean eigenvalue (val; gen) | fit s | score s |",
                  "|---|---|---|---|---|---|"]
        for n in sorted(ek):
            c = cells[n]
            rd = c.get("relative_damping", {})
            rd_text = "; ".join("/".join(f"{v:g}" for v in rd.get(s, [])) for s in TEST_SETS)
            lines.append(f"| {n.split('/')[1]} | {_cell_text(c, 'validation')} | {_cell_text(c, 'generated')} | "
                         f"{rd_text} | {c['cost']['fit_seconds']:.0f} | {c['cost']['score_seconds']:.0f} |")
        lines.append("")
    if results.get("missing"):
        lines += ["Missing inputs: " + "; ".join(f"`{m}`" for m in results["missing"]), ""]
    return "\n".join(lines)


def run_step(args) -> None:
    """One step of the study (`python -m dtrak_core study STEP`, the options as cli.py defines them)."""
    run = DEFAULT_RUN if args.run is None else args.run
    samples = KFAC_SAMPLES if args.samples is None else args.samples
    torch.set_num_threads(args.threads)
    deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
    if args.step == "publish":
        for row in publish(run)["rows"]:
            print(row["label"], {s: round(row[s]["honest"]["lds"], 1) for s in TEST_SETS})
        return
    study = Study(run, args.root)
    if args.step == "gradients":
        for fn in args.output_fn:
            if not study.gradients(GradientSetting(fn, args.K, args.unit_timesteps), deadline):
                return
        print("gradients complete")
    elif args.step == "kernels":
        ks = [None] + list(K_SWEEP) if args.k is None else [None if k == "exact" else int(k) for k in args.k]
        for fn in args.output_fn:
            for k in ks:
                if deadline is not None and time.monotonic() > deadline:
                    print("stopped at the time limit; run again to continue")
                    return
                setting = GradientSetting(fn, args.K, args.unit_timesteps)
                print(study.kernel_path(setting, k), float(study.kernels(setting, k)["seconds"]), flush=True)
    elif args.step == "residuals":
        print(study.residual_losses().shape)
    elif args.step == "kfac":
        print(f"EK-FAC fitted in {study.ekfac(samples).fit_seconds_:.0f} s")
    else:
        print(format_report(study.lds(args.bootstrap, args.only, args.redo)))
