"""Long-run soak: train ``tiny`` on CPU for ``--minutes`` with verification and checkpoints, watching memory.

Runs the real ``recognition/train.py`` in a child process on a generated dataset (verification on its ``.bin``
every ``--verbose`` steps, a checkpoint every round with ``--keep 3``) and samples the child's resident memory
(``VmRSS``), open file descriptors and threads. Reports them at the start, every ``--report-minutes`` and at the
end, then stops the run with SIGTERM (the graceful path: resume state written, exit 0) and lists every warning
the run logged.

Verdict: RSS may rise during warm-up (MXNet's storage pool caches freed buffers, MKLDNN primitive caches fill,
glibc arenas grow) and then must stay flat: the growth from the first sample after ``--warmup-minutes`` to the end
must stay within ``--max-growth-mb`` (default 40 MB), and so must the fitted slope extrapolated over an hour
(``--max-slope-mb-per-h``). Exit 1 otherwise. Open file descriptors must not grow at all (a leaked handle per
checkpoint or verification round would show here first).

    python benchmarks/soak.py --minutes 30                 # the full soak
    python benchmarks/soak.py --minutes 5 --report-minutes 1

Figures depend on what else runs on the machine; on a shared 2-core machine speed is noisy, memory much less so.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import numpy as np

from recognition.common import ToolkitError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def proc_stats(pid: int) -> dict:
    """``{rss_mb, fds, threads}`` of a live process from ``/proc`` (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    rss_kb = int(status["VmRSS"].split()[0])
    return {"rss_mb": rss_kb / 1024.0, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(status["Threads"])}


def train_steps(metrics_path: str) -> int:
    """Last training step logged in ``metrics.jsonl`` (0 when none yet)."""
    if not os.path.isfile(metrics_path):
        return 0
    last = 0
    with open(metrics_path) as f:
        for line in f:
            if '"kind": "train"' in line:
                m = re.search(r'"step": (\d+)', line)
                if m:
                    last = int(m.group(1))
    return last


def soak(minutes: float, work: str, report_minutes: float, sample_seconds: float, verbose: int, batch: int,
         warmup_minutes: float, classes: int, images: int) -> dict:
    """Run the soak; returns the samples and the verdict inputs (see the module docstring)."""
    from datasets.synth import generate_dataset

    data = os.path.join(work, "data")
    if not os.path.isfile(os.path.join(data, "train.rec")):
        generate_dataset(data, num_classes=classes, images_per_class=images, num_holdout=20, holdout_images=4,
                         num_pairs=200, seed=0)
    run_dir = os.path.join(work, "run")
    log_path = os.path.join(work, "soak-train.log")
    argv = [sys.executable, os.path.join(ROOT, "recognition", "train.py"), "--network", "tiny", "--loss", "arcface",
            "--data-dir", data, "--target", "synth_val", "--per-batch-size", str(batch), "--max-steps", "100000000",
            "--verbose", str(verbose), "--frequent", "50", "--ckpt", "2", "--keep", "3", "--lr", "0.05",
            "--warmup-steps", "50", "--seed", "0", "--prefix", os.path.join(run_dir, "model")]
    samples: List[dict] = []
    t_start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            next_report = 0.0
            while time.monotonic() - t_start < minutes * 60:
                if proc.poll() is not None:
                    raise ToolkitError(f"training exited early with code {proc.returncode}; see {log_path}")
                t = time.monotonic() - t_start
                s = dict(proc_stats(proc.pid), t=t, step=train_steps(os.path.join(run_dir, "metrics.jsonl")))
                samples.append(s)
                if t >= next_report and s["step"] > 0:
                    print(f"[{t / 60:5.1f} min] step {s['step']:6d}  RSS {s['rss_mb']:7.1f} MB  fds {s['fds']:3d}  "
                          f"threads {s['threads']:3d}", flush=True)
                    next_report = t + report_minutes * 60
                time.sleep(sample_seconds)
            end = dict(proc_stats(proc.pid), t=time.monotonic() - t_start,
                       step=train_steps(os.path.join(run_dir, "metrics.jsonl")))
            samples.append(end)
            print(f"[{end['t'] / 60:5.1f} min] step {end['step']:6d}  RSS {end['rss_mb']:7.1f} MB  fds {end['fds']:3d}"
                  f"  threads {end['threads']:3d}  (end)", flush=True)
            os.killpg(proc.pid, signal.SIGTERM)  # graceful stop: finish the step, write the resume state, exit 0
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    with open(log_path) as f:
        text = f.read()
    warnings = [line.strip() for line in text.splitlines()
                if re.search(r"WARNING|Warning|warn\(|Traceback|Error", line) and "SIGTERM" not in line]
    result = analyse(samples, warmup_minutes * 60, verbose, report_minutes * 60)
    verify = len(re.findall(r"Accuracy-Flip", text))
    return dict(result, samples=samples, exit_code=rc, stopped="stopped by SIGTERM" in text, warnings=warnings,
                steps=samples[-1]["step"], verification_rounds=verify, log=log_path,
                checkpoints=sorted(n for n in os.listdir(run_dir) if n.endswith(".params")))


def analyse(samples: List[dict], warmup_s: float, verbose: int, window_s: float) -> dict:
    """Memory verdict inputs from the samples after warm-up (``warmup_s`` and the first verification round).

    RSS peaks during each verification round (an inference executor is bound, the pairs are embedded) and falls
    back after it, so growth is judged on the floor: the minimum RSS of each ``window_s`` window (a window
    should span at least one round), first window against last, and a line fitted through the floors.
    """
    steady = [s for s in samples if s["t"] >= warmup_s and s["step"] > verbose] or samples[-2:]
    t0 = steady[0]["t"]
    windows: dict = {}
    for s in steady:
        windows.setdefault(int((s["t"] - t0) // max(window_s, 1e-9)), []).append(s)
    floors = [(float(np.mean([s["t"] for s in w])) / 3600.0, min(s["rss_mb"] for s in w))
              for _, w in sorted(windows.items())]
    if len(floors) > 1 and len(windows[max(windows)]) < len(windows[min(windows)]) // 2:
        floors = floors[:-1]  # a short last window has no representative floor
    slope = float(np.polyfit(*zip(*floors), 1)[0]) if len(floors) >= 3 else 0.0
    rss = [s["rss_mb"] for s in steady]
    return {"floors_mb": [round(f, 1) for _, f in floors], "steady_start_rss_mb": floors[0][1],
            "end_rss_mb": float(rss[-1]), "max_rss_mb": float(max(rss)), "growth_mb": floors[-1][1] - floors[0][1],
            "slope_mb_per_h": slope, "fds_growth": steady[-1]["fds"] - steady[0]["fds"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/soak.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long to train")
    ap.add_argument("--report-minutes", type=float, default=5.0, help="print a memory line every N minutes")
    ap.add_argument("--sample-seconds", type=float, default=5.0, help="memory sampling period")
    ap.add_argument("--warmup-minutes", type=float, default=1.0, help="growth is measured from here on")
    ap.add_argument("--verbose", type=int, default=100, help="verify + checkpoint every N steps")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--images", type=int, default=8, help="images per class")
    ap.add_argument("--max-growth-mb", type=float, default=40.0)
    ap.add_argument("--max-slope-mb-per-h", type=float, default=60.0)
    ap.add_argument("--work", default="", help="working folder (default: a temporary one, removed)")
    ap.add_argument("--json", default="", help="also write the full result here")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.sample_seconds <= 0:
        raise ToolkitError("--minutes and --sample-seconds must be > 0")
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="soak-")
    work = args.work or tmp.name
    os.makedirs(work, exist_ok=True)
    try:
        r = soak(args.minutes, work, args.report_minutes, args.sample_seconds, args.verbose, args.batch_size,
                 args.warmup_minutes, args.classes, args.images)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(r, f, indent=1)
    finally:
        if tmp is not None:
            tmp.cleanup()
    s0 = next((s for s in r["samples"] if s["step"] > 0), r["samples"][0])  # the child has started training
    print(f"steps {r['steps']}, verification rounds {r['verification_rounds']}, checkpoints kept "
          f"{', '.join(r['checkpoints'])}")
    print(f"RSS: at the first step {s0['rss_mb']:.1f} MB, after warm-up {r['steady_start_rss_mb']:.1f} MB, end "
          f"{r['end_rss_mb']:.1f} MB, max {r['max_rss_mb']:.1f} MB (verification rounds peak, then fall back)")
    print(f"RSS floor per {args.report_minutes:g}-min window after warm-up: {r['floors_mb']} MB; growth "
          f"{r['growth_mb']:+.1f} MB, fitted slope {r['slope_mb_per_h']:+.1f} MB/h; fds growth {r['fds_growth']:+d}")
    print(f"SIGTERM stop: exit code {r['exit_code']}, {'graceful' if r['stopped'] else 'NOT graceful'}")
    print(f"warnings logged: {len(r['warnings'])}")
    for w in sorted(set(r["warnings"]))[:20]:
        print(f"  {w[:200]}")
    # a slope over a few minutes extrapolates noise (a ~2 MB step after a round reads as 100+ MB/h): judge it
    # only on a soak long enough for the floor to have settled
    judge_slope = args.minutes - args.warmup_minutes >= 10
    if not judge_slope:
        print("slope not judged: under 10 minutes after warm-up (run --minutes 30 for that)")
    ok = (abs(r["growth_mb"]) <= args.max_growth_mb and r["fds_growth"] <= 0 and r["exit_code"] == 0
          and r["stopped"] and (not judge_slope or r["slope_mb_per_h"] <= args.max_slope_mb_per_h))
    print("verdict:", "OK (memory flat after warm-up)" if ok else "FAIL")
    return 0 if ok else 1


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
