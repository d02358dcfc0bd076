"""Export a checkpoint's embedding graph (``fc1_output``) to ONNX, repair it, and check it against MXNet.

    python deploy/export_onnx.py --model ../models/model-y1-test2/model,0 --output y1.onnx [--dynamic-batch]

The graph is cut at ``fc1_output`` (a training checkpoint's fc7/softmax are dropped), exported with MXNet's own
ONNX converter (``mx.onnx``, needs ``onnx<1.16``: ``pip install -e .[onnx]``), repaired (see
:mod:`deploy.onnx_fix` for what the raw export gets wrong and why), then run through onnxruntime on random
0-255 inputs: every row's cosine with MXNet's embedding must exceed 0.99999, or nothing is written.
Input ``data`` (N, 3, H, W) float32 RGB 0-255 (normalisation is inside the graph); output (N, E) un-normalised.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple
from unittest import mock

import numpy as np

from recognition.common import ToolkitError, atomic_write, load_checkpoint, parse_prefix_epoch, run_cli

logger = logging.getLogger("deploy.export_onnx")

SUPPORTED_OPSETS = (12, 13)  # mxnet 1.9.1 registers translations for these two only
MIN_COSINE = 0.99999


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ToolkitError(f"ONNX export needs onnx<1.16 and onnxruntime ({exc}); "
                           f"install them with: pip install -e .[onnx]") from None
    if not hasattr(onnx, "mapping"):
        raise ToolkitError(f"onnx {onnx.__version__} is too new for mxnet 1.9.1's exporter (it needs onnx.mapping, "
                           f"gone in 1.16); install onnx<1.16: pip install -e .[onnx]")
    return onnx, onnxruntime


def _convert(symbol, params: dict, in_shape: tuple, opset: int, dynamic: bool):
    """Run mxnet's converter (what ``mx.onnx.export_model`` wraps) at an explicit opset; returns a ModelProto.

    ``export_model`` itself always stamps the installed onnx's newest opset (20 for onnx 1.15) on nodes that
    follow the opset-13 translations; calling the converter directly keeps the stamp honest and ``--opset`` real.
    """
    import onnx
    from mxnet.onnx.mx2onnx._export_onnx import MXNetGraph
    from onnx import TensorProto, helper

    dyn_shapes = [(None,) + tuple(in_shape[1:])] if dynamic else None
    quiet = _DropDotWarning()
    logging.getLogger().addFilter(quiet)
    try:
        # The converter ends with onnx.checker.check_graph(graph), which validates against the *newest* opset of
        # the installed onnx, so opset-13 nodes such as ReduceMean(axes=...) fail it (axes became an input in 18).
        # Skip that call here; fix_onnx_model checks the whole model at its real opset instead.
        with mock.patch.object(onnx.checker, "check_graph", lambda *a, **k: None):
            graph = MXNetGraph().create_onnx_graph_proto(symbol, params, [in_shape], [TensorProto.FLOAT],
                                                         verbose=False, opset_version=opset, dynamic=dynamic,
                                                         dynamic_input_shapes=dyn_shapes)
    except AttributeError as exc:
        msg = str(exc)
        if "No conversion function registered for op type" in msg:
            op = msg.split("op type", 1)[1].replace("yet.", "").strip()
            raise ToolkitError(f"the ONNX exporter does not support operator {op!r} "
                               f"(used by this graph; mxnet {_mx_version()}, opset {opset})") from None
        raise
    except (NotImplementedError, ValueError, KeyError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ToolkitError(f"the ONNX exporter cannot convert this graph: {first}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             producer_name="insightface-finetune")


class _DropDotWarning(logging.Filter):
    """The converter warns once per ``dot`` node about >2-D inputs; the embedding check covers that case."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Converting dot operator" not in record.getMessage()


def _mx_version() -> str:
    import mxnet as mx

    return mx.__version__


def _session(onnxruntime, blob: bytes):
    opts = onnxruntime.SessionOptions()
    opts.log_severity_level = 3  # keep onnxruntime's warnings off the user's terminal
    try:
        return onnxruntime.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ToolkitError(f"onnxruntime rejects the repaired graph: {str(exc).splitlines()[0]}") from None


def compare_embeddings(ref: np.ndarray, got: np.ndarray) -> Dict[str, float]:
    """Row-wise cosine and max abs difference between two (N, E) embedding arrays."""
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    denom = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cos = (ref * got).sum(axis=1) / np.maximum(denom, 1e-12)
    return {"min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(ref - got).max())}


def build_onnx(emb_sym, arg_params: dict, aux_params: dict, in_shape: Sequence[int], opset: int = 13,
               dynamic_batch: bool = True, where: str = "checkpoint") -> Tuple[bytes, List[str]]:
    """Convert an embedding graph + parameters to repaired ONNX bytes in memory; returns ``(blob, fixes)``.

    ``in_shape`` (N, C, H, W) of input ``data``; the output is the graph's (N, E). Nothing is checked against MXNet
    here: :func:`export_onnx` and :class:`deploy.onnx_embed.OnnxEmbedder` do that.
    """
    onnx, _ = _import_onnx()
    from deploy.onnx_fix import explicit_defaults, fix_onnx_model, honour_fix_gamma, lower_for_onnx
    from recognition.backbones.fast_prelu import convert_prelu

    if opset not in SUPPORTED_OPSETS:
        raise ToolkitError(f"--opset {opset}: mxnet {_mx_version()} exports opsets "
                           f"{', '.join(map(str, SUPPORTED_OPSETS))} only")
    emb_sym = convert_prelu(emb_sym, "stock")  # a training graph's bn PReLU: export insightface's operator
    needed = [n for n in emb_sym.list_arguments() if n != "data"] + emb_sym.list_auxiliary_states()
    have = dict(arg_params, **aux_params)
    missing = [n for n in needed if n not in have]
    if missing:
        raise ToolkitError(f"{where} lacks {len(missing)} parameter(s) the graph needs: "
                           f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    params = {n: have[n] for n in needed}
    in_shape = tuple(int(d) for d in in_shape)
    fixes: List[str] = []
    export_sym, changed = explicit_defaults(emb_sym)
    if changed:
        fixes.append(f"wrote {len(changed)} omitted boolean attribute(s) explicitly (e.g. {changed[0]})")
    export_sym, lowered = lower_for_onnx(export_sym, in_shape)
    if lowered:
        fixes.append(f"rewrote {len(lowered)} reshape/dot node(s) for ONNX (e.g. {lowered[0]})")
    params, fixed_gamma = honour_fix_gamma(export_sym, params)
    if fixed_gamma:
        fixes.append(f"exported gamma=1 for {len(fixed_gamma)} BatchNorm(fix_gamma=True): {', '.join(fixed_gamma[:4])}"
                     f"{' ...' if len(fixed_gamma) > 4 else ''}")
    model = _convert(export_sym, params, in_shape, opset, dynamic_batch)
    try:
        model, graph_fixes = fix_onnx_model(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ToolkitError(f"the exported graph is not valid ONNX even after repair: "
                           f"{(str(exc).splitlines() or [''])[0]}") from None
    fixes.extend(graph_fixes)
    return model.SerializeToString(), fixes


def export_onnx(prefix: str, epoch: int, output: str, dynamic_batch: bool = False, batch_size: int = 1,
                opset: int = 13, image_size: Sequence[int] = (112, 112), seed: int = 0) -> Dict:
    """Export ``PREFIX-%04d.params`` cut at ``fc1_output`` to ``output`` (atomically) after checking it.

    Returns a report dict: ``output, opset, input_shape, dynamic_batch, output_name, embedding_size, fixes``
    (list of repairs made) and ``checks`` (per batch size: ``batch, min_cosine, max_abs_diff``).
    Raises ToolkitError for a bad checkpoint, an unsupported operator, or embeddings that differ from MXNet's.
    """
    onnx, onnxruntime = _import_onnx()
    import mxnet as mx

    from recognition.verification import Embedder, cut_at_embedding

    if opset not in SUPPORTED_OPSETS:
        raise ToolkitError(f"--opset {opset}: mxnet {_mx_version()} exports opsets "
                           f"{', '.join(map(str, SUPPORTED_OPSETS))} only")
    if os.path.isdir(output):
        raise ToolkitError(f"--output {output}: is a folder; name the .onnx file to write")
    if batch_size < 1:
        raise ToolkitError(f"--batch-size {batch_size}: must be at least 1")
    h, w = (int(v) for v in image_size)
    symbol, arg_params, aux_params = load_checkpoint(prefix, epoch)
    emb_sym = cut_at_embedding(symbol, f"{prefix}-symbol.json")
    blob, fixes = build_onnx(emb_sym, arg_params, aux_params, (batch_size, 3, h, w), opset, dynamic_batch,
                             where=f"{prefix}-{epoch:04d}.params")
    model = onnx.load_from_string(blob)
    onnx.helper.set_model_props(model, {"source": f"{os.path.basename(prefix)},{epoch}", "embedding": "fc1_output",
                                        "input": "data: float32 NCHW RGB 0-255 (normalised inside the graph)"})
    blob = model.SerializeToString()

    sess = _session(onnxruntime, blob)
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    sizes = [batch_size, batch_size + 2] if dynamic_batch else [batch_size]
    rng = np.random.RandomState(seed)
    embed = Embedder(emb_sym, arg_params, aux_params, ctx=[mx.cpu()], batch_size=max(sizes), data_shape=(3, h, w),
                     optimize=False)  # the reference is the checkpoint's graph as it is
    checks = []
    for n in sizes:
        x = rng.uniform(0, 255, size=(n, 3, h, w)).astype(np.float32)
        ref = embed(x)
        try:
            got = sess.run([out_name], {in_name: x})[0]
        except Exception as exc:
            raise ToolkitError(f"onnxruntime fails to run the exported graph at batch {n}: "
                               f"{str(exc).splitlines()[0]}") from None
        if got.shape != ref.shape:
            raise ToolkitError(f"onnxruntime output shape {got.shape} differs from MXNet's {ref.shape} at batch {n}")
        stats = dict(batch=n, **compare_embeddings(ref, got))
        checks.append(stats)
        if not stats["min_cosine"] > MIN_COSINE:
            raise ToolkitError(f"onnxruntime embeddings differ from MXNet's at batch {n}: min cosine "
                               f"{stats['min_cosine']:.6f} (need > {MIN_COSINE}), max abs diff "
                               f"{stats['max_abs_diff']:.3g}; {output} not written")
    with atomic_write(output, "wb") as f:
        f.write(blob)
    return {"output": output, "opset": opset, "input_shape": ["N" if dynamic_batch else batch_size, 3, h, w],
            "dynamic_batch": bool(dynamic_batch), "input_name": in_name, "output_name": out_name,
            "embedding_size": embed.embedding_size, "fixes": fixes, "checks": checks,
            "bytes": len(blob)}


def _image_size(text: str) -> tuple:
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise ToolkitError(f"--image-size {text!r}: expected H,W or one size (e.g. 112,112)")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a checkpoint's embedding (fc1_output) to ONNX and check it "
                                            "against MXNet with onnxruntime.")
    p.add_argument("--model", required=True, help="checkpoint PREFIX,EPOCH (full or slim)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension (checked at 2 sizes)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of the exported input (default 1)")
    p.add_argument("--opset", type=int, default=13, choices=SUPPORTED_OPSETS, help="ONNX opset (default 13)")
    p.add_argument("--image-size", default="112,112", help="input H,W (default 112,112)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random check inputs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    prefix, epoch = parse_prefix_epoch(args.model, "--model")
    report = export_onnx(prefix, epoch, args.output, dynamic_batch=args.dynamic_batch, batch_size=args.batch_size,
                         opset=args.opset, image_size=_image_size(args.image_size), seed=args.seed)
    for fix in report["fixes"]:
        print(f"fix: {fix}")
    for c in report["checks"]:
        print(f"check batch {c['batch']}: min cosine {c['min_cosine']:.8f}, max abs diff {c['max_abs_diff']:.3g}")
    print(f"wrote {report['output']} ({report['bytes'] / 1e6:.1f} MB, opset {report['opset']}, input "
          f"{report['input_name']} {tuple(report['input_shape'])}, output {report['output_name']} "
          f"(N, {report['embedding_size']}))")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
