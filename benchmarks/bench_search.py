"""1:N search at scale: query latency, memory and load time for 10k / 100k / 1M stored embeddings, 128-d and 512-d.

    python benchmarks/bench_search.py                                  # all sizes, numpy + faiss if installed
    python benchmarks/bench_search.py --sizes 10000,100000 --dims 128 --methods numpy,sklearn

Methods: ``numpy`` (``deploy.gallery_index.EmbeddingIndex``: exact, blockwise, what ``search.py`` and the service's
matcher use), ``sklearn`` (``NearestNeighbors`` brute force, what ``search.py`` used before issue 17; sizes up to
``--sklearn-max``), ``faiss-flat`` (faiss ``IndexFlatIP``, exact) and ``faiss-ivf`` (faiss IVF-Flat, approximate:
``nlist = 4 sqrt(N)`` capped at 1024, ``nprobe`` 16; build time and recall@1 against exact search reported; sizes
up to ``--approx-max``). Stored rows are random unit vectors (the hardest case for an approximate index); queries
are stored rows plus noise, so their true nearest row is known to exact search. Latency: one query at a time
(median of ``--queries``) and a batch of all queries (ms per query). Memory: the stored matrix plus the peak
RSS growth during the searches. Load: ``.npy`` read, and SQLite rows (one float32 BLOB per row, as the service
stores them) read with one join (``EmbeddingIndex.from_blobs``) against a ``frombuffer`` per row (up to
``--sqlite-max`` rows). The run holds one gallery at a time; 1M x 512 is 2 GB (+2 GB while faiss holds a copy).
"""
from __future__ import annotations

import argparse
import gc
import os
import resource
import sqlite3
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from deploy.gallery_index import EmbeddingIndex
from recognition.common import ToolkitError, run_cli


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def random_gallery(n: int, dim: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
    """(n, dim) float32 random unit rows, generated in chunks (no float64 copy of the whole matrix)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        out[s:s + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def make_queries(gallery: np.ndarray, q: int, seed: int = 1, noise: float = 0.05):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(gallery), q)
    dim = gallery.shape[1]
    x = gallery[truth] + noise * rng.standard_normal((q, dim), dtype=np.float32) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), truth


def time_search(fn, queries: np.ndarray) -> tuple:
    """``(median ms of single queries, ms per query in one batch, top-1 rows of the batch)``."""
    fn(queries[:1])
    single = []
    for i in range(len(queries)):
        t = time.perf_counter()
        fn(queries[i:i + 1])
        single.append((time.perf_counter() - t) * 1e3)
    t = time.perf_counter()
    top = fn(queries)
    batch = (time.perf_counter() - t) * 1e3 / len(queries)
    return float(np.median(single)), batch, top


def sqlite_load(gallery: np.ndarray, folder: str) -> tuple:
    """Seconds to read the rows back from an SQLite file: one join vs a ``frombuffer`` per row (+ stack)."""
    path = os.path.join(folder, "g.sqlite")
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE faces (id INTEGER PRIMARY KEY, name TEXT, dim INTEGER, embedding BLOB)")
    db.executemany("INSERT INTO faces (name, dim, embedding) VALUES (?, ?, ?)",
                   ((f"p{i}", gallery.shape[1], row.tobytes()) for i, row in enumerate(gallery)))
    db.commit()
    db.close()
    times = []
    for joined in (True, False):
        db = sqlite3.connect(path)
        t = time.perf_counter()
        rows = db.execute("SELECT name, dim, embedding FROM faces ORDER BY id").fetchall()
        if joined:
            m = EmbeddingIndex.from_blobs((r[2] for r in rows), gallery.shape[1]).matrix
        else:
            m = np.stack([np.frombuffer(r[2], np.float32) for r in rows])
        times.append(time.perf_counter() - t)
        assert m.shape == gallery.shape
        del rows, m
        db.close()
    os.remove(path)
    return tuple(times)


def run_one(n: int, dim: int, methods: Sequence[str], args, folder: str) -> None:
    t = time.perf_counter()
    gallery = random_gallery(n, dim)
    queries, truth = make_queries(gallery, args.queries)
    print(f"\n{n:,} x {dim}: {gallery.nbytes / 2 ** 20:.0f} MiB, generated in {time.perf_counter() - t:.1f}s",
          flush=True)
    index = EmbeddingIndex.from_matrix(gallery, normalised=True)
    exact = None
    for method in methods:
        base, build, extra = rss_mb(), 0.0, ""
        t = time.perf_counter()
        if method == "numpy":
            fn = lambda q: index.search(q, 1)[1][:, 0]  # noqa: E731
        elif method == "sklearn":
            if n > args.sklearn_max:
                continue
            from sklearn.neighbors import NearestNeighbors

            nn = NearestNeighbors(metric="euclidean").fit(gallery)
            fn = lambda q, nn=nn: nn.kneighbors(q, n_neighbors=1)[1][:, 0]  # noqa: E731
        elif method in ("faiss-flat", "faiss-ivf"):
            import faiss

            if method == "faiss-flat":
                fx = faiss.IndexFlatIP(dim)
            else:
                if n > args.approx_max:
                    continue
                nlist = int(min(1024, 4 * np.sqrt(n)))
                fx = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
                fx.train(gallery[np.random.default_rng(2).choice(n, min(n, 40 * nlist), replace=False)])
                fx.nprobe = 16
                extra = f"  nlist {nlist} nprobe 16"
            fx.add(gallery)
            fn = lambda q, fx=fx: fx.search(q, 1)[1][:, 0]  # noqa: E731
        else:
            raise ToolkitError(f"--methods: unknown {method!r}")
        build = time.perf_counter() - t
        single, batch, top = time_search(fn, queries)
        if method == "numpy":
            exact = top
        grown = rss_mb() - base
        recall = float(np.mean(top == exact)) if exact is not None else float("nan")
        print(f"  {method:10s} build {build:6.1f}s  1 query {single:8.2f} ms  batched {batch:7.3f} ms/query  "
              f"recall@1 {recall:.3f} (true row {np.mean(top == truth):.3f})  extra RSS {grown:6.0f} MiB{extra}",
              flush=True)
        fn = fx = nn = None  # noqa: F841
        gc.collect()
    t = time.perf_counter()
    path = os.path.join(folder, "g.npy")
    index.save(path)
    t_save = time.perf_counter() - t
    t = time.perf_counter()
    loaded = EmbeddingIndex.load(path)
    t_load = time.perf_counter() - t
    assert len(loaded) == n
    del loaded
    os.remove(path)
    line = f"  load: .npy save {t_save:.2f}s, load {t_load:.2f}s"
    if n <= args.sqlite_max:
        joined, per_row = sqlite_load(gallery, folder)
        line += f"; SQLite rows: one join {joined:.2f}s, frombuffer per row {per_row:.2f}s"
    print(line, flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="1:N search latency, memory and load time at 10k-1M stored embeddings")
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--dims", default="128,512")
    p.add_argument("--methods", default="numpy,sklearn,faiss-flat,faiss-ivf")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--sklearn-max", type=int, default=100_000)
    p.add_argument("--approx-max", type=int, default=1_000_000)
    p.add_argument("--sqlite-max", type=int, default=1_000_000)
    p.add_argument("--threads", type=int, default=2, help="BLAS/faiss threads (set before numpy loads BLAS)")
    args = p.parse_args(argv)
    try:
        sizes = [int(v) for v in args.sizes.split(",") if v]
        dims = [int(v) for v in args.dims.split(",") if v]
    except ValueError:
        raise ToolkitError("--sizes/--dims: expected comma-separated integers") from None
    methods = [m for m in args.methods.split(",") if m]
    if "faiss-flat" in methods or "faiss-ivf" in methods:
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            print("faiss is not installed (pip install faiss-cpu): faiss methods skipped")
            methods = [m for m in methods if not m.startswith("faiss")]
    if "numpy" not in methods:
        methods.insert(0, "numpy")  # the exact reference for recall
    print(f"load average {os.getloadavg()[0]:.1f}; queries {args.queries}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for dim in dims:
            for n in sizes:
                run_one(n, dim, methods, args, folder)
                gc.collect()
    print(f"\npeak RSS {peak_mb():.0f} MiB; load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
