"""insightface's ``eval/verification.py`` calling convention on top of :mod:`recognition.verification`.

    python -m recognition.verification --data-dir ../datasets/faces_emore --model ../models/r100/model,1|2 \\
        --target lfw,cfp_fp --batch-size 32 --nfolds 10
    python -m recognition.verification --data-dir DIR --model ../models/r100/model     # every epoch found
    python -m recognition.verification --data-dir DIR --model PREFIX --max 0,3         # the 3 newest epochs

Flags and defaults as insightface's: ``--data-dir`` (targets are names resolved as ``DIR/NAME.bin``; the image size
comes from ``DIR/property`` when there is one), ``--model PREFIX,E1|E2`` or a bare ``PREFIX`` (every
``PREFIX-NNNN.params`` found, newest first; ``--max A,B`` keeps ``epochs[A:B]`` when there are more than B),
``--target`` (default ``lfw,cfp_ff,cfp_fp,agedb_30``: the missing ones are skipped with a warning each; a name typed
explicitly must exist), ``--gpu N``, ``--batch-size``, ``--nfolds``, ``--mode`` (0: the accuracy lines; 2: write the
flip-summed normalised embeddings and labels of the first target to ``temp.bin``; 1, insightface's bad-case mosaics,
is refused). Printed per target and model: ``[NAME]XNorm``, ``[NAME]Accuracy``, ``[NAME]Accuracy-Flip``, then
``Max of [NAME] is ...``, as insightface prints them.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from recognition.common import ToolkitError, atomic_write, parse_ctx

logger = logging.getLogger("recognition")

DEFAULT_TARGETS = "lfw,cfp_ff,cfp_fp,agedb_30"  # insightface eval/verification.py
# flags only insightface's convention has; any of them (or a --model without one ,EPOCH) selects it
MARKERS = ("--data-dir", "--gpu", "--max", "--mode")


@dataclass(frozen=True)
class VerifyRequest:
    """What an insightface-style command asks for: ``models`` spec (``PREFIX``, ``PREFIX,E`` or ``PREFIX,E1|E2``),
    ``targets`` ``((name, path, explicit), ...)``, ``ctx`` spec, ``batch_size``, ``nfolds``, ``mode``, ``max``
    ``(a, b)`` or None, ``image_size`` (H, W)."""

    model: str
    targets: Tuple[Tuple[str, str, bool], ...]
    ctx: str
    batch_size: int
    nfolds: int
    mode: int
    max: Optional[Tuple[int, int]]
    image_size: Tuple[int, int]
    data_dir: str = ""


def is_insightface_argv(argv: Sequence[str]) -> bool:
    """True when ``argv`` uses insightface's convention (a flag only it has, or ``--model`` naming several or no
    epochs)."""
    argv = list(argv)
    if any(a.split("=")[0] in MARKERS for a in argv):
        return True
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--model=") else (argv[i + 1] if a == "--model" and
                                                                     i + 1 < len(argv) else None)
        if value is not None and ("," not in value or "|" in value) and not value.endswith(".params"):
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recognition.verification", allow_abbrev=False,
                                description="Verification with insightface's eval/verification.py flags")
    p.add_argument("--data-dir", default="", help="folder holding NAME.bin targets (and property)")
    p.add_argument("--model", default="../model/softmax,50", help="PREFIX,E1|E2 or PREFIX (every epoch found)")
    p.add_argument("--target", default=None, help=f"target names (default {DEFAULT_TARGETS}) or .bin paths")
    p.add_argument("--gpu", type=int, default=None, help="GPU id (default: CUDA_VISIBLE_DEVICES or the CPU)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max", default="", help="A,B: with a bare PREFIX, keep epochs[A:B] of the newest-first list")
    p.add_argument("--mode", type=int, default=0, help="0 accuracy; 2 dump embeddings to temp.bin")
    p.add_argument("--nfolds", type=int, default=10)
    return p


def parse_request(argv: Sequence[str]) -> VerifyRequest:
    """Parse and check insightface-style ``argv`` (no file is read except ``DIR/property``)."""
    args = build_parser().parse_args(list(argv))
    if args.mode not in (0, 2):
        raise ToolkitError(f"--mode {args.mode}: insightface's bad-case mosaics (1) are not built here; use --mode 0 "
                           "(accuracy) or 2 (embeddings to temp.bin)")
    if args.batch_size < 1 or args.nfolds < 2:
        raise ToolkitError(f"--batch-size {args.batch_size} / --nfolds {args.nfolds}: must be >= 1 / >= 2")
    window = None
    if args.max:
        try:
            a, b = (int(v) for v in args.max.split(","))
        except ValueError:
            raise ToolkitError(f"--max {args.max!r}: expected A,B (a slice of the newest-first epochs)") from None
        window = (a, b)
    explicit = args.target is not None
    targets = []
    for name in (args.target if explicit else DEFAULT_TARGETS).split(","):
        name = name.strip()
        if name:
            path = name if name.endswith(".bin") else os.path.join(args.data_dir, name + ".bin")
            targets.append((os.path.splitext(os.path.basename(name))[0], path, explicit))
    size = (112, 112)
    if args.data_dir and os.path.isfile(os.path.join(args.data_dir, "property")):
        from recognition.rec import read_property

        size = tuple(read_property(args.data_dir)[1:])
    ctx = "" if args.gpu is None else f"gpu:{args.gpu}"
    return VerifyRequest(args.model, tuple(targets), ctx, args.batch_size, args.nfolds, args.mode, window, size,
                         args.data_dir)


def model_epochs(spec: str, window: Optional[Tuple[int, int]] = None) -> Tuple[str, List[int]]:
    """``PREFIX,1|2`` -> (PREFIX, [1, 2]); a bare ``PREFIX`` -> every ``PREFIX-NNNN.params`` there, newest first,
    cut to ``epochs[a:b]`` when ``window`` is given and there are more than ``b`` (insightface's ``--max``)."""
    prefix, _, rest = spec.partition(",")
    if rest:
        try:
            return prefix, [int(e) for e in rest.split("|")]
        except ValueError:
            raise ToolkitError(f"--model {spec!r}: expected PREFIX,EPOCH or PREFIX,E1|E2|...") from None
    folder = os.path.dirname(prefix) or "."
    if not os.path.isdir(folder):
        raise ToolkitError(f"--model {spec}: folder {folder} does not exist")
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"-(\d{4})\.params$")
    epochs = sorted((int(m.group(1)) for m in map(pattern.match, os.listdir(folder)) if m), reverse=True)
    if not epochs:
        raise ToolkitError(f"--model {spec}: no {prefix}-NNNN.params found")
    if window and len(epochs) > window[1]:
        epochs = epochs[window[0]:window[1]]
    return prefix, epochs


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run insightface's verification convention; prints its result lines."""
    import numpy as np

    from recognition.verification import Embedder, read_bin, test_bin

    req = parse_request(argv or [])
    prefix, epochs = model_epochs(req.model, req.max)
    sets = []
    for name, path, explicit in req.targets:
        if os.path.isfile(path):
            sets.append((name, path))
        elif explicit:
            raise ToolkitError(f"--target {name}: verification set {path} does not exist")
        else:
            logger.warning("default target %s: %s does not exist; skipped", name, path)
    if not sets:
        raise ToolkitError(f"--data-dir {req.data_dir or '.'}: none of the targets "
                           f"{', '.join(n for n, _, _ in req.targets)} exists there")
    try:
        ctx = parse_ctx(req.ctx or None)
    except ToolkitError as exc:
        if not req.ctx:
            raise
        raise ToolkitError(f"--gpu {req.ctx.split(':')[1]}: {exc}; omit --gpu to use CUDA_VISIBLE_DEVICES or the "
                           "CPU") from None
    print(f"model number {len(epochs)}")
    nets = [(e, Embedder.from_checkpoint(prefix, e, ctx, req.batch_size, (3,) + req.image_size)) for e in epochs]
    data = [(name, read_bin(path, req.image_size)) for name, path in sets]
    if req.mode == 2:
        name, (images, issame) = data[0]
        r = test_bin(([images], issame), nets[0][1], req.batch_size, req.nfolds)
        with atomic_write("temp.bin", "wb") as f:
            pickle.dump((np.asarray(r["embeddings"]), list(issame)), f, protocol=pickle.HIGHEST_PROTOCOL)
        print(f"[{name}] embeddings of epoch {nets[0][0]} written to temp.bin")
        return 0
    for name, (images, issame) in data:
        accs = []
        for _, net in nets:
            r = test_bin(([images], issame), net, req.batch_size, req.nfolds)
            print(f"[{name}]XNorm: {r['xnorm']:f}")
            print(f"[{name}]Accuracy: {r['acc_noflip']:1.5f}+-{r['std_noflip']:1.5f}")
            print(f"[{name}]Accuracy-Flip: {r['acc']:1.5f}+-{r['std']:1.5f}")
            accs.append(r["acc"])
        print(f"Max of [{name}] is {max(accs):1.5f}")
    return 0


__all__ = ["VerifyRequest", "DEFAULT_TARGETS", "is_insightface_argv", "build_parser", "parse_request",
           "model_epochs", "main"]
