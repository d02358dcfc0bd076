"""Load a pretrained insightface checkpoint for fine-tuning: reconcile names, adapt the head, report everything.

``load_pretrained`` never re-initialises a backbone parameter silently: a parameter that is missing from the
checkpoint or has another shape stops the run with one line, unless ``allow_missing`` (then it is reported).
The classifier (``fc7``) is found by graph position or by the ``PREFIX-meta.json`` sidecar, never by "fc" in a
name (``fc1`` is the embedding). ``imprint_fc7`` builds a classifier from class-mean embeddings.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from recognition.common import ToolkitError, atomic_write, load_checkpoint, parse_prefix_epoch

logger = logging.getLogger("recognition")

EMBEDDING_NODE = "fc1_output"
# Renames between insightface versions: target name -> names the same array may have in an older checkpoint.
_ALIASES = (
    (re.compile(r"^pre_fc1_weight$"), "fc1_weight"),  # model-zoo y1/r100 of 2018 call the embedding FC fc1_weight
    (re.compile(r"^fc1_weight$"), "pre_fc1_weight"),
)
# Gluon -> insightface (symbolic) names, applied to every checkpoint name on load.
_GLUON_SUFFIXES = (("_running_mean", "_moving_mean"), ("_running_var", "_moving_var"), ("_alpha", "_gamma"))


def fmt_shape(shape) -> str:
    """``(128, 512)`` -> ``(128,512)``: compact shapes for one-line messages."""
    return "(" + ",".join(str(int(d)) for d in shape) + ")"


@dataclass
class LoadReport:
    """What happened to every array of a pretrained checkpoint.

    ``loaded``: (name, shape, checkpoint name); ``reinitialised``: (name, shape, reason); ``dropped``:
    (checkpoint name, reason); ``unused``: (checkpoint name, shape) -- in the checkpoint, needed by nothing.
    """

    spec: str = ""
    network: str = ""
    loaded: List[Tuple[str, tuple, str]] = field(default_factory=list)
    reinitialised: List[Tuple[str, tuple, str]] = field(default_factory=list)
    dropped: List[Tuple[str, str]] = field(default_factory=list)
    unused: List[Tuple[str, tuple]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def renamed(self) -> List[Tuple[str, tuple, str]]:
        return [item for item in self.loaded if item[0] != item[2]]

    def to_dict(self) -> dict:
        return {
            "spec": self.spec, "network": self.network,
            "counts": {"loaded": len(self.loaded), "renamed": len(self.renamed),
                       "reinitialised": len(self.reinitialised), "dropped": len(self.dropped),
                       "unused": len(self.unused)},
            "loaded": [{"name": n, "shape": list(s), "source": src} for n, s, src in self.loaded],
            "reinitialised": [{"name": n, "shape": list(s), "reason": r} for n, s, r in self.reinitialised],
            "dropped": [{"name": n, "reason": r} for n, r in self.dropped],
            "unused": [{"name": n, "shape": list(s)} for n, s in self.unused],
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """Readable multi-line summary: counts, then every rename, re-initialisation, drop and unused array."""
        lines = [f"pretrained {self.spec} (network: {self.network})",
                 f"  loaded {len(self.loaded)} arrays ({len(self.renamed)} renamed), re-initialised "
                 f"{len(self.reinitialised)}, dropped {len(self.dropped)}, unused {len(self.unused)}"]
        lines += [f"  renamed: {n} {fmt_shape(s)} <- {src}" for n, s, src in self.renamed]
        lines += [f"  re-initialised: {n} {fmt_shape(s)}: {r}" for n, s, r in self.reinitialised]
        lines += [f"  dropped: {n}: {r}" for n, r in self.dropped]
        lines += [f"  unused: {n} {fmt_shape(s)}" for n, s in self.unused]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def save(self, folder: str) -> Tuple[str, str]:
        """Write ``load_report.json`` and ``load_report.txt`` into ``folder`` atomically; returns both paths."""
        json_path = os.path.join(folder, "load_report.json")
        txt_path = os.path.join(folder, "load_report.txt")
        with atomic_write(json_path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        with atomic_write(txt_path, "w") as f:
            f.write(self.format() + "\n")
        return json_path, txt_path


@dataclass
class Pretrained:
    """What ``load_pretrained`` returns.

    ``arg_params``/``aux_params`` hold the backbone+embedding arrays under ``embedding_symbol``'s names; names in
    ``missing`` (re-initialised, see ``report``) are absent and must be initialised by the caller
    (``Module.init_params(..., allow_missing=True)`` is then safe). ``fc7`` maps ``{fc7_name}_weight`` (and
    ``_bias``) to the kept classifier arrays, or is ``{}`` when the classifier must be created fresh.
    """

    embedding_symbol: object
    arg_params: Dict[str, object]
    aux_params: Dict[str, object]
    fc7: Dict[str, object]
    emb_size: int
    report: LoadReport
    prefix: str = ""
    epoch: int = 0
    checkpoint_emb_size: Optional[int] = None
    checkpoint_classes: Optional[int] = None
    missing: List[str] = field(default_factory=list)


def meta_path(prefix: str) -> str:
    """``PREFIX-meta.json``: the sidecar next to ``PREFIX-symbol.json``."""
    return prefix + "-meta.json"


def write_meta(prefix: str, **meta) -> str:
    """Write ``PREFIX-meta.json`` atomically (e.g. ``fc7_name``, ``num_classes``, ``emb_size``, ``network``)."""
    path = meta_path(prefix)
    with atomic_write(path, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return path


def read_meta(prefix: str) -> dict:
    """The sidecar written by :func:`write_meta`, or ``{}`` when there is none."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ToolkitError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ToolkitError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    return meta


def _mx_error_line(exc: Exception) -> str:
    """The informative line of an MXNetError (they carry C++ stack traces)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Error in operator" in ln or "Shape inconsistent" in ln or "Incompatible attr" in ln:
            return ln
    return lines[0] if lines else type(exc).__name__


def _is_input(name: str) -> bool:
    return name == "data" or name.endswith("label")


def _normalise_names(arg: dict, aux: dict) -> Tuple[dict, dict, Dict[str, str]]:
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
    """The sub-graph of ``symbol`` ending at ``fc1_output``; ToolkitError listing the outputs when absent."""
    internals = symbol.get_internals()
    if EMBEDDING_NODE not in internals.list_outputs():
        raise ToolkitError(f"{where or 'checkpoint'}: graph has no '{EMBEDDING_NODE}' node (outputs: "
                           f"{', '.join(symbol.list_outputs())}); is it an insightface recognition model?")
    return internals[EMBEDDING_NODE]


def embedding_layer(symbol) -> Tuple[List[str], Optional[str]]:
    """Parameter names of the layer that produces the embedding, and the name of its FullyConnected node.

    Walks back from the output (``fc1`` BatchNorm) through parameter-free ops to the first FullyConnected
    (insightface: ``pre_fc1`` FC -> ``fc1`` BN). Returns ``(names, None)`` when no FC is found nearby.
    """
    graph = json.loads(symbol.tojson())
    nodes = graph["nodes"]
    idx = graph["heads"][0][0]
    names: List[str] = []
    for _ in range(8):
        node = nodes[idx]
        data_inputs = []
        for inp in node["inputs"]:
            src = nodes[inp[0]]
            if src["op"] == "null":
                if not _is_input(src["name"]):
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
    graph = json.loads(symbol.tojson())
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
        raise ToolkitError(f"{where}: shapes do not fit together ({_mx_error_line(exc)})") from None
    if arg_shapes is None:
        raise ToolkitError(f"{where}: cannot infer shapes for input {tuple(data_shape)}")
    args = dict(zip(symbol.list_arguments(), (tuple(s) for s in arg_shapes)))
    aux = dict(zip(symbol.list_auxiliary_states(), (tuple(s) for s in aux_shapes)))
    return args, aux, int(np.prod(out_shapes[0][1:]))


def _find_classifier(ckpt_sym, ckpt_arg: dict, meta: dict, fc7_name: str, ckpt_emb: Optional[int],
                     backbone_names: set) -> Tuple[Optional[str], Optional[str], List[str]]:
    """(weight name, bias name or None, other head params) of the checkpoint's classifier."""
    head: List[str] = []
    if ckpt_sym is not None:
        head = [n for n in ckpt_sym.list_arguments() + ckpt_sym.list_auxiliary_states()
                if n not in backbone_names and not _is_input(n)]

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


def _alias_candidates(name: str) -> List[str]:
    return [pat.sub(rep, name) for pat, rep in _ALIASES if pat.search(name)]


def _positional(targets: List[str], target_shapes: dict, sources: List[str], source_arrays: dict) -> Dict[str, str]:
    """Match leftovers by graph position when both lists have the same length and pairwise equal shapes."""
    if not targets or len(targets) != len(sources):
        return {}
    if any(target_shapes[t] != tuple(source_arrays[s].shape) for t, s in zip(targets, sources)):
        return {}
    return dict(zip(targets, sources))


def _bn_attrs(attrs: dict) -> Tuple[float, bool]:
    """(eps, fix_gamma) of a BatchNorm node, with MXNet's defaults (1e-3, True) where unset."""
    return float(attrs.get("eps", 1e-3)), attrs.get("fix_gamma", "True") in ("True", "true", "1")


def _adopt_bn_attrs(symbol, ckpt_cut, matched: Dict[str, str]) -> Tuple[object, int]:
    """Give each BatchNorm of ``symbol`` the eps/fix_gamma of the checkpoint BN whose gamma it loads.

    Older insightface builders left ``eps`` at MXNet's 1e-3 where today's say 2e-5: same parameters, different
    outputs. The checkpoint's graph is the truth for the weights it holds.
    """
    import mxnet as mx

    def bn_by_gamma(graph):
        nodes = graph["nodes"]
        return {nodes[n["inputs"][1][0]]["name"]: n for n in nodes if n["op"] == "BatchNorm" and len(n["inputs"]) > 1}

    src = bn_by_gamma(json.loads(ckpt_cut.tojson()))
    graph = json.loads(symbol.tojson())
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


def load_pretrained(spec: str, network: Optional[str] = None, emb_size: Optional[int] = None,
                    num_classes: Optional[int] = None, fc7_name: str = "fc7", reset_fc7: bool = False,
                    allow_missing: bool = False, prelu: Optional[str] = None, ctx=None,
                    data_shape: Sequence[int] = (3, 112, 112)) -> Pretrained:
    """Load ``spec`` (``PREFIX,EPOCH`` or ``PREFIX-0000.params``) as the starting point of fine-tuning.

    Parameters
    ----------
    network : None to use the checkpoint's own graph cut at ``fc1_output``, or a ``recognition.backbones`` name
        whose names are reconciled with the checkpoint (exact, known renames, then graph position).
    emb_size : wanted embedding size; a change from the checkpoint re-creates the embedding layer and fc7.
    num_classes : classes of the new data; fc7 is kept only when it equals the checkpoint's (None: keep).
    fc7_name : name of the classifier in the new training graph (kept arrays are renamed to it).
    reset_fc7 : drop the checkpoint's classifier even when the classes match.
    allow_missing : report (instead of refusing) backbone parameters that must be re-initialised.
    prelu : PReLU formulation of the returned graph ('bn', 'fast', 'stock'). None: 'bn' for ``network``, the
        checkpoint's own graph as it is without. 'bn' graphs' constant unit states come filled in ``aux_params``.
    data_shape : input ``(C, H, W)`` used to infer parameter shapes.
    """
    import mxnet as mx

    from recognition.backbones.fast_prelu import drop_unit_aux, fill_unit_aux

    prefix, epoch = parse_prefix_epoch(spec, "--pretrained")
    where = f"--pretrained {prefix},{epoch}"
    sym_path = "%s-symbol.json" % prefix
    need_symbol = network is None or os.path.isfile(sym_path)
    ckpt_sym, raw_arg, raw_aux = load_checkpoint(prefix, epoch, need_symbol=need_symbol)
    ckpt_arg, ckpt_aux, gluon_renamed = _normalise_names(raw_arg, raw_aux)
    ckpt_aux = drop_unit_aux(ckpt_aux)  # a bn graph saved without checkpoint_form: constants, not weights
    meta = read_meta(prefix)
    report = LoadReport(spec=f"{prefix},{epoch}", network=network or "checkpoint graph")
    if gluon_renamed:
        report.notes.append(f"{len(gluon_renamed)} Gluon names mapped to insightface names (running_* -> moving_*, "
                            "alpha -> gamma)")

    ckpt_cut = cut_at_embedding(ckpt_sym, where) if ckpt_sym is not None else None
    backbone_names = set(ckpt_cut.list_arguments()) | set(ckpt_cut.list_auxiliary_states()) \
        if ckpt_cut is not None else set()

    # Embedding size of the checkpoint: the FC producing fc1 in its graph, else the sidecar.
    ckpt_emb = None
    if ckpt_cut is not None:
        emb_names, fc_name = embedding_layer(ckpt_cut)
        fc_w = [n for n in emb_names if n in ckpt_arg and len(ckpt_arg[n].shape) == 2]
        if fc_w:
            ckpt_emb = int(ckpt_arg[fc_w[0]].shape[0])
    if ckpt_emb is None and meta.get("emb_size"):
        ckpt_emb = int(meta["emb_size"])
    emb_change = emb_size is not None and ckpt_emb is not None and int(emb_size) != ckpt_emb

    # The graph to train.
    if network is None:
        symbol = set_embedding_size(ckpt_cut, int(emb_size)) if emb_change else ckpt_cut
        if prelu is not None:
            from recognition.backbones import convert_prelu

            converted = convert_prelu(symbol, prelu, (1,) + tuple(data_shape))
            if converted is not symbol:
                report.notes.append(f"checkpoint graph's PReLU layers trained as prelu={prelu!r} (same parameters; "
                                    "checkpoints save them back as LeakyReLU)")
            symbol = converted
    else:
        from recognition.backbones import get_symbol

        try:
            symbol = get_symbol(network, emb_size=emb_size or ckpt_emb, prelu=prelu or "bn")
        except mx.base.MXNetError as exc:
            raise ToolkitError(f"--network {network}: cannot build ({_mx_error_line(exc)})") from None
    t_arg, t_aux, out_emb = infer_param_shapes(symbol, data_shape, f"--network {network}" if network else where)
    t_arg = {k: v for k, v in t_arg.items() if not _is_input(k)}
    t_aux = drop_unit_aux(t_aux)  # prelu='bn' constants: filled below, never looked for in a checkpoint
    emb_layer = set(embedding_layer(symbol)[0])
    if ckpt_emb is None:  # no graph nor sidecar: read it off the (aliased) embedding FC weight
        for n in emb_layer:
            for cand in [n] + _alias_candidates(n):
                if cand in ckpt_arg and len(ckpt_arg[cand].shape) == 2:
                    ckpt_emb = int(ckpt_arg[cand].shape[0])
        # no --emb-size: follow the checkpoint's width
        if network is not None and emb_size is None and ckpt_emb not in (None, out_emb):
            symbol = get_symbol(network, emb_size=ckpt_emb, prelu=prelu or "bn")
            t_arg, t_aux, out_emb = infer_param_shapes(symbol, data_shape, f"--network {network}")
            t_arg = {k: v for k, v in t_arg.items() if not _is_input(k)}
            t_aux = drop_unit_aux(t_aux)
        emb_change = emb_size is not None and ckpt_emb is not None and int(emb_size) != ckpt_emb

    if ckpt_cut is None:  # no graph: whatever the new backbone can take by name is not the classifier
        backbone_names = {c for n in list(t_arg) + list(t_aux) for c in [n] + _alias_candidates(n)
                          if c in ckpt_arg or c in ckpt_aux}
    cls_w, cls_b, head_others = _find_classifier(ckpt_sym, ckpt_arg, meta, fc7_name, ckpt_emb, backbone_names)
    claimed = {n for n in (cls_w, cls_b) if n}

    # Match backbone + embedding parameters: exact name, known renames, then graph position.
    arg_params, aux_params, missing = {}, {}, []
    matched_all: Dict[str, str] = {}
    problems: List[str] = []
    for targets, sources in ((t_arg, ckpt_arg), (t_aux, ckpt_aux)):
        matched: Dict[str, str] = {}
        for name, shape in targets.items():
            if emb_change and name in emb_layer:
                continue
            for cand in [name] + _alias_candidates(name):
                if cand in sources and cand not in claimed and tuple(sources[cand].shape) == shape:
                    matched[name] = cand
                    claimed.add(cand)
                    break
        if ckpt_cut is not None:
            order = ckpt_cut.list_arguments() if sources is ckpt_arg else ckpt_cut.list_auxiliary_states()
            left_t = [n for n in targets if n not in matched and not (emb_change and n in emb_layer)]
            left_s = [n for n in order if n in sources and n not in claimed]
            for t, s in _positional(left_t, targets, left_s, sources).items():
                matched[t] = s
                claimed.add(s)
        matched_all.update(matched)
        out = arg_params if sources is ckpt_arg else aux_params
        for name, shape in targets.items():
            if name in matched:
                src = matched[name]
                out[name] = sources[src]
                report.loaded.append((name, shape, gluon_renamed.get(src, src)))
                continue
            missing.append(name)
            old = next((c for c in [name] + _alias_candidates(name) if c in sources), None)
            if emb_change and name in emb_layer:
                old_shape = f"shape {fmt_shape(sources[old].shape)}" if old else "absent"
                report.reinitialised.append((name, shape, f"{old_shape} in checkpoint, {fmt_shape(shape)} needed: "
                                             f"--emb-size {emb_size} (embedding layer re-created)"))
                continue
            reason = (f"shape {fmt_shape(sources[old].shape)} in checkpoint, {fmt_shape(shape)} needed"
                      if old else "not in checkpoint")
            problems.append(f"{name} ({reason})")
            report.reinitialised.append((name, shape, reason))

    if emb_change:  # the old embedding layer's arrays were replaced on purpose: say so, not "unused"
        old_layer = set(embedding_layer(ckpt_cut)[0]) if ckpt_cut is not None else \
            {c for n in emb_layer for c in [n] + _alias_candidates(n)}
        for name in sorted(old_layer):
            if name not in claimed and (name in ckpt_arg or name in ckpt_aux):
                report.dropped.append((name, f"embedding layer re-created for --emb-size {emb_size}"))
                claimed.add(name)
    if network is not None and ckpt_cut is not None:
        symbol, adopted = _adopt_bn_attrs(symbol, ckpt_cut, matched_all)
        if adopted:
            report.notes.append(f"{adopted} BatchNorm layer(s) take eps/fix_gamma from the checkpoint graph "
                                f"(the --network {network} builder differs; outputs would change otherwise)")
    elif network is not None:
        report.notes.append("no checkpoint graph: BatchNorm eps/fix_gamma are the builder's, not checked")
    if problems and not allow_missing:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ToolkitError(f"{where}: {len(problems)} backbone parameter(s) would be re-initialised: {shown}; "
                           "check --network/--emb-size or pass --allow-missing to re-initialise them")
    if emb_change:
        report.notes.append(f"embedding size {ckpt_emb} -> {emb_size}: embedding layer and fc7 re-created")

    # Classifier.
    fc7: Dict[str, object] = {}
    ckpt_classes = int(ckpt_arg[cls_w].shape[0]) if cls_w else None
    if cls_w is None:
        report.notes.append("checkpoint has no classifier (slim model): fc7 starts fresh")
    else:
        reason = None
        if reset_fc7:
            reason = "--reset-fc7"
        elif emb_change:
            reason = f"embedding size changes {ckpt_emb} -> {emb_size}"
        elif num_classes is not None and int(num_classes) != ckpt_classes:
            reason = f"checkpoint has {ckpt_classes} classes, data has {num_classes}"
        for src, kind in ((cls_w, "weight"), (cls_b, "bias")):
            if src is None:
                continue
            if reason:
                report.dropped.append((src, reason))
            else:
                fc7[f"{fc7_name}_{kind}"] = ckpt_arg[src]
                report.loaded.append((f"{fc7_name}_{kind}", tuple(ckpt_arg[src].shape), src))
    for name in head_others:
        if name not in claimed and (name in ckpt_arg or name in ckpt_aux):
            report.dropped.append((name, "training-head array (loss/classifier side), not part of the backbone"))
            claimed.add(name)
    for sources in (ckpt_arg, ckpt_aux):
        for name, value in sources.items():
            if name not in claimed:
                report.unused.append((gluon_renamed.get(name, name), tuple(value.shape)))

    aux_params = fill_unit_aux(symbol, aux_params)
    if ctx is not None:
        arg_params = {k: v.as_in_context(ctx) for k, v in arg_params.items()}
        aux_params = {k: v.as_in_context(ctx) for k, v in aux_params.items()}
        fc7 = {k: v.as_in_context(ctx) for k, v in fc7.items()}
    return Pretrained(embedding_symbol=symbol, arg_params=arg_params, aux_params=aux_params, fc7=fc7,
                      emb_size=out_emb, report=report, prefix=prefix, epoch=epoch, checkpoint_emb_size=ckpt_emb,
                      checkpoint_classes=ckpt_classes, missing=missing)


def imprint_fc7(embed_fn: Callable[[np.ndarray], np.ndarray], data_iter, num_classes: int,
                seed: int = 0) -> np.ndarray:
    """Classifier weights from data: per class, the L2-normalised mean of L2-normalised embeddings.

    ``data_iter`` yields DataBatch with ``data[0]`` (B, 3, H, W) and ``label[0]`` (B,) class ids;
    ``embed_fn`` maps (B, 3, H, W) float32 to (B, E). Returns float32 (num_classes, E); classes without images
    get a random unit vector (seeded) and a warning with their count.
    """
    if hasattr(data_iter, "reset"):
        data_iter.reset()
    sums: Optional[np.ndarray] = None
    counts = np.zeros(num_classes, dtype=np.int64)
    for batch in data_iter:
        x = batch.data[0]
        x = x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)
        y = batch.label[0]
        y = y.asnumpy() if hasattr(y, "asnumpy") else np.asarray(y)
        if y.ndim > 1:
            y = y[:, 0]
        n = x.shape[0] - int(getattr(batch, "pad", 0) or 0)
        x, y = x[:n], y[:n].astype(np.int64)
        if n == 0:
            continue
        if y.min() < 0 or y.max() >= num_classes:
            raise ToolkitError(f"imprint fc7: label {int(y.max() if y.max() >= num_classes else y.min())} "
                               f"outside 0..{num_classes - 1}")
        emb = np.asarray(embed_fn(x), dtype=np.float64).reshape(n, -1)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        if sums is None:
            sums = np.zeros((num_classes, emb.shape[1]), dtype=np.float64)
        np.add.at(sums, y, emb)
        counts += np.bincount(y, minlength=num_classes)
    if sums is None:
        raise ToolkitError("imprint fc7: the data iterator yielded no images")
    empty = counts == 0
    if empty.any():
        logger.warning("imprint fc7: %d of %d classes have no images; they get random unit vectors",
                       int(empty.sum()), num_classes)
        sums[empty] = np.random.RandomState(seed).randn(int(empty.sum()), sums.shape[1])
    sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return sums.astype(np.float32)
