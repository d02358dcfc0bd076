"""Throughput of FaceImageIter against a plain single-threaded RecordIO loop (read, decode, mirror, one by one).

Generates a synthetic rec (default 5,000 images of 112x112 JPEG) in a temporary folder, then prints images/s of:
the baseline (``MXIndexedRecordIO.read_idx`` + ``mx.image.imdecode`` + mirror, batch 128, like the reference
iterator), and FaceImageIter (batch 128, mirror on) with 1 and 2 worker threads; and the peak RSS.
Figures depend on what else runs on the machine.

Usage::

    python benchmarks/bench_iter.py [--images 5000] [--batches 30]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from typing import Optional, Sequence

import mxnet as mx
import numpy as np

from datasets.synth import generate_dataset
from recognition.common import run_cli
from recognition.image_iter import FaceImageIter


def baseline(rec: str, idx: str, batch: int, batches: int, seed: int = 0) -> float:
    """images/s of a single-threaded read + decode + mirror loop building (B, 3, 112, 112) float32 batches."""
    r = mx.recordio.MXIndexedRecordIO(idx, rec, "r")
    h0, _ = mx.recordio.unpack(r.read_idx(0))
    keys = list(range(1, int(h0.label[0])))
    rng = np.random.RandomState(seed)
    order = rng.permutation(keys)
    t = time.perf_counter()
    for b in range(batches):
        data = np.empty((batch, 3, 112, 112), np.float32)
        for i, k in enumerate(order[b * batch:(b + 1) * batch]):
            _, s = mx.recordio.unpack(r.read_idx(int(k)))
            img = mx.image.imdecode(s)
            if rng.randint(2):
                img = mx.nd.flip(img, axis=1)
            data[i] = img.asnumpy().transpose(2, 0, 1)
        mx.nd.array(data)
    return batches * batch / (time.perf_counter() - t)


def face_iter(rec: str, batch: int, batches: int, workers: int) -> float:
    """images/s of FaceImageIter (mirror on), batches delivered as mx.nd arrays."""
    it = FaceImageIter(rec, batch, rand_mirror=True, num_workers=workers, seed=0)
    it.next()  # warm-up: threads started
    t = time.perf_counter()
    n = 0
    while n < batches:
        try:
            b = it.next()
        except StopIteration:
            it.reset()
            continue
        b.data[0].wait_to_read()
        n += 1
    rate = batches * batch / (time.perf_counter() - t)
    it.close()
    return rate


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/bench_iter.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000, help="images in the generated rec")
    ap.add_argument("--batches", type=int, default=30, help="batches of 128 timed per run")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        info = generate_dataset(tmp, num_classes=args.images // 20, images_per_class=20, bin_names=(), workers=2)
        print(f"generated {info['num_images']} images in {time.perf_counter() - t:.1f}s")
        b, n = args.batch_size, args.batches
        base = baseline(info["rec"], info["idx"], b, min(n, info["num_images"] // b))
        print(f"baseline (single thread, read+decode+mirror): {base:8.0f} images/s")
        for w in (1, 2):
            rate = face_iter(info["rec"], b, n, w)
            print(f"FaceImageIter num_workers={w}:                {rate:8.0f} images/s  ({rate / base:.1f}x)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
