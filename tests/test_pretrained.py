"""load_pretrained on every kind of checkpoint, the load report, the meta sidecar and fc7 imprinting."""
import json
import logging
import os

import mxnet as mx
import numpy as np
import pytest

from recognition.common import ToolkitError, save_checkpoint
from recognition.pretrained import LoadReport, imprint_fc7, load_pretrained, read_meta, write_meta

SHAPE = (3, 16, 16)


def tiny_embedding(emb=8):
    """insightface-style names: conv0/bn0/relu0 stem, stage1_unit1, bn1 -> pre_fc1 FC -> fc1 BN (fc1_output)."""
    data = mx.sym.Variable("data")
    x = (data - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), stride=(2, 2), pad=(1, 1), no_bias=True, name="conv0")
    x = mx.sym.BatchNorm(x, fix_gamma=False, eps=2e-5, name="bn0")
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="relu0")
    x = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), pad=(1, 1), no_bias=True, name="stage1_unit1_conv1")
    x = mx.sym.BatchNorm(x, fix_gamma=False, eps=2e-5, name="stage1_unit1_bn1")
    x = mx.sym.Activation(x, act_type="relu", name="stage1_unit1_relu1")
    x = mx.sym.BatchNorm(x, fix_gamma=False, eps=2e-5, name="bn1")
    x = mx.sym.FullyConnected(x, num_hidden=emb, name="pre_fc1")
    return mx.sym.BatchNorm(x, fix_gamma=True, eps=2e-5, name="fc1")


def with_head(emb_sym, num_classes, fc7_name="fc7", bias=False):
    fc7 = mx.sym.FullyConnected(emb_sym, num_hidden=num_classes, no_bias=not bias, name=fc7_name)
    return mx.sym.SoftmaxOutput(fc7, name="softmax")


def random_params(sym, seed=0, shape=SHAPE):
    """Seeded random arguments and BN statistics for ``sym`` at input (1,)+shape."""
    rng = np.random.RandomState(seed)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1,) + tuple(shape))
    arg = {n: mx.nd.array(rng.randn(*s) * 0.3) for n, s in zip(sym.list_arguments(), arg_shapes)
           if n != "data" and not n.endswith("label")}
    aux = {n: mx.nd.array(rng.uniform(0.5, 1.5, s) if n.endswith("var") else rng.randn(*s) * 0.1)
           for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
    return arg, aux


def make_ckpt(tmp_path, name="model", num_classes=10, emb=8, fc7_name="fc7", slim=False, bias=False, seed=0):
    sym = tiny_embedding(emb) if slim else with_head(tiny_embedding(emb), num_classes, fc7_name, bias)
    arg, aux = random_params(sym, seed)
    prefix = str(tmp_path / name)
    save_checkpoint(prefix, 0, sym, arg, aux)
    return prefix, sym, arg, aux


def embed(sym, arg, aux, x):
    mod = mx.mod.Module(sym, label_names=None, context=mx.cpu())
    mod.bind([("data", x.shape)], for_training=False)
    mod.set_params(arg, aux, allow_missing=False, allow_extra=True)
    mod.forward(mx.io.DataBatch([mx.nd.array(x)]), is_train=False)
    return mod.get_outputs()[0].asnumpy()


def reference_embedding(prefix, x):
    """Plain MXNet: load_checkpoint + the checkpoint's own graph cut at fc1_output."""
    sym, arg, aux = mx.model.load_checkpoint(prefix, 0)
    return embed(sym.get_internals()["fc1_output"], arg, aux, x)


def batch(n=3, shape=SHAPE, seed=1):
    return np.random.RandomState(seed).uniform(0, 255, (n,) + shape).astype(np.float32)


def test_full_checkpoint_matching_classes_keeps_fc7(tmp_path):
    prefix, _, arg, _ = make_ckpt(tmp_path, num_classes=10)
    p = load_pretrained(prefix + ",0", num_classes=10, data_shape=SHAPE)
    assert list(p.fc7) == ["fc7_weight"]
    np.testing.assert_array_equal(p.fc7["fc7_weight"].asnumpy(), arg["fc7_weight"].asnumpy())
    assert p.embedding_symbol.list_outputs() == ["fc1_output"] and p.emb_size == 8
    assert "fc7_weight" not in p.arg_params and not p.report.dropped and not p.report.reinitialised
    x = batch()
    diff = np.abs(embed(p.embedding_symbol, p.arg_params, p.aux_params, x) - reference_embedding(prefix, x)).max()
    assert diff < 1e-5


def test_other_class_count_drops_fc7_with_reason(tmp_path):
    prefix, *_ = make_ckpt(tmp_path, num_classes=10, bias=True)
    p = load_pretrained(prefix + ",0", num_classes=7, data_shape=SHAPE)
    assert p.fc7 == {} and p.checkpoint_classes == 10
    assert dict(p.report.dropped) == {"fc7_weight": "checkpoint has 10 classes, data has 7",
                                      "fc7_bias": "checkpoint has 10 classes, data has 7"}
    assert "dropped 2" in p.report.format()


def test_fc7_renamed_and_reset(tmp_path):
    prefix, _, arg, _ = make_ckpt(tmp_path, num_classes=10, bias=True)
    p = load_pretrained(prefix + "-0000.params", num_classes=10, fc7_name="fc7_finetune", data_shape=SHAPE)
    assert sorted(p.fc7) == ["fc7_finetune_bias", "fc7_finetune_weight"]
    np.testing.assert_array_equal(p.fc7["fc7_finetune_bias"].asnumpy(), arg["fc7_bias"].asnumpy())
    assert ("fc7_finetune_weight", (10, 8), "fc7_weight") in p.report.renamed
    reset = load_pretrained(prefix + ",0", num_classes=10, reset_fc7=True, data_shape=SHAPE)
    assert reset.fc7 == {} and dict(reset.report.dropped)["fc7_weight"] == "--reset-fc7"


def test_classifier_with_another_name_found_in_graph(tmp_path):
    prefix, _, arg, _ = make_ckpt(tmp_path, num_classes=6, fc7_name="cls_old")
    p = load_pretrained(prefix + ",0", num_classes=6, data_shape=SHAPE)
    np.testing.assert_array_equal(p.fc7["fc7_weight"].asnumpy(), arg["cls_old_weight"].asnumpy())
    assert not p.report.unused


def test_meta_sidecar_roundtrip_and_bad_json(tmp_path):
    prefix = str(tmp_path / "m")
    assert read_meta(prefix) == {}
    write_meta(prefix, fc7_name="fc7_x", num_classes=5, emb_size=8, network="tiny")
    assert read_meta(prefix) == {"fc7_name": "fc7_x", "num_classes": 5, "emb_size": 8, "network": "tiny"}
    with open(prefix + "-meta.json", "w") as f:
        f.write("{broken")
    with pytest.raises(ToolkitError, match=r"m-meta.json: not readable JSON"):
        read_meta(prefix)


def test_slim_checkpoint(tmp_path):
    prefix, *_ = make_ckpt(tmp_path, slim=True)
    p = load_pretrained(prefix + ",0", num_classes=4, data_shape=SHAPE)
    assert p.fc7 == {} and p.checkpoint_classes is None and not p.report.dropped
    assert any("no classifier" in n for n in p.report.notes)
    x = batch()
    assert np.abs(embed(p.embedding_symbol, p.arg_params, p.aux_params, x) - reference_embedding(prefix, x)).max() \
        < 1e-5


def test_emb_size_change_recreates_embedding_layer(tmp_path):
    prefix, _, arg, _ = make_ckpt(tmp_path, num_classes=10, emb=8)
    p = load_pretrained(prefix + ",0", emb_size=6, num_classes=10, data_shape=SHAPE)
    assert p.emb_size == 6 and p.checkpoint_emb_size == 8 and p.fc7 == {}
    reinit = {n: r for n, _, r in p.report.reinitialised}
    assert set(reinit) == {"pre_fc1_weight", "pre_fc1_bias", "fc1_gamma", "fc1_beta", "fc1_moving_mean",
                           "fc1_moving_var"}
    assert reinit["pre_fc1_weight"].startswith("shape (8,256) in checkpoint, (6,256) needed: --emb-size 6")
    assert set(p.missing) == set(reinit)
    assert dict(p.report.dropped)["fc7_weight"] == "embedding size changes 8 -> 6"
    np.testing.assert_array_equal(p.arg_params["conv0_weight"].asnumpy(), arg["conv0_weight"].asnumpy())
    assert p.embedding_symbol.infer_shape(data=(1,) + SHAPE)[1] == [(1, 6)]


def test_gluon_names_are_mapped(tmp_path):
    sym = tiny_embedding()
    arg, aux = random_params(sym)
    blob = {k.replace("relu0_gamma", "relu0_alpha"): v for k, v in arg.items()}
    blob.update({k.replace("moving_", "running_"): v for k, v in aux.items()})
    prefix = str(tmp_path / "gl")
    mx.nd.save(prefix + "-0000.params", blob)  # Gluon save_parameters layout: no arg:/aux: prefixes
    with open(prefix + "-symbol.json", "w") as f:
        f.write(sym.tojson())
    p = load_pretrained(prefix + ",0", data_shape=SHAPE)
    assert ("relu0_gamma", (4,), "relu0_alpha") in p.report.renamed
    assert ("bn0_moving_var", (4,), "bn0_running_var") in p.report.renamed
    x = batch()
    np.testing.assert_allclose(embed(p.embedding_symbol, p.arg_params, p.aux_params, x),
                               embed(sym, arg, aux, x), atol=1e-5)


def test_missing_backbone_param_refused_then_reported(tmp_path):
    prefix, sym, arg, aux = make_ckpt(tmp_path, slim=True)
    del arg["stage1_unit1_conv1_weight"], arg["bn0_beta"]
    save_checkpoint(prefix, 1, sym, arg, aux)
    with pytest.raises(ToolkitError, match=r"2 backbone parameter\(s\) would be re-initialised: "
                                           r"bn0_beta \(not in checkpoint\); stage1_unit1_conv1_weight"):
        load_pretrained(prefix + ",1", data_shape=SHAPE)
    p = load_pretrained(prefix + ",1", allow_missing=True, data_shape=SHAPE)
    assert {n: r for n, _, r in p.report.reinitialised} == {"bn0_beta": "not in checkpoint",
                                                           "stage1_unit1_conv1_weight": "not in checkpoint"}
    assert sorted(p.missing) == ["bn0_beta", "stage1_unit1_conv1_weight"]


def test_shape_mismatch_is_one_line(tmp_path):
    prefix, sym, arg, aux = make_ckpt(tmp_path, slim=True)
    arg["conv0_weight"] = mx.nd.zeros((5, 3, 3, 3))
    save_checkpoint(prefix, 1, None, arg, aux)
    with pytest.raises(ToolkitError) as err:
        load_pretrained(prefix + ",1", data_shape=SHAPE)
    assert "\n" not in str(err.value) and "conv0" in str(err.value)


@pytest.mark.parametrize("spec, message", [
    ("{p}", r"missing ',EPOCH'"),
    ("{p},x", r"epoch 'x' is not an integer"),
    ("{p},3", r"model-0003.params does not exist \(found: model-0000.params\)"),
    ("", r"--pretrained: empty"),
])
def test_bad_spec_messages(tmp_path, spec, message):
    prefix, *_ = make_ckpt(tmp_path, slim=True)
    with pytest.raises(ToolkitError, match=message):
        load_pretrained(spec.format(p=prefix), data_shape=SHAPE)


def test_bad_files_messages(tmp_path):
    prefix, *_ = make_ckpt(tmp_path, slim=True)
    os.remove(prefix + "-symbol.json")
    with pytest.raises(ToolkitError, match=r"model-symbol.json does not exist"):
        load_pretrained(prefix + ",0", data_shape=SHAPE)
    with open(prefix + "-symbol.json", "w") as f:
        f.write("not json")
    with pytest.raises(ToolkitError, match=r"model-symbol.json: not a readable MXNet symbol"):
        load_pretrained(prefix + ",0", data_shape=SHAPE)
    with open(prefix + "-0000.params", "wb") as f:
        f.write(b"\x00garbage")
    with open(prefix + "-symbol.json", "w") as f:
        f.write(tiny_embedding().tojson())
    with pytest.raises(ToolkitError, match=r"model-0000.params: not a readable MXNet params file"):
        load_pretrained(prefix + ",0", data_shape=SHAPE)


def test_graph_without_fc1_output(tmp_path):
    sym = mx.sym.FullyConnected(mx.sym.Variable("data"), num_hidden=4, name="emb")
    prefix = str(tmp_path / "odd")
    save_checkpoint(prefix, 0, sym, {"emb_weight": mx.nd.zeros((4, 768)), "emb_bias": mx.nd.zeros(4)}, {})
    with pytest.raises(ToolkitError, match=r"graph has no 'fc1_output' node \(outputs: emb_output\)"):
        load_pretrained(prefix + ",0", data_shape=SHAPE)


def test_report_format_and_save(tmp_path):
    prefix, *_ = make_ckpt(tmp_path, num_classes=10)
    p = load_pretrained(prefix + ",0", num_classes=3, data_shape=SHAPE)
    json_path, txt_path = p.report.save(str(tmp_path / "run"))
    with open(json_path) as f:
        saved = json.load(f)
    assert saved["counts"] == {"loaded": len(p.report.loaded), "renamed": 0, "reinitialised": 0, "dropped": 1,
                               "unused": 0}
    assert saved["dropped"] == [{"name": "fc7_weight", "reason": "checkpoint has 10 classes, data has 3"}]
    with open(txt_path) as f:
        assert f.read() == p.report.format() + "\n"
    assert isinstance(p.report, LoadReport)
    assert sorted(os.listdir(tmp_path / "run")) == ["load_report.json", "load_report.txt"]


def test_network_tiny_positional_match(tmp_path):
    from recognition.backbones import get_symbol

    # 32x32, not SHAPE: after the registry's tiny ran on 16x16 input, MXNet 1.9.1 segfaults in a later 112x112
    # MobileFaceNet forward in the same process (with or without MKLDNN; reproduced outside the toolkit)
    shape = (3, 32, 32)
    emb_sym = get_symbol("tiny", emb_size=8, prelu="stock")  # a checkpoint graph
    full = with_head(emb_sym, 5)
    arg, aux = random_params(full, seed=3, shape=shape)
    renamed = dict(arg)
    renamed["legacy_conv0_w"] = renamed.pop("conv0_weight")  # a name no rule knows: matched by graph position
    prefix = str(tmp_path / "tinyck")
    graph = json.loads(full.tojson())
    for node in graph["nodes"]:
        if node["name"] == "conv0_weight":
            node["name"] = "legacy_conv0_w"
    save_checkpoint(prefix, 0, mx.sym.load_json(json.dumps(graph)), renamed, aux)
    p = load_pretrained(prefix + ",0", network="tiny", num_classes=5, data_shape=shape)
    assert ("conv0_weight", tuple(arg["conv0_weight"].shape), "legacy_conv0_w") in p.report.renamed
    assert list(p.fc7) == ["fc7_weight"] and not p.report.unused
    x = batch(shape=shape)
    assert np.abs(embed(p.embedding_symbol, p.arg_params, p.aux_params, x) - reference_embedding(prefix, x)).max() \
        < 1e-5
    os.remove(prefix + "-symbol.json")  # no graph: the unknown name cannot be placed -> refused by name
    with pytest.raises(ToolkitError, match=r"1 backbone parameter\(s\) would be re-initialised: conv0_weight"):
        load_pretrained(prefix + ",0", network="tiny", num_classes=5, data_shape=shape)


@pytest.mark.parametrize("network", [None, "y1"])
def test_real_fixture_embeddings_unchanged(fixture_model, network):
    p = load_pretrained(fixture_model + ",0", network=network, num_classes=10)
    assert p.emb_size == 128 and p.fc7 == {} and not p.report.reinitialised and not p.report.unused
    if network == "y1":  # today's builder names the embedding FC pre_fc1_weight; the 2018 checkpoint fc1_weight
        assert ("pre_fc1_weight", (128, 512), "fc1_weight") in p.report.renamed
    x = batch(2, (3, 112, 112))
    ref = reference_embedding(fixture_model, x)
    assert np.abs(embed(p.embedding_symbol, p.arg_params, p.aux_params, x) - ref).max() < 1e-5


def test_real_fixture_emb_size_change(fixture_model):
    p = load_pretrained(fixture_model + ",0", network="y1", emb_size=256)
    reinit = {n: r for n, _, r in p.report.reinitialised}
    assert reinit["pre_fc1_weight"].startswith("shape (128,512) in checkpoint, (256,512) needed: --emb-size 256")
    assert "fc1_weight" in dict(p.report.dropped) and p.emb_size == 256


class _Batch:
    def __init__(self, x, y, pad=0):
        self.data, self.label, self.pad = [mx.nd.array(x)], [mx.nd.array(y)], pad


def test_imprint_fc7_matches_numpy(caplog):
    rng = np.random.RandomState(0)
    proj = rng.randn(12, 5)
    x = rng.randn(10, 3, 2, 2).astype(np.float32)
    y = np.array([0, 1, 1, 2, 0, 2, 2, 1, 0, 3], dtype=np.float32)
    batches = [_Batch(x[:4], y[:4]), _Batch(x[4:8], y[4:8]), _Batch(np.concatenate([x[8:], x[:2]]),
                                                                     np.concatenate([y[8:], y[:2]]), pad=2)]
    embed_fn = lambda b: b.reshape(len(b), -1) @ proj  # noqa: E731

    with caplog.at_level(logging.WARNING):
        w = imprint_fc7(embed_fn, iter(batches), num_classes=5)
    e = x.reshape(10, -1) @ proj
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    for c in range(4):
        m = e[y == c].mean(0)
        np.testing.assert_allclose(w[c], m / np.linalg.norm(m), atol=1e-5)
    assert w.shape == (5, 5) and w.dtype == np.float32
    assert abs(np.linalg.norm(w[4]) - 1) < 1e-5 and "1 of 5 classes have no images" in caplog.text
    with pytest.raises(ToolkitError, match=r"label 3 outside 0..2"):
        imprint_fc7(embed_fn, iter(batches), num_classes=3)


def test_checkpoint_of_the_project_heads(tmp_path):
    """A training graph from recognition.heads (ArcFace via normalised fc7 + centre loss), fc7 renamed before."""
    from recognition.backbones import get_symbol
    from recognition.heads import build_train_symbol, make_loss_config

    full, info = build_train_symbol(get_symbol("tiny", emb_size=8), 5,
                                    make_loss_config("arcface", center_loss_weight=0.01), fc7_name="fc7_prev")
    arg, aux = random_params(full, seed=2)
    prefix = str(tmp_path / "heads")
    save_checkpoint(prefix, 0, full, arg, aux)
    for network in (None, "tiny"):
        p = load_pretrained(prefix + ",0", network=network, num_classes=5, data_shape=SHAPE)
        np.testing.assert_array_equal(p.fc7["fc7_weight"].asnumpy(), arg["fc7_prev_weight"].asnumpy())
        assert [n for n, _ in p.report.dropped] == info["aux_params"] and not p.report.unused
    os.remove(prefix + "-symbol.json")  # no graph: the sidecar names the classifier
    write_meta(prefix, fc7_name="fc7_prev", num_classes=5, emb_size=8, network="tiny")
    p = load_pretrained(prefix + ",0", network="tiny", num_classes=5, data_shape=SHAPE)
    assert ("fc7_weight", (5, 8), "fc7_prev_weight") in p.report.renamed
