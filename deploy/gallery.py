"""The face service's gallery: named L2-normalised embeddings in an SQLite file, mirrored by an in-memory matrix.

Format (unchanged since the first service, so older gallery files open as they are): one table
``faces(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT, dim INTEGER, embedding BLOB)``, the blob being ``dim``
little-endian float32 values. Every row is checked when the file is opened (blob size = 4 x dim, one dim for all
rows, finite values, unit norm, a name that is valid UTF-8); a bad row is one line naming its id.

The file and the memory can never disagree: a change is checked and prepared first, committed to SQLite, and only
then published to memory by plain assignments (which cannot fail), all under one lock; a failed commit leaves the
memory as it was. Matching reads a snapshot ``(matrix, names)`` taken under the lock and multiplies outside it.
"""
from __future__ import annotations

import re
import sqlite3
import threading
from collections import Counter
from typing import Dict, List, Optional, Tuple

import numpy as np

from recognition.common import ToolkitError

NORM_TOLERANCE = 1e-3  # stored rows are unit vectors; anything further off was not written by this service
MAX_NAME = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_name(name: object, field: str = "name") -> str:
    """A stripped, non-empty name of at most :data:`MAX_NAME` characters that encodes as UTF-8 (no lone surrogates)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{field}: expected a non-empty string")
    name = name.strip()
    if len(name) > MAX_NAME:
        raise ValueError(f"{field}: longer than {MAX_NAME} characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field}: not valid Unicode text (a lone surrogate at character {exc.start})") from None
    if _CONTROL.search(name):
        raise ValueError(f"{field}: contains control characters")
    return name


class FaceGallery:
    """Named embeddings ``(N, E)`` float32, L2-normalised; thread-safe; survives restarts.

    ``match(q)`` with ``q`` (E,) L2-normalised returns ``(name, score)`` of the best stored row by cosine (one
    matrix-vector product), or ``(None, None)`` when the gallery is empty.
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
        try:
            self._load()
        except BaseException:
            self._db.close()
            raise

    # -- loading -----------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        """Read every row in bulk and check it; sets ``dim``, the matrix (capacity-doubling buffer) and names.

        One pass in chunks inside a read transaction: each chunk's rows are checked, then their blobs are copied
        straight into the preallocated ``(N, E)`` matrix.
        """
        where = f"--db {self.db_path}"
        names: List[str] = []
        seen: set = set()
        try:
            self._db.execute("BEGIN")
            try:
                total = self._db.execute("SELECT count(*) FROM faces").fetchone()[0]
                cur = self._db.execute("SELECT id, name, dim, embedding FROM faces ORDER BY id")
                matrix, dim = np.empty((0, 0), np.float32), None
                while True:
                    rows = cur.fetchmany(65536)
                    if not rows:
                        break
                    if dim is None:
                        dim = rows[0][2] if isinstance(rows[0][2], int) and rows[0][2] > 0 else -1
                        matrix = np.empty((total, max(dim, 0)), np.float32)
                    self._check_rows(rows, dim, where, seen)
                    n = len(names)
                    if n + len(rows) > total:
                        raise ToolkitError(f"{where}: changed while being read; retry")
                    matrix[n:n + len(rows)] = np.frombuffer(b"".join(r[3] for r in rows), "<f4").reshape(-1, dim)
                    names.extend(r[1] for r in rows)
            finally:
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise ToolkitError(f"{where}: cannot read the faces table ({exc})") from None
        matrix = matrix[:len(names)]
        if names:
            norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))  # no (N, E) temporary, unlike linalg.norm
            off = ~np.isfinite(norms) | (np.abs(norms - 1) > NORM_TOLERANCE)
            if off.any():
                i = int(np.argmax(off))
                rid = self._db.execute("SELECT id FROM faces ORDER BY id LIMIT 1 OFFSET ?", (i,)).fetchone()[0]
                raise ToolkitError(f"{where}: row id {rid} (name {names[i]!r}): embedding norm {norms[i]:.4g} is not 1 "
                                   "(not finite or not L2-normalised); fix or delete it")
        self.dim = dim
        self._buf, self._n, self._names = matrix, len(names), names
        self._counts: Dict[str, int] = dict(Counter(names))

    @staticmethod
    def _check_rows(rows: list, dim: int, where: str, seen: set) -> None:
        """Blob type and size, one dim, names (each distinct name checked once); one line naming a bad row."""
        dims = np.fromiter((r[2] if isinstance(r[2], int) else -1 for r in rows), np.int64, len(rows))
        sizes = np.fromiter((len(r[3]) if isinstance(r[3], bytes) else -1 for r in rows), np.int64, len(rows))
        bad = (dims != dim) | (sizes != 4 * dims) | (dims < 1)
        if bad.any():
            i = int(np.argmax(bad))
            rid, name, d, blob = rows[i]
            if not isinstance(blob, bytes):
                what = f"embedding is a {type(blob).__name__}, not a blob"
            elif d != dim and isinstance(d, int) and d > 0 and dim > 0:
                what = f"dim {d!r} differs from the first row's {dim}"
            else:
                what = f"embedding of {len(blob)} bytes where dim {d!r} needs {4 * d if isinstance(d, int) else '?'}"
            raise ToolkitError(f"{where}: row id {rid} (name {name!r}): {what}; fix or delete that row")
        for rid, name, _, _ in rows:
            if name in seen:
                continue
            try:
                if check_name(name) != name:
                    raise ValueError("name: has leading or trailing spaces")
            except ValueError as exc:
                raise ToolkitError(f"{where}: row id {rid}: {exc}") from None
            seen.add(name)

    def check_dim(self, dim: int) -> None:
        if self.dim is not None and self.dim != dim:
            raise ToolkitError(f"--db {self.db_path}: holds {self.dim}-d embeddings but the model gives {dim}-d; "
                               f"use another --db for this model")

    # -- changes -----------------------------------------------------------------------------------------------------
    def add(self, name: str, embeddings: np.ndarray) -> int:
        """Store ``embeddings`` (N, E) under ``name`` in one transaction; returns the name's new count.

        Checked first (shape, dim, finite, unit norm), committed, then published to memory: a failure anywhere
        leaves both the file and the memory as they were.
        """
        name = check_name(name)
        emb = np.ascontiguousarray(embeddings, dtype="<f4")
        if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
            raise ValueError(f"embeddings: expected a non-empty (N, E) array, got shape {emb.shape}")
        norms = np.linalg.norm(emb, axis=1)
        if not (np.isfinite(norms).all() and (np.abs(norms - 1) <= NORM_TOLERANCE).all()):
            raise ValueError("embeddings: every row must be finite and L2-normalised")
        with self._lock:
            self.check_dim(emb.shape[1])
            dim, n = emb.shape[1], self._n
            buf = self._buf if self._buf.shape[1:] == (dim,) else np.zeros((0, dim), np.float32)
            if n + len(emb) > len(buf):  # grow by doubling: appends stay amortised O(rows added)
                grown = np.empty((max(2 * len(buf), n + len(emb), 64), dim), np.float32)
                grown[:n] = buf[:n]
                buf = grown
            buf[n:n + len(emb)] = emb  # rows past self._n: invisible to readers until published
            self._commit("INSERT INTO faces (name, dim, embedding) VALUES (?, ?, ?)",
                         [(name, int(dim), row.tobytes()) for row in emb])
            self._buf, self.dim = buf, int(dim)  # published only after the commit
            self._names.extend([name] * len(emb))
            self._n = n + len(emb)
            self._counts[name] = self._counts.get(name, 0) + len(emb)
            return self._counts[name]

    def delete(self, name: str) -> int:
        """Remove every embedding of ``name``; returns how many (0 when unknown)."""
        with self._lock:
            count = self._counts.get(name, 0)
            if not count:
                return 0
            keep = np.fromiter((k != name for k in self._names), bool, self._n)
            buf = self._buf[:self._n][keep]  # a new array: snapshots taken by match() stay valid
            names = [k for k in self._names if k != name]
            self._commit("DELETE FROM faces WHERE name = ?", [(name,)])
            self._buf, self._names, self._n = buf, names, len(names)
            del self._counts[name]
            if not names:
                self.dim = None  # an emptied gallery takes any model, as on reload
            return count

    def _commit(self, sql: str, params: list) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, params)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise ToolkitError(f"--db {self.db_path}: write failed, nothing changed ({exc})") from None

    # -- reading -----------------------------------------------------------------------------------------------------
    def listing(self) -> List[Tuple[str, int]]:
        """``[(name, count)]`` sorted by name."""
        with self._lock:
            return sorted(self._counts.items())

    def size(self) -> int:
        return self._n

    def match(self, query: np.ndarray) -> Tuple[Optional[str], Optional[float]]:
        """Best cosine of ``query`` (E,) (L2-normalised) against every stored embedding."""
        with self._lock:
            matrix, names, n = self._buf, self._names, self._n
            if not n:
                return None, None
            view = matrix[:n]
        scores = view @ np.asarray(query, np.float32)  # outside the lock: rows [:n] are never written again
        best = int(np.argmax(scores))
        return names[best], float(scores[best])

    def close(self) -> None:
        with self._lock:
            self._db.close()
