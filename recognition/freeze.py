"""Freezing and learning-rate policy as data: stage schedules, per-parameter multipliers, frozen BatchNorm.

Vocabulary (as in MXNet Gluon / mmpretrain): a *fixed* parameter gets no gradient (Module ``fixed_param_names``,
``grad_req='null'``); a *frozen* BatchNorm uses and keeps its moving statistics (``use_global_stats=True``).

    >>> stages = parse_stages(stages="head:500,all:2000")      # [Stage('head', 500), Stage('all', 2000)]
    >>> table = stage_table_for("r50", sym.list_arguments())   # [('stem', '^(conv0|bn0|relu0)_'), ...]
    >>> fixed, frozen_bn = stage_plan(sym, stages[0], table)
    >>> module = mx.mod.Module(stage_symbol(sym, stages[0], frozen_bn), fixed_param_names=fixed, ...)

The 'head' stage trains the inference-mode function that ``--fc7-init imprint`` measured its class means with:
every BatchNorm uses (and keeps) its moving statistics, the embedding layer's ``bn1``/``fc1`` included (their
gamma/beta still train), and Dropout (fresnet's 'E' head: bn1 -> Dropout(p=0.4) -> pre_fc1) is off
(``HEAD_STAGE_DROPOUT``). 'all' and 'STAGE+' stages are unchanged (statistics train unless ``--bn-mode frozen``;
Dropout on). Measured on ``run.sh demo``'s data and checkpoint (tiny, B 100 classes, arcface s=32 m=0.2, lr 0.1,
30 head steps, ``acc_nomargin`` = cosine argmax): Dropout off vs on, loss steps 1-5 5.50 vs 5.75, steps 26-30 8.41
vs 8.74, acc_nomargin steps 1-5 0.53 vs 0.51 (old graph, batch statistics + Dropout: loss 6.03 -> 9.32). In both the
loss still rises and acc_nomargin falls (0.53 -> 0.28) over the head stage at lr 0.1: that comes from the learning
rate on an already-fitted imprinted head, not from the graph.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from recognition.checkpoint_graph import is_input
from recognition.common import ToolkitError, symbol_graph

EMBEDDING_STAGE = "embedding"
# Dropout (insightface's 'E' head: bn1 -> Dropout(0.4) -> pre_fc1) during the 'head' stage; see the module docstring
HEAD_STAGE_DROPOUT = False
# Checkpoint graphs without a --network: the stage tables of insightface's fresnet and MobileFaceNet naming (the
# backbones' own tables, recognition.backbones.get_stages), recognised by their first two stages' names.
_NAMED_GRAPHS = ("r50", "y1")
_FALLBACK_TABLE = [("backbone", r"^(?!(pre_fc1|fc1)_)"), (EMBEDDING_STAGE, r"^(pre_fc1|fc1)_")]
_NO_DECAY = re.compile(r"_(gamma|beta|bias)$")  # BatchNorm gamma/beta, PReLU gamma, every bias


def fc7_pattern(fc7_name: str = "fc7") -> "re.Pattern":
    """Names of the classifier parameters (also per-device slices ``fc7_0_weight`` of model parallelism)."""
    return re.compile(rf"^{re.escape(fc7_name)}(_\d+)?_(weight|bias)$")


def param_multipliers(arg_names: Sequence[str], fc7_name: str = "fc7", fc7_lr_mult: float = 1.0,
                      fc7_wd_mult: float = 1.0, backbone_lr_mult: float = 1.0, bn_wd: bool = False,
                      attr_dict: Optional[dict] = None) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Per-parameter ``(lr_mult, wd_mult)`` dicts for ``optimizer.set_lr_mult`` / ``set_wd_mult``.

    fc7 gets ``fc7_lr_mult``/``fc7_wd_mult``; everything else ``backbone_lr_mult`` and weight decay 1.
    BatchNorm gamma/beta, PReLU gamma and biases get no weight decay unless ``bn_wd``. ``attr_dict``
    (``symbol.attr_dict()``) multiplies in the graph's own ``__lr_mult__``/``__wd_mult__`` (insightface's y1 sets
    ``wd_mult=10`` on its embedding FC): MXNet's optimizer would otherwise let these dicts override them.
    Inputs (``data``, ``*label``) are skipped.
    """
    is_fc7 = fc7_pattern(fc7_name)
    lr_mult: Dict[str, float] = {}
    wd_mult: Dict[str, float] = {}
    for name in arg_names:
        if is_input(name):
            continue
        head = bool(is_fc7.match(name))
        lr = fc7_lr_mult if head else backbone_lr_mult
        wd = fc7_wd_mult if head else 1.0
        if not bn_wd and _NO_DECAY.search(name):
            wd = 0.0
        attrs = (attr_dict or {}).get(name, {})
        lr_mult[name] = float(lr) * float(attrs.get("__lr_mult__", 1.0))
        wd_mult[name] = float(wd) * float(attrs.get("__wd_mult__", 1.0))
    return lr_mult, wd_mult


class Stage(NamedTuple):
    """One phase of a fine-tuning schedule.

    ``name``: ``'head'`` (train the embedding layer and fc7 only), ``'all'`` (train everything not held by
    ``--frozen-stages``) or ``'STAGE+'`` (train from backbone stage STAGE on, e.g. ``'stage3+'``);
    ``steps``: its length in batches, None = until the end of training;
    ``lr_mult``: factor on the scheduled learning rate during the stage (``--stages "head:30@0.1,all"``; 1 = as
    scheduled). Measured on ``run.sh demo`` (see the module docstring): the 'head' stage of an imprinted classifier
    wants a small factor, as the schedule's lr pulls the already-fitted head down.
    """

    name: str
    steps: Optional[int]
    lr_mult: float = 1.0


_STAGE_NAME = re.compile(r"^(head|all|[A-Za-z_]\w*\+)$")


def _lr_factor(text: str, where: str) -> float:
    """A stage's lr factor (``@F``): a finite number >= 0."""
    try:
        f = float(text)
    except (TypeError, ValueError):
        f = float("nan")
    if not (f >= 0.0 and f != float("inf")):
        raise ToolkitError(f"{where}: lr factor {str(text).strip()!r} must be a number >= 0 (e.g. head:500@0.1)")
    return f


def steps_or_passes(text: str, where: str, epoch_steps: Optional[Callable[[], int]], example: str) -> int:
    """A length in batches: ``N`` as is, ``Xep`` as X passes over the data (``epoch_steps()`` batches each; at
    least 1 batch). ``where`` starts each error line (``--stages '...': 'xep' of 'head'``)."""
    text = str(text).strip()
    if text.lower().endswith("ep"):
        try:
            passes = float(text[:-2])
        except ValueError:
            passes = float("nan")
        if not (passes > 0 and passes != float("inf")):
            raise ToolkitError(f"{where}: passes over the data must be a number > 0 (e.g. {example})")
        if epoch_steps is None:
            raise ToolkitError(f"{where} counts passes over the data, which is not known here; give a step count")
        return max(1, int(round(passes * epoch_steps())))
    try:
        return int(text)
    except ValueError:
        raise ToolkitError(f"{where}: is not an integer step count (or Xep: X passes over the data, e.g. "
                           f"{example})") from None


def parse_stages(freeze_steps: int = 0, stages: Optional[str] = None, head_lr_mult: float = 1.0,
                 epoch_steps: Optional[Callable[[], int]] = None) -> List[Stage]:
    """``--stages "head:500,all:2000"`` or ``--freeze-steps N`` (-> ``[head:N, all:None]``) to a list of Stage.

    The last stage may omit its length (``head:500,all``): it runs to the end. Without either flag: ``[all:None]``.
    ``NAME:N@F`` runs the stage at F x the scheduled lr (``head:500@0.1,all``); ``head_lr_mult``
    (``--head-lr-mult``) is F of the head stage of ``--freeze-steps``. A length may be given in passes over the
    data, ``NAME:Xep`` (``head:1ep@0.1,all:3ep``; X may be fractional): ``epoch_steps()`` gives the batches of one
    pass and the stage gets ``max(1, round(X x epoch_steps()))`` batches. Real faces are why (README "On real
    faces"): the gain of a fine-tune depends on how often it sees the data, not on a step count.
    """
    if stages and freeze_steps:
        raise ToolkitError("--stages and --freeze-steps are alternatives: give one of them")
    if freeze_steps is None or freeze_steps < 0:
        raise ToolkitError(f"--freeze-steps {freeze_steps}: must be 0 or a positive number of steps")
    head_lr_mult = 1.0 if head_lr_mult is None else head_lr_mult
    if head_lr_mult != 1.0 and stages:
        raise ToolkitError("--head-lr-mult goes with --freeze-steps; with --stages write the factor as head:N@F")
    head_lr_mult = _lr_factor(head_lr_mult, "--head-lr-mult")
    if not stages:
        return ([Stage("head", int(freeze_steps), head_lr_mult)] if freeze_steps else []) + [Stage("all", None)]
    parts = [p.strip() for p in stages.split(",")]
    out: List[Stage] = []
    for i, part in enumerate(parts):
        spec, at, factor = part.partition("@")
        mult = _lr_factor(factor, f"--stages {stages!r}: stage {part!r}") if at else 1.0
        name, sep, steps = spec.partition(":")
        name = name.strip()
        if not _STAGE_NAME.match(name):
            raise ToolkitError(f"--stages {stages!r}: bad stage {part!r}; expected head:N, all:N or STAGE+:N "
                               "(e.g. 'head:500,all:2000')")
        if not sep or steps.strip() in ("", "end"):
            if i != len(parts) - 1:
                raise ToolkitError(f"--stages {stages!r}: stage {name!r} needs a step count (only the last stage "
                                   "may run to the end)")
            out.append(Stage(name, None, mult))
            continue
        n = steps_or_passes(steps, f"--stages {stages!r}: {steps.strip()!r} of {name!r}", epoch_steps,
                            "head:1ep,all:3ep")
        if n <= 0:
            raise ToolkitError(f"--stages {stages!r}: step count of {name!r} must be positive, got {n}")
        out.append(Stage(name, n, mult))
    return out


def stage_at(stages: Sequence[Stage], step: int) -> Tuple[int, Stage]:
    """``(index, Stage)`` active at global batch ``step`` (0-based); the last stage holds past its length."""
    start = 0
    for i, stage in enumerate(stages):
        if stage.steps is None or step < start + stage.steps or i == len(stages) - 1:
            return i, stage
        start += stage.steps
    raise ToolkitError("empty stage schedule")


def stage_table_for(network: Optional[str], arg_names: Sequence[str]) -> List[Tuple[str, str]]:
    """Ordered ``[(stage_name, regex)]`` from input to embedding for ``--frozen-stages`` and the 'head' stage.

    With a network name: ``recognition.backbones.get_stages``. For a checkpoint graph: inferred from insightface's
    naming (fresnet ``conv0``/``stageN_unitM``/``bn1``, MobileFaceNet ``conv_1``..``conv_6dw7_7``); unknown naming
    -> ``backbone`` and ``embedding`` (``pre_fc1``/``fc1``) only.
    """
    from recognition.backbones import get_stages

    if network:
        return list(get_stages(network))
    names = [n for n in arg_names if not is_input(n)]
    for table in (get_stages(net) for net in _NAMED_GRAPHS):
        anchors = re.compile(table[0][1]), re.compile(table[1][1])
        if any(anchors[0].match(n) for n in names) and any(anchors[1].match(n) for n in names):
            return list(table)
    return list(_FALLBACK_TABLE)


def _assign(names: Sequence[str], table: Sequence[Tuple[str, str]]) -> Dict[str, int]:
    """Stage index of each name (first matching regex); names matching none are left out."""
    compiled = [re.compile(rx) for _, rx in table]
    out = {}
    for n in names:
        for i, rx in enumerate(compiled):
            if rx.search(n):
                out[n] = i
                break
    return out


def _batchnorm_nodes(symbol) -> List[Tuple[str, List[str]]]:
    """``[(bn_node_name, [its parameter/aux input names])]`` in graph order."""
    graph = symbol_graph(symbol)
    nodes = graph["nodes"]
    return [(n["name"], [nodes[i[0]]["name"] for i in n["inputs"][1:]]) for n in nodes if n["op"] == "BatchNorm"]


def stage_plan(symbol, stage: Stage, stage_table: Sequence[Tuple[str, str]], frozen_stages: int = 0,
               fc7_name: str = "fc7", bn_mode: str = "train") -> Tuple[List[str], List[str]]:
    """``(fixed_param_names, frozen_bn_names)`` of ``symbol`` (training or embedding graph) during ``stage``.

    'head': every backbone parameter is fixed except the embedding stage (and fc7 / other loss-head parameters);
    every BatchNorm is frozen, the embedding stage's included (its gamma/beta still train). 'STAGE+': stages before
    STAGE fixed. ``frozen_stages`` K fixes the first K stages
    in every phase. ``bn_mode='frozen'`` freezes every BatchNorm's statistics (mmpretrain's ``norm_eval``).
    Backbone = the ancestry of ``fc1_output``; parameters outside it (fc7, margins, centres) are never fixed.
    """
    if bn_mode not in ("train", "frozen"):
        raise ToolkitError(f"--bn-mode {bn_mode!r}: expected 'train' or 'frozen'")
    names = [n for n in symbol.list_arguments() if not is_input(n)]
    internals = symbol.get_internals()
    if "fc1_output" in internals.list_outputs():
        backbone = set(internals["fc1_output"].list_arguments())
    else:
        is_fc7 = fc7_pattern(fc7_name)
        backbone = {n for n in names if not is_fc7.match(n)}
    stage_names = [s for s, _ in stage_table]
    emb_idx = stage_names.index(EMBEDDING_STAGE) if EMBEDDING_STAGE in stage_names else len(stage_names) - 1
    if frozen_stages < 0 or frozen_stages > emb_idx:
        raise ToolkitError(f"--frozen-stages {frozen_stages}: must be 0..{emb_idx} (stages before the embedding: "
                           f"{', '.join(stage_names[:emb_idx]) or 'none'})")
    where = _assign([n for n in names if n in backbone], stage_table)

    if stage.name == "head":
        first_trained = emb_idx
    elif stage.name == "all":
        first_trained = 0
    elif stage.name.endswith("+") and stage.name[:-1] in stage_names:
        first_trained = stage_names.index(stage.name[:-1])
    else:
        raise ToolkitError(f"--stages: unknown stage {stage.name!r}; expected head, all or one of "
                           f"{', '.join(s + '+' for s in stage_names)}")
    first_trained = max(first_trained, frozen_stages)
    fixed = []
    for n in names:
        if n not in backbone:
            continue
        idx = where.get(n)
        # a backbone parameter no stage regex claims is fixed only in the 'head' phase
        if (idx is not None and idx < first_trained) or (idx is None and stage.name == "head"):
            fixed.append(n)
    fixed_set = set(fixed)
    # 'head': every BatchNorm keeps its statistics, the embedding layer's too (its gamma/beta still train)
    frozen_bn = [bn for bn, inputs in _batchnorm_nodes(symbol)
                 if bn_mode == "frozen" or stage.name == "head" or (inputs and inputs[0] in fixed_set)]
    return fixed, frozen_bn


def without_dropout(symbol) -> object:
    """A copy of ``symbol`` whose Dropout nodes are identities (``_copy``, same node names); no Dropout -> as is."""
    import mxnet as mx

    graph = symbol_graph(symbol)
    found = False
    for node in graph["nodes"]:
        if node["op"] == "Dropout":
            node["op"], found = "_copy", True
            node.pop("attrs", None)
            node.pop("param", None)
    return mx.sym.load_json(json.dumps(graph)) if found else symbol


def stage_symbol(symbol, stage: Stage, frozen_bn: Sequence[str]) -> object:
    """The graph trained during ``stage``: ``frozen_bn`` frozen and, in the 'head' stage unless
    ``HEAD_STAGE_DROPOUT``, no Dropout (see the module docstring)."""
    out = freeze_batchnorm(symbol, frozen_bn)
    if stage.name == "head" and not HEAD_STAGE_DROPOUT:
        out = without_dropout(out)
    return out


def freeze_batchnorm(symbol, bn_names: Sequence[str]) -> object:
    """A copy of ``symbol`` whose BatchNorm nodes ``bn_names`` use (and keep) their moving statistics.

    Only ``use_global_stats`` changes; parameter names and every other node are untouched.
    """
    import mxnet as mx

    wanted = set(bn_names)
    if not wanted:
        return symbol
    graph = symbol_graph(symbol)
    seen = set()
    for node in graph["nodes"]:
        if node["op"] == "BatchNorm" and node["name"] in wanted:
            node.setdefault("attrs", {})["use_global_stats"] = "True"
            seen.add(node["name"])
    unknown = sorted(wanted - seen)
    if unknown:
        raise ToolkitError(f"freeze BatchNorm: no BatchNorm named {', '.join(unknown[:5])} in the graph")
    return mx.sym.load_json(json.dumps(graph))
