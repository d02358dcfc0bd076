"""The margin softmax family: softmax, nsoftmax, ArcFace, CosFace, combined margin and SphereFace.

Every classification margin is one combined margin (ArcFace paper, Deng et al. 2019, Sec. 3.3)::

    logit_y = s * (cos(m1 * theta_y + m2) - m3),   logit_j = s * cos(theta_j)  (j != y)

:func:`margin_target_logit` applies it to the target cosines only, before the scale ``s`` (shared with the
model-parallel ``train_parall.py``). Special cases use closed forms that avoid ``arccos`` where possible.
A centre-loss term (:mod:`recognition.objectives.center`) can be added to any of them.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Mapping, Optional

import mxnet as mx

from recognition.common import ToolkitError
from recognition.objectives import center
from recognition.objectives.base import COS_EPS, LossConfig, Objective, embedding_output, head_info, infer_emb_size


def _int01(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return int(text)


def add_legacy_args(group) -> None:
    """insightface train_softmax.py's margin flags (``--margin-s/-m/-a/-b``, ``--easy-margin``)."""
    group.add_argument("--margin-s", type=float, default=None, help="scale s")
    group.add_argument("--margin-m", type=float, default=None,
                       help="margin m: ArcFace angle (type 4/5), CosFace cosine margin (type 2), atriplet angle (13)")
    group.add_argument("--margin-a", type=float, default=None, help="angle multiplier a (type 1/5)")
    group.add_argument("--margin-b", type=float, default=None, help="cosine margin b (type 5)")
    group.add_argument("--easy-margin", type=_int01, default=None, help="ArcFace easy margin 0|1")


def sphere_lambda_at(cfg: LossConfig, num_update: int) -> float:
    """insightface/SphereFace annealing: ``max(beta_min, beta * (1 + gamma * it) ** -power)``, frozen before
    ``beta_freeze`` updates. The trainer may rebuild the head with ``replace(cfg, sphere_lambda=...)``."""
    it = max(0, num_update - cfg.beta_freeze)
    return max(cfg.beta_min, cfg.beta * (1.0 + cfg.gamma * it) ** (-cfg.power))


def _arccos(cos_t):
    return mx.sym.arccos(mx.sym.clip(cos_t, -1.0 + COS_EPS, 1.0 - COS_EPS))


def margin_target_logit(cos_t, loss_cfg: LossConfig):
    """Margin-modified target cosine, before the scale ``s``.

    Inputs: ``cos_t`` Symbol (B,) -- cosine between each embedding and its own class weight.
    Outputs: Symbol (B,):

    - no margin (nsoftmax): ``cos``;
    - CosFace (m1=1, m2=0): ``cos - m3``;
    - ArcFace (m1=1, m3=0): ``cos(theta + m2)`` computed as ``cos*cos(m2) - sin*sin(m2)``. Past
      ``theta > pi - m2`` the curve would rise again, so (insightface train_softmax.py, ArcFace paper Sec. 3)
      it is replaced by ``cos - m2*sin(m2)``; with ``easy_margin`` the margin applies only where ``cos > 0``;
    - SphereFace (integer m1): ``psi = (-1)^k cos(m1 theta) - 2k``, ``k = floor(m1 theta / pi)``, the
      monotonic extension of ``cos(m1 theta)`` (Liu et al. 2017, Eq. 6), blended as
      ``(lambda cos + psi) / (1 + lambda)``;
    - otherwise (combined): ``cos(m1 theta + m2) - m3`` as insightface's loss_type 5 (not monotonic once
      ``m1 theta + m2 > pi``; with small margins that region holds almost no training pairs).
    """
    m1, m2, m3 = float(loss_cfg.margin_a), float(loss_cfg.margin_m), float(loss_cfg.margin_b)
    if loss_cfg.loss == "sphereface":
        theta = _arccos(cos_t)
        k = mx.sym.floor(theta * (m1 / math.pi))
        sign = 1.0 - 2.0 * (k % 2.0)
        psi = sign * mx.sym.cos(theta * m1) - 2.0 * k
        lam = float(loss_cfg.sphere_lambda)
        if lam > 0:
            psi = (cos_t * lam + psi) / (1.0 + lam)
        return psi
    if m1 == 1.0 and m2 == 0.0:
        return cos_t - m3 if m3 else cos_t
    if m1 == 1.0 and m3 == 0.0:
        # sin is sqrt(max(1 - cos^2, eps)): finite gradient at theta = 0 and pi
        sin_t = mx.sym.sqrt(mx.sym.maximum(1.0 - cos_t * cos_t, COS_EPS))
        body = cos_t * math.cos(m2) - sin_t * math.sin(m2)
        if loss_cfg.easy_margin:
            keep = cos_t > 0.0
            return mx.sym.where(keep, body, cos_t)
        keep = cos_t > math.cos(math.pi - m2)
        return mx.sym.where(keep, body, cos_t - m2 * math.sin(m2))
    body = mx.sym.cos(_arccos(cos_t) * m1 + m2)
    return body - m3 if m3 else body


def _logits(embedding, label, num_classes: int, emb_size: int, cfg: LossConfig, fc7_name: str):
    """(B, C) logits and the fc7 parameter names."""
    weight_name = f"{fc7_name}_weight"
    if cfg.loss == "softmax":
        weight = mx.sym.Variable(weight_name, shape=(num_classes, emb_size), lr_mult=cfg.fc7_lr_mult,
                                 wd_mult=cfg.fc7_wd_mult)
        names = [weight_name]
        bias = None
        if not cfg.fc7_no_bias:
            bias = mx.sym.Variable(f"{fc7_name}_bias", shape=(num_classes,), lr_mult=cfg.fc7_lr_mult,
                                   wd_mult=cfg.fc7_wd_mult, init=mx.init.Zero())
            names.append(f"{fc7_name}_bias")
        logits = mx.sym.FullyConnected(embedding, weight=weight, bias=bias, no_bias=cfg.fc7_no_bias,
                                       num_hidden=num_classes, name=fc7_name)
        return logits, names
    # Normalised heads: cos = <x/|x|, w/|w|>; insightface initialises fc7 with Normal(0.01).
    weight = mx.sym.Variable(weight_name, shape=(num_classes, emb_size), lr_mult=cfg.fc7_lr_mult,
                             wd_mult=cfg.fc7_wd_mult, init=mx.init.Normal(0.01))
    nweight = mx.sym.L2Normalization(weight, mode="instance", name=f"{fc7_name}_nweight")
    nemb = mx.sym.L2Normalization(embedding, mode="instance", name=f"{fc7_name}_nemb")
    cos = mx.sym.FullyConnected(nemb, weight=nweight, no_bias=True, num_hidden=num_classes, name=fc7_name)
    s = float(cfg.margin_s)
    no_margin = cfg.loss != "sphereface" and cfg.margin_a == 1.0 and cfg.margin_m == 0.0 and cfg.margin_b == 0.0
    if no_margin:
        return cos * s, [weight_name]
    cos_t = mx.sym.pick(cos, label, axis=1)
    diff = margin_target_logit(cos_t, cfg) - cos_t  # (B,)
    onehot = mx.sym.one_hot(label, depth=num_classes)  # (B, C)
    logits = (cos + mx.sym.broadcast_mul(onehot, mx.sym.expand_dims(diff, axis=1))) * s
    return logits, [weight_name]


class MarginObjective(Objective):
    """One member of the margin softmax family: fc7 + margin + ``SoftmaxOutput``; metric 'acc'."""

    family = "margin"

    def __init__(self, name: str, loss_type: Optional[int], defaults: Mapping[str, Any],
                 legacy_margin_m: str = "margin_m", plain_logits: bool = False):
        self.name, self.loss_type, self.defaults = name, loss_type, dict(defaults)
        self.legacy_margin_m, self.plain_logits = legacy_margin_m, plain_logits

    def check(self, cfg: LossConfig) -> None:
        if cfg.loss != "softmax" and not cfg.margin_s > 0:
            raise ToolkitError(f"--margin-s: must be > 0 for {cfg.loss}, got {cfg.margin_s}")
        if cfg.loss == "sphereface":
            if cfg.margin_a != int(cfg.margin_a) or cfg.margin_m or cfg.margin_b:
                raise ToolkitError(f"--margin-a: sphereface needs an integer m1 and m2 = m3 = 0, got "
                                   f"m1={cfg.margin_a}, m2={cfg.margin_m}, m3={cfg.margin_b}")
            if cfg.sphere_lambda < 0:
                raise ToolkitError(f"sphere_lambda: must be >= 0, got {cfg.sphere_lambda}")

    def build_symbol(self, embedding, num_classes: int, loss_cfg: LossConfig, fc7_name: str = "fc7",
                     emb_size: Optional[int] = None, options: Optional[Mapping[str, Any]] = None):
        """Outputs: ``softmax_output`` (B, C) probabilities of ``SoftmaxOutput(normalization='valid')`` over
        ``s * margin_cos`` (``W x + b`` for softmax); ``<emb>_emb`` (B, E); with ``center_loss_weight > 0`` a
        ``center_loss_output`` (1,)."""
        if int(num_classes) < 2:
            raise ToolkitError(f"num_classes: a classification loss needs >= 2 classes, got {num_classes}")
        if emb_size is None:
            emb_size = infer_emb_size(embedding)
        label = mx.sym.Variable("softmax_label")
        logits, fc7_params = _logits(embedding, label, int(num_classes), int(emb_size), loss_cfg, fc7_name)
        softmax = mx.sym.SoftmaxOutput(data=logits, label=label, normalization="valid", name="softmax")
        outputs = [softmax, embedding_output(embedding)]
        extra, aux = center.outputs(embedding, label, int(num_classes), int(emb_size), loss_cfg)
        out = mx.sym.Group(outputs + extra)
        return out, head_info(out, "acc", fc7_params, aux)


SOFTMAX = MarginObjective("softmax", 0, dict(margin_m=0.0, margin_a=1.0, margin_b=0.0, fc7_no_bias=False),
                          plain_logits=True)
NSOFTMAX = MarginObjective("nsoftmax", None, dict(margin_s=64.0, margin_m=0.0, margin_a=1.0, margin_b=0.0))
ARCFACE = MarginObjective("arcface", 4, dict(margin_s=64.0, margin_m=0.5, margin_a=1.0, margin_b=0.0))
# insightface's single --margin-m is CosFace's cosine margin (m3 here)
COSFACE = MarginObjective("cosface", 2, dict(margin_s=64.0, margin_m=0.0, margin_a=1.0, margin_b=0.35),
                          legacy_margin_m="margin_b")
COMBINED = MarginObjective("combined", 5, dict(margin_s=64.0, margin_a=1.0, margin_m=0.3, margin_b=0.2))
# SphereFace: integer angle multiplier m1 = 4, normalised (s=64) with a fixed lambda. Not insightface's
# train_softmax.py --loss-type 1, which is its unnormalised LSoftmax op with lambda annealing: that number is refused
# (recognition.args.REFUSED_LOSS_TYPES) rather than mapped to something else.
SPHEREFACE = MarginObjective("sphereface", None, dict(margin_s=64.0, margin_a=4.0, margin_m=0.0, margin_b=0.0))

OBJECTIVES = (SOFTMAX, NSOFTMAX, ARCFACE, COSFACE, COMBINED, SPHEREFACE)

__all__ = ["MarginObjective", "margin_target_logit", "sphere_lambda_at", "add_legacy_args", "OBJECTIVES"]
