"""Embedding distillation as an objective: the ``--teacher`` add-on (a distillation term next to any loss) and the
``none`` objective (pure distillation, no classifier). The graph term, the teacher and its cache live in
:mod:`recognition.distill`; this module owns the flags and their checks.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Mapping, Optional

from recognition.common import ToolkitError
from recognition.objectives.base import AddOn, LossConfig, Objective, ObjectiveFlags

logger = logging.getLogger("recognition")

DISTILL_LOSSES = ("mse", "cosine", "both")


class PureDistillation(Objective):
    """``--loss none``: no classifier and no metric loss; only with ``--teacher`` (the distillation term)."""

    name = "none"
    family = "distill"
    needs_classifier = False
    needs_teacher = True

    def build_symbol(self, embedding, num_classes: int, loss_cfg: LossConfig, fc7_name: str = "fc7",
                     emb_size: Optional[int] = None, options: Optional[Mapping[str, Any]] = None):
        raise ToolkitError("--loss none: nothing to train without --teacher PREFIX,EPOCH (pure distillation)")


NONE = PureDistillation()

OBJECTIVES = (NONE,)


class Distillation(AddOn):
    """``--teacher --distill-loss --distill-weight --teacher-cache``."""

    name = "distill"

    def add_args(self, parser: argparse.ArgumentParser, group, legacy: bool) -> None:
        g = parser.add_argument_group("distillation")
        g.add_argument("--teacher", default=None, help="PREFIX,EPOCH of a teacher whose embedding the student matches")
        g.add_argument("--distill-loss", choices=DISTILL_LOSSES, default=None,
                       help="mse, cosine or both (default mse)")
        g.add_argument("--distill-weight", type=float, default=None, help="weight of the distillation term (default 1)")
        g.add_argument("--teacher-cache", default=None,
                       help="FILE.npy of teacher embeddings per record (made on first use; disables mirroring)")

    def plan(self, flags: ObjectiveFlags, objective: Objective, ctx, per_batch_size: int, data_shape):
        """Check the distillation flags (before any compute) and load the teacher; None without ``--teacher``.

        Returns a :class:`recognition.distill.TeacherPlan`. With ``--teacher-cache`` random mirroring is switched
        off for the run (:meth:`recognition.objectives.base.RunObjective.make_data`; logged here)."""
        if not flags.teacher:
            given = [f for f in ("distill_loss", "distill_weight", "teacher_cache") if getattr(flags, f) is not None]
            if given:
                raise ToolkitError(f"--{given[0].replace('_', '-')}: needs --teacher PREFIX,EPOCH")
            if objective.needs_teacher:
                raise ToolkitError(f"--loss {objective.name}: nothing to train without --teacher PREFIX,EPOCH "
                                   "(pure distillation)")
            return None
        weight = 1.0 if flags.distill_weight is None else flags.distill_weight
        if objective.needs_teacher and weight == 0:
            raise ToolkitError(f"--distill-weight 0 with --loss {objective.name}: nothing to train")
        cache = flags.teacher_cache
        if cache:
            if not str(cache).endswith(".npy"):
                raise ToolkitError(f"--teacher-cache {cache}: expected a .npy file name")
            if flags.data_cutoff or flags.data_color or flags.data_augment:
                raise ToolkitError("--teacher-cache holds embeddings of un-augmented images: drop --teacher-cache to "
                                   "use cut-off/colour jitter/--augment (the teacher then runs on every batch)")
            if flags.data_rand_mirror:
                logger.warning("--teacher-cache holds un-mirrored images: random mirroring is switched off for this "
                               "run")
        from recognition.distill import TeacherPlan

        return TeacherPlan(flags.teacher, flags.distill_loss or "mse", weight, cache, ctx=ctx,
                           batch_size=min(64, int(per_batch_size)), data_shape=tuple(data_shape))


DISTILL = Distillation()

__all__ = ["DISTILL_LOSSES", "PureDistillation", "NONE", "OBJECTIVES", "Distillation", "DISTILL"]
