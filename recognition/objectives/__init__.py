"""The objectives registry: one name -> one :class:`recognition.objectives.base.Objective`.

Families, one module each: :mod:`~recognition.objectives.margin` (softmax ... SphereFace),
:mod:`~recognition.objectives.triplet` (triplet, atriplet, offline mining), :mod:`~recognition.objectives.center`
(centre-loss add-on), :mod:`~recognition.objectives.distill` (``--teacher`` add-on and ``--loss none``).

Everything else that lists losses is generated from :data:`REGISTRY`: ``heads.LOSSES`` and the per-loss defaults,
the configuration's ``loss`` section (:mod:`recognition.train_config`), ``args.LOSS_TYPES`` (insightface's
``--loss-type`` numbers) and the flags. Adding a loss is one module (or one entry in a family's module) and one
line below; ``docs/ARCHITECTURE.md`` shows a worked example.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict

from recognition.common import ToolkitError
from recognition.objectives import center, distill, margin, triplet
from recognition.objectives.base import LOSS_FIELDS, DataSpec, LossConfig, Objective, ObjectiveFlags, RunObjective

REGISTRY: Dict[str, Objective] = {o.name: o for o in (
    margin.SOFTMAX, margin.NSOFTMAX, margin.ARCFACE, margin.COSFACE, margin.COMBINED, margin.SPHEREFACE,
    triplet.TRIPLET, triplet.ATRIPLET,
    distill.NONE,
)}
ADDONS = (center.CENTER, triplet.MINING, distill.DISTILL)  # flags and checks that apply to any objective

# losses that train on their own (``--loss none`` needs --teacher)
LOSSES = tuple(n for n, o in REGISTRY.items() if not o.needs_teacher)
CLASSIFICATION_LOSSES = tuple(n for n in LOSSES if REGISTRY[n].needs_classifier)
TRIPLET_LOSSES = tuple(n for n in LOSSES if REGISTRY[n].family == "triplet")
# insightface src/train_softmax.py --loss-type numbers -> names
LOSS_TYPES: Dict[int, str] = dict(sorted((o.loss_type, n) for n, o in REGISTRY.items() if o.loss_type is not None))


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; an unknown name is one line listing the valid ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ToolkitError(f"--loss: unknown loss {name!r}; choose one of {', '.join(LOSSES)}") from None


def loss_defaults(name: str) -> dict:
    """``LossConfig`` field defaults of objective ``name``."""
    return dict(get_objective(name).defaults)


def config_sections() -> Dict[str, dict]:
    """``{name: section}``: the ``loss`` sections of the configuration tree."""
    return {n: o.config_section() for n, o in REGISTRY.items()}


def make_loss_config(name: str, **overrides) -> LossConfig:
    """A :class:`LossConfig` with objective ``name``'s defaults, then ``overrides`` (``None`` = keep), validated.

    ``m1``/``m2``/``m3``/``s`` are accepted as aliases of ``margin_a``/``margin_m``/``margin_b``/``margin_s``.
    """
    kw = loss_defaults(name)
    for key, value in overrides.items():
        if value is None:
            continue
        key = _ALIASES.get(key, key)
        if key not in LOSS_FIELDS:
            raise ToolkitError(f"make_loss_config: unknown field {key!r} for loss {name!r}")
        kw[key] = value
    cfg = LossConfig(loss=name, **kw)
    validate_loss_config(cfg)
    return cfg


_NUMERIC_FIELDS = ("margin_s", "margin_m", "margin_a", "margin_b", "fc7_wd_mult", "fc7_lr_mult", "center_loss_weight",
                   "center_alpha", "triplet_alpha", "images_per_identity", "sphere_lambda")
_ALIASES = {"m1": "margin_a", "m2": "margin_m", "m3": "margin_b", "s": "margin_s"}


def validate_loss_config(cfg: LossConfig) -> None:
    """Raise :class:`ToolkitError` (one line, naming the flag) for values no loss can train with."""
    objective = get_objective(cfg.loss)
    for key in _NUMERIC_FIELDS:  # NaN/inf pass every range test below: refuse them first
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ToolkitError(f"--{key.replace('_', '-')} {value!r}: must be a finite number")
    if cfg.margin_a < 1.0:
        raise ToolkitError(f"--margin-a (m1): must be >= 1, got {cfg.margin_a}")
    if not 0.0 <= cfg.margin_m < math.pi / 2:
        raise ToolkitError(f"--margin-m (m2): must be in [0, pi/2), got {cfg.margin_m}")
    if not 0.0 <= cfg.margin_b < 1.0:
        raise ToolkitError(f"--margin-b (m3): must be in [0, 1), got {cfg.margin_b}")
    objective.check(cfg)
    center.CENTER.check(cfg)


def add_objective_args(parser: argparse.ArgumentParser, group, legacy: bool) -> None:
    """Every family's and add-on's flags (``group``: the loss group; ``legacy``: train_softmax.py's parser)."""
    if legacy:
        margin.add_legacy_args(group)
    for addon in ADDONS:
        addon.add_args(parser, group, legacy)


def prepare_objective(cfg, ctx, kvstore: str, per_batch_size: int, data_shape) -> RunObjective:
    """The run's objective from its flat configuration, every objective flag checked (before any compute).

    ``cfg``: the flat configuration (``loss``, ``loss_kwargs``, mining and distillation keys); ``ctx`` the devices
    (the teacher runs on the first); ``data_shape`` (3, H, W)."""
    objective = get_objective(cfg.loss)
    loss_cfg = LossConfig(loss=objective.name) if objective.needs_teacher else \
        make_loss_config(objective.name, **(cfg.get("loss_kwargs") or {}))
    flags = ObjectiveFlags.from_config(cfg)
    triplet.MINING.interval(flags, objective)
    options = objective.run_options(flags, loss_cfg, kvstore)
    teacher = distill.DISTILL.plan(flags, objective, ctx[0], per_batch_size, data_shape)
    return RunObjective(objective, loss_cfg, options, teacher)


__all__ = ["REGISTRY", "ADDONS", "LOSSES", "CLASSIFICATION_LOSSES", "TRIPLET_LOSSES", "LOSS_TYPES", "get_objective",
           "loss_defaults", "config_sections", "make_loss_config", "validate_loss_config", "add_objective_args",
           "prepare_objective", "DataSpec", "LossConfig", "Objective", "RunObjective"]
