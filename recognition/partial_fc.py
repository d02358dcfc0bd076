"""Partial FC: an fc7 shard that trains only a sample of its class centres each step, MXNet symbolic.

Partial FC (An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW 2021): with
``sample_ratio r < 1`` each step uses, per shard, the positive class centres of the batch plus uniformly sampled
negatives (``ceil(r * rows)`` rows in all, more if the batch has more positives); only the sampled rows get a
gradient, a momentum update and weight decay. The shard weights and momenta then live in a "memory bank" of
NDArrays and the step runs on an executor bound for the sampled rows. ``r = 1`` gives the full result.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import mxnet as mx
import numpy as np

from recognition.fc_shard import has_bias, local_labels, make_shard_optimizer, nbytes, shard_names, shard_symbol
from recognition.heads import LossConfig


class SampledShard:
    """One fc7 shard for Partial FC: a memory bank of all rows (weight, momentum) and an executor for the
    sampled rows. Only sampled rows are read, get a gradient and are updated."""

    def __init__(self, index: int, lo: int, hi: int, emb_size: int, batch_size: int, loss_cfg: LossConfig,
                 ctx: mx.Context, sample_ratio: float, rng: np.random.RandomState, fc7_name: str = "fc7"):
        self.index, self.lo, self.hi, self.ctx = index, lo, hi, ctx
        self.rows, self.emb_size, self.batch_size, self.loss_cfg = hi - lo, emb_size, batch_size, loss_cfg
        self.names = shard_names(fc7_name, index, has_bias(loss_cfg))
        self.num_sample = min(self.rows, max(1, int(math.ceil(sample_ratio * self.rows))))
        self.rng = rng
        self.bank: List[mx.nd.NDArray] = [mx.nd.zeros((self.rows, emb_size), ctx=ctx)]
        if len(self.names) > 1:
            self.bank.append(mx.nd.zeros((self.rows,), ctx=ctx))
        self.states: List[Optional[mx.nd.NDArray]] = [None] * len(self.names)
        self.optimizer = None
        self._execs: Dict[int, mx.executor.Executor] = {}
        self._exe = None
        self._index = None  # sampled rows (K,) int64 NDArray on ctx
        self.sampled = None  # sampled rows (K,) numpy, sorted

    def _executor(self, k: int):
        if k not in self._execs:
            sym = shard_symbol(k, self.emb_size, self.loss_cfg, self.names)
            shapes = {"data": (self.batch_size, self.emb_size), "local_label": (self.batch_size,),
                      self.names[0]: (k, self.emb_size)}
            if len(self.names) > 1:
                shapes[self.names[1]] = (k,)
            if "local_label" not in sym.list_arguments():
                del shapes["local_label"]
            req = {n: "write" for n in shapes}
            if "local_label" in req:
                req["local_label"] = "null"
            self._execs[k] = sym.simple_bind(self.ctx, grad_req=req, **shapes)
        return self._execs[k]

    def set_rows(self, weight: mx.nd.NDArray, bias: Optional[mx.nd.NDArray] = None) -> None:
        self.bank[0][:] = weight.as_in_context(self.ctx)
        if len(self.bank) > 1 and bias is not None:
            self.bank[1][:] = bias.as_in_context(self.ctx)
        for state in self.states:  # new rows: their momentum starts again
            if state is not None:
                state[:] = 0

    def init_optimizer(self, optimizer: str, optimizer_params: dict) -> None:
        sym = shard_symbol(self.num_sample, self.emb_size, self.loss_cfg, self.names)
        self.optimizer = make_shard_optimizer(optimizer, optimizer_params, sym, self.names)
        self.states = [self.optimizer.create_state(i, b) for i, b in enumerate(self.bank)]

    def sample(self, local: np.ndarray) -> np.ndarray:
        """Rows to use this step: all positives of ``local`` (B,) plus random negatives; sorted (K,)."""
        pos = np.unique(local[local >= 0].astype(np.int64))
        k = max(self.num_sample, len(pos))
        if k >= self.rows:
            return np.arange(self.rows, dtype=np.int64)
        mask = np.ones(self.rows, dtype=bool)
        mask[pos] = False
        neg = self.rng.choice(np.flatnonzero(mask), k - len(pos), replace=False)
        return np.sort(np.concatenate([pos, neg]))

    def forward(self, emb: mx.nd.NDArray, labels: np.ndarray) -> Tuple[mx.nd.NDArray, mx.nd.NDArray]:
        local = local_labels(labels, self.lo, self.hi)
        self.sampled = self.sample(local)
        pos = np.searchsorted(self.sampled, np.maximum(local, 0).astype(np.int64))
        lab = mx.nd.array(np.where(local >= 0, pos, -1), ctx=self.ctx)
        self._index = mx.nd.array(self.sampled, ctx=self.ctx, dtype="int64")
        exe = self._exe = self._executor(len(self.sampled))
        emb.copyto(exe.arg_dict["data"])
        if "local_label" in exe.arg_dict:
            exe.arg_dict["local_label"][:] = lab
        for name, bank in zip(self.names, self.bank):
            exe.arg_dict[name][:] = mx.nd.take(bank, self._index)
        exe.forward(is_train=True)
        return exe.outputs[0], lab

    def backward(self, out_grad: mx.nd.NDArray) -> mx.nd.NDArray:
        self._exe.backward(out_grads=[out_grad])
        return self._exe.grad_dict["data"]

    def update(self) -> None:
        """Optimizer step on the sampled rows only; written back into the bank."""
        exe, idx = self._exe, self._index
        for i, (name, bank) in enumerate(zip(self.names, self.bank)):
            weight = exe.arg_dict[name]
            state = mx.nd.take(self.states[i], idx) if self.states[i] is not None else None
            self.optimizer.update(i, weight, exe.grad_dict[name], state)
            bank[idx] = weight
            if state is not None:
                self.states[i][idx] = state

    def get_rows(self) -> List[mx.nd.NDArray]:
        return [b.copy() for b in self.bank]

    def get_state(self, j: int) -> Optional[mx.nd.NDArray]:
        return self.states[j]

    def set_state(self, j: int, state: mx.nd.NDArray) -> None:
        if self.states[j] is not None:
            self.states[j][:] = state.as_in_context(self.ctx)

    def memory_bytes(self) -> int:
        arrays = list(self.bank) + [s for s in self.states if s is not None]
        for exe in self._execs.values():
            arrays += list(exe.arg_dict.values()) + [g for g in exe.grad_arrays if g is not None] + exe.outputs
        return nbytes(arrays)
