"""What every training objective shares: the loss hyper-parameters (:class:`LossConfig`), the interface of a
registered objective (:class:`Objective`), the data a run asks for (:class:`DataSpec`) and the per-run object the
trainer talks to (:class:`RunObjective`).

An objective answers, for its loss name: its defaults (``LossConfig`` fields, and training defaults such as
``per_batch_size`` for the configuration's loss section), insightface's ``--loss-type`` number, whether it trains a
classifier, its flags, its checks, how it builds the training symbol and which data iterator it needs. The
registry in :mod:`recognition.objectives` maps names to objectives; nothing else keeps a list of losses.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import mxnet as mx

from recognition.common import ToolkitError, symbol_graph

# Clip for cosines entering arccos / sqrt(1 - cos^2): keeps value and gradient finite at theta = 0 or pi.
COS_EPS = 1e-6


@dataclass
class LossConfig:
    """Loss hyper-parameters (defaults per loss come from the objective, :func:`recognition.heads.make_loss_config`).

    ``margin_a`` (m1, multiplicative angle), ``margin_m`` (m2, additive angle, ArcFace) and ``margin_b`` (m3,
    additive cosine, CosFace) form the combined margin. ``sphere_lambda`` blends SphereFace's target logit with
    the plain cosine, ``(lambda * cos + psi) / (1 + lambda)`` (Liu et al. 2017); the ``beta*``/``gamma``/
    ``power`` fields describe insightface's annealing schedule ``lambda = max(beta_min, beta * (1 + gamma *
    it) ** -power)`` (see :func:`recognition.objectives.margin.sphere_lambda_at`); the graph itself uses the
    fixed ``sphere_lambda``.
    """

    loss: str = "arcface"
    margin_s: float = 64.0
    margin_m: float = 0.5
    margin_a: float = 1.0
    margin_b: float = 0.0
    easy_margin: bool = False
    fc7_wd_mult: float = 1.0
    fc7_lr_mult: float = 1.0
    fc7_no_bias: bool = True
    center_loss_weight: float = 0.0
    center_alpha: float = 0.5
    triplet_alpha: float = 0.3
    images_per_identity: int = 5
    triplet_mining: str = "semihard"
    sphere_lambda: float = 0.0
    beta: float = 1000.0
    beta_min: float = 5.0
    beta_freeze: int = 0
    gamma: float = 0.12
    power: float = 1.0

    # insightface's spellings of the three margins
    @property
    def m1(self) -> float:
        return self.margin_a

    @property
    def m2(self) -> float:
        return self.margin_m

    @property
    def m3(self) -> float:
        return self.margin_b

    def to_dict(self) -> dict:
        return asdict(self)


LOSS_FIELDS = tuple(f for f in LossConfig.__dataclass_fields__ if f != "loss")


@dataclass(frozen=True)
class DataSpec:
    """The training data a run reads, independent of the objective: ``rec`` (``train.rec``), the global
    ``batch_size`` (per-batch-size x devices), ``data_shape`` (3, H, W), augmentation, decoding threads, ``seed``,
    this process's slice (``part_index`` of ``num_parts`` workers) and ``num_devices``."""

    rec: str
    batch_size: int
    data_shape: Tuple[int, int, int]
    rand_mirror: bool
    cutoff: int = 0
    augment: Optional[str] = None
    color_jitter: float = 0.0
    images_filter: int = 0
    num_workers: int = 2
    seed: int = 0
    num_parts: int = 1
    part_index: int = 0
    num_devices: int = 1

    def iter_kwargs(self) -> dict:
        """Keyword arguments of :class:`recognition.image_iter.FaceImageIter` after ``(rec, batch_size)``."""
        return dict(data_shape=self.data_shape, shuffle=True, rand_mirror=self.rand_mirror, cutoff=self.cutoff,
                    augment=self.augment, color_jitter=self.color_jitter, images_filter=self.images_filter,
                    num_workers=self.num_workers,
                    seed=self.seed, num_parts=self.num_parts, part_index=self.part_index)


@dataclass(frozen=True)
class ObjectiveFlags:
    """The run flags objectives and add-ons read besides the loss hyper-parameters, typed once from the flat
    configuration (:meth:`from_config`): offline mining, distillation, and the augmentation a teacher cache
    cannot follow."""

    mining_interval: int = 0
    bag_identities: int = 20
    teacher: Optional[str] = None
    distill_loss: Optional[str] = None
    distill_weight: Optional[float] = None
    teacher_cache: Optional[str] = None
    data_cutoff: int = 0
    data_augment: Optional[str] = None
    data_color: float = 0.0
    data_rand_mirror: bool = False

    @classmethod
    def from_config(cls, cfg) -> "ObjectiveFlags":
        weight = cfg.get("distill_weight")
        return cls(mining_interval=int(cfg.get("mining_interval") or 0),
                   bag_identities=int(cfg.get("bag_identities") or 20), teacher=cfg.get("teacher") or None,
                   distill_loss=cfg.get("distill_loss"), distill_weight=None if weight is None else float(weight),
                   teacher_cache=cfg.get("teacher_cache") or None, data_cutoff=int(cfg.get("data_cutoff") or 0),
                   data_augment=cfg.get("data_augment") or None, data_color=float(cfg.get("data_color") or 0),
                   data_rand_mirror=bool(cfg.get("data_rand_mirror")))


_SHAPE_KEEPING_OPS = {"BatchNorm", "Dropout", "Activation", "LeakyReLU", "identity", "_copy", "BlockGrad",
                      "_mul_scalar", "_div_scalar", "_plus_scalar", "_minus_scalar", "L2Normalization"}


def infer_emb_size(embedding) -> int:
    """Embedding width E of ``embedding`` (B, E), read from the graph: walk back through shape-keeping ops
    (BatchNorm, Dropout, ...) to the FullyConnected that made it. Raises ToolkitError when it cannot."""
    graph = symbol_graph(embedding)
    nodes, idx = graph["nodes"], graph["heads"][0][0]
    while True:
        node = nodes[idx]
        op = node["op"]
        if op == "FullyConnected":
            return int(node.get("attrs", node.get("param", {}))["num_hidden"])
        if op not in _SHAPE_KEEPING_OPS or not node["inputs"]:
            raise ToolkitError(f"heads: cannot read the embedding size from node {node['name']!r} (op {op}); "
                               f"pass emb_size= to build_train_symbol")
        idx = node["inputs"][0][0]


def emb_output_name(embedding) -> str:
    """Name of the ``BlockGrad`` copy of the embedding every training symbol outputs: ``fc1_output`` -> ``fc1_emb``
    (its output is ``fc1_emb_output``; the trainer's accuracy without margin and the mining embedder read it)."""
    name = embedding.name or "fc1"
    return (name[: -len("_output")] if name.endswith("_output") else name) + "_emb"


def embedding_output(embedding) -> mx.sym.Symbol:
    """``BlockGrad(embedding)`` named by :func:`emb_output_name` (B, E)."""
    return mx.sym.BlockGrad(embedding, name=emb_output_name(embedding))


def head_info(out: mx.sym.Symbol, metric: str, fc7_params=(), aux_params=()) -> dict:
    """The ``info`` dict of a training symbol: ``fc7_params``, ``metric`` ('acc' or 'loss'), ``outputs``,
    ``aux_params``."""
    return dict(fc7_params=list(fc7_params), metric=metric, outputs=out.list_outputs(), aux_params=list(aux_params))


class Objective:
    """A registered training objective (one loss name). Subclasses set the class attributes and override what
    differs; every method has the behaviour of a plain classification objective by default."""

    name: str = ""
    family: str = ""
    loss_type: Optional[int] = None  # insightface src/train_softmax.py --loss-type, None when it has none
    needs_classifier: bool = True  # trains fc7 (a checkpoint's fc7 is kept); False: it is dropped and reported
    needs_teacher: bool = False  # only meaningful with --teacher (pure distillation)
    legacy_margin_m: str = "margin_m"  # the LossConfig field insightface's --margin-m sets for this loss
    plain_logits: bool = False  # the classifier's logits carry no margin (its accuracy is the margin-free one)
    defaults: Mapping[str, Any] = {}  # LossConfig fields
    train_defaults: Mapping[str, Any] = {}  # other configuration keys (the config file's loss section)

    def config_section(self) -> dict:
        """The ``loss.NAME`` section of :mod:`recognition.train_config`: every default this objective sets."""
        return dict(self.defaults, **self.train_defaults)

    def check(self, cfg: LossConfig) -> None:
        """Raise a one-line :class:`ToolkitError` for hyper-parameters this objective cannot train with."""

    def run_options(self, flags: ObjectiveFlags, loss_cfg: LossConfig, kvstore: str) -> Dict[str, Any]:
        """Check the run's flags that concern this objective (before any compute); return its per-run options."""
        return {}

    def build_symbol(self, embedding, num_classes: int, loss_cfg: LossConfig, fc7_name: str = "fc7",
                     emb_size: Optional[int] = None, options: Optional[Mapping[str, Any]] = None):
        """``(Symbol, info)``: see :func:`recognition.heads.build_train_symbol`."""
        raise NotImplementedError

    def make_data(self, spec: DataSpec, loss_cfg: LossConfig, options: Mapping[str, Any]):
        """The training iterator (``mx.io.DataIter`` with ``get_state``/``set_state``)."""
        from recognition.image_iter import FaceImageIter

        return FaceImageIter(spec.rec, spec.batch_size, images_per_identity=self.images_per_identity(loss_cfg),
                             **spec.iter_kwargs())

    def check_batch(self, per_batch_size: int, loss_cfg: LossConfig, options: Mapping[str, Any]) -> None:
        """Raise when ``--per-batch-size`` cannot hold this objective's batch layout."""

    def images_per_identity(self, loss_cfg: LossConfig) -> int:
        """K > 0: batches of B/K identities x K images; 0: shuffled images."""
        return 0

    def start(self, data, embedder: Callable, metrics, options: Mapping[str, Any]) -> None:
        """Called once before the first step with the training iterator (offline mining attaches here):
        ``embedder()`` returns an embedding function of the current parameters, ``metrics`` is the metrics log."""


class AddOn:
    """Something a run adds to any objective (centre loss, distillation): its flags and checks."""

    name: str = ""

    def add_args(self, parser: argparse.ArgumentParser, group, legacy: bool) -> None:
        """Add this add-on's flags to ``parser`` (``group``: the loss group; ``legacy``: train_softmax.py's)."""


@dataclass(frozen=True)
class RunObjective:
    """The objective of one run, settled by :func:`recognition.objectives.prepare_objective`: the registered
    ``objective``, its ``loss_cfg``, per-run ``options`` (offline mining ...) and the distillation ``teacher``
    (a :class:`recognition.distill.TeacherPlan` or None). The trainer calls one method per concern."""

    objective: Objective
    loss_cfg: LossConfig
    options: Mapping[str, Any] = field(default_factory=dict)
    teacher: Optional[Any] = None

    @property
    def name(self) -> str:
        return self.objective.name

    @property
    def needs_classifier(self) -> bool:
        return self.objective.needs_classifier

    @property
    def plain_logits(self) -> bool:
        return self.objective.plain_logits

    def build_symbol(self, embedding, num_classes: int, fc7_name: str = "fc7"):
        """The training symbol and its info (with the distillation term when a teacher is set)."""
        if self.teacher is not None:
            from recognition.distill import build_distill_symbol

            return build_distill_symbol(embedding, num_classes, self.loss_cfg, fc7_name, self.teacher)
        return self.objective.build_symbol(embedding, num_classes, self.loss_cfg, fc7_name, options=self.options)

    def make_data(self, spec: DataSpec):
        """The training iterator this objective needs (teacher embeddings as a second label with a teacher)."""
        if self.teacher is not None:
            if self.teacher.cache:  # the cache holds un-mirrored images only
                spec = replace(spec, rand_mirror=False)
            return self.teacher.make_iter(spec.rec, spec.batch_size,
                                          images_per_identity=self.objective.images_per_identity(self.loss_cfg),
                                          **spec.iter_kwargs())
        return self.objective.make_data(spec, self.loss_cfg, self.options)

    def adapt_pretrained(self, pre) -> None:
        """A loss without a classifier: move a kept ``fc7`` of ``pre`` (``Pretrained``) to the dropped list."""
        if self.needs_classifier:
            return
        for name in list(pre.fc7):
            src = next((s for n, _, s in pre.report.loaded if n == name), name)
            pre.report.loaded = [item for item in pre.report.loaded if item[0] != name]
            pre.report.dropped.append((src, f"--loss {self.name} trains no classifier"))
        pre.fc7 = {}

    def check_batch(self, per_batch_size: int) -> None:
        """Raise when the per-device batch does not fit what this objective's batches are made of."""
        self.objective.check_batch(per_batch_size, self.loss_cfg, self.options)

    def start(self, data, embedder: Callable, metrics) -> None:
        """Before the first step: see :meth:`Objective.start`."""
        self.objective.start(data, embedder, metrics, self.options)


__all__ = ["COS_EPS", "LossConfig", "LOSS_FIELDS", "DataSpec", "ObjectiveFlags", "infer_emb_size", "emb_output_name",
           "embedding_output", "head_info", "Objective", "AddOn", "RunObjective"]
