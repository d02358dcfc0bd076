"""Benchmark the deploy path: one face at a time vs batches, and the server's memory over many requests.

    python benchmarks/bench_deploy.py embed                       # ms per face: get_feature and get_features
    python benchmarks/bench_deploy.py server --requests 6000      # server RSS every 1,000 /detectFace calls
    python benchmarks/bench_deploy.py gallery --rows 1000000      # open a 1M-row gallery, time one 1:N match
    python benchmarks/bench_deploy.py identify --pairs 150        # real LFW faces through the HTTP service

``embed`` times ``FaceModel.get_feature`` (one face, the usual deploy call) and ``get_features`` at several batch
sizes, and prints the largest difference between the single and batched embeddings. ``server`` starts
``deploy/server.py`` in a child process, registers one face, posts ``/detectFace`` ``--requests`` times and prints the
server's resident memory (``VmRSS``) every ``--every`` requests; a flat line is the goal. ``gallery`` writes an SQLite
gallery of ``--rows`` random unit embeddings (``--dim``, 128 = y1's) in the service's format, then times opening it
(every row read in bulk and checked) and a 1:N match. Concurrency and slow clients: ``benchmarks/load_server.py``.
``identify`` serves the model in-process, registers the first image of each of the first ``--pairs`` same-person
pairs of ``../shared/real/lfw_dev/val.bin`` (alternately as base64 JSON and as multipart uploads), identifies each
second image over HTTP, and prints the top-1 rate and the largest difference from FaceModel + numpy on the same images.
The model is the real ``../shared/fixtures/model-y1-test2`` checkpoint unless ``--model PREFIX,EPOCH`` is given.
Figures on a shared machine are noisy: compare like with like.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Optional, Sequence

import numpy as np

from recognition.common import ToolkitError, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "..", "shared", "fixtures", "model-y1-test2", "model") + ",0"


def faces(n: int, seed: int = 0) -> list:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, (112, 112, 3)).astype(np.uint8) for _ in range(n)]


def bench_embed(model_spec: str, batch_sizes: Sequence[int], n: int = 64) -> None:
    from deploy.face_model import FaceModel

    imgs = faces(n)
    for bs in batch_sizes:
        model = FaceModel(model_spec, batch_size=bs)
        model.get_feature(imgs[0])  # bind the one-face path outside the timing
        model.get_features(imgs[:bs])
        t = time.perf_counter()
        one = np.stack([model.get_feature(im) for im in imgs[:16]])
        t_one = (time.perf_counter() - t) / 16
        t = time.perf_counter()
        many = model.get_features(imgs)
        t_many = (time.perf_counter() - t) / n
        print(f"batch {bs:3d}: get_feature {t_one * 1e3:7.1f} ms/face, get_features({n}) {t_many * 1e3:7.1f} ms/face,"
              f" max |single - batched| {np.abs(one - many[:16]).max():.1e}", flush=True)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024.0
    raise ToolkitError(f"no VmRSS for pid {pid}")


def bench_server(model_spec: str, requests: int, every: int, port: int, workdir: str) -> None:
    import cv2

    db = os.path.join(workdir, "bench-gallery.sqlite")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    key = "bench-deploy-key-0123"
    proc = subprocess.Popen([sys.executable, "-m", "deploy.server", "--model", model_spec, "--db", db, "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            env=dict(os.environ, IFR_API_KEY=key))
    url = f"http://127.0.0.1:{port}"

    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "X-API-Key": key})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise ToolkitError(f"server exited with code {proc.returncode}: "
                                   f"{proc.stderr.read().decode(errors='replace').strip()[-300:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise ToolkitError(f"server did not answer on {url} within 120 s")
        jpegs = [base64.b64encode(cv2.imencode(".jpg", im)[1].tobytes()).decode() for im in faces(8)]
        post("/registerFace", {"name": "a", "images": jpegs[:2]})
        print(f"after start: RSS {_rss_mb(proc.pid):.1f} MB", flush=True)
        t = time.perf_counter()
        for i in range(1, requests + 1):
            post("/detectFace", {"image": jpegs[i % 8]})
            if i % every == 0:
                print(f"{i:7d} requests: RSS {_rss_mb(proc.pid):.1f} MB, "
                      f"{(time.perf_counter() - t) / i * 1e3:.1f} ms/request", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)


def bench_gallery(rows: int, dim: int, workdir: str) -> None:
    import sqlite3

    from deploy.gallery import FaceGallery

    db = os.path.join(workdir, f"bench-gallery-{rows}.sqlite")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    FaceGallery(db).close()  # the service's schema
    rng = np.random.RandomState(0)
    t = time.perf_counter()
    con = sqlite3.connect(db)
    for start in range(0, rows, 100_000):
        x = rng.normal(size=(min(100_000, rows - start), dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        con.executemany("INSERT INTO faces (name, dim, embedding) VALUES (?, ?, ?)",
                        ((f"id{(start + i) // 5}", dim, r.tobytes()) for i, r in enumerate(x)))
        con.commit()
    con.close()
    print(f"wrote {rows} rows x {dim} in {time.perf_counter() - t:.1f} s ({os.path.getsize(db) / 2 ** 20:.0f} MB)")
    t, cpu = time.perf_counter(), time.process_time()
    g = FaceGallery(db)
    print(f"open (bulk read + every row checked): {time.perf_counter() - t:.2f} s wall, "
          f"{time.process_time() - cpu:.2f} s CPU, {g.size()} rows, process RSS {_rss_mb(os.getpid()):.0f} MB",
          flush=True)
    q = rng.normal(size=dim).astype(np.float32)
    q /= np.linalg.norm(q)
    g.match(q)
    t = time.perf_counter()
    for _ in range(10):
        g.match(q)
    print(f"1:N match: {(time.perf_counter() - t) / 10 * 1e3:.1f} ms per query")
    g.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)


def bench_identify(model_spec: str, pairs: int, workdir: str, bin_path: str) -> None:
    import http.client
    import uuid

    from deploy.face_model import FaceModel, decode_image
    from deploy.server import make_server
    from recognition.rec import safe_load_bin_pickle

    images, issame = safe_load_bin_pickle(bin_path)
    same = [k for k, s in enumerate(issame) if s][:pairs]
    model = FaceModel(model_spec, batch_size=8)
    db = os.path.join(workdir, f"bench-identify-{os.getpid()}.sqlite")
    key = "bench-identify-key-0123"
    service = make_server(model, db, "127.0.0.1", 0, api_key=key).start()
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=120)

    def post(path: str, name: Optional[str], raw: bytes, upload: bool) -> dict:
        if upload:
            b = uuid.uuid4().hex
            field = "images" if name else "image"
            body = (f'--{b}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n' if name else "").encode()
            body += (f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="f.jpg"\r\n\r\n'.encode()
                     + raw + f"\r\n--{b}--\r\n".encode())
            ctype = f"multipart/form-data; boundary={b}"
        else:
            doc = {"image": base64.b64encode(raw).decode()}
            if name:
                doc["name"] = name
            body, ctype = json.dumps(doc).encode(), "application/json"
        conn.request("POST", path, body, {"Content-Type": ctype, "X-API-Key": key})
        resp = conn.getresponse()
        out = json.loads(resp.read())
        if resp.status != 200:
            raise ToolkitError(f"{path} answered {resp.status}: {out}")
        return out

    try:
        t = time.perf_counter()
        for i, k in enumerate(same):
            post("/registerFace", f"pair{k}", images[2 * k], upload=i % 2 == 1)
        answers = [post("/detectFace", None, images[2 * k + 1], upload=i % 2 == 0) for i, k in enumerate(same)]
        elapsed = time.perf_counter() - t
    finally:
        conn.close()
        service.stop()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                os.remove(db + suffix)
    gallery = model.get_features([decode_image(images[2 * k]) for k in same])
    probes = model.get_features([decode_image(images[2 * k + 1]) for k in same])
    scores = probes @ gallery.T
    best = scores.argmax(1)
    top1 = np.mean([a["candidate"] == f"pair{k}" for a, k in zip(answers, same)])
    agree = np.mean([a["candidate"] == f"pair{same[b]}" for a, b in zip(answers, best)])
    diff = max(abs(a["score"] - scores[i, b]) for i, (a, b) in enumerate(zip(answers, best)))
    known = np.mean([a["name"] != "unknown" for a in answers])
    print(f"{len(same)} same-person pairs of {bin_path} through HTTP ({2 * len(same)} requests, {elapsed:.1f} s): "
          f"top-1 {top1:.4f}, above --threshold {known:.4f}; direct FaceModel + numpy top-1 "
          f"{np.mean(best == np.arange(len(same))):.4f}; same candidate {agree:.4f}, max |score difference| {diff:.1e}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/bench_deploy.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("embed", "server", "gallery", "identify"))
    ap.add_argument("--pairs", type=int, default=150, help="identify: same-person pairs of --bin to use")
    ap.add_argument("--bin", default=os.path.join(ROOT, "..", "shared", "real", "lfw_dev", "val.bin"),
                    help="identify: verification .bin with real aligned faces")
    ap.add_argument("--rows", type=int, default=1_000_000, help="gallery: rows to write and load")
    ap.add_argument("--dim", type=int, default=128, help="gallery: embedding size")
    ap.add_argument("--model", default=FIXTURE, help="PREFIX,EPOCH (default: the shared y1 fixture)")
    ap.add_argument("--batch-sizes", default="1,8,32", help="embed: FaceModel batch sizes to time")
    ap.add_argument("--requests", type=int, default=6000, help="server: /detectFace calls")
    ap.add_argument("--every", type=int, default=1000, help="server: print RSS every N requests")
    ap.add_argument("--port", type=int, default=18431)
    ap.add_argument("--work", default="/tmp", help="server: folder for the gallery file")
    args = ap.parse_args(argv)
    if args.model == FIXTURE and not os.path.isfile(FIXTURE.rsplit(",", 1)[0] + "-symbol.json"):
        raise ToolkitError(f"--model: the default fixture {FIXTURE} is absent; give --model PREFIX,EPOCH")
    if args.what == "identify":
        if args.pairs < 1:
            raise ToolkitError("--pairs must be >= 1")
        bench_identify(args.model, args.pairs, args.work, args.bin)
    elif args.what == "gallery":
        if args.rows < 1 or args.dim < 1:
            raise ToolkitError("--rows and --dim must be >= 1")
        bench_gallery(args.rows, args.dim, args.work)
    elif args.what == "embed":
        bench_embed(args.model, [int(b) for b in args.batch_sizes.split(",") if b.strip()])
    else:
        if args.requests < 1 or args.every < 1:
            raise ToolkitError("--requests and --every must be >= 1")
        bench_server(args.model, args.requests, args.every, args.port, args.work)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
