"""What a training run is, settled before any compute: :func:`prepare_run` and the learning-rate schedule.

:func:`prepare_run` checks everything a run needs (devices, kvstore, loss, data and classes, targets, checkpoint
or resume state, stages, lr steps, checkpoint policy) and returns the plan :class:`recognition.trainer.Trainer`
runs; every bad flag or missing file ends here in one line, before a graph is built.
"""
from __future__ import annotations

import logging
import os
from typing import List

from easydict import EasyDict as edict

from recognition import callbacks as cb
from recognition.args import check_positive
from recognition.common import ToolkitError, parse_ctx, parse_prefix_epoch
from recognition.launch import check_kvstore
from recognition.objectives import prepare_objective

logger = logging.getLogger("recognition")


def _parse_lr_steps(text) -> List[int]:
    if text in (None, "", []):
        return []
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text).split(",") if t.strip()]
    try:
        steps = sorted(int(t) for t in items)
    except ValueError:
        raise ToolkitError(f"--lr-steps {text!r}: expected comma-separated batch counts, e.g. 100000,160000") \
            from None
    if any(s <= 0 for s in steps):
        raise ToolkitError(f"--lr-steps {text!r}: steps must be positive")
    return steps


def _resolve_data_dir(cfg) -> str:
    if cfg.get("data_dir"):
        d = cfg.data_dir
    elif cfg.dataset and os.path.isdir(str(cfg.dataset)):
        d = cfg.dataset
    elif cfg.get("dataset_path"):
        d = cfg.dataset_path
    else:
        from recognition.train_config import dataset as known

        raise ToolkitError(f"--dataset {cfg.dataset!r}: not a dataset name ({', '.join(known)}) nor a folder; "
                           "give --data-dir DIR")
    if not os.path.isfile(os.path.join(d, "train.rec")):
        raise ToolkitError(f"--data-dir {d}: {os.path.join(d, 'train.rec')} does not exist")
    return d


def _resolve_targets(cfg, data_dir: str) -> List[str]:
    """``--target lfw,cfp_fp`` -> paths; an explicit target must exist, a dataset default is skipped with a warning."""
    explicit = cfg.get("target") is not None
    raw = cfg.target if explicit else cfg.get("val_targets") or []
    names = [t.strip() for t in (raw.split(",") if isinstance(raw, str) else raw) if t and t.strip()]
    paths = []
    for name in names:
        path = name if (name.endswith(".bin") or os.sep in name) else os.path.join(data_dir, name + ".bin")
        if os.path.isfile(path):
            paths.append(path)
        elif explicit:
            raise ToolkitError(f"--target {name}: verification set {path} does not exist")
        else:
            logger.warning("dataset target %s: %s does not exist; skipped", name, path)
    return paths


def prepare_run(cfg) -> edict:
    """Validate ``cfg`` (flat config from :func:`recognition.train_config.resolve_config`) before any compute.

    Returns a plan: ``ctx``, ``data_dir``, ``num_classes``, ``targets``, ``pretrained`` (``PREFIX,EPOCH`` or
    None), ``resume`` (state dict or None), ``stages``, ``lr_steps``, ``loss_cfg``, ``prefix``, ``run_dir``,
    ``batch_size``, ``max_total`` (last step or None).
    """
    from recognition.freeze import parse_stages
    from recognition.rec import read_property

    plan = edict()
    plan.ctx = parse_ctx(cfg.get("ctx"))
    plan.kvstore = check_kvstore(cfg.get("kvstore") or "device")
    check_positive(cfg, ["per_batch_size", "frequent", "verbose", "end_epoch"])
    if cfg.lr is None or cfg.lr < 0:
        raise ToolkitError(f"--lr: must be >= 0, got {cfg.lr}")
    # the loss and its add-ons (offline mining, distillation): every objective flag checked, the teacher loaded
    plan.objective = prepare_objective(cfg, plan.ctx, plan.kvstore, int(cfg.per_batch_size),
                                       (3,) + tuple(cfg.image_size))
    plan.loss_cfg = plan.objective.loss_cfg
    plan.resume = cb.read_resume_state(cfg.resume) if cfg.get("resume") else None
    plan.pretrained = None
    if cfg.get("pretrained") and not plan.resume:
        spec = str(cfg.pretrained)
        if "," not in spec and not spec.endswith(".params") and cfg.get("pretrained_epoch") is not None:
            spec = f"{spec},{int(cfg.pretrained_epoch)}"
        prefix, epoch = parse_prefix_epoch(spec, "--pretrained")
        plan.pretrained = f"{prefix},{epoch}"
    if not plan.pretrained and not plan.resume:
        from recognition.backbones import default_emb_size

        default_emb_size(cfg.network)  # unknown network: one line listing the valid names
    plan.data_dir = _resolve_data_dir(cfg)
    plan.num_classes = int(read_property(plan.data_dir)[0])
    if cfg.get("num_classes") and int(cfg.num_classes) != plan.num_classes:
        raise ToolkitError(f"--dataset {cfg.dataset}: the configuration says num_classes={cfg.num_classes} but "
                           f"{os.path.join(plan.data_dir, 'property')} says {plan.num_classes}")
    plan.targets = _resolve_targets(cfg, plan.data_dir)
    plan.stages = parse_stages(int(cfg.get("freeze_steps") or 0), cfg.get("stages"), cfg.get("head_lr_mult"))
    plan.lr_steps = _parse_lr_steps(cfg.lr_steps)
    if int(cfg.get("stage_warmup") or 0) < 0:
        raise ToolkitError(f"--stage-warmup {cfg.stage_warmup}: must be >= 0")
    if cfg.fc7_init not in ("random", "imprint"):
        raise ToolkitError(f"--fc7-init {cfg.fc7_init!r}: choose random or imprint")
    if cfg.ckpt not in (0, 1, 2, 3):
        raise ToolkitError(f"--ckpt {cfg.ckpt}: choose 0, 1, 2 or 3")
    if int(cfg.get("keep") or 0) < 0:
        raise ToolkitError(f"--keep {cfg.keep}: must be >= 0 (0 keeps every checkpoint)")
    plan.objective.check_batch(int(cfg.per_batch_size))
    plan.batch_size = int(cfg.per_batch_size) * len(plan.ctx)
    totals = [int(cfg.max_steps)] if cfg.get("max_steps") else []
    if plan.stages[-1].steps is not None:
        totals.append(sum(s.steps for s in plan.stages))
    plan.max_total = min(totals) if totals else None
    if cfg.get("prefix"):
        plan.prefix = cfg.prefix
    else:
        net = cfg.network if (cfg.get("network_explicit") or not plan.pretrained) else \
            os.path.basename(os.path.dirname(os.path.abspath(plan.pretrained.rpartition(",")[0]))) or "pretrained"
        ds = os.path.basename(os.path.normpath(str(cfg.dataset))) if cfg.dataset else "data"
        plan.prefix = os.path.join(cfg.models_root, f"{net}-{cfg.loss}-{ds}", "model")
    plan.run_dir = os.path.dirname(os.path.abspath(plan.prefix))
    return plan


def lr_at(step: int, base_lr: float, lr_steps: List[int], warmup_steps: int = 0) -> float:
    """Learning rate of update number ``step`` (0-based): x0.1 after each of ``lr_steps`` updates (insightface),
    times a linear warm-up ``(step + 1) / warmup_steps`` during the first ``warmup_steps`` updates."""
    lr = base_lr * (0.1 ** sum(1 for s in lr_steps if step >= s))
    if warmup_steps and step < warmup_steps:
        lr *= (step + 1) / float(warmup_steps)
    return lr


def scheduled_lr(step: int, cfg, plan) -> float:
    """The lr of update ``step`` (0-based): :func:`lr_at` times the active stage's factor (``NAME:N@F``), times a
    linear ramp ``(k + 1) / N`` over the first ``N = --stage-warmup`` updates ``k`` of every stage after the first.

    Without the ramp, unfreezing the backbone jumps from the head stage's lr to the full lr in one step (in the
    demo's fine-tune the loss rose from ~6 to ~9 and B_val dipped 0.7475 -> 0.695 ten steps later). Measured with
    ``--stage-warmup 40`` on that run: no dip ten steps in (0.76), but a dip when the ramp reaches the full lr
    (0.7375 at step 80) and the same end result within fold noise (0.8125 vs 0.82): the size of the lr, not its
    jump, is what costs there. A pure function of the step and the saved configuration (resume-exact).
    """
    from recognition.freeze import stage_at

    idx, stage = stage_at(plan.stages, step)
    lr = stage.lr_mult * lr_at(step, float(cfg.lr), plan.lr_steps, int(cfg.warmup_steps or 0))
    ramp = int(cfg.get("stage_warmup") or 0)
    if ramp and idx > 0:
        into = step - sum(s.steps for s in plan.stages[:idx])
        if into < ramp:
            lr *= (into + 1) / float(ramp)
    return lr


__all__ = ["prepare_run", "lr_at", "scheduled_lr"]
