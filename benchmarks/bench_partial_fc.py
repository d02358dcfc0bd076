"""Step time and fc7 memory per device of the model-parallel classifier at several Partial FC sample ratios.

Only the fc7 part is timed (forward, cross-shard softmax, backward, SGD update) on random embeddings: the
backbone's cost does not depend on the ratio. Memory is what the shards hold in NDArrays (weights, momentum,
gradients, logits; MXNet's own workspace excluded), per device.

    python benchmarks/bench_partial_fc.py                      # C=100000, E=128, batch 64, cpu:0,cpu:1
    python benchmarks/bench_partial_fc.py --classes 20000 --steps 5 --ratios 1,0.1

On a shared machine the times are noisy: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import numpy as np


def bench(num_classes: int, emb: int, batch: int, ratio: float, ctx_spec: str, steps: int, warmup: int,
          seed: int = 0) -> dict:
    """Median seconds per step and bytes per device for one ratio."""
    import mxnet as mx

    from recognition.common import parse_ctx
    from recognition.heads import make_loss_config
    from recognition.parallel_fc import ModelParallelFC

    ctx = parse_ctx(ctx_spec)
    fc = ModelParallelFC(num_classes, emb, make_loss_config("arcface"), ctx, batch, sample_ratio=ratio, seed=seed)
    fc.init_params(seed=seed)
    fc.init_optimizer("sgd", dict(learning_rate=0.1, momentum=0.9, wd=5e-4))
    rng = np.random.RandomState(seed)
    times = []
    for i in range(warmup + steps):
        emb_nd = mx.nd.array(rng.normal(0, 1, (batch, emb)).astype(np.float32), ctx=ctx[0])
        labels = rng.randint(0, num_classes, batch)
        t0 = time.perf_counter()
        _, _, grad = fc.forward_backward(emb_nd, labels)
        fc.update()
        grad.wait_to_read()
        mx.nd.waitall()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return dict(ratio=ratio, step_s=float(np.median(times)), mem=fc.memory_bytes(),
                rows=[s.hi - s.lo for s in fc.shards],
                sampled=[getattr(s, "num_sample", s.hi - s.lo) for s in fc.shards])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--classes", type=int, default=100000)
    p.add_argument("--emb-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ctx", default="cpu:0,cpu:1")
    p.add_argument("--ratios", default="1,0.3,0.1")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"fc7 {args.classes} x {args.emb_size}, batch {args.batch}, devices {args.ctx}, ArcFace, SGD momentum; "
          f"median of {args.steps} steps")
    print(f"{'ratio':>6} {'rows/device':>14} {'sampled/device':>16} {'step ms':>9} {'MiB/device':>18}")
    for r in ratios:
        res = bench(args.classes, args.emb_size, args.batch, r, args.ctx, args.steps, args.warmup)
        mem = "/".join(f"{m / 2 ** 20:.1f}" for m in res["mem"])
        print(f"{r:>6g} {'/'.join(map(str, res['rows'])):>14} {'/'.join(map(str, res['sampled'])):>16} "
              f"{res['step_s'] * 1e3:>9.1f} {mem:>18}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
