"""Train or fine-tune a face-recognition model (insightface's ``recognition/train.py`` flags).

Examples::

    python recognition/train.py --network r100 --loss arcface --dataset emore
    python recognition/train.py --network y1 --loss arcface --data-dir data/mine --target lfw \\
        --pretrained ../models/model-y1-test2/model,0 --stages head:500,all:2000 --eval-pretrained
    python recognition/train.py --resume models/y1-arcface-mine
    python -m recognition.launch --num-workers 2 --num-servers 1 -- \\
        python recognition/train.py --kvstore dist_sync --network r50 ...   # several processes / machines

Runs go to ``MODELS_ROOT/NETWORK-LOSS-DATASET/``: ``model-%04d.params`` + ``model-symbol.json``,
``metrics.jsonl``, ``curves.png``, ``train.log``, ``config.json``, the load report and ``resume/``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from recognition.args import build_parser, explicit_values
from recognition.common import run_cli


def build_argparser(legacy: bool = False, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The train.py parser (``legacy``: train_softmax.py's ``--loss-type`` flag set)."""
    doc = (__doc__ or "").split("\n\n")[0]
    return build_parser(doc, legacy=legacy, prog=prog)


def config_from_args(args: argparse.Namespace, explicit: Optional[dict] = None,
                     script_defaults: Optional[dict] = None):
    """Flat run configuration: defaults (``script_defaults``: the script's own, train_softmax.py's), ``--config``,
    explicit flags, ``--set``; on ``--resume`` the saved configuration replaces the defaults (flags given now still
    override it)."""
    from recognition.resume_state import read_resume_state
    from recognition.train_config import resolve_config

    explicit = dict(explicit_values(args) if explicit is None else explicit)
    base = None
    if explicit.get("resume"):
        base = read_resume_state(explicit["resume"])["config"]
    if "network" in explicit:
        explicit["network_explicit"] = True
    return resolve_config(explicit, args.config, args.set, base=base, script_defaults=script_defaults)


def report(summary: dict) -> None:
    """Print where the run ended and its final verification accuracy."""
    print(f"finished at step {summary['step']}; checkpoint {summary['checkpoint']}; run folder {summary['run_dir']}")
    for name, acc in sorted(summary["final"].items()):
        before = summary["before"].get(name)
        extra = f" (before {before:.5f})" if before is not None else ""
        print(f"[{name}] accuracy {acc:.5f}{extra}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from recognition.trainer import run_training

    args = build_argparser(prog="train.py").parse_args(argv)
    report(run_training(config_from_args(args)))
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
