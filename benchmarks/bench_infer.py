"""Inference speed of every backend side by side in one process: faces/s at batch 1 and 32, flip on and off.

    python benchmarks/bench_infer.py                              # y1 (real checkpoint) and r50, 2 threads
    python benchmarks/bench_infer.py --networks y1 --rounds 5 --threads 1

Backends (``recognition.verification.make_embedder``): ``mxnet-plain`` (the checkpoint graph as it is, what the
toolkit bound before issue 17), ``mxnet`` (the inference form: BatchNorm folded, PReLU on MKLDNN operators; the
default of every inference path) and ``onnx`` (onnxruntime on the toolkit's checked export, what insightface's own
package deploys). ``y1`` is the real ``../shared/fixtures/model-y1-test2`` when present (else y1 with random
weights); ``r50`` and other names come from the backbone registry with random weights and random BatchNorm
statistics, saved in insightface's stock form. Each round times every backend in turn on the same input, so a
busy machine slows all of them alike: read ``x onnx`` (the median over rounds of the per-round speed ratio to
onnxruntime) more than the absolute figures. A face with flip costs two forwards (image + mirror), as in
``FaceModel`` and verification. The cosine column is each backend's worst row against ``mxnet-plain``.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from recognition.common import ToolkitError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "..", "shared", "fixtures", "model-y1-test2", "model")


def random_checkpoint(network: str, seed: int = 0):
    """``(stock embedding symbol, arg, aux)`` of a registry backbone with random weights and BN statistics."""
    from recognition.backbones import get_symbol, random_params
    from recognition.backbones.fast_prelu import checkpoint_form

    sym = get_symbol(network)
    arg, aux = random_params(sym, seed)
    return checkpoint_form(sym, arg, aux)


def load_network(name: str):
    """``(label, symbol cut at fc1_output, arg, aux)``; ``y1`` is the real checkpoint when ../shared has it."""
    from recognition.checkpoint_graph import cut_at_embedding
    from recognition.common import load_checkpoint

    if name == "y1" and os.path.isfile(FIXTURE + "-0000.params"):
        sym, arg, aux = load_checkpoint(FIXTURE, 0)
        return "y1 (model-y1-test2)", cut_at_embedding(sym, FIXTURE), arg, aux
    sym, arg, aux = random_checkpoint(name)
    return f"{name} (random weights)", sym, arg, aux


def set_threads(threads: int) -> None:
    """MXNet's OpenMP threads for this process (onnxruntime gets the same through its session options)."""
    from mxnet.base import _LIB

    _LIB.MXSetNumOMPThreads(ctypes.c_int(int(threads)))


def faces(embedder, x: np.ndarray, flip: bool) -> np.ndarray:
    """L2-normalised embeddings of ``x`` (N, 3, H, W) as FaceModel computes them (one call, mirrors appended)."""
    n = x.shape[0]
    if flip:
        out = embedder(np.concatenate([x, x[:, :, :, ::-1]]))
        out = out[:n] + out[n:]
    else:
        out = embedder(x)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def bench_network(name: str, backends: Sequence[str], batch_sizes: Sequence[int], flips: Sequence[bool],
                  rounds: int, min_seconds: float, threads: int) -> List[Dict]:
    """Rows ``{network, backend, batch, flip, best, median, ratio, cosine}`` (faces/s; ratio to onnx)."""
    import mxnet as mx

    from deploy.onnx_embed import OnnxEmbedder
    from recognition.verification import make_embedder

    label, sym, arg, aux = load_network(name)
    bound = 2 * max(batch_sizes)
    t0 = time.time()
    embedders = {}
    for b in backends:
        t = time.time()
        if b == "onnx":
            embedders[b] = OnnxEmbedder(sym, arg, aux, batch_size=bound, threads=threads, check=False)
        else:
            embedders[b] = make_embedder(sym, arg, aux, mx.cpu(), bound, backend=b)
        print(f"{label}: {b} ready in {time.time() - t:.1f}s", flush=True)
    rows = []
    rng = np.random.RandomState(0)
    for bs in batch_sizes:
        x = rng.uniform(0, 255, (bs, 3, 112, 112)).astype(np.float32)
        for flip in flips:
            ref = faces(embedders[backends[0]], x, flip)
            speeds: Dict[str, List[float]] = {b: [] for b in backends}
            cos = {b: float(np.min(np.sum(ref * faces(e, x, flip), axis=1))) for b, e in embedders.items()}
            for _ in range(rounds):
                for b, e in embedders.items():
                    n, t = 0, time.perf_counter()
                    while True:
                        faces(e, x, flip)
                        n += bs
                        if time.perf_counter() - t >= min_seconds:
                            break
                    speeds[b].append(n / (time.perf_counter() - t))
            for b in backends:
                ratio = float(np.median([s / o for s, o in zip(speeds[b], speeds["onnx"])])) \
                    if "onnx" in speeds else float("nan")
                rows.append({"network": label, "backend": b, "batch": bs, "flip": flip,
                             "best": max(speeds[b]), "median": float(np.median(speeds[b])), "ratio": ratio,
                             "cosine": cos[b]})
                r = rows[-1]
                print(f"  {label:22s} {b:12s} batch {bs:3d} flip {'on ' if flip else 'off'} "
                      f"best {r['best']:7.1f}  median {r['median']:7.1f} faces/s  x onnx {ratio:5.2f}  "
                      f"cos {r['cosine']:.7f}", flush=True)
    print(f"{label}: {time.time() - t0:.0f}s", flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Inference faces/s per backend, side by side in one process")
    p.add_argument("--networks", default="y1,r50")
    p.add_argument("--backends", default="mxnet-plain,mxnet,onnx")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--flip", default="on,off", help="on, off or on,off")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each backend once per round)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="time each backend at least this long per round")
    p.add_argument("--threads", type=int, default=2, help="MXNet OpenMP and onnxruntime intra-op threads")
    args = p.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    try:
        sizes = [int(v) for v in args.batch_sizes.split(",") if v]
    except ValueError:
        raise ToolkitError(f"--batch-sizes {args.batch_sizes!r}: expected integers such as 1,32") from None
    flips = [{"on": True, "off": False}.get(v) for v in args.flip.split(",")]
    if None in flips or not flips:
        raise ToolkitError(f"--flip {args.flip!r}: expected on, off or on,off")
    if args.rounds < 1 or args.threads < 1 or not sizes or min(sizes) < 1:
        raise ToolkitError("--rounds, --threads and --batch-sizes must be >= 1")
    set_threads(args.threads)
    print(f"threads {args.threads}, rounds {args.rounds}, load average {os.getloadavg()[0]:.1f}", flush=True)
    for name in [n for n in args.networks.split(",") if n]:
        bench_network(name, backends, sizes, flips, args.rounds, args.min_seconds, args.threads)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
