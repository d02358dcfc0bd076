"""Offline triplet mining: selection vs a brute-force numpy reference, the triplet graph vs numpy, batch layout,
and a short refinement run from a classification checkpoint (fc7 dropped and reported, mining logged)."""
import json
import os

import mxnet as mx
import numpy as np
import pytest

from recognition import train
from recognition.common import load_checkpoint, run_cli
from recognition.heads import make_loss_config
from recognition.metrics_log import read_metrics
from recognition.triplet_mining import OfflineTripletIter, mine_triplets, offline_triplet_symbol


def _ref_distances(emb, kind):
    n = len(emb)
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if kind == "l2":
                d[i, j] = np.sum((x[i] - x[j]) ** 2)
            else:
                d[i, j] = np.arccos(np.clip(np.dot(x[i], x[j]), -1 + 1e-6, 1 - 1e-6))
    return d


@pytest.mark.parametrize("kind,alpha", [("l2", 0.3), ("l2", 1.0), ("angle", 0.35)])
def test_mining_selection_matches_brute_force(kind, alpha):
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(5), 4)
    centres = rng.randn(5, 8)
    emb = centres[labels] * 0.7 + rng.randn(20, 8)  # overlapping identities: semi-hard, hard and easy cases
    trip, stats = mine_triplets(emb, labels, alpha, np.random.default_rng(1), kind)
    d = _ref_distances(emb, kind)
    chosen = {(a, p): n for a, p, n in trip}
    want_pairs, semi, hard = set(), 0, 0
    for a in range(20):
        for p in range(a + 1, 20):
            if labels[p] != labels[a]:
                continue
            negs = [n for n in range(20) if labels[n] != labels[a] and d[a, n] - d[a, p] < alpha]
            semis = [n for n in negs if d[a, n] > d[a, p]]
            if not negs:
                assert (a, p) not in chosen
                continue
            want_pairs.add((a, p))
            assert chosen[(a, p)] in (semis or negs), (a, p)
            semi, hard = semi + bool(semis), hard + (not semis)
    assert set(chosen) == want_pairs and len(trip) == len(want_pairs)
    assert stats == {"pairs": 5 * 6, "triplets": len(want_pairs), "semihard": semi, "hard": hard}
    assert semi > 0 and 0 < len(want_pairs) < 30 or alpha == 1.0


def test_negative_is_drawn_at_random_among_candidates():
    emb = np.array([[1, 0], [1, 0.05], [1, 0.2], [1, -0.2], [1, 0.3]], float)  # a=0, p=1; negatives 2, 3, 4
    labels = np.array([0, 0, 1, 2, 3])
    seen = {int(mine_triplets(emb, labels, 0.5, np.random.default_rng(s))[0][0, 2]) for s in range(40)}
    assert seen == {2, 3, 4}


@pytest.mark.parametrize("loss", ["triplet", "atriplet"])
def test_offline_triplet_graph_matches_numpy(loss):
    cfg = make_loss_config(loss, triplet_alpha=0.4)
    data = mx.sym.Variable("data")
    sym, info = offline_triplet_symbol(mx.sym.identity(data, name="fc1"), cfg)
    assert info["metric"] == "loss" and info["fc7_params"] == []
    rng = np.random.RandomState(2)
    x = rng.randn(12, 6).astype(np.float32)
    lab = np.array([0, 1, 2, 3, 0, 1, 2, 3, 1, 2, 3, 3], np.float32)  # last triplet: negative of its own class
    exe = sym.simple_bind(mx.cpu(), data=x.shape, softmax_label=lab.shape)
    exe.arg_dict["data"][:] = x
    exe.arg_dict["softmax_label"][:] = lab
    out = exe.forward(is_train=True)[0].asnumpy()
    d = _ref_distances(x.astype(np.float64), "l2" if loss == "triplet" else "angle")
    per = [max(0.0, d[i, 4 + i] - d[i, 8 + i] + 0.4) for i in range(3)]  # triplet 3 is ignored (a and n alike)
    np.testing.assert_allclose(out, [np.mean(per)], rtol=1e-4, atol=1e-5)


def test_iterator_orders_anchors_positives_negatives_per_device(tiny_data):
    it = OfflineTripletIter(tiny_data["rec"], batch_size=12, num_parts=2, bag_identities=4, images_per_identity=3,
                            mining_interval=2, alpha=0.5, seed=0)
    it.attach(lambda: (lambda x: np.random.RandomState(int(x.sum()) % 1000).randn(len(x), 8)))
    for _ in range(3):
        b = it.next()
        lab = b.label[0].asnumpy()
        assert b.data[0].shape == (12, 3, 112, 112)
        for part in (lab[:6], lab[6:]):  # per device: 2 anchors, 2 positives, 2 negatives
            a, p, n = part[:2], part[2:4], part[4:]
            assert np.all(a == p) and np.all(a != n)
    assert it.get_state()["served"] == 3 and it.get_state()["rounds"] == 2
    with pytest.raises(Exception, match="multiple of 3"):
        OfflineTripletIter(tiny_data["rec"], batch_size=8)


@pytest.mark.slow
def test_triplet_refinement_from_classification_checkpoint(tiny_data, tmp_path):
    d = os.path.dirname(tiny_data["rec"])
    common = ["--network", "tiny", "--data-dir", d, "--target", "synth_val", "--verbose", "100", "--frequent", "1",
              "--seed", "1"]
    pre = str(tmp_path / "pre" / "model")
    assert run_cli(train.main, common + ["--loss", "softmax", "--per-batch-size", "8", "--max-steps", "2",
                                         "--ckpt-embedding", "0", "--ckpt", "0", "--prefix", pre, "--lr", "0.05"]) == 0
    out = str(tmp_path / "tri" / "model")
    argv = common + ["--loss", "triplet", "--pretrained", pre + ",1", "--mining-interval", "2", "--bag-identities",
                     "6", "--images-per-identity", "3", "--per-batch-size", "12", "--max-steps", "5", "--prefix", out,
                     "--ckpt", "0", "--lr", "0.01"]
    assert run_cli(train.main, argv) == 0
    run_dir = os.path.dirname(out)
    report = json.load(open(os.path.join(run_dir, "load_report.json")))
    assert {"name": "fc7_weight", "reason": "--loss triplet trains no classifier"} in report["dropped"]
    assert "fc7_weight" not in [r["name"] for r in report["loaded"]]
    rounds = read_metrics(os.path.join(run_dir, "metrics.jsonl"), "mining")
    assert [r["step"] for r in rounds] == [0, 2, 4]
    assert all(r["pairs"] == 6 * 3 and 0 < r["triplets"] <= r["pairs"] for r in rounds)
    losses = [r["loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"), "train")]
    assert len(losses) == 5 and all(np.isfinite(losses))
    sym, arg, aux = load_checkpoint(out, 1)
    assert sym.list_outputs() == ["fc1_output"] and "fc7_weight" not in arg
    from recognition.verification import Embedder

    emb = Embedder(sym, arg, aux, ctx=mx.cpu(), batch_size=2)(np.zeros((2, 3, 112, 112), np.float32))
    assert emb.shape == (2, 128) and np.all(np.isfinite(emb))


def test_mining_flag_errors(tiny_data, tmp_path, capsys):
    d = os.path.dirname(tiny_data["rec"])
    argv = ["--network", "tiny", "--data-dir", d, "--per-batch-size", "12", "--max-steps", "1", "--models-root",
            str(tmp_path)]
    assert run_cli(train.main, argv + ["--loss", "arcface", "--mining-interval", "5"]) == 2
    assert "offline mining needs --loss triplet or atriplet" in capsys.readouterr().err
    assert run_cli(train.main, argv + ["--loss", "triplet", "--mining-interval", "-1"]) == 2
    assert "--mining-interval: must be >= 0" in capsys.readouterr().err
    assert run_cli(train.main, argv + ["--loss", "triplet", "--mining-interval", "2", "--teacher", "x,0"]) == 2
    assert "offline triplet batches carry no teacher embeddings" in capsys.readouterr().err
