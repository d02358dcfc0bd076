"""Embedding distillation: loss value and gradients vs numpy (with and without projection), a tiny student run
that lowers the distillation loss (projection to the teacher's width, slim checkpoint without it), the teacher
cache (values, round trip, mismatch), and flag errors."""
import json
import os

import cv2
import mxnet as mx
import numpy as np
import pytest

from recognition import train
from recognition.common import ToolkitError, load_checkpoint, run_cli
from recognition.distill import TeacherPlan, distill_loss_symbol, load_or_build_cache
from recognition.metrics_log import read_metrics


def _np_loss(s, t, kind):
    out = 0.0
    if kind in ("mse", "both"):
        out += np.mean((s - t) ** 2)
    if kind in ("cosine", "both"):
        ns = s / np.linalg.norm(s, axis=1, keepdims=True)
        nt = t / np.linalg.norm(t, axis=1, keepdims=True)
        out += np.mean(1 - np.sum(ns * nt, axis=1))
    return out


@pytest.mark.parametrize("kind", ["mse", "cosine", "both"])
@pytest.mark.parametrize("sdim", [5, 3])  # 3: projection distill_proj (3 -> 5)
def test_loss_value_and_gradient_match_numpy(kind, sdim):
    rng = np.random.RandomState(0)
    s0, t = rng.randn(4, sdim), rng.randn(4, 5)
    w = rng.randn(5, sdim) * 0.5
    sym = distill_loss_symbol(mx.sym.Variable("s"), mx.sym.Variable("t"), kind, 0.7, sdim, 5)
    assert ("distill_proj_weight" in sym.list_arguments()) == (sdim != 5)
    shapes = dict(s=s0.shape, t=t.shape)
    if sdim != 5:
        shapes["distill_proj_weight"] = w.shape
    exe = sym.simple_bind(mx.cpu(), grad_req="write", **shapes)
    exe.arg_dict["s"][:] = s0
    exe.arg_dict["t"][:] = t
    if sdim != 5:
        exe.arg_dict["distill_proj_weight"][:] = w

    def f(s, w):
        return _np_loss(s @ w.T if sdim != 5 else s, t, kind)

    value = exe.forward(is_train=True)[0].asnumpy()
    np.testing.assert_allclose(value, [f(s0, w)], rtol=1e-5)
    exe.backward()
    eps = 1e-6
    for name, x in (("s", s0), ("distill_proj_weight", w)):
        if name not in exe.grad_dict:
            continue
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[idx] += eps
            xm[idx] -= eps
            args = (xp, w) if name == "s" else (s0, xp)
            argm = (xm, w) if name == "s" else (s0, xm)
            num[idx] = (f(*args) - f(*argm)) / (2 * eps)
        np.testing.assert_allclose(exe.grad_dict[name].asnumpy(), 0.7 * num, rtol=1e-3, atol=1e-5)
    assert np.all(exe.grad_dict["t"].asnumpy() == 0)  # the teacher is a target, not trained


@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory):
    """A tiny arcface checkpoint (128-d) trained a few steps: the teacher."""
    prefix = str(tmp_path_factory.mktemp("teacher") / "model")
    argv = ["--network", "tiny", "--loss", "arcface", "--data-dir", os.path.dirname(tiny_data["rec"]),
            "--per-batch-size", "8", "--max-steps", "12", "--verbose", "100", "--ckpt", "0", "--prefix", prefix,
            "--lr", "0.05", "--seed", "2"]
    assert run_cli(train.main, argv) == 0
    return prefix + ",1"


@pytest.mark.slow
def test_student_with_projection_lowers_distillation_loss(tiny_data, teacher, tmp_path):
    out = str(tmp_path / "student" / "model")
    argv = ["--network", "tiny", "--emb-size", "32", "--loss", "none", "--teacher", teacher, "--distill-loss",
            "cosine", "--data-dir", os.path.dirname(tiny_data["rec"]), "--target", "synth_val", "--per-batch-size",
            "8", "--max-steps", "16", "--verbose", "100", "--ckpt", "0", "--prefix", out, "--lr", "0.05", "--seed",
            "1"]
    assert run_cli(train.main, argv) == 0
    losses = [r["loss"] for r in read_metrics(os.path.join(os.path.dirname(out), "metrics.jsonl"), "train")]
    assert len(losses) == 16 and np.mean(losses[-4:]) < np.mean(losses[:4])
    sym, arg, _ = load_checkpoint(out, 1)  # slim: the embedding graph, projection dropped
    assert "distill_proj_weight" not in arg and sym.list_outputs() == ["fc1_output"]
    assert sym.infer_shape(data=(1, 3, 112, 112))[1][0] == (1, 32)
    resume = mx.nd.load(os.path.join(os.path.dirname(out), "resume", "params-00000016.params"))
    assert resume["arg:distill_proj_weight"].shape == (128, 32)


def test_alongside_margin_loss_outputs(tiny_data, teacher, tmp_path):
    from recognition.trainer import Trainer, prepare_run

    argv = ["--network", "tiny", "--loss", "arcface", "--teacher", teacher, "--distill-loss", "both",
            "--distill-weight", "0.5", "--data-dir", os.path.dirname(tiny_data["rec"]), "--per-batch-size", "8",
            "--max-steps", "1", "--models-root", str(tmp_path)]
    cfg = train.config_from_args(train.build_argparser().parse_args(argv))
    t = Trainer(cfg, prepare_run(cfg))
    assert t.head_info["outputs"][-1] == "distill_loss_output" and t.head_info["metric"] == "acc"
    assert "distill_proj_weight" not in t.train_symbol.list_arguments()  # same width: no projection
    t.fit()
    rec = read_metrics(os.path.join(str(tmp_path), "tiny-arcface-" + os.path.basename(
        os.path.dirname(tiny_data["rec"])), "metrics.jsonl"), "train")[0]
    assert np.isfinite(rec["distill_loss_output"]) and rec["loss"] > rec["distill_loss_output"]


def test_teacher_cache_round_trip_and_mismatch(tiny_data, teacher, tmp_path):
    from recognition.rec import RecordReader
    from recognition.verification import Embedder

    cache = str(tmp_path / "t.npy")
    plan = TeacherPlan(teacher, cache=cache, batch_size=16)
    table = load_or_build_cache(plan, tiny_data["rec"])
    reader = RecordReader(tiny_data["rec"])
    keys = list(reader.image_keys)[:5]
    imgs = np.stack([cv2.imdecode(np.frombuffer(reader.read(k)[1], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
                     .transpose(2, 0, 1) for k in keys]).astype(np.float32)  # independent decode: BGR -> RGB
    prefix, epoch = teacher.split(",")
    ref = Embedder.from_checkpoint(prefix, int(epoch), ctx=mx.cpu(), batch_size=5)(imgs)
    np.testing.assert_allclose(table[keys], ref, rtol=1e-4, atol=1e-4)
    assert np.isnan(table[0]).all()  # record 0 is the header, not an image
    side = json.load(open(cache + ".json"))
    assert side["records"] == tiny_data["num_images"] and side["emb_size"] == 128
    mtime = os.path.getmtime(cache)
    again = load_or_build_cache(TeacherPlan(teacher, cache=cache), tiny_data["rec"])
    assert np.array_equal(again, table, equal_nan=True) and os.path.getmtime(cache) == mtime
    side["teacher"] = "/elsewhere/model,3"
    with open(cache + ".json", "w") as f:
        json.dump(side, f)
    with pytest.raises(ToolkitError, match="made for another teacher or data"):
        load_or_build_cache(TeacherPlan(teacher, cache=cache), tiny_data["rec"])
    # the iterator looks up the rows of exactly the records in each batch
    it = TeacherPlan(teacher, cache=str(tmp_path / "u.npy")).make_iter(tiny_data["rec"], 8, rand_mirror=False,
                                                                       num_workers=0, seed=0)
    b = it.next()
    assert np.array_equal(b.label[1].asnumpy(), table[it.last_keys])
    assert np.array_equal(b.label[0].asnumpy(), reader.labels(it.last_keys).astype(np.float32))


def test_flag_errors(tiny_data, teacher, tmp_path, capsys):
    d = os.path.dirname(tiny_data["rec"])
    argv = ["--network", "tiny", "--data-dir", d, "--per-batch-size", "8", "--max-steps", "1", "--models-root",
            str(tmp_path)]
    cases = [(["--loss", "arcface", "--distill-loss", "mse"], "--distill-loss: needs --teacher"),
             (["--loss", "none"], "--loss none: nothing to train without --teacher"),
             (["--loss", "none", "--teacher", teacher, "--distill-weight", "0"], "nothing to train"),
             (["--loss", "arcface", "--teacher", str(tmp_path / "nope") + ",0"], "--teacher: checkpoint file"),
             (["--loss", "arcface", "--teacher", teacher, "--teacher-cache", str(tmp_path / "c.npy"),
               "--set", "data_color=0.2"], "--teacher-cache holds embeddings of un-augmented images")]
    for extra, msg in cases:
        assert run_cli(train.main, argv + extra) == 2, extra
        assert msg in capsys.readouterr().err
