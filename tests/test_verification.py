"""Verification: safe .bin loading, insightface maths against independent numpy references, Embedder, CLI."""
import os
import pickle
import struct
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest

from recognition import verification as V
from recognition.common import ToolkitError, run_cli, save_checkpoint


# --------------------------------------------------------------------------------------------------- helpers
def tiny_symbol(emb=16, with_fc7=0):
    """data -> normalise -> conv/BN/PReLU -> pre_fc1 -> BN 'fc1' (+ optional fc7/softmax like a training graph)."""
    data = mx.sym.Variable("data")
    x = (data - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), stride=(4, 4), pad=(1, 1), no_bias=True, name="conv0")
    x = mx.sym.BatchNorm(x, fix_gamma=False, name="bn0")
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="relu0")
    x = mx.sym.Pooling(x, kernel=(4, 4), stride=(4, 4), pool_type="avg", name="pool0")
    x = mx.sym.FullyConnected(x, num_hidden=emb, name="pre_fc1")
    fc1 = mx.sym.BatchNorm(x, fix_gamma=True, name="fc1")
    if not with_fc7:
        return fc1
    fc7 = mx.sym.FullyConnected(fc1, num_hidden=with_fc7, name="fc7")
    return mx.sym.SoftmaxOutput(fc7, name="softmax")


def init_params(sym, seed=0, shape=(1, 3, 112, 112)):
    """Random parameters for ``sym`` (seeded), with non-trivial BN statistics."""
    rng = np.random.RandomState(seed)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=shape)
    args = {n: mx.nd.array(rng.normal(0, 0.3, s)) for n, s in zip(sym.list_arguments(), arg_shapes)
            if n not in ("data", "softmax_label")}
    aux = {n: mx.nd.array(rng.uniform(0.5, 1.5, s) if "var" in n else rng.normal(0, 0.1, s))
           for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
    return args, aux


def save_tiny(prefix, with_fc7=0, seed=0):
    sym = tiny_symbol(with_fc7=with_fc7)
    args, aux = init_params(sym, seed)
    save_checkpoint(prefix, 0, sym, args, aux)
    return sym, args, aux


def reference_forward(sym, args, aux, x):
    """Second code path: a plain executor over the whole input at once (no batching, no padding)."""
    exe = sym.simple_bind(mx.cpu(), data=x.shape, grad_req="null")
    exe.copy_params_from(args, aux, allow_extra_params=True)
    return exe.forward(is_train=False, data=mx.nd.array(x))[0].asnumpy()


def random_faces(n, seed=0, size=112):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def write_bin(path, images_rgb, issame, ext=".png"):
    bins = [cv2.imencode(ext, cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes() for im in images_rgb]
    with open(path, "wb") as f:
        pickle.dump((bins, list(issame)), f, protocol=2)
    return bins


def numpy_kfold_reference(emb, issame, nfolds=10):
    """Independent loop in insightface's style: sklearn KFold, one threshold at a time."""
    from sklearn.model_selection import KFold

    thresholds = np.arange(0, 4, 0.01)
    e1, e2 = emb[0::2], emb[1::2]
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    accs = []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(dist))):
        best_acc, best_t = -1.0, None
        for t in thresholds:
            pred = np.less(dist[train], t)
            tp = np.sum(np.logical_and(pred, issame[train]))
            tn = np.sum(np.logical_and(~pred, ~issame[train]))
            acc = float(tp + tn) / len(train)
            if acc > best_acc:
                best_acc, best_t = acc, t
        pred = np.less(dist[test], best_t)
        accs.append(np.mean(pred == issame[test]))
    return np.mean(accs), np.std(accs)


# ------------------------------------------------------------------------------------------------------ maths
@pytest.mark.parametrize("pairs,seed", [(200, 0), (97, 1)])
def test_kfold_accuracy_matches_numpy_reference(pairs, seed):
    rng = np.random.RandomState(seed)
    issame = rng.rand(pairs) < 0.5
    base = rng.normal(size=(pairs, 8))
    other = np.where(issame[:, None], base + rng.normal(0, 0.7, (pairs, 8)), rng.normal(size=(pairs, 8)))
    emb = np.empty((2 * pairs, 8))
    emb[0::2], emb[1::2] = base, other
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    res = V.evaluate(emb, issame, 10)
    ref_acc, ref_std = numpy_kfold_reference(emb, issame)
    assert abs(res["acc"] - ref_acc) < 1e-6 and abs(res["std"] - ref_std) < 1e-6
    assert 0.6 < res["acc"] < 1.0  # a real, non-degenerate problem
    # best threshold over all pairs, brute force
    dist = np.sum((emb[0::2] - emb[1::2]) ** 2, 1)
    best = max(np.mean((dist < t) == issame) for t in np.arange(0, 4, 0.01))
    assert abs(res["best_threshold_acc"] - best) < 1e-12
    from sklearn.metrics import roc_auc_score
    assert abs(res["auc"] - roc_auc_score(issame, -dist)) < 1e-12


def test_tar_far_and_eer_on_known_distances():
    # 1000 impostors at 1.0..1.999, 10 genuine at 0.5 and 10 at 1.0005 (just above the smallest impostor)
    impostor = 1.0 + np.arange(1000) / 1000.0
    genuine = np.r_[np.full(10, 0.5), np.full(10, 1.0005)]
    dist = np.r_[genuine, impostor]
    issame = np.r_[np.ones(20, bool), np.zeros(1000, bool)]
    # FAR 1e-3 allows 1 false accept: threshold just above the 2nd impostor (1.001) accepts all genuine
    assert V.tar_at_far(dist, issame, 1e-3) == 1.0
    # FAR 1e-4 allows none: only genuine below 1.0 accepted
    assert V.tar_at_far(dist, issame, 1e-4) == 0.5
    fpr = np.array([0.0, 0.0, 0.2, 1.0])
    tpr = np.array([0.0, 0.6, 0.9, 1.0])
    # FRR-FAR: 0.4 at fpr 0, -0.1 at fpr .2 -> crossing at 0.4/0.5 of the way: 0.16
    assert abs(V._eer(fpr, tpr) - 0.16) < 1e-12


# ------------------------------------------------------------------------------------------ safe unpickling
class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_bin_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([b"x", _Evil(str(marker))], [True]), protocol=2))
    with pytest.raises(ToolkitError) as err:
        V.load_bin(str(path))
    msg = str(err.value)
    assert str(path) in msg and "forbidden global posix.system" in msg and "\n" not in msg
    assert not marker.exists()
    # the same payload through plain pickle would have run (proves the test payload is live)
    pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("name", ["builtins.eval", "numpy.load", "subprocess.Popen"])
def test_other_globals_refused(tmp_path, name):
    module, attr = name.rsplit(".", 1)
    path = tmp_path / "g.bin"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{attr}\n".encode() + b")R.")
    with pytest.raises(ToolkitError, match=f"forbidden global {name}"):
        V.safe_load_pickle(str(path))


def test_object_dtype_array_refused(tmp_path):
    path = tmp_path / "obj.bin"
    path.write_bytes(pickle.dumps(([np.array([b"a", 1], dtype=object)], [True]), protocol=2))
    with pytest.raises(ToolkitError, match="not allowed"):
        V.safe_load_pickle(str(path))


def _py2_pickle(bins, issame):
    """A protocol-2 pickle as Python 2 writes ``([str, ...], [bool, ...])``: BINSTRING opcodes, no _codecs."""
    out = [b"\x80\x02]("]
    for b in bins:
        out.append(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)
    out.append(b"e](")
    out.extend(b"\x88" if s else b"\x89" for s in issame)
    out.append(b"e\x86.")
    return b"".join(out)


def test_load_bin_py2_py3_and_numpy_forms_agree(tmp_path):
    imgs = random_faces(4, seed=3)
    issame = [True, False]
    bins = write_bin(str(tmp_path / "py3.bin"), imgs, issame)
    (tmp_path / "py2.bin").write_bytes(_py2_pickle(bins, issame))
    with open(tmp_path / "np.bin", "wb") as f:
        pickle.dump(([np.frombuffer(b, np.uint8) for b in bins], np.array(issame)), f, protocol=2)
    for name in ("py3.bin", "py2.bin", "np.bin"):
        data_list, same = V.load_bin(str(tmp_path / name), (112, 112))
        assert same == issame and isinstance(same[0], bool)
        a, m = data_list[0].asnumpy(), data_list[1].asnumpy()
        assert a.shape == (4, 3, 112, 112) and a.dtype == np.float32
        np.testing.assert_array_equal(a, imgs.transpose(0, 3, 1, 2).astype(np.float32))  # RGB, PNG is lossless
        np.testing.assert_array_equal(m, a[:, :, :, ::-1])


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("odd", "odd number of images (3)"),
    ("mismatch", "4 images but 3 pair labels"),
    ("undecodable", "image 1 cannot be decoded"),
    ("garbage", "not a readable insightface .bin"),
])
def test_bad_bins(tmp_path, case, message):
    path = str(tmp_path / f"{case}.bin")
    good = [cv2.imencode(".jpg", im)[1].tobytes() for im in random_faces(4)]
    content = {"odd": (good[:3], [True]), "mismatch": (good, [True, False, True]),
               "undecodable": ([good[0], b"not an image", good[2], good[3]], [True, False])}
    if case in content:
        with open(path, "wb") as f:
            pickle.dump(content[case], f, protocol=2)
    elif case == "garbage":
        with open(path, "wb") as f:
            f.write(b"\x80\x02]q\x00(")
    with pytest.raises(ToolkitError) as err:
        V.load_bin(path)
    assert message in str(err.value) and path in str(err.value)


# ------------------------------------------------------------------------------------------------- Embedder
def test_embedder_partial_batches_match_executor(tmp_path):
    sym, args, aux = save_tiny(str(tmp_path / "m"))
    x = random_faces(11, seed=1).transpose(0, 3, 1, 2).astype(np.float32)
    emb = V.Embedder(sym, args, aux, mx.cpu(), batch_size=4)(x)
    assert emb.shape == (11, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, reference_forward(sym, args, aux, x), rtol=1e-4, atol=1e-4)


def test_from_checkpoint_cuts_full_training_graph(tmp_path):
    prefix = str(tmp_path / "full")
    sym, args, aux = save_tiny(prefix, with_fc7=5)
    args["fc7_weight"] = mx.nd.ones((5, 16))
    save_checkpoint(prefix, 0, sym, args, aux)
    e = V.Embedder.from_checkpoint(prefix, 0, mx.cpu(), batch_size=3)
    assert e.symbol.list_outputs() == ["fc1_output"] and e.embedding_size == 16
    x = random_faces(5, seed=2).transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_allclose(e(x), reference_forward(tiny_symbol(), args, aux, x), rtol=1e-4, atol=1e-4)


def test_checkpoint_without_fc1_output_names_outputs(tmp_path):
    data = mx.sym.Variable("data")
    sym = mx.sym.FullyConnected(mx.sym.flatten(data), num_hidden=4, name="emb")
    args, aux = init_params(sym)
    save_checkpoint(str(tmp_path / "x"), 0, sym, args, aux)
    with pytest.raises(ToolkitError, match=r"no 'fc1_output' node \(outputs: emb_output"):
        V.Embedder.from_checkpoint(str(tmp_path / "x"), 0)


def test_embedder_missing_params_is_an_error(tmp_path):
    sym = tiny_symbol()
    args, aux = init_params(sym)
    del args["pre_fc1_weight"]
    with pytest.raises(ToolkitError, match="lacks 1 parameter.*pre_fc1_weight"):
        V.Embedder(sym, args, aux)


# ------------------------------------------------------------------------------- test_bin / test / verify_targets
def test_test_bin_flip_sum_and_insightface_test_agree(tmp_path):
    sym, args, aux = save_tiny(str(tmp_path / "m"))
    rng = np.random.RandomState(5)
    imgs = random_faces(40, seed=5)
    issame = rng.rand(20) < 0.5
    write_bin(str(tmp_path / "t.bin"), imgs, issame)
    embedder = V.Embedder(sym, args, aux, batch_size=7)
    res = V.verify_targets([str(tmp_path / "t.bin")], embedder, batch_size=6, nfolds=5)["t"]
    # reference: manual flip-sum with a second code path (whole-array executor), numpy k-fold loop
    x = imgs.transpose(0, 3, 1, 2).astype(np.float32)
    e = reference_forward(sym, args, aux, x) + reference_forward(sym, args, aux, x[:, :, :, ::-1].copy())
    raw = np.concatenate([reference_forward(sym, args, aux, x), reference_forward(sym, args, aux, x[..., ::-1].copy())])
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(res["embeddings"], e, atol=1e-5)
    ref_acc, ref_std = numpy_kfold_reference(res["embeddings"].astype(np.float64), issame, 5)
    assert abs(res["acc"] - ref_acc) < 1e-6 and abs(res["std"] - ref_std) < 1e-6
    assert abs(res["xnorm"] - np.mean(np.linalg.norm(raw, axis=1))) < 1e-4
    # insightface's test() with a Module bound for inference, on load_bin's form
    mod = mx.mod.Module(sym, label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", (8, 3, 112, 112))], for_training=False)
    mod.set_params(args, aux)
    acc1, std1, acc2, std2, xnorm, embs = V.test(V.load_bin(str(tmp_path / "t.bin")), mod, 8, nfolds=5)
    assert abs(acc2 - res["acc"]) < 1e-9 and abs(std2 - res["std"]) < 1e-9
    assert abs(acc1 - res["acc_noflip"]) < 1e-9 and abs(xnorm - res["xnorm"]) < 1e-4
    assert len(embs) == 2 and embs[0].shape == (40, 16)


def test_cli_writes_roc_png_and_reports(tmp_path, capsys):
    save_tiny(str(tmp_path / "m"))
    write_bin(str(tmp_path / "v.bin"), random_faces(20, seed=4), [True, False] * 5, ext=".jpg")
    png = str(tmp_path / "roc.png")
    rc = run_cli(V.main, ["--model", f"{tmp_path}/m,0", "--target", str(tmp_path / "v.bin"), "--roc-png", png,
                          "--nfolds", "5", "--no-progress", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "[v]Accuracy-Flip:" in out and "TAR@FAR=0.001" in out
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["--model", "nowhere/m,0", "--target", "x.bin"], "--model: checkpoint file nowhere/m-0000.params does not exist"),
    (["--model", "M", "--target", "missing.bin"], "--target: verification set missing.bin does not exist"),
    (["--model", "M", "--target", "V", "--nfolds", "50"], "--nfolds 50"),
])
def test_cli_bad_inputs_exit_2(tmp_path, capsys, argv, message):
    save_tiny(str(tmp_path / "m"))
    write_bin(str(tmp_path / "v.bin"), random_faces(20, seed=4), [True, False] * 5)
    argv = [a.replace("M", f"{tmp_path}/m,0") if a == "M" else a.replace("V", str(tmp_path / "v.bin"))
            if a == "V" else a for a in argv]
    assert run_cli(V.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------- real fixtures
def test_subgraph_backend_robust_when_mxnet_imported_first(fixture_model):
    """A fresh process that imports mxnet before recognition (env unset) still embeds the real checkpoint."""
    code = ("import mxnet as mx, numpy as np\n"
            "from recognition.verification import Embedder\n"
            f"e = Embedder.from_checkpoint({fixture_model!r}, 0, mx.cpu(), batch_size=2)\n"
            "x = np.random.RandomState(0).randint(0, 256, (3, 3, 112, 112)).astype('float32')\n"
            "y = e(x)\n"
            "print(y.shape, bool(np.isfinite(y).all()), float(np.linalg.norm(y[0])) > 0)\n")
    env = {k: v for k, v in os.environ.items() if k != "MXNET_SUBGRAPH_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(3, 128) True True" in out.stdout


@pytest.mark.slow
def test_real_checkpoint_on_lfw_fold(fixture_model, shared_dir):
    """model-y1-test2 on 600 real LFW pairs scores what insightface's own maths give: 0.98833 +- 0.01675."""
    path = os.path.join(shared_dir, "lfw_fold1.bin")
    if not os.path.isfile(path):
        pytest.skip("lfw_fold1.bin fixture is absent")
    embedder = V.Embedder.from_checkpoint(fixture_model, 0, mx.cpu(), batch_size=64)
    res = V.verify_targets([path], embedder, batch_size=64)["lfw_fold1"]
    assert abs(res["acc"] - 0.98833) < 1e-4 and abs(res["std"] - 0.01675) < 1e-4
    assert res["num_pairs"] == 600 and 0.99 < res["auc"] <= 1.0
