"""A small face-registry HTTP service: register, identify, delete and list faces over a persistent SQLite gallery.

    python deploy/server.py --model ../models/model-y1-test2/model,0 --db gallery.sqlite --port 8080 --threshold 0.3

Endpoints (JSON in, JSON out; errors are ``{"error": "..."}`` with a 4xx status):

- ``POST /registerFace`` ``{"name": str, "images": [base64 JPEG/PNG, ...]}`` (or ``"image"``)
  -> ``{name, added, count}``
- ``POST /detectFace`` ``{"image": base64}`` -> ``{name, score, candidate, threshold}``; ``name`` is ``"unknown"``
  when the best cosine similarity is under ``--threshold`` (``candidate`` still names the nearest identity)
- ``POST /deleteFace`` ``{"name": str}`` -> ``{name, deleted}`` (404 for a name not in the gallery)
- ``GET /faces`` -> ``{faces: [{name, count}], total}``; ``GET /health`` -> ``{status, names, embeddings, ...}``

Images are aligned face crops of the model's input size (``deploy/align.py``), or any size with ``--resize``.
Only the standard library serves HTTP: a fixed pool of ``--threads`` handler threads (a new thread per request,
``ThreadingHTTPServer``'s way, grew the resident memory by ~0.9 MB per 1,000 requests through glibc's per-thread
allocations; the pool stays flat), an idle keep-alive connection closed after ``--idle-timeout`` seconds so it cannot
hold a thread, the model behind a lock (an MXNet executor is not re-entrant), the gallery in SQLite (WAL) behind its
own lock with an in-memory matrix for matching. Scores: cosine of L2-normalised embeddings; an identity scores its
best stored embedding.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import sqlite3
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from recognition.common import ToolkitError, run_cli

logger = logging.getLogger("deploy.server")

MAX_BODY = 16 * 1024 * 1024
MAX_NAME = 200


class FaceGallery:
    """Named L2-normalised embeddings in an SQLite file; thread-safe; survives restarts.

    ``match(q)`` with ``q`` (E,) returns ``(name, score)`` of the best stored row (cosine), or ``(None, None)``.
    """

    def __init__(self, db_path: str):
        self.db_path = db_path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS faces (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                             "name TEXT NOT NULL, dim INTEGER NOT NULL, embedding BLOB NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS faces_name ON faces(name)")
        except sqlite3.Error as exc:
            raise ToolkitError(f"--db {db_path}: cannot open as an SQLite gallery ({exc})") from None
        self._reload()

    def _reload(self) -> None:
        rows = self._db.execute("SELECT name, dim, embedding FROM faces ORDER BY id").fetchall()
        dims = {r[1] for r in rows}
        if len(dims) > 1:
            raise ToolkitError(f"--db {self.db_path}: mixes embedding sizes {sorted(dims)}")
        self.dim = dims.pop() if dims else None
        self._names = [r[0] for r in rows]
        self._matrix = (np.stack([np.frombuffer(r[2], np.float32) for r in rows]) if rows
                        else np.zeros((0, self.dim or 0), np.float32))

    def check_dim(self, dim: int) -> None:
        if self.dim is not None and self.dim != dim:
            raise ToolkitError(f"--db {self.db_path}: holds {self.dim}-d embeddings but the model gives {dim}-d; "
                               f"use another --db for this model")

    def add(self, name: str, embeddings: np.ndarray) -> int:
        """Store ``embeddings`` (N, E) under ``name`` in one transaction; returns the name's new count."""
        embeddings = np.asarray(embeddings, np.float32)
        with self._lock:
            self.check_dim(embeddings.shape[1])
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT INTO faces (name, dim, embedding) VALUES (?, ?, ?)",
                                     [(name, int(e.shape[0]), e.tobytes()) for e in embeddings])
            # the in-memory copy follows the committed rows (same order as a reload would give)
            self.dim = int(embeddings.shape[1])
            self._matrix = np.concatenate([self._matrix.reshape(-1, self.dim), embeddings])
            self._names.extend([name] * len(embeddings))
            return self._names.count(name)

    def delete(self, name: str) -> int:
        """Remove every embedding of ``name``; returns how many (0 when unknown)."""
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                n = self._db.execute("DELETE FROM faces WHERE name = ?", (name,)).rowcount
            if n:
                keep = np.array([k != name for k in self._names], bool)
                self._matrix = self._matrix[keep]
                self._names = [k for k in self._names if k != name]
                self.dim = self.dim if self._names else None  # an emptied gallery takes any model, as on reload
            return n

    def listing(self) -> List[Tuple[str, int]]:
        """``[(name, count)]`` sorted by name."""
        with self._lock:
            counts: Dict[str, int] = {}
            for n in self._names:
                counts[n] = counts.get(n, 0) + 1
            return sorted(counts.items())

    def size(self) -> int:
        with self._lock:
            return len(self._names)

    def match(self, query: np.ndarray) -> Tuple[Optional[str], Optional[float]]:
        """Best cosine of ``query`` (E,) (L2-normalised) against every stored embedding."""
        with self._lock:
            if not self._names:
                return None, None
            scores = self._matrix @ np.asarray(query, np.float32)
            best = int(np.argmax(scores))
            return self._names[best], float(scores[best])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class HttpError(Exception):
    """An answer with a 4xx status and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class FaceServer(HTTPServer):
    """HTTP server answering on a fixed pool of ``threads`` handler threads; holds the model (behind
    ``model_lock``), the gallery and the settings. Connections beyond the pool wait in the pool's queue."""

    def __init__(self, address, model, gallery: FaceGallery, threshold: float, max_body: int, threads: int = 8,
                 idle_timeout: float = 15.0):
        self.model, self.gallery, self.threshold, self.max_body = model, gallery, float(threshold), int(max_body)
        self.model_lock = threading.Lock()
        self.idle_timeout = float(idle_timeout)
        # before binding: a failed bind calls server_close(), which shuts the pool down (threads start on demand)
        self._pool = ThreadPoolExecutor(max_workers=int(threads), thread_name_prefix="face-http")
        super().__init__(address, FaceHandler)

    def process_request(self, request, client_address) -> None:
        self._pool.submit(self._serve_connection, request, client_address)

    def _serve_connection(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def embed(self, images: List[np.ndarray], where: Sequence[str]) -> np.ndarray:
        """RGB uint8 images -> (N, E) L2-normalised; a bad image -> HttpError 400 naming its field."""
        from deploy.face_model import l2_normalize

        out = []
        with self.model_lock:
            for img, field in zip(images, where):
                try:
                    out.append(self.model.get_feature(img))
                except ToolkitError as exc:
                    raise HttpError(400, f"{field}: {exc}") from None
        return l2_normalize(np.stack(out).astype(np.float32))

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=True)  # connections in progress finish (idle ones within idle_timeout)
        self.gallery.close()


def _decode_b64_image(text, field: str) -> np.ndarray:
    from deploy.face_model import decode_image

    if not isinstance(text, str) or not text:
        raise HttpError(400, f"{field}: expected a base64 string of a JPEG/PNG image")
    if text.startswith("data:") and "," in text:  # data URL from a browser
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{field}: not valid base64") from None
    try:
        return decode_image(raw, field)
    except ToolkitError as exc:
        raise HttpError(400, f"{exc} (not a JPEG/PNG image)") from None


def _name(body: dict) -> str:
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise HttpError(400, "name: expected a non-empty string")
    if len(name) > MAX_NAME:
        raise HttpError(400, f"name: longer than {MAX_NAME} characters")
    return name.strip()


class FaceHandler(BaseHTTPRequestHandler):
    """Routes requests to the ``_get_*``/``_post_*`` methods; every answer is JSON."""

    server: FaceServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # socket timeout: an idle keep-alive connection is closed
        super().setup()

    def log_message(self, fmt, *args) -> None:  # keep the console for errors; access log at debug level
        logger.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        routes = {("GET", "/health"): self._get_health, ("GET", "/faces"): self._get_faces,
                  ("POST", "/registerFace"): self._post_register, ("POST", "/detectFace"): self._post_detect,
                  ("POST", "/deleteFace"): self._post_delete}
        try:
            handler = routes.get((method, path))
            if handler is None:
                if any(p == path for _, p in routes):
                    raise HttpError(405, f"{method} {path}: method not allowed")
                raise HttpError(404, f"{path}: no such endpoint (have {', '.join(sorted(p for _, p in routes))})")
            self._send(200, handler())
        except HttpError as exc:
            self._send(exc.status, {"error": str(exc)})
        except Exception as exc:  # a bug or a model failure: answer, log, keep serving
            logger.exception("request %s %s failed", method, path)
            self._send(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise HttpError(411, "Content-Length header required")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise HttpError(400, f"Content-Length {length!r}: not an integer") from None
        if n > self.server.max_body:
            self.close_connection = True  # the unread body must not be parsed as the next request
            self._drain(n)
            raise HttpError(413, f"request body of {n} bytes exceeds the limit of {self.server.max_body} bytes")
        try:
            body = json.loads(self.rfile.read(n) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, f"body: not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body: expected a JSON object")
        return body

    def _drain(self, n: int, limit: int = 64 * 2 ** 20) -> None:
        """Read and drop up to ``limit`` bytes of a refused body, so that a client still sending it gets the 413
        instead of a connection reset; past ``limit`` the connection is simply closed."""
        left = min(n, limit)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _get_health(self) -> dict:
        return {"status": "ok", "names": len(self.server.gallery.listing()), "embeddings": self.server.gallery.size(),
                "embedding_size": int(self.server.model.embedding_size), "threshold": self.server.threshold}

    def _get_faces(self) -> dict:
        faces = [{"name": n, "count": c} for n, c in self.server.gallery.listing()]
        return {"faces": faces, "total": sum(f["count"] for f in faces)}

    def _post_register(self) -> dict:
        body = self._body()
        name = _name(body)
        images = body.get("images", [body["image"]] if "image" in body else None)
        if not isinstance(images, list) or not images:
            raise HttpError(400, "images: expected a non-empty list of base64 JPEG/PNG images (or 'image')")
        fields = [f"images[{i}]" for i in range(len(images))]
        decoded = [_decode_b64_image(img, f) for img, f in zip(images, fields)]
        emb = self.server.embed(decoded, fields)  # every image checked before anything is stored
        count = self.server.gallery.add(name, emb)
        return {"name": name, "added": len(decoded), "count": count}

    def _post_detect(self) -> dict:
        body = self._body()
        if "image" not in body:
            raise HttpError(400, "image: missing (base64 JPEG/PNG of an aligned face)")
        emb = self.server.embed([_decode_b64_image(body["image"], "image")], ["image"])[0]
        best, score = self.server.gallery.match(emb)
        known = best is not None and score >= self.server.threshold
        return {"name": best if known else "unknown", "score": score, "candidate": best,
                "threshold": self.server.threshold}

    def _post_delete(self) -> dict:
        name = _name(self._body())
        n = self.server.gallery.delete(name)
        if not n:
            raise HttpError(404, f"name {name!r}: not in the gallery")
        return {"name": name, "deleted": n}


def make_server(model, db_path: str, host: str = "127.0.0.1", port: int = 8080, threshold: float = 0.3,
                max_body: int = MAX_BODY, threads: int = 8, idle_timeout: float = 15.0) -> FaceServer:
    """Open the gallery and bind the HTTP server (``port=0``: any free port, see ``server.server_address``).

    ``model`` needs ``get_feature(rgb_uint8_image) -> (E,)`` (a :class:`deploy.face_model.FaceModel`) and
    ``embedding_size``. Call ``serve_forever()`` (e.g. in a thread), then ``shutdown()`` and ``server_close()``.
    """
    if not -1.0 <= float(threshold) <= 1.0:
        raise ToolkitError(f"--threshold {threshold}: a cosine similarity threshold must lie in [-1, 1]")
    if int(threads) < 1:
        raise ToolkitError(f"--threads {threads}: must be >= 1")
    if not float(idle_timeout) > 0:
        raise ToolkitError(f"--idle-timeout {idle_timeout}: must be > 0 seconds")
    gallery = FaceGallery(db_path)
    try:
        gallery.check_dim(int(model.embedding_size))
        return FaceServer((host, int(port)), model, gallery, threshold, max_body, threads, idle_timeout)
    except OSError as exc:
        gallery.close()
        raise ToolkitError(f"--host {host} --port {port}: cannot listen ({exc.strerror or exc})") from None
    except BaseException:
        gallery.close()
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    from deploy.face_model import add_model_args, model_from_args

    p = argparse.ArgumentParser(description="Face registry HTTP service over a checkpoint and an SQLite gallery.")
    add_model_args(p)
    p.set_defaults(batch_size=1)  # one face per forward: a request never waits for a padded batch of 32
    p.add_argument("--db", required=True, help="SQLite gallery file (created when absent)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--threshold", type=float, default=0.3, help="cosine under which a face is 'unknown'")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY / 2 ** 20, help="largest request body (MiB)")
    p.add_argument("--threads", type=int, default=8, help="handler threads (connections beyond wait in a queue)")
    p.add_argument("--idle-timeout", type=float, default=15.0,
                   help="seconds an idle keep-alive connection may hold a handler thread")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model = model_from_args(args)
    server = make_server(model, args.db, args.host, args.port, args.threshold, int(args.max_body_mb * 2 ** 20),
                         args.threads, args.idle_timeout)
    host, port = server.server_address[:2]
    logger.info("serving on http://%s:%d (gallery %s: %d embeddings)", host, port, args.db, server.gallery.size())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        server.server_close()
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
