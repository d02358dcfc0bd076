"""Exact cosine top-k over a growing gallery of L2-normalised embeddings: the matcher of search.py and the service.

    index = EmbeddingIndex(dim=128)
    ids = index.add(embeddings)                    # (N, E) float32, normalised here; returns row ids (N,)
    scores, rows = index.search(queries, k=5)      # (Q, k) cosine, best first, and row ids (-1 = none)
    index.remove(rows_to_drop)                     # boolean mask or row ids; later rows shift down
    index.save("g.npy"); EmbeddingIndex.load("g.npy")  # a 1M x 512 gallery loads in about a second
    EmbeddingIndex.from_blobs(blobs, dim)          # rows stored as float32 bytes (an SQLite BLOB column)

Why exact NumPy (issue 17, ``benchmarks/bench_search.py`` on the shared 2-core machine): one query against N
stored rows is one pass over N x E float32, memory-bound; queries in a batch share that pass (one GEMM). Scores
are computed in blocks of ``block_rows`` rows, so the temporary is (Q, block_rows), not (Q, N); only the k best
per block are kept (``argpartition``). Measured one query: 100k x 512 55 ms (sklearn ``NearestNeighbors``, the
old matcher: 368 ms), 1M x 128 203 ms, 1M x 512 2.7 s at load 13. faiss's exact ``IndexFlatIP`` was 0.5-2.4x
of that and holds a second copy of the matrix; faiss IVF answers in under a millisecond (recall@1 1.000 on
near-duplicate queries) but took 97 s to build at 1M x 128. Exact search needs no extra package, no rebuild
after each add/delete, and is never wrong; a 1M x 512 gallery that needs interactive latency on a CPU this small
needs an approximate index (faiss IVF) built offline and saved, which this module does not do.
Storage grows by doubling (amortised O(1) adds).
"""
from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np

from recognition.common import ToolkitError, atomic_write


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class EmbeddingIndex:
    """Row-major float32 store of unit vectors with exact blockwise top-k (see the module docstring).

    ``dim``: embedding size E. ``len(index)``: rows stored. ``matrix``: the (N, E) view of the stored rows.
    """

    def __init__(self, dim: int, capacity: int = 1024, block_rows: int = 65536):
        if dim < 1:
            raise ToolkitError(f"gallery index: embedding size {dim} must be >= 1")
        self.dim, self.block_rows = int(dim), int(block_rows)
        self._data = np.zeros((max(1, int(capacity)), self.dim), np.float32)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def matrix(self) -> np.ndarray:
        return self._data[:self._size]

    def _check(self, x, what: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ToolkitError(f"gallery index: {what} of shape {tuple(x.shape)}, expected (N, {self.dim})")
        if not np.all(np.isfinite(x)):
            raise ToolkitError(f"gallery index: {what} contain NaN or inf")
        return x

    def add(self, embeddings) -> np.ndarray:
        """Append ``embeddings`` (N, E) (normalised here); returns their row ids (N,)."""
        x = _normalise(self._check(embeddings, "embeddings"))
        need = self._size + len(x)
        if need > len(self._data) or not self._data.flags.writeable:
            grown = np.zeros((max(need, 2 * len(self._data)), self.dim), np.float32)
            grown[:self._size] = self._data[:self._size]
            self._data = grown
        self._data[self._size:need] = x
        ids = np.arange(self._size, need)
        self._size = need
        return ids

    def remove(self, rows) -> int:
        """Drop rows given as a boolean mask (N,) or row ids; later rows move up. Returns how many were removed."""
        rows = np.asarray(rows)
        keep = np.ones(self._size, bool)
        if rows.dtype == bool:
            if rows.shape != (self._size,):
                raise ToolkitError(f"gallery index: mask of {rows.shape} for {self._size} rows")
            keep &= ~rows
        else:
            keep[rows.astype(np.int64)] = False
        removed = int(self._size - keep.sum())
        if removed:
            kept = self._data[:self._size][keep]  # a copy: fine for a read-only (memory-mapped) store too
            self._data, self._size = kept, len(kept)
        return removed

    def search(self, queries, k: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        """``queries`` (Q, E) -> ``(scores (Q, k) float32 cosine, rows (Q, k) int64)``, best first.

        Fewer stored rows than ``k``: the missing places hold score ``-inf`` and row ``-1``.
        """
        q = _normalise(self._check(queries, "queries"))
        k = int(k)
        if k < 1:
            raise ToolkitError(f"gallery index: k={k} must be >= 1")
        best_s = np.full((len(q), k), -np.inf, np.float32)
        best_i = np.full((len(q), k), -1, np.int64)
        for start in range(0, self._size, self.block_rows):
            block = self._data[start:min(start + self.block_rows, self._size)]
            s = q @ block.T  # (Q, b)
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1] else \
                np.broadcast_to(np.arange(s.shape[1]), (len(q), s.shape[1]))
            cand_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
            cand_i = np.concatenate([best_i, part + start], axis=1)
            top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
        return best_s, best_i

    # ------------------------------------------------------------------------------------------- persistence
    def save(self, path: str) -> None:
        """Write the rows as a ``.npy`` (float32 (N, E)), atomically."""
        with atomic_write(path, "wb") as f:
            np.save(f, self.matrix)

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, normalised: bool = False) -> "EmbeddingIndex":
        """Wrap an (N, E) float32 array without a copy when it is already C-contiguous float32 and normalised."""
        m = np.asarray(matrix)
        if m.ndim != 2:
            raise ToolkitError(f"gallery index: matrix of shape {m.shape}, expected (N, E)")
        index = cls(m.shape[1], capacity=1)
        if normalised and m.dtype == np.float32 and m.flags.c_contiguous:
            index._data, index._size = m, len(m)
        else:
            index._data = np.ascontiguousarray(_normalise(index._check(m, "matrix")))
            index._size = len(m)
        return index

    @classmethod
    def load(cls, path: str, mmap: bool = False) -> "EmbeddingIndex":
        """Read a ``.npy`` written by :meth:`save`; ``mmap=True`` maps it instead (opens at once, pages are read
        on first search; an ``add``/``remove`` then copies it into memory)."""
        try:
            m = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as exc:
            raise ToolkitError(f"{path}: not a gallery .npy ({exc})") from None
        if m.ndim != 2 or m.dtype != np.float32:
            raise ToolkitError(f"{path}: expected a float32 (N, E) array, got {m.dtype} {m.shape}")
        return cls.from_matrix(m, normalised=True)

    @classmethod
    def from_blobs(cls, blobs: Iterable[bytes], dim: int) -> "EmbeddingIndex":
        """Rows stored as raw float32 bytes (e.g. ``SELECT embedding FROM faces ORDER BY id``), joined once.

        Measured (``bench_search.py``): for 1M rows the SQLite ``fetchall`` itself dominates (~30 s on the shared
        2-core machine, joined or row by row alike); a ``.npy`` snapshot (:meth:`save`/:meth:`load`) is the way to
        start a service on a large gallery quickly.
        """
        raw = b"".join(blobs)
        if len(raw) % (4 * dim):
            raise ToolkitError(f"gallery index: {len(raw)} bytes are not a whole number of {dim}-d float32 rows")
        return cls.from_matrix(np.frombuffer(raw, np.float32).reshape(-1, dim).copy(), normalised=True)


__all__ = ["EmbeddingIndex"]
