"""Embedding distillation: train a (smaller) student whose embedding matches a teacher's.

``--teacher PREFIX,EPOCH`` adds a label-like input ``teacher_emb`` (B, Et) and a ``MakeLoss`` term on the
student's ``fc1_output`` (B, Es); when Es != Et a learned projection ``distill_proj`` (FullyConnected Es -> Et,
training-only: the slim checkpoint keeps the graph cut at ``fc1_output``, so it is dropped there) maps the
student into the teacher's space first. With ``s`` the (projected) student embedding and ``t`` the teacher's:

- ``mse``: ``mean((s - t) ** 2)`` over the batch and the Et dimensions;
- ``cosine``: ``mean(1 - <s/|s|, t/|t|>)`` over the batch;
- ``both``: their sum.

The term is weighted by ``--distill-weight`` (its gradient; the logged value is unweighted) and can run alongside
the margin loss (``--loss arcface``...) or alone (``--loss none``: pure distillation, no classifier).

Teacher embeddings come from the teacher run on each batch (every augmentation applies to both networks), or from
``--teacher-cache FILE.npy``: computed once on un-mirrored, un-augmented images, rows keyed by record index
(``FILE.npy.json`` records the teacher and the data it was made from; a mismatch is an error). With a cache,
random mirroring is switched off (the cache holds no mirrored images; the log says so) and cut-off / colour
jitter are refused.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import mxnet as mx
import numpy as np

from recognition.common import ToolkitError, atomic_write, load_checkpoint, parse_prefix_epoch
from recognition.image_iter import FaceImageIter
from recognition.objectives.base import embedding_output, head_info
from recognition.objectives.distill import DISTILL_LOSSES

logger = logging.getLogger("recognition")

TEACHER_INPUT = "teacher_emb"


# ---------------------------------------------------------------------------------------------------- graph
def distill_loss_symbol(student, teacher, kind: str, weight: float, student_dim: int, teacher_dim: int):
    """``MakeLoss`` Symbol (1,) named ``distill_loss`` (see the module docstring).

    Inputs: ``student`` (B, Es), ``teacher`` (B, Et) Symbols. A projection ``distill_proj`` (no bias) is added when
    ``student_dim != teacher_dim``. The gradient is scaled by ``weight``.
    """
    if kind not in DISTILL_LOSSES:
        raise ToolkitError(f"--distill-loss {kind!r}: choose one of {', '.join(DISTILL_LOSSES)}")
    s = student
    if int(student_dim) != int(teacher_dim):
        s = mx.sym.FullyConnected(student, num_hidden=int(teacher_dim), no_bias=True, name="distill_proj")
    t = mx.sym.BlockGrad(teacher)
    terms = []
    if kind in ("mse", "both"):
        terms.append(mx.sym.mean(mx.sym.square(s - t)))
    if kind in ("cosine", "both"):
        ns = mx.sym.L2Normalization(s, mode="instance", name="distill_ns")
        nt = mx.sym.L2Normalization(t, mode="instance", name="distill_nt")
        terms.append(1.0 - mx.sym.mean(mx.sym.sum(ns * nt, axis=1)))
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return mx.sym.MakeLoss(total, grad_scale=float(weight), name="distill_loss")


def build_distill_symbol(embedding, num_classes: int, loss_cfg, fc7_name: str, dplan):
    """Training symbol with the distillation term: the margin head's outputs + ``distill_loss_output``, or (loss
    ``none``) ``distill_loss_output`` then ``<emb>_emb``. Returns ``(Symbol, info)`` like ``build_train_symbol``."""
    from recognition.heads import build_train_symbol, infer_emb_size

    teacher = mx.sym.Variable(TEACHER_INPUT)
    term = distill_loss_symbol(embedding, teacher, dplan.loss, dplan.weight, infer_emb_size(embedding),
                               dplan.teacher_dim)
    if loss_cfg.loss == "none":
        # the class labels still come with every batch: a BlockGrad output keeps them a (harmless) graph input
        label = mx.sym.BlockGrad(mx.sym.Variable("softmax_label"), name="distill_label")
        out = mx.sym.Group([term, embedding_output(embedding), label])
        return out, head_info(out, "loss")
    head, info = build_train_symbol(embedding, num_classes, loss_cfg, fc7_name)
    out = mx.sym.Group([head[i] for i in range(len(head.list_outputs()))] + [term])
    return out, dict(info, outputs=out.list_outputs())


# ---------------------------------------------------------------------------------------------------- teacher
class TeacherPlan:
    """Validated distillation settings (``plan.distill`` in the trainer)."""

    def __init__(self, spec: str, loss: str = "mse", weight: float = 1.0, cache: Optional[str] = None,
                 ctx=None, batch_size: int = 32, data_shape=(3, 112, 112)):
        prefix, epoch = parse_prefix_epoch(spec, "--teacher")
        if loss not in DISTILL_LOSSES:
            raise ToolkitError(f"--distill-loss {loss!r}: choose one of {', '.join(DISTILL_LOSSES)}")
        if not weight >= 0:
            raise ToolkitError(f"--distill-weight: must be >= 0, got {weight}")
        self.spec, self.prefix, self.epoch = f"{os.path.abspath(prefix)},{epoch}", prefix, epoch
        self.loss, self.weight, self.cache = loss, float(weight), cache
        self.ctx, self.batch_size, self.data_shape = ctx or mx.cpu(), int(batch_size), tuple(data_shape)
        from recognition.verification import cut_at_embedding

        sym, self.arg, self.aux = load_checkpoint(prefix, epoch)
        self.symbol = cut_at_embedding(sym, f"--teacher {prefix}-symbol.json")
        self.teacher_dim = int(self.symbol.infer_shape(data=(1,) + self.data_shape)[1][0][1])
        self._embedder = None

    def embed(self, x: np.ndarray) -> np.ndarray:
        """Teacher ``fc1_output`` of (N, 3, H, W) float32 -> (N, Et)."""
        if self._embedder is None:
            from recognition.verification import Embedder

            self._embedder = Embedder(self.symbol, self.arg, self.aux, ctx=self.ctx, batch_size=self.batch_size,
                                      data_shape=self.data_shape)
        return self._embedder(x)

    def make_iter(self, path_imgrec: str, batch_size: int, **kw) -> "DistillImageIter":
        """``FaceImageIter`` arguments -> an iterator that also yields ``teacher_emb``."""
        table = load_or_build_cache(self, path_imgrec) if self.cache else None
        return DistillImageIter(path_imgrec, batch_size, teacher=self, table=table, **kw)


def _cache_meta(teacher: TeacherPlan, path_imgrec: str, num_keys: int) -> dict:
    st = os.stat(path_imgrec)
    return {"teacher": teacher.spec, "rec": os.path.abspath(path_imgrec), "rec_bytes": int(st.st_size),
            "records": int(num_keys), "emb_size": teacher.teacher_dim, "data_shape": list(teacher.data_shape)}


def load_or_build_cache(teacher: TeacherPlan, path_imgrec: str) -> np.ndarray:
    """The ``--teacher-cache`` table float32 (max_key + 1, Et) (rows of non-image records are NaN): read it when
    its sidecar matches this teacher and data, build and save it (atomically) when the file is absent."""
    from recognition.features import decode_image
    from recognition.rec import RecordReader

    path = teacher.cache
    reader = RecordReader(path_imgrec)
    try:
        keys = np.asarray(reader.image_keys, np.int64)
        want = _cache_meta(teacher, path_imgrec, len(keys))
        if os.path.isfile(path):
            side = path + ".json"
            have = json.load(open(side)) if os.path.isfile(side) else {}
            diff = [k for k in want if have.get(k) != want[k]]
            if diff:
                raise ToolkitError(f"--teacher-cache {path}: made for another teacher or data ({', '.join(diff)} "
                                   f"differ{'s' if len(diff) == 1 else ''}); delete it or name another file")
            table = np.load(path, allow_pickle=False)
            logger.info("teacher cache %s: %d embeddings of size %d", path, len(keys), table.shape[1])
            return table
        table = np.full((int(keys.max()) + 1, teacher.teacher_dim), np.nan, np.float32)
        size = teacher.data_shape[1:]
        for start in range(0, len(keys), teacher.batch_size):
            chunk = keys[start:start + teacher.batch_size]
            x = np.stack([decode_image(reader.read(int(k))[1], f"{path_imgrec}: record {int(k)}", size)
                          for k in chunk]).astype(np.float32)
            table[chunk] = teacher.embed(x)
    finally:
        reader.close()
    with atomic_write(path, "wb") as f:
        np.save(f, table, allow_pickle=False)
    with atomic_write(path + ".json", "w") as f:
        json.dump(want, f, indent=1)
    logger.info("teacher cache %s: computed %d embeddings of size %d", path, len(keys), teacher.teacher_dim)
    return table


class DistillImageIter(FaceImageIter):
    """``FaceImageIter`` whose batches carry a second label ``teacher_emb`` (B, Et): looked up by record key in
    ``table`` (the cache), else computed by ``teacher`` on the batch's (augmented) images."""

    def __init__(self, path_imgrec: str, batch_size: int, teacher: TeacherPlan, table: Optional[np.ndarray] = None,
                 **kw):
        self._slot_keys: dict = {}
        super().__init__(path_imgrec, batch_size, **kw)
        self.teacher, self.table = teacher, table
        self.last_keys: Optional[np.ndarray] = None

    def _decode_into(self, dst, i, key, aug) -> bool:
        ok = super()._decode_into(dst, i, key, aug)
        if ok:  # the key that finally filled slot i (a bad record is replaced by the next decodable one)
            self._slot_keys.setdefault(id(dst), np.full(len(dst), -1, np.int64))[i] = int(key)
        return ok

    def _finish(self, job):
        data, label = super()._finish(job)
        self.last_keys = self._slot_keys.pop(id(job[0]))
        return data, label

    def _drop_pending(self) -> None:
        super()._drop_pending()
        self._slot_keys.clear()

    @property
    def provide_label(self):
        return super().provide_label + [mx.io.DataDesc(TEACHER_INPUT, (self.batch_size, self.teacher.teacher_dim),
                                                       np.float32)]

    def teacher_for(self, data: np.ndarray, keys: np.ndarray) -> np.ndarray:
        if self.table is None:
            return self.teacher.embed(data)
        if keys.max() >= len(self.table):
            raise ToolkitError(f"--teacher-cache: record {int(keys.max())} is beyond the cache's "
                               f"{len(self.table)} rows")
        emb = self.table[keys]
        if np.isnan(emb).any():
            raise ToolkitError("--teacher-cache: a batch record has no cached teacher embedding; delete the cache")
        return emb

    def next(self) -> mx.io.DataBatch:
        data, label = self.next_numpy()
        temb = self.teacher_for(data, self.last_keys)
        return mx.io.DataBatch(data=[mx.nd.array(data)], label=[mx.nd.array(label), mx.nd.array(temb)], pad=0,
                               provide_data=self.provide_data, provide_label=self.provide_label)


__all__ = ["DISTILL_LOSSES", "TEACHER_INPUT", "distill_loss_symbol", "build_distill_symbol", "TeacherPlan",
           "load_or_build_cache", "DistillImageIter"]
