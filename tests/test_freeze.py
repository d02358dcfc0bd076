"""Freezing policy: multipliers, schedules, stage tables, and that fixed/frozen really means bit-identical."""
import json

import mxnet as mx
import numpy as np
import pytest

from recognition.common import ToolkitError
from recognition.freeze import (
    Stage,
    freeze_batchnorm,
    param_multipliers,
    parse_stages,
    stage_at,
    stage_plan,
    stage_symbol,
    stage_table_for,
    without_dropout,
)

SHAPE = (4, 3, 16, 16)
FRESNET_NAMES = ["data", "conv0_weight", "bn0_gamma", "bn0_beta", "relu0_gamma", "stage1_unit1_conv1_weight",
                 "stage1_unit1_bn1_gamma", "stage1_unit1_bn1_beta", "stage2_unit1_conv1_weight",
                 "stage2_unit1_bn1_gamma", "stage2_unit1_bn1_beta", "bn1_gamma", "bn1_beta", "pre_fc1_weight",
                 "pre_fc1_bias", "fc1_gamma", "fc1_beta", "fc7_weight", "softmax_label"]


def train_symbol(num_classes=5):
    """Stem, two stages, embedding head (bn1 -> Dropout -> pre_fc1 -> fc1, insightface's 'E') and fc7 + softmax."""
    x = (mx.sym.Variable("data") - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), stride=(2, 2), pad=(1, 1), no_bias=True, name="conv0")
    x = mx.sym.BatchNorm(x, fix_gamma=False, name="bn0")
    x = mx.sym.LeakyReLU(x, act_type="prelu", name="relu0")
    for i in (1, 2):
        x = mx.sym.Convolution(x, num_filter=4, kernel=(3, 3), pad=(1, 1), no_bias=True, name=f"stage{i}_unit1_conv1")
        x = mx.sym.BatchNorm(x, fix_gamma=False, name=f"stage{i}_unit1_bn1")
        x = mx.sym.Activation(x, act_type="relu")
    x = mx.sym.BatchNorm(x, fix_gamma=False, name="bn1")
    x = mx.sym.Dropout(x, p=0.4)
    x = mx.sym.FullyConnected(x, num_hidden=6, name="pre_fc1")
    emb = mx.sym.BatchNorm(x, fix_gamma=True, name="fc1")
    fc7 = mx.sym.FullyConnected(emb, num_hidden=num_classes, no_bias=True, name="fc7")
    return mx.sym.SoftmaxOutput(fc7, name="softmax")


def test_param_multipliers():
    lr, wd = param_multipliers(FRESNET_NAMES, fc7_lr_mult=10.0, fc7_wd_mult=2.0, backbone_lr_mult=0.1)
    assert "data" not in lr and "softmax_label" not in wd
    assert lr["fc7_weight"] == 10.0 and wd["fc7_weight"] == 2.0
    assert lr["conv0_weight"] == 0.1 and wd["conv0_weight"] == 1.0 and wd["pre_fc1_weight"] == 1.0
    no_decay = {n for n, v in wd.items() if v == 0.0}
    assert no_decay == {"bn0_gamma", "bn0_beta", "relu0_gamma", "stage1_unit1_bn1_gamma", "stage1_unit1_bn1_beta",
                        "stage2_unit1_bn1_gamma", "stage2_unit1_bn1_beta", "bn1_gamma", "bn1_beta", "pre_fc1_bias",
                        "fc1_gamma", "fc1_beta"}
    _, wd_all = param_multipliers(FRESNET_NAMES, bn_wd=True)
    assert set(wd_all.values()) == {1.0}
    lr2, wd2 = param_multipliers(["fc1_weight", "fc7_x_weight"], fc7_name="fc7_x",
                                 attr_dict={"fc1_weight": {"__wd_mult__": "10.0"}}, fc7_lr_mult=0.0)
    assert wd2["fc1_weight"] == 10.0 and lr2 == {"fc1_weight": 1.0, "fc7_x_weight": 0.0}


def test_parse_stages():
    assert parse_stages() == [Stage("all", None)]
    assert parse_stages(freeze_steps=300) == [Stage("head", 300), Stage("all", None)]
    assert parse_stages(stages="head:500,all:2000") == [Stage("head", 500), Stage("all", 2000)]
    assert parse_stages(stages="head:5, stage3+:10, all") == [Stage("head", 5), Stage("stage3+", 10),
                                                               Stage("all", None)]
    stages = parse_stages(stages="head:2,all:3")
    assert [stage_at(stages, s)[1].name for s in range(7)] == ["head"] * 2 + ["all"] * 5
    # lr factors: NAME:N@F (F x the scheduled lr), --head-lr-mult for --freeze-steps; default 1
    assert parse_stages(stages="head:30@0.1,all:210") == [Stage("head", 30, 0.1), Stage("all", 210, 1.0)]
    assert parse_stages(stages="head:3@0, all@0.5") == [Stage("head", 3, 0.0), Stage("all", None, 0.5)]
    assert parse_stages(freeze_steps=4, head_lr_mult=0.02) == [Stage("head", 4, 0.02), Stage("all", None, 1.0)]
    assert parse_stages(freeze_steps=4, head_lr_mult=None)[0].lr_mult == 1.0


def test_parse_stages_in_passes_over_the_data():
    calls = []

    def epoch_steps():
        calls.append(1)
        return 40

    assert parse_stages(stages="head:1ep@0.1,all:3ep", epoch_steps=epoch_steps) == [Stage("head", 40, 0.1),
                                                                                    Stage("all", 120)]
    # fractions round to whole batches (at least one); steps and passes mix; the last stage may still be open
    assert parse_stages(stages="head:0.25ep,stage3+:10,all:2.5EP", epoch_steps=lambda: 9) == [
        Stage("head", 2), Stage("stage3+", 10), Stage("all", 22)]
    assert parse_stages(stages="head:0.001ep,all", epoch_steps=lambda: 9) == [Stage("head", 1), Stage("all", None)]
    calls.clear()
    parse_stages(stages="head:5,all:7", epoch_steps=epoch_steps)
    assert not calls  # the data is only counted when a stage is given in passes


@pytest.mark.parametrize("kwargs, message", [
    ({"stages": "head:1ep,all"}, r"'1ep' of 'head' counts passes over the data, which is not known here"),
    ({"stages": "head:xep,all", "epoch_steps": lambda: 3}, r"'xep' of 'head': passes over the data must be a number"),
    ({"stages": "head:-1ep,all", "epoch_steps": lambda: 3}, r"'-1ep' of 'head': passes over the data must be a "),
    ({"stages": "head:infep,all", "epoch_steps": lambda: 3}, r"'infep' of 'head': passes over the data must be a "),
    ({"stages": "head500"}, r"bad stage 'head500'"),
    ({"stages": "head:x,all"}, r"'x' of 'head': is not an integer step count"),
    ({"stages": "head:0,all"}, r"step count of 'head' must be positive, got 0"),
    ({"stages": "body:5,all"}, r"bad stage 'body:5'"),
    ({"stages": "head,all:5"}, r"stage 'head' needs a step count"),
    ({"freeze_steps": -1}, r"--freeze-steps -1: must be 0 or a positive"),
    ({"freeze_steps": 5, "stages": "head:5,all"}, r"--stages and --freeze-steps are alternatives"),
    ({"stages": "head:5@x,all"}, r"stage 'head:5@x': lr factor 'x' must be a number >= 0"),
    ({"stages": "head:5@-0.1,all"}, r"lr factor '-0.1' must be a number >= 0"),
    ({"stages": "head:5@,all"}, r"lr factor '' must be a number >= 0"),
    ({"stages": "head:5@nan,all"}, r"lr factor 'nan' must be a number >= 0"),
    ({"freeze_steps": 5, "head_lr_mult": -1.0}, r"--head-lr-mult: lr factor '-1.0' must be a number >= 0"),
    ({"stages": "head:5,all", "head_lr_mult": 0.1}, r"--head-lr-mult goes with --freeze-steps"),
])
def test_parse_stages_errors(kwargs, message):
    with pytest.raises(ToolkitError, match=message):
        parse_stages(**kwargs)


def test_stage_tables_inferred(fixture_model):
    table = stage_table_for(None, FRESNET_NAMES)
    assert table[0][0] == "stem" and table[-1][0] == "embedding"
    sym = mx.sym.load(fixture_model + "-symbol.json")
    y1 = stage_table_for(None, sym.list_arguments())
    assert [s for s, _ in y1] == ["stem", "stage1", "stage2", "stage3", "stage4", "embedding"]
    fixed, frozen = stage_plan(sym, Stage("head", 1), y1)
    trained = [n for n in sym.list_arguments() if n not in fixed and n != "data"]
    assert trained == ["conv_6dw7_7_conv2d_weight", "conv_6dw7_7_batchnorm_gamma", "conv_6dw7_7_batchnorm_beta",
                       "fc1_weight", "pre_fc1_bias", "fc1_gamma", "fc1_beta"]
    assert "conv_6sep_batchnorm" in frozen and "fc1" in frozen  # 'head': every BatchNorm keeps its statistics
    assert len(frozen) == sum(1 for n in json.loads(sym.tojson())["nodes"] if n["op"] == "BatchNorm")
    unknown = stage_table_for(None, ["data", "blockA_weight", "pre_fc1_weight", "fc1_gamma"])
    assert [s for s, _ in unknown] == ["backbone", "embedding"]


def test_stage_plan_stages_and_errors():
    sym = train_symbol()
    table = stage_table_for(None, sym.list_arguments())
    fixed, frozen = stage_plan(sym, Stage("all", None), table, frozen_stages=2)
    assert fixed == ["conv0_weight", "bn0_gamma", "bn0_beta", "relu0_gamma", "stage1_unit1_conv1_weight",
                     "stage1_unit1_bn1_gamma", "stage1_unit1_bn1_beta"]
    assert frozen == ["bn0", "stage1_unit1_bn1"]
    fixed2, _ = stage_plan(sym, Stage("stage2+", 5), table)
    assert fixed2 == fixed
    _, all_bn = stage_plan(sym, Stage("all", None), table, bn_mode="frozen")
    assert all_bn == ["bn0", "stage1_unit1_bn1", "stage2_unit1_bn1", "bn1", "fc1"]
    with pytest.raises(ToolkitError, match=r"--frozen-stages 6: must be 0..5"):
        stage_plan(sym, Stage("all", None), table, frozen_stages=6)
    with pytest.raises(ToolkitError, match=r"unknown stage 'stage9\+'"):
        stage_plan(sym, Stage("stage9+", None), table)
    with pytest.raises(ToolkitError, match=r"--bn-mode 'eval'"):
        stage_plan(sym, Stage("all", None), table, bn_mode="eval")


def test_freeze_batchnorm_rewrites_only_named_nodes():
    sym = train_symbol()
    out = freeze_batchnorm(sym, ["bn0", "fc1"])
    assert out.list_arguments() == sym.list_arguments()
    assert out.list_auxiliary_states() == sym.list_auxiliary_states()
    nodes = {n["name"]: n for n in json.loads(out.tojson())["nodes"]}
    assert nodes["bn0"]["attrs"]["use_global_stats"] == "True" and nodes["fc1"]["attrs"]["use_global_stats"] == "True"
    assert "use_global_stats" not in nodes["bn1"].get("attrs", {})
    with pytest.raises(ToolkitError, match=r"no BatchNorm named nope"):
        freeze_batchnorm(sym, ["nope"])


def _train(sym, fixed, arg, aux, steps=3, lr_mult=None, wd_mult=None):
    """3 SGD steps (momentum, weight decay) on a seeded batch; returns the parameters afterwards."""
    mod = mx.mod.Module(sym, context=mx.cpu(), fixed_param_names=fixed)
    mod.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))])
    mod.set_params({k: v.copy() for k, v in arg.items()}, {k: v.copy() for k, v in aux.items()})
    names = mod._exec_group.param_names
    opt = mx.optimizer.SGD(learning_rate=0.1, momentum=0.9, wd=5e-3, rescale_grad=1.0 / SHAPE[0],
                           param_idx2name=dict(enumerate(names)))
    if lr_mult:
        opt.set_lr_mult(lr_mult)
    if wd_mult:
        opt.set_wd_mult(wd_mult)
    mod.init_optimizer(kvstore=None, optimizer=opt)
    rng = np.random.RandomState(0)
    b = mx.io.DataBatch([mx.nd.array(rng.uniform(0, 255, SHAPE))], [mx.nd.array(rng.randint(0, 5, SHAPE[0]))])
    for _ in range(steps):
        mod.forward_backward(b)
        mod.update()
    mx.nd.waitall()  # MKLDNN BatchNorm writes its statistics in backward, outside the engine's dependencies
    new_arg, new_aux = mod.get_params()
    return {k: v.asnumpy() for k, v in new_arg.items()}, {k: v.asnumpy() for k, v in new_aux.items()}


@pytest.fixture(scope="module")
def start():
    sym = train_symbol()
    mod = mx.mod.Module(sym, context=mx.cpu())
    mod.bind([("data", SHAPE)], [("softmax_label", (SHAPE[0],))])
    mx.random.seed(0)
    mod.init_params(mx.init.Xavier())
    arg, aux = mod.get_params()
    rng = np.random.RandomState(1)
    aux = {k: mx.nd.array(rng.uniform(0.5, 1.5, v.shape)) for k, v in aux.items()}  # non-trivial statistics
    return sym, arg, aux


def test_head_stage_keeps_backbone_bit_identical_then_all_trains_it(start):
    """'head': backbone parameters and EVERY BatchNorm statistic (embedding layer's bn1/fc1 too) bit-identical,
    embedding-layer gamma/beta, pre_fc1 and fc7 train; 'all': everything trains, statistics too."""
    sym, arg, aux = start
    table = stage_table_for(None, sym.list_arguments())
    fixed, frozen_bn = stage_plan(sym, Stage("head", 3), table)
    assert set(fixed) == {"conv0_weight", "bn0_gamma", "bn0_beta", "relu0_gamma", "stage1_unit1_conv1_weight",
                          "stage1_unit1_bn1_gamma", "stage1_unit1_bn1_beta", "stage2_unit1_conv1_weight",
                          "stage2_unit1_bn1_gamma", "stage2_unit1_bn1_beta"}
    assert frozen_bn == ["bn0", "stage1_unit1_bn1", "stage2_unit1_bn1", "bn1", "fc1"]
    new_arg, new_aux = _train(stage_symbol(sym, Stage("head", 3), frozen_bn), fixed, arg, aux)
    for name in fixed:
        np.testing.assert_array_equal(new_arg[name], arg[name].asnumpy(), err_msg=name)
    assert set(new_aux) == set(aux) and len(aux) == 10
    for name in aux:  # every moving mean/var
        np.testing.assert_array_equal(new_aux[name], aux[name].asnumpy(), err_msg=name)
    for name in ("pre_fc1_weight", "bn1_gamma", "bn1_beta", "fc1_beta", "fc7_weight"):
        assert not np.array_equal(new_arg[name], arg[name].asnumpy()), name

    fixed_all, frozen_all = stage_plan(sym, Stage("all", None), table)
    assert fixed_all == [] and frozen_all == []
    new_arg, new_aux = _train(stage_symbol(sym, Stage("all", None), frozen_all), fixed_all, arg, aux)
    for name in fixed:
        assert not np.array_equal(new_arg[name], arg[name].asnumpy()), name
    assert not np.array_equal(new_aux["bn0_moving_var"], aux["bn0_moving_var"].asnumpy())
    assert not np.array_equal(new_aux["fc1_moving_mean"], aux["fc1_moving_mean"].asnumpy())


def test_head_stage_graph_is_the_inference_function(start):
    """The 'head' training graph's forward (is_train=True) equals the inference forward imprinting used: frozen
    statistics everywhere and no Dropout; the 'all' graph keeps its Dropout."""
    sym, arg, aux = start
    table = stage_table_for(None, sym.list_arguments())
    head = stage_symbol(sym, Stage("head", 3), stage_plan(sym, Stage("head", 3), table)[1])
    ops = [n["op"] for n in json.loads(head.tojson())["nodes"]]
    assert "Dropout" not in ops and head.list_arguments() == sym.list_arguments()
    assert "Dropout" in [n["op"] for n in json.loads(stage_symbol(sym, Stage("all", None), []).tojson())["nodes"]]
    assert without_dropout(head) is head
    x = mx.nd.array(np.random.RandomState(2).uniform(0, 255, SHAPE))
    feats = []
    for graph, is_train in ((head, True), (sym, False)):
        fc1 = graph.get_internals()["fc1_output"]
        ex = fc1.bind(mx.cpu(), dict(arg, data=x), aux_states={k: v.copy() for k, v in aux.items()})
        feats.append(ex.forward(is_train=is_train)[0].asnumpy())
    np.testing.assert_allclose(feats[0], feats[1], rtol=1e-5, atol=1e-5)


def test_zero_multipliers_keep_fc7_bit_identical(start):
    sym, arg, aux = start
    lr, wd = param_multipliers(sym.list_arguments(), fc7_lr_mult=0.0, fc7_wd_mult=0.0)
    new_arg, _ = _train(sym, [], arg, aux, lr_mult=lr, wd_mult=wd)
    np.testing.assert_array_equal(new_arg["fc7_weight"], arg["fc7_weight"].asnumpy())
    assert not np.array_equal(new_arg["conv0_weight"], arg["conv0_weight"].asnumpy())
