"""What a training run is, settled before any compute: :func:`prepare_run` and the learning-rate schedule.

:func:`prepare_run` checks everything a run needs (devices, kvstore, loss, data and classes, targets, checkpoint
or resume state, stages, lr steps, checkpoint policy) and returns the plan :class:`recognition.trainer.Trainer`
runs; every bad flag or missing file ends here in one line, before a graph is built.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from recognition.common import ToolkitError, parse_ctx, parse_prefix_epoch
from recognition.launch import check_kvstore
from recognition.objectives import RunObjective, prepare_objective
from recognition.resume_state import read_resume_state

logger = logging.getLogger("recognition")


# Numeric flags checked before anything is written: key -> (integer?, lowest, lowest allowed?, highest, highest
# allowed?, note). None: unbounded. Margins and loss multipliers are checked with the loss
# (recognition.objectives.validate_loss_config); --freeze-steps, --head-lr-mult, --mining-interval where they are
# parsed.
_NUMBERS = {
    "lr": (False, 0, True, None, False, ""), "wd": (False, 0, True, None, False, ""),
    "mom": (False, 0, True, 1, False, ""),
    "fc7_lr_mult": (False, 0, True, None, False, ""), "fc7_wd_mult": (False, 0, True, None, False, ""),
    "backbone_lr_mult": (False, 0, True, None, False, ""), "data_color": (False, 0, True, None, False, ""),
    "distill_weight": (False, 0, True, None, False, ""), "sample_ratio": (False, 0, False, 1, True, ""),
    "per_batch_size": (True, 0, False, None, False, ""), "frequent": (True, 0, False, None, False, ""),
    "verbose": (True, 0, False, None, False, ""), "end_epoch": (True, 0, False, None, False, ""),
    "emb_size": (True, 0, False, None, False, ""),
    "max_steps": (True, 0, True, None, False, " (0: run to --end-epoch)"),
    "warmup_steps": (True, 0, True, None, False, ""), "stage_warmup": (True, 0, True, None, False, ""),
    "keep": (True, 0, True, None, False, " (0 keeps every checkpoint)"),
    "num_workers": (True, 0, True, None, False, ""), "frozen_stages": (True, 0, True, None, False, ""),
    "data_cutoff": (True, 0, True, None, False, ""), "data_images_filter": (True, 0, True, None, False, ""),
    "pretrained_epoch": (True, 0, True, None, False, ""), "bag_identities": (True, 2, True, None, False, ""),
    "seed": (True, 0, True, 2 ** 32 - 1, True, ""), "lr_steps_batch": (True, 0, False, None, False, ""),
    "bn_mom": (False, 0, True, 1, True, ""),
}


def _verify_backend(cfg) -> str:
    from recognition.verification import BACKENDS

    value = str(cfg.get("verify_backend") or "auto")
    if value not in BACKENDS:
        raise ToolkitError(f"--verify-backend {value!r}: choose one of {', '.join(BACKENDS)}")
    return value


def _range_text(low, low_ok: bool, high, high_ok: bool) -> str:
    if high is None:
        return f"{'>=' if low_ok else '>'} {low}"
    return f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"


def check_numbers(cfg) -> None:
    """One-line :class:`ToolkitError` for a numeric flag of the wrong type, not finite (``--lr nan``, ``--wd inf``)
    or out of range (``--mom 1.5``, ``--max-steps -3``); unset (None) flags are skipped."""
    for key, (integer, low, low_ok, high, high_ok, note) in _NUMBERS.items():
        value = cfg.get(key)
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        wanted = _range_text(low, low_ok, high, high_ok)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or (integer and not float(value).is_integer()):
            raise ToolkitError(f"{flag} {value!r}: must be {'an integer' if integer else 'a finite number'} {wanted}")
        if not ((value >= low if low_ok else value > low) and
                (high is None or (value <= high if high_ok else value < high))):
            raise ToolkitError(f"{flag} {value}: must be {wanted}{note}")


def check_positive(cfg, keys: Sequence[str]) -> None:
    """Raise a one-line error for a non-positive integer flag (``--per-batch-size 0`` ...)."""
    for key in keys:
        value = cfg.get(key)
        if value is not None and not value > 0:
            raise ToolkitError(f"--{key.replace('_', '-')}: must be > 0, got {value}")


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


def _scale_lr_steps(steps: List[int], base_batch, batch_size: int) -> List[int]:
    """insightface train_softmax.py: default lr steps are for a global batch of ``base_batch`` (512) and scale
    by ``base_batch / batch_size`` (``int(step * p)``)."""
    if not base_batch:
        return steps
    p = float(base_batch) / batch_size
    return [max(1, int(s * p)) for s in steps]


def _network_options(cfg, pretrained: Optional[str], resume) -> dict:
    """``net_*`` keys / ``--version-*`` flags -> build options of ``--network`` (one line when unsupported, or when
    the graph does not come from ``--network``)."""
    from recognition.backbones import NET_KEYS, network_options

    keys = {k: cfg.get(k) for k in NET_KEYS if cfg.get(k) is not None}
    if not keys:
        return {}
    if resume or pretrained:
        names = ", ".join(f"{k}={v!r}" for k, v in keys.items())
        raise ToolkitError(f"{names}: the graph comes from the {'resume state' if resume else 'checkpoint'}, which "
                           "these structure options cannot change; drop them (they apply when training from scratch)")
    return network_options(cfg.network, keys)


def _check_input_size(cfg, image_size: Tuple[int, int], net_options: dict, from_scratch: bool) -> None:
    """``--image-size``: square (as insightface asserts), and one the network's graph can take (a 7x7 GDC head
    needs 112x112); one line instead of an MXNet shape error at bind time."""
    if image_size == (112, 112):
        return
    if len(image_size) != 2 or image_size[0] != image_size[1] or image_size[0] < 16:
        raise ToolkitError(f"--image-size {','.join(map(str, image_size))}: must be square H,H with H >= 16 "
                           "(insightface's default 112,112)")
    if not from_scratch:
        return
    from recognition.backbones import get_symbol

    try:
        get_symbol(cfg.network, emb_size=cfg.get("emb_size"), prelu="stock", **net_options).infer_shape(
            data=(1, 3) + tuple(image_size))
    except ToolkitError:
        raise
    except Exception as exc:  # MXNet's shape error: say which flag
        first = str(exc).strip().splitlines()[0][:160]
        raise ToolkitError(f"--image-size {image_size[0]},{image_size[1]}: network {cfg.network} cannot take this "
                           f"input ({first}); use 112,112") from None


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
            logger.warning("default target %s: %s does not exist; skipped", name, path)
    return paths


def _source_watch(cfg, targets: Sequence[str]) -> Tuple[Tuple[str, ...], Optional[float], bool]:
    """``--source-targets/--max-source-drop/--stop-on-source-drop`` checked against the resolved targets ->
    (source target names, largest allowed drop or None, stop)."""
    raw = cfg.get("source_targets") or ""
    names = tuple(t.strip() for t in (raw.split(",") if isinstance(raw, str) else raw) if t and t.strip())
    known = [os.path.splitext(os.path.basename(p))[0] for p in targets]
    for name in names:
        if name not in known:
            raise ToolkitError(f"--source-targets {name}: not among the verification targets "
                               f"({', '.join(known) or 'none: add --target'})")
    drop = cfg.get("max_source_drop")
    if drop is not None:
        drop = float(drop)
        if not (math.isfinite(drop) and 0 <= drop <= 1):
            raise ToolkitError(f"--max-source-drop {cfg.max_source_drop}: an accuracy fraction in [0, 1] "
                               f"(0.005 = half a point)")
        if not names:
            raise ToolkitError("--max-source-drop needs --source-targets (which targets stand for the source domain)")
    stop = bool(cfg.get("stop_on_source_drop"))
    if stop and drop is None:
        raise ToolkitError("--stop-on-source-drop needs --max-source-drop")
    return names, drop, stop


# --bn-mode frozen keeps the stored statistics while the backbone weights move: nothing re-normalises the activations,
# so the backbone must move slowly. Real faces (model-y1-test2, 100 lfw_dev identities, batch 16, lr 0.01, ArcFace
# s=64 m=0.5, head:40 then all): backbone at 1x: loss 0.0 at the switch -> 1.1 (8 steps) -> 4.5 -> 19-28 within 15
# steps, verification 0.99 -> 0.91 (issue 13); backbone at 0.1x: loss 0.0-0.5 over the whole 'all' stage.
FROZEN_BN_MAX_BACKBONE_LR_MULT = 0.1


def _warn_frozen_bn(cfg, stages) -> None:
    """A warning (not an error: a tiny lr may make it safe) when frozen BatchNorm meets a fast-moving backbone."""
    mult = float(cfg.get("backbone_lr_mult") or 1.0)
    trains_backbone = any(s.name != "head" for s in stages)
    if cfg.get("bn_mode") == "frozen" and trains_backbone and mult > FROZEN_BN_MAX_BACKBONE_LR_MULT:
        logger.warning("--bn-mode frozen with the backbone at %gx the lr: frozen statistics no longer follow the "
                       "weights and training can diverge (real faces, lr 0.01: loss 0 -> 20 in 15 steps); use "
                       "--backbone-lr-mult %g or less, or --bn-mode train", mult, FROZEN_BN_MAX_BACKBONE_LR_MULT)


def _check_augment(text) -> Optional[str]:
    """``--augment`` parsed now (one line for a bad kind, severity or share) -> the spec as given, or None."""
    if not text:
        return None
    from datasets.shift import parse_augment

    try:
        parse_augment(text)
    except ToolkitError as exc:
        msg = str(exc)
        raise ToolkitError(f"--{msg}" if msg.startswith("augment ") else f"--augment {text}: {msg}") from None
    return str(text)


@dataclass(frozen=True)
class RunPlan:
    """One training run, settled and checked by :func:`prepare_run` before any compute: every value the trainer
    reads, typed, with its default applied here once. Frozen: nothing downstream changes it.

    ``config`` is the flat configuration it was made from (saved as ``config.json`` and in the resume state).
    ``resume``: the parsed ``state.json`` (or None); ``pretrained``: ``PREFIX,EPOCH`` (or None); ``stages``: the
    stage schedule; ``max_total``: the last step (None: ``end_epoch`` decides); ``batch_size``: per-batch-size x
    devices.
    """

    config: Mapping[str, Any]
    ctx: Tuple[Any, ...]
    kvstore: str
    objective: RunObjective
    resume: Optional[dict]
    pretrained: Optional[str]
    data_dir: str
    num_classes: int
    targets: Tuple[str, ...]
    stages: Tuple[Any, ...]
    lr_steps: Tuple[int, ...]
    batch_size: int
    max_total: Optional[int]
    prefix: str
    run_dir: str
    # model
    network: str
    network_explicit: bool
    emb_size: Optional[int]
    prelu: str
    image_size: Tuple[int, int]
    # optimisation and schedule
    per_batch_size: int
    lr: float
    wd: float
    mom: float
    warmup_steps: int
    stage_warmup: int
    end_epoch: int
    fc7_lr_mult: float
    fc7_wd_mult: float
    backbone_lr_mult: float
    bn_wd: bool
    # fine-tuning
    fc7_name: str
    reset_fc7: bool
    allow_missing: bool
    fc7_init: str
    frozen_stages: int
    bn_mode: str
    eval_pretrained: bool
    # data
    data_rand_mirror: bool
    data_cutoff: int
    data_augment: Optional[str]
    data_color: float
    data_images_filter: int
    num_workers: int
    seed: int
    # logging, checkpoints
    frequent: int
    verbose: int
    ckpt: int
    ckpt_embedding: bool
    keep: int
    sample_ratio: float = 1.0
    network_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # --version-*/net_*
    count_flops: bool = False
    # forgetting: --source-targets (implies eval_pretrained), --max-source-drop, --stop-on-source-drop
    source_targets: Tuple[str, ...] = ()
    max_source_drop: Optional[float] = None
    stop_on_source_drop: bool = False
    verify_backend: str = "auto"  # --verify-backend: the engine of verification during training
    pass_steps: Optional[int] = None  # batches in one pass over the data, when a length was given as Xep

    @property
    def loss_cfg(self):
        """The objective's :class:`recognition.objectives.base.LossConfig`."""
        return self.objective.loss_cfg

    @property
    def loss(self) -> str:
        return self.objective.name

    @property
    def data_shape(self) -> Tuple[int, int, int]:
        """(3, H, W) of one training image."""
        return (3,) + self.image_size

    @property
    def graph_network(self) -> Optional[str]:
        """The network whose registry graph (and stage table) the run uses: ``--network`` when given or when the
        run starts from scratch; None when the graph comes from a checkpoint or a resume state."""
        return self.network if (self.network_explicit or not (self.pretrained or self.resume)) else None

    @property
    def network_built(self) -> str:
        """What the embedding graph really is, for ``config.json`` and ``PREFIX-meta.json``: the registry name
        (``--network``, or a run from scratch), else ``checkpoint graph of PREFIX,EPOCH`` (the pretrained
        checkpoint's own graph, also when a run that started from one is resumed)."""
        if self.graph_network:
            return self.graph_network
        source = self.pretrained or self.config.get("pretrained")
        if source and not (self.resume and self.config.get("network_explicit")):
            return f"checkpoint graph of {source}"
        return str(self.network)

    def lr_at_step(self, step: int) -> float:
        """The scheduled lr of update ``step`` (0-based): :func:`scheduled_lr`."""
        return _stage_lr(step, self.lr, self.warmup_steps, self.stage_warmup, self.stages, self.lr_steps)


def epoch_steps(cfg, data_dir: str, batch_size: int, kvstore: str = "device") -> int:
    """Batches in one pass over ``data_dir/train.rec`` at ``batch_size`` per worker (``--stages NAME:Xep``): the
    images the iterator keeps (``--images-filter``) over the global batch (x ``DMLC_NUM_WORKER`` workers under a
    dist kvstore), at least 1. The plan keeps it (``pass_steps``) and the trainer logs it with the stages."""
    from recognition.image_iter import images_kept
    from recognition.rec import RecordReader

    with RecordReader(os.path.join(data_dir, "train.rec")) as reader:
        labels = reader.labels()
    keep = int(cfg.get("data_images_filter") or 0)
    images = int(images_kept(labels, keep).sum()) if keep > 0 else len(labels)
    workers = int(os.environ.get("DMLC_NUM_WORKER", "1")) if kvstore.startswith("dist") else 1
    return max(1, images // (batch_size * workers))


def prepare_run(cfg) -> RunPlan:
    """Validate ``cfg`` (flat config from :func:`recognition.train_config.resolve_config`) before any compute and
    return the run's :class:`RunPlan` (every flag, file and device checked)."""
    from recognition.freeze import parse_stages, steps_or_passes
    from recognition.rec import read_property

    ctx = tuple(parse_ctx(cfg.get("ctx")))
    kvstore = check_kvstore(cfg.get("kvstore") or "device")
    verbose = cfg.get("verbose")  # N batches, or "Xep" (passes over the data: counted once data_dir is known)
    in_passes = isinstance(verbose, str) and verbose.strip().lower().endswith("ep")
    if isinstance(verbose, str) and not in_passes:
        verbose = steps_or_passes(verbose, f"--verbose {verbose!r}", None, "1ep")
    check_numbers({**cfg, "verbose": None if in_passes else verbose})  # types, finiteness and ranges of every
    # numeric flag, before anything is written
    if cfg.lr is None:
        raise ToolkitError("--lr: not set")
    image_size = tuple(int(v) for v in cfg.image_size)
    resume = read_resume_state(cfg.resume) if cfg.get("resume") else None
    pretrained = None
    if cfg.get("pretrained") and not resume:
        spec = str(cfg.pretrained)
        if "," not in spec and not spec.endswith(".params") and cfg.get("pretrained_epoch") is not None:
            spec = f"{spec},{int(cfg.pretrained_epoch)}"
        prefix, epoch = parse_prefix_epoch(spec, "--pretrained")
        pretrained = f"{prefix},{epoch}"
    if not pretrained and not resume:
        from recognition.backbones import default_emb_size

        default_emb_size(cfg.network)  # unknown network: one line listing the valid names
    net_options = _network_options(cfg, pretrained, resume)
    _check_input_size(cfg, image_size, net_options, not (pretrained or resume))
    data_dir = _resolve_data_dir(cfg)
    num_classes = int(read_property(data_dir)[0])
    if cfg.get("num_classes") and int(cfg.num_classes) != num_classes:
        raise ToolkitError(f"--dataset {cfg.dataset}: the configuration says num_classes={cfg.num_classes} but "
                           f"{os.path.join(data_dir, 'property')} says {num_classes}")
    targets = _resolve_targets(cfg, data_dir)
    source_targets, max_source_drop, stop_on_source_drop = _source_watch(cfg, targets)
    # a pass over the data is counted (one read of the rec's labels) only when a length is given in passes
    pass_steps = epoch_steps(cfg, data_dir, int(cfg.per_batch_size) * len(ctx), kvstore) \
        if in_passes or "ep" in str(cfg.get("stages") or "").lower() else None
    stages = parse_stages(int(cfg.get("freeze_steps") or 0), cfg.get("stages"), cfg.get("head_lr_mult"),
                          None if pass_steps is None else lambda: pass_steps)
    if in_passes:
        verbose = steps_or_passes(verbose, f"--verbose {verbose!r}", lambda: pass_steps, "1ep")
    _warn_frozen_bn(cfg, stages)
    lr_steps = _scale_lr_steps(_parse_lr_steps(cfg.lr_steps), cfg.get("lr_steps_batch"),
                               int(cfg.per_batch_size) * len(ctx))
    if int(cfg.get("stage_warmup") or 0) < 0:
        raise ToolkitError(f"--stage-warmup {cfg.stage_warmup}: must be >= 0")
    if cfg.fc7_init not in ("random", "imprint"):
        raise ToolkitError(f"--fc7-init {cfg.fc7_init!r}: choose random or imprint")
    if cfg.ckpt not in (0, 1, 2, 3):
        raise ToolkitError(f"--ckpt {cfg.ckpt}: choose 0, 1, 2 or 3")
    if int(cfg.get("keep") or 0) < 0:
        raise ToolkitError(f"--keep {cfg.keep}: must be >= 0 (0 keeps every checkpoint)")
    # the loss and its add-ons (offline mining, distillation): every objective flag checked, the teacher loaded
    objective = prepare_objective(cfg, ctx, kvstore, int(cfg.per_batch_size), (3,) + image_size)
    objective.check_batch(int(cfg.per_batch_size))
    totals = [int(cfg.max_steps)] if cfg.get("max_steps") else []
    if stages[-1].steps is not None:
        totals.append(sum(s.steps for s in stages))
    if resume:
        # a run folder is self-contained: a resumed run writes where its resume/ folder is now (a moved or copied
        # run resumes in place; the folder it was copied from, or a path in its saved config, is never touched)
        saved = cfg.get("prefix") or "model"
        prefix = os.path.join(resume["run_dir"], os.path.basename(os.path.normpath(str(saved))) or "model")
    elif cfg.get("prefix"):
        prefix = cfg.prefix
    else:
        net = cfg.network if (cfg.get("network_explicit") or not pretrained) else \
            os.path.basename(os.path.dirname(os.path.abspath(pretrained.rpartition(",")[0]))) or "pretrained"
        ds = os.path.basename(os.path.normpath(str(cfg.dataset))) if cfg.dataset else "data"
        extra = f"-{cfg.extra_model_name}" if cfg.get("extra_model_name") else ""
        prefix = os.path.join(cfg.models_root, f"{net}-{cfg.loss}-{ds}{extra}", "model")
    return RunPlan(
        config=MappingProxyType(dict(cfg)), ctx=ctx, kvstore=kvstore, objective=objective, resume=resume,
        pretrained=pretrained, data_dir=data_dir, num_classes=num_classes, targets=tuple(targets),
        stages=tuple(stages), lr_steps=tuple(lr_steps), batch_size=int(cfg.per_batch_size) * len(ctx),
        max_total=min(totals) if totals else None, prefix=prefix, run_dir=os.path.dirname(os.path.abspath(prefix)),
        network=cfg.network, network_explicit=bool(cfg.get("network_explicit")),
        emb_size=None if cfg.get("emb_size") is None else int(cfg.emb_size), prelu=cfg.get("prelu") or "bn",
        image_size=image_size, per_batch_size=int(cfg.per_batch_size), lr=float(cfg.lr), wd=float(cfg.wd),
        mom=float(cfg.mom), warmup_steps=int(cfg.get("warmup_steps") or 0),
        stage_warmup=int(cfg.get("stage_warmup") or 0), end_epoch=int(cfg.end_epoch),
        fc7_lr_mult=float(cfg.fc7_lr_mult), fc7_wd_mult=float(cfg.fc7_wd_mult),
        backbone_lr_mult=float(cfg.backbone_lr_mult), bn_wd=bool(cfg.get("bn_wd")), fc7_name=cfg.fc7_name,
        reset_fc7=bool(cfg.get("reset_fc7")), allow_missing=bool(cfg.get("allow_missing")), fc7_init=cfg.fc7_init,
        frozen_stages=int(cfg.get("frozen_stages") or 0), bn_mode=cfg.get("bn_mode") or "train",
        eval_pretrained=bool(cfg.get("eval_pretrained")) or bool(source_targets),
        data_rand_mirror=bool(cfg.get("data_rand_mirror")),
        data_cutoff=int(cfg.get("data_cutoff") or 0), data_augment=_check_augment(cfg.get("data_augment")),
        data_color=float(cfg.get("data_color") or 0),
        data_images_filter=int(cfg.get("data_images_filter") or 0), num_workers=int(cfg.num_workers),
        seed=int(cfg.get("seed") or 0), frequent=int(cfg.frequent), verbose=int(verbose), ckpt=int(cfg.ckpt),
        ckpt_embedding=bool(int(cfg.ckpt_embedding)), keep=int(cfg.get("keep") or 0),
        sample_ratio=float(cfg.get("sample_ratio") or 1.0), network_options=MappingProxyType(net_options),
        count_flops=bool(cfg.get("count_flops")), source_targets=source_targets,
        max_source_drop=max_source_drop, stop_on_source_drop=stop_on_source_drop,
        verify_backend=_verify_backend(cfg), pass_steps=pass_steps)


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
    jump, is what costs there. A pure function of the step and the saved configuration (resume-exact). ``cfg``
    gives ``lr``, ``warmup_steps``, ``stage_warmup``; ``plan`` ``stages`` and ``lr_steps`` (a :class:`RunPlan` is
    both: :meth:`RunPlan.lr_at_step`).
    """
    return _stage_lr(step, float(cfg.lr), int(cfg.warmup_steps or 0), int(cfg.stage_warmup or 0), plan.stages,
                     plan.lr_steps)


def _stage_lr(step: int, base_lr: float, warmup_steps: int, ramp: int, stages, lr_steps) -> float:
    from recognition.freeze import stage_at

    idx, stage = stage_at(stages, step)
    lr = stage.lr_mult * lr_at(step, base_lr, lr_steps, warmup_steps)
    if ramp and idx > 0:
        into = step - sum(s.steps for s in stages[:idx])
        if into < ramp:
            lr *= (into + 1) / float(ramp)
    return lr


__all__ = ["RunPlan", "prepare_run", "check_numbers", "check_positive", "lr_at", "scheduled_lr"]
