"""Fold inference BatchNorm into the convolution or fully-connected layer before it.

At inference a BatchNorm over channel ``c`` is the affine map ``y = s_c * x + t_c`` with
``s_c = gamma_c / sqrt(var_c + eps)`` (``gamma_c = 1`` under ``fix_gamma=True``, MXNet's default) and
``t_c = beta_c - s_c * mean_c``. When ``x`` is the output of a Convolution (weight (O, I/g, kh, kw)) or a
FullyConnected layer (weight (O, D)) used by nothing else, the pair equals one layer with weight ``s_o * W_o``
and bias ``s_o * b_o + t_o``: one operator and one pass over the activations fewer.

    sym2, arg2, aux2, folded = fold_batchnorm(sym, arg_params, aux_params)

The folded layer takes the BatchNorm's node name (so an embedding graph still ends in ``fc1_output``); its
parameters get new names (``BN_fold_weight``, ``BN_fold_bias``) so that they never mix with a checkpoint's.
Arithmetic is done in float64 and stored as float32: outputs agree with the unfolded graph to float32 rounding.
"""
from __future__ import annotations

import json
from typing import Dict, List, Tuple

import numpy as np

from recognition.common import ToolkitError, symbol_graph

FOLDABLE = ("Convolution", "FullyConnected")


def _true(value, default: bool) -> bool:
    return default if value is None else str(value) in ("True", "true", "1")


def _consumers(nodes: List[dict], heads: List[list]) -> Dict[Tuple[int, int], int]:
    """How many times each ``(node, output)`` entry is read (graph heads count)."""
    counts: Dict[Tuple[int, int], int] = {}
    for node in nodes:
        for e in node["inputs"]:
            counts[(e[0], e[1])] = counts.get((e[0], e[1]), 0) + 1
    for e in heads:
        counts[(e[0], e[1])] = counts.get((e[0], e[1]), 0) + 1
    return counts


def _as_np(x) -> np.ndarray:
    return np.asarray(x.asnumpy() if hasattr(x, "asnumpy") else x, dtype=np.float64)


class FoldPlan:
    """Which BatchNorms fold into which layers: the folded ``symbol`` and :meth:`params` to fold any parameters.

    Built from the graph alone, so one plan serves every set of parameters of that graph (a training run's
    verification rounds refold each round's parameters without touching the graph again).
    """

    def __init__(self, symbol):
        graph = symbol_graph(symbol)
        nodes, heads = graph["nodes"], graph["heads"]
        reads = _consumers(nodes, heads)
        var_reads: Dict[int, int] = {}
        for node in nodes:
            for e in node["inputs"]:
                var_reads[e[0]] = var_reads.get(e[0], 0) + 1
        replace: Dict[int, int] = {}  # BN node index -> layer node index
        self.folds: List[dict] = []
        for i, node in enumerate(nodes):
            if node["op"] != "BatchNorm":
                continue
            attrs = node.get("attrs", {})
            src = node["inputs"][0]
            layer = nodes[src[0]]
            if layer["op"] not in FOLDABLE or src[1] != 0 or reads.get((src[0], 0), 0) != 1:
                continue
            if int(attrs.get("axis", 1)) != 1 or _true(attrs.get("output_mean_var"), False):
                continue
            has_bias = not _true(layer.get("attrs", {}).get("no_bias"), False)
            owned = [layer["inputs"][1][0]] + ([layer["inputs"][2][0]] if has_bias else [])
            if any(var_reads.get(j, 0) != 1 or nodes[j]["op"] != "null" for j in owned):
                continue  # a shared weight cannot take one BatchNorm's scale
            bn = node["name"]
            self.folds.append({"bn": bn, "stats": [nodes[e[0]]["name"] for e in node["inputs"][1:5]],
                               "weight": nodes[owned[0]]["name"], "bias": nodes[owned[1]]["name"] if has_bias else None,
                               "eps": float(attrs.get("eps", 1e-3)), "fix_gamma": _true(attrs.get("fix_gamma"), True)})
            nodes.append({"op": "null", "name": f"{bn}_fold_weight", "inputs": []})
            nodes.append({"op": "null", "name": f"{bn}_fold_bias", "inputs": []})
            layer["inputs"] = [layer["inputs"][0], [len(nodes) - 2, 0, 0], [len(nodes) - 1, 0, 0]]
            layer["attrs"] = dict(layer.get("attrs", {}), no_bias="False")
            layer["name"] = bn  # the pair's output keeps the BatchNorm's name (fc1_output stays fc1_output)
            replace[i] = src[0]
        self.folded = [f["bn"] for f in self.folds]
        self.symbol = _rebuild(graph, replace) if self.folds else symbol

    def params(self, arg_params: dict, aux_params: dict) -> Tuple[dict, dict]:
        """``(arg, aux)`` for :attr:`symbol` from the unfolded graph's parameters (``mx.nd`` arrays)."""
        import mxnet as mx

        params = dict(arg_params, **aux_params)
        new_values: Dict[str, np.ndarray] = {}
        for f in self.folds:
            names = f["stats"] + [f["weight"]] + ([f["bias"]] if f["bias"] else [])
            missing = [n for n in names if n not in params]
            if missing:
                raise ToolkitError(f"BatchNorm folding: parameters {', '.join(missing)} of {f['bn']} are missing")
            gamma, beta, mean, var = (_as_np(params[n]) for n in f["stats"])
            if f["fix_gamma"]:
                gamma = np.ones_like(gamma)
            scale = gamma / np.sqrt(var + f["eps"])
            weight = _as_np(params[f["weight"]])
            bias = _as_np(params[f["bias"]]) if f["bias"] else np.zeros(weight.shape[0])
            new_values[f"{f['bn']}_fold_weight"] = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
            new_values[f"{f['bn']}_fold_bias"] = scale * (bias - mean) + beta
        arg, aux = {}, {}
        for name in self.symbol.list_arguments():
            if name in new_values:
                arg[name] = mx.nd.array(new_values[name].astype(np.float32))
            elif name in params:
                arg[name] = params[name]
        for name in self.symbol.list_auxiliary_states():
            if name in params:
                aux[name] = params[name]
        return arg, aux


def fold_batchnorm(symbol, arg_params: dict, aux_params: dict):
    """Return ``(symbol, arg_params, aux_params, folded)`` with every foldable BatchNorm merged into its layer.

    A BatchNorm is folded when its input is output 0 of a Convolution/FullyConnected read by nothing else, whose
    weight (and bias) no other node reads, its ``axis`` is 1 and it does not output its batch statistics. Others
    stay. ``folded`` lists the BatchNorm names. Parameter dicts hold ``mx.nd`` arrays (unused entries dropped).
    """
    plan = FoldPlan(symbol)
    arg, aux = plan.params(arg_params, aux_params)
    return plan.symbol, arg, aux, plan.folded


def _rebuild(graph: dict, replace: Dict[int, int]):
    """Drop the folded BatchNorm nodes (and now-unused variables), re-index, and load as a Symbol."""
    import mxnet as mx

    nodes = graph["nodes"]

    def target(e):
        idx = e[0]
        while idx in replace:
            idx = replace[idx]
        return idx, e[1]

    # keep only nodes reachable from the heads, in topological order (a var appended late is moved before its use)
    order: List[int] = []
    seen = set()

    def visit(idx: int) -> None:
        stack = [(idx, False)]
        while stack:
            j, done = stack.pop()
            if done:
                order.append(j)
                continue
            if j in seen:
                continue
            seen.add(j)
            stack.append((j, True))
            for e in reversed(nodes[j]["inputs"]):
                k, _ = target(e)
                if k not in seen:
                    stack.append((k, False))

    for h in graph["heads"]:
        visit(target(h)[0])
    new_index = {old: new for new, old in enumerate(order)}
    new_nodes = []
    for old in order:
        node = dict(nodes[old])
        node["inputs"] = [[new_index[target(e)[0]], target(e)[1], 0] for e in nodes[old]["inputs"]]
        new_nodes.append(node)
    out = {"nodes": new_nodes, "arg_nodes": [j for j, n in enumerate(new_nodes) if n["op"] == "null"],
           "heads": [[new_index[target(h)[0]], target(h)[1], 0] for h in graph["heads"]],
           "attrs": graph.get("attrs", {})}
    return mx.sym.load_json(json.dumps(out))


__all__ = ["FoldPlan", "fold_batchnorm"]
