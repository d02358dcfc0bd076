"""Checks half of ``benchmarks/gpu_check.sh``: does the GPU path work, and how fast is it (run inside the venv).

Every check runs in its own child process with a time limit (a GPU fault can hang or kill a process), so one
failure never hides the others; the parent imports no MXNet. Checks, on ``--ctx`` (``gpu:0``):

- ``probe``: MXNet's build features, an element-wise op, a matrix product (cuBLAS) and a convolution (cuDNN),
  each read back with ``asnumpy()`` and compared with numpy;
- ``speed``: training samples/s (forward+backward+SGD through ``mx.mod.Module``, one synthetic batch reused) for
  every network x ``--prelu`` x batch size;
- ``embed``: embeddings of the real ``model-y1-test2`` on ``lfw_fold1.bin`` against the CPU's (cosine per image)
  and the verification accuracy on both (reference 0.98833, the fixture's README);
- ``parall``: ``train_parall.py`` with two contexts on the one device (``gpu:0,gpu:0``), skipped with MXNet's reason
  when it refuses the duplicated context;
- ``resume``: ``train.py`` stopped at step k and resumed gives the uninterrupted run's losses;
- ``determinism``: two runs with ``MXNET_CUDNN_AUTOTUNE_DEFAULT=0 MXNET_ENFORCE_DETERMINISM=1`` give identical losses
  and identical final weights.

    python benchmarks/gpu_check.py --ctx gpu:0 --out gpu_check_out
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry        # every step on cpu contexts, tiny sizes

Prints one table and writes ``OUT/gpu_check.json``; exit status 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("IFR_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
LFW_REFERENCE_ACC = 0.98833  # ../shared/fixtures/README.md: model-y1-test2 on lfw_fold1.bin, plain MXNet on CPU
DETERMINISM_ENV = {"MXNET_CUDNN_AUTOTUNE_DEFAULT": "0", "MXNET_ENFORCE_DETERMINISM": "1"}
BUDGET_SPENT = "the time budget (--budget) is spent"
CHECKS = ("probe", "speed", "embed", "parall", "resume", "determinism")
# sizes: (networks, batches, timed steps, train network, per-device batch, train steps, stop step, lfw pairs)
GPU_SIZES = dict(networks="y1,r50", batches="64,128", steps=30, train_network="y1", train_batch=64,
                 train_steps=20, stop_step=10, pairs=0)
DRY_SIZES = dict(networks="tiny", batches="4,8", steps=2, train_network="tiny", train_batch=8,
                 train_steps=4, stop_step=2, pairs=20)


# --------------------------------------------------------------------------------------------- child checks
def error_line(exc: BaseException) -> str:
    """The message of an exception in one line. MXNet's start with a C++ traceback ("Traceback ...", "File ...")
    and end with the message (``MXNetError: Check failed: ...``): keep the last line that is not a frame."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Traceback", "File "))] or lines or [type(exc).__name__]
    return lines[-1][:300]


def child_probe(ctx: str) -> dict:
    """Build features and three kernels on ``ctx``: ``{'kernel_ran', 'ops': {name: 'ok' | error}, ...}``."""
    import mxnet as mx
    import numpy as np

    from recognition.common import parse_ctx

    feats = mx.runtime.Features()
    out = {"mxnet": mx.__version__, "features": {k: feats.is_enabled(k) for k in ("CUDA", "CUDNN", "NCCL",
                                                                                 "MKLDNN", "CUDA_RTC")},
           "num_gpus": mx.context.num_gpus(), "ops": {}}
    try:
        dev = parse_ctx(ctx)[0]
    except Exception as exc:  # e.g. gpu:0 asked for and no GPU visible to CUDA
        out["ops"] = {"elementwise": error_line(exc)}
        out["kernel_ran"] = False
        return out
    rng = np.random.RandomState(0)
    a, b = rng.rand(64, 32).astype(np.float32), rng.rand(32, 16).astype(np.float32)
    x, w = rng.rand(2, 3, 8, 8).astype(np.float32), rng.rand(4, 3, 3, 3).astype(np.float32)

    def conv_ref():
        ref = np.zeros((2, 4, 6, 6), np.float32)
        for i in range(6):
            for j in range(6):
                ref[:, :, i, j] = np.tensordot(x[:, :, i:i + 3, j:j + 3], w, axes=([1, 2, 3], [1, 2, 3]))
        return ref

    ops = {"elementwise": (lambda: (mx.nd.array(a, ctx=dev) * 2 + 1).asnumpy(), lambda: a * 2 + 1),
           "dot (cuBLAS)": (lambda: mx.nd.dot(mx.nd.array(a, ctx=dev), mx.nd.array(b, ctx=dev)).asnumpy(),
                            lambda: a @ b),
           "convolution (cuDNN)": (lambda: mx.nd.Convolution(mx.nd.array(x, ctx=dev), mx.nd.array(w, ctx=dev),
                                                             kernel=(3, 3), num_filter=4, no_bias=True).asnumpy(),
                                   conv_ref)}
    for name, (run, ref) in ops.items():
        try:
            got = run()
            err = float(np.max(np.abs(got - ref())))
            out["ops"][name] = "ok" if err < 1e-3 else f"wrong result (max error {err:.3g})"
        except Exception as exc:  # the message is the finding (no kernel image, driver too old, ...)
            out["ops"][name] = error_line(exc)
    out["kernel_ran"] = out["ops"]["elementwise"] == "ok"
    if dev.device_type == "gpu":
        free, total = mx.context.gpu_memory_info(dev.device_id)
        out["gpu_memory_mib"] = {"free": free >> 20, "total": total >> 20}
    return out


def child_speed(network: str, batch: int, prelu: str, steps: int, ctx: str) -> dict:
    """``bench_train.measure`` (samples/s of a Module training step) plus the device memory in use after it."""
    import mxnet as mx

    res = _load_module("bench_train").measure(network, batch, prelu, steps, warmup=3, ctx=ctx)
    if ctx.startswith("gpu"):
        free, total = mx.context.gpu_memory_info(int(ctx.split(",")[0].split(":")[-1] or 0))
        res["gpu_used_mib"] = (total - free) >> 20
    return res


def child_embed(ctx: str, ref_ctx: str, pairs: int) -> dict:
    """The real y1 checkpoint on lfw_fold1.bin through ``ctx`` and ``ref_ctx``: cosines and both accuracies."""
    import numpy as np

    from recognition.common import parse_ctx
    from recognition.verification import Embedder, read_bin, test_bin

    prefix = os.path.join(SHARED, "fixtures", "model-y1-test2", "model")
    bin_path = os.path.join(SHARED, "fixtures", "lfw_fold1.bin")
    if not (os.path.isfile(prefix + "-0000.params") and os.path.isfile(bin_path)):
        return {"skip": f"{os.path.join(SHARED, 'fixtures')} lacks model-y1-test2 or lfw_fold1.bin"}
    images, issame = read_bin(bin_path)
    if pairs:  # a subset for the dry run (10 folds need at least 10 pairs)
        pairs = max(pairs, 10)
        images, issame = images[:2 * pairs], issame[:pairs]
    data = ([images], list(issame))
    out = {"pairs": len(issame)}
    raws = []
    for key, spec, batch in (("device", ctx, 64), ("cpu", ref_ctx, 32)):
        embed = Embedder.from_checkpoint(prefix, 0, ctx=parse_ctx(spec), batch_size=batch)
        res = test_bin(data, embed, batch_size=batch)
        out[f"acc_{key}"], out[f"seconds_{key}"] = float(res["acc"]), float(res["seconds"])
        raws.append(np.concatenate(res["raw"]))
    a, b = raws
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    out.update(min_cosine=float(cos.min()), images=int(images.shape[0]),  # cosines: each image and its mirror
               reference_acc=LFW_REFERENCE_ACC if not pairs else None)
    return out


def child_dup_ctx(ctx: str) -> dict:
    """Whether MXNet binds one Module on ``ctx`` given twice (``gpu:0,gpu:0``) and runs a training step on it."""
    import mxnet as mx
    import numpy as np

    from recognition.common import parse_ctx

    devs = parse_ctx(f"{ctx},{ctx}")
    data = mx.sym.Variable("data")
    sym = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(data, num_hidden=4, name="fc"), name="softmax")
    mod = mx.mod.Module(sym, context=devs)
    try:
        mod.bind(data_shapes=[("data", (8, 6))], label_shapes=[("softmax_label", (8,))])
        mod.init_params()
        mod.init_optimizer(kvstore="device")
        batch = mx.io.DataBatch([mx.nd.array(np.ones((8, 6)))], [mx.nd.array(np.arange(8) % 4)])
        mod.forward_backward(batch)
        mod.update()
        mod.get_outputs()[0].asnumpy()
    except Exception as exc:
        return {"allowed": False, "reason": error_line(exc)}
    return {"allowed": True}


def child_data(out_dir: str, num_classes: int, images: int) -> dict:
    """Generate the built-in synthetic identities (insightface RecordIO) for the training checks."""
    from datasets.synth import generate_dataset

    res = generate_dataset(out_dir, num_classes=num_classes, images_per_class=images, num_holdout=4,
                           holdout_images=2, num_pairs=10, seed=0)
    return {"data_dir": os.path.dirname(res["rec"]), "num_images": res["num_images"]}


def _load_module(name: str):
    """Import ``benchmarks/NAME.py`` by path (``benchmarks`` is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CHILDREN = {"probe": child_probe, "speed": child_speed, "embed": child_embed, "dup_ctx": child_dup_ctx,
            "data": child_data}


# ------------------------------------------------------------------------------------------------- the parent
class Runner:
    """Runs children and train scripts under one time budget; collects rows for the table and the JSON."""

    def __init__(self, out: str, budget: float, env: Optional[dict] = None):
        self.out, self.deadline = out, time.time() + budget
        self.env = dict(os.environ if env is None else env)
        self.env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [self.env.get("PYTHONPATH")] if p])
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.rows: List[dict] = []
        self.log = open(os.path.join(out, "gpu_check.log"), "a")

    def left(self) -> float:
        return self.deadline - time.time()

    def call(self, cmd: Sequence[str], limit: float, extra_env: Optional[dict] = None):
        """``(returncode or None on timeout, stdout, stderr)`` of ``cmd`` with at most ``limit`` seconds."""
        if self.left() < 5:
            return None, "", BUDGET_SPENT
        limit = min(limit, self.left())
        env = dict(self.env, **(extra_env or {}))
        self.log.write(f"+ {' '.join(cmd)}\n")
        self.log.flush()
        try:
            proc = subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as exc:
            self.log.write(_text(exc.stdout) + _text(exc.stderr))
            return None, _text(exc.stdout), f"timed out after {limit:.0f} s"
        self.log.write(proc.stdout + proc.stderr)
        self.log.flush()
        return proc.returncode, proc.stdout, proc.stderr

    def child(self, name: str, limit: float, *args) -> dict:
        """Run ``CHILDREN[name](*args)`` in a fresh interpreter; its JSON result, or ``{'error': line}``."""
        rc, out, err = self.call([sys.executable, os.path.abspath(__file__), "--_child", name, json.dumps(args)],
                                 limit)
        if rc == 0:
            return json.loads(out.strip().splitlines()[-1])
        return {"error": err if rc is None else _last_error(err)}

    def row(self, check: str, status: str, result: str, **data) -> dict:
        if status == "FAIL" and BUDGET_SPENT in result:
            status = "skip"  # not a failure of the GPU path: --budget was too small for every check
        row = dict(check=check, status=status, result=result, **data)
        self.rows.append(row)
        print(f"[{status}] {check}: {result}", flush=True)
        return row


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _last_error(stderr: str) -> str:
    """The most telling line of a failed child: the last ``...Error: ...`` line, else the last line."""
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:400]
    return lines[-1][:400] if lines else "no output"


# ------------------------------------------------------------------------------------------------ the checks
def check_probe(r: Runner, ctx: str) -> bool:
    res = r.child("probe", 180, ctx)
    if "error" in res:
        r.row("probe", "FAIL", f"MXNet did not start on {ctx}: {res['error']}")
        return False
    bad = {k: v for k, v in res["ops"].items() if v != "ok"}
    feats = ",".join(k for k, v in res["features"].items() if v) or "none"
    text = (f"mxnet {res['mxnet']} ({feats}), {res['num_gpus']} GPU(s); "
            + ("all kernels ran and matched numpy" if not bad else "; ".join(f"{k}: {v}" for k, v in bad.items())))
    r.row("probe", "ok" if not bad else "FAIL", text, **res)
    return bool(res["kernel_ran"])


def check_speed(r: Runner, ctx: str, sizes: dict, prelus: Sequence[str]) -> None:
    for net in sizes["networks"].split(","):
        best = {}
        for prelu in prelus:
            figs, data = [], {}
            for batch in (int(b) for b in sizes["batches"].split(",")):
                res = r.child("speed", 150, net, batch, prelu, sizes["steps"], ctx)
                if "error" in res:
                    figs.append(f"b{batch}: {res['error'][:120]}")
                    continue
                data[batch] = res
                figs.append(f"b{batch} {res['samples_per_s']:.1f}" + (f" ({res['gpu_used_mib']} MiB)"
                                                                         if "gpu_used_mib" in res else ""))
            ok = len(data) == len(sizes["batches"].split(","))
            if data:
                best[prelu] = max(v["samples_per_s"] for v in data.values())
            r.row(f"speed {net} --prelu {prelu}", "ok" if ok else "FAIL", "samples/s " + ", ".join(figs),
                  samples_per_s={b: v["samples_per_s"] for b, v in data.items()})
        if len(best) > 1:
            fast = max(best, key=best.get)
            slow = min(best, key=best.get)
            r.row(f"speed {net} faster PReLU", "ok", f"{fast} ({best[fast] / best[slow]:.2f}x {slow}, best batch)",
                  faster=fast, best=best)


def check_embed(r: Runner, ctx: str, ref_ctx: str, pairs: int) -> None:
    res = r.child("embed", 300, ctx, ref_ctx, pairs)
    if "skip" in res or "error" in res:
        r.row("embed y1 lfw_fold1", "skip" if "skip" in res else "FAIL", res.get("skip") or res["error"])
        return
    same_acc = abs(res["acc_device"] - res["acc_cpu"]) < 1e-9
    ref_ok = res["reference_acc"] is None or abs(res["acc_cpu"] - res["reference_acc"]) < 5e-5
    ok = res["min_cosine"] > 0.9999 and same_acc and ref_ok
    ref = f", reference {res['reference_acc']:.5f}" if res["reference_acc"] else ""
    r.row("embed y1 lfw_fold1", "ok" if ok else "FAIL",
          f"{res['images']} images: min cosine {res['min_cosine']:.6f} vs {ref_ctx}; acc {res['acc_device']:.5f} "
          f"({ctx}) / {res['acc_cpu']:.5f} ({ref_ctx}){ref}; {res['seconds_device']:.1f} s / "
          f"{res['seconds_cpu']:.1f} s", **res)


def read_losses(run_dir: str) -> List[tuple]:
    """``[(step, loss)]`` of the ``train`` records of ``RUN/metrics.jsonl``."""
    out = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "train":
                out.append((rec["step"], rec["loss"]))
    return out


def train(r: Runner, sizes: dict, data_dir: str, run_dir: str, steps: int, ctx: str, env: Optional[dict] = None,
          script: str = "train.py", resume: bool = False):
    """Run a train script; ``(losses, None)`` or ``(None, error line)``."""
    py = [sys.executable, os.path.join(ROOT, "recognition", script)]
    if resume:
        argv = py + ["--resume", run_dir, "--max-steps", str(steps)]
    else:
        argv = py + ["--network", sizes["train_network"], "--loss", "arcface", "--data-dir", data_dir, "--target", "",
                     "--per-batch-size", str(sizes["train_batch"]), "--max-steps", str(steps), "--verbose",
                     str(steps), "--frequent", "1", "--ckpt", "0", "--lr", "0.05", "--mom", "0.9", "--seed", "7",
                     "--ctx", ctx, "--num-workers", "2", "--prefix", os.path.join(run_dir, "model")]
    rc, _, err = r.call(argv, 240, env)
    if rc != 0:
        return None, (err if rc is None else _last_error(err))
    return read_losses(run_dir), None


def _final_params(run_dir: str) -> bytes:
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("model-") and n.endswith(".params"))
    with open(os.path.join(run_dir, names[-1]), "rb") as f:
        return f.read()


def check_training(r: Runner, ctx: str, sizes: dict, work: str, checks: Sequence[str]) -> None:
    res = r.child("data", 120, os.path.join(work, "data"), 40, 10)
    if "error" in res:
        r.row("synthetic data", "FAIL", res["error"])
        return
    data_dir, n = res["data_dir"], sizes["train_steps"]
    det = dict(DETERMINISM_ENV)
    if "parall" in checks:
        dup = r.child("dup_ctx", 120, ctx)
        if "error" in dup or not dup["allowed"]:
            r.row("parall 2 contexts", "skip", f"MXNet refuses {ctx},{ctx}: {dup.get('reason') or dup['error']}")
        else:
            losses, err = train(r, sizes, data_dir, os.path.join(work, "parall"), 6, f"{ctx},{ctx}",
                                script="train_parall.py")
            ok = losses is not None and len(losses) == 6 and all(v == v and abs(v) < 1e6 for _, v in losses)
            r.row("parall 2 contexts", "ok" if ok else "FAIL",
                  f"train_parall.py --ctx {ctx},{ctx}: " + (f"6 steps, loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f}"
                                                            if ok else (err or f"losses {losses}")))
    full = None
    if "resume" in checks or "determinism" in checks:
        full, err = train(r, sizes, data_dir, os.path.join(work, "full"), n, ctx, det)
        if full is None:
            r.row("train.py", "FAIL", err)
            return
    if "resume" in checks:
        part_dir, k = os.path.join(work, "part"), sizes["stop_step"]
        part, err = train(r, sizes, data_dir, part_dir, k, ctx, det)
        if part is not None:
            part, err = train(r, sizes, data_dir, part_dir, n, ctx, det, resume=True)
        diff = (max(abs(a[1] - b[1]) for a, b in zip(part, full))
                if part is not None and [s for s, _ in part] == [s for s, _ in full] else None)
        ok = diff is not None and diff <= 1e-5 * max(1.0, max(abs(v) for _, v in full))
        r.row("resume round trip", "ok" if ok else "FAIL",
              f"stopped at {k}, resumed to {n}: " + (f"max loss difference {diff:.3g} vs uninterrupted"
                                                     if diff is not None else (err or "steps differ")),
              max_loss_diff=diff)
    if "determinism" in checks:
        again, err = train(r, sizes, data_dir, os.path.join(work, "again"), n, ctx, det)
        same = again is not None and again == full
        same_params = same and _final_params(os.path.join(work, "again")) == _final_params(os.path.join(work, "full"))
        flags = " ".join(f"{k}={v}" for k, v in det.items())
        r.row("determinism", "ok" if same_params else "FAIL",
              f"{flags}: two runs of {n} steps " + ("identical losses and weights" if same_params else
                                                    err or "differ" + (" (weights)" if same else " (losses)")))


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--ctx", default="gpu:0", help="the device under test")
    p.add_argument("--ref-ctx", default="cpu", help="the reference device for embeddings")
    p.add_argument("--out", default=os.path.join(ROOT, "gpu_check_out"), help="folder for gpu_check.json/.log")
    p.add_argument("--budget", type=float, default=420, help="seconds for all checks together")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"subset of {','.join(CHECKS)}")
    p.add_argument("--prelu", default="bn,stock", help="PReLU formulations timed by the speed check")
    p.add_argument("--env-json", help="facts gathered by gpu_check.sh (GPU, Python, package) to include")
    p.add_argument("--dry-run", action="store_true", help="cpu contexts and tiny sizes: tests the logic")
    p.add_argument("--work", help="folder for the synthetic data and training runs (default: a temporary folder, "
                                  "removed at the end; OUT keeps only the report and logs)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("args", nargs="?", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args._child:
        print(json.dumps(CHILDREN[args._child](*json.loads(args.args or "[]"))))
        return 0
    checks = [c for c in args.checks.split(",") if c]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        print(f"gpu_check.py: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    ctx = "cpu:0" if args.dry_run else args.ctx
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="ifr_gpu_check_")
    r = Runner(args.out, args.budget)
    start = time.time()
    if check_probe(r, ctx):
        # correctness first, then the speed sweep (the longest part) with the time that is left
        if "embed" in checks:
            check_embed(r, ctx, args.ref_ctx, sizes["pairs"])
        if {"parall", "resume", "determinism"} & set(checks):
            check_training(r, ctx, sizes, work, checks)
        if "speed" in checks:
            check_speed(r, ctx, sizes, [p for p in args.prelu.split(",") if p])
    else:
        r.row("remaining checks", "skip", f"no kernel ran on {ctx}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    env = {}
    if args.env_json and os.path.isfile(args.env_json):
        with open(args.env_json) as f:
            env = json.load(f)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "ctx": ctx, "dry_run": args.dry_run,
              "seconds": round(time.time() - start, 1), "env": env, "rows": r.rows}
    with open(os.path.join(args.out, "gpu_check.json.tmp"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    os.replace(os.path.join(args.out, "gpu_check.json.tmp"), os.path.join(args.out, "gpu_check.json"))
    print_table(r.rows, ctx, time.time() - start)
    return 1 if any(row["status"] == "FAIL" for row in r.rows) else 0


def print_table(rows: Sequence[dict], ctx: str, seconds: float) -> None:
    """The summary: one line per check (status, check, result)."""
    width = max([len(row["check"]) for row in rows] + [5])
    print(f"\nGPU check on {ctx} ({seconds:.0f} s)")
    print(f"{'status':<7}{'check':<{width + 2}}result")
    for row in rows:
        print(f"{row['status']:<7}{row['check']:<{width + 2}}{row['result']}")


if __name__ == "__main__":
    sys.exit(main())
