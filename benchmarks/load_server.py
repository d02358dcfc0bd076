"""Load the face service on loopback: requests/s, p50/p99 latency and the server's RSS under concurrent clients, with
slow clients mixed in.

    python benchmarks/load_server.py --clients 16 --slow 8 --seconds 60

Starts ``deploy/server.py`` in a child process on 127.0.0.1 (the real ``../shared/fixtures/model-y1-test2``
checkpoint unless ``--model``), registers ``--gallery`` identities, then runs for ``--seconds`` (at most
``--requests`` requests): ``--clients`` threads post ``/detectFace`` (base64 JSON, keep-alive connections) as fast
as answers come, while ``--slow`` misbehaving clients run beside them: half send request headers one byte per
second (slowloris), half open connections and send nothing, and a probe asks ``/health`` every 0.5 s. It prints
the throughput, latency percentiles of the fast clients, the probe's latency, the status codes seen, how the slow
connections ended, and the server's RSS (start, peak, end, sampled every 0.25 s). Everything is bounded in time
and count; nothing leaves the machine.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import List, Optional, Sequence

import numpy as np

from recognition.common import ToolkitError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "..", "shared", "fixtures", "model-y1-test2", "model") + ",0"
KEY = "load-benchmark-key-0123"
_BUDGET = threading.Lock()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def face_jpegs(n: int, seed: int = 0) -> List[str]:
    """Base64 JPEGs of synthetic 112x112 faces (datasets.synth renders them; no data leaves the repo)."""
    from datasets.synth import render_identity

    out = []
    for i in range(n):
        out.extend(base64.b64encode(j).decode() for j in render_identity(seed, "A", 1, i, 1))
    return out


def start_server(model: str, db: str, port: int, extra: Sequence[str]) -> subprocess.Popen:
    env = dict(os.environ, IFR_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "deploy.server", "--model", model, "--db", db, "--port", str(port)]
                            + list(extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    for _ in range(480):
        if proc.poll() is not None:
            raise ToolkitError(f"server exited with code {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace').strip()[-300:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.25)
    proc.terminate()
    raise ToolkitError("server did not listen within 120 s")


def request(conn: http.client.HTTPConnection, path: str, body: dict):
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", "X-API-Key": KEY})
    resp = conn.getresponse()
    return resp.status, resp.read()


def fast_client(port: int, images: List[str], stop: threading.Event, budget: list, lat: list, codes: Counter):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = 0
    while not stop.is_set():
        with _BUDGET:
            if budget[0] <= 0:
                return
            budget[0] -= 1
        t = time.perf_counter()
        try:
            status, _ = request(conn, "/detectFace", {"image": images[i % len(images)]})
        except (OSError, http.client.HTTPException) as exc:
            codes[type(exc).__name__] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        lat.append(time.perf_counter() - t)
        codes[status] += 1
        i += 1
    conn.close()


def slow_client(port: int, kind: str, stop: threading.Event, ended: Counter) -> None:
    """Reconnect and misbehave until ``stop``: 'trickle' sends a header byte per second, 'idle' sends nothing."""
    line = b"POST /detectFace HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 10000
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                t = time.monotonic()
                for b in line:
                    if stop.is_set():
                        return
                    if kind == "trickle":
                        s.sendall(bytes([b]))
                    try:
                        if s.recv(1) == b"":
                            break
                    except socket.timeout:
                        pass
                    except OSError:
                        break
                ended[f"{kind} closed by server after ~{round(time.monotonic() - t)} s"] += 1
        except OSError:
            ended[f"{kind} could not connect"] += 1
            time.sleep(0.5)


def health_probe(port: int, stop: threading.Event, lat: list) -> None:
    """``GET /health`` on a fresh connection every 0.5 s: what a load balancer sees while the model is saturated."""
    while not stop.is_set():
        t = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/health")
            conn.getresponse().read()
            conn.close()
            lat.append(time.perf_counter() - t)
        except (OSError, http.client.HTTPException):
            lat.append(float("inf"))
        stop.wait(0.5)


def run(args) -> None:
    port = free_port()
    db = os.path.join(args.work, f"load-{port}.sqlite")
    proc = start_server(args.model, db, port, args.server_args.split())
    samples: List[float] = []
    stop, sampling = threading.Event(), threading.Event()
    try:
        images = face_jpegs(max(args.gallery, 8))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for k in range(args.gallery):
            status, body = request(conn, "/registerFace", {"name": f"id{k}", "image": images[k]})
            if status != 200:
                raise ToolkitError(f"registerFace answered {status}: {body[:200]!r}")
        conn.close()
        pid = proc.pid

        def sample():
            while not sampling.is_set():
                samples.append(rss_mb(pid))
                time.sleep(0.25)

        threading.Thread(target=sample, daemon=True).start()
        start_rss = rss_mb(pid)
        lat: List[float] = []
        codes: Counter = Counter()
        ended: Counter = Counter()
        budget = [args.requests]
        slow = [threading.Thread(target=slow_client, args=(port, "trickle" if i % 2 == 0 else "idle", stop, ended),
                                 daemon=True) for i in range(args.slow)]
        fast = [threading.Thread(target=fast_client, args=(port, images, stop, budget, lat, codes), daemon=True)
                for _ in range(args.clients)]
        health: List[float] = []
        slow.append(threading.Thread(target=health_probe, args=(port, stop, health), daemon=True))
        for t in slow:
            t.start()
        t0 = time.perf_counter()
        for t in fast:
            t.start()
        deadline = t0 + args.seconds
        while any(t.is_alive() for t in fast) and time.perf_counter() < deadline:
            time.sleep(0.1)
        stop.set()
        for t in fast:
            t.join(120)
        elapsed = time.perf_counter() - t0
        sampling.set()
        for t in slow:
            t.join(5)
        ms = np.array(lat) * 1e3
        print(f"model {args.model}; {args.clients} clients + {args.slow} slow; gallery {args.gallery} identities")
        print(f"requests: {len(lat)} in {elapsed:.1f} s = {len(lat) / elapsed:.2f} requests/s")
        if len(ms):
            print(f"latency: p50 {np.percentile(ms, 50):.0f} ms, p99 {np.percentile(ms, 99):.0f} ms, "
                  f"max {ms.max():.0f} ms")
        if health:
            print(f"/health while loaded: {len(health)} probes, median {np.median(health) * 1e3:.0f} ms, "
                  f"max {max(health) * 1e3:.0f} ms")
        print("status codes: " + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items(), key=str)))
        print("slow clients: " + (", ".join(f"{k}: {v}" for k, v in sorted(ended.items())) or "none ended"))
        print(f"server RSS: start {start_rss:.1f} MB, peak {max(samples):.1f} MB, end {samples[-1]:.1f} MB")
    finally:
        stop.set()
        sampling.set()
        proc.terminate()
        proc.wait(30)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/load_server.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=FIXTURE, help="PREFIX,EPOCH (default: the shared y1 fixture)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent well-behaved clients")
    ap.add_argument("--slow", type=int, default=8, help="misbehaving clients (half trickle headers, half idle)")
    ap.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    ap.add_argument("--requests", type=int, default=5000, help="stop after this many /detectFace requests")
    ap.add_argument("--gallery", type=int, default=100, help="identities registered before the run")
    ap.add_argument("--server-args", default="", help="extra flags for deploy/server.py, e.g. '--no-flip'")
    ap.add_argument("--work", default="/tmp", help="folder for the temporary gallery file")
    args = ap.parse_args(argv)
    if args.model == FIXTURE and not os.path.isfile(FIXTURE.rsplit(",", 1)[0] + "-symbol.json"):
        raise ToolkitError(f"--model: the default fixture {FIXTURE} is absent; give --model PREFIX,EPOCH")
    if min(args.clients, args.requests, args.gallery) < 1 or args.slow < 0 or not 0 < args.seconds <= 3600:
        raise ToolkitError("--clients/--requests/--gallery must be >= 1, --slow >= 0, --seconds in (0, 3600]")
    run(args)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
