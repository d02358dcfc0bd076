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
from recognition.verification import BACKENDS

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
    """``--loss-type``, margins and the other flags of insightface's older ``src/train_softmax.py``."""
    g = parser.add_argument_group("loss (train_softmax.py flags)")
    g.add_argument("--loss-type", type=int, default=None,
                   help="; ".join(f"{k} {v}" for k, v in LOSS_TYPES.items()) + " (default 4)")
    objectives.add_objective_args(parser, g, legacy=True)  # --margin-*, --easy-margin, --triplet-alpha, ...
    s = parser.add_argument_group("network structure and data (train_softmax.py flags)")
    for flag, kind, text in (("--version-se", int, "1: squeeze-excitation units (fresnet)"),
                             ("--version-input", int, "stem: 1 3x3 stride 1, 0 7x7 stride 2 (fresnet)"),
                             ("--version-output", str, "embedding head: E GDC F G H I J GAP (insightface's E)"),
                             ("--version-unit", int, "residual unit: 1, 2, 3 (fresnet)"),
                             ("--version-act", str, "activation: prelu relu sigmoid tanh softrelu"),
                             ("--version-multiplier", float, "width multiplier (MobileNet)")):
        s.add_argument(flag, type=kind, default=None, help=text + "; train_softmax.py's defaults from scratch")
    s.add_argument("--image-size", default=None, help="H,W of the training images (insightface's 112,112)")
    s.add_argument("--bn-mom", type=float, default=None, help="BatchNorm momentum of the network (0.9)")
    s.add_argument("--fc7-no-bias", action="store_true", default=None, help="softmax (type 0) classifier without bias")
    s.add_argument("--rand-mirror", type=_int01, default=None, help="random horizontal flip 0|1 (1)")
    s.add_argument("--cutoff", type=int, default=None, help="cutout augmentation size (0: off)")
    s.add_argument("--color", type=int, default=None, help="colour jitter strength (0: off)")
    s.add_argument("--images-filter", type=int, default=None, help="drop identities with fewer images (0: keep all)")
    for flag, (kind, _) in REFUSED_SOFTMAX_FLAGS.items():
        if kind is None:
            s.add_argument(flag, action="store_true", default=None, help="not built here (one-line refusal)")
        else:
            s.add_argument(flag, type=kind, default=None, help="not built here (one-line refusal)")


# insightface train_softmax.py flags this toolkit does not build: flag -> (type or None for a switch, why and what
# to use instead)
REFUSED_SOFTMAX_FLAGS = {
    "--use-deformable": (int, "deformable convolutions are not built here; 0 (insightface's default) is what "
                              "runs, drop the flag"),
    "--ce-loss": (None, "the cross-entropy loss is always computed and logged here (train.log, metrics.jsonl "
                        "'loss'); drop the flag"),
    "--margin": (int, "insightface's LSoftmax (--loss-type 1) is not built here; use train.py --loss sphereface "
                      "with --set loss.sphereface.margin_a=M"),
}
for _flag in ("--beta", "--beta-min", "--beta-freeze", "--gamma", "--power", "--scale"):
    REFUSED_SOFTMAX_FLAGS[_flag] = (float, "LSoftmax's lambda annealing (--loss-type 1) is not built here; use "
                                           "train.py --loss sphereface with a fixed --set "
                                           "loss.sphereface.sphere_lambda=L")
# insightface train_softmax.py loss types not built here, with the replacement
REFUSED_LOSS_TYPES = {
    1: "insightface's LSoftmax (unnormalised, lambda annealed by --beta/--gamma/--power) is not built here; use "
       "train.py --loss sphereface (normalised SphereFace, s=64, m1=4, fixed lambda)",
}
# which margin flags each train_softmax.py loss type reads (insightface ignores the others)
_MARGINS_OF_TYPE = {0: (), 2: ("margin_s", "margin_m"), 4: ("margin_s", "margin_m", "easy_margin"),
                    5: ("margin_s", "margin_m", "margin_a", "margin_b"), 12: ("margin_m", "triplet_alpha"),
                    13: ("margin_m", "triplet_alpha")}
# insightface train_softmax.py's argparse defaults of the margins
SOFTMAX_MARGIN_DEFAULTS = {"margin_s": 64.0, "margin_m": 0.5, "margin_a": 1.0, "margin_b": 0.0}


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
                        '"head:500@0.1,all:2000" (an imprinted classifier wants a small head-stage lr); NAME:Xep '
                        'counts X passes over the data instead of steps, e.g. "head:1ep@0.1,all:3ep"')
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
    g.add_argument("--verbose", default=None,
                   help="verify (and checkpoint) every N batches, or every X passes over the data with Xep (1ep)")
    g.add_argument("--verify-backend", default=None, choices=BACKENDS,
                   help="engine of that verification: auto (default: onnx on CPU when onnxruntime is installed, "
                        "else mxnet), onnx, mxnet, mxnet-plain")
    g.add_argument("--frequent", type=int, default=None, help="log speed/loss/accuracy every N batches")
    g.add_argument("--seed", type=int, default=None, help="random seed")
    g.add_argument("--count-flops", action="store_true", default=None,
                   help="log the network's FLOPs and parameters at train start (insightface's config.count_flops)")
    g.add_argument("--resume", default=None, help="continue the run saved in DIR (its resume/ state)")
    g.add_argument("--config", default=None, help="configuration file (.py, .json, .yaml) overriding defaults")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a configuration key (repeatable), e.g. --set loss.arcface.margin_m=0.45")


_NOT_CONFIG = {"config", "set"}


def explicit_values(args: argparse.Namespace) -> dict:
    """Flags the user gave (value not ``None``), as configuration keys."""
    return {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_CONFIG}


def legacy_loss_values(args: argparse.Namespace, fill_defaults: bool = False) -> dict:
    """Map train_softmax.py's ``--loss-type``/``--margin-*`` onto configuration keys.

    For type 2 (CosFace) insightface's single ``--margin-m`` is the cosine margin ``margin_b`` here; for 13 the
    angle alpha. A margin flag the chosen type does not read (insightface ignores it) is refused in one line, and
    so is ``--loss-type 1`` (:data:`REFUSED_LOSS_TYPES`). ``fill_defaults``: margins not typed take
    train_softmax.py's argparse defaults (:data:`SOFTMAX_MARGIN_DEFAULTS`: CosFace m=0.5, combined a=1 m=0.5 b=0)
    instead of the loss's own.
    """
    out = {}
    loss_type = args.loss_type
    if loss_type in REFUSED_LOSS_TYPES:
        raise ToolkitError(f"--loss-type {loss_type}: {REFUSED_LOSS_TYPES[loss_type]}")
    if loss_type is not None:
        if loss_type not in LOSS_TYPES:
            raise ToolkitError(f"--loss-type {loss_type}: unknown; choose one of "
                               + ", ".join(f"{k} ({v})" for k, v in LOSS_TYPES.items()))
        out["loss"] = LOSS_TYPES[loss_type]
    typed = {k: getattr(args, k) for k in ("margin_s", "margin_m", "margin_a", "margin_b", "easy_margin",
                                           "triplet_alpha") if getattr(args, k) is not None}
    effective = 4 if loss_type is None else loss_type
    if effective in _MARGINS_OF_TYPE:
        unused = [k for k in typed if k not in _MARGINS_OF_TYPE[effective]]
        if unused:
            flags = ", ".join("--" + k.replace("_", "-") for k in unused)
            raise ToolkitError(f"{flags}: --loss-type {effective} ({LOSS_TYPES[effective]}) does not use it "
                               f"(insightface ignores it); use --loss-type 5 for a combined margin a, m, b")
    name = LOSS_TYPES[effective] if fill_defaults or loss_type is not None else out.get("loss")
    if fill_defaults and effective in (2, 4, 5):
        for key in _MARGINS_OF_TYPE[effective]:
            if key in SOFTMAX_MARGIN_DEFAULTS:
                typed.setdefault(key, SOFTMAX_MARGIN_DEFAULTS[key])
    for key, value in typed.items():
        if key == "margin_m":
            out[objectives.get_objective(name).legacy_margin_m if name else "margin_m"] = value
        elif key == "easy_margin":
            out[key] = bool(value)
        else:
            out[key] = value
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


def softmax_flag_values(args: argparse.Namespace) -> dict:
    """train_softmax.py's structure/data flags as configuration keys; refused flags are one line each."""
    for flag, (_, why) in REFUSED_SOFTMAX_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None or (flag == "--use-deformable" and value == 0):
            continue
        shown = "" if value is True else f" {value}"
        raise ToolkitError(f"{flag}{shown}: {why}")
    out = {}
    for flag, key in _SOFTMAX_KEYS.items():
        value = getattr(args, flag)
        if value is not None:
            out[key] = value
    if args.image_size is not None:
        try:
            h, w = (int(v) for v in str(args.image_size).split(","))
        except ValueError:
            raise ToolkitError(f"--image-size {args.image_size!r}: expected H,W such as 112,112") from None
        out["image_size"] = (h, w)
    if "data_rand_mirror" in out:
        out["data_rand_mirror"] = bool(out["data_rand_mirror"])
    return out


_SOFTMAX_KEYS = {"version_se": "net_se", "version_input": "net_input", "version_output": "net_output",
                 "version_unit": "net_unit", "version_act": "net_act", "version_multiplier": "net_multiplier",
                 "bn_mom": "bn_mom", "fc7_no_bias": "fc7_no_bias", "rand_mirror": "data_rand_mirror",
                 "cutoff": "data_cutoff", "color": "data_color", "images_filter": "data_images_filter"}
SOFTMAX_ONLY = tuple(_SOFTMAX_KEYS) + ("image_size", "loss_type", "margin_s", "margin_m", "margin_a", "margin_b",
                                       "easy_margin", "triplet_alpha") + \
    tuple(f[2:].replace("-", "_") for f in REFUSED_SOFTMAX_FLAGS)


def build_parser(description: str, legacy: bool = False, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """Parser with every group; ``legacy`` swaps ``--loss`` for train_softmax.py's ``--loss-type`` flags.
    ``--help`` shows the configuration defaults (:class:`ConfigDefaultsHelpFormatter`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=ConfigDefaultsHelpFormatter)
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


__all__ = ["ConfigDefaultsHelpFormatter", "REFUSED_SOFTMAX_FLAGS", "REFUSED_LOSS_TYPES", "SOFTMAX_MARGIN_DEFAULTS",
           "SOFTMAX_ONLY", "softmax_flag_values", "LOSS_TYPES", "add_model_args", "add_loss_args",
           "add_legacy_loss_args", "add_data_args", "add_optim_args", "add_finetune_args", "add_run_args",
           "explicit_values", "legacy_loss_values", "build_parser"]
