"""Building blocks shared by the backbone families: input normalisation, PReLU, conv+BN, embedding heads.

Every block takes explicit names so that parameters come out with insightface's names
(``*_weight``, ``*_gamma``/``*_beta``, ``*_moving_mean``/``*_moving_var``, PReLU slope ``*_gamma``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import mxnet as mx

from recognition.backbones.fast_prelu import bn_prelu, fast_prelu
from recognition.common import ToolkitError

BN_EPS = 2e-5  # fresnet, vargfacenet and every fc1
MXNET_BN_EPS = 1e-3  # MXNet's default, which insightface's MobileFaceNet/MobileNet blocks and GDC keep
PRELU_MODES = ("fast", "stock", "bn")


def normalise_input(data: mx.sym.Symbol) -> mx.sym.Symbol:
    """Map RGB 0-255 to about [-1, 1] inside the graph, as insightface does: ``(x - 127.5) * 0.0078125``."""
    return (data - 127.5) * 0.0078125


def check_prelu_mode(prelu: str) -> str:
    """Return ``prelu`` when it is a known PReLU formulation, else raise a one-line :class:`ToolkitError`."""
    if prelu not in PRELU_MODES:
        raise ToolkitError(f"prelu={prelu!r}: unknown PReLU formulation; choose one of {', '.join(PRELU_MODES)}")
    return prelu


def prelu(data: mx.sym.Symbol, name: str, num_channels: int, mode: str = "fast",
          fused: Optional[bool] = None) -> mx.sym.Symbol:
    """Per-channel PReLU ``y = max(x, 0) + gamma * min(x, 0)`` with the slope variable ``NAME_gamma`` of shape (C,).

    Inputs: ``data`` (N, C, H, W). Outputs: same shape.

    ``mode='stock'`` is MXNet's ``LeakyReLU(act_type='prelu')``. ``mode='fast'`` is the same function and the same
    parameter (checkpoints load into either) written with operators whose backward pass is fast on CPU; see
    :func:`recognition.backbones.fast_prelu.fast_prelu` for the formulation and the measurements behind it.
    ``mode='bn'`` (:func:`~recognition.backbones.fast_prelu.bn_prelu`) is faster still but adds constant auxiliary
    states ``NAME_unit_moving_mean/_var``; checkpoints drop them and store the stock graph (``checkpoint_form``).
    ``fused``: ``bn_prelu``'s (None: its default).
    """
    if mode == "stock":
        gamma = mx.sym.var(name + "_gamma", shape=(num_channels,), init=mx.init.Constant(0.25))
        return mx.sym.LeakyReLU(data=data, gamma=gamma, act_type="prelu", name=name)
    if mode == "bn":
        return bn_prelu(data, name, num_channels, fused=fused)
    return fast_prelu(data, name, num_channels)


def act(data: mx.sym.Symbol, name: str, num_channels: int, act_type: str = "prelu",
        prelu_mode: str = "fast", fused: Optional[bool] = None) -> mx.sym.Symbol:
    """Activation by insightface's ``net_act`` name: ``prelu`` (parameter ``NAME_gamma``) or an ``Activation``."""
    if act_type == "prelu":
        return prelu(data, name, num_channels, prelu_mode, fused)
    return mx.sym.Activation(data=data, act_type=act_type, name=name)


def batchnorm(data: mx.sym.Symbol, name: str, fix_gamma: bool = False, bn_mom: float = 0.9,
              eps: float = BN_EPS) -> mx.sym.Symbol:
    """BatchNorm with insightface's settings; parameters ``NAME_gamma/_beta/_moving_mean/_moving_var``."""
    return mx.sym.BatchNorm(data=data, fix_gamma=fix_gamma, eps=eps, momentum=bn_mom, name=name)


def conv(data: mx.sym.Symbol, name: str, num_filter: int, kernel: Tuple[int, int] = (1, 1),
         stride: Tuple[int, int] = (1, 1), pad: Tuple[int, int] = (0, 0), num_group: int = 1) -> mx.sym.Symbol:
    """Bias-free convolution ``NAME_weight`` of shape (num_filter, C_in / num_group, kh, kw)."""
    return mx.sym.Convolution(data=data, num_filter=num_filter, kernel=kernel, stride=stride, pad=pad,
                              num_group=num_group, no_bias=True, name=name)


# insightface symbol_utils.get_fc1 output kinds built here; 'Z' (no fc1 layer) and 'GNAP' are not
HEADS = ("E", "GDC", "F", "G", "H", "I", "J", "GAP")


def check_head(kind: str) -> str:
    """Return ``kind`` when :func:`embedding_head` builds it, else a one-line :class:`ToolkitError` listing them."""
    if kind not in HEADS:
        raise ToolkitError(f"--version-output/net_output {kind!r}: not built here; supported: {', '.join(HEADS)}")
    return kind


def embedding_head(body: mx.sym.Symbol, emb_size: int, kind: str, in_channels: int = 512, bn_mom: float = 0.9,
                   dropout: float = 0.4, gdc_group: int = 0, act_type: str = "prelu",
                   prelu_mode: str = "fast") -> mx.sym.Symbol:
    """insightface's output heads (``net_output`` / ``--version-output``), all ending at node ``fc1_output``.

    Inputs: ``body`` (N, C, H, W) (7x7 for 112x112 input). Outputs: (N, emb_size). Names as insightface's
    ``symbol_utils.get_fc1``:

    - ``'E'``: BN ``bn1`` -> Dropout -> FC ``pre_fc1`` -> BN ``fc1`` (fresnet's default).
    - ``'GDC'``: global depthwise 7x7 ``conv_6dw7_7`` (+BN, no activation) -> FC ``pre_fc1`` -> BN ``fc1``
      (MobileFaceNet); ``gdc_group`` groups (default: one per output channel, ``in_channels`` outputs);
      its BN keeps MXNet's default eps 1e-3 as insightface's does (checked against ``model-y1-test2``).
    - ``'F'``: BN ``bn1`` -> Dropout -> FC ``fc1``; ``'G'``: BN ``bn1`` -> FC ``fc1``; ``'H'``: FC ``fc1``.
    - ``'I'``: BN ``bn1`` -> FC ``pre_fc1`` -> BN ``fc1``; ``'J'``: FC ``pre_fc1`` -> BN ``fc1`` (vargfacenet).
    - ``'GAP'``: BN ``bn1`` -> activation ``relu1`` -> global average pool -> FC ``pre_fc1`` -> BN ``fc1``.
    Every final BN has ``fix_gamma=True`` as in insightface.
    """
    check_head(kind)
    if kind in ("E", "F", "G", "I", "GAP"):
        body = batchnorm(body, "bn1", bn_mom=bn_mom)
    if kind in ("E", "F") and dropout > 0:
        body = mx.sym.Dropout(data=body, p=dropout)
    if kind in ("F", "G", "H"):  # the FullyConnected itself is fc1
        return mx.sym.FullyConnected(data=body, num_hidden=emb_size, name="fc1")
    if kind == "GDC":
        groups = gdc_group or in_channels
        body = conv(body, "conv_6dw7_7_conv2d", in_channels, kernel=(7, 7), num_group=groups)
        body = batchnorm(body, "conv_6dw7_7_batchnorm", bn_mom=bn_mom, eps=MXNET_BN_EPS)
    elif kind == "GAP":
        body = act(body, "relu1", in_channels, act_type, prelu_mode)
        body = mx.sym.Flatten(mx.sym.Pooling(data=body, global_pool=True, kernel=(7, 7), pool_type="avg",
                                             name="pool1"))
    body = mx.sym.FullyConnected(data=body, num_hidden=emb_size, name="pre_fc1")
    return batchnorm(body, "fc1", fix_gamma=True, bn_mom=bn_mom)
