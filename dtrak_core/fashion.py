"""The Fashion-MNIST model folder (assets/fashion), built from Debian's dataset-fashion-mnist by one
resumable command:

    apt-get install dataset-fashion-mnist
    python -m dtrak_core build-fashion                  # every stage; rerun to resume
    python -m dtrak_core build-fashion --stage lds      # one stage (data, classifier, model, folder, tracin, lds,
                                                        # ceiling, counterfactual)

The setting is the preset `fashion-mnist` (dtrak_core/configs/fashion-mnist.json): the data, the UNet,
the recipe, the stores and the LDS / counterfactual protocol. What the folder holds, all committed
but the retrained models:

    data/train/<class>/*.png, data/validation/<class>/*.png   the subset (the app and tests need no package)
    classifier/        a small CNN trained on Fashion-MNIST images outside the subset (sample quality)
    model/             the base model (diffusers unet/ + scheduler/, setting.json)
    manifest.json, stores/     the model folder (`build`): D-TRAK, TRAK and avg stores (float16)
    das_residuals.npz  DAS's training losses (`build-das`)
    tracin/            TracInCP's and GAS's checkpoints of the replayed training run and their stores
    lds/               `lds-own` run: jobs.json, per-checkpoint ground truth, tables.md / tables.json
    lds-ceiling/       its first 8 subsets with a second training seed (`noise_ceiling`)
    counterfactual/    `counterfactual-own` run: removals.json, per-job results, results.md

Retrained models go to lds-models/, lds-ceiling-models/ and counterfactual-models/ (git-ignored);
each is measured as soon as it is trained, so its small result file (committed) is what lasts; a
killed run loses at most the model in training.
"""
from __future__ import annotations

import os
import time

import numpy as np

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"  # where Debian's package installs the IDX files
DEFAULT_ROOT = os.path.join("assets", "fashion")
PRESET = "fashion-mnist"
STAGES = ("data", "classifier", "model", "folder", "tracin", "lds", "ceiling", "counterfactual")
CEILING_SUBSETS, CEILING_SEED = 8, 2  # the first 8 LDS subsets retrained with a second seed: the noise ceiling
CLASSIFIER_PER_CLASS = None  # training images per class for the quality classifier (None: all), none in the subset
QUALITY_SEEDS = range(100)
# CPU training is bit-deterministic for a seed only at a fixed thread count; one thread is also the
# fastest way to run two jobs side by side on 2 cores (two threads each oversubscribe them)
BUILD_THREADS = 1


def _setting():
    from dtrak_core.setting import load_setting

    return load_setting(PRESET)


def classifier_data(setting, source: str):
    """((train images, labels), (test images, labels)) for the quality classifier: training-split
    images that are not in the setting's subset, and the test split without its validation picks;
    images (N, 1, 28, 28) float32 in [-1, 1]."""
    import torch

    from dtrak_core.model.idx import read_images_and_labels
    from dtrak_core.setting import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, selected

    d = setting.data
    out = []
    for split, per_class, take in (("train", int(d["train_per_class"]), CLASSIFIER_PER_CLASS),
                                   ("test", int(d["validation_per_class"]), None)):
        images, labels = read_images_and_labels(*(os.path.join(source, f) for f in FASHION_MNIST_FILES[split]))
        keep = []
        for c, name in enumerate(FASHION_MNIST_CLASSES):
            if name not in d["classes"]:
                continue
            members = np.flatnonzero(labels == c)
            rest = np.delete(members, selected(int(d["selection_seed"]), c, len(members), per_class))
            keep.append(rest[:take])
        idx = np.sort(np.concatenate(keep))
        x = torch.from_numpy(images[idx].astype(np.float32) / 127.5 - 1.0)[:, None]
        # labels in the data folder's order (sorted class names), as the model folder's training set has them
        y = torch.as_tensor([sorted(d["classes"]).index(FASHION_MNIST_CLASSES[c]) for c in labels[idx]])
        out.append((x, y))
    return out


def build_classifier(root: str, source: str, setting=None) -> dict:
    """The quality classifier in root/classifier (reused when present); its card."""
    import torch

    from dtrak_core.model.classifier import CARD, ImageClassifier

    folder = os.path.join(root, "classifier")
    if os.path.isfile(os.path.join(folder, CARD)):
        return ImageClassifier.load(folder).card
    setting = setting or _setting()
    (x, y), (xt, yt) = classifier_data(setting, source)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a fixed thread count: the same weights on every machine with this torch
    try:
        t0 = time.perf_counter()
        clf = ImageClassifier(sorted(setting.data["classes"]), setting.resolution).fit(x, y)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    clf.card = {"trained_on": f"{len(x)} Fashion-MNIST training images, none in the attributed subset",
                "accuracy": clf.accuracy(xt, yt), "tested_on": f"{len(xt)} test-split images, none a validation query",
                "train_seconds": seconds}
    clf.save(folder)
    return clf.card


def compact_stores(root: str) -> None:
    """The folder's stores as float16: half the size; the TRAK scores of 40 training images as queries
    keep a Spearman of 1.0000 with the float32 stores' and the same top 10 (measured once, for all
    three stores)."""
    from dtrak_core.attribution.store import compact_store
    from dtrak_core.folder import ModelFolder

    for rel in ModelFolder.load(root).stores or []:
        compact_store(os.path.join(root, rel))


def build_das(root: str) -> None:
    """DAS's training losses in the folder (`build-das`), so DAS runs in the app and the LDS."""
    from dtrak_core.attribution.attributor import Attributor
    from dtrak_core.attribution.das import build_residuals

    build_residuals(Attributor.load(root))


def measure_quality(root: str) -> dict:
    """Sample quality of the base model (DDIM 50, seeds 0..99) by the folder's classifier, into the manifest."""
    from dtrak_core.evaluation.quality import sample_quality
    from dtrak_core.folder import ModelFolder
    from dtrak_core.model.classifier import ImageClassifier
    from dtrak_core.model.sampling import generate

    folder = ModelFolder.load(root)
    unet, scheduler = folder.load_model()
    samples = generate(unet, scheduler, QUALITY_SEEDS)
    clf = ImageClassifier.load(os.path.join(root, "classifier"))
    quality = {"seeds": f"0..{len(QUALITY_SEEDS) - 1}", "sampler": "ddim-50", "classifier": "classifier/",
               "classifier_accuracy": clf.card.get("accuracy"), **sample_quality(samples, clf)}
    ModelFolder.edit(root, quality=quality)
    return quality


def build_fashion(root: str = DEFAULT_ROOT, source: str = DEFAULT_SOURCE, stages=STAGES, shard=(0, 1),
                  show_bar: bool = True) -> None:
    """Run `stages` in order (each resumes what an earlier run finished). `shard`: this process's
    share of the retrains (i, n), so two processes can train side by side."""
    from dtrak_core import setting as st
    from dtrak_core.attribution.store import compact_store

    setting = _setting()
    data, model = os.path.join(root, "data"), os.path.join(root, "model")
    for stage in stages:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        t0 = time.perf_counter()
        if stage == "data":
            st.write_data(setting, source, data)
        elif stage == "classifier":
            print(build_classifier(root, source, setting))
        elif stage == "model":
            _with_build_threads(lambda: st.train_base(setting, data, model, show_bar=show_bar))
        elif stage == "folder":
            st.build_folder(setting, data, model, root, show_bar=show_bar)
            compact_stores(root)
            print(measure_quality(root))
            build_das(root)
        elif stage == "tracin":
            entry = _with_build_threads(lambda: st.build_baselines(root, show_bar=show_bar))
            for c in entry["checkpoints"]:  # float16: TracInCP's and GAS's LDS unchanged to 0.01 (measured once)
                compact_store(os.path.join(root, c["store"]))
        elif stage == "lds":
            _lds(setting, root, data, shard, show_bar)
        elif stage == "ceiling":
            _ceiling(setting, root, data, shard, show_bar)
        elif stage == "counterfactual":
            _counterfactual(setting, root, data, shard, show_bar)
        print(f"{stage}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def _with_build_threads(run):
    """run() on BUILD_THREADS threads: the base model's training and its replays must share them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def train_and_measure(setting, data, jobs_path: str, ckpts: str, shard, measure) -> None:
    """This shard's jobs one at a time: retrain, then measure at once, so every finished model leaves
    its small committed result file (the retrained models themselves are not kept in git)."""
    from dtrak_core import setting as st
    from dtrak_core.files import read_json

    def read_jobs():
        return read_json(jobs_path, "retrain jobs", "rerun the stage's prepare step")["jobs"]

    jobs = read_jobs()
    results = os.path.join(os.path.dirname(jobs_path), "jobs")
    i, n = shard
    for k in range(i, len(jobs), n):
        if os.path.isfile(os.path.join(results, f"{jobs[k]['id']}.npz")):
            continue  # measured (its model need not be here any more)
        one = (k, len(read_jobs()))  # a shard of exactly job k, also when another process appended jobs meanwhile
        st.retrain(setting, data, jobs_path, ckpts, shard=one, show_bar=False)
        measure(one)


def _lds(setting, root, data, shard, show_bar):
    from dtrak_core.evaluation import lds_own

    out, ckpts = os.path.join(root, "lds"), os.path.join(root, "lds-models")
    if not os.path.isfile(os.path.join(out, lds_own.JOBS)):
        lds_own.prepare(root, out, setting.lds_config, validation=os.path.join(data, "validation"))
    train_and_measure(setting, data, os.path.join(out, lds_own.JOBS), ckpts, shard,
                      lambda one: lds_own.ground_truth(root, out, ckpts, shard=one, show_bar=False))


def _ceiling(setting, root, data, shard, show_bar):
    """The first CEILING_SUBSETS subsets of the LDS run retrained with a second seed (lds-ceiling/),
    so `noise_ceiling` can say how well one seed's ground truth predicts another's."""
    from dataclasses import replace

    from dtrak_core.evaluation import lds_own
    from dtrak_core.files import load_result

    out, ckpts = os.path.join(root, "lds-ceiling"), os.path.join(root, "lds-ceiling-models")
    if not os.path.isfile(os.path.join(out, lds_own.JOBS)):
        masks = load_result(os.path.join(root, "lds", lds_own.MASKS), keys=("masks",))["masks"][:CEILING_SUBSETS]
        os.makedirs(out, exist_ok=True)
        given = os.path.join(out, "subsets.npy")
        np.save(given, masks)
        lds_own.prepare(root, out, replace(setting.lds_config, train_seeds=(CEILING_SEED,)), masks=given,
                        validation=os.path.join(data, "validation"))
    train_and_measure(setting, data, os.path.join(out, lds_own.JOBS), ckpts, shard,
                      lambda one: lds_own.ground_truth(root, out, ckpts, shard=one, show_bar=False))


def noise_ceiling(root: str = DEFAULT_ROOT, num_bootstrap: int = 1000) -> dict:
    """{test set: `lds.noise_ceiling`} of the LDS run (lds/) against the ceiling run's second seed
    (lds-ceiling/) on the subsets both have finished (at least 3)."""
    from dtrak_core.evaluation.lds_own_report import paired_noise_ceiling

    return paired_noise_ceiling(os.path.join(root, "lds"), os.path.join(root, "lds-ceiling"), num_bootstrap)


def _counterfactual(setting, root, data, shard, show_bar):
    from dtrak_core.evaluation import lds_own

    cf = setting.counterfactual
    out, ckpts = os.path.join(root, "counterfactual"), os.path.join(root, "counterfactual-models")
    seeds = range(int(cf["first_seed"]), int(cf["first_seed"]) + int(cf["targets"]))
    # a plan with a ranking added since the run was prepared gets its jobs appended
    lds_own.counterfactual_prepare(root, out, seeds, rankings=tuple(cf["rankings"]), ks=tuple(cf["k"]))
    train_and_measure(setting, data, os.path.join(out, "removals.json"), ckpts, shard,
                      lambda one: lds_own.counterfactual_measure(root, out, ckpts, shard=one, show_bar=False))
