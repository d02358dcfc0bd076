"""Which transfer strategy, with how much data? Pre-train ``tiny`` on synthetic domain A, then adapt it to a shifted
domain B (other people, colder colour cast, stronger side light, larger rotations) with: a linear probe (frozen
network), head-only fine-tuning (embedding layer + fc7), two-stage (head, then all) and full fine-tuning, each at
two data sizes (few vs many images per identity). One table: verification accuracy on B's held-out pairs (people
in neither training set) and wall time.

    python benchmarks/strategies.py --out /tmp/ifr_strategies        # or: bash run.sh strategies

A linear probe does not change the embedding: its verification column is the frozen pretrained network's, and
its own figure is the probe's classification accuracy on held-out images of B's training identities. Every
fine-tuning run gets the same number of steps and an imprinted fc7 (ArcFace by default). Timings share 2 CPU
cores with whatever else runs: read them as rough.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys
import time
from typing import List, Optional, Sequence

from recognition.common import atomic_write, run_cli


def _train(argv: List[str]) -> dict:
    from recognition.train import build_argparser, config_from_args
    from recognition.trainer import run_training

    return run_training(config_from_args(build_argparser().parse_args(argv)))


def _spec(summary: dict) -> str:
    ck = summary["checkpoint"]
    return f"{ck[:-len('-0000.params')]},{int(ck[-11:-7])}"


def _data(out: str, name: str, domain: str, classes: int, per_class: int, seed: int) -> str:
    from datasets.synth import generate_dataset

    path = os.path.join(out, "data", name)
    if not os.path.isfile(os.path.join(path, "train.rec")):
        generate_dataset(path, num_classes=classes, images_per_class=per_class, num_holdout=20, holdout_images=4,
                         num_pairs=200, domain=domain, seed=seed, workers=2)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/ifr_strategies", help="work folder (data, runs, strategies.json)")
    ap.add_argument("--pretrain-steps", type=int, default=100, help="batches of pre-training on domain A")
    ap.add_argument("--pretrain-loss", default="softmax", help="pre-training loss (softmax learns tiny fastest here)")
    ap.add_argument("--pretrain-batch-size", type=int, default=32)
    ap.add_argument("--loss", default="arcface", help="fine-tuning loss")
    ap.add_argument("--steps", type=int, default=60, help="batches per fine-tuning run (two-stage: 1/3 head)")
    ap.add_argument("--per-batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    ap.add_argument("--classes-b", type=int, default=30, help="identities in domain B's training set")
    ap.add_argument("--few", type=int, default=3, help="images per identity, small data")
    ap.add_argument("--many", type=int, default=12, help="images per identity, large data")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from recognition.linear_probe import train_probe
    from recognition.verification import Embedder, verify_targets

    t_all = time.time()
    data_a = _data(args.out, "A", "A", 40, 12, args.seed)
    sizes = {n: _data(args.out, f"B{n}", "B", args.classes_b, n, args.seed + 1) for n in (args.few, args.many)}
    bins = [os.path.join(d, "synth_val.bin") for d in sizes.values()]
    assert filecmp.cmp(bins[0], bins[1], shallow=False), "held-out B pairs differ between data sizes"
    common = ["--network", "tiny", "--target", "synth_val", "--verbose", str(10 ** 6), "--frequent", "20",
              "--ckpt", "0", "--seed", str(args.seed)]
    tune = common + ["--loss", args.loss, "--per-batch-size", str(args.per_batch_size)]
    t0 = time.time()
    pre = _train(common + ["--loss", args.pretrain_loss, "--per-batch-size", str(args.pretrain_batch_size),
                           "--data-dir", data_a, "--max-steps", str(args.pretrain_steps), "--lr", "0.05",
                           "--prefix", os.path.join(args.out, "runs", "pretrain", "model")])
    pre_spec, pre_sec = _spec(pre), time.time() - t0
    # the pretrained network on B's held-out pairs (what the probe and "no fine-tuning" keep)
    prefix, epoch = pre_spec.rsplit(",", 1)
    embed = Embedder.from_checkpoint(prefix, int(epoch), batch_size=32)
    frozen = float(verify_targets(bins[:1], embed, batch_size=32)["synth_val"]["acc"])
    rows = [dict(strategy="pretrained on A (no adaptation)", ipi="-", verify=frozen, probe_acc=None,
                 seconds=round(pre_sec, 1), steps=args.pretrain_steps)]
    head = max(1, args.steps // 3)
    plans = [("head-only", f"head:{args.steps}"), ("two-stage", f"head:{head},all:{args.steps - head}"),
             ("full", f"all:{args.steps}")]
    for ipi, data in sizes.items():
        t0 = time.time()
        probe = train_probe(pre_spec, data, val_split=0.34 if ipi <= 3 else 0.25, seed=args.seed)
        rows.append(dict(strategy="linear probe (frozen embedding)", ipi=ipi, verify=frozen,
                         probe_acc=probe["val_acc"], seconds=round(time.time() - t0, 1), steps=0))
        for name, stages in plans:
            t0 = time.time()
            s = _train(tune + ["--data-dir", data, "--pretrained", pre_spec, "--fc7-init", "imprint", "--stages",
                                 stages, "--lr", str(args.lr),
                                 "--prefix", os.path.join(args.out, "runs", f"{name}-{ipi}", "model")])
            rows.append(dict(strategy=name, ipi=ipi, verify=s["final"]["synth_val"], probe_acc=None,
                             seconds=round(time.time() - t0, 1), steps=args.steps, stages=stages))
    total = time.time() - t_all
    print(f"\ntiny pre-trained on domain A ({args.pretrain_loss}, {args.pretrain_steps} steps of "
          f"{args.pretrain_batch_size}); adapted to domain B ({args.classes_b} "
          f"identities); verification on B's held-out pairs (200 pairs, 20 unseen people); batch {args.per_batch_size}"
          f", {args.loss}, lr {args.lr}")
    print(f"{'strategy':<34}{'img/id':>7}{'steps':>6}{'B verif':>9}{'probe val':>10}{'seconds':>9}")
    for r in rows:
        pa = f"{r['probe_acc']:.4f}" if r["probe_acc"] is not None else "-"
        print(f"{r['strategy']:<34}{str(r['ipi']):>7}{r['steps']:>6}{r['verify']:>9.4f}{pa:>10}{r['seconds']:>9.0f}")
    print("linear probe: a probe does not change the embedding, so its verification figure is the frozen network's;"
          " 'probe val' is its classification accuracy on held-out images of B's training identities.")
    print(f"total {total:.0f} s (2 shared CPU cores: timings are rough)")
    with atomic_write(os.path.join(args.out, "strategies.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows, "total_seconds": round(total, 1)}, f, indent=1)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
