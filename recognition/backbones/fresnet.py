"""insightface's IR-ResNet ("fresnet", ArcFace paper section 3.2) with the basic IR unit 'v3' and output head 'E'.

Variants (units per stage, widths): r18 [2,2,2,2], r34 [3,4,6,3], r50 [3,4,14,3], r100 [3,13,30,3], all with
widths 64/64/128/256/512, and every other depth insightface's ``fresnet.get_symbol`` lists below 500 layers
(r49 ... r269, basic units); ``tiny`` is a narrow one (16/16/32/64/128, one unit per stage) for tests and CPU demos.
Input (N, 3, 112, 112) RGB 0-255; the stem keeps 112x112, four stride-2 stages bring it to 7x7.

insightface's ``--version-*`` / ``net_*`` options built here (facts from its ``recognition/symbol/fresnet.py``):
``se`` (``version_se=1``: squeeze-excitation ``_se_conv1`` C/16 and ``_se_conv2`` C, with biases, after ``_bn3``),
``input`` (1: 3x3 stride-1 stem; 0: 7x7 stride-2 stem without pooling), ``head`` (``version_output``, see
:func:`recognition.backbones.layers.embedding_head`), ``act_type`` (``version_act``), ``unit`` (``version_unit``:
1 ``residual_unit_v1_L``/``v1``, 2 ``v2``, 3 ``v3``; ``r50v1`` is r50 with unit 1). Units 4 and the bottleneck
variants (500+ layers) are not built.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mxnet as mx

from recognition.backbones.layers import act, batchnorm, conv, embedding_head, normalise_input
from recognition.common import ToolkitError

# name -> (units per stage, widths [stem, stage1..stage4], default embedding size)
SPECS = {
    "r18": ([2, 2, 2, 2], [64, 64, 128, 256, 512], 512),
    "r34": ([3, 4, 6, 3], [64, 64, 128, 256, 512], 512),
    "r50": ([3, 4, 14, 3], [64, 64, 128, 256, 512], 512),
    "r100": ([3, 13, 30, 3], [64, 64, 128, 256, 512], 512),
    "tiny": ([1, 1, 1, 1], [16, 16, 32, 64, 128], 128),
}
# the other depths of insightface's fresnet.get_symbol (num_layers < 500: basic units, widths 64..512)
SPECS["r50v1"] = SPECS["r50"]  # insightface's config.network.r50v1: r50 with net_unit 1 (see DEFAULT_UNIT)
DEFAULT_UNIT = {"r50v1": 1}
for _depth, _units in ((49, [3, 4, 14, 3]), (74, [3, 6, 24, 3]), (90, [3, 8, 30, 3]), (98, [3, 4, 38, 3]),
                       (99, [3, 8, 35, 3]), (101, [3, 4, 23, 3]), (124, [3, 13, 40, 5]), (152, [3, 8, 36, 3]),
                       (160, [3, 24, 49, 3]), (200, [3, 24, 36, 3]), (269, [3, 30, 48, 8])):
    SPECS[f"r{_depth}"] = (_units, [64, 64, 128, 256, 512], 512)


def squeeze_excite(body: mx.sym.Symbol, num_filter: int, name: str, prelu_mode: str, act_type: str):
    """insightface's SE block: global average pool -> 1x1 conv C/16 (bias) -> act -> 1x1 conv C (bias) ->
    sigmoid, multiplied onto ``body`` (N, C, H, W)."""
    w = mx.sym.Pooling(data=body, global_pool=True, kernel=(7, 7), pool_type="avg", name=name + "_se_pool1")
    w = mx.sym.Convolution(data=w, num_filter=num_filter // 16, kernel=(1, 1), name=name + "_se_conv1")
    w = act(w, name + "_se_relu1", num_filter // 16, act_type, prelu_mode)
    w = mx.sym.Convolution(data=w, num_filter=num_filter, kernel=(1, 1), name=name + "_se_conv2")
    w = mx.sym.Activation(data=w, act_type="sigmoid", name=name + "_se_sigmoid")
    return mx.sym.broadcast_mul(body, w)


def ir_unit(data: mx.sym.Symbol, num_filter: int, stride: Tuple[int, int], dim_match: bool, name: str,
            prelu_mode: str, bn_mom: float, act_type: str, se: int = 0) -> mx.sym.Symbol:
    """IR basic unit 'v3': BN-Conv3x3-BN-PReLU-Conv3x3(stride)-BN [-SE] plus a shortcut (1x1 conv+BN when shapes
    change).

    Inputs: (N, C_in, H, W). Outputs: (N, num_filter, H/stride, W/stride).
    """
    body = batchnorm(data, name + "_bn1", bn_mom=bn_mom)
    body = conv(body, name + "_conv1", num_filter, kernel=(3, 3), pad=(1, 1))
    body = batchnorm(body, name + "_bn2", bn_mom=bn_mom)
    body = act(body, name + "_relu1", num_filter, act_type, prelu_mode)
    body = conv(body, name + "_conv2", num_filter, kernel=(3, 3), stride=stride, pad=(1, 1))
    body = batchnorm(body, name + "_bn3", bn_mom=bn_mom)
    if se:
        body = squeeze_excite(body, num_filter, name, prelu_mode, act_type)
    if dim_match:
        shortcut = data
    else:
        shortcut = conv(data, name + "_conv1sc", num_filter, stride=stride)
        shortcut = batchnorm(shortcut, name + "_sc", bn_mom=bn_mom)
    return body + shortcut


def unit_v1(data: mx.sym.Symbol, num_filter: int, stride: Tuple[int, int], dim_match: bool, name: str,
            prelu_mode: str, bn_mom: float, act_type: str, se: int = 0, stride_first: bool = False) -> mx.sym.Symbol:
    """insightface's unit 1 (post-activation): Conv3x3-BN-act-Conv3x3-BN [-SE] + shortcut, then act ``_relu3``.
    The stride sits on the second convolution (``residual_unit_v1_L``, input 1) or on the first (``v1``, input 0)."""
    body = conv(data, name + "_conv1", num_filter, kernel=(3, 3), stride=stride if stride_first else (1, 1),
                pad=(1, 1))
    body = batchnorm(body, name + "_bn1", bn_mom=bn_mom)
    body = act(body, name + "_relu1", num_filter, act_type, prelu_mode)
    body = conv(body, name + "_conv2", num_filter, kernel=(3, 3), stride=(1, 1) if stride_first else stride,
                pad=(1, 1))
    body = batchnorm(body, name + "_bn2", bn_mom=bn_mom)
    if se:
        body = squeeze_excite(body, num_filter, name, prelu_mode, act_type)
    if dim_match:
        shortcut = data
    else:
        shortcut = batchnorm(conv(data, name + "_conv1sc", num_filter, stride=stride), name + "_sc", bn_mom=bn_mom)
    return act(body + shortcut, name + "_relu3", num_filter, act_type, prelu_mode)


def unit_v2(data: mx.sym.Symbol, num_filter: int, stride: Tuple[int, int], dim_match: bool, name: str,
            prelu_mode: str, bn_mom: float, act_type: str, se: int = 0) -> mx.sym.Symbol:
    """insightface's unit 2 (pre-activation): BN-act-Conv3x3(stride)-BN-act-Conv3x3 [-SE] + shortcut (a 1x1 conv
    ``_sc`` of the first activation when shapes change)."""
    bn = batchnorm(data, name + "_bn1", bn_mom=bn_mom)
    act1 = act(bn, name + "_relu1", _channels(data, num_filter, dim_match), act_type, prelu_mode)
    body = conv(act1, name + "_conv1", num_filter, kernel=(3, 3), stride=stride, pad=(1, 1))
    body = batchnorm(body, name + "_bn2", bn_mom=bn_mom)
    body = act(body, name + "_relu2", num_filter, act_type, prelu_mode)
    body = conv(body, name + "_conv2", num_filter, kernel=(3, 3), pad=(1, 1))
    if se:
        body = squeeze_excite(body, num_filter, name, prelu_mode, act_type)
    shortcut = data if dim_match else conv(act1, name + "_sc", num_filter, stride=stride)
    return body + shortcut


def _channels(data: mx.sym.Symbol, num_filter: int, dim_match: bool) -> int:
    """Input channels of a unit (a PReLU slope over them needs the count)."""
    if dim_match:
        return num_filter
    _, out, _ = data.infer_shape_partial(data=(1, 3, 112, 112))
    return int(out[0][1])


def build(name: str, emb_size: int, prelu: str = "fast", units: Sequence[int] = None,
          widths: Sequence[int] = None, dropout: float = 0.4, bn_mom: float = 0.9,
          act_type: str = "prelu", se: int = 0, input: int = 1, head: str = "E",
          unit: Optional[int] = None) -> mx.sym.Symbol:
    """Symbol from ``data`` (N, 3, 112, 112) to ``fc1_output`` (N, emb_size).

    ``units``/``widths`` override the variant's table entry (four stages; widths = stem + four stages);
    ``se``, ``input``, ``head``, ``unit``: insightface's ``version_se``/``version_input``/``version_output``/
    ``version_unit`` (1 post-activation, 2 pre-activation, 3 the IR unit).
    """
    spec_units, spec_widths, _ = SPECS[name]
    unit = DEFAULT_UNIT.get(name, 3) if unit is None else unit
    units = list(units or spec_units)
    widths = list(widths or spec_widths)
    if len(units) != 4 or len(widths) != 5:
        raise ToolkitError(f"network {name}: units needs 4 entries and widths 5 (got {units}, {widths})")
    if input not in (0, 1) or se not in (0, 1) or unit not in (1, 2, 3):
        raise ToolkitError(f"network {name}: version_input {input!r} / version_se {se!r} / version_unit {unit!r}: "
                           "supported are input 0|1, se 0|1, unit 1|2|3")
    data = normalise_input(mx.sym.var("data"))
    if input == 0:
        body = conv(data, "conv0", widths[0], kernel=(7, 7), stride=(2, 2), pad=(3, 3))
    else:
        body = conv(data, "conv0", widths[0], kernel=(3, 3), pad=(1, 1))
    body = batchnorm(body, "bn0", bn_mom=bn_mom)
    body = act(body, "relu0", widths[0], act_type, prelu)
    for stage, num_units in enumerate(units, start=1):
        for index in range(1, num_units + 1):
            first = index == 1
            args = (body, widths[stage], (2, 2) if first else (1, 1), not first, f"stage{stage}_unit{index}", prelu,
                    bn_mom, act_type, se)
            if unit == 1:
                body = unit_v1(*args, stride_first=input == 0)
            elif unit == 2:
                body = unit_v2(*args)
            else:
                body = ir_unit(*args)
    return embedding_head(body, emb_size, head, in_channels=widths[4], bn_mom=bn_mom, dropout=dropout,
                          act_type=act_type, prelu_mode=prelu)


def stages(name: str) -> List[Tuple[str, str]]:
    """Freezing groups from input to embedding: stem, stage1..stage4, embedding."""
    return ([("stem", r"^(conv0|bn0|relu0)_")]
            + [(f"stage{i}", rf"^stage{i}_") for i in range(1, 5)]
            + [("embedding", r"^(bn1|relu1|conv_6dw7_7_conv2d|conv_6dw7_7_batchnorm|pre_fc1|fc1)_")])
