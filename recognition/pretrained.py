"""Load a pretrained insightface checkpoint for fine-tuning: reconcile names, adapt the head, report everything.

``load_pretrained`` never re-initialises a backbone parameter silently: a parameter that is missing from the
checkpoint or has another shape stops the run with one line, unless ``allow_missing`` (then it is reported).
The classifier (``fc7``) is found by graph position or by the ``PREFIX-meta.json`` sidecar, never by "fc" in a
name (``fc1`` is the embedding). ``imprint_fc7`` builds a classifier from class-mean embeddings.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from recognition.checkpoint_graph import (
    EMBEDDING_NODE,
    adopt_bn_attrs,
    alias_candidates,
    cut_at_embedding,
    embedding_layer,
    find_classifier,
    infer_param_shapes,
    is_input,
    mx_error_line,
    normalise_names,
    positional,
    set_embedding_size,
)
from recognition.common import ToolkitError, load_checkpoint, parse_prefix_epoch
from recognition.load_report import LoadReport, fmt_shape, meta_path, read_meta, write_meta

logger = logging.getLogger("recognition")

# Re-exported: callers import these from here (deploy/model_slim.py, trainer, callbacks, advise, tests).
__all__ = ["EMBEDDING_NODE", "LoadReport", "Pretrained", "cut_at_embedding", "embedding_layer", "fmt_shape",
           "imprint_fc7", "infer_param_shapes", "load_pretrained", "meta_path", "read_meta", "set_embedding_size",
           "write_meta"]


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
    ckpt_arg, ckpt_aux, gluon_renamed = normalise_names(raw_arg, raw_aux)
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
            raise ToolkitError(f"--network {network}: cannot build ({mx_error_line(exc)})") from None
    t_arg, t_aux, out_emb = infer_param_shapes(symbol, data_shape, f"--network {network}" if network else where)
    t_arg = {k: v for k, v in t_arg.items() if not is_input(k)}
    t_aux = drop_unit_aux(t_aux)  # prelu='bn' constants: filled below, never looked for in a checkpoint
    emb_layer = set(embedding_layer(symbol)[0])
    if ckpt_emb is None:  # no graph nor sidecar: read it off the (aliased) embedding FC weight
        for n in emb_layer:
            for cand in [n] + alias_candidates(n):
                if cand in ckpt_arg and len(ckpt_arg[cand].shape) == 2:
                    ckpt_emb = int(ckpt_arg[cand].shape[0])
        # no --emb-size: follow the checkpoint's width
        if network is not None and emb_size is None and ckpt_emb not in (None, out_emb):
            symbol = get_symbol(network, emb_size=ckpt_emb, prelu=prelu or "bn")
            t_arg, t_aux, out_emb = infer_param_shapes(symbol, data_shape, f"--network {network}")
            t_arg = {k: v for k, v in t_arg.items() if not is_input(k)}
            t_aux = drop_unit_aux(t_aux)
        emb_change = emb_size is not None and ckpt_emb is not None and int(emb_size) != ckpt_emb

    if ckpt_cut is None:  # no graph: whatever the new backbone can take by name is not the classifier
        backbone_names = {c for n in list(t_arg) + list(t_aux) for c in [n] + alias_candidates(n)
                          if c in ckpt_arg or c in ckpt_aux}
    cls_w, cls_b, head_others = find_classifier(ckpt_sym, ckpt_arg, meta, fc7_name, ckpt_emb, backbone_names)
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
            for cand in [name] + alias_candidates(name):
                if cand in sources and cand not in claimed and tuple(sources[cand].shape) == shape:
                    matched[name] = cand
                    claimed.add(cand)
                    break
        if ckpt_cut is not None:
            order = ckpt_cut.list_arguments() if sources is ckpt_arg else ckpt_cut.list_auxiliary_states()
            left_t = [n for n in targets if n not in matched and not (emb_change and n in emb_layer)]
            left_s = [n for n in order if n in sources and n not in claimed]
            for t, s in positional(left_t, targets, left_s, sources).items():
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
            old = next((c for c in [name] + alias_candidates(name) if c in sources), None)
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
            {c for n in emb_layer for c in [n] + alias_candidates(n)}
        for name in sorted(old_layer):
            if name not in claimed and (name in ckpt_arg or name in ckpt_aux):
                report.dropped.append((name, f"embedding layer re-created for --emb-size {emb_size}"))
                claimed.add(name)
    if network is not None and ckpt_cut is not None:
        symbol, adopted = adopt_bn_attrs(symbol, ckpt_cut, matched_all)
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
                seed: int = 0, total: Optional[int] = None) -> np.ndarray:
    """Classifier weights from data: per class, the L2-normalised mean of L2-normalised embeddings.

    ``data_iter`` yields DataBatch with ``data[0]`` (B, 3, H, W) and ``label[0]`` (B,) class ids;
    ``embed_fn`` maps (B, 3, H, W) float32 to (B, E). Returns float32 (num_classes, E); classes without images
    get a random unit vector (seeded) and a warning with their count. ``total`` (the image count, when known)
    gives the progress lines a percentage and an ETA.
    """
    from recognition.progress import Progress

    if hasattr(data_iter, "reset"):
        data_iter.reset()
    sums: Optional[np.ndarray] = None
    counts = np.zeros(num_classes, dtype=np.int64)
    bar = Progress(total, "imprint fc7", unit="img")
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
        bar.update(n)
    bar.close()
    if sums is None:
        raise ToolkitError("imprint fc7: the data iterator yielded no images")
    empty = counts == 0
    if empty.any():
        logger.warning("imprint fc7: %d of %d classes have no images; they get random unit vectors",
                       int(empty.sum()), num_classes)
        sums[empty] = np.random.RandomState(seed).randn(int(empty.sum()), sums.shape[1])
    sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return sums.astype(np.float32)
