"""Margin heads and losses on top of a backbone embedding (MXNet symbolic).

The backbone ends at ``fc1_output`` (B, E). This module adds the classifier ``fc7`` and its margin, or a
metric-learning loss, and returns the training symbol. What is deployed is the backbone alone.

Every classification margin is one combined margin (ArcFace paper, Deng et al. 2019, Sec. 3.3)::

    logit_y = s * (cos(m1 * theta_y + m2) - m3),   logit_j = s * cos(theta_j)  (j != y)

``margin_target_logit`` applies it to the target cosines only, before the scale ``s`` (shared with the
model-parallel ``train_parall.py``). Special cases use closed forms that avoid ``arccos`` where possible.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import mxnet as mx

from recognition.common import ToolkitError, symbol_graph

# importing losses_center registers its CustomOp, so a saved training symbol with center loss can be bound
from recognition.losses_center import center_loss_symbol
from recognition.losses_triplet import triplet_loss_symbol

LOSSES = ("softmax", "nsoftmax", "arcface", "cosface", "combined", "sphereface", "triplet", "atriplet")
CLASSIFICATION_LOSSES = ("softmax", "nsoftmax", "arcface", "cosface", "combined", "sphereface")
TRIPLET_LOSSES = ("triplet", "atriplet")
# insightface's train_softmax.py --loss-type numbers, for scripts that accept the old flag
LOSS_TYPE_NAMES = {0: "softmax", 1: "sphereface", 2: "cosface", 4: "arcface", 5: "combined", 12: "triplet",
                   13: "atriplet"}

# Clip for cosines entering arccos / sqrt(1 - cos^2): keeps value and gradient finite at theta = 0 or pi.
COS_EPS = 1e-6


@dataclass
class LossConfig:
    """Loss hyper-parameters (defaults per loss come from :func:`make_loss_config`).

    ``margin_a`` (m1, multiplicative angle), ``margin_m`` (m2, additive angle, ArcFace) and ``margin_b`` (m3,
    additive cosine, CosFace) form the combined margin. ``sphere_lambda`` blends SphereFace's target logit with
    the plain cosine, ``(lambda * cos + psi) / (1 + lambda)`` (Liu et al. 2017); the ``beta*``/``gamma``/
    ``power`` fields describe insightface's annealing schedule ``lambda = max(beta_min, beta * (1 + gamma *
    it) ** -power)`` (see :func:`sphere_lambda_at`); the graph itself uses the fixed ``sphere_lambda``.
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


_DEFAULTS = {
    "softmax": dict(margin_m=0.0, margin_a=1.0, margin_b=0.0, fc7_no_bias=False),
    "nsoftmax": dict(margin_s=64.0, margin_m=0.0, margin_a=1.0, margin_b=0.0),
    "arcface": dict(margin_s=64.0, margin_m=0.5, margin_a=1.0, margin_b=0.0),
    "cosface": dict(margin_s=64.0, margin_m=0.0, margin_a=1.0, margin_b=0.35),
    "combined": dict(margin_s=64.0, margin_a=1.0, margin_m=0.3, margin_b=0.2),
    # SphereFace: integer angle multiplier m1 = 4 (insightface loss_type 1 passes --margin 4 to its
    # LSoftmax op; its --margin-a flag is not used there).
    "sphereface": dict(margin_s=64.0, margin_a=4.0, margin_m=0.0, margin_b=0.0),
    "triplet": dict(margin_m=0.0, margin_a=1.0, margin_b=0.0, triplet_alpha=0.3),
    "atriplet": dict(margin_m=0.0, margin_a=1.0, margin_b=0.0, triplet_alpha=0.3),
}
_ALIASES = {"m1": "margin_a", "m2": "margin_m", "m3": "margin_b", "s": "margin_s"}


def _unknown_loss(name) -> ToolkitError:
    return ToolkitError(f"--loss: unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


def make_loss_config(name: str, **overrides) -> LossConfig:
    """A :class:`LossConfig` with insightface's defaults for loss ``name``, then ``overrides`` (``None`` = keep).

    ``m1``/``m2``/``m3``/``s`` are accepted as aliases of ``margin_a``/``margin_m``/``margin_b``/``margin_s``.
    """
    if name not in _DEFAULTS:
        raise _unknown_loss(name)
    kw = dict(_DEFAULTS[name])
    for key, value in overrides.items():
        if value is None:
            continue
        key = _ALIASES.get(key, key)
        if key not in LossConfig.__dataclass_fields__ or key == "loss":
            raise ToolkitError(f"make_loss_config: unknown field {key!r} for loss {name!r}")
        kw[key] = value
    cfg = LossConfig(loss=name, **kw)
    validate_loss_config(cfg)
    return cfg


def validate_loss_config(cfg: LossConfig) -> None:
    """Raise :class:`ToolkitError` (one line, naming the flag) for values no loss can train with."""
    if cfg.loss not in LOSSES:
        raise _unknown_loss(cfg.loss)
    if cfg.loss in CLASSIFICATION_LOSSES and cfg.loss != "softmax" and not cfg.margin_s > 0:
        raise ToolkitError(f"--margin-s: must be > 0 for {cfg.loss}, got {cfg.margin_s}")
    if cfg.margin_a < 1.0:
        raise ToolkitError(f"--margin-a (m1): must be >= 1, got {cfg.margin_a}")
    if not 0.0 <= cfg.margin_m < math.pi / 2:
        raise ToolkitError(f"--margin-m (m2): must be in [0, pi/2), got {cfg.margin_m}")
    if not 0.0 <= cfg.margin_b < 1.0:
        raise ToolkitError(f"--margin-b (m3): must be in [0, 1), got {cfg.margin_b}")
    if cfg.loss == "sphereface":
        if cfg.margin_a != int(cfg.margin_a) or cfg.margin_m or cfg.margin_b:
            raise ToolkitError(f"--margin-a: sphereface needs an integer m1 and m2 = m3 = 0, got "
                               f"m1={cfg.margin_a}, m2={cfg.margin_m}, m3={cfg.margin_b}")
        if cfg.sphere_lambda < 0:
            raise ToolkitError(f"sphere_lambda: must be >= 0, got {cfg.sphere_lambda}")
    if cfg.center_loss_weight < 0:
        raise ToolkitError(f"--center-loss-weight: must be >= 0, got {cfg.center_loss_weight}")
    if not 0.0 < cfg.center_alpha <= 1.0:
        raise ToolkitError(f"--center-alpha: must be in (0, 1], got {cfg.center_alpha}")
    if cfg.loss in TRIPLET_LOSSES:
        if not cfg.triplet_alpha > 0:
            raise ToolkitError(f"--triplet-alpha: must be > 0, got {cfg.triplet_alpha}")
        if cfg.images_per_identity < 2:
            raise ToolkitError(f"--images-per-identity: triplet losses need >= 2, got {cfg.images_per_identity}")
        if cfg.triplet_mining not in ("semihard", "hard"):
            raise ToolkitError(f"--triplet-mining: choose 'semihard' or 'hard', got {cfg.triplet_mining!r}")


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


def build_train_symbol(embedding, num_classes: int, loss_cfg: LossConfig, fc7_name: str = "fc7",
                       emb_size: Optional[int] = None) -> Tuple[mx.sym.Symbol, dict]:
    """Training symbol: backbone embedding + classifier/margin or metric loss.

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
    if loss_cfg.loss in TRIPLET_LOSSES:
        label = mx.sym.Variable("softmax_label")
        loss = triplet_loss_symbol(embedding, label, loss_cfg)
        out = mx.sym.Group([loss, mx.sym.BlockGrad(embedding, name=_emb_name(embedding))])
        return out, dict(fc7_params=[], metric="loss", outputs=out.list_outputs(), aux_params=[])
    if int(num_classes) < 2:
        raise ToolkitError(f"num_classes: a classification loss needs >= 2 classes, got {num_classes}")
    if emb_size is None:
        emb_size = infer_emb_size(embedding)
    label = mx.sym.Variable("softmax_label")
    logits, fc7_params = _logits(embedding, label, int(num_classes), int(emb_size), loss_cfg, fc7_name)
    softmax = mx.sym.SoftmaxOutput(data=logits, label=label, normalization="valid", name="softmax")
    outputs = [softmax, mx.sym.BlockGrad(embedding, name=_emb_name(embedding))]
    aux: List[str] = []
    if loss_cfg.center_loss_weight > 0:
        center, aux = center_loss_symbol(embedding, label, int(num_classes), int(emb_size), loss_cfg)
        outputs.append(center)
    out = mx.sym.Group(outputs)
    return out, dict(fc7_params=fc7_params, metric="acc", outputs=out.list_outputs(), aux_params=aux)


def _emb_name(embedding) -> str:
    name = embedding.name or "fc1"
    return (name[: -len("_output")] if name.endswith("_output") else name) + "_emb"


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


__all__ = ["LOSSES", "LOSS_TYPE_NAMES", "LossConfig", "make_loss_config", "validate_loss_config",
           "sphere_lambda_at", "margin_target_logit", "infer_emb_size", "build_train_symbol"]
