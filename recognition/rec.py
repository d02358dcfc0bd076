"""insightface RecordIO datasets: ``train.rec`` + ``train.idx`` + ``property``, read and written safely.

Layout (insightface's): record 0 is a header with ``flag > 0`` and label ``[first_identity_record, end]``;
images are records ``1..N`` with label = class id; identity records ``first_identity_record..end-1`` hold the
``[start, end)`` image-record range of class ``0, 1, ...``. A rec *without* identity records (mxnet im2rec
style, keys ``0..N-1``, label = class id) is accepted too.

The byte format is mxnet's (``mx.recordio.pack``/``unpack``, ``MXIndexedRecordIO`` writes). Reading goes
through an ``mmap`` of the rec so that many threads can read records at once without sharing a file cursor.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import struct
import tempfile
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from recognition.common import ToolkitError, atomic_replace, atomic_write

RECORD_MAGIC = 0xCED7230A
_IR_SIZE = 24  # struct 'IfQQ': flag, label, id, id2


def read_property(folder: str) -> Tuple[int, int, int]:
    """Read ``folder/property`` (one line ``num_classes,h,w``) -> ``(num_classes, h, w)``."""
    path = os.path.join(folder, "property") if os.path.isdir(folder) else folder
    if not os.path.isfile(path):
        raise ToolkitError(f"{path}: property file does not exist (expected one line 'num_classes,112,112')")
    with open(path) as f:
        text = f.read().strip()
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) <= 0:
        raise ToolkitError(
            f"{path}: cannot parse {text[:60]!r}; expected one line 'num_classes,h,w' e.g. '1000,112,112'")
    return values[0], values[1], values[2]


def write_property(folder: str, num_classes: int, h: int = 112, w: int = 112) -> str:
    """Write ``folder/property`` atomically; returns its path."""
    path = os.path.join(folder, "property")
    with atomic_write(path, "w") as f:
        f.write(f"{int(num_classes)},{int(h)},{int(w)}\n")
    return path


def rec_paths(path: str, name: str = "train") -> Tuple[str, str]:
    """``(rec, idx)`` paths for a folder, a ``.rec`` path or a prefix."""
    if os.path.isdir(path) or path.endswith(os.sep):
        base = os.path.join(path, name)
    elif path.endswith(".rec") or path.endswith(".idx"):
        base = path[:-4]
    else:
        base = path
    return base + ".rec", base + ".idx"


class RecordReader:
    """Random access to an insightface/im2rec RecordIO file; thread-safe reads.

    Attributes
    ----------
    has_identity_records : bool
    identities : list of (start, end)
        Image-record key range per class id (only when ``has_identity_records``; else ``[]``).
    image_keys : list of int
        Record keys holding images, in file order.
    keys : list of int
        Every key of the idx file.
    """

    def __init__(self, path_rec: str, path_idx: Optional[str] = None):
        if os.path.isdir(path_rec):
            path_rec = os.path.join(path_rec, "train.rec")
        self.path_rec = path_rec
        self.path_idx = path_idx or os.path.splitext(path_rec)[0] + ".idx"
        if not os.path.isfile(path_rec):
            raise ToolkitError(f"{path_rec}: record file does not exist")
        if not os.path.isfile(self.path_idx):
            raise ToolkitError(f"{self.path_idx}: index file does not exist (needed next to {path_rec})")
        self._offsets = self._load_idx()
        size = os.path.getsize(path_rec)
        if size == 0 or not self._offsets:
            raise ToolkitError(f"{path_rec}: empty record file (no records)")
        with open(path_rec, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        self.keys = list(self._offsets)
        self._check_idx(size)
        self.has_identity_records = False
        self.identities: List[Tuple[int, int]] = []
        self.header0: Optional[Tuple[int, int]] = None
        self._parse_layout()

    # -- idx ---------------------------------------------------------------------------------------------------------
    def _load_idx(self) -> dict:
        offsets = {}
        with open(self.path_idx) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                try:
                    key, pos = int(parts[0]), int(parts[1])
                except (ValueError, IndexError):
                    raise ToolkitError(f"{self.path_idx}:{lineno}: cannot parse {line.strip()[:60]!r}; "
                                       "expected 'key<TAB>offset'") from None
                offsets[key] = pos
        return offsets

    def _check_idx(self, size: int) -> None:
        """Every idx offset must point at a record header inside the rec (catches a stale or foreign idx)."""
        pos = np.fromiter(self._offsets.values(), dtype=np.int64, count=len(self._offsets))
        bad = (pos < 0) | (pos + 8 > size)
        if bad.any():
            key = self.keys[int(np.argmax(bad))]
            raise ToolkitError(f"{self.path_idx}: disagrees with {self.path_rec}: key {key} points at offset "
                               f"{self._offsets[key]}, past the end of the rec ({size} bytes); rebuild the idx")
        magic = self._u32(pos)
        lens = self._u32(pos + 4) & ((1 << 29) - 1)
        bad = (magic != RECORD_MAGIC) | (pos + 8 + lens > size)
        if bad.any():
            key = self.keys[int(np.argmax(bad))]
            raise ToolkitError(f"{self.path_idx}: disagrees with {self.path_rec}: key {key} at offset "
                               f"{self._offsets[key]} is not the start of a complete record; rebuild the idx")

    def _u32(self, pos: np.ndarray) -> np.ndarray:
        b = self._buf
        return (b[pos].astype(np.uint32) | (b[pos + 1].astype(np.uint32) << 8)
                | (b[pos + 2].astype(np.uint32) << 16) | (b[pos + 3].astype(np.uint32) << 24))

    # -- layout ------------------------------------------------------------------------------------------------------
    def _parse_layout(self) -> None:
        if 0 in self._offsets:
            flag, label, payload = self._read_raw(0)
            if flag > 0 and len(label) >= 2 and len(payload) == 0:
                first, end = int(label[0]), int(label[1])
                if not 0 < first <= end:
                    raise ToolkitError(f"{self.path_rec}: record 0 says identity records are [{first}, {end}), "
                                       "which is not a valid range")
                missing = [k for k in range(first, end) if k not in self._offsets]
                if missing:
                    raise ToolkitError(f"{self.path_idx}: identity record {missing[0]} named by record 0 is "
                                       "missing from the idx")
                self.has_identity_records = True
                self.header0 = (first, end)
                image_keys = []
                for key in range(first, end):
                    _, lab, _ = self._read_raw(key)
                    if len(lab) < 2:
                        raise ToolkitError(f"{self.path_rec}: identity record {key} has no [start, end) label")
                    a, b = int(lab[0]), int(lab[1])
                    self.identities.append((a, b))
                    image_keys.extend(range(a, b))
                absent = [k for k in image_keys if k not in self._offsets]
                if absent:
                    raise ToolkitError(f"{self.path_idx}: image record {absent[0]} named by an identity record is "
                                       "missing from the idx")
                self.image_keys = image_keys
                return
        self.image_keys = list(self.keys)

    # -- reads -------------------------------------------------------------------------------------------------------
    def read_bytes(self, key: int) -> bytes:
        """The raw packed record (``IRHeader`` + payload) of ``key``."""
        try:
            pos = self._offsets[key]
        except KeyError:
            raise ToolkitError(f"{self.path_idx}: no record with key {key}") from None
        lrec = struct.unpack_from("<I", self._mm, pos + 4)[0]
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        if cflag != 0:  # multi-part record (> 512 MB or containing the magic): let mxnet reassemble it
            return self._read_mx(key)
        return self._mm[pos + 8:pos + 8 + length]

    def _read_mx(self, key: int) -> bytes:
        import mxnet as mx

        r = mx.recordio.MXIndexedRecordIO(self.path_idx, self.path_rec, "r")
        try:
            return r.read_idx(key)
        finally:
            r.close()

    def _read_raw(self, key: int) -> Tuple[int, np.ndarray, bytes]:
        s = self.read_bytes(key)
        if len(s) < _IR_SIZE:
            raise ToolkitError(f"{self.path_rec}: record {key} is truncated ({len(s)} bytes)")
        flag, label, _, _ = struct.unpack_from("<IfQQ", s, 0)
        if flag > 0:
            end = _IR_SIZE + 4 * flag
            if len(s) < end:
                raise ToolkitError(f"{self.path_rec}: record {key} is truncated (label of {flag} floats)")
            return flag, np.frombuffer(s, np.float32, flag, _IR_SIZE).copy(), s[end:]
        return flag, np.array([label], np.float32), s[_IR_SIZE:]

    def read(self, key: int) -> Tuple[Union[float, np.ndarray], bytes]:
        """``(label, image_bytes)`` of record ``key``: a float label, or an array when the record has several."""
        flag, label, payload = self._read_raw(key)
        return (float(label[0]) if flag == 0 else label), payload

    def labels(self, keys: Optional[Sequence[int]] = None) -> np.ndarray:
        """First label float of each image record (class id), read straight from the headers. Shape (len(keys),)."""
        keys = self.image_keys if keys is None else keys
        if not len(keys):
            return np.zeros((0,), np.float32)
        pos = np.array([self._offsets[k] for k in keys], dtype=np.int64) + 8
        flag = self._u32(pos)
        at = np.where(flag == 0, pos + 4, pos + _IR_SIZE)
        raw = self._u32(at)
        return raw.view(np.float32).copy()

    def __len__(self) -> int:
        return len(self.image_keys)

    def close(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self._buf = None
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RecordWriter:
    """Write ``train.rec``/``train.idx`` through temporary names; ``close()`` renames them into place.

    ``abort()`` (or an exception inside ``with``) removes the temporary files: an interrupted tool never
    leaves a half-written rec under the final name.
    """

    def __init__(self, prefix_or_dir: str, name: str = "train"):
        import mxnet as mx

        self.path_rec, self.path_idx = rec_paths(prefix_or_dir, name)
        folder = os.path.dirname(os.path.abspath(self.path_rec))
        os.makedirs(folder, exist_ok=True)
        base = os.path.basename(self.path_rec)
        fd, self._tmp_rec = tempfile.mkstemp(prefix="." + base + ".", suffix=".tmp", dir=folder)
        os.close(fd)
        self._tmp_idx = self._tmp_rec[:-4] + ".idx.tmp"
        self._rec = mx.recordio.MXIndexedRecordIO(self._tmp_idx, self._tmp_rec, "w")
        self.count = 0

    def write(self, key: int, label: Union[float, Sequence[float]], payload: bytes = b"", flag: Optional[int] = None,
              rec_id: int = 0) -> None:
        """Append one record: ``label`` a float (flag 0) or a sequence of floats (flag = its length)."""
        import mxnet as mx

        if np.ndim(label) == 0:
            header = mx.recordio.IRHeader(0 if flag is None else flag, float(label), rec_id, 0)
        else:
            lab = np.asarray(label, dtype=np.float32)
            header = mx.recordio.IRHeader(len(lab) if flag is None else flag, lab, rec_id, 0)
        self._rec.write_idx(int(key), mx.recordio.pack(header, bytes(payload)))
        self.count += 1

    def close(self) -> Tuple[str, str]:
        """Finish: fsync and rename the idx, then the rec. Returns ``(rec, idx)``."""
        if self._rec is None:
            return self.path_rec, self.path_idx
        self._rec.close()
        self._rec = None
        umask = os.umask(0)
        os.umask(umask)
        for tmp, final in ((self._tmp_idx, self.path_idx), (self._tmp_rec, self.path_rec)):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
            atomic_replace(tmp, final)
        return self.path_rec, self.path_idx

    def abort(self) -> None:
        """Drop everything written so far (temporary files removed, final names untouched)."""
        if self._rec is not None:
            self._rec.close()
            self._rec = None
        for p in (self._tmp_rec, self._tmp_idx):
            with contextlib.suppress(OSError):
                os.unlink(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_dataset(out_dir: str, samples: Sequence[Tuple[int, object]], num_classes: Optional[int] = None,
                  image_size: Tuple[int, int] = (112, 112), identity_records: bool = True, shuffle: bool = False,
                  seed: int = 0, name: str = "train") -> dict:
    """Write an insightface dataset folder from ``samples`` = ``[(class_id, bytes or zero-arg callable), ...]``.

    With ``identity_records`` the images are grouped by class (stable order) as records ``1..N``, followed by one
    identity record per class and record 0 as header. Without, keys are ``0..N-1`` (optionally shuffled with
    ``seed``). Also writes ``property``. Returns ``{rec, idx, property, num_classes, num_images}``.
    """
    labels = np.array([int(s[0]) for s in samples], dtype=np.int64)
    if len(labels) == 0:
        raise ToolkitError(f"{out_dir}: no images to write")
    if labels.min() < 0:
        raise ToolkitError(f"{out_dir}: negative class id {int(labels.min())}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.max() >= num_classes:
        raise ToolkitError(f"{out_dir}: class id {int(labels.max())} >= num_classes {num_classes}")

    def payload(i: int) -> bytes:
        data = samples[i][1]
        return data() if callable(data) else data

    os.makedirs(out_dir, exist_ok=True)
    with RecordWriter(os.path.join(out_dir, ""), name) as w:
        if identity_records:
            order = np.argsort(labels, kind="stable")
            n = len(order)
            counts = np.bincount(labels, minlength=num_classes)
            starts = 1 + np.concatenate([[0], np.cumsum(counts)[:-1]])
            w.write(0, [n + 1, n + 1 + num_classes], b"", flag=2)
            for key, i in enumerate(order, 1):
                w.write(key, float(labels[i]), payload(int(i)))
            for c in range(num_classes):
                w.write(n + 1 + c, [starts[c], starts[c] + counts[c]], b"", flag=2)
        else:
            order = np.arange(len(labels))
            if shuffle:
                np.random.RandomState(seed).shuffle(order)
            for key, i in enumerate(order):
                w.write(key, float(labels[i]), payload(int(i)))
    prop = write_property(os.path.dirname(os.path.abspath(w.path_rec)), num_classes, image_size[0], image_size[1])
    return {"rec": w.path_rec, "idx": w.path_idx, "property": prop, "num_classes": num_classes,
            "num_images": int(len(labels))}


# The verification .bin reader lives in recognition/bin_pickle.py; its public names stay importable from here.
from recognition.bin_pickle import safe_load_bin_pickle, safe_load_pickle, save_bin  # noqa: E402,F401
