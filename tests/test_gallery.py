"""deploy/gallery.py: rows checked when opened, the file and the in-memory matrix never disagree, old files open."""
import sqlite3
import threading

import numpy as np
import pytest

from deploy.gallery import FaceGallery
from recognition.common import ToolkitError


def unit(rng, n, e=8):
    x = rng.normal(size=(n, e)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reloaded(db):
    """(names, matrix) of a fresh gallery on ``db``: what the file holds."""
    g = FaceGallery(db)
    try:
        return list(g._names), np.array(g._buf[:g._n])
    finally:
        g.close()


def test_old_file_opens_and_match_is_a_matrix_product(tmp_path):
    """A gallery written with plain SQL in the first service's schema opens as it is; match = argmax(M @ q)."""
    db = str(tmp_path / "old.sqlite")
    rng = np.random.RandomState(0)
    rows = unit(rng, 5)
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE faces (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, dim INTEGER NOT NULL, "
                "embedding BLOB NOT NULL)")
    con.executemany("INSERT INTO faces (name, dim, embedding) VALUES (?, ?, ?)",
                    [(f"n{i % 3}", 8, r.tobytes()) for i, r in enumerate(rows)])
    con.commit()
    con.close()
    g = FaceGallery(db)
    try:
        assert g.listing() == [("n0", 2), ("n1", 2), ("n2", 1)] and g.dim == 8
        q = unit(rng, 1)[0]
        best = int(np.argmax(rows @ q))
        name, score = g.match(q)
        assert name == f"n{best % 3}" and score == pytest.approx(float(rows[best] @ q), abs=1e-6)
    finally:
        g.close()


@pytest.mark.parametrize("row, message", [
    (("bad", 8, b"\x00\x01\x02"), r"row id 3 \(name 'bad'\): embedding of 3 bytes where dim 8 needs 32"),
    (("wide", 9, np.ones(9, np.float32).tobytes()), r"row id 3 \(name 'wide'\): dim 9 differs from the first row's 8"),
    (("nan", 8, np.full(8, np.nan, np.float32).tobytes()), r"row id 3 \(name 'nan'\): embedding norm nan is not 1"),
    (("big", 8, np.ones(8, np.float32).tobytes()), r"row id 3 \(name 'big'\): embedding norm 2.828 is not 1"),
    (("txt", 8, "not a blob"), r"row id 3 \(name 'txt'\): embedding is a str, not a blob"),
    (("\x01ctl", 8, None), r"row id 3: name: contains control characters"),
])
def test_tampered_row_is_one_line_naming_it(tmp_path, row, message):
    db = str(tmp_path / "g.sqlite")
    g = FaceGallery(db)
    g.add("ok", unit(np.random.RandomState(1), 2))
    g.close()
    name, dim, blob = row
    if blob is None:
        blob = unit(np.random.RandomState(2), 1)[0].tobytes()
    con = sqlite3.connect(db)
    con.execute("INSERT INTO faces (name, dim, embedding) VALUES (?, ?, ?)", (name, dim, blob))
    con.commit()
    con.close()
    with pytest.raises(ToolkitError, match=message) as err:
        FaceGallery(db)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--db {db}: ")


def test_refused_add_and_failed_commit_change_nothing(tmp_path):
    db = str(tmp_path / "g.sqlite")
    rng = np.random.RandomState(3)
    g = FaceGallery(db)
    try:
        g.add("a", unit(rng, 3))
        before = (list(g._names), np.array(g._buf[:g._n]))
        for bad in (np.ones((1, 8), np.float32), unit(rng, 2)[:, :5], np.full((1, 8), np.nan, np.float32),
                    np.zeros((0, 8), np.float32), unit(rng, 1)[0]):
            with pytest.raises((ValueError, ToolkitError)):
                g.add("b", bad)
        with pytest.raises(ValueError, match="lone surrogate"):
            g.add("\ud800", unit(rng, 1))

        class FailingDb:  # the commit fails half-way (disk full, locked file...): SQLite rolls back
            def __init__(self, real):
                self.real = real

            def execute(self, sql, *a):
                return self.real.execute(sql, *a)

            def executemany(self, sql, params):
                self.real.executemany(sql, params[:1])  # one row written inside the transaction...
                raise sqlite3.OperationalError("database or disk is full")  # ...then the failure

            def close(self):
                self.real.close()

        g._db = FailingDb(g._db)
        with pytest.raises(ToolkitError, match="write failed, nothing changed .*disk is full"):
            g.add("c", unit(rng, 4))
        with pytest.raises(ToolkitError, match="write failed"):
            g.delete("a")
        assert (list(g._names), g._n) == (before[0], 3) and np.array_equal(g._buf[:g._n], before[1])
        assert g.listing() == [("a", 3)]
    finally:
        g.close()
    names, matrix = reloaded(db)
    assert names == before[0] and np.array_equal(matrix, before[1])


def test_concurrent_changes_keep_file_and_memory_equal(tmp_path):
    """Threads add and delete at random; memory (names, rows, order) equals a fresh load of the file afterwards,
    and every match during the run saw a consistent snapshot."""
    db = str(tmp_path / "g.sqlite")
    g = FaceGallery(db)
    errors = []

    def worker(seed):
        rng = np.random.RandomState(seed)
        try:
            for _ in range(40):
                name = f"p{rng.randint(6)}"
                if rng.rand() < 0.25:
                    g.delete(name)
                else:
                    g.add(name, unit(rng, rng.randint(1, 4)))
                q = unit(rng, 1)[0]
                got, score = g.match(q)
                assert got is None or -1.0001 <= score <= 1.0001
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors
        mem_names, mem = list(g._names), np.array(g._buf[:g._n])
        counts = dict(g.listing())
    finally:
        g.close()
    names, matrix = reloaded(db)
    assert names == mem_names and np.array_equal(matrix, mem)
    assert counts == {n: names.count(n) for n in set(names)}
