"""Strip a training checkpoint down to its embedding network (insightface's ``deploy/model_slim.py``).

    python deploy/model_slim.py --model ../models/model-r34-amf/model,0          # writes model-r34-amf/models-0000

The graph is cut at ``fc1_output``; the classifier (``fc7``), the loss nodes and every array only they use are
removed. The slim model computes exactly the same embeddings. Existing files are never overwritten. A model that is
already slim is reported as such and not copied; ``PREFIX-meta.json`` (network, verified thresholds) follows the model.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np

from recognition.checkpoint_graph import EMBEDDING_NODE
from recognition.common import (
    DefaultsHelpFormatter,
    ToolkitError,
    load_checkpoint,
    parse_prefix_epoch,
    run_cli,
    save_checkpoint,
)
from recognition.load_report import read_meta, write_meta
from recognition.pretrained import cut_at_embedding


def _size(path: str) -> str:
    n = os.path.getsize(path)
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n / 1024:.1f} KiB"


def parse_output(spec: Optional[str], prefix: str) -> tuple:
    """``--output PREFIX2[,EPOCH]`` -> ``(prefix, epoch)``; default insightface's ``PREFIXs``, epoch 0."""
    if not spec:
        return prefix + "s", 0
    if "," in spec:
        out, _, ep = spec.rpartition(",")
        try:
            return out, int(ep)
        except ValueError:
            raise ToolkitError(f"--output {spec!r}: epoch {ep!r} is not an integer") from None
    return spec, 0


def slim_checkpoint(prefix: str, epoch: int, out_prefix: Optional[str] = None, out_epoch: int = 0) -> dict:
    """Write the embedding-only checkpoint of ``prefix,epoch`` to ``out_prefix,out_epoch`` (default ``PREFIXs,0``).

    Returns ``{'output': (prefix, epoch), 'files': [...], 'removed': [(name, shape)], 'kept': int,
    'size_before': bytes, 'size_after': bytes}``. Refuses to overwrite existing files.
    """
    out_prefix = out_prefix or prefix + "s"
    out_params = "%s-%04d.params" % (out_prefix, out_epoch)
    out_sym = "%s-symbol.json" % out_prefix
    existing = [p for p in (out_params, out_sym) if os.path.exists(p)]
    if existing:
        raise ToolkitError(f"--output: {', '.join(existing)} already exist(s); choose another --output or remove them")
    symbol, arg, aux = load_checkpoint(prefix, epoch)
    slim = cut_at_embedding(symbol, f"--model {prefix},{epoch}")
    keep_arg = {n: arg[n] for n in slim.list_arguments() if n in arg}
    keep_aux = {n: aux[n] for n in slim.list_auxiliary_states() if n in aux}
    missing = [n for n in slim.list_arguments() if n != "data" and n not in arg] + \
        [n for n in slim.list_auxiliary_states() if n not in aux]
    if missing:
        raise ToolkitError(f"--model {prefix},{epoch}: the params file lacks {len(missing)} array(s) the embedding "
                           f"graph needs: {', '.join(missing[:5])}")
    removed = [(n, tuple(v.shape)) for n, v in sorted(arg.items()) if n not in keep_arg] + \
        [(n, tuple(v.shape)) for n, v in sorted(aux.items()) if n not in keep_aux]
    size_before = os.path.getsize("%s-%04d.params" % (prefix, epoch))
    if not removed and symbol.list_outputs() == [EMBEDDING_NODE]:  # nothing to cut: no copy of the same files
        return {"output": (prefix, epoch), "files": [], "removed": [], "kept": len(keep_arg) + len(keep_aux),
                "size_before": size_before, "size_after": size_before, "already_slim": True}
    files = save_checkpoint(out_prefix, out_epoch, slim, keep_arg, keep_aux)
    meta = read_meta(prefix)
    if meta:  # the sidecar (network, emb size, verified thresholds) follows the model
        write_meta(out_prefix, **dict(meta, slim=True))
    return {"output": (out_prefix, out_epoch), "files": files, "removed": removed,
            "kept": len(keep_arg) + len(keep_aux), "size_before": size_before,
            "size_after": os.path.getsize(out_params), "already_slim": False}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Cut a training checkpoint at fc1_output: drop fc7 and the loss.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint PREFIX,EPOCH (or PREFIX-0000.params)")
    parser.add_argument("--output", default=None,
                        help="output PREFIX[,EPOCH] (default: the input prefix + 's', epoch 0, as insightface)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    prefix, epoch = parse_prefix_epoch(args.model, "--model")
    out_prefix, out_epoch = parse_output(args.output, prefix)
    info = slim_checkpoint(prefix, epoch, out_prefix, out_epoch)
    if info["already_slim"]:
        print(f"{prefix},{epoch} is already slim: its graph ends at {EMBEDDING_NODE} and it holds only the "
              f"{info['kept']} array(s) that needs; nothing to remove, nothing written")
        return 0
    removed: List[tuple] = info["removed"]
    values = sum(int(np.prod(s)) for _, s in removed)
    print(f"removed {len(removed)} array(s) ({values:,} values) not needed for fc1_output:")
    for name, shape in removed:
        print(f"  {name} {shape}")
    print(f"kept {info['kept']} array(s)")
    before = "%s-%04d.params" % (prefix, epoch)
    print(f"{before}: {_size(before)} -> {info['files'][0]}: {_size(info['files'][0])}")
    print(f"wrote {info['files'][0]} and {info['files'][1]} (use as {out_prefix},{out_epoch})")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
