"""``FaceImageIter``: a multi-threaded, exactly resumable ``mx.io.DataIter`` over insightface RecordIO data.

Decoding runs in a thread pool (``cv2.imdecode`` releases the GIL) a few batches ahead of the consumer.
Every random choice (epoch order, mirror, cutoff, colour jitter) is a pure function of ``(seed, epoch, batch)``,
so ``get_state()``/``set_state()`` resume exactly and the number of threads never changes the output.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import mxnet as mx
import numpy as np

from datasets.shift import apply_shift, parse_augment
from recognition.common import ToolkitError
from recognition.rec import RecordReader, read_property

logger = logging.getLogger("recognition")

_PREFETCH = 2  # batches decoded ahead of the consumer
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # RGB luma weights (ITU-R BT.601)



def images_kept(labels: np.ndarray, images_filter: int) -> np.ndarray:
    """Boolean mask of the images ``--images-filter N`` keeps: those whose identity has at least N images."""
    ids = np.asarray(labels).astype(np.int64)
    return np.bincount(ids)[ids] >= images_filter if len(ids) else np.zeros(0, bool)

class FaceImageIter(mx.io.DataIter):
    """Batches ``(data (B, 3, H, W) float32 RGB 0-255, label (B,) float32)`` from ``train.rec``.

    Parameters
    ----------
    path_imgrec : str
        ``.../train.rec``; ``train.idx`` and ``property`` must sit next to it.
    batch_size : int
        B; the last partial batch of an epoch is dropped.
    data_shape : (3, H, W)
        Images of another size are resized.
    shuffle, rand_mirror : bool
        Per-epoch shuffle (seeded); horizontal flip with probability 0.5.
    cutoff : int
        > 0: with probability 0.5, erase a ``cutoff`` x ``cutoff`` square at a random centre to grey (127).
    color_jitter : float
        > 0: random brightness, contrast and saturation factors in ``[1 - j, 1 + j]``.
    images_filter : int
        Drop identities with fewer than this many images (labels keep their class ids).
    num_workers : int
        Decoding threads (0: decode in the caller's thread).
    seed : int or None
        Seed of every random choice; None picks one (kept in ``get_state()``).
    images_per_identity : int
        K > 0: each batch holds B/K identities x K images (for triplet losses); B must be a multiple of K.
    augment : str or None
        A domain shift from ``datasets.shift`` applied per image with probability p: ``"KIND[@SEVERITY][+KIND...][:p]"``
        (e.g. ``"lowres@0.8:0.5"``, ``"mask"`` = p 1). Applied to the decoded BGR image before mirroring; which
        images are shifted and how is drawn from ``(seed, epoch, batch)`` like every other choice (exact resume).
    num_parts, part_index : int
        Data-parallel workers (``kv.num_workers``, ``kv.rank``): the epoch order is drawn for the *global* batch
        ``G = num_parts x B`` and part ``r`` yields rows ``[r*B, (r+1)*B)`` of each global batch (augmentation
        included). The parts are disjoint within an epoch, their union is the whole epoch (less one partial
        global batch), every part has the same number of batches, and together they see exactly what one
        iterator with ``batch_size = G`` sees. ``get_state()`` cursors count global batches, so a state taken on
        any part resumes every part (and a run with another ``num_parts`` but the same ``G``).
    """

    def __init__(self, path_imgrec: str, batch_size: int, data_shape: Sequence[int] = (3, 112, 112),
                 shuffle: bool = True, rand_mirror: bool = True, cutoff: int = 0, color_jitter: float = 0,
                 images_filter: int = 0, num_workers: int = 2, seed: Optional[int] = None,
                 images_per_identity: int = 0, data_name: str = "data", label_name: str = "softmax_label",
                 num_parts: int = 1, part_index: int = 0, augment: Optional[str] = None):
        super().__init__(batch_size)
        self.augment, self.augment_p = parse_augment(augment) if augment else ([], 0.0)
        if len(data_shape) != 3 or data_shape[0] != 3:
            raise ToolkitError(f"data_shape {tuple(data_shape)}: expected (3, H, W)")
        if batch_size < 1:
            raise ToolkitError(f"batch_size {batch_size}: must be >= 1")
        if num_parts < 1 or not 0 <= part_index < num_parts:
            raise ToolkitError(f"num_parts {num_parts}, part_index {part_index}: need 0 <= part_index < num_parts")
        self.num_parts, self.part_index = int(num_parts), int(part_index)
        self.global_batch = int(batch_size) * self.num_parts
        folder = os.path.dirname(os.path.abspath(path_imgrec))
        self.num_classes, _, _ = read_property(os.path.join(folder, "property"))
        self.reader = RecordReader(path_imgrec)
        self.path_imgrec = path_imgrec
        keys = np.asarray(self.reader.image_keys, dtype=np.int64)
        if len(keys) == 0:
            raise ToolkitError(f"{path_imgrec}: holds no image records")
        labels = self.reader.labels(keys)
        self._check_labels(labels, folder)
        if images_filter > 0:
            keep = images_kept(labels, images_filter)
            keys, labels = keys[keep], labels[keep]
            if len(keys) == 0:
                raise ToolkitError(f"{path_imgrec}: no identity has >= {images_filter} images (images_filter)")
        self._keys, self._labels = keys, labels
        self.num_images = int(len(keys))
        self.data_shape = tuple(int(x) for x in data_shape)
        self.shuffle, self.rand_mirror = bool(shuffle), bool(rand_mirror)
        self.cutoff, self.color_jitter = int(cutoff), float(color_jitter)
        self.images_per_identity = int(images_per_identity)
        if self.images_per_identity > 0:
            if batch_size % self.images_per_identity:
                raise ToolkitError(f"batch_size {batch_size} is not a multiple of images_per_identity "
                                   f"{self.images_per_identity}")
            ids = labels.astype(np.int64)
            order = np.argsort(ids, kind="stable")
            uniq, start, count = np.unique(ids[order], return_index=True, return_counts=True)
            self._id_members = [order[s:s + c] for s, c in zip(start, count)]
            if len(uniq) < self.global_batch // self.images_per_identity:
                raise ToolkitError(f"{path_imgrec}: {len(uniq)} identities, fewer than the "
                                   f"{self.global_batch // self.images_per_identity} a batch needs")
        if self.num_images < self.global_batch and self.images_per_identity == 0:
            parts = f" x {self.num_parts} parts" if self.num_parts > 1 else ""
            raise ToolkitError(f"{path_imgrec}: {self.num_images} images, fewer than batch_size {batch_size}{parts}")
        self.seed = int(np.random.SeedSequence().entropy % (2 ** 31)) if seed is None else int(seed)
        self.data_name, self.label_name = data_name, label_name
        self.num_workers = max(0, int(num_workers))
        self._pool = ThreadPoolExecutor(self.num_workers, "faceiter") if self.num_workers > 0 else None
        self.num_skipped = 0
        self._bad: set = set()
        self._pending: Dict[int, tuple] = {}
        self._epoch, self._cursor = 0, 0
        self._order = self._epoch_order(0)

    # -- checks and order --------------------------------------------------------------------------------------------
    def _check_labels(self, labels: np.ndarray, folder: str) -> None:
        prop = os.path.join(folder, "property")
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)) or labels.min() < 0:
            bad = labels[~np.isfinite(labels) | (labels != np.round(labels)) | (labels < 0)][0]
            raise ToolkitError(f"{self.reader.path_rec}: label {bad} is not a class id (non-negative integer)")
        if labels.max() >= self.num_classes:
            raise ToolkitError(f"{self.reader.path_rec}: label {int(labels.max())} >= num_classes "
                               f"{self.num_classes} from {prop}")
        ids = self.reader.identities
        if self.reader.has_identity_records and len(ids) != self.num_classes:
            raise ToolkitError(f"{self.reader.path_rec}: {len(ids)} identity records but {prop} says "
                               f"{self.num_classes} classes")

    @property
    def num_batches(self) -> int:
        """Batches per epoch (the same for every part)."""
        if self.images_per_identity > 0:
            return len(self._id_members) // (self.global_batch // self.images_per_identity)
        return self.num_images // self.global_batch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into the kept images for one epoch, length ``num_batches * G`` (all parts; same on each)."""
        n_total = self.num_batches * self.global_batch
        if self.images_per_identity > 0:
            rng = np.random.default_rng([self.seed, epoch, 2])
            k = self.images_per_identity
            ids = rng.permutation(len(self._id_members)) if self.shuffle else np.arange(len(self._id_members))
            parts = []
            for i in ids[:n_total // k]:
                members = self._id_members[i]
                parts.append(rng.choice(members, k, replace=len(members) < k))
            return np.concatenate(parts)
        if not self.shuffle:
            return np.arange(n_total)
        return np.random.default_rng([self.seed, epoch, 1]).permutation(self.num_images)[:n_total]

    def _batch_aug(self, epoch: int, batch: int) -> dict:
        """Augmentation of this part's rows: drawn for the global batch, then sliced (parts = one big batch)."""
        aug = self._global_aug(epoch, batch)
        lo = self.part_index * self.batch_size
        return {k: v[lo:lo + self.batch_size] for k, v in aug.items()}

    def _global_aug(self, epoch: int, batch: int) -> dict:
        b, (_, h, w) = self.global_batch, self.data_shape
        rng = np.random.default_rng([self.seed, epoch, batch, 3])
        aug = {"mirror": (rng.random(b) < 0.5) & self.rand_mirror}
        if self.cutoff > 0:
            aug["cut"] = rng.random(b) < 0.5
            aug["cut_yx"] = np.stack([rng.integers(0, h, b), rng.integers(0, w, b)], 1)
        if self.color_jitter > 0:
            j = self.color_jitter
            aug["jit"] = rng.uniform(1 - j, 1 + j, (b, 3)).astype(np.float32)
        if self.augment:  # its own stream: turning augment on leaves every other draw as it was
            arng = np.random.default_rng([self.seed, epoch, batch, 4])
            aug["shift"] = arng.random(b) < self.augment_p
            aug["shift_seed"] = arng.integers(0, 2 ** 62, b)
        return aug

    # -- decoding ----------------------------------------------------------------------------------------------------
    def _decode_into(self, dst: np.ndarray, i: int, key: int, aug: dict) -> bool:
        """Decode record ``key`` into ``dst[i]`` (3, H, W) with the augmentation of slot ``i``; False if undecodable."""
        _, h, w = self.data_shape
        try:
            _, payload = self.reader.read(int(key))
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR) if payload else None
        except (ToolkitError, cv2.error, ValueError):
            img = None
        if img is None or img.ndim != 3:
            return False
        if img.shape[0] != h or img.shape[1] != w:
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        if "shift" in aug and aug["shift"][i]:
            img = apply_shift(img, self.augment, np.random.default_rng(int(aug["shift_seed"][i])))
        rgb = img[:, ::-1, ::-1] if aug["mirror"][i] else img[:, :, ::-1]  # BGR -> RGB (+ horizontal flip)
        out = dst[i]
        out[...] = rgb.transpose(2, 0, 1)
        if "jit" in aug:
            _color_jitter(out, aug["jit"][i])
        if "cut" in aug and aug["cut"][i]:
            half = self.cutoff // 2
            cy, cx = aug["cut_yx"][i]
            y0, x0 = max(0, cy - half), max(0, cx - half)
            out[:, y0:max(0, cy - half + self.cutoff), x0:max(0, cx - half + self.cutoff)] = 127
        return True

    def _decode_range(self, dst, idx, aug, lo, hi) -> List[int]:
        failed = []
        for i in range(lo, hi):
            key = self._keys[idx[i]]
            if key in self._bad or not self._decode_into(dst, i, key, aug):
                failed.append(i)
        return failed

    def _submit(self, epoch: int, batch: int) -> tuple:
        b = self.batch_size
        lo = batch * self.global_batch + self.part_index * b
        idx = self._order[lo:lo + b]
        aug = self._batch_aug(epoch, batch)
        dst = np.empty((b,) + self.data_shape, np.float32)
        if self._pool is None:
            return dst, idx, aug, [self._decode_range(dst, idx, aug, 0, b)]
        step = -(-b // self.num_workers)
        futs = [self._pool.submit(self._decode_range, dst, idx, aug, lo, min(b, lo + step)) for lo in range(0, b, step)]
        return dst, idx, aug, futs

    def _finish(self, job: tuple) -> Tuple[np.ndarray, np.ndarray]:
        dst, idx, aug, futs = job
        failed = [i for f in futs for i in (f if isinstance(f, list) else f.result())]
        idx = idx.copy()
        n = self.num_images
        for i in failed:  # replace with the next decodable image in key order: deterministic, so resume is exact
            j0 = int(idx[i])
            self._note_bad(int(self._keys[j0]))
            for step in range(1, n):
                j = (j0 + step) % n
                key = int(self._keys[j])
                if key in self._bad:
                    continue
                if self._decode_into(dst, i, key, aug):
                    break
                self._note_bad(key)
            else:
                raise ToolkitError(f"{self.path_imgrec}: no record decodes as an image")
            idx[i] = j
        return dst, self._labels[idx].astype(np.float32)

    def _note_bad(self, key: int) -> None:
        self.num_skipped += 1
        if key not in self._bad:
            self._bad.add(key)
            logger.warning("%s: record %d is not a decodable image; skipped (counted in num_skipped)",
                           self.path_imgrec, key)

    def _drop_pending(self) -> None:
        for _, _, _, futs in self._pending.values():
            for f in futs:
                if not isinstance(f, list):
                    f.result()
        self._pending.clear()

    # -- DataIter API ------------------------------------------------------------------------------------------------
    @property
    def provide_data(self):
        return [mx.io.DataDesc(self.data_name, (self.batch_size,) + self.data_shape, np.float32)]

    @property
    def provide_label(self):
        return [mx.io.DataDesc(self.label_name, (self.batch_size,), np.float32)]

    def next(self) -> mx.io.DataBatch:
        """The next batch of this epoch; ``StopIteration`` at its end (call ``reset()`` for the next epoch)."""
        data, label = self.next_numpy()
        return mx.io.DataBatch(data=[mx.nd.array(data)], label=[mx.nd.array(label)], pad=0,
                               provide_data=self.provide_data, provide_label=self.provide_label)

    def next_numpy(self) -> Tuple[np.ndarray, np.ndarray]:
        """Like ``next()`` but returns numpy ``(data (B,3,H,W), label (B,))``."""
        nb = self.num_batches
        if self._cursor >= nb:
            raise StopIteration
        cur = self._cursor
        for b in range(cur, min(nb, cur + 1 + (_PREFETCH if self._pool is not None else 0))):
            if b not in self._pending:
                self._pending[b] = self._submit(self._epoch, b)
        out = self._finish(self._pending.pop(cur))
        self._cursor += 1
        return out

    def reset(self) -> None:
        """Start the next epoch (new shuffle)."""
        self._drop_pending()
        self._epoch += 1
        self._cursor = 0
        self._order = self._epoch_order(self._epoch)

    def get_state(self) -> dict:
        """JSON-serialisable position: ``{seed, epoch, cursor, num_images, batch_size, images_per_identity,
        num_parts, part_index}`` (``cursor`` counts global batches: the same on every part)."""
        return {"seed": self.seed, "epoch": self._epoch, "cursor": self._cursor, "num_images": self.num_images,
                "batch_size": self.batch_size, "images_per_identity": self.images_per_identity,
                "num_parts": self.num_parts, "part_index": self.part_index}

    def set_state(self, state: dict) -> None:
        """Continue exactly where ``get_state()`` was taken (same data and settings required).

        A state of any part resumes this part; ``num_parts`` may differ as long as the global batch is the same.
        """
        for k in ("num_images", "images_per_identity"):
            if k in state and int(state[k]) != getattr(self, k):
                raise ToolkitError(f"iterator state: {k} was {state[k]}, now {getattr(self, k)}; cannot resume "
                                   f"{self.path_imgrec} exactly")
        if "batch_size" in state:
            parts = int(state.get("num_parts", 1))
            was = int(state["batch_size"]) * parts
            if was != self.global_batch:
                how = f"{state['batch_size']} x {parts} parts" if parts > 1 else f"{state['batch_size']}"
                now = f"{self.batch_size} x {self.num_parts} parts" if self.num_parts > 1 else f"{self.batch_size}"
                raise ToolkitError(f"iterator state: batch_size was {how}, now {now}; cannot resume "
                                   f"{self.path_imgrec} exactly")
        self._drop_pending()
        self.seed = int(state["seed"])
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self._epoch)

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._drop_pending()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)


def _color_jitter(img: np.ndarray, f: np.ndarray) -> None:
    """In place on (3, H, W) float32 RGB: brightness ``f[0]``, contrast ``f[1]``, saturation ``f[2]``; clip 0-255."""
    img *= f[0]
    mean = float(np.tensordot(_GRAY, img, axes=1).mean())
    img *= f[1]
    img += (1 - f[1]) * mean
    gray = np.tensordot(_GRAY, img, axes=1)
    img *= f[2]
    img += (1 - f[2]) * gray[None]
    np.clip(img, 0, 255, out=img)
