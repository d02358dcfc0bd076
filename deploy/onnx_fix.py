"""Repairs around MXNet 1.9.1's ONNX exporter so that onnxruntime loads and runs what it writes.

What goes wrong with a raw ``mx.onnx.export_model`` of an insightface checkpoint, and why:

1. ``Gemm ... Dimension mismatch in unification between 512 and 1``. The exporter reads a boolean operator
   attribute that the symbol JSON leaves out as *False* (``attrs.get(name, 0)``), whereas MXNet's default may be
   True. Insightface's symbols say ``FullyConnected(num_hidden=128)`` without ``flatten``: MXNet flattens
   (N, 512, 1, 1) to (N, 512), the exporter takes the ``flatten=False`` path, ``Flatten(axis=-1)`` gives
   (N*512, 1) and the Gemm with the (128, 512) weight cannot unify. Fix before export: write every boolean
   attribute the operator registry gives a default for explicitly into the symbol (:func:`explicit_defaults`).
2. ``BatchNorm(fix_gamma=True)`` (MXNet's default, used by insightface's ``fc1``): MXNet treats gamma as 1
   whatever is stored; the exporter ignores the flag and exports the stored gamma. Fix: export ones for those
   gammas (:func:`honour_fix_gamma`).
3. ``PRelu`` gets MXNet's (C,) slope; ONNX broadcasts a slope from the *right* (numpy rules), so (C,) lines up
   with W of an (N, C, H, W) input. Fix after export: reshape the slope to (C, 1, ..., 1) (:func:`fix_onnx_model`).
4. ``Reshape`` with MXNet's special codes (-2, -3, -4) is refused, and ``dot`` of >2-D arrays becomes an ONNX
   ``MatMul``, which batches over leading axes where MXNet contracts the last axis of ``a`` with the first of
   ``b`` (CPU-fast formulations such as the toolkit's fast PReLU use both). Fix before export
   (:func:`lower_for_onnx`): write such a Reshape with plain sizes, and such a dot as 2-D ``dot`` between
   reshapes; the batch axis becomes -1 so that a dynamic batch still works.
5. Every weight is also listed as a graph input, which keeps onnxruntime from treating it as a constant.
   Fix after export: drop graph inputs that are initializers.
"""
from __future__ import annotations

import ast
import ctypes
import json
import re
from functools import lru_cache
from typing import Dict, List, Tuple

import numpy as np

from recognition.common import symbol_graph


@lru_cache(maxsize=None)
def boolean_defaults(op_name: str) -> Dict[str, str]:
    """``{param: 'True'|'False'}`` for every boolean parameter of MXNet operator ``op_name`` that has a default."""
    from mxnet.base import _LIB, c_str, check_call, py_str

    handle = ctypes.c_void_p()
    check_call(_LIB.NNGetOpHandle(c_str(op_name), ctypes.byref(handle)))
    if not handle.value:
        return {}
    real_name, desc, key_var, ret_type = (ctypes.c_char_p() for _ in range(4))
    num_args = ctypes.c_uint()
    names, types, descs = (ctypes.POINTER(ctypes.c_char_p)() for _ in range(3))
    check_call(_LIB.MXSymbolGetAtomicSymbolInfo(handle, ctypes.byref(real_name), ctypes.byref(desc),
                                                ctypes.byref(num_args), ctypes.byref(names), ctypes.byref(types),
                                                ctypes.byref(descs), ctypes.byref(key_var), ctypes.byref(ret_type)))
    out = {}
    for i in range(num_args.value):
        kind = py_str(types[i])
        m = re.match(r"boolean, optional, default=(\w+)", kind)
        if m:
            out[py_str(names[i])] = "True" if m.group(1) in ("1", "True", "true") else "False"
    return out


def explicit_defaults(symbol):
    """Return ``symbol`` with every omitted boolean operator attribute written out with MXNet's default.

    Needed because the exporter reads an omitted boolean as False (see the module docstring, item 1).
    Returns ``(new_symbol, changed)`` where ``changed`` lists ``"node.attr=value"`` strings.
    """
    import mxnet as mx

    graph = symbol_graph(symbol)
    changed = []
    for node in graph["nodes"]:
        if node["op"] == "null":
            continue
        attrs = node.setdefault("attrs", {})
        for key, value in boolean_defaults(node["op"]).items():
            if key not in attrs:
                attrs[key] = value
                changed.append(f"{node['name']}.{key}={value}")
    if not changed:
        return symbol, changed
    return mx.sym.load_json(json.dumps(graph)), changed


_SPECIAL_RESHAPE = (-2, -3, -4)


def _entry_shapes(symbol, data_shape) -> Dict[str, tuple]:
    internals = symbol.get_internals()
    _, out_shapes, _ = internals.infer_shape(data=tuple(data_shape))
    return dict(zip(internals.list_outputs(), (tuple(s) for s in out_shapes)))


def _entry_name(nodes, entry) -> str:
    node = nodes[entry[0]]
    if node["op"] == "null":
        return node["name"]
    return node["name"] + ("_output" if entry[1] == 0 else f"_output{entry[1]}")


def _plain_shape(name: str, small: tuple, large: tuple) -> str:
    """Sizes that do not follow the batch stay literal; the one that does becomes -1."""
    from recognition.common import ToolkitError

    codes = [a if a == b else -1 for a, b in zip(small, large)]
    if codes.count(-1) > 1:
        raise ToolkitError(f"node {name}: reshape/dot output {small} has several batch-dependent axes; "
                           f"cannot be written for ONNX")
    return str(tuple(codes))


def lower_for_onnx(symbol, data_shape) -> Tuple[object, List[str]]:
    """Rewrite ``Reshape`` with special codes and >2-D ``dot`` into forms the exporter converts right (item 4).

    ``data_shape`` (N, C, H, W): shapes are inferred at two batch sizes to tell batch-dependent axes.
    Returns ``(new_symbol, names of rewritten nodes)``.
    """
    import mxnet as mx

    graph = symbol_graph(symbol)
    nodes = graph["nodes"]
    rest = tuple(data_shape[1:])
    small, large = _entry_shapes(symbol, (2,) + rest), _entry_shapes(symbol, (3,) + rest)
    new_nodes: List[dict] = []
    remap: Dict[int, int] = {}
    changed: List[str] = []

    def add(node: dict) -> int:
        new_nodes.append(node)
        return len(new_nodes) - 1

    def ref(entry) -> list:
        return [remap[entry[0]], entry[1], 0]

    for i, node in enumerate(nodes):
        op, attrs, name = node["op"], node.get("attrs", {}), node["name"]
        out = name + "_output"
        if op in ("Reshape", "reshape") and "shape" in attrs and (
                any(c in _SPECIAL_RESHAPE for c in ast.literal_eval(attrs["shape"])) or _is_true(attrs.get("reverse"))):
            attrs = {k: v for k, v in attrs.items() if k != "reverse"}
            attrs["shape"] = _plain_shape(name, small[out], large[out])
            remap[i] = add(dict(node, attrs=attrs, inputs=[ref(e) for e in node["inputs"]]))
            changed.append(name)
            continue
        if op == "dot" and not _is_true(attrs.get("transpose_a")) and not _is_true(attrs.get("transpose_b")):
            a, b = (_entry_name(nodes, e) for e in node["inputs"][:2])
            if len(small[a]) > 2 or len(small[b]) > 2:
                k = small[a][-1]
                lhs = add({"op": "Reshape", "name": name + "_lhs2d", "attrs": {"shape": f"(-1, {k})"},
                           "inputs": [ref(node["inputs"][0])]})
                rhs = add({"op": "Reshape", "name": name + "_rhs2d", "attrs": {"shape": f"({k}, -1)"},
                           "inputs": [ref(node["inputs"][1])]})
                flat = add({"op": "dot", "name": name + "_2d", "attrs": {}, "inputs": [[lhs, 0, 0], [rhs, 0, 0]]})
                remap[i] = add({"op": "Reshape", "name": name,
                                "attrs": {"shape": _plain_shape(name, small[out], large[out])},
                                "inputs": [[flat, 0, 0]]})
                changed.append(name)
                continue
        remap[i] = add(dict(node, inputs=[ref(e) for e in node["inputs"]]))
    if not changed:
        return symbol, changed
    graph["nodes"] = new_nodes
    graph["arg_nodes"] = [j for j, n in enumerate(new_nodes) if n["op"] == "null"]
    graph["heads"] = [ref(h) for h in graph["heads"]]
    graph.pop("node_row_ptr", None)
    return mx.sym.load_json(json.dumps(graph)), changed


def _is_true(value) -> bool:
    return str(value) in ("True", "1", "true")


def honour_fix_gamma(symbol, params: dict) -> Tuple[dict, List[str]]:
    """Replace the gamma of every ``BatchNorm(fix_gamma=True)`` in ``symbol`` by ones (item 2 above).

    ``symbol`` must carry explicit attributes (:func:`explicit_defaults`). Returns ``(params copy, gamma names)``.
    """
    import mxnet as mx

    graph = symbol_graph(symbol)
    nodes = graph["nodes"]
    params = dict(params)
    fixed = []
    for node in nodes:
        if node["op"] != "BatchNorm" or not _is_true(node.get("attrs", {}).get("fix_gamma", "True")):
            continue
        gamma_node = nodes[node["inputs"][1][0]]
        name = gamma_node["name"]
        if gamma_node["op"] == "null" and name in params:
            params[name] = mx.nd.ones_like(params[name])
            fixed.append(name)
    return params, fixed


def _initializer(graph, name):
    for init in graph.initializer:
        if init.name == name:
            return init
    return None


def _ranks(model) -> Dict[str, int]:
    """Rank of every value whose shape ONNX shape inference can tell (inputs, intermediates, outputs)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    for init in inferred.graph.initializer:
        ranks[init.name] = len(init.dims)
    return ranks


def fix_onnx_model(model) -> Tuple[object, List[str]]:
    """Repair an exported ``onnx.ModelProto`` in place (items 3 and 5 above); returns ``(model, list of changes)``.

    Generic graph surgery: it looks at operator types and inferred ranks only, never at layer names.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    changes = []
    init_names = {i.name for i in graph.initializer}
    kept = [vi for vi in graph.input if vi.name not in init_names]
    if len(kept) != len(graph.input):
        changes.append(f"dropped {len(graph.input) - len(kept)} initializer(s) from the graph inputs")
        del graph.input[:]
        graph.input.extend(kept)

    ranks = _ranks(model)
    uses: Dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    new_nodes = []
    n_prelu = 0
    for node in graph.node:
        if node.op_type == "PRelu" and len(node.input) == 2:
            x_rank, slope = ranks.get(node.input[0]), node.input[1]
            init = _initializer(graph, slope)
            if x_rank is not None and x_rank > 2 and ranks.get(slope) == 1:
                trailing = [1] * (x_rank - 2)
                if init is not None and uses.get(slope, 0) == 1:
                    arr = numpy_helper.to_array(init)
                    init.CopyFrom(numpy_helper.from_array(arr.reshape([-1] + trailing), init.name))
                else:  # shared or computed slope: reshape it in the graph
                    shape_name = f"{node.name or slope}_slope_shape"
                    graph.initializer.append(numpy_helper.from_array(np.array([-1] + trailing, np.int64),
                                                                     shape_name))
                    reshaped = f"{node.name or slope}_slope_chw"
                    new_nodes.append(helper.make_node("Reshape", [slope, shape_name], [reshaped],
                                                      name=f"{node.name}_slope_reshape"))
                    node.input[1] = reshaped
                n_prelu += 1
        new_nodes.append(node)
    if n_prelu:
        changes.append(f"reshaped {n_prelu} PRelu slope(s) from (C,) to (C,1,...,1)")
        del graph.node[:]
        graph.node.extend(new_nodes)
    onnx.checker.check_model(model)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return model, changes
