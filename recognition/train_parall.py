"""Train with the classifier split across devices (model-parallel fc7) and optional Partial FC.

Same flags as ``train.py`` (the shared ``recognition.args`` groups) plus ``--sample-ratio``. The backbone runs
data-parallel over ``--ctx``; fc7 is split by class across the same devices (:mod:`recognition.parallel_fc`).
Checkpoints hold the full ``fc7_weight`` under its usual name, so they load in ``train.py`` and back.

Examples::

    python recognition/train_parall.py --network r100 --loss arcface --dataset emore --ctx gpu:0,gpu:1
    python recognition/train_parall.py --network tiny --data-dir data/synth_A --ctx cpu:0,cpu:1 --sample-ratio 0.3

Multi-machine training uses ``train.py`` with ``--kvstore dist_sync`` under ``python -m recognition.launch``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import mxnet as mx

from recognition.common import ToolkitError, run_cli
from recognition.parallel_fc import ParallelModule
from recognition.resume_state import get_optimizer_states, set_optimizer_states
from recognition.trainer import Trainer, prepare_run

logger = logging.getLogger("recognition")

LOCAL_KVSTORES = ("device", "local")


def build_argparser() -> argparse.ArgumentParser:
    """train.py's parser plus the model-parallel group."""
    from recognition.train import build_argparser as train_parser

    parser = train_parser(prog="train_parall.py")
    parser.description = (__doc__ or "").split("\n\n")[0]
    g = parser.add_argument_group("model parallel")
    g.add_argument("--sample-ratio", type=float, default=None,
                   help="Partial FC: fraction of each shard's classes used per step (positives always), 0 < r <= 1")
    g.add_argument("--extra-model-name", default=None,
                   help="insightface's: runs go to MODELS_ROOT/NETWORK-LOSS-DATASET-NAME/model")
    for flag, (kind, _) in REFUSED_PARALL_FLAGS.items():
        g.add_argument(flag, type=kind, default=None, help="insightface's; not built here (one-line refusal)")
    return parser


# insightface recognition/train_parall.py flags not built here: flag -> (type, why and what to use)
REFUSED_PARALL_FLAGS = {
    "--worker-id": (int, "train_parall.py here splits fc7 over this machine's devices only; for several machines "
                         "run python -m recognition.launch -- python recognition/train.py --kvstore dist_sync "
                         "(the launcher numbers the workers)"),
    "--fp16-scale": (float, "mixed precision is not built here (training runs in float32); drop the flag"),
}


def check_parall_flags(args: argparse.Namespace) -> None:
    """One line for a refused insightface train_parall.py flag (:data:`REFUSED_PARALL_FLAGS`)."""
    for flag, (_, why) in REFUSED_PARALL_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            raise ToolkitError(f"{flag} {value}: {why}")


def check_parallel_config(cfg) -> None:
    """One-line errors for what the model-parallel trainer cannot do."""
    ratio = cfg.get("sample_ratio")
    if ratio is not None and not 0.0 < float(ratio) <= 1.0:
        raise ToolkitError(f"--sample-ratio: must be in (0, 1], got {ratio}")
    kv = cfg.get("kvstore") or "device"
    if kv not in LOCAL_KVSTORES:
        if str(kv).startswith("dist"):
            raise ToolkitError(f"--kvstore {kv}: train_parall.py splits fc7 over this machine's devices only; for "
                               f"several machines run train.py --kvstore {kv} under python -m recognition.launch")
        raise ToolkitError(f"--kvstore {kv}: unknown kvstore; train_parall.py accepts {', '.join(LOCAL_KVSTORES)}")


class _LR:
    """``opt.lr = x`` as the trainer writes it, forwarded to the backbone's and every shard's optimizer."""

    def __init__(self, pmod):
        object.__setattr__(self, "_pmod", pmod)

    def __setattr__(self, key, value):
        if key != "lr":
            raise AttributeError(key)
        self._pmod.set_lr(value)


class ParallelTrainer(Trainer):
    """:class:`recognition.trainer.Trainer` with its Module replaced by a :class:`ParallelModule`.

    It plugs into the trainer's hooks (``_make_module``, ``_batch_metrics``, ``optimizer_states``,
    ``load_optimizer_states``); everything else (data, stages, verification, ``--ckpt``, checkpoints, resume
    state, metrics) is the trainer's; the ParallelModule answers ``forward_backward``/``update``/``get_params``/
    ``set_params`` like a Module, with the full fc7 under its own name.
    """

    def _make_module(self, stage_idx: int, arg: dict, aux: dict):
        from recognition.freeze import freeze_batchnorm, param_multipliers, stage_plan

        plan = self.plan
        stage = plan.stages[stage_idx]
        fixed, frozen_bn = stage_plan(self.embedding_symbol, stage, self.stage_table, plan.frozen_stages,
                                      self.fc7_name, plan.bn_mode)
        embedding = freeze_batchnorm(self.embedding_symbol, frozen_bn)
        ratio = plan.sample_ratio
        pmod = ParallelModule(embedding, plan.num_classes, plan.loss_cfg, self.ctx, plan.batch_size,
                                  data_shape=plan.data_shape, sample_ratio=ratio,
                                  fc7_name=self.fc7_name, fixed_param_names=fixed, seed=plan.seed)
        arg, aux = self._complete_params(arg, aux)
        fc7 = {k: v for k, v in arg.items() if k in pmod.fc.param_names}
        pmod.init_params(arg_params=arg or None, aux_params=aux or None, fc7=fc7 or None,
                         seed=plan.seed)
        opt = mx.optimizer.SGD(learning_rate=plan.lr, momentum=plan.mom, wd=plan.wd, rescale_grad=1.0)
        wanted = [n for n in embedding.list_arguments() if n != "data"]
        lr_mult, wd_mult = param_multipliers(wanted, self.fc7_name, plan.fc7_lr_mult, plan.fc7_wd_mult,
                                             plan.backbone_lr_mult, plan.bn_wd,
                                             attr_dict=embedding.attr_dict())
        opt.set_lr_mult(lr_mult)
        opt.set_wd_mult(wd_mult)
        # fc7 shards: lr/wd multipliers come from loss_cfg (the shard graphs carry them as attributes)
        pmod.init_optimizer(kvstore=plan.kvstore, optimizer=opt,
                            fc7_optimizer_params=dict(learning_rate=plan.lr, momentum=plan.mom, wd=plan.wd))
        self.trained = (set(wanted) - set(fixed)) | set(pmod.fc.param_names)
        logger.info("stage %s: %d backbone parameters train, %d fixed, %d BatchNorms frozen; fc7 %s over %d "
                    "device(s)%s", stage.name, len(set(wanted) - set(fixed)), len(fixed), len(frozen_bn),
                    "x".join(map(str, (plan.num_classes, pmod.emb_size))), len(self.ctx),
                    f", sample ratio {ratio:g}" if ratio < 1 else "")
        return pmod, _LR(pmod)

    def _complete_params(self, arg: dict, aux: dict):
        """Initialise what ``arg``/``aux`` lack exactly as train.py's Module would (same initializer, same
        parameter order, so the same random draws): a fresh run starts from the same weights in both scripts.
        The full fc7 is materialised once on the CPU for this; it is split right after."""
        names = [n for n in self.train_symbol.list_arguments() if n not in ("data", "softmax_label")]
        if all(n in arg for n in names) and all(n in aux for n in self.train_symbol.list_auxiliary_states()):
            return arg, aux
        shape = (self.plan.batch_size, 3) + self.plan.image_size
        mod = mx.mod.Module(self.train_symbol, data_names=["data"], label_names=["softmax_label"],
                            context=mx.cpu())
        mod.bind(data_shapes=[("data", shape)], label_shapes=[("softmax_label", shape[:1])], for_training=False)
        init = mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2)
        mod.init_params(init, arg_params=arg or None, aux_params=aux or None, allow_missing=True, allow_extra=True)
        full_arg, full_aux = mod.get_params()
        return dict(full_arg), dict(full_aux)

    def optimizer_states(self) -> dict:
        """Trainer hook: the backbone's states and fc7's, reassembled under ``fc7_weight`` (so a resume state
        moves between train.py and this script)."""
        states = dict(get_optimizer_states(self.module.backbone) or {})
        states.update(self.module.fc.get_states())
        return states

    def load_optimizer_states(self, states: dict, names: set) -> None:
        """Trainer hook: install ``{param_name: state}`` into the backbone and the fc7 shards."""
        chosen = {k: v for k, v in states.items() if k in names}
        set_optimizer_states(self.module.backbone, chosen)
        self.module.fc.set_states(chosen)

    def _batch_metrics(self, batch):
        label = batch.label[0].asnumpy().astype("int64")
        loss = float(self.module.last_loss.mean())
        acc = float((self.module.last_pred == label).mean())
        return loss, acc, {}


def parall_config(argv: Optional[Sequence[str]] = None):
    """The flat run configuration of train_parall.py's ``argv`` (refused insightface flags: one line)."""
    from recognition.train import config_from_args

    args = build_argparser().parse_args(argv)
    check_parall_flags(args)
    return config_from_args(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from recognition.heads import CLASSIFICATION_LOSSES
    from recognition.train import report

    cfg = parall_config(argv)
    check_parallel_config(cfg)
    if cfg.loss not in CLASSIFICATION_LOSSES:
        raise ToolkitError(f"--loss {cfg.loss}: train_parall.py needs a classification loss "
                           f"({', '.join(CLASSIFICATION_LOSSES)}); use train.py for triplet losses")
    plan = prepare_run(cfg)
    from recognition.parallel_fc import split_classes

    split_classes(plan.num_classes, len(plan.ctx))  # more devices than classes: fail before building anything
    report(ParallelTrainer(cfg, plan).fit())
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
