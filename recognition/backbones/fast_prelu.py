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
BatchNorm + ReLU ~52 / ~26 / ~13 / ~7. Also tried and slower: 1x1 depthwise convolution by ``gamma`` (MKLDNN),
``broadcast_mul``
over (N, H, W), over N only, over H*W rows, ``broadcast_like``, ``batch_dot`` (fused multiply-reduce), a second
BatchNorm sharing the moving statistics with scaled gamma/beta, ``relu(x) + gamma*min(x,0)``. Whole-step figures:
``benchmarks/bench_train.py``.

:func:`bn_prelu` (``prelu='bn'``) is faster still (y1 step ~0.70-0.78x the ReLU graph against ~0.48x for
:func:`fast_prelu`) but adds two constant auxiliary states per PReLU (``NAME_unit_moving_mean`` = 0,
``NAME_unit_moving_var`` = 1), which checkpoints must not carry: :func:`checkpoint_form` turns such a graph and its
parameters into insightface's (``LeakyReLU``, no unit states) and :func:`fill_unit_aux` adds the constants back.
"""
from __future__ import annotations

import json
from typing import Dict, Optional, Tuple

import mxnet as mx

from recognition.common import symbol_graph, symbol_json

UNIT_AUX_SUFFIXES = ("_unit_moving_mean", "_unit_moving_var")
PRELU_MARK = "__prelu_slope__"  # attribute on the last node of a bn_prelu: the slope variable's name


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


def _unit_scale(data: mx.sym.Symbol, scale: mx.sym.Symbol, name: str, mean: mx.sym.Symbol, var: mx.sym.Symbol,
                fused_relu: bool = False) -> mx.sym.Symbol:
    """``data * scale[c]`` (then ReLU when ``fused_relu``) as an MKLDNN BatchNorm on constant unit statistics."""
    op = mx.sym.contrib.BatchNormWithReLU if fused_relu else mx.sym.BatchNorm
    # eps 1e-12: var + eps rounds to exactly 1 in float32, so the map is exactly ``scale * x``
    return op(data, gamma=scale, beta=mx.sym.zeros_like(scale), moving_mean=mean, moving_var=var,
              use_global_stats=True, fix_gamma=False, eps=1e-12, name=name)


def bn_prelu(data: mx.sym.Symbol, name: str, num_channels: int, fused: Optional[bool] = None) -> mx.sym.Symbol:
    """PReLU as ``x + (1 - gamma) * relu(-x)`` with the per-channel products done by BatchNorm (global stats).

    Inputs: ``data`` (N, C, H, W). Outputs: same shape; last node ``NAME`` (marked for :func:`to_stock_graph`).
    Parameters: ``NAME_gamma`` (C,) as insightface's, plus the constant auxiliary states ``NAME_unit_moving_mean``
    (zeros) and ``NAME_unit_moving_var`` (ones), which BatchNorm requires as variables and never updates here.
    ``fused``: negate and ReLU in one ``contrib.BatchNormWithReLU`` (CPU only); default: when MXNet sees no GPU.
    Every operator is MKLDNN on CPU; MKLDNN BatchNorm's backward gives d/dgamma without a broadcast reduction.
    """
    if fused is None:
        fused = mx.context.num_gpus() == 0
    gamma = mx.sym.var(name + "_gamma", shape=(num_channels,), init=mx.init.Constant(0.25))
    mean = mx.sym.var(name + UNIT_AUX_SUFFIXES[0], shape=(num_channels,), init=mx.init.Zero())
    var = mx.sym.var(name + UNIT_AUX_SUFFIXES[1], shape=(num_channels,), init=mx.init.One())
    minus_one = mx.sym.ones_like(gamma) * -1.0
    if fused:
        positive_part_of_neg = _unit_scale(data, minus_one, name + "_neg", mean, var, fused_relu=True)
    else:
        positive_part_of_neg = mx.sym.Activation(_unit_scale(data, minus_one, name + "_neg", mean, var),
                                                 act_type="relu")
    scaled = _unit_scale(positive_part_of_neg, 1.0 - gamma, name + "_slope", mean, var)
    return mx.sym.elemwise_add(data, scaled, name=name, attr={PRELU_MARK: name + "_gamma"})


def is_unit_aux(name: str) -> bool:
    """Whether ``name`` is one of :func:`bn_prelu`'s constant auxiliary states (never saved)."""
    return name.endswith(UNIT_AUX_SUFFIXES)


def drop_unit_aux(aux: Dict[str, mx.nd.NDArray]) -> Dict[str, mx.nd.NDArray]:
    """``aux`` without :func:`bn_prelu`'s constant states."""
    return {k: v for k, v in aux.items() if not is_unit_aux(k)}


def fill_unit_aux(sym: mx.sym.Symbol, aux: Dict[str, mx.nd.NDArray]) -> Dict[str, mx.nd.NDArray]:
    """``aux`` plus the constant states ``sym`` needs (zeros for ``*_unit_moving_mean``, ones for ``_var``).

    Shapes come from the matching ``NAME_gamma``-sized channel count, read off the variable's shape attribute.
    """
    out = dict(aux)
    attrs = sym.attr_dict()
    for k in sym.list_auxiliary_states():
        if is_unit_aux(k) and k not in out:
            shape = tuple(json.loads(attrs[k]["__shape__"].replace("(", "[").replace(",)", "]").replace(")", "]")))
            out[k] = mx.nd.zeros(shape) if k.endswith(UNIT_AUX_SUFFIXES[0]) else mx.nd.ones(shape)
    return out


def to_stock_graph(sym: mx.sym.Symbol) -> mx.sym.Symbol:
    """``sym`` with every :func:`bn_prelu` replaced by ``LeakyReLU(act_type='prelu')`` on the same ``NAME_gamma``:
    insightface's graph and parameter names (the unit states disappear). Other graphs come back unchanged."""
    graph = symbol_graph(sym)
    nodes = graph["nodes"]
    marked = [n for n in nodes if PRELU_MARK in n.get("attrs", {})]
    if not marked:
        return sym
    index = {n["name"]: i for i, n in enumerate(nodes) if n["op"] == "null"}
    for node in marked:
        gamma = node["attrs"][PRELU_MARK]
        node["op"] = "LeakyReLU"
        node["attrs"] = {"act_type": "prelu"}
        node["inputs"] = [node["inputs"][0], [index[gamma], 0, 0]]
    # the replaced nodes' subgraphs are now unreachable; rebuilding from the heads drops them
    rebuilt = mx.sym.load_json(json.dumps(graph))
    return mx.sym.load_json(symbol_json(rebuilt))


def _is_stock_prelu(node: dict) -> bool:
    return node["op"] == "LeakyReLU" and node.get("attrs", {}).get("act_type") == "prelu"


def from_stock_graph(sym: mx.sym.Symbol, mode: str = "bn",
                     data_shape: Tuple[int, ...] = (1, 3, 112, 112)) -> mx.sym.Symbol:
    """``sym`` with every ``LeakyReLU(act_type='prelu')`` replaced by :func:`bn_prelu` (``mode='bn'``) or
    :func:`fast_prelu` (``'fast'``) on the same ``NAME_gamma``: the inverse of :func:`to_stock_graph`.

    Inputs: any graph (an insightface checkpoint's); ``data_shape`` of its ``data`` input, used only when a slope
    variable carries no ``__shape__`` attribute (checkpoint graphs usually do not). Outputs: the same function
    with the fast formulation; ``'bn'`` adds the unit auxiliary states (:func:`fill_unit_aux` supplies them).
    Graphs without stock PReLU nodes come back unchanged.
    """
    graph = symbol_graph(sym)
    nodes = graph["nodes"]
    if not any(_is_stock_prelu(n) for n in nodes):
        return sym
    build = {"bn": bn_prelu, "fast": fast_prelu}[mode]
    shapes: Dict[str, tuple] = {}
    out_nodes, remap = [], {}  # old node index -> new node index
    for i, node in enumerate(nodes):
        node = dict(node, inputs=[[remap[a], o, v] for a, o, v in node["inputs"]])
        if not _is_stock_prelu(node):
            remap[i] = len(out_nodes)
            out_nodes.append(node)
            continue
        data_entry, gamma_entry = node["inputs"][0], node["inputs"][1]
        gamma_node = out_nodes[gamma_entry[0]]
        shape_attr = gamma_node.get("attrs", {}).get("__shape__")
        if shape_attr:
            channels = int(shape_attr.strip("()").split(",")[0])
        else:
            if not shapes:
                arg_shapes = sym.infer_shape_partial(data=tuple(data_shape))[0]
                shapes.update(zip(sym.list_arguments(), arg_shapes))
            channels = int(shapes[gamma_node["name"]][0])
        name, placeholder = node["name"], "__prelu_input__"
        sub_graph = symbol_graph(build(mx.sym.var(placeholder), name, channels))
        sub_nodes = sub_graph["nodes"]
        sub_map = {}
        for j, sub in enumerate(sub_nodes):
            if sub["name"] == placeholder:
                continue
            if sub["name"] == name + "_gamma" and sub["op"] == "null":
                sub_map[j] = gamma_entry[0]
                continue
            entries = []
            for a, o, v in sub["inputs"]:
                entries.append(list(data_entry) if sub_nodes[a]["name"] == placeholder else [sub_map[a], o, v])
            sub = dict(sub, inputs=entries)
            if sub["op"] != "null" and not sub["name"].startswith(name):  # auto names: keep them unique
                sub["name"] = f"{name}_{sub['name']}"
            sub_map[j] = len(out_nodes)
            out_nodes.append(sub)
        remap[i] = sub_map[sub_graph["heads"][0][0]]
    graph["nodes"] = out_nodes
    graph["heads"] = [[remap[a], o, v] for a, o, v in graph["heads"]]
    graph["arg_nodes"] = [i for i, n in enumerate(out_nodes) if n["op"] == "null"]
    graph.pop("node_row_ptr", None)
    return mx.sym.load_json(json.dumps(graph))


def count_prelu(sym: mx.sym.Symbol) -> Dict[str, int]:
    """``{'bn': n, 'stock': m}``: :func:`bn_prelu` layers and ``LeakyReLU(act_type='prelu')`` nodes of ``sym``."""
    nodes = symbol_graph(sym)["nodes"]
    return {"bn": sum(PRELU_MARK in n.get("attrs", {}) for n in nodes), "stock": sum(map(_is_stock_prelu, nodes))}


def convert_prelu(sym: mx.sym.Symbol, mode: str, data_shape: Tuple[int, ...] = (1, 3, 112, 112)) -> mx.sym.Symbol:
    """``sym`` (stock or ``bn`` PReLU nodes) in PReLU formulation ``mode`` ('bn', 'fast' or 'stock'); the
    parameters are the same (plus/minus the unit states). ``fast`` graphs cannot be recognised and stay as they are."""
    if mode != "bn":
        sym = to_stock_graph(sym)
    return sym if mode == "stock" else from_stock_graph(sym, mode, data_shape)


def checkpoint_form(sym: mx.sym.Symbol, arg: Dict[str, mx.nd.NDArray],
                    aux: Dict[str, mx.nd.NDArray]) -> Tuple[mx.sym.Symbol, dict, dict]:
    """What a checkpoint stores for a training graph: the stock graph and parameters without unit states."""
    return to_stock_graph(sym), arg, drop_unit_aux(aux)
