"""Model-parallel classifier (fc7 split by class across devices) and Partial FC, MXNet symbolic.

With millions of identities the classifier ``fc7`` (C, E) no longer fits one device, and replicating it for data
parallelism multiplies its memory and its gradient traffic. Here (as insightface's ``train_parall.py``):

- the backbone is one :class:`mx.mod.Module` data-parallel over all devices; its embeddings (B, E) are gathered;
- fc7 is split by class: device ``i`` holds rows ``[lo_i, hi_i)`` (:func:`split_classes`) as parameter
  ``fc7_shard{i}_weight`` (and ``_bias`` for plain softmax) in its own single-device Module;
- every shard computes its logits for the whole global batch; the margin (:func:`recognition.heads.
  margin_target_logit`) touches only the shard that holds the target class; the softmax is then computed across
  shards with explicit NDArray traffic: global max, sum of exponentials, ``p = exp(z - max) / sum``;
- the loss is ``mean_b(-log p_target)``; shard ``i`` back-propagates ``(p_i - onehot_i) / B`` into its weights and
  returns a (B, E) embedding gradient; the sum over shards is the backbone's output gradient.

Partial FC (sampled class centres, :mod:`recognition.partial_fc`): ``sample_ratio r < 1`` trains, per shard, the
batch's positive centres plus sampled negatives; ``r = 1`` gives the full result.

Gradients are of the *mean* loss over the global batch, so every optimizer here runs with ``rescale_grad=1``
(insightface's ``SoftmaxOutput(normalization='valid')`` + ``rescale_grad=1/num_devices`` is the same thing).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np

from recognition.common import ToolkitError
from recognition.fc_shard import has_bias, local_labels, make_shard_optimizer, nbytes, shard_names, shard_symbol
from recognition.heads import LossConfig
from recognition.partial_fc import SampledShard

# Re-exported: the shard building blocks and the Partial FC shard used to live here.
__all__ = ["ModelParallelFC", "ModuleShard", "ParallelModule", "SampledShard", "cross_shard_softmax", "has_bias",
           "local_labels", "make_shard_optimizer", "nbytes", "shard_names", "shard_symbol", "split_classes"]

logger = logging.getLogger("recognition")


def split_classes(num_classes: int, num_shards: int) -> List[Tuple[int, int]]:
    """Class ranges ``[(lo, hi), ...]`` of each shard: sizes differ by at most one, later shards smaller.

    E.g. 7 classes on 2 shards -> ``[(0, 4), (4, 7)]``. Raises ToolkitError when a shard would be empty.
    """
    num_classes, num_shards = int(num_classes), int(num_shards)
    if num_shards < 1:
        raise ToolkitError(f"model-parallel fc7: needs at least one device, got {num_shards}")
    if num_classes < num_shards:
        raise ToolkitError(f"--ctx: {num_shards} devices but only {num_classes} classes; model-parallel fc7 needs "
                           f"at least one class per device (use fewer devices)")
    base, extra = divmod(num_classes, num_shards)
    ranges, lo = [], 0
    for i in range(num_shards):
        hi = lo + base + (1 if i < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


def cross_shard_softmax(logits: Sequence[mx.nd.NDArray], labels: Sequence[mx.nd.NDArray], offsets: Sequence[int],
                        ctx: mx.Context) -> Tuple[np.ndarray, np.ndarray, List[mx.nd.NDArray]]:
    """Softmax cross-entropy over class-sharded logits.

    Inputs: ``logits[i]`` (B, C_i) on shard i's device; ``labels[i]`` (B,) local target row or -1 (same device);
    ``offsets[i]`` the first global class (or sampled column index) of shard i; ``ctx`` where the reductions meet.
    Outputs: ``loss`` (B,) numpy ``-log p_target``; ``pred`` (B,) numpy global argmax (offset + local argmax);
    ``grads[i]`` (B, C_i) on shard i's device, the gradient of ``mean_b(loss)`` w.r.t. ``logits[i]``.
    """
    batch = logits[0].shape[0]
    local_max = [z.max(axis=1) for z in logits]
    gmax = mx.nd.max(mx.nd.stack(*[m.as_in_context(ctx) for m in local_max], axis=0), axis=0)  # (B,)
    exps, sums, targets = [], [], []
    for z, lab in zip(logits, labels):
        e = mx.nd.exp(mx.nd.broadcast_sub(z, gmax.as_in_context(z.context).reshape((-1, 1))))
        exps.append(e)
        sums.append(e.sum(axis=1).as_in_context(ctx))
        hit = lab >= 0
        targets.append((mx.nd.pick(z, lab, axis=1) * hit).as_in_context(ctx))
    total = mx.nd.add_n(*sums) if len(sums) > 1 else sums[0]  # (B,)
    target = mx.nd.add_n(*targets) if len(targets) > 1 else targets[0]
    loss = (gmax + mx.nd.log(total) - target).asnumpy()
    grads = []
    for e, lab in zip(exps, labels):
        p = mx.nd.broadcast_div(e, total.as_in_context(e.context).reshape((-1, 1)))
        grads.append((p - mx.nd.one_hot(lab, depth=e.shape[1])) * (1.0 / batch))
    # prediction: the shard with the largest local max wins
    maxes = np.stack([m.asnumpy() for m in local_max])  # (N, B)
    args = np.stack([z.argmax(axis=1).asnumpy().astype(np.int64) + off for z, off in zip(logits, offsets)])
    pred = args[maxes.argmax(axis=0), np.arange(batch)]
    return loss, pred, grads


class ModuleShard:
    """One full fc7 shard as a single-device Module (insightface's ``train_parall`` layout)."""

    def __init__(self, index: int, lo: int, hi: int, emb_size: int, batch_size: int, loss_cfg: LossConfig,
                 ctx: mx.Context, fc7_name: str = "fc7"):
        self.index, self.lo, self.hi, self.ctx = index, lo, hi, ctx
        self.names = shard_names(fc7_name, index, has_bias(loss_cfg))
        self.symbol = shard_symbol(hi - lo, emb_size, loss_cfg, self.names)
        # heads without a margin (softmax, nsoftmax) do not read the label
        self.uses_label = "local_label" in self.symbol.list_arguments()
        label_names = ["local_label"] if self.uses_label else []
        self.module = mx.mod.Module(self.symbol, data_names=["data"], label_names=label_names, context=ctx,
                                    logger=logger)
        self.module.bind(data_shapes=[("data", (batch_size, emb_size))],
                         label_shapes=[("local_label", (batch_size,))] if self.uses_label else None,
                         for_training=True, inputs_need_grad=True)

    def set_rows(self, weight: mx.nd.NDArray, bias: Optional[mx.nd.NDArray] = None) -> None:
        """Load this shard's rows: ``weight`` (rows, E), ``bias`` (rows,)."""
        arg = {self.names[0]: weight}
        if len(self.names) > 1:
            arg[self.names[1]] = bias if bias is not None else mx.nd.zeros((self.hi - self.lo,))
        self.module.init_params(arg_params=arg, aux_params={}, allow_missing=False, force_init=True)

    def init_optimizer(self, optimizer: str, optimizer_params: dict) -> None:
        opt = make_shard_optimizer(optimizer, optimizer_params, self.symbol, self.names)
        with warnings.catch_warnings():  # Module expects rescale_grad = 1/batch; ours is 1 by design (see top)
            warnings.simplefilter("ignore")
            self.module.init_optimizer(kvstore=None, optimizer=opt, force_init=True)

    def forward(self, emb: mx.nd.NDArray, labels: np.ndarray) -> Tuple[mx.nd.NDArray, mx.nd.NDArray]:
        """(B, E) embeddings, (B,) global labels -> ((B, rows) logits, (B,) local labels), on this device."""
        lab = mx.nd.array(local_labels(labels, self.lo, self.hi), ctx=self.ctx)
        batch = mx.io.DataBatch(data=[emb.as_in_context(self.ctx)], label=[lab] if self.uses_label else None)
        self.module.forward(batch, is_train=True)
        return self.module.get_outputs()[0], lab

    def backward(self, out_grad: mx.nd.NDArray) -> mx.nd.NDArray:
        """(B, rows) logit gradient -> (B, E) embedding gradient (this shard's share)."""
        self.module.backward(out_grads=[out_grad])
        return self.module.get_input_grads()[0]

    def update(self) -> None:
        self.module.update()

    def get_rows(self) -> List[mx.nd.NDArray]:
        arg, _ = self.module.get_params()
        return [arg[n] for n in self.names]

    def get_state(self, j: int) -> Optional[mx.nd.NDArray]:
        """Optimizer state (momentum) of parameter ``j`` (0 weight, 1 bias), None before the first update."""
        upd = self.module._updater
        state = upd.states.get(j) if upd is not None else None
        return state if isinstance(state, mx.nd.NDArray) else None

    def set_state(self, j: int, state: mx.nd.NDArray) -> None:
        upd = self.module._updater
        upd.states[j] = state.as_in_context(self.ctx).copy()
        upd.states_synced[j] = True

    def memory_bytes(self) -> int:
        """Bytes of weights, gradients, outputs and optimizer states this shard holds (MXNet workspace excluded)."""
        exe = self.module._exec_group.execs[0]
        states = getattr(self.module._updater, "states", {}) if self.module._updater else {}
        return nbytes(list(exe.arg_dict.values()) + [g for g in exe.grad_arrays if g is not None] + exe.outputs
                       + [s for s in states.values() if isinstance(s, mx.nd.NDArray)])


class ModelParallelFC:
    """fc7 split by class over ``contexts``; the margin softmax computed across shards.

    ``forward_backward(emb (B, E), labels (B,))`` returns per-sample losses, predictions and the (B, E) gradient
    of the mean loss w.r.t. the embeddings; ``update()`` steps every shard. ``sample_ratio < 1`` (or
    ``sampled=True``) uses :class:`SampledShard` (Partial FC), otherwise :class:`ModuleShard`.
    """

    def __init__(self, num_classes: int, emb_size: int, loss_cfg: LossConfig, contexts: Sequence[mx.Context],
                 batch_size: int, sample_ratio: float = 1.0, fc7_name: str = "fc7", seed: int = 0,
                 sampled: Optional[bool] = None):
        if not 0.0 < float(sample_ratio) <= 1.0:
            raise ToolkitError(f"--sample-ratio: must be in (0, 1], got {sample_ratio}")
        if loss_cfg.center_loss_weight > 0:
            raise ToolkitError("--center-loss-weight: not supported with the model-parallel fc7 (train_parall.py)")
        self.num_classes, self.emb_size, self.loss_cfg = int(num_classes), int(emb_size), loss_cfg
        self.contexts, self.batch_size, self.fc7_name = list(contexts), int(batch_size), fc7_name
        self.ranges = split_classes(num_classes, len(self.contexts))
        self.sampled = sample_ratio < 1.0 if sampled is None else bool(sampled)
        self.with_bias = has_bias(loss_cfg)
        rng = np.random.RandomState(seed)
        self.shards = []
        for i, ((lo, hi), ctx) in enumerate(zip(self.ranges, self.contexts)):
            if self.sampled:
                self.shards.append(SampledShard(i, lo, hi, emb_size, batch_size, loss_cfg, ctx, sample_ratio, rng,
                                                fc7_name))
            else:
                self.shards.append(ModuleShard(i, lo, hi, emb_size, batch_size, loss_cfg, ctx, fc7_name))

    @property
    def param_names(self) -> List[str]:
        """Names of the full fc7 parameters, as build_train_symbol names them."""
        return [f"{self.fc7_name}_weight"] + ([f"{self.fc7_name}_bias"] if self.with_bias else [])

    def init_params(self, fc7: Optional[Dict[str, mx.nd.NDArray]] = None, seed: int = 0) -> None:
        """Split a full fc7 (``{'fc7_weight': (C, E)[, 'fc7_bias': (C,)]}``) into the shards, or initialise new
        rows as heads.build_train_symbol would (Normal(0.01) for normalised heads, Xavier-like for softmax)."""
        weight = (fc7 or {}).get(self.param_names[0])
        if weight is not None and tuple(weight.shape) != (self.num_classes, self.emb_size):
            raise ToolkitError(f"fc7: {self.param_names[0]} has shape {tuple(weight.shape)}, expected "
                               f"({self.num_classes}, {self.emb_size}) for the data's classes and embedding")
        bias = (fc7 or {}).get(self.param_names[1]) if self.with_bias else None
        if weight is None:
            rng = np.random.RandomState(seed)
            scale = 0.01 if self.loss_cfg.loss != "softmax" else math.sqrt(3.0 / self.emb_size)
            init = rng.normal(0, scale, (self.num_classes, self.emb_size)) if self.loss_cfg.loss != "softmax" \
                else rng.uniform(-scale, scale, (self.num_classes, self.emb_size))
            weight = mx.nd.array(init.astype(np.float32))
        if self.with_bias and bias is None:
            bias = mx.nd.zeros((self.num_classes,))
        for shard, (lo, hi) in zip(self.shards, self.ranges):
            shard.set_rows(weight[lo:hi].as_in_context(shard.ctx),
                           bias[lo:hi].as_in_context(shard.ctx) if bias is not None else None)

    def init_optimizer(self, optimizer: str = "sgd", optimizer_params: Optional[dict] = None) -> None:
        """One optimizer per shard (``rescale_grad`` forced to 1: the gradients are of the mean loss)."""
        for shard in self.shards:
            shard.init_optimizer(optimizer, dict(optimizer_params or {}))

    def forward_backward(self, emb: mx.nd.NDArray, labels) -> Tuple[np.ndarray, np.ndarray, mx.nd.NDArray]:
        """(B, E) embeddings and (B,) class ids -> (loss (B,), pred (B,), (B, E) gradient on ``emb``'s device)."""
        labels = np.asarray(labels.asnumpy() if isinstance(labels, mx.nd.NDArray) else labels)
        outs = [shard.forward(emb, labels) for shard in self.shards]
        offsets = [0] * len(self.shards) if self.sampled else [lo for lo, _ in self.ranges]
        loss, pred, grads = cross_shard_softmax([o[0] for o in outs], [o[1] for o in outs], offsets, emb.context)
        if self.sampled:  # predictions over sampled columns -> class ids
            pred = self._sampled_pred(outs)
        emb_grads = [shard.backward(g).as_in_context(emb.context) for shard, g in zip(self.shards, grads)]
        return loss, pred, (mx.nd.add_n(*emb_grads) if len(emb_grads) > 1 else emb_grads[0])

    def _sampled_pred(self, outs) -> np.ndarray:
        best = np.full(self.batch_size, -np.inf)
        pred = np.zeros(self.batch_size, dtype=np.int64)
        for shard, (z, _) in zip(self.shards, outs):
            z = z.asnumpy()
            arg = z.argmax(axis=1)
            val = z[np.arange(len(arg)), arg]
            better = val > best
            best[better] = val[better]
            pred[better] = shard.lo + shard.sampled[arg[better]]
        return pred

    def update(self) -> None:
        for shard in self.shards:
            shard.update()

    def get_fc7(self) -> Dict[str, mx.nd.NDArray]:
        """The full fc7 reassembled on the CPU: ``{'fc7_weight': (C, E)[, 'fc7_bias': (C,)]}``."""
        rows = [shard.get_rows() for shard in self.shards]
        return {name: mx.nd.concat(*[r[j].as_in_context(mx.cpu()) for r in rows], dim=0)
                for j, name in enumerate(self.param_names)}

    def get_states(self) -> Dict[str, mx.nd.NDArray]:
        """Optimizer states (momentum) reassembled per full parameter name (CPU); parameters without one left out."""
        out = {}
        for j, name in enumerate(self.param_names):
            states = [shard.get_state(j) for shard in self.shards]
            if all(st is not None for st in states):
                out[name] = mx.nd.concat(*[st.as_in_context(mx.cpu()) for st in states], dim=0)
        return out

    def set_states(self, states: Dict[str, mx.nd.NDArray]) -> int:
        """Split full-size states (``{'fc7_weight': (C, E)}``) into the shards; returns how many were set."""
        count = 0
        for j, name in enumerate(self.param_names):
            state = states.get(name)
            if not isinstance(state, mx.nd.NDArray) or state.shape[0] != self.num_classes:
                continue
            for shard, (lo, hi) in zip(self.shards, self.ranges):
                shard.set_state(j, state[lo:hi])
            count += 1
        return count

    def memory_bytes(self) -> List[int]:
        """Per device: bytes of the fc7 arrays held (weights, gradients, logits, optimizer states)."""
        return [shard.memory_bytes() for shard in self.shards]


class ParallelModule:
    """Backbone data-parallel over ``contexts`` + fc7 model-parallel over the same devices.

    ``embedding``: Symbol (B, E) (``fc1_output``), input ``data`` (B, 3, H, W). One training step is
    ``forward_backward(batch)`` then ``update()``; :meth:`get_params` returns the backbone parameters plus the full
    fc7 under its single-device name (``fc7_weight``), so checkpoints load in train.py and vice versa.
    """

    def __init__(self, embedding: mx.sym.Symbol, num_classes: int, loss_cfg: LossConfig,
                 contexts: Sequence[mx.Context], batch_size: int, data_shape: Tuple[int, ...] = (3, 112, 112),
                 emb_size: Optional[int] = None, sample_ratio: float = 1.0, fc7_name: str = "fc7",
                 fixed_param_names: Optional[Sequence[str]] = None, seed: int = 0, sampled: Optional[bool] = None):
        from recognition.heads import infer_emb_size

        self.contexts, self.batch_size = list(contexts), int(batch_size)
        if self.batch_size < len(self.contexts):
            raise ToolkitError(f"batch size {batch_size} is smaller than the number of devices ({len(contexts)})")
        self.emb_size = int(emb_size or infer_emb_size(embedding))
        self.backbone = mx.mod.Module(embedding, data_names=["data"], label_names=None, context=self.contexts,
                                      fixed_param_names=list(fixed_param_names or []), logger=logger)
        self.backbone.bind(data_shapes=[("data", (self.batch_size,) + tuple(data_shape))], for_training=True)
        self.fc = ModelParallelFC(num_classes, self.emb_size, loss_cfg, self.contexts, self.batch_size,
                                  sample_ratio=sample_ratio, fc7_name=fc7_name, seed=seed, sampled=sampled)

    def init_params(self, arg_params: Optional[dict] = None, aux_params: Optional[dict] = None,
                    fc7: Optional[dict] = None, initializer=None, allow_missing: bool = True, seed: int = 0) -> None:
        """Backbone from ``arg_params``/``aux_params`` (extra keys such as fc7 ignored), the rest from
        ``initializer``; fc7 split from ``fc7`` (full arrays) or freshly initialised."""
        self.backbone.init_params(initializer=initializer or mx.init.Xavier(rnd_type="gaussian", factor_type="out",
                                                                            magnitude=2),
                                  arg_params=arg_params, aux_params=aux_params, allow_missing=allow_missing,
                                  allow_extra=True, force_init=True)
        self.fc.init_params(fc7, seed=seed)

    def init_optimizer(self, kvstore: str = "device", optimizer: str = "sgd", optimizer_params: Optional[dict] = None,
                       fc7_optimizer_params: Optional[dict] = None) -> None:
        """Backbone optimizer through ``kvstore`` (summing the per-device gradients), one per fc7 shard."""
        params = dict(optimizer_params or {})
        params["rescale_grad"] = 1.0  # out_grads are already of the mean loss over the global batch
        if isinstance(optimizer, mx.optimizer.Optimizer):  # e.g. with per-parameter multipliers set by the trainer
            optimizer.rescale_grad = 1.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.backbone.init_optimizer(kvstore=kvstore, optimizer=optimizer, force_init=True)
            name = type(optimizer).__name__.lower()
        else:
            self.backbone.init_optimizer(kvstore=kvstore, optimizer=optimizer, optimizer_params=params,
                                         force_init=True)
            name = optimizer
        self.fc.init_optimizer(name, dict(fc7_optimizer_params or params))

    def set_lr(self, lr: float) -> None:
        """Learning rate of the backbone and every fc7 shard (their multipliers apply on top)."""
        self.backbone._optimizer.lr = lr
        for shard in self.fc.shards:
            opt = shard.optimizer if isinstance(shard, SampledShard) else shard.module._optimizer
            opt.lr = lr

    def set_params(self, arg_params: dict, aux_params: dict, allow_missing: bool = False,
                   allow_extra: bool = True) -> None:
        """Backbone parameters and the full fc7 (split into the shards) from one dict, as Module.set_params."""
        self.backbone.set_params(arg_params, aux_params, allow_missing=allow_missing, allow_extra=True)
        fc7 = {k: v for k, v in arg_params.items() if k in self.fc.param_names}
        if fc7:
            for shard, (lo, hi) in zip(self.fc.shards, self.fc.ranges):
                rows = [fc7[n][lo:hi].as_in_context(shard.ctx) for n in self.fc.param_names if n in fc7]
                shard.set_rows(*rows)

    def forward_backward(self, batch: mx.io.DataBatch) -> Tuple[np.ndarray, np.ndarray]:
        """``batch.data[0]`` (B, 3, H, W), ``batch.label[0]`` (B,) -> per-sample loss (B,), prediction (B,)."""
        self.backbone.forward(mx.io.DataBatch(data=[batch.data[0]]), is_train=True)
        emb = self.backbone.get_outputs(merge_multi_context=True)[0]
        loss, pred, grad = self.fc.forward_backward(emb, batch.label[0])
        self.backbone.backward(out_grads=[grad])
        self.last_loss, self.last_pred = loss, pred
        return loss, pred

    def update(self) -> None:
        self.backbone.update()
        self.fc.update()

    def get_params(self) -> Tuple[Dict[str, mx.nd.NDArray], Dict[str, mx.nd.NDArray]]:
        """``(arg_params, aux_params)`` on the CPU: backbone + the full fc7 (``fc7_weight`` (C, E), ...)."""
        arg, aux = self.backbone.get_params()
        arg = dict(arg)
        arg.update(self.fc.get_fc7())
        return arg, dict(aux)
