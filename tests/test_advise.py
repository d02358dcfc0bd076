"""Advisor: the pure scenario decision, seeded pairs and spread maths, measurements vs an independent forward pass,
and suggested commands that parse with train.py's / linear_probe.py's own parsers."""
import json
import os

import numpy as np
import pytest

from recognition.advise import (
    SCENARIOS,
    Thresholds,
    advise,
    decide_scenario,
    per_batch_size,
    sample_pairs,
    sample_subset,
    spread,
)
from recognition.common import run_cli


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A seeded random-init ``tiny`` checkpoint: ``PREFIX`` (epoch 0)."""
    import mxnet as mx

    from recognition.backbones import get_symbol
    from recognition.common import save_checkpoint

    sym = get_symbol("tiny")
    mx.random.seed(5)
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None)
    mod.bind([("data", (1, 3, 112, 112))], for_training=False)
    mod.init_params(mx.init.Xavier(magnitude=2.0))
    arg, aux = mod.get_params()
    prefix = str(tmp_path_factory.mktemp("advise_ckpt") / "model")
    save_checkpoint(prefix, 0, sym, arg, aux)
    return prefix


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """8 identities x 4 images."""
    from datasets.synth import generate_dataset

    out = tmp_path_factory.mktemp("advise_small")
    return generate_dataset(str(out), num_classes=8, images_per_class=4, num_holdout=2, holdout_images=2,
                            num_pairs=4, seed=2)


@pytest.mark.parametrize("num_images,median,acc,expected", [
    (100, 4, 0.95, 1), (100, 4, 0.90, 1), (100, 4, 0.899, 3), (100, 4, 0.5, 3),
    (50000, 25, 0.95, 2), (50000, 20, 0.90, 2), (50000, 25, 0.6, 4), (50000, 19.5, 0.99, 1),
    (4999, 100, 0.99, 1), (4999, 100, 0.2, 3), (5000, 100, 0.2, 4), (5000, 20, 0.9, 2),
])
def test_decide_scenario_grid(num_images, median, acc, expected):
    d = decide_scenario(num_images, median, acc)
    assert d["scenario"] == expected and d["name"] == SCENARIOS[expected]
    assert d["small"] == (expected in (1, 3)) and d["similar"] == (expected in (1, 2))
    assert len(d["reasons"]) == 2 and f"{acc:.4f}" in d["reasons"][1]
    # thresholds are data, not constants baked in
    assert decide_scenario(num_images, median, acc, Thresholds(0, 0, 0.0))["scenario"] == 2


def test_sample_pairs_balanced_distinct_seeded():
    labels = np.repeat(np.arange(6), [1, 2, 3, 4, 5, 6])
    pairs, issame = sample_pairs(labels, 40, seed=1)
    assert issame.sum() == 20 and (~issame).sum() == 20
    np.testing.assert_array_equal(labels[pairs[:, 0]] == labels[pairs[:, 1]], issame)
    assert (pairs[:, 0] != pairs[:, 1]).all()
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    p2, s2 = sample_pairs(labels, 40, seed=1)
    np.testing.assert_array_equal(p2, pairs)
    np.testing.assert_array_equal(s2, issame)
    few, same = sample_pairs(np.array([0, 0, 1]), 100, seed=0)  # only one same pair exists
    assert len(few) == 2 and same.sum() == 1


def test_sample_subset_caps():
    labels = np.repeat(np.arange(10), 7)
    sub = sample_subset(labels, per_identity=3, max_identities=4, seed=0)
    assert len(np.unique(labels[sub])) == 4 and np.bincount(labels[sub]).max() == 3


def test_spread_matches_loops():
    rng = np.random.RandomState(0)
    emb = rng.randn(9, 5)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    intra, inter = [], []
    for i in range(9):
        for j in range(9):
            if i != j:
                (intra if labels[i] == labels[j] else inter).append(float(emb[i] @ emb[j]))
    got = spread(emb, labels)
    assert got[0] == pytest.approx(np.mean(intra)) and got[1] == pytest.approx(np.mean(inter))


def test_per_batch_size():
    assert per_batch_size(100000, 64) == 64
    assert per_batch_size(32, 64) == 8 and per_batch_size(3, 64) == 2


def _independent_measure(prefix, rec, seed=0):
    """Verification accuracy recomputed with mxnet recordio + a plain executor + numpy (flip-summed, 10 folds)."""
    import cv2
    import mxnet as mx

    from recognition.verification import evaluate

    r = mx.recordio.MXIndexedRecordIO(rec[:-4] + ".idx", rec, "r")
    h0, _ = mx.recordio.unpack(r.read_idx(0))
    imgs, labels = [], []
    for key in range(1, int(h0.label[0])):
        h, payload = mx.recordio.unpack(r.read_idx(key))
        imgs.append(cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].transpose(2, 0, 1))
        labels.append(int(h.label))
    r.close()
    x, labels = np.stack(imgs).astype(np.float32), np.array(labels)
    sym, arg, aux = mx.model.load_checkpoint(prefix, 0)
    ex = sym.bind(mx.cpu(), dict(arg, data=mx.nd.array(x)), aux_states=aux, grad_req="null")
    e = ex.forward(is_train=False, data=mx.nd.array(x))[0].asnumpy()
    e = e + ex.forward(is_train=False, data=mx.nd.array(x[:, :, :, ::-1].copy()))[0].asnumpy()
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    pairs, issame = sample_pairs(labels, 600, seed)
    return evaluate(e[pairs.reshape(-1)], issame, 10)["acc"], len(labels)


def test_advise_small_data_and_command_parses(tiny_ckpt, small_data):
    from recognition.freeze import parse_stages
    from recognition.linear_probe import build_parser as probe_parser
    from recognition.train import build_argparser

    data_dir = os.path.dirname(small_data["rec"])
    r = advise(f"{tiny_ckpt},0", data_dir, batch_size=16)
    s = r["stats"]
    assert (s["num_identities"], s["num_images"]) == (8, 32)
    assert s["images_per_identity"] == {"min": 4, "median": 4.0, "max": 4}
    assert (s["num_pairs"], s["num_same_pairs"]) == (96, 48)  # all 8 * C(4,2) same pairs + as many different
    acc, n = _independent_measure(tiny_ckpt, small_data["rec"])
    assert n == 32 and s["verification_acc"] == pytest.approx(acc, abs=1e-9)
    assert r["decision"]["scenario"] == (1 if acc >= 0.9 else 3)  # random init: expected 3 (different)

    # the same data judged "large & similar" / "large & different" by thresholds (no big data generated)
    for th, expected in ((Thresholds(2, 10, 0.0), 2), (Thresholds(2, 10, 1.01), 4), (Thresholds(20, 5000, 1.01), 3),
                         (Thresholds(20, 5000, 0.0), 1)):
        r = advise(f"{tiny_ckpt},0", data_dir, thresholds=th, batch_size=16)
        assert r["decision"]["scenario"] == expected
        argv = r["command"]
        if expected == 1:
            assert argv[:3] == ["python", "recognition/linear_probe.py", "train"]
            args = probe_parser().parse_args(argv[2:])
            assert args.model == f"{tiny_ckpt},0" and args.layer is None
            continue
        assert argv[:2] == ["python", "recognition/train.py"]
        args = build_argparser().parse_args(argv[2:])
        assert args.pretrained == f"{tiny_ckpt},0" and args.data_dir == data_dir and args.fc7_init == "imprint"
        stages = parse_stages(0, args.stages)
        assert [st.name for st in stages] == ["head", "all"] and sum(st.steps for st in stages) == args.max_steps
        assert args.target == "synth_val" and args.per_batch_size == 8
        assert args.emb_size == 128  # the checkpoint's width: train.py must not re-create the embedding layer
        assert args.lr == (0.1 if expected == 4 else 0.01)
        assert args.frozen_stages is None  # holding early stages gained nothing on real faces (see advise.py)
        assert (stages[0].steps, stages[1].steps) == (20, 100)  # 4 steps a pass here: the floors of 20 and 100
        assert args.backbone_lr_mult == (0.1 if expected in (2, 3) else None)
        assert args.bn_mode == ("frozen" if expected in (2, 3) else None)
        assert stages[0].lr_mult == 0.1 and stages[1].lr_mult == 1.0  # imprinted head at 0.1x (real faces)
        if expected == 3:
            alt = probe_parser().parse_args(r["alternative"][2:])
            assert alt.layer == "stage3_unit1_relu1_output"


def test_cli_json_and_errors(tiny_ckpt, small_data, capsys):
    from recognition import advise as adv

    data_dir = os.path.dirname(small_data["rec"])
    assert run_cli(adv.main, ["--pretrained", f"{tiny_ckpt},0", "--data", data_dir, "--json", "--num-pairs", "20",
                              "--min-images-per-identity", "2", "--min-total-images", "1",
                              "--similar-accuracy", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decision"]["scenario"] == 2 and out["stats"]["num_pairs"] == 20
    assert out["command_str"].startswith("python recognition/train.py ")
    assert run_cli(adv.main, ["--pretrained", f"{tiny_ckpt},0", "--data", data_dir + "/missing"]) == 2
    assert "neither a folder nor a .rec" in capsys.readouterr().err
    assert run_cli(adv.main, ["--pretrained", f"{tiny_ckpt}", "--data", data_dir]) == 2
    assert "missing ',EPOCH'" in capsys.readouterr().err
    assert run_cli(adv.main, ["--pretrained", f"{tiny_ckpt},0", "--data", data_dir, "--num-pairs", "0"]) == 2
    assert "--num-pairs 0: must be > 0" in capsys.readouterr().err
