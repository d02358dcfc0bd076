"""Training-time verification binds once and reloads parameters: results equal a fresh bind with the same params."""
import mxnet as mx
import numpy as np
import pytest

from recognition.backbones import get_symbol
from recognition.callbacks import Verifier
from recognition.common import ToolkitError


def _params(sym, seed):
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1, 3, 112, 112))
    rng = np.random.RandomState(seed)
    arg = {n: mx.nd.array(rng.normal(0, 0.1, s)) for n, s in zip(sym.list_arguments(), arg_shapes) if n != "data"}
    aux = {n: mx.nd.array(rng.uniform(0.5, 1.5, s) if n.endswith("var") else rng.normal(0, 0.1, s))
           for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
    return arg, aux


def test_verifier_reuses_its_module_and_matches_a_fresh_bind(tiny_data):
    sym = get_symbol("tiny", prelu="stock")
    first, second = _params(sym, 0), _params(sym, 1)
    reused = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16, backend="mxnet")
    reused(sym, *first)
    module = reused._embed.module
    got = reused(sym, *second)
    assert reused._embed.module is module  # no new executor for the second round
    want = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16, backend="mxnet")(sym, *second)
    for name in want:
        assert got[name]["acc"] == want[name]["acc"] and got[name]["xnorm"] == want[name]["xnorm"]
        np.testing.assert_array_equal(got[name]["embeddings"], want[name]["embeddings"])
    other = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16, backend="mxnet")(sym, *first)
    assert any(other[n]["xnorm"] != got[n]["xnorm"] for n in got)  # the params really changed the result


def test_onnx_verifier_reexports_each_round_and_matches_mxnet(tiny_data):
    """The default engine on CPU (onnx when onnxruntime is installed) keeps one embedder, loads each round's
    parameters by re-exporting, and verifies like the MXNet engine: embeddings within 1e-5 cosine, same accuracy."""
    pytest.importorskip("onnxruntime")
    sym = get_symbol("tiny", prelu="stock")
    first, second = _params(sym, 0), _params(sym, 1)
    onnx_v = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16)
    assert onnx_v.backend == "onnx"
    onnx_v(sym, *first)
    embedder = onnx_v._embed
    got = onnx_v(sym, *second)
    assert onnx_v._embed is embedder and embedder.backend == "onnx"
    want = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16, backend="mxnet")(sym, *second)
    for name in want:
        a, b = got[name]["embeddings"], want[name]["embeddings"]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 1 - 1e-5
        assert got[name]["acc"] == want[name]["acc"]


def test_verify_backend_is_checked_before_training():
    with pytest.raises(ToolkitError, match="runs on CPU"):
        Verifier([], ctx=mx.gpu(0), backend="onnx")
    assert Verifier([], ctx=mx.gpu(0)).backend == "mxnet"  # auto on a GPU: the MXNet graph


def test_embedder_small_batches_use_shared_bindings_and_follow_set_params():
    """A remainder smaller than the bound batch goes through a power-of-two binding that shares the parameters:
    same embeddings as the full binding (each row computed alone, BatchNorm on stored statistics), and new
    parameters loaded with set_params reach it too."""
    from recognition.verification import Embedder

    sym = get_symbol("tiny", prelu="stock")
    first, second = _params(sym, 0), _params(sym, 1)
    x = np.random.RandomState(2).uniform(0, 255, (37, 3, 112, 112)).astype(np.float32)
    emb = Embedder(sym, *first, ctx=mx.cpu(), batch_size=16)
    full = np.concatenate([emb(x[i:i + 16]) for i in (0, 16)])  # two full chunks: the main binding only
    assert emb._small == {}
    tail = emb(x[32:])  # 5 rows -> a batch-8 binding
    assert sorted(emb._small) == [8]
    one = np.stack([emb(x[i:i + 1])[0] for i in range(3)])  # one at a time -> a batch-1 binding
    assert sorted(emb._small) == [1, 8]
    ref = Embedder(sym, *first, ctx=mx.cpu(), batch_size=64)(x)  # padded into one batch of 64
    np.testing.assert_allclose(np.concatenate([full, tail]), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(one, ref[:3], rtol=1e-4, atol=1e-4)
    emb.set_params(*second)
    want = Embedder(sym, *second, ctx=mx.cpu(), batch_size=64)(x[:3])
    np.testing.assert_allclose(np.stack([emb(x[i:i + 1])[0] for i in range(3)]), want, rtol=1e-4, atol=1e-4)
    assert np.abs(want - ref[:3]).max() > 1e-2  # the new parameters really changed the embeddings


def test_auto_verifier_falls_back_to_mxnet_when_the_export_fails(tiny_data, monkeypatch):
    """Training must not stop because a graph cannot be exported: under auto the round runs on MXNet."""
    import deploy.onnx_embed as onnx_embed
    import recognition.verification as V

    def refuse(*a, **k):
        raise ToolkitError("the exported graph is not valid ONNX even after repair: test")

    monkeypatch.setattr(V, "onnx_available", lambda: True)
    monkeypatch.setattr(onnx_embed, "OnnxEmbedder", refuse)
    sym = get_symbol("tiny", prelu="stock")
    params = _params(sym, 0)
    auto = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16)
    got = auto(sym, *params)
    assert auto._embed.backend == "mxnet"
    want = Verifier(tiny_data["bins"], ctx=mx.cpu(), batch_size=16, backend="mxnet")(sym, *params)
    for name in want:
        np.testing.assert_array_equal(got[name]["embeddings"], want[name]["embeddings"])
