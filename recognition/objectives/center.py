"""Centre-loss add-on (Wen et al., ECCV 2016) for any margin-softmax objective: ``--center-loss-weight W``.

The operator and its centre update live in :mod:`recognition.losses_center`; this module owns the flag, its checks
and the extra ``center_loss_output`` (1,) a classification symbol gains when ``W > 0``.
"""
from __future__ import annotations

import argparse
from typing import List, Tuple

from recognition.common import ToolkitError

# importing losses_center registers its CustomOp, so a saved training symbol with center loss can be bound
from recognition.losses_center import center_loss_symbol
from recognition.objectives.base import AddOn, LossConfig


class CenterLoss(AddOn):
    """``--center-loss-weight`` (LossConfig ``center_loss_weight``, ``center_alpha``)."""

    name = "center"

    def add_args(self, parser: argparse.ArgumentParser, group, legacy: bool) -> None:
        group.add_argument("--center-loss-weight", type=float, default=None, help="add centre loss with this weight")

    @staticmethod
    def check(cfg: LossConfig) -> None:
        if not cfg.center_loss_weight >= 0:
            raise ToolkitError(f"--center-loss-weight: must be >= 0, got {cfg.center_loss_weight}")
        if not 0.0 < cfg.center_alpha <= 1.0:
            raise ToolkitError(f"--center-alpha: must be in (0, 1], got {cfg.center_alpha}")


CENTER = CenterLoss()


def outputs(embedding, label, num_classes: int, emb_size: int, loss_cfg: LossConfig) -> Tuple[list, List[str]]:
    """``([center_loss_output], [centres aux name])`` when ``loss_cfg.center_loss_weight > 0``, else ``([], [])``.

    Inputs: ``embedding`` (B, E), ``label`` (B,) Symbols."""
    if not loss_cfg.center_loss_weight > 0:
        return [], []
    sym, aux = center_loss_symbol(embedding, label, int(num_classes), int(emb_size), loss_cfg)
    return [sym], aux


__all__ = ["CenterLoss", "CENTER", "outputs"]
