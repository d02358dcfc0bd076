"""Checkpoint graph helpers for pretrained loading: cut at the embedding, resize it, reconcile parameter names.

Names: Gluon -> insightface suffixes, known renames between insightface versions, graph-position matching.
The classifier is found by graph position or the meta sidecar, never by "fc" in a name (``fc1`` is the embedding).
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from recognition.common import ToolkitError, symbol_graph

EMBEDDING_NODE = "fc1_output"
# Renames between insightface versions: target name -> names the same array may have in an older checkpoint.
_ALIASES = (
    (re.compile(r"^pre_fc1_weight$"), "fc1_weight"),  # model-zoo y1/r100 of 2018 call the embedding FC fc1_weight
    (re.compile(r"^fc1_weight$"), "pre_fc1_weight"),
)
# Gluon -> insightface (symbolic) names, applied to every checkpoint name on load.
_GLUON_SUFFIXES = (("_running_mean", "_moving_mean"), ("_running_var", "_moving_var"), ("_alpha", "_gamma"))


def mx_error_line(exc: Exception) -> str:
    """The informative line of an MXNetError (they carry C++ stack traces)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Error in operator" in ln or "Shape inconsistent" in ln or "Incompatible attr" in ln:
            return ln
    return lines[0] if lines else type(exc).__name__


def is_input(name: str) -> bool:
    return name == "data" or name.endswith("label")


def normalise_names(arg: dict, aux: dict) -> Tuple[dict, dict, Dict[str, str]]:
    """Apply Gluon -> insightface renames; BN statistics go to aux. Returns (arg, aux, {new: old})."""
    out_arg, out_aux, renamed = {}, {}, {}
    for src in (arg, aux):
        for name, value in src.items():
            new = name
            for old_sfx, new_sfx in _GLUON_SUFFIXES:
                if new.endswith(old_sfx):
                    new = new[: -len(old_sfx)] + new_sfx
            if new != name:
                renamed[new] = name
            (out_aux if new.endswith(("_moving_mean", "_moving_var")) else out_arg)[new] = value
    return out_arg, out_aux, renamed


def cut_at_embedding(symbol, where: str = "") -> object:
    """The sub-graph of ``symbol`` ending at ``fc1_output`` (drops fc7/softmax of a training checkpoint).

    The one definition for loading, verification, export and distillation; ToolkitError listing the outputs
    (and the last internal nodes) when the node is absent.
    """
    internals = symbol.get_internals()
    names = internals.list_outputs()
    if EMBEDDING_NODE not in names:
        raise ToolkitError(f"{where or 'checkpoint'}: graph has no '{EMBEDDING_NODE}' node (outputs: "
                           f"{', '.join(symbol.list_outputs())}); last internal nodes: {', '.join(names[-4:])}; "
                           "is it an insightface recognition model?")
    return internals[EMBEDDING_NODE]


def embedding_layer(symbol) -> Tuple[List[str], Optional[str]]:
    """Parameter names of the layer that produces the embedding, and the name of its FullyConnected node.

    Walks back from the output (``fc1`` BatchNorm) through parameter-free ops to the first FullyConnected
    (insightface: ``pre_fc1`` FC -> ``fc1`` BN). Returns ``(names, None)`` when no FC is found nearby.
    """
    graph = symbol_graph(symbol)
    nodes = graph["nodes"]
    idx = graph["heads"][0][0]
    names: List[str] = []
    for _ in range(8):
        node = nodes[idx]
        data_inputs = []
        for inp in node["inputs"]:
            src = nodes[inp[0]]
            if src["op"] == "null":
                if not is_input(src["name"]):
                    names.append(src["name"])
            else:
                data_inputs.append(inp[0])
        if node["op"] == "FullyConnected":
            return names, node["name"]
        if not data_inputs or node["op"] in ("Convolution", "Pooling"):
            break
        idx = data_inputs[0]
    return names, None


def set_embedding_size(symbol, emb_size: int) -> object:
    """Rewrite a cut graph so that its embedding FC has ``emb_size`` outputs (the BN after it follows)."""
    names, fc_name = embedding_layer(symbol)
    if fc_name is None:
        raise ToolkitError("--emb-size: cannot find the FullyConnected layer producing fc1 in the checkpoint graph")
    graph = symbol_graph(symbol)
    for node in graph["nodes"]:
        attrs = node.get("attrs", {})
        if node["name"] == fc_name:
            attrs["num_hidden"] = str(emb_size)
        elif node["op"] == "null" and node["name"] in names:
            attrs.pop("__shape__", None)  # old saves pin variable shapes; they would contradict the new size
            if "num_hidden" in attrs:
                attrs["num_hidden"] = str(emb_size)
    import mxnet as mx

    return mx.sym.load_json(json.dumps(graph))


def infer_param_shapes(symbol, data_shape: Sequence[int], where: str) -> Tuple[Dict[str, tuple], Dict[str, tuple], int]:
    """Shapes of arguments and aux states for input ``(1,)+data_shape``, and the output width (embedding size)."""
    import mxnet as mx

    try:
        arg_shapes, out_shapes, aux_shapes = symbol.infer_shape(data=(1,) + tuple(data_shape))
    except mx.base.MXNetError as exc:
        raise ToolkitError(f"{where}: shapes do not fit together ({mx_error_line(exc)})") from None
    if arg_shapes is None:
        raise ToolkitError(f"{where}: cannot infer shapes for input {tuple(data_shape)}")
    args = dict(zip(symbol.list_arguments(), (tuple(s) for s in arg_shapes)))
    aux = dict(zip(symbol.list_auxiliary_states(), (tuple(s) for s in aux_shapes)))
    return args, aux, int(np.prod(out_shapes[0][1:]))


def find_classifier(ckpt_sym, ckpt_arg: dict, meta: dict, fc7_name: str, ckpt_emb: Optional[int],
                     backbone_names: set) -> Tuple[Optional[str], Optional[str], List[str]]:
    """(weight name, bias name or None, other head params) of the checkpoint's classifier."""
    head: List[str] = []
    if ckpt_sym is not None:
        head = [n for n in ckpt_sym.list_arguments() + ckpt_sym.list_auxiliary_states()
                if n not in backbone_names and not is_input(n)]

    def two_d(name):
        v = ckpt_arg.get(name)
        return v is not None and len(v.shape) == 2 and (ckpt_emb is None or v.shape[1] == ckpt_emb)

    weight = None
    candidates = [meta.get("fc7_name") and meta["fc7_name"] + "_weight"]
    graph_heads = [n for n in head if two_d(n)]
    graph_heads.sort(key=lambda n: ("fc7" not in n, n))  # prefer the conventional name among several
    candidates += graph_heads + ["fc7_weight", fc7_name + "_weight"]
    if ckpt_sym is None:  # no graph: an unclaimed (C, E) matrix is the classifier
        candidates += sorted(n for n in ckpt_arg if n not in backbone_names and two_d(n))
    for cand in candidates:
        if cand and cand in ckpt_arg and cand not in backbone_names and two_d(cand):
            weight = cand
            break
    if weight is None:
        return None, None, head
    bias = weight[: -len("_weight")] + "_bias" if weight.endswith("_weight") else None
    if bias not in ckpt_arg or ckpt_arg[bias].shape != (ckpt_arg[weight].shape[0],):
        bias = None
    others = [n for n in head if n not in (weight, bias)]
    return weight, bias, others


def alias_candidates(name: str) -> List[str]:
    return [pat.sub(rep, name) for pat, rep in _ALIASES if pat.search(name)]


def positional(targets: List[str], target_shapes: dict, sources: List[str], source_arrays: dict) -> Dict[str, str]:
    """Match leftovers by graph position when both lists have the same length and pairwise equal shapes."""
    if not targets or len(targets) != len(sources):
        return {}
    if any(target_shapes[t] != tuple(source_arrays[s].shape) for t, s in zip(targets, sources)):
        return {}
    return dict(zip(targets, sources))


def _bn_attrs(attrs: dict) -> Tuple[float, bool]:
    """(eps, fix_gamma) of a BatchNorm node, with MXNet's defaults (1e-3, True) where unset."""
    return float(attrs.get("eps", 1e-3)), attrs.get("fix_gamma", "True") in ("True", "true", "1")


def adopt_bn_attrs(symbol, ckpt_cut, matched: Dict[str, str]) -> Tuple[object, int]:
    """Give each BatchNorm of ``symbol`` the eps/fix_gamma of the checkpoint BN whose gamma it loads.

    Older insightface builders left ``eps`` at MXNet's 1e-3 where today's say 2e-5: same parameters, different
    outputs. The checkpoint's graph is the truth for the weights it holds.
    """
    import mxnet as mx

    def bn_by_gamma(graph):
        nodes = graph["nodes"]
        return {nodes[n["inputs"][1][0]]["name"]: n for n in nodes if n["op"] == "BatchNorm" and len(n["inputs"]) > 1}

    src = bn_by_gamma(symbol_graph(ckpt_cut))
    graph = symbol_graph(symbol)
    changed = 0
    for gamma, node in bn_by_gamma(graph).items():
        ref = src.get(matched.get(gamma, ""))
        if ref is None:
            continue
        want, have = _bn_attrs(ref.get("attrs", {})), _bn_attrs(node.get("attrs", {}))
        if want != have:
            node.setdefault("attrs", {}).update({"eps": repr(want[0]), "fix_gamma": str(want[1])})
            changed += 1
    return (mx.sym.load_json(json.dumps(graph)), changed) if changed else (symbol, 0)
