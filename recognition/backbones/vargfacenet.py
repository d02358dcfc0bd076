"""VarGFaceNet (Yan et al. 2019, arXiv:1910.04985) as insightface's ``vargfacenet`` builder.

Variable-group separable convolutions (8 channels per group), multiplier 1.25 (widths 40/80/160/320),
stage units [3, 7, 4], no SE, a 1024-channel embedding block with a 7x7 grouped depthwise convolution,
then ``pre_fc1`` + BN ``fc1`` (512-d). Input (N, 3, 112, 112) RGB 0-255; 112 -> 56 -> 28 -> 14 -> 7.
"""
from __future__ import annotations

from typing import List, Tuple

import mxnet as mx

from recognition.backbones.layers import act, batchnorm, conv, embedding_head, normalise_input

SPECS = {"vargfacenet": 512}
GROUP_BASE = 8  # channels per group of every "depthwise" (variable-group) convolution


class _Ctx:
    """Settings every block needs."""

    def __init__(self, prelu_mode: str, bn_mom: float, act_type: str):
        self.prelu_mode, self.bn_mom, self.act_type = prelu_mode, bn_mom, act_type

    def act(self, data, name: str, channels: int):
        # fused=False: with the fused BatchNormWithReLU, MKLDNN fails in the backward of vargface_head_conv1
        # ("could not create a primitive descriptor iterator", MXNet 1.9.1 CPU); the plain BatchNorm form works
        return act(data, name, channels, self.act_type, self.prelu_mode, fused=False)


def separable(data, ctx: _Ctx, in_ch: int, out_ch: int, stride, factor: int, name: str, act_dw: bool = True,
              act_pw: bool = True) -> mx.sym.Symbol:
    """Group conv 3x3 (``in_ch * factor`` outputs, ``in_ch / 8`` groups) + BN [+ act], then 1x1 conv + BN [+ act].

    Inputs: (N, in_ch, H, W). Outputs: (N, out_ch, H/stride, W/stride).
    """
    mid = in_ch * factor
    body = conv(data, name + "_conv2d_depthwise", mid, (3, 3), stride, (1, 1), num_group=in_ch // GROUP_BASE)
    body = batchnorm(body, name + "_conv2d_depthwise_bn", bn_mom=ctx.bn_mom)
    if act_dw:
        body = ctx.act(body, name + "_conv2d_depthwise_act", mid)
    body = conv(body, name + "_conv2d_pointwise", out_ch)
    body = batchnorm(body, name + "_conv2d_pointwise_bn", bn_mom=ctx.bn_mom)
    if act_pw:
        body = ctx.act(body, name + "_conv2d_pointwise_act", out_ch)
    return body


def varg_block(data, ctx: _Ctx, in_ch: int, out_ch: int, factor: int, stride, dim_match: bool,
               name: str) -> mx.sym.Symbol:
    """Two separable convolutions plus a shortcut (identity, or a separable conv when the shape changes), then act."""
    sep1 = separable(data, ctx, in_ch, out_ch, stride, factor, name + "_sep1_data")
    sep2 = separable(sep1, ctx, out_ch, out_ch, (1, 1), factor, name + "_sep2_data", act_pw=False)
    shortcut = data if dim_match else separable(data, ctx, in_ch, out_ch, stride, factor, name + "_shortcut",
                                                act_pw=False)
    return ctx.act(sep2 + shortcut, name + "_out_data_act", out_ch)


def branch_merge_block(data, ctx: _Ctx, in_ch: int, out_ch: int, factor: int, stride, name: str) -> mx.sym.Symbol:
    """Down-sampling unit: two parallel separable branches summed, a second separable conv, a separable shortcut."""
    branch1 = separable(data, ctx, in_ch, out_ch, stride, factor, name + "_sep1_data_branch", act_pw=False)
    branch2 = separable(data, ctx, in_ch, out_ch, stride, factor, name + "_sep2_data_branch", act_pw=False)
    merged = ctx.act(branch1 + branch2, name + "_sep1_data_act", out_ch)
    sep2 = separable(merged, ctx, out_ch, out_ch, (1, 1), factor, name + "_sep2_data", act_pw=False)
    shortcut = separable(data, ctx, in_ch, out_ch, stride, factor, name + "_shortcut", act_pw=False)
    return ctx.act(sep2 + shortcut, name + "_out_data_act", out_ch)


def build(name: str, emb_size: int, prelu: str = "fast", multiplier: float = 1.25, units=(3, 7, 4),
          bn_mom: float = 0.9, act_type: str = "prelu", last_channels: int = 1024) -> mx.sym.Symbol:
    """Symbol from ``data`` (N, 3, 112, 112) to ``fc1_output`` (N, emb_size)."""
    ctx = _Ctx(prelu, bn_mom, act_type)
    widths = [int(w * multiplier) for w in (32, 64, 128, 256)]
    body = normalise_input(mx.sym.var("data"))
    body = conv(body, "vargface_head_conv1", widths[0], (3, 3), (1, 1), (1, 1))
    body = batchnorm(body, "vargface_head_conv1_bn", bn_mom=bn_mom)
    body = ctx.act(body, "vargface_head_conv1_act", widths[0])
    body = varg_block(body, ctx, widths[0], widths[0], 1, (2, 2), False, "vargface_head_head_pooling")
    for stage, num_units in enumerate(units, start=2):
        in_ch, out_ch = widths[stage - 2], widths[stage - 1]
        prefix = f"vargface_stage_{stage}_unit_"
        body = branch_merge_block(body, ctx, in_ch, out_ch, 2, (2, 2), prefix + "1")
        for unit in range(2, num_units + 1):
            body = varg_block(body, ctx, out_ch, out_ch, 2, (1, 1), True, f"{prefix}{unit}")
    # embedding block: 1x1 to last_channels, 7x7 grouped conv to 1x1, 1x1 to last_channels / 2
    body = conv(body, "embed_convx", last_channels)
    body = batchnorm(body, "embed_convx_bn", bn_mom=bn_mom)
    body = ctx.act(body, "embed_convx_act", last_channels)
    body = conv(body, "embed_convx_depthwise", last_channels, (7, 7), num_group=last_channels // GROUP_BASE)
    body = batchnorm(body, "embed_convx_depthwise_bn", bn_mom=bn_mom)
    body = conv(body, "embed_convx_pointwise", last_channels // 2)
    body = batchnorm(body, "embed_convx_pointwise_bn", bn_mom=bn_mom)
    body = ctx.act(body, "embed_convx_pointwise_act", last_channels // 2)
    return embedding_head(body, emb_size, "J", bn_mom=bn_mom)


def stages(name: str) -> List[Tuple[str, str]]:
    """Freezing groups from input to embedding: head, stage2..stage4, embedding block + fc1."""
    return [
        ("stem", r"^vargface_head_"),
        ("stage1", r"^vargface_stage_2_"),
        ("stage2", r"^vargface_stage_3_"),
        ("stage3", r"^vargface_stage_4_"),
        ("embedding", r"^(embed_|pre_fc1_|fc1_)"),
    ]
