"""Fast inference (issue 17): BatchNorm folding, the inference graph behind Embedder, the onnxruntime backend.

References are independent code paths: a plain executor bound on the graph as given (no folding, stock PReLU),
and numpy for the folding arithmetic. Embeddings must agree within 1e-5 cosine (the issue's bound).
"""
import mxnet as mx
import numpy as np
import pytest

from recognition.bn_fold import FoldPlan, fold_batchnorm
from recognition.common import ToolkitError, symbol_graph
from recognition.verification import Embedder, make_embedder


def plain_embed(sym, arg, aux, x):
    """Reference: one executor on the unmodified graph."""
    exe = sym.bind(mx.cpu(), args=dict(arg, data=mx.nd.array(x)), aux_states=aux, grad_req="null")
    return exe.forward(is_train=False)[0].asnumpy()


def min_cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.min(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def conv_bn_prelu_fc_bn():
    """data -> conv(no bias) -> BN(eps 2e-5) -> PReLU -> conv(bias) -> BN(fix_gamma default) -> FC -> BN = fc1."""
    data = mx.sym.var("data")
    x = (data - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), stride=(2, 2), pad=(1, 1), no_bias=True, name="c0")
    x = mx.sym.BatchNorm(x, fix_gamma=False, eps=2e-5, name="bn0")
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="relu0")
    x = mx.sym.Convolution(x, num_filter=8, kernel=(3, 3), stride=(4, 4), num_group=8, name="dw1")
    x = mx.sym.BatchNorm(x, name="bn1")  # fix_gamma=True: stored gamma is ignored
    x = mx.sym.FullyConnected(x, num_hidden=16, name="pre_fc1")
    return mx.sym.BatchNorm(x, fix_gamma=False, eps=2e-5, name="fc1")


def random_params(sym, seed=0):
    rng = np.random.RandomState(seed)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1, 3, 112, 112))
    arg = {n: mx.nd.array(rng.uniform(0.3, 0.7, s) if n.endswith("_gamma") else rng.normal(0, 0.3, s))
           for n, s in zip(sym.list_arguments(), arg_shapes) if n != "data"}
    aux = {n: mx.nd.array(rng.normal(0, 0.2, s) if n.endswith("mean") else rng.uniform(0.5, 1.5, s))
           for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
    return arg, aux


def test_fold_equals_unfolded_graph_and_keeps_output_name():
    sym = conv_bn_prelu_fc_bn()
    arg, aux = random_params(sym)
    fsym, farg, faux, folded = fold_batchnorm(sym, arg, aux)
    assert sorted(folded) == ["bn0", "bn1", "fc1"]
    assert fsym.list_outputs() == ["fc1_output"]
    assert not [n for n in symbol_graph(fsym)["nodes"] if n["op"] == "BatchNorm"]
    assert faux == {}
    x = np.random.RandomState(1).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
    np.testing.assert_allclose(plain_embed(fsym, farg, faux, x), plain_embed(sym, arg, aux, x), rtol=1e-4, atol=1e-4)


def test_fold_arithmetic_matches_numpy():
    """The folded FC weight/bias equal the textbook formula (fix_gamma=False, eps from the node)."""
    sym = conv_bn_prelu_fc_bn()
    arg, aux = random_params(sym, seed=3)
    _, farg, _, _ = fold_batchnorm(sym, arg, aux)
    g, b = arg["fc1_gamma"].asnumpy(), arg["fc1_beta"].asnumpy()
    m, v = aux["fc1_moving_mean"].asnumpy(), aux["fc1_moving_var"].asnumpy()
    s = g / np.sqrt(v + 2e-5)
    np.testing.assert_allclose(farg["fc1_fold_weight"].asnumpy(), arg["pre_fc1_weight"].asnumpy() * s[:, None],
                               rtol=1e-6)
    np.testing.assert_allclose(farg["fc1_fold_bias"].asnumpy(), s * (arg["pre_fc1_bias"].asnumpy() - m) + b,
                               rtol=1e-5, atol=1e-6)
    # bn1 has fix_gamma=True: its stored gamma must not enter the fold
    s1 = 1.0 / np.sqrt(aux["bn1_moving_var"].asnumpy() + 1e-3)
    np.testing.assert_allclose(farg["bn1_fold_weight"].asnumpy(), arg["dw1_weight"].asnumpy() * s1[:, None, None, None],
                               rtol=1e-6)


def test_layer_read_twice_is_not_folded():
    data = mx.sym.var("data")
    c = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), no_bias=True, name="c")
    sym = mx.sym.BatchNorm(c, name="bn") + c  # the conv output has a second reader: folding would change it
    assert FoldPlan(sym).folded == []


def test_missing_parameter_is_one_line():
    sym = conv_bn_prelu_fc_bn()
    arg, aux = random_params(sym)
    del aux["bn0_moving_var"]
    with pytest.raises(ToolkitError, match="bn0_moving_var of bn0 are missing"):
        fold_batchnorm(sym, arg, aux)


def test_embedder_inference_form_matches_plain_and_refolds_on_set_params():
    sym = conv_bn_prelu_fc_bn()
    arg, aux = random_params(sym)
    x = np.random.RandomState(2).uniform(0, 255, (5, 3, 112, 112)).astype(np.float32)
    emb = Embedder(sym, arg, aux, mx.cpu(), batch_size=4)
    assert emb.graph is not None and emb.graph.prelu == 1 and len(emb.graph.folded) == 3
    assert min_cosine(emb(x), plain_embed(sym, arg, aux, x)) > 1 - 1e-5
    arg2, aux2 = random_params(sym, seed=7)
    emb.set_params(arg2, aux2)
    got, want = emb(x), plain_embed(sym, arg2, aux2, x)
    assert min_cosine(got, want) > 1 - 1e-5
    assert min_cosine(got, plain_embed(sym, arg, aux, x)) < 0.999  # really the new parameters
    np.testing.assert_allclose(Embedder(sym, arg, aux, optimize=False)(x), plain_embed(sym, arg, aux, x), rtol=1e-5,
                               atol=1e-5)


def test_training_graph_with_bn_prelu_embeds_like_its_checkpoint():
    """Verification during training hands Embedder the bn-PReLU graph with unit states: same embeddings."""
    from recognition.backbones import get_symbol
    from recognition.backbones.fast_prelu import checkpoint_form

    train_sym = get_symbol("tiny")
    arg, aux = random_params(train_sym, seed=4)
    stock_sym, stock_arg, stock_aux = checkpoint_form(train_sym, arg, aux)
    x = np.random.RandomState(5).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
    got = Embedder(train_sym, arg, aux, batch_size=3)(x)
    assert min_cosine(got, plain_embed(stock_sym, stock_arg, stock_aux, x)) > 1 - 1e-5


def test_unknown_backend_is_one_line():
    sym = conv_bn_prelu_fc_bn()
    arg, aux = random_params(sym)
    with pytest.raises(ToolkitError, match="--backend 'tensorrt': choose one of auto, onnx, mxnet, mxnet-plain"):
        make_embedder(sym, arg, aux, backend="tensorrt")


def test_onnx_backend_matches_mxnet():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    sym = conv_bn_prelu_fc_bn()
    arg, aux = random_params(sym)
    x = np.random.RandomState(6).uniform(0, 255, (5, 3, 112, 112)).astype(np.float32)
    emb = make_embedder(sym, arg, aux, batch_size=2, backend="onnx")
    assert emb.embedding_size == 16
    assert min_cosine(emb(x), plain_embed(sym, arg, aux, x)) > 1 - 1e-5
    arg2, aux2 = random_params(sym, seed=8)
    emb.set_params(arg2, aux2)
    assert min_cosine(emb(x), plain_embed(sym, arg2, aux2, x)) > 1 - 1e-5


def test_real_checkpoint_every_backend_within_1e5_cosine(fixture_model):
    from recognition.checkpoint_graph import cut_at_embedding
    from recognition.common import load_checkpoint

    sym, arg, aux = load_checkpoint(fixture_model, 0)
    sym = cut_at_embedding(sym, fixture_model)
    x = np.random.RandomState(0).uniform(0, 255, (4, 3, 112, 112)).astype(np.float32)
    ref = plain_embed(sym, arg, aux, x)
    fast = Embedder(sym, arg, aux, batch_size=4)
    assert len(fast.graph.folded) == 50 and fast.graph.prelu == 33
    assert min_cosine(fast(x), ref) > 1 - 1e-5
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    assert min_cosine(make_embedder(sym, arg, aux, batch_size=4, backend="onnx")(x), ref) > 1 - 1e-5


def test_backend_flag_reaches_face_model(tmp_path):
    """``--backend`` from add_model_args builds the chosen engine; both MXNet forms give the same features."""
    import argparse

    from deploy.face_model import add_model_args, model_from_args
    from recognition.common import save_checkpoint

    sym = conv_bn_prelu_fc_bn()
    arg, aux = random_params(sym, seed=9)
    save_checkpoint(str(tmp_path / "m"), 0, sym, arg, aux)
    p = argparse.ArgumentParser()
    add_model_args(p)
    models = {b: model_from_args(p.parse_args(["--model", f"{tmp_path}/m,0", "--backend", b, "--batch-size", "2"]))
              for b in ("mxnet", "mxnet-plain")}
    assert models["mxnet"].embedder.graph is not None and models["mxnet-plain"].embedder.graph is None
    imgs = np.random.RandomState(3).randint(0, 256, (3, 112, 112, 3)).astype(np.uint8)
    a, b = (models[k].get_features(list(imgs)) for k in ("mxnet", "mxnet-plain"))
    assert min_cosine(a, b) > 1 - 1e-5
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m,0", "--backend", "tvm"])


def test_auto_backend_prefers_onnx_on_cpu_and_falls_back_to_mxnet(monkeypatch, caplog):
    import deploy.onnx_embed as onnx_embed
    import recognition.verification as V

    sym = conv_bn_prelu_fc_bn()
    arg, aux = random_params(sym)
    x = np.random.RandomState(3).uniform(0, 255, (3, 3, 112, 112)).astype(np.float32)
    ref = plain_embed(sym, arg, aux, x)
    if V.onnx_available():
        emb = make_embedder(sym, arg, aux, batch_size=2)
        assert emb.backend == "onnx" and isinstance(emb, onnx_embed.OnnxEmbedder)
        assert min_cosine(emb(x), ref) > 1 - 1e-5

    def refuse(*a, **k):
        raise ToolkitError("the exported graph is not valid ONNX even after repair: test")

    monkeypatch.setattr(V, "onnx_available", lambda: True)
    monkeypatch.setattr(onnx_embed, "OnnxEmbedder", refuse)
    with caplog.at_level("WARNING", logger="recognition"):
        emb = make_embedder(sym, arg, aux, batch_size=2)  # auto: a graph onnx cannot take runs on mxnet
    assert emb.backend == "mxnet" and isinstance(emb, Embedder)
    assert "--backend auto: onnx unavailable for this graph (the exported graph is not valid ONNX" in caplog.text
    assert min_cosine(emb(x), ref) > 1 - 1e-5
    with pytest.raises(ToolkitError, match="not valid ONNX even after repair"):
        make_embedder(sym, arg, aux, batch_size=2, backend="onnx")  # asked for explicitly: the error stands
    monkeypatch.setattr(V, "onnx_available", lambda: False)
    assert V.resolve_backend("auto", mx.cpu()) == "mxnet"
    assert V.resolve_backend("auto", [mx.cpu(0), mx.gpu(0)]) == "mxnet"
