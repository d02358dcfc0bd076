"""Training-step throughput per backbone: forward + backward + SGD update through ``mx.mod.Module``.

Data loading is excluded (one synthetic batch is reused); a small softmax classifier (``fc7``) sits on
``fc1_output`` so the step is a real training step. Each configuration runs in its own process so that
the peak RSS figure belongs to it alone. Prints samples/s for ``prelu='fast'`` and ``'stock'`` and the ratio.

    python benchmarks/bench_train.py --networks y1,tiny,r18,r50 --batch-size 32 --steps 5
    python benchmarks/bench_train.py --networks y1 --mirror      # also MXNET_BACKWARD_DO_MIRROR=1
    python benchmarks/bench_train.py --networks y1 --prelu relu,bn,fast,stock   # y1: bn ~0.7-0.78x relu, fast ~0.48x

Figures depend on the machine and on what else runs on it; on a shared 2-core machine they are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import List, Optional, Sequence

from recognition.common import ToolkitError, run_cli


def measure(network: str, batch_size: int, prelu: str, steps: int, warmup: int = 2, num_classes: int = 100,
            seed: int = 0, ctx: str = "cpu") -> dict:
    """Time ``steps`` training steps of ``network`` at ``batch_size`` in this process.

    Returns ``{'samples_per_s', 'step_s', 'peak_rss_mb'}`` (peak RSS of this process so far).
    """
    import mxnet as mx
    import numpy as np

    from recognition.backbones import get_symbol
    from recognition.common import parse_ctx

    mx.random.seed(seed)
    rng = np.random.RandomState(seed)
    # 'relu' is a yardstick only (ReLU in place of PReLU: different parameters), to read figures on a busy machine
    emb = get_symbol(network, act_type="relu") if prelu == "relu" else get_symbol(network, prelu=prelu)
    fc7 = mx.sym.FullyConnected(emb, num_hidden=num_classes, name="fc7")
    sym = mx.sym.SoftmaxOutput(fc7, name="softmax")
    mod = mx.mod.Module(sym, data_names=["data"], label_names=["softmax_label"], context=parse_ctx(ctx))
    mod.bind(data_shapes=[("data", (batch_size, 3, 112, 112))], label_shapes=[("softmax_label", (batch_size,))])
    mod.init_params(mx.init.Xavier(rnd_type="gaussian", factor_type="out", magnitude=2))
    mod.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.01, "momentum": 0.9, "wd": 5e-4})
    batch = mx.io.DataBatch(data=[mx.nd.array(rng.uniform(0, 255, (batch_size, 3, 112, 112)))],
                            label=[mx.nd.array(rng.randint(0, num_classes, batch_size))])

    def step():
        mod.forward(batch, is_train=True)
        mod.backward()
        mod.update()

    for _ in range(warmup):
        step()
    mx.nd.waitall()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    mx.nd.waitall()
    elapsed = (time.perf_counter() - start) / steps
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"samples_per_s": batch_size / elapsed, "step_s": elapsed, "peak_rss_mb": peak_kb / 1024.0}


def run_isolated(network: str, batch_size: int, prelu: str, steps: int, mirror: bool = False,
                 ctx: str = "cpu") -> dict:
    """:func:`measure` in a child process (fresh peak RSS; ``MXNET_BACKWARD_DO_MIRROR`` set before MXNet loads)."""
    env = dict(os.environ)
    env["MXNET_BACKWARD_DO_MIRROR"] = "1" if mirror else "0"
    env.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")
    cmd = [sys.executable, os.path.abspath(__file__), "--_single", json.dumps([network, batch_size, prelu, steps, ctx])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ToolkitError(f"benchmark of {network} (batch {batch_size}, prelu={prelu}) failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="y1,tiny,r18,r50", help="comma-separated network names")
    parser.add_argument("--batch-size", default="32", help="comma-separated batch sizes, e.g. 16,32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 2 warm-up)")
    parser.add_argument("--ctx", default="cpu", help="devices, e.g. gpu:0 (the batch is split across them)")
    parser.add_argument("--prelu", default="bn,stock",
                        help="PReLU formulations to compare (fast, stock, bn; 'relu' = ReLU yardstick, other params)")
    parser.add_argument("--mirror", action="store_true", help="also run with MXNET_BACKWARD_DO_MIRROR=1")
    parser.add_argument("--_single", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _ints(text: str, flag: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ToolkitError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) <= 0:
        raise ToolkitError(f"{flag} {text!r}: expected positive integers")
    return values


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args._single:
        network, batch_size, prelu, steps, ctx = json.loads(args._single)
        print(json.dumps(measure(network, batch_size, prelu, steps, ctx=ctx)))
        return 0
    from recognition.backbones import default_emb_size
    from recognition.backbones.layers import check_prelu_mode

    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    for name in networks:
        default_emb_size(name)  # unknown names fail here, before any timing
    modes = [m.strip() for m in args.prelu.split(",") if m.strip()]
    for mode in modes:
        if mode != "relu":
            check_prelu_mode(mode)
    batches = _ints(args.batch_size, "--batch-size")
    if args.steps <= 0:
        raise ToolkitError(f"--steps {args.steps}: must be positive")
    mirrors = [False, True] if args.mirror else [False]
    print(f"{'network':<12}{'batch':>6}{'mirror':>7}" + "".join(f"{m + ' sps':>12}{'rss MB':>9}" for m in modes)
          + (f"   {modes[0]}/stock" if "stock" in modes and modes[0] != "stock" else ""), flush=True)
    for name in networks:
        for batch_size in batches:
            for mirror in mirrors:
                res = {m: run_isolated(name, batch_size, m, args.steps, mirror, args.ctx) for m in modes}
                line = f"{name:<12}{batch_size:>6}{'on' if mirror else 'off':>7}"
                line += "".join(f"{res[m]['samples_per_s']:>12.2f}{res[m]['peak_rss_mb']:>9.0f}" for m in modes)
                if "stock" in res and modes[0] != "stock":
                    line += f"   {res[modes[0]]['samples_per_s'] / res['stock']['samples_per_s']:>9.2f}x"
                print(line, flush=True)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
