"""The exact gallery index behind search.py (issue 17): top-k against a full numpy sort, edits, persistence."""
import numpy as np
import pytest

from deploy.gallery_index import EmbeddingIndex
from deploy.search import Gallery
from recognition.common import ToolkitError


def unit(n, d, seed):
    x = np.random.RandomState(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_topk(gallery, queries, k):
    """Independent path: every score, full argsort."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    s = q.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, order, 1), order


@pytest.mark.parametrize("k", [1, 5])
def test_blockwise_topk_equals_full_sort(k):
    g = unit(1000, 16, 0)
    idx = EmbeddingIndex(16, capacity=7, block_rows=96)  # several blocks and several growths
    for s in range(0, 1000, 130):
        idx.add(g[s:s + 130] * 3.0)  # scaled rows: the index normalises
    q = np.random.RandomState(1).normal(size=(9, 16)).astype(np.float32)
    scores, rows = idx.search(q, k)
    ref_s, ref_i = reference_topk(g, q, k)
    np.testing.assert_array_equal(rows, ref_i)
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_fewer_rows_than_k_pads_with_minus_one():
    idx = EmbeddingIndex(4)
    idx.add(unit(2, 4, 0))
    scores, rows = idx.search(unit(1, 4, 1), 4)
    assert rows[0, 2:].tolist() == [-1, -1] and np.isneginf(scores[0, 2:]).all()
    assert sorted(rows[0, :2].tolist()) == [0, 1]


def test_remove_then_search_matches_remaining_rows():
    g = unit(300, 8, 2)
    idx = EmbeddingIndex.from_matrix(g)
    drop = np.zeros(300, bool)
    drop[::3] = True
    assert idx.remove(drop) == 100
    assert idx.remove([0, 1]) == 2
    remaining = g[~drop][2:]
    q = unit(5, 8, 3)
    np.testing.assert_array_equal(idx.search(q, 3)[1], reference_topk(remaining, q, 3)[1])


def test_save_load_and_blobs_round_trip(tmp_path):
    g = unit(50, 12, 4)
    idx = EmbeddingIndex.from_matrix(g)
    idx.save(str(tmp_path / "g.npy"))
    back = EmbeddingIndex.load(str(tmp_path / "g.npy"))
    np.testing.assert_array_equal(back.matrix, idx.matrix)
    from_rows = EmbeddingIndex.from_blobs([row.tobytes() for row in g], 12)
    np.testing.assert_array_equal(from_rows.matrix, g)
    from_rows.add(g[:1])  # a loaded index still grows
    assert len(from_rows) == 51
    mapped = EmbeddingIndex.load(str(tmp_path / "g.npy"), mmap=True)
    np.testing.assert_array_equal(mapped.search(g[:3], 1)[1][:, 0], [0, 1, 2])
    assert mapped.remove([0]) == 1 and len(mapped.add(g[:2])) == 2  # edits copy the read-only map
    np.testing.assert_allclose(mapped.matrix[-2:], g[:2], atol=1e-6)


def test_bad_inputs_are_one_line(tmp_path):
    idx = EmbeddingIndex(8)
    with pytest.raises(ToolkitError, match=r"embeddings of shape \(2, 5\), expected \(N, 8\)"):
        idx.add(np.ones((2, 5)))
    with pytest.raises(ToolkitError, match="contain NaN or inf"):
        idx.add(np.full((1, 8), np.nan))
    with pytest.raises(ToolkitError, match="not a whole number of 8-d float32 rows"):
        EmbeddingIndex.from_blobs([b"\0" * 12], 8)
    (tmp_path / "x.npy").write_bytes(b"not numpy")
    with pytest.raises(ToolkitError, match="not a gallery .npy"):
        EmbeddingIndex.load(str(tmp_path / "x.npy"))


def test_gallery_mode_all_gives_distinct_identities_like_brute_force():
    names = [f"p{i % 40}" for i in range(400)]  # 10 rows per identity
    emb = unit(400, 16, 6)
    gallery = Gallery.from_embeddings(names, emb, mode="all")
    q = unit(6, 16, 7)
    got = gallery.search(q, top_k=5)
    s = q @ emb.T
    for qi, row in enumerate(got):
        best = {}
        for j in np.argsort(-s[qi]):
            best.setdefault(names[j], float(s[qi, j]))
        ref = sorted(best.items(), key=lambda t: -t[1])[:5]
        assert [n for n, _ in row] == [n for n, _ in ref]
        np.testing.assert_allclose([v for _, v in row], [v for _, v in ref], atol=1e-5)
