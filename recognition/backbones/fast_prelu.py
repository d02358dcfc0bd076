"""A PReLU that trains fast on CPU while keeping insightface's parameter (``NAME_gamma``, shape (C,)).

Why (issue 8): MXNet's ``LeakyReLU(act_type='prelu')`` and ``broadcast_mul`` by a (1, C, 1, 1) slope run their
backward pass through the generic broadcast-reduce kernel, which is slow on CPU for *both* gradients (data and
slope) and dominates a MobileFaceNet step (y1: ~5.4 samples/s with it, ~41.8 with ReLU, 2-core CPU).

How: only same-shape element-wise operators and two outer products, with the identity

    prelu(x) = max(x, 0) + gamma * min(x, 0) = x + (gamma - 1) * min(x, 0)

The per-channel factor ``gamma - 1`` is spread to (N, C, H, W) by ``ones(N,1) . (gamma-1)(1,C)`` -> (N, C, 1) and
``(N, C, 1) . ones(1, H, W)``; the slope gradient comes back through the transposed products (BLAS), not through
a broadcast reduction. The input is read by one non-MKLDNN operator only (``minimum``): each such reader of an
MKLDNN-layout array pays a full copy. Rounding differs from the stock operator by a few ulp of ``|x|``.

Measured (2-core shared CPU, batch 32, forward+backward in ms; noisy): stock activation alone (64,56,56) ~360,
(128,28,28) ~310, (256,14,14) ~157, (512,7,7) ~90; BatchNorm + this ~77 / ~42 / ~19 / ~10 against
BatchNorm + ReLU ~52 / ~26 / ~13 / ~7. Also tried and slower: 1x1 depthwise convolution by ``gamma`` (MKLDNN), ``broadcast_mul``
over (N, H, W), over N only, over H*W rows, ``broadcast_like``, ``batch_dot`` (fused multiply-reduce), a second
BatchNorm sharing the moving statistics with scaled gamma/beta, ``relu(x) + gamma*min(x,0)``. Whole-step figures:
``benchmarks/bench_train.py``.
"""
from __future__ import annotations

import mxnet as mx


def broadcast_channels(vec: mx.sym.Symbol, like: mx.sym.Symbol, num_channels: int) -> mx.sym.Symbol:
    """Spread a per-channel vector (C,) to the shape of ``like`` (N, C, H, W) via two outer products.

    Inputs: ``vec`` (C,), ``like`` (N, C, H, W). Outputs: (N, C, H, W) equal to ``vec[c]`` at channel ``c``.
    Its gradient to ``vec`` is a GEMV, fast on CPU (unlike the reduction behind ``broadcast_*``).
    ``like`` should be a default-layout array (an output of a non-MKLDNN operator): slicing an MKLDNN-layout
    array copies all of it first.
    """
    column = like
    for axis in (1, 2, 3):
        column = mx.sym.slice_axis(column, axis=axis, begin=0, end=1)                   # (N, 1, 1, 1)
    ones_n = mx.sym.ones_like(mx.sym.reshape(column, shape=(-1, 1)))                   # (N, 1)
    plane = mx.sym.slice_axis(mx.sym.slice_axis(like, axis=0, begin=0, end=1), axis=1, begin=0, end=1)
    ones_hw = mx.sym.ones_like(mx.sym.reshape(plane, shape=(-3, 0, 0)))                # (1, H, W)
    per_row = mx.sym.dot(ones_n, mx.sym.reshape(vec, shape=(1, num_channels)))        # (N, C)
    return mx.sym.dot(mx.sym.reshape(per_row, shape=(0, 0, 1)), ones_hw)               # (N, C, H, W)


def fast_prelu(data: mx.sym.Symbol, name: str, num_channels: int) -> mx.sym.Symbol:
    """``max(x, 0) + gamma * min(x, 0)`` per channel; slope variable ``NAME_gamma`` (C,), init 0.25 like MXNet's.

    Inputs: ``data`` (N, C, H, W). Outputs: same shape; the last node is named ``NAME``.
    """
    gamma = mx.sym.var(name + "_gamma", shape=(num_channels,), init=mx.init.Constant(0.25))
    # ``data`` usually comes from an MKLDNN BatchNorm: read it with one non-MKLDNN operator only (minimum),
    # take the shapes from that operator's default-layout output, and add with the MKLDNN-aware elemwise_add.
    negative = mx.sym.minimum(data, 0.0)
    slope_minus_one = broadcast_channels(gamma - 1.0, negative, num_channels)
    return mx.sym.elemwise_add(data, negative * slope_minus_one, name=name)
