"""Margin heads: forward values and gradients against numpy references written from the papers' formulas."""
import math

import mxnet as mx
import numpy as np
import pytest

from recognition.common import ToolkitError
from recognition.heads import (
    CLASSIFICATION_LOSSES,
    LOSSES,
    build_train_symbol,
    make_loss_config,
    margin_target_logit,
    sphere_lambda_at,
)

CLS_LOSSES = list(CLASSIFICATION_LOSSES)  # from the objectives registry


# ---------------------------------------------------------------- numpy references (independent of heads.py)
def ref_target(cos, cfg):
    """Margin-modified target cosine, float64, straight from the formulas in the papers."""
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    m1, m2, m3 = cfg.margin_a, cfg.margin_m, cfg.margin_b
    if cfg.loss == "sphereface":
        k = np.floor(m1 * theta / np.pi)
        psi = (-1.0) ** k * np.cos(m1 * theta) - 2.0 * k
        lam = cfg.sphere_lambda
        return (lam * cos + psi) / (1.0 + lam)
    if cfg.loss == "arcface":
        plain = np.cos(theta + m2)
        if cfg.easy_margin:
            return np.where(cos > 0, plain, cos)
        return np.where(theta < np.pi - m2, plain, cos - m2 * np.sin(m2))
    return np.cos(m1 * theta + m2) - m3


def ref_logits(x, w, b, label, cfg):
    """(B, C) logits of the head."""
    if cfg.loss == "softmax":
        return x @ w.T + (b if b is not None else 0.0)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    if cfg.loss != "nsoftmax":
        rows = np.arange(len(label))
        cos = cos.copy()
        cos[rows, label] = ref_target(cos[rows, label], cfg)
    return cfg.margin_s * cos


def ref_ce(x, w, b, label, cfg):
    z = ref_logits(x, w, b, label, cfg)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(label)), label].mean()


def num_grad(f, a, eps=1e-6):
    g = np.zeros_like(a)
    for idx in np.ndindex(*a.shape):
        old = a[idx]
        a[idx] = old + eps
        hi = f()
        a[idx] = old - eps
        lo = f()
        a[idx] = old
        g[idx] = (hi - lo) / (2 * eps)
    return g


# ---------------------------------------------------------------- helpers
def run(sym, arrays, grads=("emb",)):
    """Bind ``sym`` to numpy ``arrays``, forward (train) + backward; return outputs and the named gradients."""
    args = {k: mx.nd.array(v) for k, v in arrays.items()}
    grad_arrays = {k: mx.nd.zeros(v.shape) for k, v in arrays.items() if k in grads}
    req = {k: ("write" if k in grads else "null") for k in sym.list_arguments()}
    aux = {k: mx.nd.zeros(s) for k, s in zip(sym.list_auxiliary_states(),
                                               sym.infer_shape(**{k: v.shape for k, v in arrays.items()})[2])}
    ex = sym.bind(mx.cpu(), args=args, args_grad=grad_arrays, grad_req=req, aux_states=aux)
    ex.forward(is_train=True)
    ex.backward()
    return [o.asnumpy() for o in ex.outputs], {k: v.asnumpy() for k, v in grad_arrays.items()}, ex


def head_inputs(rng, b=6, e=8, c=5):
    x = rng.standard_normal((b, e))
    w = rng.standard_normal((c, e))
    bias = rng.standard_normal(c)
    label = rng.integers(0, c, size=b)
    return x, w, bias, label


# ---------------------------------------------------------------- margin_target_logit
@pytest.mark.parametrize("name,kw", [("arcface", {}), ("arcface", dict(easy_margin=True)), ("cosface", {}),
                                     ("combined", {}), ("sphereface", {}), ("sphereface", dict(sphere_lambda=5.0)),
                                     ("combined", dict(m1=1.35, m2=0.0, m3=0.0))])
def test_margin_target_value_and_grad(name, kw):
    cfg = make_loss_config(name, **kw)
    cos_grid = np.linspace(-0.999, 0.999, 401)
    # drop points within 2e-3 of a kink (ArcFace threshold, easy-margin switch, SphereFace k changes)
    kinks = [math.cos(math.pi - cfg.margin_m), 0.0] + [math.cos(j * math.pi / cfg.margin_a)
                                                        for j in range(1, int(cfg.margin_a))]
    cos_grid = cos_grid[np.min(np.abs(cos_grid[:, None] - np.array(kinks)[None]), axis=1) > 2e-3]
    sym = margin_target_logit(mx.sym.Variable("cos"), cfg)
    # MakeLoss passes a gradient of ones: the input gradient is d target / d cos
    (out,), grads, _ = run(mx.sym.Group([mx.sym.MakeLoss(sym)]), {"cos": cos_grid}, grads=("cos",))
    np.testing.assert_allclose(out, ref_target(cos_grid, cfg), rtol=1e-4, atol=2e-5)
    eps = 1e-7
    fd = (ref_target(cos_grid + eps, cfg) - ref_target(cos_grid - eps, cfg)) / (2 * eps)
    np.testing.assert_allclose(grads["cos"], fd, rtol=2e-3, atol=2e-4)


def test_arcface_threshold_keeps_target_monotonic():
    cfg = make_loss_config("arcface", m2=0.5)
    cos_grid = np.linspace(-1.0, 1.0, 2001)
    (out,), _, _ = run(mx.sym.Group([margin_target_logit(mx.sym.Variable("cos"), cfg)]), {"cos": cos_grid}, ())
    assert np.all(np.diff(out) >= -1e-6), "target logit must not decrease as cos grows"
    # beyond the threshold cos(pi - m) the fallback is cos - m sin m (insightface's "mm")
    far = cos_grid < math.cos(math.pi - 0.5) - 1e-3
    np.testing.assert_allclose(out[far], cos_grid[far] - 0.5 * math.sin(0.5), atol=1e-6)


def test_sphereface_psi_monotonic():
    cfg = make_loss_config("sphereface")
    cos_grid = np.linspace(-1.0, 1.0, 2001)
    (out,), _, _ = run(mx.sym.Group([margin_target_logit(mx.sym.Variable("cos"), cfg)]), {"cos": cos_grid}, ())
    assert np.all(np.diff(out) >= -1e-4)
    assert out[0] == pytest.approx(-2 * 4 + 1, abs=1e-3)  # psi(pi) = -2m + 1 for m = 4 (k = 3 at theta -> pi-)


# ---------------------------------------------------------------- whole head
@pytest.mark.parametrize("name", CLS_LOSSES)
def test_head_forward_and_gradient_match_numpy(name):
    rng = np.random.default_rng(1)
    x, w, bias, label = head_inputs(rng)
    cfg = make_loss_config(name, margin_s=4.0) if name != "softmax" else make_loss_config(name)
    sym, info = build_train_symbol(mx.sym.Variable("emb"), 5, cfg, emb_size=8)
    arrays = {"emb": x, "fc7_weight": w, "softmax_label": label.astype(np.float64)}
    use_bias = name == "softmax"
    if use_bias:
        arrays["fc7_bias"] = bias
    outs, grads, _ = run(sym, arrays, grads=("emb", "fc7_weight"))
    z = ref_logits(x, w, bias if use_bias else None, label, cfg)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(outs[0], p, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[1], x, rtol=1e-6)  # BlockGrad(embedding)
    b = bias if use_bias else None
    gx = num_grad(lambda: ref_ce(x, w, b, label, cfg), x)
    gw = num_grad(lambda: ref_ce(x, w, b, label, cfg), w)
    np.testing.assert_allclose(grads["emb"], gx, rtol=2e-3, atol=2e-5)
    np.testing.assert_allclose(grads["fc7_weight"], gw, rtol=2e-3, atol=2e-5)
    assert info["metric"] == "acc"
    assert info["fc7_params"] == (["fc7_weight", "fc7_bias"] if use_bias else ["fc7_weight"])
    assert info["outputs"] == ["softmax_output", "emb_emb_output"]


@pytest.mark.parametrize("name", ["nsoftmax", "arcface", "cosface", "combined", "sphereface"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_head_finite_when_embedding_on_or_opposite_class_weight(name, sign):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 4))
    label = np.array([0, 1, 2, 0])
    x = sign * w[label] * 3.0  # theta exactly 0 (or pi) for the target class
    cfg = make_loss_config(name, easy_margin=False)
    sym, _ = build_train_symbol(mx.sym.Variable("emb"), 3, cfg, emb_size=4)
    outs, grads, _ = run(sym, {"emb": x, "fc7_weight": w, "softmax_label": label.astype(float)},
                         grads=("emb", "fc7_weight"))
    for arr in [outs[0], grads["emb"], grads["fc7_weight"]]:
        assert np.all(np.isfinite(arr))
    z = ref_logits(x, w, None, label, cfg)
    p = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(outs[0], p / p.sum(1, keepdims=True), atol=1e-3)


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_builds_and_trains_one_step(name):
    rng = np.random.default_rng(3)
    emb = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=6, name="fc1")
    cfg = make_loss_config(name, images_per_identity=2, fc7_lr_mult=2.0, fc7_wd_mult=0.5)
    sym, info = build_train_symbol(emb, 4, cfg)  # embedding size read from the graph
    data = rng.standard_normal((8, 5))
    label = np.repeat(np.arange(4), 2).astype(float)
    arrays = {"data": data, "softmax_label": label}
    shapes = dict(zip(sym.list_arguments(), sym.infer_shape(data=(8, 5), softmax_label=(8,))[0]))
    for k in sym.list_arguments():
        if k not in arrays:
            arrays[k] = rng.standard_normal(shapes[k]) * 0.5
    outs, grads, _ = run(sym, arrays, grads=("fc1_weight",))
    assert all(np.all(np.isfinite(o)) for o in outs)
    assert np.all(np.isfinite(grads["fc1_weight"])) and np.abs(grads["fc1_weight"]).sum() > 0
    assert sym.list_outputs()[1] == "fc1_emb_output"
    attrs = sym.attr_dict()
    for p in info["fc7_params"]:
        assert float(attrs[p]["__lr_mult__"]) == 2.0 and float(attrs[p]["__wd_mult__"]) == 0.5
    assert info["metric"] == ("loss" if name in ("triplet", "atriplet") else "acc")
    assert info["outputs"] == sym.list_outputs()


def test_module_initialises_head_with_global_initializer():
    emb = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=6, name="fc1")
    sym, _ = build_train_symbol(emb, 4, make_loss_config("arcface", center_loss_weight=0.1))
    mod = mx.mod.Module(sym, context=mx.cpu(), data_names=["data"], label_names=["softmax_label"])
    mod.bind(data_shapes=[("data", (4, 5))], label_shapes=[("softmax_label", (4,))])
    mod.init_params(mx.init.Xavier())
    arg, aux = mod.get_params()
    assert arg["fc7_weight"].shape == (4, 6) and float(arg["fc7_weight"].asnumpy().std()) < 0.05  # Normal(0.01)
    assert np.all(aux["center_loss_centers"].asnumpy() == 0)


# ---------------------------------------------------------------- config
def test_defaults_follow_insightface():
    arc = make_loss_config("arcface")
    assert (arc.margin_s, arc.m1, arc.m2, arc.m3, arc.fc7_no_bias) == (64.0, 1.0, 0.5, 0.0, True)
    cos = make_loss_config("cosface")
    assert (cos.m1, cos.m2, cos.m3) == (1.0, 0.0, 0.35)
    comb = make_loss_config("combined")
    assert (comb.m1, comb.m2, comb.m3) == (1.0, 0.3, 0.2)
    assert make_loss_config("sphereface").m1 == 4.0
    assert make_loss_config("softmax").fc7_no_bias is False
    ns = make_loss_config("nsoftmax")
    assert (ns.margin_s, ns.m1, ns.m2, ns.m3) == (64.0, 1.0, 0.0, 0.0)
    assert make_loss_config("arcface", m2=0.3, margin_s=None).margin_m == 0.3


def test_unknown_loss_lists_names():
    with pytest.raises(ToolkitError, match=r"unknown loss 'arcfcae'.*softmax, nsoftmax, arcface.*atriplet"):
        make_loss_config("arcfcae")
    cfg = make_loss_config("arcface")
    cfg.loss = "bogus"
    with pytest.raises(ToolkitError, match="unknown loss 'bogus'"):
        build_train_symbol(mx.sym.Variable("emb"), 3, cfg, emb_size=4)


@pytest.mark.parametrize("name,kw,msg", [
    ("arcface", dict(m2=2.0), r"--margin-m \(m2\)"),
    ("cosface", dict(margin_s=0.0), "--margin-s"),
    ("arcface", dict(bogus=1), "unknown field 'bogus'"),
    ("triplet", dict(images_per_identity=1), "--images-per-identity"),
    ("triplet", dict(triplet_mining="easy"), "--triplet-mining"),
    ("sphereface", dict(m1=2.5), "integer m1"),
])
def test_bad_config_is_one_line_error(name, kw, msg):
    with pytest.raises(ToolkitError, match=msg) as exc:
        make_loss_config(name, **kw)
    assert "\n" not in str(exc.value)


def test_embedding_size_must_be_known():
    with pytest.raises(ToolkitError, match="pass emb_size="):
        build_train_symbol(mx.sym.Variable("emb"), 3, make_loss_config("arcface"))
    with pytest.raises(ToolkitError, match="num_classes"):
        build_train_symbol(mx.sym.Variable("emb"), 1, make_loss_config("arcface"), emb_size=4)


def test_sphere_lambda_schedule():
    cfg = make_loss_config("sphereface", beta=1000.0, beta_min=5.0, gamma=0.12, power=1.0, beta_freeze=10)
    assert sphere_lambda_at(cfg, 0) == 1000.0
    assert sphere_lambda_at(cfg, 10 + 100) == pytest.approx(1000.0 / (1 + 0.12 * 100))
    assert sphere_lambda_at(cfg, 10 ** 6) == 5.0


# ---------------------------------------------------------------- center loss (Wen et al. 2016)
def test_center_loss_value_gradient_and_centre_update():
    rng = np.random.default_rng(4)
    x, w, _, _ = head_inputs(rng, b=6, e=4, c=3)
    label = np.array([0, 0, 1, 2, 2, 2])
    centres = rng.standard_normal((3, 4))
    weight, alpha = 0.3, 0.5
    cfg = make_loss_config("arcface", margin_s=4.0, center_loss_weight=weight, center_alpha=alpha)
    sym, info = build_train_symbol(mx.sym.Variable("emb"), 3, cfg, emb_size=4)
    assert info["aux_params"] == ["center_loss_centers"] and info["outputs"][-1] == "center_loss_output"
    ex = sym.bind(mx.cpu(), args={"emb": mx.nd.array(x), "fc7_weight": mx.nd.array(w),
                                  "softmax_label": mx.nd.array(label)},
                  args_grad={"emb": mx.nd.zeros(x.shape)},
                  grad_req={"emb": "write", "fc7_weight": "null", "softmax_label": "null"},
                  aux_states={"center_loss_centers": mx.nd.array(centres)})
    ex.forward(is_train=True)
    ex.backward()
    diff = x - centres[label]
    np.testing.assert_allclose(ex.outputs[2].asnumpy(), [weight * 0.5 * (diff ** 2).sum(1).mean()], rtol=1e-5)
    # embedding gradient = softmax part (numpy FD) + weight * (x - c_y) / B
    g_soft = num_grad(lambda: ref_ce(x, w, None, label, cfg), x)
    np.testing.assert_allclose(ex.grad_dict["emb"].asnumpy(), g_soft + weight * diff / len(x), rtol=2e-3, atol=2e-5)
    # centre update, Wen et al. Eq. 4: c_j -= alpha * sum_{y_i=j}(c_j - x_i) / (1 + n_j)
    expect = centres.copy()
    for j in range(3):
        sel = label == j
        expect[j] -= alpha * (centres[j] - x[sel]).sum(0) / (1 + sel.sum())
    np.testing.assert_allclose(ex.aux_dict["center_loss_centers"].asnumpy(), expect, rtol=1e-5, atol=1e-6)
    # inference (no backward) leaves the centres alone
    ex.forward(is_train=False)
    np.testing.assert_allclose(ex.aux_dict["center_loss_centers"].asnumpy(), expect, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- real checkpoint
def test_arcface_head_on_real_checkpoint(fixture_model):
    from recognition.common import load_checkpoint

    sym, arg, aux = load_checkpoint(fixture_model, 0)
    emb_sym = sym.get_internals()["fc1_output"]
    rng = np.random.default_rng(6)
    data = rng.uniform(0, 255, size=(3, 3, 112, 112)).astype(np.float32)
    label = np.array([0, 1, 2])
    # second code path: the backbone alone, then the head in numpy
    backbone = mx.mod.Module(emb_sym, context=mx.cpu(), label_names=None)
    backbone.bind(data_shapes=[("data", data.shape)], for_training=False)
    backbone.set_params(arg, aux, allow_missing=False, allow_extra=True)
    backbone.forward(mx.io.DataBatch([mx.nd.array(data)]), is_train=False)
    x = backbone.get_outputs()[0].asnumpy().astype(np.float64)
    w = rng.standard_normal((4, x.shape[1]))
    cfg = make_loss_config("arcface")
    head, info = build_train_symbol(emb_sym, 4, cfg)  # E = 128 read from the real graph
    mod = mx.mod.Module(head, context=mx.cpu())
    mod.bind(data_shapes=[("data", data.shape)], label_shapes=[("softmax_label", (3,))], for_training=False)
    mod.set_params(dict(arg, fc7_weight=mx.nd.array(w)), aux, allow_missing=False, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(data)], [mx.nd.array(label)]), is_train=False)
    prob, emb = (o.asnumpy() for o in mod.get_outputs())
    np.testing.assert_allclose(emb, x, rtol=1e-4, atol=1e-4)
    z = ref_logits(x, w, None, label, cfg)
    p = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(prob, p / p.sum(1, keepdims=True), atol=2e-3)


@pytest.mark.parametrize("name,kw", [("arcface", dict(center_loss_weight=0.1)), ("sphereface", {}),
                                     ("triplet", {})])
def test_training_symbol_json_round_trip(tmp_path, name, kw):
    emb = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=6, name="fc1")
    sym, _ = build_train_symbol(emb, 4, make_loss_config(name, **kw))
    path = str(tmp_path / "train-symbol.json")
    sym.save(path)
    loaded = mx.sym.load(path)
    assert loaded.list_outputs() == sym.list_outputs()
    assert loaded.infer_shape(data=(4, 5), softmax_label=(4,)) == sym.infer_shape(data=(4, 5), softmax_label=(4,))
