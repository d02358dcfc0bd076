"""Triplet losses with online mining inside the graph (FaceNet, Schroff et al. 2015).

The batch holds B/K identities x K images (``images_per_identity=K``, ``FaceImageIter(images_per_identity=K)``).
Positives and negatives are read from the labels, not from the batch order, so a batch where an identity
appears in two groups is still mined correctly. Every image is an anchor.

- ``triplet``: squared L2 distance between L2-normalised embeddings (insightface's convention), in [0, 4].
- ``atriplet``: angular distance ``arccos(<a, b>)`` between normalised embeddings, in [0, pi]; ``triplet_alpha``
  is then in radians (insightface loss_type 13).

Mining (``triplet_mining``):

- ``hard``: per anchor, the farthest positive and the closest negative; loss ``max(0, d_ap - d_an + alpha)``,
  averaged over anchors that have both a positive and a negative.
- ``semihard``: per (anchor, positive) pair, the closest negative with ``d_ap < d_an < d_ap + alpha``
  (FaceNet Eq. 4; insightface picks one of them at random, this picks the hardest for a deterministic graph);
  loss ``d_ap - d_an + alpha`` averaged over the pairs that have such a negative; 0 when none has.
"""
from __future__ import annotations

import mxnet as mx

from recognition.common import ToolkitError

_BIG = 1e4  # larger than any distance here (<= 4 or <= pi); stands in for +inf in masked min/max
_COS_EPS = 1e-6


def pairwise_distance(nemb, kind: str):
    """Distances between rows of normalised embeddings.

    Inputs: ``nemb`` Symbol (B, E), rows of unit norm. Outputs: Symbol (B, B): squared L2 (``kind='l2'``) or
    angle in radians (``kind='angle'``).
    """
    gram = mx.sym.dot(nemb, nemb, transpose_b=True)  # (B, B)
    if kind == "angle":
        return mx.sym.arccos(mx.sym.clip(gram, -1.0 + _COS_EPS, 1.0 - _COS_EPS))
    if kind != "l2":
        raise ToolkitError(f"pairwise_distance: kind must be 'l2' or 'angle', got {kind!r}")
    sq = mx.sym.sum(mx.sym.square(nemb), axis=1)  # (B,)
    dist = mx.sym.broadcast_add(mx.sym.expand_dims(sq, axis=1), mx.sym.expand_dims(sq, axis=0)) - 2.0 * gram
    return mx.sym.relu(dist)  # rounding can make d(i, i) slightly negative


def _masks(label):
    """(B, B) float masks from labels (B,): ``pos`` same identity and not the anchor itself, ``neg`` other identity."""
    lab = mx.sym.BlockGrad(label)
    same = mx.sym.broadcast_equal(mx.sym.expand_dims(lab, axis=1), mx.sym.expand_dims(lab, axis=0))
    idx = mx.sym.contrib.arange_like(lab, axis=0)
    eye = mx.sym.broadcast_equal(mx.sym.expand_dims(idx, axis=1), mx.sym.expand_dims(idx, axis=0))
    return same - eye, 1.0 - same


def _hard(dist, pos, neg, alpha: float):
    """Batch-hard triplet loss, Symbol (1,)."""
    d_ap = mx.sym.max(dist * pos, axis=1)  # distances are >= 0, so non-positives (0) never win
    d_an = mx.sym.min(dist + (1.0 - neg) * _BIG, axis=1)
    valid = (mx.sym.sum(pos, axis=1) > 0) * (mx.sym.sum(neg, axis=1) > 0)  # (B,)
    per_anchor = mx.sym.relu(d_ap - d_an + alpha) * valid
    return mx.sym.sum(per_anchor) / mx.sym.maximum(mx.sym.sum(valid), 1.0)


def _semihard(dist, pos, neg, alpha: float):
    """Semi-hard triplet loss over all (anchor, positive) pairs, Symbol (1,). Builds (B, B, B) tensors."""
    d_ap = mx.sym.expand_dims(dist, axis=2)  # (a, p, 1)
    d_an = mx.sym.expand_dims(dist, axis=1)  # (a, 1, n)
    cond = mx.sym.broadcast_mul(mx.sym.expand_dims(pos, axis=2), mx.sym.expand_dims(neg, axis=1))  # (a, p, n)
    cond = cond * mx.sym.broadcast_greater(d_an, d_ap) * mx.sym.broadcast_lesser(d_an, d_ap + alpha)
    cond = mx.sym.BlockGrad(cond)
    masked = mx.sym.broadcast_mul(cond, d_an) + (1.0 - cond) * _BIG  # (a, p, n)
    closest = mx.sym.min(masked, axis=2)  # (a, p)
    has = mx.sym.sum(cond, axis=2) > 0  # (a, p)
    per_pair = has * (dist - closest + alpha)  # 0 where no semi-hard negative (0 * finite)
    return mx.sym.sum(per_pair) / mx.sym.maximum(mx.sym.sum(has), 1.0)


def triplet_loss_symbol(embedding, label, loss_cfg):
    """Mean triplet loss as ``MakeLoss`` (output ``triplet_loss_output``, shape (1,)).

    Inputs: ``embedding`` Symbol (B, E) (unnormalised, normalised here); ``label`` Symbol float (B,).
    """
    nemb = mx.sym.L2Normalization(embedding, mode="instance", name="triplet_nemb")
    dist = pairwise_distance(nemb, "angle" if loss_cfg.loss == "atriplet" else "l2")
    pos, neg = _masks(label)
    alpha = float(loss_cfg.triplet_alpha)
    if loss_cfg.triplet_mining == "hard":
        loss = _hard(dist, pos, neg, alpha)
    elif loss_cfg.triplet_mining == "semihard":
        loss = _semihard(dist, pos, neg, alpha)
    else:
        raise ToolkitError(f"--triplet-mining: choose 'semihard' or 'hard', got {loss_cfg.triplet_mining!r}")
    return mx.sym.MakeLoss(loss, name="triplet_loss")
