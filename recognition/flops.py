"""FLOPs and parameter count of an embedding graph, as insightface's ``common/flops_counter.py`` counts them.

    python -m recognition.flops --network r100
    python -m recognition.flops --model ../models/model-y1-test2/model,0
    python recognition/train.py ... --set count_flops=true      # logged at train start, as insightface's

Counted (insightface's convention; every other op is free): a ``Convolution`` costs
``(2 * C_in * kh * kw - [no bias]) * H_out * W_out * C_out / num_group`` and a ``FullyConnected``
``2 * in * out - [no bias] * out``: a multiply and an add per weight, the bias add only when there is a bias.
Parameters: every argument except the data input and labels (auxiliary BatchNorm statistics excluded).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from recognition.common import ToolkitError, run_cli, symbol_graph

logger = logging.getLogger("recognition")


def _true(value) -> bool:
    return str(value) in ("True", "true", "1")


def _tuple(text) -> Tuple[int, ...]:
    return tuple(int(v) for v in str(text).strip("()[] ").split(",") if v.strip())


def count_flops(symbol, data_shape: Tuple[int, ...] = (1, 3, 112, 112)) -> int:
    """FLOPs of one forward pass of ``symbol`` for input ``data`` of ``data_shape`` (N, C, H, W), insightface's
    convention (module docstring); N should be 1."""
    internals = symbol.get_internals()
    _, out_shapes, _ = internals.infer_shape(data=tuple(data_shape))
    shape_of = dict(zip(internals.list_outputs(), out_shapes))
    nodes = symbol_graph(symbol)["nodes"]

    def out_shape(idx: int):
        node = nodes[idx]
        return shape_of.get(node["name"] + "_output", shape_of.get(node["name"]))

    total = 0
    for idx, node in enumerate(nodes):
        op = node["op"]
        if op not in ("Convolution", "FullyConnected"):
            continue
        attrs = node.get("attrs", node.get("param", {}))
        no_bias = _true(attrs.get("no_bias", False))
        out = out_shape(idx)
        inp = out_shape(node["inputs"][0][0])
        if op == "Convolution":
            kh, kw = _tuple(attrs["kernel"])[:2]
            per_output = 2 * inp[1] * kh * kw - (1 if no_bias else 0)
            total += int(per_output * out[2] * out[3] * out[1] / int(attrs.get("num_group", 1)))
        else:
            fan_in = int(np.prod(inp[1:]))
            total += 2 * fan_in * out[1] - (out[1] if no_bias else 0)
    return int(total)


def count_params(symbol, data_shape: Tuple[int, ...] = (1, 3, 112, 112)) -> int:
    """Number of learnable parameters (arguments other than ``data`` and ``*_label``)."""
    arg_shapes, _, _ = symbol.infer_shape(data=tuple(data_shape))
    return int(sum(int(np.prod(s)) for name, s in zip(symbol.list_arguments(), arg_shapes)
                   if name != "data" and not name.endswith("_label")))


def flops_str(flops: float) -> str:
    """``2.3G``-style text as insightface prints it (one decimal, T/G/M/K)."""
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if flops // scale > 0:
            return f"{flops / scale:.1f}{unit}"
    return f"{float(flops):.1f}"


def log_flops(symbol, data_shape: Tuple[int, int, int]) -> Dict[str, int]:
    """Log ``Network FLOPs: ...`` (insightface's line) and the parameter count; ``data_shape`` (3, H, W)."""
    shape = (1,) + tuple(data_shape)
    result = {"flops": count_flops(symbol, shape), "params": count_params(symbol, shape)}
    logger.info("Network FLOPs: %s (%d); parameters: %d", flops_str(result["flops"]), result["flops"],
                result["params"])
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recognition.flops", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--network", help="registered network name (r100, y1, m1, ...)")
    src.add_argument("--model", help="checkpoint PREFIX,EPOCH (its graph cut at fc1_output)")
    parser.add_argument("--emb-size", type=int, default=None, help="embedding width (--network only)")
    parser.add_argument("--version-output", default=None, help="head kind (--network only), e.g. E, GDC")
    parser.add_argument("--image-size", default="112,112", help="H,W")
    args = parser.parse_args(argv)
    try:
        h, w = _tuple(args.image_size)
    except ValueError:
        raise ToolkitError(f"--image-size {args.image_size!r}: expected H,W such as 112,112") from None
    if args.network:
        from recognition.backbones import get_symbol, network_options

        opts = network_options(args.network, {"net_output": args.version_output})
        symbol = get_symbol(args.network, emb_size=args.emb_size, prelu="stock", **opts)
        name = args.network
    else:
        if args.emb_size or args.version_output:
            raise ToolkitError("--emb-size/--version-output: only with --network (a checkpoint's graph is fixed)")
        from recognition.checkpoint_graph import cut_at_embedding
        from recognition.common import load_checkpoint, parse_prefix_epoch

        prefix, epoch = parse_prefix_epoch(args.model, "--model")
        symbol = cut_at_embedding(load_checkpoint(prefix, epoch)[0])
        name = args.model
    flops = count_flops(symbol, (1, 3, h, w))
    params = count_params(symbol, (1, 3, h, w))
    print(f"{name}: FLOPs {flops_str(flops)} ({flops}), parameters {params} ({params / 1e6:.2f}M), "
          f"input 1x3x{h}x{w}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
