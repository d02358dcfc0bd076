"""Margin heads and losses on top of a backbone embedding (MXNet symbolic): the public entry points.

The backbone ends at ``fc1_output`` (B, E). :func:`build_train_symbol` adds the classifier ``fc7`` and its margin,
or a metric-learning loss, and returns the training symbol; what is deployed is the backbone alone. Each loss is
an objective in the registry :mod:`recognition.objectives` (the margin family's maths, ``margin_target_logit``,
lives in :mod:`recognition.objectives.margin`); this module keeps the names callers import.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mxnet as mx

from recognition.objectives import (
    CLASSIFICATION_LOSSES,
    LOSSES,
    TRIPLET_LOSSES,
    get_objective,
    make_loss_config,
    validate_loss_config,
)
from recognition.objectives import LOSS_TYPES as LOSS_TYPE_NAMES
from recognition.objectives.base import COS_EPS, LossConfig, emb_output_name, infer_emb_size
from recognition.objectives.margin import margin_target_logit, sphere_lambda_at


def build_train_symbol(embedding, num_classes: int, loss_cfg: LossConfig, fc7_name: str = "fc7",
                       emb_size: Optional[int] = None) -> Tuple[mx.sym.Symbol, dict]:
    """Training symbol: backbone embedding + classifier/margin or metric loss, built by ``loss_cfg.loss``'s objective.

    Inputs: ``embedding`` Symbol (B, E) (``fc1_output``); label variable ``softmax_label`` float (B,).
    ``emb_size`` (optional extension): E when it cannot be read from the graph.

    Outputs (group, in order):

    - classification: ``softmax_output`` (B, C) probabilities of ``SoftmaxOutput(normalization='valid')`` over
      ``s * margin_cos`` (``W x + b`` for softmax); ``<emb>_emb`` BlockGrad of the embedding (B, E); and with
      ``center_loss_weight > 0`` a ``center_loss_output`` (1,) MakeLoss term;
    - triplet/atriplet: ``triplet_loss_output`` (1,) MakeLoss of the mean loss; ``<emb>_emb``.

    ``info``: ``fc7_params`` (names), ``metric`` ('acc' or 'loss'), ``outputs`` (names), ``aux_params``
    (learned non-gradient states this head adds, e.g. the class centres; extension).
    """
    validate_loss_config(loss_cfg)
    return get_objective(loss_cfg.loss).build_symbol(embedding, num_classes, loss_cfg, fc7_name, emb_size=emb_size)


__all__ = ["LOSSES", "CLASSIFICATION_LOSSES", "TRIPLET_LOSSES", "LOSS_TYPE_NAMES", "COS_EPS", "LossConfig",
           "make_loss_config", "validate_loss_config", "sphere_lambda_at", "margin_target_logit", "infer_emb_size",
           "emb_output_name", "build_train_symbol"]
