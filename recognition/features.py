"""Frozen-checkpoint features from any layer, and labelled images read from a rec or an identity folder.

Shared by ``linear_probe.py`` and ``advise.py``::

    fx = FeatureExtractor.from_checkpoint("models/model", 0, layer="stage3_unit2_relu1_output")
    feats = fx(images)                      # (N, 3, 112, 112) RGB 0-255 -> (N, C)

A 4-D layer output (N, C, H, W) is globally average-pooled inside the graph to (N, C); ``fc1_output`` (N, E)
is taken as is. Normalisation (L2) is left to the caller: :func:`l2_normalize`.
"""
from __future__ import annotations

import difflib
import logging
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from recognition.common import ToolkitError, load_checkpoint
from recognition.verification import EMBED_NODE, Embedder

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (N, D) scaled to unit L2 norm (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


# ------------------------------------------------------------------------------------------------------ layers
def select_layer(symbol, layer: Optional[str] = None, where: str = "--layer"):
    """The internal node ``layer`` (default ``fc1_output``) of ``symbol``; an unknown name lists close ones.

    A name without the ``_output`` suffix is accepted (``stage3_unit2_relu1`` -> ``stage3_unit2_relu1_output``).
    """
    layer = layer or EMBED_NODE
    internals = symbol.get_internals()
    outputs = internals.list_outputs()
    name = layer if layer in outputs or (layer + "_output") not in outputs else layer + "_output"
    if name not in outputs:
        named = [o for o in outputs if o.endswith("_output")]
        close = difflib.get_close_matches(layer, named, n=5, cutoff=0.5) or named[-5:]
        raise ToolkitError(f"{where} {layer!r}: no such layer in the checkpoint graph; close names: "
                           f"{', '.join(close)} ({len(named)} layer outputs in all)")
    return internals[name], name


def pooled_symbol(node, data_shape: Sequence[int] = (3, 112, 112)):
    """``node`` itself when its output is (N, D); global average over H, W when it is (N, C, H, W) -> (N, C)."""
    import mxnet as mx

    _, out_shapes, _ = node.infer_shape(data=(1,) + tuple(data_shape))
    ndim = len(out_shapes[0])
    if ndim == 2:
        return node
    if ndim == 4:
        return mx.sym.mean(node, axis=(2, 3), name="probe_gap")
    raise ToolkitError(f"--layer {node.name}: output has {ndim} dimensions {tuple(out_shapes[0])}; "
                       "expected (N, D) or (N, C, H, W)")


class FeatureExtractor:
    """Inference over a frozen checkpoint cut at ``layer``; ``fx(x)`` -> float32 (N, C).

    Inputs: ``x`` float32 (N, 3, H, W) RGB 0-255. Outputs: (N, D) for a 2-D layer, (N, C) pooled for a 4-D one.
    ``flip=True`` returns f(x) + f(mirrored x) (insightface's flip-summed embedding, before normalisation).
    """

    def __init__(self, symbol, arg_params: dict, aux_params: dict, layer: Optional[str] = None, ctx=None,
                 batch_size: int = 32, data_shape: Sequence[int] = (3, 112, 112)):
        node, self.layer = select_layer(symbol, layer)
        self.data_shape = tuple(int(d) for d in data_shape)
        self.symbol = pooled_symbol(node, self.data_shape)
        needed = set(self.symbol.list_arguments()) | set(self.symbol.list_auxiliary_states())
        self._embedder = Embedder(self.symbol, {k: v for k, v in arg_params.items() if k in needed},
                                  {k: v for k, v in aux_params.items() if k in needed}, ctx, batch_size,
                                  self.data_shape)

    @classmethod
    def from_checkpoint(cls, prefix: str, epoch: int, layer: Optional[str] = None, ctx=None, batch_size: int = 32,
                        data_shape: Sequence[int] = (3, 112, 112)) -> "FeatureExtractor":
        """Load ``PREFIX-symbol.json`` + ``PREFIX-%04d.params`` and cut at ``layer`` (default ``fc1_output``)."""
        symbol, arg_params, aux_params = load_checkpoint(prefix, epoch)
        return cls(symbol, arg_params, aux_params, layer, ctx, batch_size, data_shape)

    @property
    def dim(self) -> int:
        return self._embedder.embedding_size

    def __call__(self, x: np.ndarray, flip: bool = False) -> np.ndarray:
        out = self._embedder(x)
        if flip:
            out = out + self._embedder(np.ascontiguousarray(np.asarray(x)[:, :, :, ::-1]))
        return out


# ------------------------------------------------------------------------------------------------ labelled data
def decode_image(raw: bytes, where: str, size: Tuple[int, int] = (112, 112)) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (3, H, W) RGB, resized to ``size`` when it differs (inputs are aligned faces)."""
    import cv2

    buf = np.frombuffer(raw, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise ToolkitError(f"{where}: cannot decode the image (not a JPEG/PNG)")
    if img.shape[:2] != tuple(size):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)


def read_image(path: str, size: Tuple[int, int] = (112, 112)) -> np.ndarray:
    """An image file -> uint8 (3, H, W) RGB."""
    if not os.path.isfile(path):
        raise ToolkitError(f"--images: {path} does not exist")
    with open(path, "rb") as f:
        return decode_image(f.read(), path, size)


class LabelledImages:
    """Images + class labels of a rec (``DIR/train.rec`` or a ``.rec`` path) or a folder of identity sub-folders.

    Attributes: ``labels`` int (N,), ``class_names`` (list, index = label), ``sources`` (N,) record keys or paths,
    ``kind`` ``'rec'``/``'folder'``. ``load(indices)`` -> uint8 (n, 3, H, W) RGB.
    """

    def __init__(self, path: str, flag: str = "--data"):
        self.path, self.flag = path, flag
        self._reader = None
        rec = path if path.endswith(".rec") else os.path.join(path, "train.rec")
        if os.path.isfile(rec):
            from recognition.rec import RecordReader

            self.kind = "rec"
            self._reader = RecordReader(rec)
            self.sources: List = list(self._reader.image_keys)
            self.labels = self._reader.labels(self.sources).astype(np.int64)
            n = int(self.labels.max()) + 1 if len(self.labels) else 0
            self.class_names = _rec_class_names(rec, n)
        elif os.path.isdir(path):
            self.kind = "folder"
            self.sources, self.labels, self.class_names = _list_identity_folder(path, flag)
        else:
            raise ToolkitError(f"{flag} {path}: neither a folder nor a .rec file (expected DIR with train.rec/"
                               "train.idx, or a folder of identity sub-folders)")
        if len(self.labels) == 0:
            raise ToolkitError(f"{flag} {path}: holds no images")

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices: Sequence[int], size: Tuple[int, int] = (112, 112)) -> np.ndarray:
        out = np.empty((len(indices), 3) + tuple(size), dtype=np.uint8)
        for j, i in enumerate(indices):
            src = self.sources[int(i)]
            if self.kind == "rec":
                _, raw = self._reader.read(src)
                out[j] = decode_image(raw, f"{self.path}: record {src}", size)
            else:
                out[j] = read_image(src, size)
        return out

    def batches(self, indices: Sequence[int], batch_size: int = 64,
                progress: Optional[str] = None) -> Iterator[np.ndarray]:
        """float32 (b, 3, H, W) batches of ``indices`` in order; ``progress``: the description of progress lines
        (a bar on a terminal, see :mod:`recognition.progress`) counted as each batch is consumed."""
        from recognition.progress import Progress

        with Progress(len(indices), progress or "", unit="img", enabled=bool(progress)) as bar:
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                yield self.load(chunk).astype(np.float32)
                bar.update(len(chunk))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def _rec_class_names(rec: str, num_classes: int) -> List[str]:
    """Names of a rec's classes: ``classes.txt`` beside it (one name a line, line i = class i, written by
    ``datasets.tools folder2rec``) when it has one line per class, else the class numbers as text."""
    path = os.path.join(os.path.dirname(os.path.abspath(rec)), "classes.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            names = [line.rstrip("\n") for line in f]
        while names and not names[-1]:
            names.pop()
        if len(names) == num_classes:
            return names
        logger.warning("%s has %d names for %d classes; using class numbers", path, len(names), num_classes)
    return [str(i) for i in range(num_classes)]


def _list_identity_folder(path: str, flag: str) -> Tuple[List[str], np.ndarray, List[str]]:
    names = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not names:
        raise ToolkitError(f"{flag} {path}: no train.rec and no identity sub-folders")
    sources, labels = [], []
    for i, name in enumerate(names):
        folder = os.path.join(path, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
        sources += [os.path.join(folder, f) for f in files]
        labels += [i] * len(files)
    return sources, np.asarray(labels, dtype=np.int64), names


def list_images(path: str) -> List[str]:
    """Image files directly inside ``path`` (sorted)."""
    return sorted(os.path.join(path, f) for f in os.listdir(path)
                  if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".") and os.path.isfile(os.path.join(path, f)))


def extract(fx: FeatureExtractor, data: LabelledImages, indices: Optional[Sequence[int]] = None,
            batch_size: int = 64, flip: bool = False, progress: Optional[str] = "embed") -> np.ndarray:
    """Features (len(indices), D) of ``data``'s images (all when ``indices`` is None), un-normalised.
    ``progress``: description of the progress lines (None: silent)."""
    indices = np.arange(len(data)) if indices is None else np.asarray(indices)
    outs = [fx(batch, flip=flip) for batch in data.batches(indices, batch_size, progress)]
    return np.concatenate(outs) if outs else np.zeros((0, fx.dim), np.float32)


__all__ = ["FeatureExtractor", "LabelledImages", "decode_image", "extract", "l2_normalize", "list_images",
           "pooled_symbol", "read_image", "select_layer"]
