"""Center loss add-on (Wen et al., ECCV 2016), for any classification head.

Term: ``L_c = weight * mean_i 0.5 * ||x_i - c_{y_i}||^2`` over the raw (unnormalised) embeddings x (B, E), so
``dL_c/dx_i = weight * (x_i - c_{y_i}) / B`` (the 1/B matches ``SoftmaxOutput(normalization='valid')``).

The class centres c (C, E) are an auxiliary state (``center_loss_centers``, zero-initialised, saved with the
checkpoint as ``aux:center_loss_centers``), not a learned weight: the optimizer never touches them. Each
backward pass moves them as in Wen et al. Eq. 4 with rate ``center_alpha``::

    c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)

using the centres of the forward pass. The op is a small Python CustomOp (MXNet has no symbolic in-place
update). With several devices each keeps its own copy, updated from its share of the batch; Module averages
aux states whenever parameters are read back (``get_params``, end of epoch), as it does for BatchNorm.
"""
from __future__ import annotations

from typing import List, Tuple

import mxnet as mx
import numpy as np

CENTERS_NAME = "center_loss_centers"
OP_TYPE = "ifr_center_distance"


class _CenterDistance(mx.operator.CustomOp):
    """Forward: (B,) half squared distance of each row to its class centre. Backward: the gradient on the
    embedding and, as a side effect, the Wen et al. centre update."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = alpha

    def forward(self, is_train, req, in_data, out_data, aux):
        x, label, centers = in_data[0], in_data[1], aux[0]
        diff = x - mx.nd.take(centers, label)  # (B, E)
        self.assign(out_data[0], req[0], 0.5 * mx.nd.sum(diff * diff, axis=1))

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        x, label, centers = in_data[0], in_data[1], aux[0]
        diff = x - mx.nd.take(centers, label)
        self.assign(in_grad[0], req[0], diff * mx.nd.expand_dims(out_grad[0], axis=1))
        self.assign(in_grad[1], req[1], mx.nd.zeros_like(in_data[1]))
        # Wen et al. Eq. 4, batch-local counts n_j
        lab = label.asnumpy().astype(np.int64)
        d = diff.asnumpy()
        step = np.zeros(centers.shape, dtype=np.float64)
        np.add.at(step, lab, -d)  # sum over i of (c_j - x_i)
        counts = np.bincount(lab, minlength=centers.shape[0]).astype(np.float64)
        step /= (1.0 + counts)[:, None]
        centers[:] = centers - mx.nd.array(self.alpha * step, ctx=centers.context, dtype=centers.dtype)


@mx.operator.register(OP_TYPE)
class _CenterDistanceProp(mx.operator.CustomOpProp):
    def __init__(self, num_classes, alpha="0.5"):
        super().__init__(need_top_grad=True)
        self.num_classes = int(num_classes)
        self.alpha = float(alpha)

    def list_arguments(self):
        return ["data", "label"]

    def list_outputs(self):
        return ["output"]

    def list_auxiliary_states(self):
        return ["centers"]

    def infer_shape(self, in_shape):
        data = in_shape[0]  # only the arguments' shapes come in; the centres' shape follows from num_classes
        return [data, (data[0],)], [(data[0],)], [(self.num_classes, data[1])]

    def create_operator(self, ctx, shapes, dtypes):
        return _CenterDistance(self.alpha)


def center_loss_symbol(embedding, label, num_classes: int, emb_size: int, loss_cfg) -> Tuple[mx.sym.Symbol, List[str]]:
    """``MakeLoss`` of the weighted center term (output ``center_loss_output``, shape (1,)) and the aux names.

    Inputs: ``embedding`` Symbol (B, E), ``label`` Symbol float (B,).
    """
    centers = mx.sym.Variable(CENTERS_NAME, shape=(num_classes, emb_size), init=mx.init.Zero())
    dist = mx.sym.Custom(data=embedding, label=label, centers=centers, op_type=OP_TYPE,
                         num_classes=int(num_classes), alpha=float(loss_cfg.center_alpha), name="center_distance")
    term = mx.sym.mean(dist) * float(loss_cfg.center_loss_weight)
    return mx.sym.MakeLoss(term, name="center_loss"), [CENTERS_NAME]
