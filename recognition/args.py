"""Command-line flags shared by ``train.py``, ``train_softmax.py`` and ``train_parall.py``: one definition each.

Every flag defaults to ``None`` ("not given"), so the configuration tree (``recognition.train_config``) supplies
the default and ``--config``/``--set`` can override it; :func:`explicit_values` returns what the user typed.
Flag names and meanings follow insightface's ``recognition/train.py`` and ``src/train_softmax.py``.
"""
from __future__ import annotations

import argparse
from typing import Dict, Optional

from recognition import objectives
from recognition.common import ToolkitError

# insightface src/train_softmax.py --loss-type numbers -> loss names, from the objectives registry (see its
# get_symbol): 0 softmax, 1 SphereFace, 2 CosFace, 4 ArcFace, 5 combined, 12 triplet, 13 angular triplet.
LOSS_TYPES: Dict[int, str] = dict(objectives.LOSS_TYPES)


def _int01(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return int(text)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--network --emb-size --prelu``."""
    g = parser.add_argument_group("model")
    g.add_argument("--network", default=None, help="backbone name (r100, r50, y1, tiny, gluon:NAME, ...)")
    g.add_argument("--emb-size", type=int, default=None, help="embedding width (default: the network's)")
    g.add_argument("--prelu", choices=("bn", "fast", "stock"), default=None,
                   help="PReLU formulation of the training graph (same parameters; default 'bn', fastest on CPU; "
                        "'bn' and 'stock' checkpoints store insightface's stock graph)")


def add_loss_args(parser: argparse.ArgumentParser) -> None:
    """``--loss`` (insightface train.py) and every objective's flags (``--center-loss-weight``, mining,
    distillation)."""
    g = parser.add_argument_group("loss")
    g.add_argument("--loss", default=None, help=f"loss name: {', '.join(objectives.LOSSES)}")
    objectives.add_objective_args(parser, g, legacy=False)


def add_legacy_loss_args(parser: argparse.ArgumentParser) -> None:
    """``--loss-type`` and margins of insightface's older ``train_softmax.py``."""
    g = parser.add_argument_group("loss (train_softmax.py flags)")
    g.add_argument("--loss-type", type=int, default=None,
                   help="; ".join(f"{k} {v}" for k, v in LOSS_TYPES.items()) + " (default 4)")
    objectives.add_objective_args(parser, g, legacy=True)  # --margin-*, --easy-margin, --triplet-alpha, ...
    for flag in ("--version-se", "--version-input", "--version-output", "--version-unit", "--version-act",
                 "--version-multiplier"):
        g.add_argument(flag, default=None, help="accepted for compatibility; the network registry fixes it")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """``--dataset --data-dir --per-batch-size --target``."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=None, help="dataset name in the config (emore, retina, synth) or a folder")
    g.add_argument("--data-dir", default=None, help="folder with train.rec/train.idx/property (overrides --dataset)")
    g.add_argument("--per-batch-size", type=int, default=None, help="batch per device")
    g.add_argument("--target", default=None,
                   help="verification sets, comma separated: names resolved as DATA_DIR/NAME.bin, or .bin paths")
    g.add_argument("--num-workers", type=int, default=None, help="image decoding threads")
    g.add_argument("--augment", dest="data_augment", default=None, metavar="KIND[@S][+KIND[@S]][:P]",
                   help="training-time domain shift (datasets/shift.py) applied to a share P of the images, e.g. "
                        "lowres@0.9:0.5 or mask@0.7+jpeg@0.5:0.3; kinds: lowres, mask, grey, nir, blur, jpeg")


def add_optim_args(parser: argparse.ArgumentParser) -> None:
    """SGD, schedule and per-parameter multipliers."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="start learning rate")
    g.add_argument("--lr-steps", default=None, help="batches at which lr is multiplied by 0.1, e.g. 100000,160000")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear lr warm-up over this many batches")
    g.add_argument("--wd", type=float, default=None, help="weight decay")
    g.add_argument("--mom", type=float, default=None, help="momentum")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many batches (0: --end-epoch)")
    g.add_argument("--end-epoch", type=int, default=None, help="stop after this many epochs")
    g.add_argument("--fc7-lr-mult", type=float, default=None, help="lr multiplier of the classifier")
    g.add_argument("--fc7-wd-mult", type=float, default=None, help="wd multiplier of the classifier")
    g.add_argument("--backbone-lr-mult", type=float, default=None, help="lr multiplier of the backbone (stage all)")


def add_finetune_args(parser: argparse.ArgumentParser) -> None:
    """``--pretrained`` and the fine-tuning policy."""
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--pretrained", default=None, help="PREFIX,EPOCH of a checkpoint to start from")
    g.add_argument("--pretrained-epoch", type=int, default=None, help="epoch, when --pretrained is a bare PREFIX")
    g.add_argument("--fc7-name", default=None, help="classifier layer name in the checkpoint (default fc7)")
    g.add_argument("--reset-fc7", action="store_true", default=None, help="never reuse the checkpoint's fc7")
    g.add_argument("--allow-missing", action="store_true", default=None,
                   help="initialise backbone parameters the checkpoint lacks (listed in the load report)")
    g.add_argument("--fc7-init", choices=("random", "imprint"), default=None,
                   help="new classifier: random, or imprinted with normalised class-mean embeddings")
    g.add_argument("--freeze-steps", type=int, default=None, help="train only the head for N batches, then all")
    g.add_argument("--head-lr-mult", type=float, default=None,
                   help="factor on the scheduled lr during the --freeze-steps head stage (default 1.0 = as scheduled)")
    g.add_argument("--stages", default=None,
                   help='stage plan, e.g. "head:500,all:2000"; NAME:N@F runs a stage at F x the scheduled lr, e.g. '
                        '"head:500@0.1,all:2000" (an imprinted classifier wants a small head-stage lr)')
    g.add_argument("--stage-warmup", type=int, default=None,
                   help="ramp the lr linearly over the first N batches of every stage after the first: the "
                        "unfrozen backbone starts gently instead of at full lr")
    g.add_argument("--frozen-stages", type=int, default=None, help="keep the first K backbone stages fixed")
    g.add_argument("--bn-mode", choices=("train", "frozen"), default=None,
                   help="frozen: BatchNorm uses its stored statistics throughout (keeps the source domain's "
                        "statistics; needs --backbone-lr-mult 0.1 or less, else training can diverge)")
    g.add_argument("--eval-pretrained", action="store_true", default=None,
                   help="verify the starting model on the targets first and print a before/after table")
    g.add_argument("--source-targets", default=None,
                   help="comma list of --target names that stand for what the model already knows (e.g. lfw): "
                        "each round logs how much of the pretrained accuracy is kept (metrics.jsonl 'kept', a "
                        "dashed line in curves.png); implies --eval-pretrained")
    g.add_argument("--max-source-drop", type=float, default=None,
                   help="warn when a --source-targets accuracy falls more than this below the pretrained model's "
                        "(accuracy fraction: 0.005 = half a point)")
    g.add_argument("--stop-on-source-drop", action="store_true", default=None,
                   help="stop at the first verification round past --max-source-drop (checkpoints and resume "
                        "state kept, as a graceful stop)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Devices, logging, checkpoints, resume, configuration files."""
    g = parser.add_argument_group("run")
    g.add_argument("--ctx", default=None, help="devices, e.g. cpu:0,cpu:1 or gpu:0,gpu:1 (else CUDA_VISIBLE_DEVICES)")
    g.add_argument("--kvstore", default=None,
                   help="device, local, nccl; or dist_sync, dist_device_sync, dist_async for several processes or "
                        "machines under python -m recognition.launch")
    g.add_argument("--models-root", default=None, help="runs go to MODELS_ROOT/NETWORK-LOSS-DATASET/model")
    g.add_argument("--prefix", default=None, help="checkpoint prefix (overrides --models-root)")
    g.add_argument("--ckpt", type=int, choices=(0, 1, 2, 3), default=None,
                   help="0 never (only the final one), 1 when verification improves, 2 always, "
                        "3 best overwriting epoch 1")
    g.add_argument("--keep", type=int, default=None,
                   help="keep only the K newest model-NNNN.params (older ones deleted once the new one is complete; "
                        "0 or unset: keep all)")
    g.add_argument("--ckpt-embedding", type=_int01, default=None,
                   help="1: save the graph cut at fc1_output without fc7; 0: the full training graph")
    g.add_argument("--verbose", type=int, default=None, help="verify (and checkpoint) every N batches")
    g.add_argument("--frequent", type=int, default=None, help="log speed/loss/accuracy every N batches")
    g.add_argument("--seed", type=int, default=None, help="random seed")
    g.add_argument("--resume", default=None, help="continue the run saved in DIR (its resume/ state)")
    g.add_argument("--config", default=None, help="configuration file (.py, .json, .yaml) overriding defaults")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key (repeatable), e.g. --set loss.arcface.margin_m=0.45")


_NOT_CONFIG = {"config", "set"}


def explicit_values(args: argparse.Namespace) -> dict:
    """Flags the user gave (value not ``None``), as configuration keys."""
    return {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}


def legacy_loss_values(args: argparse.Namespace) -> dict:
    """Map train_softmax.py's ``--loss-type``/``--margin-*`` onto configuration keys.

    Only margins the user typed are passed; the rest come from the loss's defaults (for type 2, CosFace,
    insightface's single ``--margin-m`` is the cosine margin ``margin_b`` here; for 13 it is the angle alpha).
    """
    out = {}
    if args.loss_type is not None:
        if args.loss_type not in LOSS_TYPES:
            raise ToolkitError(f"--loss-type {args.loss_type}: unknown; choose one of "
                               + ", ".join(f"{k} ({v})" for k, v in LOSS_TYPES.items()))
        out["loss"] = LOSS_TYPES[args.loss_type]
    name = out.get("loss")
    for flag in ("margin_s", "margin_a", "margin_b", "triplet_alpha"):
        if getattr(args, flag) is not None:
            out[flag] = getattr(args, flag)
    if args.margin_m is not None:
        key = objectives.get_objective(name).legacy_margin_m if name else "margin_m"
        out[key] = args.margin_m
    if args.easy_margin is not None:
        out["easy_margin"] = bool(args.easy_margin)
    return out


class ConfigDefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each flag's default from the configuration tree (the flags themselves default to None,
    "not given", see the module docstring). A default that changes with ``--network``/``--loss``/``--dataset``
    says so; a help text that already names its default is left as it is."""

    _defaults: Optional[Dict[str, tuple]] = None

    @classmethod
    def config_defaults(cls) -> Dict[str, tuple]:
        """``{key: (value, varies)}``: the default configuration and whether another network/loss/dataset
        changes the value."""
        if cls._defaults is None:
            from recognition.train_config import resolve_config

            base = resolve_config({})
            others = [(key, resolve_config({key: value})) for key, value in
                      (("network", "y1"), ("loss", "softmax"), ("dataset", "synth"), ("loss", "triplet"))]
            cls._defaults = {k: (v, any(o.get(k) != v for key, o in others if key != k)) for k, v in base.items()}
        return cls._defaults

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default not in (None, argparse.SUPPRESS) or not action.option_strings:
            if action.default not in (None, False, [], argparse.SUPPRESS) and "%(default)" not in text \
                    and "default" not in text and action.option_strings:
                text += " (default: %(default)s)"
            return text
        known = self.config_defaults().get(action.dest)
        if known is None or known[0] is False or known[0] in (None, "", [], ()):  # unset switches say nothing
            return text
        value, varies = known
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        where = f"default {shown} with --network r100 --loss arcface --dataset emore; it depends on them" \
            if varies else f"default: {shown}"
        return f"{text} ({where})".replace("%", "%%")


def build_parser(description: str, legacy: bool = False, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """Parser with every group; ``legacy`` swaps ``--loss`` for train_softmax.py's ``--loss-type`` flags.
    ``--help`` shows the configuration defaults (:class:`ConfigDefaultsHelpFormatter`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=ConfigDefaultsHelpFormatter)
    add_model_args(parser)
    if legacy:
        add_legacy_loss_args(parser)
    else:
        add_loss_args(parser)
    add_data_args(parser)
    add_optim_args(parser)
    add_finetune_args(parser)
    add_run_args(parser)
    return parser


__all__ = ["ConfigDefaultsHelpFormatter", "LOSS_TYPES", "add_model_args", "add_loss_args", "add_legacy_loss_args",
           "add_data_args", "add_optim_args", "add_finetune_args", "add_run_args", "explicit_values",
           "legacy_loss_values", "build_parser"]
