"""Train with insightface's older ``src/train_softmax.py`` flags (``--loss-type``, ``--margin-*``).

``--loss-type`` (insightface's numbers): 0 softmax, 1 SphereFace, 2 CosFace, 4 ArcFace, 5 combined margin
``cos(a*theta + m) - b``, 12 triplet, 13 angular triplet. Margins given on the command line override the loss's
defaults; for type 2 ``--margin-m`` is the cosine margin, for 13 the angular triplet margin (radians).
The run itself is the same code as ``train.py``.

    python recognition/train_softmax.py --network y1 --loss-type 4 --margin-s 64 --margin-m 0.5 \\
        --data-dir ../datasets/faces_emore --prefix ../models/y1-arcface/model --pretrained ../models/y1/model,0
"""
from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

from recognition.args import explicit_values, legacy_loss_values
from recognition.common import run_cli
from recognition.train import build_argparser, config_from_args, report

logger = logging.getLogger("recognition")

_LEGACY_KEYS = ("loss_type", "margin_s", "margin_m", "margin_a", "margin_b", "easy_margin", "triplet_alpha")
_VERSION_KEYS = ("version_se", "version_input", "version_output", "version_unit", "version_act",
                 "version_multiplier")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from recognition.trainer import run_training

    args = build_argparser(legacy=True, prog="train_softmax.py").parse_args(argv)
    explicit = explicit_values(args)
    for key in _LEGACY_KEYS + _VERSION_KEYS:
        explicit.pop(key, None)
    ignored = [f"--{k.replace('_', '-')}" for k in _VERSION_KEYS if getattr(args, k) is not None]
    if ignored:
        logger.warning("%s: accepted for compatibility and ignored (the network registry defines the structure)",
                       ", ".join(ignored))
    legacy = legacy_loss_values(args)
    if "loss" not in legacy and not explicit.get("resume"):
        legacy["loss"] = "arcface"  # train_softmax.py's default --loss-type 4
    explicit.update(legacy)
    report(run_training(config_from_args(args, explicit)))
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
