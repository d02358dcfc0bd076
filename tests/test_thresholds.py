"""recognition/thresholds.py: one cosine convention; FAR thresholds by brute force; PREFIX-meta.json records."""
import numpy as np
import pytest

from recognition.common import ToolkitError
from recognition.load_report import read_meta, write_meta
from recognition.thresholds import (
    cosine_from_squared_l2,
    default_threshold,
    far_threshold,
    operating_points,
    record_thresholds,
    squared_l2_from_cosine,
)
from recognition.verification import evaluate


def _pairs(n_pairs=3000, dim=16, seed=0):
    rng = np.random.RandomState(seed)
    a = rng.randn(n_pairs, dim)
    issame = np.arange(n_pairs) % 2 == 0
    b = np.where(issame[:, None], a + 0.8 * rng.randn(n_pairs, dim), rng.randn(n_pairs, dim))
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = a, b
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), issame


def test_cosine_and_squared_l2_are_the_same_decision():
    emb, issame = _pairs(500)
    d2 = np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1)
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)
    np.testing.assert_allclose(cos, [cosine_from_squared_l2(v) for v in d2], atol=1e-12)
    assert cosine_from_squared_l2(1.20) == pytest.approx(0.40) and squared_l2_from_cosine(0.40) == pytest.approx(1.2)
    for t2 in (0.8, 1.2, 1.36):  # "same when d2 < t" == "same when cos > 1 - t/2"
        np.testing.assert_array_equal(d2 < t2, cos > cosine_from_squared_l2(t2) + 1e-12)


def test_far_threshold_by_brute_force():
    emb, issame = _pairs(4000)
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)
    impostor = cos[~issame]
    for far in (1e-3, 1e-2):
        t = far_threshold(cos, issame, far)
        allowed = int(np.floor(far * len(impostor)))
        assert np.sum(impostor > t) <= allowed  # at most the allowed false accepts
        lower = np.max(impostor[impostor < t])  # any lower threshold accepts one more impostor
        assert np.sum(impostor > lower) > allowed
    assert far_threshold(cos, issame, 1e-4) is None  # 2,000 impostor pairs cannot measure 1e-4


def test_operating_points_and_meta_records(tmp_path):
    emb, issame = _pairs(1200)
    r = evaluate(emb, issame, 10)
    pts = operating_points(emb, issame, r["best_threshold"], r["best_threshold_acc"])
    assert pts["cosine"] == pytest.approx(1 - r["best_threshold"] / 2)
    cos = np.sum(emb[0::2] * emb[1::2], axis=1)
    assert np.mean((cos > pts["cosine"]) == issame) == pytest.approx(r["best_threshold_acc"], abs=1 / 1200)
    assert pts["far"]["0.0001"] is None and pts["far"]["0.001"] == far_threshold(cos, issame, 1e-3)

    prefix = str(tmp_path / "models")
    write_meta(prefix, network="y1", emb_size=128)
    small = dict(pts, num_pairs=100, cosine=0.5)
    record_thresholds(prefix, {"mine_val": small})
    assert read_meta(prefix)["threshold"] == {"cosine": 0.5, "from": "mine_val"}
    record_thresholds(prefix, {"lfw": pts})  # more pairs: the model's default now
    meta = read_meta(prefix)
    assert meta["network"] == "y1" and set(meta["thresholds"]) == {"mine_val", "lfw"}
    assert meta["threshold"] == {"cosine": pts["cosine"], "from": "lfw"}

    assert default_threshold(prefix, None, 0.3)[0] == pts["cosine"]
    assert default_threshold(prefix, 0.25, 0.3) == (0.25, "--threshold")
    assert default_threshold(str(tmp_path / "none"), None, 0.3)[0] == 0.3
    with pytest.raises(ToolkitError, match=r"--threshold 1.36: a cosine similarity is between -1 and 1 "
                                           r"\(squared L2 1.36 would be cosine 0.320\)"):
        default_threshold(prefix, 1.36, 0.3)
