"""The fast PReLU is the stock one: same values, same gradients, same parameters (checkpoints move between them)."""
import json

import mxnet as mx
import numpy as np
import pytest

from recognition.backbones import checkpoint_form, fill_unit_aux, get_symbol
from recognition.backbones.fast_prelu import bn_prelu
from recognition.backbones.layers import prelu
from recognition.common import load_checkpoint, save_checkpoint


def _layer(mode, channels):
    if mode in ("bn_fused", "bn_plain"):
        return bn_prelu(mx.sym.var("x"), "p", channels, fused=mode == "bn_fused")
    return prelu(mx.sym.var("x"), "p", channels, mode)


def _run(sym, inputs, out_grad):
    ex = sym.simple_bind(mx.cpu(), **{k: v.shape for k, v in inputs.items()})
    for k, v in inputs.items():
        ex.arg_dict[k][:] = v
    for k, v in fill_unit_aux(sym, {}).items():
        ex.aux_dict[k][:] = v
    out = ex.forward(is_train=True)[0].asnumpy()
    ex.backward(mx.nd.array(out_grad))
    return out, {k: ex.grad_dict[k].asnumpy() for k in inputs}


@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (2, 16, 1, 1)])
def test_layer_matches_stock_and_numpy(shape):
    rng = np.random.RandomState(0)
    channels = shape[1]
    x = rng.randn(*shape).astype(np.float32)
    gamma = np.linspace(-0.7, 1.6, channels).astype(np.float32)  # negative and > 1 slopes too
    dy = rng.randn(*shape).astype(np.float32)
    inputs = {"x": x, "p_gamma": gamma}
    g4 = gamma.reshape(1, -1, 1, 1)
    want_y = np.where(x > 0, x, g4 * x)
    want_dx = dy * np.where(x > 0, 1.0, g4)
    want_dg = (dy * np.minimum(x, 0)).sum(axis=(0, 2, 3))
    results = {mode: _run(_layer(mode, channels), inputs, dy) for mode in ("fast", "stock", "bn_fused", "bn_plain")}
    for mode, (y, grads) in results.items():
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(grads["x"], want_dx, rtol=1e-5, atol=1e-6, err_msg=mode)
        np.testing.assert_allclose(grads["p_gamma"], want_dg, rtol=1e-5, atol=1e-5, err_msg=mode)


def test_same_parameter_name_shape_and_init():
    for mode in ("fast", "stock"):
        sym = _layer(mode, 8)
        assert sym.list_arguments() == ["x", "p_gamma"]
        assert sym.list_auxiliary_states() == []
        shapes = sym.infer_shape(x=(2, 8, 4, 4))[0]
        assert tuple(shapes[1]) == (8,)
        attrs = sym.attr_dict()["p_gamma"]
        assert json.loads(attrs["__init__"]) == ["constant", {"value": 0.25}]
    fast_ops = {n["op"] for n in json.loads(get_symbol("tiny", prelu="fast").tojson())["nodes"]}
    stock_ops = {n["op"] for n in json.loads(get_symbol("tiny", prelu="stock").tojson())["nodes"]}
    assert "LeakyReLU" in stock_ops and "LeakyReLU" not in fast_ops


def _with_global_stats(sym):
    """Every BatchNorm on its moving statistics: a train-mode BatchNorm over 2 samples is so ill-conditioned that
    rounding, not maths, would decide the comparison."""
    graph = json.loads(sym.tojson())
    for node in graph["nodes"]:
        if node["op"] == "BatchNorm":
            node.setdefault("attrs", {})["use_global_stats"] = "True"
    return mx.sym.load_json(json.dumps(graph))


def _bind_net(name, prelu_mode, arg, aux, data, batch, dtype="float32", global_stats=False):
    """Bind ``sum(fc1 * R)`` (R fixed random) of ``name`` with the given parameters."""
    sym = get_symbol(name, prelu=prelu_mode, **({"dropout": 0.0} if name == "tiny" else {}))
    if global_stats:
        sym = _with_global_stats(sym)
    # a random projection: sum(fc1^2) would be constant through the train-mode BatchNorm ``fc1``
    proj = mx.sym.BlockGrad(mx.sym.var("proj"))
    loss = mx.sym.MakeLoss(mx.sym.sum(sym * proj))
    group = mx.sym.Group([loss, mx.sym.BlockGrad(sym)])
    types = {k: dtype for k in group.list_arguments() + group.list_auxiliary_states()}
    emb = sym.infer_shape(data=(batch, 3, 112, 112))[1][0]
    ex = group.simple_bind(mx.cpu(), data=(batch, 3, 112, 112), proj=emb, type_dict=types)
    ex.arg_dict["proj"][:] = np.random.RandomState(7).randn(*emb)
    for k, v in arg.items():
        ex.arg_dict[k][:] = v
    for k, v in fill_unit_aux(sym, aux).items():
        ex.aux_dict[k][:] = v
    ex.arg_dict["data"][:] = data
    return sym, ex


def _random_params(name, batch, seed):
    sym = get_symbol(name, prelu="stock")
    rng = np.random.RandomState(seed)
    args, _, auxs = sym.infer_shape(data=(batch, 3, 112, 112))
    arg = {}
    for k, s in zip(sym.list_arguments(), args):
        if k == "data":
            continue
        if k.endswith("_gamma") and "relu" in k:
            arg[k] = rng.uniform(-0.3, 1.3, s)  # PReLU slopes, both signs
        elif k.endswith("_gamma"):
            arg[k] = rng.uniform(0.5, 1.5, s)
        elif k.endswith("_beta") or k.endswith("_bias"):
            arg[k] = rng.uniform(-0.2, 0.2, s)
        else:
            fan_in = max(1, int(np.prod(s[1:])))
            arg[k] = rng.randn(*s) * np.sqrt(2.0 / fan_in)
    aux = {k: (rng.uniform(0.5, 2.0, s) if k.endswith("_var") else rng.uniform(-0.1, 0.1, s))
           for k, s in zip(sym.list_auxiliary_states(), auxs)}
    data = rng.uniform(0, 255, (batch, 3, 112, 112))
    return arg, aux, data


@pytest.mark.parametrize("name", ["tiny", "y1"])
def test_network_fast_equals_stock_outputs_and_gradients(name):
    batch = 2
    arg, aux, data = _random_params(name, batch, seed=1)
    results = {}
    for mode in ("fast", "stock", "bn"):
        # float32 (MXNet's own LeakyReLU slope gradient came out wrong in float64 inside a network)
        _, ex = _bind_net(name, mode, arg, aux, data, batch, global_stats=True)
        outs = ex.forward(is_train=True)
        ex.backward()
        results[mode] = (outs[1].asnumpy(), {k: v.asnumpy() for k, v in ex.grad_dict.items() if k in arg},
                         {k: v.asnumpy() for k, v in ex.aux_dict.items()})
    y_s, g_s, a_s = results["stock"]
    for mode in ("fast", "bn"):
        _compare(results[mode][:2], (y_s, g_s), arg, mode)
    unit = {k: v for k, v in results["bn"][2].items() if k not in a_s}  # constants: never updated by training
    assert unit and all(v.min() == v.max() == (1.0 if k.endswith("_var") else 0.0) for k, v in unit.items())


def _compare(got, want, arg, mode):
    (y_f, g_f), (y_s, g_s) = got, want
    np.testing.assert_allclose(y_f, y_s, rtol=1e-5, atol=1e-5 * np.abs(y_s).max())
    assert set(g_f) == set(g_s) == set(arg)
    for k in arg:  # gradients relative to each tensor's scale
        scale = float(np.abs(g_s[k]).max())
        assert scale > 0 or k == "fc1_gamma", f"no gradient reaches {k}"  # fc1 has fix_gamma
        scale = max(scale, 1e-12)
        np.testing.assert_allclose(g_f[k] / scale, g_s[k] / scale, atol=1e-5, err_msg=f"{mode} {k}")


def test_checkpoint_saved_from_fast_loads_into_stock_and_back(tmp_path):
    batch = 2
    arg, aux, data = _random_params("tiny", batch, seed=2)
    outs = {}
    for src, dst in (("fast", "stock"), ("stock", "fast")):
        sym, _ = _bind_net("tiny", src, arg, aux, data, batch)
        prefix = str(tmp_path / f"from_{src}")
        save_checkpoint(prefix, 3, sym, {k: mx.nd.array(v) for k, v in arg.items()},
                        {k: mx.nd.array(v) for k, v in aux.items()})
        _, arg2, aux2 = load_checkpoint(prefix, 3, need_symbol=False)
        mod = mx.mod.Module(get_symbol("tiny", prelu=dst), label_names=None, context=mx.cpu())
        mod.bind(data_shapes=[("data", (batch, 3, 112, 112))], for_training=False)
        mod.set_params(arg2, aux2, allow_missing=False, allow_extra=False)  # strict: names and shapes agree
        mod.forward(mx.io.DataBatch([mx.nd.array(data)]), is_train=False)
        outs[dst] = mod.get_outputs()[0].asnumpy()
    # float32 through a randomly-initialised net: agreement to float32 accumulation error, not bit-exact
    np.testing.assert_allclose(outs["fast"], outs["stock"], rtol=1e-4, atol=1e-4 * np.abs(outs["stock"]).max())


def test_bn_layer_aux_states_and_stock_graph():
    sym = _layer("bn_plain", 8)
    assert sym.list_arguments() == ["x", "p_gamma"]
    assert sym.list_auxiliary_states() == ["p_unit_moving_mean", "p_unit_moving_var"]
    stock, _, aux = checkpoint_form(sym, {}, {"p_unit_moving_mean": mx.nd.zeros(8)})
    assert stock.list_arguments() == ["x", "p_gamma"] and stock.list_auxiliary_states() == [] and aux == {}
    assert [n["op"] for n in json.loads(stock.tojson())["nodes"]] == ["null", "null", "LeakyReLU"]


def test_bn_checkpoint_has_insightface_names_and_loads_into_every_graph(tmp_path, params_contract):
    """A checkpoint from a prelu='bn' graph (as callbacks.save_model writes it) is insightface's y1 exactly, and
    loads strictly into the stock and fast graphs, and into the bn graph once the unit states are filled."""
    batch = 2
    arg, aux, data = _random_params("y1", batch, seed=3)
    sym = get_symbol("y1", prelu="bn")
    mod = mx.mod.Module(sym, label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", (batch, 3, 112, 112))], for_training=False)
    nd = lambda d: {k: mx.nd.array(v) for k, v in d.items()}  # noqa: E731
    mod.set_params(nd(arg), fill_unit_aux(sym, nd(aux)), allow_missing=False, allow_extra=False)
    arg_b, aux_b = mod.get_params()
    prefix = str(tmp_path / "from_bn")
    save_checkpoint(prefix, 1, *checkpoint_form(sym, arg_b, aux_b))
    saved_sym, arg2, aux2 = load_checkpoint(prefix, 1)
    want = params_contract["y1"]
    shapes = saved_sym.infer_shape(data=tuple(want["input"]))
    assert dict(zip(saved_sym.list_arguments(), map(list, shapes[0]))) == dict(want["arguments"])
    assert dict(zip(saved_sym.list_auxiliary_states(), map(list, shapes[2]))) == dict(want["auxiliary_states"])
    assert set(arg2) | {"data"} == set(dict(want["arguments"])) and set(aux2) == set(dict(want["auxiliary_states"]))
    outs = {}
    for mode in ("stock", "fast", "bn"):
        target = get_symbol("y1", prelu=mode)
        m = mx.mod.Module(target, label_names=None, context=mx.cpu())
        m.bind(data_shapes=[("data", (batch, 3, 112, 112))], for_training=False)
        m.set_params(arg2, fill_unit_aux(target, aux2), allow_missing=False, allow_extra=False)
        m.forward(mx.io.DataBatch([mx.nd.array(data)]), is_train=False)
        outs[mode] = m.get_outputs()[0].asnumpy()
    for mode in ("fast", "bn"):
        np.testing.assert_allclose(outs[mode], outs["stock"], rtol=1e-4, atol=1e-4 * np.abs(outs["stock"]).max(),
                                   err_msg=mode)
