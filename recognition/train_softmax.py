"""Train with insightface's older ``src/train_softmax.py`` flags and defaults (``--loss-type``, ``--margin-*``,
``--version-*``, ``--image-size``, augmentation flags).

``--loss-type`` (insightface's numbers): 0 softmax, 2 CosFace, 4 ArcFace, 5 combined margin
``cos(a*theta + m) - b``, 12 triplet, 13 angular triplet; 1 (insightface's LSoftmax with lambda annealing) is not
built and is refused with a pointer to ``train.py --loss sphereface``. Margins not typed take train_softmax.py's
defaults (s=64, m=0.5, a=1, b=0; for type 2 ``--margin-m`` is the cosine margin, for 13 the angle). A margin flag
the chosen type does not read is refused, as are the flags of features not built here (docs/COMPAT.md).

Defaults are train_softmax.py's: ``--network r50``, ``--emb-size 512``, ``--ckpt 1``, ``--end-epoch 100000``,
verification on lfw, cfp_fp and agedb_30 when those ``.bin`` files are in the data folder (each missing one skipped
with a warning; a ``--target`` you name must exist), and without ``--lr-steps`` the steps 40000,60000,80000
(100000,140000,160000 for margin losses) for a global batch of 512, scaled by 512 / batch. From scratch the network
is built as train_softmax.py builds it (``--version-output E`` etc.: an 'E' head on MobileFaceNet too); with
``--pretrained`` the checkpoint's graph is used. The run itself is the same code as ``train.py``.

    python recognition/train_softmax.py --network y1 --loss-type 4 --margin-s 64 --margin-m 0.5 \\
        --data-dir ../datasets/faces_emore --prefix ../models/y1-arcface/model --pretrained ../models/y1/model,0
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from recognition.args import SOFTMAX_ONLY, explicit_values, legacy_loss_values, softmax_flag_values
from recognition.common import run_cli
from recognition.train import build_argparser, config_from_args, report

# insightface src/train_softmax.py argparse defaults that differ from train.py's configuration defaults
SOFTMAX_DEFAULTS = {"network": "r50", "ckpt": 1, "end_epoch": 100000, "emb_size": 512,
                    "val_targets": ["lfw", "cfp_fp", "agedb_30"]}
# from scratch, the network options train_softmax.py passes to the builders
SOFTMAX_NET_DEFAULTS = {"net_output": "E", "net_se": 0, "net_input": 1, "net_unit": 3, "net_act": "prelu"}
# lr steps without --lr-steps: for a global batch of 512, scaled by 512 / batch (types 1..7: the margin losses)
SOFTMAX_LR_STEPS = ("40000,60000,80000", "100000,140000,160000")
_NOT_INSIGHTFACE_NETS = ("tiny",)
# the builders insightface's train_softmax.py passes its --version-* flags to
_SOFTMAX_FAMILIES = ("fresnet", "fmobilefacenet", "fmobilenet")


def _family(network) -> str:
    from recognition.backbones import NETWORKS

    spec = NETWORKS.get(network)
    return spec.family if spec else ""


def softmax_config(argv: Optional[Sequence[str]] = None):
    """The flat run configuration train_softmax.py's ``argv`` means (parsed, mapped, defaults applied); raises
    :class:`recognition.common.ToolkitError` for refused flags."""
    args = build_argparser(legacy=True, prog="train_softmax.py").parse_args(argv)
    explicit = explicit_values(args)
    for key in SOFTMAX_ONLY:
        explicit.pop(key, None)
    resume = bool(explicit.get("resume"))
    legacy = legacy_loss_values(args, fill_defaults=not resume)
    if "loss" not in legacy and not resume:
        legacy["loss"] = "arcface"  # train_softmax.py's default --loss-type 4
    explicit.update(legacy)
    explicit.update(softmax_flag_values(args))
    defaults = {}
    if not resume:
        defaults.update(SOFTMAX_DEFAULTS)
        network = explicit.get("network", defaults["network"])
        if network in _NOT_INSIGHTFACE_NETS or str(network).startswith("gluon:"):
            defaults.pop("emb_size")  # not an insightface network: its own width
        if args.lr_steps is None:
            loss_type = 4 if args.loss_type is None else args.loss_type
            defaults["lr_steps"] = SOFTMAX_LR_STEPS[1 if 1 <= loss_type <= 7 else 0]
            defaults["lr_steps_batch"] = 512
        if not explicit.get("pretrained") and _family(network) in _SOFTMAX_FAMILIES:
            defaults.update({k: v for k, v in SOFTMAX_NET_DEFAULTS.items() if k not in explicit})
    return config_from_args(args, explicit, defaults)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from recognition.trainer import run_training

    report(run_training(softmax_config(argv)))
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
