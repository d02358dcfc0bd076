"""Domain shifts that real deployments meet, applied to aligned 112x112 faces: a shifted copy of a rec or ``.bin``.

    python -m datasets.tools shift --src ../shared/real/lfw_dev --out data/lfw_lowres --kind lowres --severity 0.8
    python -m datasets.tools shift --src lfw_dev/val.bin --out data/val_mask.bin --kind mask --seed 1
    python -m datasets.tools shift --src lfw_dev --out data/lfw_lrj --kind lowres@0.8+jpeg@0.5

Kinds (each takes a severity in (0, 1]; random choices come from a per-image seeded generator):

- ``lowres``: shrink to ``round(S * (1 - 0.9 * severity))`` pixels (area average, as a low-resolution camera) and
  blow back up to S (bilinear).
- ``mask``: a face mask over nose and mouth, placed from the ArcFace template landmarks
  (``deploy.align.reference_landmarks``): its lower edge under the chin, its upper edge from just above the mouth
  (severity -> 0) up to the nose bridge (severity 1); colour, shading and a few pixels of placement jitter are drawn.
- ``grey``: blend towards luma (ITU-R BT.601) by ``severity`` (1: fully grey).
- ``nir``: a near-infrared look: a red-weighted grey (skin reflects NIR like red light), brighter mid-tones (gamma),
  slight softening and sensor noise, blended in by ``severity``.
- ``blur``: linear motion blur of length ``1 + round(14 * severity)`` pixels at a drawn angle.
- ``jpeg``: re-encode at quality ``round(95 - 90 * severity)`` (severity 1: quality 5).

A spec chains kinds with ``+`` and gives each its own severity with ``@``: ``lowres@0.8+jpeg@0.5``; a kind without
``@`` takes the default severity. Images are BGR ``(H, W, 3) uint8`` (OpenCV's order) throughout.
"""
from __future__ import annotations

import logging
import os
import sys
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from recognition.common import ToolkitError

logger = logging.getLogger("recognition")

DEFAULT_SEVERITY = 0.5
_LUMA_BGR = np.array([0.114, 0.587, 0.299], np.float32)  # BT.601 luma weights in B, G, R order
_NIR_BGR = np.array([0.05, 0.25, 0.70], np.float32)  # red-weighted grey: skin is bright under NIR like under red
_MASK_COLOURS_BGR = np.array([[225, 190, 150], [235, 235, 235], [40, 40, 40], [170, 170, 170], [120, 150, 90]],
                             np.float32)  # surgical blue, white, black, grey, olive cloth


def lowres(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Shrink ``(H, W, 3)`` by area averaging to ``round(side * (1 - 0.9 severity))``, then bilinear back to (H, W)."""
    h, w = img.shape[:2]
    f = 1.0 - 0.9 * severity
    small = cv2.resize(img, (max(2, round(w * f)), max(2, round(h * f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def mask_polygon(h: int, w: int, severity: float, jitter: Tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The mask outline ``(N, 2)`` float (x, y) in an ``(h, w)`` aligned crop, from the ArcFace template landmarks.

    Upper edge: between the upper lip (severity -> 0) and the nose bridge (severity 1, halfway from the nose tip to
    the eyes); lower edge: under the chin (1.2 nose-to-mouth distances below the mouth); sides a little outside the
    eyes. ``jitter`` shifts it by (dx, dy) pixels.
    """
    from deploy.align import reference_landmarks

    lm = reference_landmarks(112) * np.array([w / 112.0, h / 112.0])
    eye_y, nose_y, mouth_y = lm[:2, 1].mean(), lm[2, 1], lm[3:, 1].mean()
    eye_dx = lm[1, 0] - lm[0, 0]
    lip = nose_y + 0.55 * (mouth_y - nose_y)
    bridge = nose_y - 0.5 * (nose_y - eye_y)
    top = lip + severity * (bridge - lip)
    bottom = mouth_y + 1.2 * (mouth_y - nose_y)
    left, right = lm[0, 0] - 0.55 * eye_dx, lm[1, 0] + 0.55 * eye_dx
    cx = lm[2, 0]
    pts = [(left, top + 0.15 * (bottom - top)), (cx, top), (right, top + 0.15 * (bottom - top)),
           (right - 0.1 * eye_dx, bottom - 0.2 * (bottom - top)), (cx, bottom),
           (left + 0.1 * eye_dx, bottom - 0.2 * (bottom - top))]
    return np.array(pts, np.float64) + np.asarray(jitter, np.float64)


def mask(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Cover nose and mouth of an aligned face ``(H, W, 3)`` with a shaded mask of a drawn colour."""
    h, w = img.shape[:2]
    colour = _MASK_COLOURS_BGR[rng.integers(len(_MASK_COLOURS_BGR))]
    jitter = rng.uniform(-3, 3, 2) * (w / 112.0)
    poly = mask_polygon(h, w, severity, jitter)
    cover = np.zeros((h, w), np.uint8)
    cv2.fillPoly(cover, [np.round(poly).astype(np.int32)], 1)
    # vertical shading: a fold across the middle, darker towards the chin (a flat colour looks like a sticker)
    ys = np.arange(h, dtype=np.float32)[:, None]
    top, bottom = poly[:, 1].min(), poly[:, 1].max()
    t = np.clip((ys - top) / max(1.0, bottom - top), 0, 1)
    shade = (1.0 - 0.25 * t) * (1.0 - 0.08 * np.cos(6 * np.pi * t))
    out = img.astype(np.float32)
    sel = cover.astype(bool)
    painted = (colour[None, None, :] * shade[:, :, None]) * np.ones((1, w, 1), np.float32)
    out[sel] = painted[sel]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def grey(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Blend ``(H, W, 3)`` towards its BT.601 luma by ``severity``."""
    x = img.astype(np.float32)
    y = (x @ _LUMA_BGR)[:, :, None]
    return np.clip((1 - severity) * x + severity * y + 0.5, 0, 255).astype(np.uint8)


def nir(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Near-infrared look: red-weighted grey, gamma 0.75, 3x3 softening, Gaussian noise (sigma 3); blended by
    ``severity``."""
    x = img.astype(np.float32)
    g = x @ _NIR_BGR
    g = 255.0 * (np.clip(g, 0, 255) / 255.0) ** 0.75
    g = cv2.GaussianBlur(g, (3, 3), 0.8) + rng.normal(0, 3.0, g.shape).astype(np.float32)
    return np.clip((1 - severity) * x + severity * g[:, :, None] + 0.5, 0, 255).astype(np.uint8)


def motion_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A normalised ``(L, L)`` line kernel of ``length`` pixels through the centre at ``angle_deg`` (0: horizontal)."""
    k = np.zeros((length, length), np.float32)
    c = (length - 1) / 2.0
    t = np.deg2rad(angle_deg)
    for s in np.linspace(-c, c, 4 * length):
        k[int(round(c + s * np.sin(t))), int(round(c + s * np.cos(t)))] = 1.0
    return k / k.sum()


def blur(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Motion blur of ``1 + round(14 severity)`` pixels at a drawn angle (uniform in [0, 180)), edges replicated."""
    length = 1 + int(round(14 * severity))
    if length < 2:
        return img.copy()
    k = motion_kernel(length, float(rng.uniform(0, 180)))
    return cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REPLICATE)


def jpeg(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Encode and decode at JPEG quality ``round(95 - 90 severity)``."""
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality(severity)])
    if not ok:
        raise ToolkitError("jpeg shift: OpenCV could not encode the image")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def jpeg_quality(severity: float) -> int:
    return int(round(95 - 90 * severity))


KINDS: Dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "lowres": lowres, "mask": mask, "grey": grey, "nir": nir, "blur": blur, "jpeg": jpeg}


def parse_spec(spec: str, severity: Optional[float] = None) -> List[Tuple[str, float]]:
    """``"lowres@0.8+jpeg"`` -> ``[("lowres", 0.8), ("jpeg", severity or DEFAULT_SEVERITY)]``; errors in one line."""
    default = DEFAULT_SEVERITY if severity is None else float(severity)
    out = []
    for part in str(spec).split("+"):
        name, _, sev = part.strip().partition("@")
        if name not in KINDS:
            raise ToolkitError(f"shift kind {name!r} in {spec!r}: choose from {', '.join(KINDS)} (join with +)")
        try:
            s = float(sev) if sev else default
        except ValueError:
            raise ToolkitError(f"shift {part!r}: severity {sev!r} is not a number") from None
        if not 0 < s <= 1:
            raise ToolkitError(f"shift {part!r}: severity {s} must be in (0, 1]")
        out.append((name, s))
    return out


def parse_augment(text: str) -> Tuple[List[Tuple[str, float]], float]:
    """``"KIND[@S][+KIND[@S]...][:p]"`` (training-time augmentation) -> ``(spec, p)``; p defaults to 1."""
    spec, _, p = str(text).partition(":")
    try:
        prob = float(p) if p else 1.0
    except ValueError:
        raise ToolkitError(f"augment {text!r}: probability {p!r} is not a number") from None
    if not 0 < prob <= 1:
        raise ToolkitError(f"augment {text!r}: probability {prob} must be in (0, 1]")
    return parse_spec(spec), prob


def _kind_salt(spec: Sequence[Tuple[str, float]]) -> int:
    return zlib.crc32(repr([(k, round(s, 6)) for k, s in spec]).encode())


def image_rng(seed: int, index: int, spec: Sequence[Tuple[str, float]]) -> np.random.Generator:
    """The generator of image ``index`` under ``seed``: the same image gets the same shift whatever the order."""
    return np.random.default_rng([int(seed), int(index), _kind_salt(spec)])


def apply_shift(img: np.ndarray, spec: Sequence[Tuple[str, float]], rng: np.random.Generator) -> np.ndarray:
    """Apply the parsed ``spec`` in order to a BGR ``(H, W, 3) uint8`` image; returns a new array."""
    if img.ndim != 3 or img.shape[2] != 3:
        raise ToolkitError(f"shift: expected an (H, W, 3) colour image, got shape {img.shape}")
    out = np.ascontiguousarray(img)
    for name, s in spec:
        out = KINDS[name](out, s, rng)
    return out


def shift_jpeg(payload: bytes, spec: Sequence[Tuple[str, float]], rng: np.random.Generator,
               quality: int = 95) -> Optional[bytes]:
    """Decode an encoded image, shift it, encode as JPEG (a trailing ``jpeg`` kind keeps its own quality).

    Returns None when ``payload`` does not decode.
    """
    img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR) if payload else None
    if img is None:
        return None
    if spec and spec[-1][0] == "jpeg":  # store the degraded bytes themselves, not a q95 copy of them
        out, quality = apply_shift(img, spec[:-1], rng), jpeg_quality(spec[-1][1])
    else:
        out = apply_shift(img, spec, rng)
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ToolkitError("shift: OpenCV could not encode a shifted image")
    return buf.tobytes()


# -- files ---------------------------------------------------------------------------------------------------------
def shift_bin(src: str, out: str, spec: Sequence[Tuple[str, float]], seed: int = 0) -> dict:
    """Shifted copy of a verification ``.bin`` (image ``i`` uses ``image_rng(seed, i, spec)``), written atomically.

    Returns ``{path, images, pairs, undecodable}``; an undecodable image is copied unchanged, counted and logged.
    """
    from recognition.rec import safe_load_bin_pickle, save_bin

    images, issame = safe_load_bin_pickle(src)
    shifted, bad = [], []
    for i, payload in enumerate(images):
        b = shift_jpeg(bytes(payload), spec, image_rng(seed, i, spec))
        if b is None:
            bad.append(i)
            b = bytes(payload)
        shifted.append(b)
    if bad:
        logger.warning("%s: %d images do not decode (first: %s); copied unshifted", src, len(bad), bad[:5])
    save_bin(out, shifted, issame)
    return {"path": out, "images": len(images), "pairs": len(issame), "undecodable": len(bad)}


def shift_rec(src_dir: str, out_dir: str, spec: Sequence[Tuple[str, float]], seed: int = 0) -> dict:
    """Shifted copy of ``src_dir/train.rec`` (+ idx, property): same keys, headers and labels; image record ``key``
    uses ``image_rng(seed, key, spec)``. Written through temporary names (``RecordWriter``)."""
    import shutil

    from recognition.common import atomic_write
    from recognition.rec import RecordReader, RecordWriter, rec_paths

    path_rec, _ = rec_paths(src_dir)
    reader = RecordReader(path_rec)
    image_keys = set(int(k) for k in reader.image_keys)
    bad = []
    os.makedirs(out_dir, exist_ok=True)
    with RecordWriter(os.path.join(out_dir, "")) as w:
        for key in reader.keys:
            label, payload = reader.read(int(key))
            if int(key) in image_keys:
                b = shift_jpeg(payload, spec, image_rng(seed, int(key), spec))
                if b is None:
                    bad.append(int(key))
                else:
                    payload = b
            w.write(int(key), label, payload)
    reader.close()
    with open(os.path.join(src_dir, "property"), "rb") as f, atomic_write(os.path.join(out_dir, "property"), "wb") as g:
        shutil.copyfileobj(f, g)
    if bad:
        logger.warning("%s: %d image records do not decode (first keys: %s); copied unshifted", path_rec, len(bad),
                       bad[:5])
    return {"path": out_dir, "images": len(image_keys), "undecodable": len(bad)}


def shift_path(src: str, out: str, spec: Sequence[Tuple[str, float]], seed: int = 0) -> List[dict]:
    """Shift a ``.bin`` file (``out`` = the new ``.bin``) or a dataset folder (``out`` = a new folder holding the
    shifted rec, property and every ``.bin`` of ``src``, each with the same seed)."""
    if os.path.isfile(src) and src.endswith(".bin"):
        if os.path.isdir(out):
            out = os.path.join(out, os.path.basename(src))
        return [shift_bin(src, out, spec, seed)]
    if not os.path.isdir(src):
        raise ToolkitError(f"--src {src}: neither a .bin file nor a dataset folder")
    if os.path.abspath(src) == os.path.abspath(out):
        raise ToolkitError(f"--out {out}: is the source folder; write the shifted copy elsewhere")
    done = []
    if os.path.isfile(os.path.join(src, "train.rec")):
        if not os.path.isfile(os.path.join(src, "property")):
            raise ToolkitError(f"{src}: has train.rec but no property file")
        done.append(shift_rec(src, out, spec, seed))
    for name in sorted(os.listdir(src)):
        if name.endswith(".bin"):
            os.makedirs(out, exist_ok=True)
            done.append(shift_bin(os.path.join(src, name), os.path.join(out, name), spec, seed))
    if not done:
        raise ToolkitError(f"--src {src}: holds no train.rec and no .bin to shift")
    return done


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    from recognition.common import setup_logging

    ap = argparse.ArgumentParser(prog="python -m datasets.tools shift",
                                 description="Write a domain-shifted copy of a rec folder or a .bin.")
    ap.add_argument("--src", required=True, help="dataset folder (train.rec + property, and its .bin files) or a .bin")
    ap.add_argument("--out", required=True, help="output folder (or .bin path when --src is a .bin)")
    ap.add_argument("--kind", required=True, help=f"{', '.join(KINDS)}; chain with + and set severities with @, "
                                                  "e.g. lowres@0.8+jpeg@0.5")
    ap.add_argument("--severity", type=float, default=None, help=f"default severity in (0, 1] ({DEFAULT_SEVERITY})")
    ap.add_argument("--seed", type=int, default=0, help="seed of every random choice (per image)")
    args = ap.parse_args(argv)
    setup_logging()
    spec = parse_spec(args.kind, args.severity)
    for r in shift_path(args.src, args.out, spec, args.seed):
        extra = f", {r['pairs']} pairs" if "pairs" in r else ""
        bad = f", {r['undecodable']} undecodable (copied unshifted)" if r["undecodable"] else ""
        print(f"{r['path']}: {r['images']} images{extra} shifted by "
              f"{'+'.join(f'{k}@{s:g}' for k, s in spec)} (seed {args.seed}){bad}")
    return 0


def cli() -> None:
    from recognition.common import run_cli

    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
