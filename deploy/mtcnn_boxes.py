"""Box arithmetic of the MTCNN cascade (numpy only): candidates from P-Net maps, NMS, squaring, regression, crops.

Boxes are rows ``(x1, y1, x2, y2, score, ...)`` in image pixels with MTCNN's inclusive convention: a box covers
``x2 - x1 + 1`` pixels across. Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", IEEE SPL 2016; the constants (stride 2, 12-pixel cell) are P-Net's receptive field.
"""
from __future__ import annotations

from typing import List

import numpy as np

PNET_STRIDE = 2
PNET_CELL = 12


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> List[float]:
    """Scales at which P-Net's 12-pixel window covers faces from ``min_face_size`` up to the short image side."""
    base = PNET_CELL / float(min_face_size)
    side = min(height, width) * base
    scales = []
    while side >= PNET_CELL:
        scales.append(base * factor ** len(scales))
        side *= factor
    return scales


def pnet_candidates(prob: np.ndarray, reg: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """Face windows of one pyramid level.

    Inputs: ``prob (h, w)`` face probability per output cell, ``reg (4, h, w)`` box offsets (dx1, dy1, dx2, dy2)
    in units of the window size. Output: ``(K, 9)`` rows ``x1, y1, x2, y2, score, dx1, dy1, dx2, dy2`` with the
    window mapped back to original-image pixels (not yet regressed).
    """
    ys, xs = np.nonzero(prob > threshold)
    if ys.size == 0:
        return np.zeros((0, 9), np.float32)
    x1 = np.round((PNET_STRIDE * xs + 1) / scale)
    y1 = np.round((PNET_STRIDE * ys + 1) / scale)
    x2 = np.round((PNET_STRIDE * xs + 1 + PNET_CELL) / scale)
    y2 = np.round((PNET_STRIDE * ys + 1 + PNET_CELL) / scale)
    out = np.column_stack([x1, y1, x2, y2, prob[ys, xs], reg[:, ys, xs].T])
    return out.astype(np.float32)


def box_areas(boxes: np.ndarray) -> np.ndarray:
    """``(N, >=4)`` -> ``(N,)`` inclusive pixel areas."""
    return (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)


def nms(boxes: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept rows of ``boxes (N, >=5)``, best score first.

    A box is dropped when its overlap with a better kept box exceeds ``threshold``; overlap is intersection over
    union (``mode='union'``) or over the smaller area (``'min'``, used after O-Net so that a box inside another
    is removed).
    """
    if mode not in ("union", "min"):
        raise ValueError(f"nms mode {mode!r}: expected 'union' or 'min'")
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    b = np.asarray(boxes, np.float64)
    areas = box_areas(b)
    order = np.argsort(-b[:, 4], kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(b[i, 2], b[rest, 2]) - np.maximum(b[i, 0], b[rest, 0]) + 1)
        ih = np.maximum(0.0, np.minimum(b[i, 3], b[rest, 3]) - np.maximum(b[i, 1], b[rest, 1]) + 1)
        inter = iw * ih
        denom = np.minimum(areas[i], areas[rest]) if mode == "min" else areas[i] + areas[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.asarray(keep, np.int64)


def regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Move box corners by ``offsets (N, 4)`` (dx1, dy1, dx2, dy2) times the box width/height; returns a copy."""
    out = np.array(boxes, dtype=np.float32, copy=True)
    w = out[:, 2] - out[:, 0] + 1
    h = out[:, 3] - out[:, 1] + 1
    out[:, 0:4] += offsets[:, 0:4] * np.column_stack([w, h, w, h])
    return out


def to_square(boxes: np.ndarray) -> np.ndarray:
    """Grow each box to a square of its longer side around the same centre, corners rounded; returns a copy."""
    out = np.array(boxes, dtype=np.float32, copy=True)
    w = out[:, 2] - out[:, 0] + 1
    h = out[:, 3] - out[:, 1] + 1
    side = np.maximum(w, h)
    out[:, 0] = out[:, 0] + 0.5 * (w - side)
    out[:, 1] = out[:, 1] + 0.5 * (h - side)
    out[:, 2] = out[:, 0] + side - 1
    out[:, 3] = out[:, 1] + side - 1
    out[:, 0:4] = np.round(out[:, 0:4])
    return out


def crop_resized(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Crops of ``image (H, W, C)`` under integer ``boxes (N, >=4)``, parts outside the image zero, resized to
    ``size x size``: ``float32 (N, size, size, C)``."""
    import cv2

    h, w = image.shape[:2]
    out = np.zeros((len(boxes), size, size, image.shape[2]), np.float32)
    for n, (x1, y1, x2, y2) in enumerate(np.asarray(boxes[:, :4], np.int64)):
        bw, bh = int(x2 - x1 + 1), int(y2 - y1 + 1)
        if bw < 1 or bh < 1:
            continue
        patch = np.zeros((bh, bw, image.shape[2]), np.float32)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w - 1), min(y2, h - 1)
        if sx2 >= sx1 and sy2 >= sy1:
            patch[sy1 - y1:sy2 - y1 + 1, sx1 - x1:sx2 - x1 + 1] = image[sy1:sy2 + 1, sx1:sx2 + 1]
        out[n] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR).reshape(size, size, -1)
    return out
