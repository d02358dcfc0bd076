"""Backbone registry: insightface parameter contract, forward/backward of every network, stages, errors."""
import os
import re

import mxnet as mx
import numpy as np
import pytest

from recognition.backbones import default_emb_size, get_stages, get_symbol, list_networks
from recognition.common import ToolkitError

GLUON_SMALL = "gluon:mobilenetv2_0.25"
CONTRACT_NAMES = ["r18", "r34", "r50", "r100", "y1", "m1", "vargfacenet"]


def _shapes(sym, batch=1):
    args, _, aux = sym.infer_shape(data=(batch, 3, 112, 112))
    return (dict(zip(sym.list_arguments(), map(tuple, args))), dict(zip(sym.list_auxiliary_states(), map(tuple, aux))))


@pytest.mark.parametrize("name", CONTRACT_NAMES)
@pytest.mark.parametrize("prelu", ["fast", "stock"])
def test_insightface_param_contract(params_contract, name, prelu):
    sym = get_symbol(name, prelu=prelu)
    assert sym.list_outputs() == ["fc1_output"]
    args, aux = _shapes(sym)
    want = params_contract[name]
    assert args == {k: tuple(v) for k, v in want["arguments"]}
    assert aux == {k: tuple(v) for k, v in want["auxiliary_states"]}
    assert default_emb_size(name) == want["emb_size"]
    assert sum(int(np.prod(s)) for k, s in args.items() if k != "data") == want["num_params"]


def _train_step(sym, batch=2, seed=0):
    """Bind, init (seeded), forward (train) and backward of sum(fc1^2). Returns (output, executor)."""
    loss = mx.sym.MakeLoss(mx.sym.sum(mx.sym.square(sym)))
    group = mx.sym.Group([loss, mx.sym.BlockGrad(sym)])
    ex = group.simple_bind(mx.cpu(), data=(batch, 3, 112, 112), grad_req="write")
    mx.random.seed(seed)
    rng = np.random.RandomState(seed)
    init = mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2)
    for name, arr in ex.arg_dict.items():
        if name != "data":
            init(mx.init.InitDesc(name), arr)
    for name, arr in ex.aux_dict.items():
        arr[:] = 1.0 if name.endswith("_var") else 0.0
    ex.arg_dict["data"][:] = rng.uniform(0, 255, (batch, 3, 112, 112))
    outs = ex.forward(is_train=True)
    ex.backward()
    return outs[1].asnumpy(), ex


@pytest.mark.parametrize("name", [n for n in list_networks() if n != "r100"] + [GLUON_SMALL])
def test_forward_backward_every_network(name):
    sym = get_symbol(name)
    emb, ex = _train_step(sym)
    assert emb.shape == (2, default_emb_size(name))
    assert np.isfinite(emb).all() and np.abs(emb).sum() > 0
    grads = {k: v.asnumpy() for k, v in ex.grad_dict.items() if k != "data" and v is not None}
    assert all(np.isfinite(g).all() for g in grads.values())
    first_conv = [k for k in sym.list_arguments() if k.endswith("_weight")][0]
    assert np.abs(grads[first_conv]).sum() > 0, f"no gradient reaches {first_conv}"


def test_r100_infers_shapes_only():
    sym = get_symbol("r100")
    _, out, _ = sym.infer_shape(data=(2, 3, 112, 112))
    assert out == [(2, 512)]
    assert len([k for k in sym.list_arguments() if re.match(r"stage3_unit\d+_conv1_weight", k)]) == 30


def test_emb_size_override():
    sym = get_symbol("tiny", emb_size=48)
    args, _ = _shapes(sym, batch=3)
    assert args["pre_fc1_weight"][0] == 48
    _, out, _ = sym.infer_shape(data=(3, 3, 112, 112))
    assert out == [(3, 48)]
    assert get_symbol("y1", emb_size=256).infer_shape(data=(1, 3, 112, 112))[1] == [(1, 256)]


def test_unknown_network_lists_valid_names():
    with pytest.raises(ToolkitError) as err:
        get_symbol("r999")
    msg = str(err.value)
    assert "r999" in msg and "\n" not in msg
    for name in list_networks():
        assert name in msg
    with pytest.raises(ToolkitError, match="unknown network"):
        get_stages("nope")
    with pytest.raises(ToolkitError, match="unknown network"):
        default_emb_size("nope")


def test_bad_options_raise_one_line_errors():
    with pytest.raises(ToolkitError, match=r"unknown option\(s\) blocks"):
        get_symbol("r18", blocks=[1, 1, 1, 1])
    with pytest.raises(ToolkitError, match="--emb-size"):
        get_symbol("tiny", emb_size=0)
    with pytest.raises(ToolkitError, match="prelu='slow'"):
        get_symbol("tiny", prelu="slow")
    with pytest.raises(ToolkitError, match="units needs 4"):
        get_symbol("tiny", units=[1, 1])
    with pytest.raises(ToolkitError, match="not a gluoncv model"):
        get_symbol("gluon:not_a_model")


@pytest.mark.parametrize("name", list_networks() + [GLUON_SMALL])
def test_stages_cover_every_parameter_in_order(name):
    sym = get_symbol(name)
    stages = get_stages(name)
    assert stages[-1][0] == "embedding" and len({s for s, _ in stages}) == len(stages)
    params = [k for k in sym.list_arguments() if k != "data"] + sym.list_auxiliary_states()
    owner = {}
    for param in params:
        hits = [i for i, (_, rx) in enumerate(stages) if re.search(rx, param)]
        assert len(hits) == 1, f"{param} matched stages {hits}"
        owner[param] = hits[0]
    # list_arguments runs input -> output: stage indices never go back
    order = [owner[k] for k in sym.list_arguments() if k != "data"]
    assert order == sorted(order)
    assert set(order) == set(range(len(stages))), "a stage matches no parameter"
    assert owner["pre_fc1_weight"] == len(stages) - 1


def test_normalisation_is_inside_the_graph():
    sym = get_symbol("tiny").get_internals()["conv0_output"]
    rng = np.random.RandomState(1)
    x = rng.uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    w = rng.randn(16, 3, 3, 3).astype(np.float32)
    ex = sym.bind(mx.cpu(), {"data": mx.nd.array(x), "conv0_weight": mx.nd.array(w)})
    got = ex.forward()[0].asnumpy()
    xn = (x - 127.5) * 0.0078125
    want = mx.nd.Convolution(mx.nd.array(xn), mx.nd.array(w), kernel=(3, 3), pad=(1, 1), num_filter=16,
                             no_bias=True).asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prelu", ["fast", "stock"])
def test_y1_reproduces_the_real_checkpoint(fixture_model, prelu):
    """Our y1 with the model-zoo weights gives the checkpoint's own fc1_output (inference)."""
    from recognition.common import load_checkpoint

    ref_sym, arg, aux = load_checkpoint(fixture_model, 0)
    ref_sym = ref_sym.get_internals()["fc1_output"]
    ours = get_symbol("y1", prelu=prelu)
    renamed = {("pre_fc1_weight" if k == "fc1_weight" else k): v for k, v in arg.items()}
    x = mx.nd.array(np.random.RandomState(2).uniform(0, 255, (2, 3, 112, 112)))
    outs = []
    for sym, params in ((ref_sym, arg), (ours, renamed)):
        mod = mx.mod.Module(sym, label_names=None, context=mx.cpu())
        mod.bind(data_shapes=[("data", x.shape)], for_training=False)
        mod.set_params(params, aux, allow_missing=False, allow_extra=True)
        mod.forward(mx.io.DataBatch([x]), is_train=False)
        outs.append(mod.get_outputs()[0].asnumpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_gluon_pretrained_absent_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    with pytest.raises(ToolkitError) as err:
        get_symbol("gluon:mobilenetv2_1.0", imagenet_pretrained=True)
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "models") in msg and "nothing is downloaded" in msg
    assert not os.listdir(tmp_path)  # nothing fetched or created
    from recognition.backbones import load_imagenet_params

    with pytest.raises(ToolkitError, match="ImageNet weights not found at"):
        load_imagenet_params("gluon:mobilenetv2_1.0")
    with pytest.raises(ToolkitError, match="only for gluon:NAME"):
        load_imagenet_params("r50")


def test_gluon_imagenet_params_load_under_symbol_names(tmp_path, monkeypatch):
    """A weights file placed in the local store loads under our names and reproduces gluon's features."""
    from gluoncv.model_zoo import get_model, model_store

    from recognition.backbones import load_imagenet_params
    from recognition.backbones.gluon_zoo import features_symbol

    model = "mobilenetv2_0.25"
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    net = get_model(model, pretrained=False)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    x = np.random.RandomState(3).uniform(0, 255, (2, 3, 112, 112)).astype(np.float32)
    net(mx.nd.array(x))  # materialise deferred shapes
    os.makedirs(tmp_path / "models")
    net.save_parameters(str(tmp_path / "models" / f"{model}-{model_store.short_hash(model)}.params"))

    arg, aux = load_imagenet_params("gluon:" + model)
    sym = get_symbol("gluon:" + model, imagenet_pretrained=True)
    feat_sym = features_symbol(model)[0]
    assert set(arg) == set(feat_sym.list_arguments()) - {"data"}
    assert set(aux) == set(feat_sym.list_auxiliary_states())
    assert set(arg) < set(sym.list_arguments()) and all("running" not in k for k in aux)
    ex = feat_sym.bind(mx.cpu(), dict(arg, data=mx.nd.array(x)), aux_states=aux)
    ours = ex.forward(is_train=False)[0].asnumpy()
    ref = mx.nd.array((x - 127.5) * 0.0078125)
    for child in list(net.features._children.values())[:-1]:  # all but the global pooling
        ref = child(ref)
    np.testing.assert_allclose(ours, ref.asnumpy(), rtol=1e-4, atol=1e-4)
