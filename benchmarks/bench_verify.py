"""Benchmark verification on a synthetic insightface .bin: decode, embedding throughput, maths, peak memory.

    python benchmarks/bench_verify.py                       # 12,000 images (6,000 pairs), y1, batch 64
    python benchmarks/bench_verify.py --num-images 1200 --network fixture

Prints seconds per stage, images/s of embedding (original + mirror both count) and peak RSS. Figures on a shared
machine are noisy: repeat and compare like with like. The network is ``recognition.backbones`` y1 with random
weights (same FLOPs as a trained one) unless ``--network fixture`` (the real ../shared checkpoint) is chosen.
"""
from __future__ import annotations

import argparse
import os
import pickle
import resource
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from recognition import verification as V
from recognition.common import ToolkitError, run_cli


def synth_bin(path: str, num_images: int, seed: int = 0) -> None:
    """Write a ``.bin`` of ``num_images`` smooth random 112x112 JPEGs and alternating issame flags."""
    import cv2

    rng = np.random.RandomState(seed)
    bins = []
    for _ in range(num_images):
        small = rng.randint(0, 256, (8, 8, 3)).astype(np.uint8)
        img = cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC)
        bins.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    with open(path, "wb") as f:
        pickle.dump((bins, [bool(i % 2) for i in range(num_images // 2)]), f, protocol=2)


def build_embedder(network: str, batch_size: int, backend: str = "mxnet"):
    """y1 (random init, from recognition.backbones) or the real fixture checkpoint, on ``backend``."""
    import mxnet as mx

    if network == "fixture":
        from recognition.common import load_checkpoint

        prefix = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                              "fixtures", "model-y1-test2", "model")
        sym, arg, aux = load_checkpoint(prefix, 0)
        return V.make_embedder(V.cut_at_embedding(sym, prefix), arg, aux, mx.cpu(), batch_size, backend=backend)
    from recognition.backbones import get_symbol

    sym = get_symbol(network)
    mod = mx.mod.Module(sym, label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", (1, 3, 112, 112))], for_training=False)
    mod.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
    args, aux = mod.get_params()
    return V.make_embedder(sym, args, aux, mx.cpu(), batch_size, backend=backend)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Verification benchmark on a synthetic .bin")
    p.add_argument("--num-images", type=int, default=12000)
    p.add_argument("--network", default="y1", help="backbone name from recognition.backbones, or 'fixture'")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bin", default="", help="reuse this .bin instead of generating one")
    p.add_argument("--backend", default="mxnet", choices=V.BACKENDS, help="inference engine (see ifr-verify)")
    args = p.parse_args(argv)
    if args.num_images < 20 or args.num_images % 2:
        raise ToolkitError(f"--num-images {args.num_images}: need an even number >= 20")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.bin or os.path.join(tmp, "synth.bin")
        t0 = time.time()
        if not args.bin:
            synth_bin(path, args.num_images)
        t_gen = time.time() - t0
        t0 = time.time()
        images, issame = V.read_bin(path)
        t_read = time.time() - t0
        rss_read = peak_rss_mb()
        embedder = build_embedder(args.network, args.batch_size, args.backend)
        t0 = time.time()
        emb, emb_flip, _ = V.embed_pairs(([images], issame), embedder, args.batch_size, progress=True)
        t_embed = time.time() - t0
        t0 = time.time()
        res = V.evaluate(V._l2n(emb + emb_flip), issame, 10)
        t_maths = time.time() - t0
    n = len(images)
    print(f"images {n} ({n // 2} pairs), network {args.network}, backend {args.backend}, batch {args.batch_size}, "
          f"MXNET_SUBGRAPH_BACKEND={os.environ.get('MXNET_SUBGRAPH_BACKEND')}")
    print(f"generate .bin       {t_gen:8.2f} s")
    print(f"read+decode .bin    {t_read:8.2f} s  ({n / t_read:.0f} images/s; peak RSS so far {rss_read:.0f} MB)")
    print(f"embed (img+mirror)  {t_embed:8.2f} s  ({2 * n / t_embed:.1f} images/s forward)")
    print(f"10-fold maths+ROC   {t_maths:8.2f} s")
    print(f"verification total  {t_read + t_embed + t_maths:8.2f} s  (acc {res['acc']:.4f} on random faces)")
    print(f"peak RSS            {peak_rss_mb():8.0f} MB")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
