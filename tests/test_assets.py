"""The committed assets/ are consistent with the code that built them."""
import json
import os

import numpy as np
import pytest
import torch

from dtrak_core.attribution.attributor import Attributor
from dtrak_core.attribution.features import Featurizer
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.model.unet import checkpoint_hash

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(ASSETS, "manifest.json")),
                                reason="assets/ not built (python -m dtrak_core build-default)")


@pytest.fixture(scope="module")
def attributor():
    return Attributor.load(ASSETS)


def test_manifest_matches_checkpoint_and_stores(attributor):
    with open(os.path.join(ASSETS, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["checkpoint_hash"] == checkpoint_hash(attributor.unet)
    assert {"square", "loss"} <= set(attributor.methods)
    for rel in manifest["stores"]:
        store = FeatureStore.open(os.path.join(ASSETS, rel))  # verifies sha256 and identity fields exist
        assert store.complete and store.metadata["n"] == len(attributor.train)


@pytest.mark.parametrize("method", ["square", "loss"])
def test_stored_rows_match_recomputed_features(attributor, method):
    setting, store = attributor.setting(method)
    rows = [0, 777, 1499]
    fresh = Featurizer(attributor.unet, attributor.scheduler, setting)(attributor.train.images[rows]).numpy()
    stored = np.asarray(store.features()[rows])
    # Recomputed in a different batch than the store's slices: equal up to float reassociation.
    np.testing.assert_allclose(fresh, stored, rtol=1e-3, atol=1e-4 * np.abs(stored).max())


def test_a_training_image_is_its_own_top_proponent(attributor):
    idx = [3, 500, 1200]
    scores = attributor.scores(attributor.train.images[idx], "d-trak")
    for row, i in zip(scores, idx):
        assert i in np.argsort(-row)[:5]


@pytest.mark.slow
def test_default_checkpoint_rebuilds_bit_identical():
    """Training the default again from the code gives the committed weights (about 80 s on 2 cores)."""
    from dtrak_core.build import BUILD_THREADS, DEFAULT_TRAIN_CONFIG
    from dtrak_core.model.data import load_digits
    from dtrak_core.model.training import train
    from dtrak_core.model.unet import build_scheduler

    with open(os.path.join(ASSETS, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["train_config"] == json.loads(json.dumps(DEFAULT_TRAIN_CONFIG.to_dict()))
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        unet = train(load_digits("train").images, build_scheduler(), DEFAULT_TRAIN_CONFIG, show_bar=False)
    finally:
        torch.set_num_threads(threads)
    assert checkpoint_hash(unet) == manifest["checkpoint_hash"]


def test_committed_counterfactual_results_belong_to_this_model(attributor):
    """The committed remove-and-retrain jobs were made with this model, recipe and stores (so the app
    may serve them), their rankings are reproduced by the committed stores, and summary.json is
    what they summarize to."""
    from dtrak_core.evaluation import counterfactual as cf
    from dtrak_core.evaluation.counterfactual_report import summarize

    folder = os.path.join(ASSETS, "counterfactual")
    if not os.path.isfile(os.path.join(folder, "summary.json")):
        pytest.skip("no committed counterfactual results")
    jobs = os.path.join(folder, "jobs")
    found = cf.committed_results(attributor, jobs, cf.train_config_from_manifest(ASSETS))
    assert len(found) == len([f for f in os.listdir(jobs) if f.endswith(".npz") and f != f"{cf.CONTROL_ID}.npz"])
    seed, k = cf.TARGET_SEED_START, 300
    job = cf.load_job(found[(seed, "square", k)])
    before = cf.sample(attributor.unet, attributor.scheduler, seed)
    assert torch.allclose(before, job.before, atol=1e-4)
    removed = cf.removal(attributor, before, seed, "square", k)
    assert len(set(removed.tolist()) & set(job.removed_indices.tolist())) >= 0.98 * k  # float ties at the cut
    with open(os.path.join(folder, "summary.json")) as f:
        committed = json.load(f)
    fresh = json.loads(json.dumps(summarize(jobs, attributor.train.labels.numpy())))
    assert [(c["ranking"], c["k"], c["l2"]) for c in fresh["cells"]] == \
        [(c["ranking"], c["k"], c["l2"]) for c in committed["cells"]]


def test_committed_results_carry_their_writers_checksums():
    """The app shows the committed counterfactual jobs, gallery and summary and the benchmark tables
    only as their writers wrote them: each verifies against its recorded checksum."""
    from dtrak_core import checksums
    from dtrak_core.evaluation import counterfactual as cf
    from dtrak_core.evaluation.counterfactual_report import read_gallery, read_summary
    from dtrak_core.evaluation.tables_report import load_tables

    folder = os.path.join(ASSETS, "counterfactual")
    if not os.path.isfile(os.path.join(folder, "summary.json")):
        pytest.skip("no committed counterfactual results")
    jobs = os.path.join(folder, "jobs")
    recorded = checksums.read_sidecar(jobs)
    assert set(recorded) == {f for f in os.listdir(jobs) if f.endswith(".npz")} | {"identity.json"}
    for name in recorded:
        checksums.verify(os.path.join(jobs, name), "counterfactual job result", cf.job_remedy(name))
    entries = read_gallery(os.path.join(folder, "gallery"))
    assert entries and all(os.path.isfile(e["after_png"]) for e in entries)
    assert read_summary(os.path.join(folder, "summary.json"))["cells"]
    assert load_tables(os.path.join(ASSETS, "benchmarks", "tables.json"), required=True)["methods"]


def test_committed_lds_tables_recompute_from_the_ground_truth(attributor):
    """Anyone can score a method against the committed ground truth without retraining: raw-pixel
    cosine and the noise ceiling recomputed from lds_ground_truth.npz equal tables.json."""
    from dtrak_core.evaluation.lds import lds, load_ground_truth, noise_ceiling
    from dtrak_core.model.data import load_digits

    bench = os.path.join(ASSETS, "benchmarks")
    if not os.path.isfile(os.path.join(bench, "tables.json")):
        pytest.skip("no committed LDS tables")
    gt = load_ground_truth(os.path.join(bench, "lds_ground_truth.npz"))
    with open(os.path.join(bench, "tables.json")) as f:
        tables = json.load(f)
    train = attributor.train.images.flatten(1).double().numpy()
    queries = {"validation": load_digits("validation").images.flatten(1).double().numpy(),
               "generated": gt["generated_images"].reshape(len(gt["generated_images"]), -1).astype(np.float64)}
    for name, q in queries.items():
        cosine = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (train / np.linalg.norm(train, axis=1, keepdims=True)).T
        value, pm = lds(cosine, gt["masks"], gt["F"][name])
        assert value == pytest.approx(tables["methods"]["pixel-cosine"][name]["lds"], abs=1e-6)
        ceiling = noise_ceiling(gt["F_seeds"][name])
        assert ceiling["seed_vs_seed"] == pytest.approx(tables["noise_ceiling"][name]["seed_vs_seed"], abs=1e-6)
