"""MobileFaceNet (Chen et al. 2018, arXiv:1804.07573) as insightface's ``fmobilefacenet`` with the GDC head.

``y1``: blocks [1, 4, 6, 2], 128-d embedding (the model-zoo ``model-y1-test2``); ``y2``: blocks [2, 8, 16, 4],
256-d (insightface's bigger MobileFaceNet config). Input (N, 3, 112, 112) RGB 0-255; 56 -> 28 -> 14 -> 7.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import mxnet as mx

from recognition.backbones.layers import MXNET_BN_EPS, act, batchnorm, conv, embedding_head, normalise_input
from recognition.common import ToolkitError

# name -> (blocks per stage, default embedding size)
SPECS = {
    "y1": ([1, 4, 6, 2], 128),
    "y2": ([2, 8, 16, 4], 256),
}


class _Ctx:
    """Settings every block needs (keeps signatures short)."""

    def __init__(self, prelu_mode: str, bn_mom: float, act_type: str):
        self.prelu_mode, self.bn_mom, self.act_type = prelu_mode, bn_mom, act_type


def conv_unit(data, ctx: _Ctx, num_filter: int, name: str, kernel=(1, 1), stride=(1, 1), pad=(0, 0),
              num_group: int = 1, with_act: bool = True) -> mx.sym.Symbol:
    """Conv (``NAME_conv2d``) + BN (``NAME_batchnorm``) [+ PReLU ``NAME_relu``]. Outputs (N, num_filter, H', W')."""
    body = conv(data, name + "_conv2d", num_filter, kernel, stride, pad, num_group)
    # insightface's blocks leave BatchNorm at MXNet's default eps (1e-3); real checkpoints depend on it
    body = batchnorm(body, name + "_batchnorm", bn_mom=ctx.bn_mom, eps=MXNET_BN_EPS)
    if with_act:
        body = act(body, name + "_relu", num_filter, ctx.act_type, ctx.prelu_mode)
    return body


def depthwise_residual(data, ctx: _Ctx, num_out: int, num_group: int, stride, name: str) -> mx.sym.Symbol:
    """Inverted bottleneck: 1x1 expand to ``num_group`` -> 3x3 depthwise (stride) -> 1x1 linear projection."""
    body = conv_unit(data, ctx, num_group, name + "_conv_sep")
    body = conv_unit(body, ctx, num_group, name + "_conv_dw", kernel=(3, 3), stride=stride, pad=(1, 1),
                     num_group=num_group)
    return conv_unit(body, ctx, num_out, name + "_conv_proj", with_act=False)


def residual(data, ctx: _Ctx, num_block: int, num_out: int, num_group: int, name: str) -> mx.sym.Symbol:
    """``num_block`` stride-1 bottlenecks with identity shortcuts (``NAME_block0`` ...)."""
    body = data
    for i in range(num_block):
        body = depthwise_residual(body, ctx, num_out, num_group, (1, 1), f"{name}_block{i}") + body
    return body


def build(name: str, emb_size: int, prelu: str = "fast", blocks: Sequence[int] = None, bn_mom: float = 0.9,
          act_type: str = "prelu", head: str = "GDC") -> mx.sym.Symbol:
    """Symbol from ``data`` (N, 3, 112, 112) to ``fc1_output`` (N, emb_size).

    ``blocks``, ``head``, ``act_type``: insightface's ``net_blocks``, ``net_output``/``--version-output``,
    ``net_act``. insightface's ``train_softmax.py`` passes ``--version-output E`` by default: an 'E' head on
    ``conv_6sep`` (BN ``bn1`` over 512 x 7 x 7, Dropout, ``pre_fc1``), not the model zoo's GDC."""
    blocks = list(blocks or SPECS[name][0])
    if len(blocks) != 4:
        raise ToolkitError(f"network {name}: blocks needs 4 entries (got {blocks})")
    ctx = _Ctx(prelu, bn_mom, act_type)
    data = normalise_input(mx.sym.var("data"))
    body = conv_unit(data, ctx, 64, "conv_1", kernel=(3, 3), stride=(2, 2), pad=(1, 1))
    if blocks[0] == 1:
        body = conv_unit(body, ctx, 64, "conv_2_dw", kernel=(3, 3), pad=(1, 1), num_group=64)
    else:
        body = residual(body, ctx, blocks[0], 64, 64, "res_2")
    body = depthwise_residual(body, ctx, 64, 128, (2, 2), "dconv_23")
    body = residual(body, ctx, blocks[1], 64, 128, "res_3")
    body = depthwise_residual(body, ctx, 128, 256, (2, 2), "dconv_34")
    body = residual(body, ctx, blocks[2], 128, 256, "res_4")
    body = depthwise_residual(body, ctx, 128, 512, (2, 2), "dconv_45")
    body = residual(body, ctx, blocks[3], 128, 256, "res_5")
    body = conv_unit(body, ctx, 512, "conv_6sep")
    return embedding_head(body, emb_size, head, in_channels=512, bn_mom=bn_mom, act_type=act_type,
                          prelu_mode=prelu)


def stages(name: str) -> List[Tuple[str, str]]:
    """Freezing groups from input to embedding, following the stride-2 transitions."""
    return [
        ("stem", r"^(conv_1|conv_2_dw|res_2)_"),
        ("stage1", r"^(dconv_23|res_3)_"),
        ("stage2", r"^(dconv_34|res_4)_"),
        ("stage3", r"^(dconv_45|res_5)_"),
        ("stage4", r"^conv_6sep_"),
        ("embedding", r"^(conv_6dw7_7|bn1|relu1|pre_fc1|fc1)_"),
    ]
