import json
import os

import numpy as np
import pytest

from dtrak_core.attribution import chunked
from dtrak_core.attribution.chunked import KERNEL, ChunkedTRAKScorer
from dtrak_core.attribution.features import FeatureSetting
from dtrak_core.attribution.scoring import TRAKScorer, top_k
from dtrak_core.attribution.store import FeatureStore
from dtrak_core.errors import IntegrityError

IDENTITY = FeatureStore.identity(FeatureSetting("square", K=4, k=32), checkpoint="c0ffee", dataset="d4t4")


def make_store(path, phi, dtype="float32", slice_size=7):
    store = FeatureStore.create(str(path), IDENTITY, n=len(phi), k=phi.shape[1], slice_size=slice_size, dtype=dtype)
    return store.fill(lambda rows: rows, phi, show_bar=False)


def features(n, k, seed=0):
    return np.random.default_rng(seed).normal(size=(n, k)).astype(np.float32)


@pytest.mark.parametrize("n,k", [(50, 12), (9, 20), (33, 33)])
def test_scores_equal_trak_scorer_in_float64(tmp_path, n, k):
    phi = features(n, k)
    q = np.random.default_rng(1).normal(size=(3, k)).astype(np.float32)
    store = make_store(tmp_path / "s", phi)
    chunked = ChunkedTRAKScorer(compute_dtype="float64", chunk_rows=4).fit(store)  # many chunks, a ragged last
    dense = TRAKScorer().fit(phi)
    assert chunked.lam_ == pytest.approx(dense.lam_, rel=1e-12)
    np.testing.assert_allclose(chunked.scores(q), dense.scores(q), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(chunked.scores(q[0]), dense.scores(q[0]), rtol=1e-9, atol=1e-11)


def test_float32_compute_and_float16_store_match_to_their_rounding(tmp_path):
    phi, q = features(200, 16), features(2, 16, seed=3)
    dense = TRAKScorer(lam=5.0).fit(phi).scores(q)
    got32 = ChunkedTRAKScorer(lam=5.0, chunk_rows=64).fit(make_store(tmp_path / "a", phi)).scores(q)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, dense, rtol=1e-4, atol=1e-5 * np.abs(dense).max())
    half = phi.astype(np.float16)
    store16 = make_store(tmp_path / "b", phi, dtype="float16")
    assert store16.features().dtype == np.float16
    np.testing.assert_array_equal(store16.features(), half)
    got16 = ChunkedTRAKScorer(lam=5.0, chunk_rows=64, compute_dtype="float64").fit(store16).scores(q)
    np.testing.assert_allclose(got16, TRAKScorer(lam=5.0).fit(half.astype(np.float32)).scores(q), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("threads", [1, 2])
def test_top_k_equals_sorting_all_scores_including_ties(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 3 * 8 * 4)  # 3-row blocks: workers split every chunk
    rng = np.random.default_rng(4)
    phi = rng.normal(size=(101, 8)).astype(np.float32)
    phi[60:70] = phi[5]  # ten rows tied with row 5, across chunks
    phi[80:90] = -phi[5]
    phi[95:] = np.round(phi[95:])  # and a few with integer features, ties of other values
    store = make_store(tmp_path / "s", phi)
    scorer = ChunkedTRAKScorer(compute_dtype="float64", chunk_rows=16, threads=threads).fit(store)
    q = np.stack([phi[5], rng.normal(size=8), np.ones(8), -phi[5]]).astype(np.float32)
    full = scorer.scores(q)
    np.testing.assert_allclose(full, TRAKScorer(lam=scorer.lam_).fit(phi).scores(q), rtol=1e-9, atol=1e-11)
    for n in (1, 3, 10, 11, 12, 16, 17, 101):
        pro, opp, pro_s, opp_s = scorer.top_k(q, n, return_scores=True)
        for r in range(len(q)):
            want_pro, want_opp = top_k(full[r], n)
            np.testing.assert_array_equal(pro[r], want_pro)
            np.testing.assert_array_equal(opp[r], want_opp)
            np.testing.assert_array_equal(pro_s[r], full[r][want_pro])
            np.testing.assert_array_equal(opp_s[r], full[r][want_opp])
    with pytest.raises(ValueError, match="n must be"):
        scorer.top_k(q, 0)


def test_threads_blocks_and_chunks_do_not_change_the_scores(tmp_path, monkeypatch):
    # a float16 store scored by 1..3 workers in blocks of 5 rows and chunks of any size: every
    # layout gives the scores of the dense in-memory formula (to float32 rounding) and the same top-k
    monkeypatch.setattr(chunked, "BLOCK_BYTES", 5 * 24 * 2)
    phi = features(1000, 24).astype(np.float16)
    store = make_store(tmp_path / "s", phi, dtype="float16", slice_size=256)
    q = features(3, 24, seed=5)
    dense = TRAKScorer(lam=2.0).fit(phi.astype(np.float32)).scores(q)
    base = ChunkedTRAKScorer(lam=2.0, threads=1, save_kernel=False).fit(store)
    got = base.scores(q)
    np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-5 * np.abs(dense).max())
    want = [top_k(row, 7) for row in got]
    for threads, chunk_rows in ((2, None), (2, 64), (3, 33), (1, 999)):
        scorer = ChunkedTRAKScorer(lam=2.0, threads=threads, chunk_rows=chunk_rows, save_kernel=False).fit(store)
        np.testing.assert_allclose(scorer.scores(q), got, rtol=1e-6, atol=1e-6 * np.abs(got).max())
        pro, opp = scorer.top_k(q, 7)
        for r in range(len(q)):
            np.testing.assert_array_equal(pro[r], want[r][0])
            np.testing.assert_array_equal(opp[r], want[r][1])
    with pytest.raises(ValueError, match="threads"):
        ChunkedTRAKScorer(threads=0).fit(phi)


def test_kernel_is_saved_reused_refactorised_and_verified(tmp_path):
    phi, q = features(40, 6), features(1, 6, seed=2)
    store = make_store(tmp_path / "s", phi)
    first = ChunkedTRAKScorer(lam=2.0).fit(store)
    assert first.kernel_source_ == "computed" and os.path.isfile(tmp_path / "s" / KERNEL)
    again = ChunkedTRAKScorer(lam=2.0).fit(store)
    assert again.kernel_source_ == "loaded"
    np.testing.assert_array_equal(again.scores(q), first.scores(q))
    other = ChunkedTRAKScorer(lam=3.0).fit(store)
    assert other.kernel_source_ == "refactorised"
    np.testing.assert_allclose(other.scores(q), TRAKScorer(lam=3.0).fit(phi).scores(q), rtol=1e-4, atol=1e-6)
    assert ChunkedTRAKScorer(lam=3.0, compute_dtype="float64").fit(store).kernel_source_ == "computed"
    # a store rebuilt with other features makes the saved kernel stale, not an error
    with np.load(tmp_path / "s" / KERNEL) as z:
        saved = {name: z[name] for name in z.files}
    record = json.loads(saved["record"].tobytes())
    make_store(tmp_path / "t", phi + 1)
    os.replace(tmp_path / "s" / KERNEL, tmp_path / "t" / KERNEL)
    assert ChunkedTRAKScorer(lam=3.0, compute_dtype="float64").fit(str(tmp_path / "t")).kernel_source_ == "computed"

    path = tmp_path / "s" / KERNEL

    def write(**arrays):
        np.savez(path, **{**saved, **arrays})

    write(gram=saved["gram"] + 1e-9)  # an edited array
    with pytest.raises(IntegrityError, match="sha256") as e:
        ChunkedTRAKScorer(lam=3.0, compute_dtype="float64").fit(store)
    assert KERNEL in str(e.value) and "delete" in str(e.value)
    edited = json.dumps({**record, "lam": 99.0}).encode()
    write(record=np.frombuffer(edited, dtype=np.uint8))  # an edited record
    with pytest.raises(IntegrityError, match="metadata_sha256"):
        ChunkedTRAKScorer(lam=3.0, compute_dtype="float64").fit(store)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(IntegrityError, match="truncated or corrupt"):
        ChunkedTRAKScorer(lam=3.0, compute_dtype="float64").fit(store)
    os.remove(path)
    assert ChunkedTRAKScorer(lam=3.0, compute_dtype="float64").fit(store).kernel_source_ == "computed"


def test_arrays_bad_input_and_incomplete_stores(tmp_path):
    phi = features(30, 5)
    scorer = ChunkedTRAKScorer(lam=1.0, compute_dtype="float64", chunk_rows=7).fit(phi)  # in memory, nothing saved
    np.testing.assert_allclose(scorer.scores(phi[:2]), TRAKScorer(lam=1.0).fit(phi).scores(phi[:2]), rtol=1e-10)
    assert ChunkedTRAKScorer(lam=-1.0).lam == -1.0
    with pytest.raises(ValueError, match="lambda must be positive"):
        ChunkedTRAKScorer(lam=-1.0).fit(phi)
    with pytest.raises(ValueError, match="compute_dtype"):
        ChunkedTRAKScorer(compute_dtype="float16").fit(phi)
    with pytest.raises(ValueError, match="chunk_rows"):
        ChunkedTRAKScorer(chunk_rows=0).fit(phi)
    with pytest.raises(ValueError, match="not fitted"):
        ChunkedTRAKScorer().scores(phi[:1])
    with pytest.raises(ValueError, match=r"\(Q, 5\)"):
        scorer.scores(np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        ChunkedTRAKScorer().fit(np.ones(5))
    store = FeatureStore.create(str(tmp_path / "p"), IDENTITY, n=30, k=5, slice_size=10)
    with pytest.raises(ValueError, match="incomplete"):
        ChunkedTRAKScorer().fit(store)
    with pytest.raises(ValueError, match="dtype"):
        FeatureStore.create(str(tmp_path / "q"), IDENTITY, n=30, k=5, dtype="float64")


def test_query_memory_is_bounded_by_a_chunk(tmp_path):
    # a 64 MiB float16 store scored in 4 MiB chunks: the process's resident memory grows by far less
    # than the store (file pages are unmapped after each chunk)
    n, k = 16384, 2048
    store = FeatureStore.create(str(tmp_path / "s"), IDENTITY, n=n, k=k, slice_size=4096, dtype="float16")
    store.fill(lambda idx: np.full((len(idx), k), 0.01, np.float16) + (idx[:, None] % 7).astype(np.float16),
               np.arange(n), show_bar=False)
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
    scorer = ChunkedTRAKScorer(lam=1.0, chunk_rows=1024, save_kernel=False).fit(store)
    before = rss()
    pro, _ = scorer.top_k(np.ones((1, k)), 5)
    grew = rss() - before
    assert grew < 24 << 20, f"resident memory grew by {grew >> 20} MiB while scoring a 64 MiB store"
    assert set(pro[0]) <= {i for i in range(n) if i % 7 == 6}
