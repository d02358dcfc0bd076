"""Model-parallel fc7 and Partial FC against single-device training built from heads.build_train_symbol."""
import mxnet as mx
import numpy as np
import pytest

from recognition.common import ToolkitError
from recognition.heads import build_train_symbol, make_loss_config
from recognition.parallel_fc import ModelParallelFC, ParallelModule, split_classes

CTX2 = [mx.cpu(0), mx.cpu(1)]
OPT = dict(learning_rate=0.1, momentum=0.9, wd=5e-4)
EMB, SHAPE = 8, (3, 8, 8)


def small_net(emb=EMB):
    """BatchNorm-free embedding net (B, 3, 8, 8) -> fc1 (B, emb): per-device batch statistics cannot differ."""
    data = mx.sym.Variable("data")
    body = mx.sym.Convolution(data, num_filter=4, kernel=(3, 3), pad=(1, 1), name="conv0")
    body = mx.sym.Activation(body, act_type="relu")
    return mx.sym.FullyConnected(mx.sym.flatten(body), num_hidden=emb, name="fc1")


def init_params(num_classes, emb=EMB, seed=0, bias=False):
    rng = np.random.RandomState(seed)
    arg = {"conv0_weight": rng.normal(0, 0.3, (4, 3, 3, 3)), "conv0_bias": rng.normal(0, 0.1, (4,)),
           "fc1_weight": rng.normal(0, 0.1, (emb, 4 * 8 * 8)), "fc1_bias": rng.normal(0, 0.1, (emb,)),
           "fc7_weight": rng.normal(0, 0.5, (num_classes, emb))}
    if bias:
        arg["fc7_bias"] = rng.normal(0, 0.1, (num_classes,))
    return {k: mx.nd.array(v.astype(np.float32)) for k, v in arg.items()}


def batches(num_classes, batch=6, steps=2, seed=1):
    rng = np.random.RandomState(seed)
    return [mx.io.DataBatch(data=[mx.nd.array(rng.uniform(-1, 1, (batch,) + SHAPE).astype(np.float32))],
                            label=[mx.nd.array(rng.randint(0, num_classes, batch).astype(np.float32))])
            for _ in range(steps)]


def reference_run(cfg, num_classes, arg, data, ctx=None, aux=None, embedding=None):
    """Single-symbol training (train.py's path): build_train_symbol + Module, rescale_grad = 1/devices."""
    ctx = ctx or (mx.cpu(0),)
    sym, _ = build_train_symbol(embedding if embedding is not None else small_net(), num_classes, cfg)
    mod = mx.mod.Module(sym, context=list(ctx))
    mod.bind(data_shapes=[("data", data[0].data[0].shape)], label_shapes=[("softmax_label", data[0].label[0].shape)])
    mod.init_params(arg_params={k: v.copy() for k, v in arg.items()}, aux_params=aux, allow_missing=aux is None)
    mod.init_optimizer(kvstore="device", optimizer="sgd", optimizer_params=dict(OPT, rescale_grad=1.0 / len(ctx)))
    losses = []
    for b in data:
        mod.forward(b, is_train=True)
        # read before backward: with MKLDNN, BatchNorm moving statistics were seen not to update otherwise
        prob = mod.get_outputs()[0].asnumpy()
        mod.backward()
        lab = b.label[0].asnumpy().astype(int)
        losses.append(-np.log(prob[np.arange(len(lab)), lab]).mean())
        mod.update()
    return losses, mod.get_params()


def parallel_run(cfg, num_classes, arg, data, ctx=CTX2, aux=None, embedding=None, **kw):
    emb_sym = embedding if embedding is not None else small_net()
    shape = data[0].data[0].shape
    mod = ParallelModule(emb_sym, num_classes, cfg, ctx, shape[0], data_shape=shape[1:], **kw)
    fc7 = {k: v for k, v in arg.items() if k.startswith("fc7")}
    mod.init_params(arg_params={k: v.copy() for k, v in arg.items()}, aux_params=aux, fc7=fc7,
                    allow_missing=aux is None)
    mod.init_optimizer(kvstore="device", optimizer="sgd", optimizer_params=dict(OPT))
    losses = []
    for b in data:
        loss, _ = mod.forward_backward(b)
        losses.append(loss.mean())
        mod.update()
    return losses, mod.get_params(), mod


def assert_params_close(ref, got, rtol=1e-4, atol=1e-6):
    assert set(ref) == set(got), (sorted(ref), sorted(got))
    for name in ref:
        np.testing.assert_allclose(got[name].asnumpy(), ref[name].asnumpy(), rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("loss", ["arcface", "cosface", "combined", "nsoftmax", "softmax", "sphereface"])
def test_two_shards_match_single_device(loss):
    num_classes = 10
    cfg = make_loss_config(loss, margin_s=8.0) if loss != "softmax" else make_loss_config(loss)
    arg = init_params(num_classes, bias=loss == "softmax")
    data = batches(num_classes)
    ref_loss, (ref_arg, _) = reference_run(cfg, num_classes, arg, data)
    par_loss, (par_arg, _), mod = parallel_run(cfg, num_classes, arg, data)
    np.testing.assert_allclose(par_loss, ref_loss, rtol=1e-4)
    assert_params_close(ref_arg, par_arg)
    # the shards really are shards: each device holds its own rows only
    assert [s.names[0] for s in mod.fc.shards] == ["fc7_shard0_weight", "fc7_shard1_weight"]
    assert [s.get_rows()[0].shape[0] for s in mod.fc.shards] == [5, 5]
    assert ref_arg["fc7_weight"].shape == (10, EMB) and not np.allclose(ref_arg["fc7_weight"].asnumpy(),
                                                                         arg["fc7_weight"].asnumpy())


def test_odd_class_count_three_devices_uneven():
    """7 classes on 2 shards (4 + 3 rows) and on 3 shards (3 + 2 + 2)."""
    assert split_classes(7, 2) == [(0, 4), (4, 7)]
    assert split_classes(7, 3) == [(0, 3), (3, 5), (5, 7)]
    cfg = make_loss_config("arcface", margin_s=8.0)
    arg = init_params(7, seed=3)
    data = batches(7, batch=6, seed=4)
    ref_loss, (ref_arg, _) = reference_run(cfg, 7, arg, data)
    for ctx in (CTX2, [mx.cpu(0), mx.cpu(1), mx.cpu(2)]):
        par_loss, (par_arg, _), mod = parallel_run(cfg, 7, arg, data, ctx=ctx)
        np.testing.assert_allclose(par_loss, ref_loss, rtol=1e-4)
        assert_params_close(ref_arg, par_arg)


def test_batchnorm_backbone_matches_data_parallel_reference():
    """With BatchNorm, per-device batch statistics: compare with train.py's data-parallel path on the same 2
    devices (replicated fc7, SoftmaxOutput normalization='valid', rescale_grad=1/2)."""
    from recognition.backbones import get_symbol

    emb_sym = get_symbol("tiny", emb_size=16, dropout=0.0)  # dropout masks are random
    num_classes = 6
    rng = np.random.RandomState(0)
    data = [mx.io.DataBatch(data=[mx.nd.array(rng.uniform(0, 255, (4, 3, 112, 112)).astype(np.float32))],
                            label=[mx.nd.array(np.array([0, 5, 2, 3], dtype=np.float32))])]
    arg_shapes, _, aux_shapes = emb_sym.infer_shape(data=(1, 3, 112, 112))
    arg = {n: mx.nd.array(rng.normal(0, 0.1, s).astype(np.float32))
           for n, s in zip(emb_sym.list_arguments(), arg_shapes) if n != "data"}
    aux = {n: mx.nd.ones(s) if n.endswith("var") else mx.nd.zeros(s)
           for n, s in zip(emb_sym.list_auxiliary_states(), aux_shapes)}
    arg["fc7_weight"] = mx.nd.array(rng.normal(0, 0.5, (num_classes, 16)).astype(np.float32))
    cfg = make_loss_config("arcface", margin_s=16.0)
    ref_loss, (ref_arg, ref_aux) = reference_run(cfg, num_classes, arg, data, ctx=CTX2, aux=aux, embedding=emb_sym)
    par_loss, (par_arg, par_aux), _ = parallel_run(cfg, num_classes, arg, data, aux=aux, embedding=emb_sym)
    np.testing.assert_allclose(par_loss, ref_loss, rtol=1e-4)
    assert_params_close(ref_arg, par_arg, atol=1e-5)
    # moving statistics are not compared: under MXNet 1.9.1 + MKLDNN a Module's BatchNorm moving mean was seen
    # to stay unchanged or not depending on when outputs are read (engine timing), in either code path
    assert sorted(ref_aux) == sorted(par_aux)


def test_partial_fc_ratio_one_equals_module_path():
    """The sampled (memory bank + executor) code path with r=1 reproduces the Module-per-device path."""
    cfg = make_loss_config("arcface", margin_s=8.0)
    arg = init_params(9, seed=5)
    data = batches(9, steps=3, seed=6)
    full_loss, (full_arg, _), _ = parallel_run(cfg, 9, arg, data)
    pfc_loss, (pfc_arg, _), mod = parallel_run(cfg, 9, arg, data, sample_ratio=1.0, sampled=True)
    assert mod.fc.sampled
    np.testing.assert_allclose(pfc_loss, full_loss, rtol=1e-5)
    assert_params_close(full_arg, pfc_arg, rtol=1e-5)


def _numpy_sampled_loss(emb, weight, labels, cols, s, m):
    """ArcFace loss over the sampled columns ``cols`` (global class ids) only."""
    ne = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    nw = weight[cols] / np.linalg.norm(weight[cols], axis=1, keepdims=True)
    cos = ne @ nw.T
    tgt = np.searchsorted(cols, labels)
    assert (cols[tgt] == labels).all()
    theta = np.arccos(np.clip(cos[np.arange(len(labels)), tgt], -1, 1))
    logits = s * cos
    logits[np.arange(len(labels)), tgt] = s * np.cos(theta + m)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), tgt]


def test_partial_fc_samples_positives_and_updates_only_sampled_rows():
    num_classes, batch = 40, 6
    cfg = make_loss_config("arcface", margin_s=8.0, margin_m=0.3)
    fc = ModelParallelFC(num_classes, EMB, cfg, CTX2, batch, sample_ratio=0.25, seed=7)
    rng = np.random.RandomState(8)
    weight = rng.normal(0, 1, (num_classes, EMB)).astype(np.float32)
    fc.init_params({"fc7_weight": mx.nd.array(weight)})
    fc.init_optimizer("sgd", dict(learning_rate=0.5, momentum=0.9, wd=1e-3))
    emb = rng.normal(0, 1, (batch, EMB)).astype(np.float32)
    labels = np.array([0, 3, 3, 21, 39, 25], dtype=np.float32)
    loss, pred, grad = fc.forward_backward(mx.nd.array(emb), labels)
    cols = np.concatenate([s.lo + s.sampled for s in fc.shards])
    assert [len(s.sampled) for s in fc.shards] == [5, 5]  # ceil(0.25 * 20)
    assert set(labels.astype(int)) <= set(cols)  # every positive centre is sampled
    np.testing.assert_allclose(loss, _numpy_sampled_loss(emb, weight, labels.astype(int), cols, 8.0, 0.3),
                               rtol=1e-4)
    assert set(pred) <= set(cols) and grad.shape == (batch, EMB)
    fc.update()
    new = fc.get_fc7()["fc7_weight"].asnumpy()
    changed = np.flatnonzero(np.abs(new - weight).max(axis=1) > 0)
    np.testing.assert_array_equal(changed, np.sort(cols))
    for shard in fc.shards:  # momentum exists only for the sampled rows
        mom = shard.states[0].asnumpy()
        assert set(np.flatnonzero(np.abs(mom).max(axis=1) > 0)) == set(shard.sampled)
    # the next step draws other negatives
    fc.forward_backward(mx.nd.array(emb), labels)
    assert not np.array_equal(np.concatenate([s.lo + s.sampled for s in fc.shards]), cols)


def test_bad_input_messages():
    cfg = make_loss_config("arcface")
    with pytest.raises(ToolkitError, match=r"--ctx: 3 devices but only 2 classes"):
        ModelParallelFC(2, EMB, cfg, [mx.cpu(0), mx.cpu(1), mx.cpu(2)], 4)
    with pytest.raises(ToolkitError, match=r"--sample-ratio: must be in \(0, 1\], got 0"):
        ModelParallelFC(10, EMB, cfg, CTX2, 4, sample_ratio=0)
    with pytest.raises(ToolkitError, match=r"--sample-ratio: must be in \(0, 1\], got 1.5"):
        ModelParallelFC(10, EMB, cfg, CTX2, 4, sample_ratio=1.5)
    fc = ModelParallelFC(10, EMB, cfg, CTX2, 4)
    with pytest.raises(ToolkitError, match=r"fc7: fc7_weight has shape \(9, 8\), expected \(10, 8\)"):
        fc.init_params({"fc7_weight": mx.nd.zeros((9, EMB))})
    with pytest.raises(ToolkitError, match="--loss triplet: model-parallel fc7 needs a classification loss"):
        ModelParallelFC(10, EMB, make_loss_config("triplet"), CTX2, 4)
