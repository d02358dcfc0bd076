"""One fc7 shard's building blocks, shared by the full shard and the Partial FC shard.

A shard holds classes ``[lo, hi)`` of fc7 as ``fc7_shard{i}_weight`` (and ``_bias`` for plain softmax); its graph
gives the (B, rows) logits with the margin on the target entry. See :mod:`recognition.parallel_fc`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import mxnet as mx
import numpy as np

from recognition.common import ToolkitError
from recognition.heads import CLASSIFICATION_LOSSES, LossConfig, margin_target_logit


def shard_names(fc7_name: str, index: int, with_bias: bool) -> List[str]:
    """Parameter names of shard ``index``: ``['fc7_shard0_weight'(, 'fc7_shard0_bias')]``."""
    names = [f"{fc7_name}_shard{index}_weight"]
    if with_bias:
        names.append(f"{fc7_name}_shard{index}_bias")
    return names


def has_bias(loss_cfg: LossConfig) -> bool:
    """Whether fc7 has a bias: only plain softmax without ``fc7_no_bias`` (as heads.build_train_symbol)."""
    return loss_cfg.loss == "softmax" and not loss_cfg.fc7_no_bias


def shard_symbol(num_rows: int, emb_size: int, loss_cfg: LossConfig, names: Sequence[str]) -> mx.sym.Symbol:
    """Logits of one fc7 shard.

    Inputs: ``data`` (B, E) embeddings; ``local_label`` (B,) target row inside this shard, ``-1`` where the target
    class lives on another shard. Output (B, num_rows): ``s * cos`` with the margin on the target entry
    (``s * margin_target_logit(cos_t)``), or ``W x + b`` for plain softmax.
    """
    if loss_cfg.loss not in CLASSIFICATION_LOSSES:
        raise ToolkitError(f"--loss {loss_cfg.loss}: model-parallel fc7 needs a classification loss "
                           f"({', '.join(CLASSIFICATION_LOSSES)})")
    data = mx.sym.Variable("data")
    label = mx.sym.Variable("local_label")
    mults = dict(lr_mult=loss_cfg.fc7_lr_mult, wd_mult=loss_cfg.fc7_wd_mult)
    weight = mx.sym.Variable(names[0], shape=(num_rows, emb_size), **mults)
    stem = names[0][: -len("_weight")]
    if loss_cfg.loss == "softmax":
        bias = mx.sym.Variable(names[1], shape=(num_rows,), **mults) if len(names) > 1 else None
        return mx.sym.FullyConnected(data, weight=weight, bias=bias, no_bias=bias is None, num_hidden=num_rows,
                                     name=stem)
    nweight = mx.sym.L2Normalization(weight, mode="instance")
    nemb = mx.sym.L2Normalization(data, mode="instance")
    cos = mx.sym.FullyConnected(nemb, weight=nweight, no_bias=True, num_hidden=num_rows, name=stem)
    s = float(loss_cfg.margin_s)
    if loss_cfg.loss != "sphereface" and (loss_cfg.margin_a, loss_cfg.margin_m, loss_cfg.margin_b) == (1, 0, 0):
        return cos * s
    # pick() clips a -1 label to column 0; one_hot(-1) is an all-zero row, so that value never reaches the logits
    # and its gradient is multiplied by zero (margin_target_logit clips cosines, so it stays finite).
    cos_t = mx.sym.pick(cos, label, axis=1)
    diff = margin_target_logit(cos_t, loss_cfg) - cos_t
    onehot = mx.sym.one_hot(label, depth=num_rows)
    return (cos + mx.sym.broadcast_mul(onehot, mx.sym.expand_dims(diff, axis=1))) * s


def local_labels(labels: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """(B,) class ids -> (B,) rows inside ``[lo, hi)`` as float32, ``-1`` elsewhere."""
    labels = np.asarray(labels).astype(np.int64)
    inside = (labels >= lo) & (labels < hi)
    return np.where(inside, labels - lo, -1).astype(np.float32)


def make_shard_optimizer(name: str, params: Optional[dict], sym, names: Sequence[str]):
    """``mx.optimizer`` for one shard's parameters ``names``, with ``rescale_grad=1`` (gradients are of the mean)."""
    params = dict(params or {})
    params["rescale_grad"] = 1.0  # gradients are already of the mean loss
    return mx.optimizer.create(name, sym=sym, param_idx2name=dict(enumerate(names)), **params)


def nbytes(arrays) -> int:
    """Total bytes of the NDArrays in ``arrays`` (None entries skipped)."""
    return int(sum(a.size * np.dtype(a.dtype).itemsize for a in arrays if a is not None))
