"""recognition/thresholds.py: one cosine convention; FAR thresholds by brute force; PREFIX-meta.json records."""
import os

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


# ------------------------------------------------------------------------- verification -> compare / search
def _tiny_model(tmp_path):
    import mxnet as mx

    from recognition.backbones import get_symbol
    from recognition.common import save_checkpoint

    sym = get_symbol("tiny")
    mx.random.seed(5)
    mod = mx.mod.Module(sym, label_names=None)
    mod.bind([("data", (1, 3, 112, 112))], for_training=False)
    mod.init_params(mx.init.Xavier(magnitude=2.0))
    arg, aux = mod.get_params()
    prefix = str(tmp_path / "models")
    save_checkpoint(prefix, 0, sym, arg, aux)
    return prefix


def _png(path, chw):
    import cv2

    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), chw.transpose(1, 2, 0)[:, :, ::-1])
    return str(path)


def test_verification_records_and_deploy_tools_use_the_threshold(tiny_data, tmp_path, capsys):
    from deploy import compare, search
    from recognition import verification
    from recognition.common import run_cli
    from recognition.verification import read_bin

    prefix = _tiny_model(tmp_path)
    target = tiny_data["bins"][0]
    assert run_cli(verification.main, ["--model", prefix + ",0", "--target", target, "--no-progress"]) == 0
    out = capsys.readouterr().out
    meta = read_meta(prefix)
    rec = meta["thresholds"]["synth_val"]
    assert meta["threshold"] == {"cosine": rec["cosine"], "from": "synth_val"}
    assert f"at cosine {rec['cosine']:.3f} (squared L2 {rec['squared_l2']:.3f})" in out
    assert rec["far"] == {"0.001": None, "0.0001": None}  # 30 impostor pairs cannot measure these
    images, _ = read_bin(target)
    a, b = _png(tmp_path / "a.png", images[0]), _png(tmp_path / "b.png", images[1])
    assert run_cli(compare.main, ["--model", prefix + ",0", a, b]) == 0
    line = capsys.readouterr().out
    assert f"threshold cosine {rec['cosine']:.3f}" in line and "verified on synth_val" in line

    # search: a query far from everyone is 'unknown' under the model's threshold; -1 names the nearest anyway
    for i, name in enumerate(("ann", "bob")):
        _png(tmp_path / "people" / name / "0.png", images[2 * i])
    meta["threshold"]["cosine"] = 0.999  # only a gallery image itself reaches it
    write_meta(prefix, **meta)
    q_known, q_other = str(tmp_path / "people" / "ann" / "0.png"), _png(tmp_path / "q.png", images[7])
    args = ["--model", prefix + ",0", "--gallery", str(tmp_path / "people"), "--top-k", "2", "--query"]
    assert run_cli(search.main, args + [q_known, q_other]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# query") and "cosine 0.999" in lines[0]
    assert lines[1].split("\t")[1] == "ann" and lines[2].split("\t")[1] == "unknown"
    assert lines[2].split("\t")[2].split(":")[0] in ("ann", "bob")  # the nearest are still listed
    assert run_cli(search.main, args + [q_other, "--threshold", "-1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split("\t")[1] in ("ann", "bob")
    assert search.answer([("ann", 0.5), ("bob", 0.1)], 0.4) == "ann"
    assert search.answer([("ann", 0.3)], 0.4) == search.UNKNOWN


def test_training_checkpoint_carries_its_verified_threshold(tiny_data, tmp_path, capsys):
    """A checkpoint saved after a verification round records that round's thresholds; the verification tool on
    the saved checkpoint (a second code path) finds the same best threshold."""
    from recognition import train, verification
    from recognition.common import run_cli

    d = os.path.dirname(tiny_data["rec"])
    prefix = str(tmp_path / "run" / "model")
    assert run_cli(train.main, ["--network", "tiny", "--loss", "softmax", "--data-dir", d, "--target", "synth_val",
                                "--per-batch-size", "8", "--max-steps", "2", "--verbose", "2", "--lr", "0.05",
                                "--ckpt", "2", "--prefix", prefix]) == 0
    meta = read_meta(prefix)
    rec = meta["thresholds"]["synth_val"]
    assert meta["threshold"] == {"cosine": rec["cosine"], "from": "synth_val"} and rec["num_pairs"] == 60
    capsys.readouterr()
    assert run_cli(verification.main, ["--model", prefix + ",1", "--target", tiny_data["bins"][0], "--no-progress",
                                       "--no-save-threshold"]) == 0
    assert f"[synth_val]thresholds: best cosine {rec['cosine']:.3f}" in capsys.readouterr().out
