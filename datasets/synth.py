"""Synthetic face-like identity datasets in insightface form (train.rec/.idx/property + verification .bin).

Each identity is a seeded set of face parameters (face ellipse, skin tone, hair, eyes, brows, nose, mouth,
freckles, beard, glasses). Every image of it is re-rendered with nuisance variation: pose (shift, rotation,
scale), expression jitter, cluttered background, directional lighting, a strong per-image camera response
(brightness, white balance, gamma), blur, noise and partial occlusion, so raw colour says little about identity.
Identity cues dominate moderately, so a small CNN learns to verify in a few CPU minutes while raw pixels do not.

Domain ``'B'`` shifts the nuisance distribution (colder colour cast, stronger lighting, larger rotations) and
draws a disjoint set of people (the domain is part of the identity seed).

Usage::

    python -m datasets.synth --out data/synth --num-classes 300 --images-per-class 20
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

from recognition.common import DefaultsHelpFormatter, ToolkitError, run_cli
from recognition.rec import save_bin, write_dataset

DOMAINS = {"A": 0, "B": 1}
_HAIR = np.array([[25, 20, 18], [70, 45, 25], [120, 80, 40], [200, 170, 110], [150, 60, 25], [150, 150, 150]],
                 np.float32)
# Nuisance strength of the per-image camera response (see render_face).
WHITE_BALANCE = 0.25  # sigma of per-channel gains
BRIGHTNESS = (0.55, 1.45)
GAMMA = (0.6, 1.6)
CLUTTER = (2, 6)  # background shapes per image
_IRIS = np.array([[60, 40, 25], [50, 90, 160], [60, 120, 70], [110, 110, 120]], np.float32)


def identity_params(seed: int, domain: str, group: int, index: int) -> Dict[str, np.ndarray]:
    """Stable face parameters of one person; ``group`` 0 = training identities, 1 = held out."""
    r = np.random.default_rng([int(seed), DOMAINS[domain], int(group), int(index), 7])
    tone = r.uniform(0, 1)
    skin = (1 - tone) * np.array([250, 220, 195]) + tone * np.array([115, 75, 50]) + r.normal(0, 8, 3)
    hair = _HAIR[r.integers(len(_HAIR))] + r.normal(0, 12, 3)
    return {
        "face": np.array([r.uniform(29, 40), r.uniform(37, 50)]),  # half axes (x, y)
        "skin": np.clip(skin, 0, 255),
        "hair": np.clip(hair, 0, 255),
        "hair_style": r.integers(0, 4),
        "hair_h": r.uniform(6, 18),
        "eye_y": r.uniform(-10, -2), "eye_dx": r.uniform(10, 17), "eye_r": np.array([r.uniform(4, 7), r.uniform(2, 4)]),
        "iris": _IRIS[r.integers(len(_IRIS))] + r.normal(0, 10, 3),
        "brow_t": r.integers(1, 5), "brow_tilt": r.uniform(-0.35, 0.35), "brow_gap": r.uniform(4, 9),
        "nose_len": r.uniform(8, 17), "nose_w": r.uniform(3, 9),
        "mouth_y": r.uniform(15, 26), "mouth_w": r.uniform(9, 22), "mouth_curve": r.uniform(-4, 4),
        "lip": np.clip(np.array([170, 70, 80]) + r.normal(0, 25, 3), 0, 255),
        "moles": r.uniform([-25, -25], [25, 30], size=(r.integers(0, 5), 2)),
        "beard": r.uniform() < 0.3, "glasses": r.uniform() < 0.2, "ears": r.uniform(3, 8),
    }


def render_face(p: Dict[str, np.ndarray], rng: np.random.Generator, domain: str = "A", size: int = 112) -> np.ndarray:
    """Render one image of the person ``p`` with random nuisance -> (size, size, 3) uint8 **BGR**."""
    s = size / 112.0
    sh = 4  # cv2 fixed-point shift: sub-pixel geometry
    k = s * (1 << sh)

    def P(x, y):
        return (int(round((56 + x) * k)), int(round((60 + y) * k)))

    def L(v):
        return max(1, int(round(v * k)))

    def T(v):  # line thickness is not affected by the fixed-point shift
        return max(1, int(round(v * s)))

    def C(rgb):
        return tuple(min(255.0, max(0.0, float(v))) for v in rgb[::-1])

    bg = rng.uniform(40, 220, 3).astype(np.float32)
    grad = np.linspace(-1, 1, size, dtype=np.float32)[:, None, None] * rng.uniform(-40, 40, 3).astype(np.float32)
    img = np.ascontiguousarray(np.broadcast_to(np.clip(bg + grad, 0, 255).astype(np.uint8), (size, size, 3)))
    aa = cv2.LINE_AA
    for _ in range(int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))):  # background clutter: shapes unrelated to the person
        c = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cx, cy = rng.uniform(0, 112, 2)
        ax = rng.uniform(6, 30, 2)
        cv2.ellipse(img, P(cx - 56, cy - 60), (L(ax[0]), L(ax[1])), float(rng.uniform(0, 180)), 0, 360, c, -1, aa, sh)
    fw, fh = p["face"] * rng.uniform(0.97, 1.03, 2)
    hair, skin = C(p["hair"]), C(p["skin"])
    if p["hair_style"] == 2:  # long hair behind the head
        cv2.ellipse(img, P(0, 6), (L(fw + 7), L(fh + 12)), 0, 0, 360, hair, -1, aa, sh)
    cv2.ellipse(img, P(-fw, 0), (L(p["ears"]), L(8)), 0, 0, 360, skin, -1, aa, sh)
    cv2.ellipse(img, P(fw, 0), (L(p["ears"]), L(8)), 0, 0, 360, skin, -1, aa, sh)
    cv2.ellipse(img, P(0, 0), (L(fw), L(fh)), 0, 0, 360, skin, -1, aa, sh)
    if p["beard"]:
        cv2.ellipse(img, P(0, fh * 0.35), (L(fw * 0.85), L(fh * 0.62)), 0, 0, 180, C(p["hair"] * 0.8), -1, aa, sh)
    if p["hair_style"] > 0:
        cv2.ellipse(img, P(0, -fh * 0.55), (L(fw + 2), L(p["hair_h"] + 6)), 0, 180, 360, hair, -1, aa, sh)
    if p["hair_style"] == 3:  # fringe
        cv2.ellipse(img, P(-fw * 0.3, -fh * 0.55), (L(fw * 0.7), L(p["hair_h"] * 0.8)), 20, 0, 180, hair, -1, aa, sh)
    for mx_, my_ in p["moles"]:
        cv2.circle(img, P(mx_, my_), L(1.3), C(p["skin"] * 0.55), -1, aa, sh)
    open_ = rng.uniform(0.7, 1.1)
    for side in (-1, 1):
        ex, ey = side * p["eye_dx"], p["eye_y"]
        rx, ry = p["eye_r"]
        cv2.ellipse(img, P(ex, ey), (L(rx), L(ry * open_)), 0, 0, 360, (245, 245, 245), -1, aa, sh)
        cv2.circle(img, P(ex + rng.uniform(-1, 1), ey), L(min(rx, ry) * 0.9), C(p["iris"]), -1, aa, sh)
        cv2.circle(img, P(ex, ey), L(1.0), (15, 15, 15), -1, aa, sh)
        by = ey - p["brow_gap"]
        dy = side * p["brow_tilt"] * rx * 1.3
        cv2.line(img, P(ex - rx * 1.2, by + dy), P(ex + rx * 1.2, by - dy), C(p["hair"] * 0.7), T(p["brow_t"]),
                 aa, sh)
        if p["glasses"]:
            cv2.circle(img, P(ex, ey), L(rx + 3), (30, 30, 30), T(1), aa, sh)
    nl, nw = p["nose_len"], p["nose_w"]
    nose = np.array([P(0, p["eye_y"] + 3), P(-nw, p["eye_y"] + 3 + nl), P(nw, p["eye_y"] + 3 + nl)], np.int32)
    cv2.fillConvexPoly(img, nose, C(p["skin"] * 0.8), aa, sh)
    mw, my = p["mouth_w"], p["mouth_y"]
    curve = p["mouth_curve"] + rng.normal(0, 0.8)
    xs = np.linspace(-mw / 2, mw / 2, 9)
    pts = np.array([P(x, my + curve * (1 - (2 * x / mw) ** 2)) for x in xs], np.int32)
    cv2.polylines(img, [pts], False, C(p["lip"]), T(2.5), aa, sh)

    # pose: rotation, scale, shift around the face centre
    big = domain == "B"
    angle = rng.normal(0, 12 if big else 6)
    scale = rng.uniform(0.9, 1.1)
    m = cv2.getRotationMatrix2D((56 * s, 60 * s), angle, scale)
    m[:, 2] += rng.uniform(-7, 7, 2) * s
    img = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    # lighting: directional gradient, brightness, colour cast (BGR gains)
    f = img.astype(np.float32)
    # any direction: a purely sideways light would cancel in the flip-summed embedding of verification
    theta = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.3, 0.65) if big else rng.uniform(0.0, 0.35)
    u = np.linspace(-1, 1, size, dtype=np.float32)
    light = 1 + amp * (math.cos(theta) * u[None, :] + math.sin(theta) * u[:, None])
    # Per-image camera response: strong brightness, white balance and gamma changes, so that raw colour (skin,
    # hair) says little about identity and a random network scores near chance; identity lives in shape/texture.
    gain = np.clip(rng.normal(1, WHITE_BALANCE, 3), 0.55, 1.6) * rng.uniform(*BRIGHTNESS)
    if big:
        gain *= np.array([1.15, 1.0, 0.82])  # colder: more blue, less red (BGR)
    f *= light[:, :, None]
    f *= gain[None, None, :].astype(np.float32)
    f = 255.0 * np.power(np.clip(f, 0, 255) / 255.0, np.float32(rng.uniform(*GAMMA)))
    if rng.uniform() < 0.5:
        f = cv2.GaussianBlur(f, (0, 0), rng.uniform(0.3, 1.3) * s)
    f += rng.standard_normal(f.shape, dtype=np.float32) * np.float32(rng.uniform(0, 7))
    if rng.uniform() < 0.3:  # partial occlusion (hand, scarf, sticker)
        ow, oh = rng.uniform(0.15, 0.45, 2) * size
        ox, oy = rng.uniform(0, size - ow), rng.uniform(0, size - oh)
        f[int(oy):int(oy + oh), int(ox):int(ox + ow)] = rng.uniform(0, 255, 3)
    return np.clip(f, 0, 255).astype(np.uint8)


def encode_jpeg(img_bgr: np.ndarray, quality: int = 92) -> bytes:
    ok, buf = cv2.imencode(".jpg", img_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ToolkitError("cv2.imencode failed to encode a JPEG")
    return buf.tobytes()


def render_identity(seed: int, domain: str, group: int, index: int, count: int, size: int = 112) -> List[bytes]:
    """JPEG bytes of ``count`` images of one identity (deterministic in all arguments)."""
    p = identity_params(seed, domain, group, index)
    out = []
    for j in range(count):
        rng = np.random.default_rng([int(seed), DOMAINS[domain], int(group), int(index), int(j), 11])
        out.append(encode_jpeg(render_face(p, rng, domain, size)))
    return out


def _render_job(job):
    return render_identity(*job)


def _render_all(jobs: Sequence[tuple], workers: int) -> List[List[bytes]]:
    if workers <= 1 or len(jobs) < 8:
        return [_render_job(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(_render_job, jobs, chunksize=max(1, len(jobs) // (4 * workers)))


def make_pairs(counts: Sequence[int], num_pairs: int, rng: np.random.Generator) -> List[tuple]:
    """``num_pairs`` pairs ``((id_a, img_a), (id_b, img_b), issame)``: half same (distinct images), half different."""
    n_id = len(counts)
    pairs = []
    for i in range(num_pairs):
        if i < num_pairs // 2:
            a = int(rng.integers(n_id))
            x, y = rng.choice(counts[a], 2, replace=False)
            pairs.append(((a, int(x)), (a, int(y)), True))
        else:
            a, b = rng.choice(n_id, 2, replace=False)
            pairs.append(((int(a), int(rng.integers(counts[a]))), (int(b), int(rng.integers(counts[b]))), False))
    order = rng.permutation(len(pairs))
    return [pairs[i] for i in order]


def generate_dataset(out_dir: str, num_classes: int = 20, images_per_class: int = 8, num_holdout: int = 10,
                     holdout_images: int = 4, num_pairs: int = 100, domain: str = "A", seed: int = 0,
                     bin_names: Sequence[str] = ("synth_val",), image_size: int = 112, identity_records: bool = True,
                     shuffle: bool = False, workers: int = 1) -> dict:
    """Generate a dataset folder; returns ``{rec, idx, property, bins, num_classes, num_images}``.

    Training identities are ``0..num_classes-1``; the ``.bin`` pairs use ``num_holdout`` other people
    (``holdout_images`` images each), ``num_pairs`` pairs per bin, half same / half different.
    Same arguments -> same bytes.
    """
    domain = str(domain).upper()
    if domain not in DOMAINS:
        raise ToolkitError(f"--domain {domain!r}: expected one of {', '.join(DOMAINS)}")
    if num_classes < 1 or images_per_class < 1:
        raise ToolkitError("--num-classes and --images-per-class must be >= 1")
    if bin_names and num_pairs > 0 and (num_holdout < 2 or holdout_images < 2):
        raise ToolkitError("--num-holdout and --holdout-images must be >= 2 to make verification pairs")
    jobs = [(seed, domain, 0, c, images_per_class, image_size) for c in range(num_classes)]
    hold_jobs = [(seed, domain, 1, c, holdout_images, image_size) for c in range(num_holdout)] if bin_names else []
    rendered = _render_all(jobs + hold_jobs, workers)
    train, held = rendered[:num_classes], rendered[num_classes:]
    samples = [(c, b) for c, imgs in enumerate(train) for b in imgs]
    info = write_dataset(out_dir, samples, num_classes, (image_size, image_size), identity_records=identity_records,
                         shuffle=shuffle, seed=seed)
    bins = []
    for bi, name in enumerate(bin_names or ()):
        if num_pairs <= 0:
            break
        rng = np.random.default_rng([int(seed), DOMAINS[domain], 99, bi])
        pairs = make_pairs([len(h) for h in held], num_pairs, rng)
        images, issame = [], []
        for (a, x), (b, y), same in pairs:
            images += [held[a][x], held[b][y]]
            issame.append(same)
        bins.append(save_bin(os.path.join(out_dir, name + ".bin"), images, issame))
    info["bins"] = bins
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datasets.synth", description=__doc__.split("\n\n")[0],
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (train.rec, train.idx, property, NAME.bin)")
    ap.add_argument("--num-classes", type=int, default=20, help="training identities")
    ap.add_argument("--images-per-class", type=int, default=8)
    ap.add_argument("--num-holdout", type=int, default=10, help="held-out identities used by the .bin pairs")
    ap.add_argument("--holdout-images", type=int, default=4, help="images per held-out identity")
    ap.add_argument("--num-pairs", type=int, default=100, help="pairs per .bin (half same, half different)")
    ap.add_argument("--domain", default="A", choices=sorted(DOMAINS), help="B = shifted lighting/colour/pose, "
                    "different people")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bin-names", default="synth_val", help="comma-separated .bin names ('' for none)")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--no-identity-records", action="store_true", help="im2rec-style rec: keys 0..N-1, no headers")
    ap.add_argument("--shuffle", action="store_true", help="shuffle record order (with --no-identity-records)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="rendering processes")
    args = ap.parse_args(argv)
    if args.shuffle and not args.no_identity_records:
        raise ToolkitError("--shuffle needs --no-identity-records (identity records need images grouped by class)")
    names = tuple(n for n in args.bin_names.split(",") if n.strip())
    info = generate_dataset(args.out, args.num_classes, args.images_per_class, args.num_holdout, args.holdout_images,
                            args.num_pairs, args.domain, args.seed, names, args.image_size,
                            identity_records=not args.no_identity_records, shuffle=args.shuffle, workers=args.workers)
    print(f"wrote {info['num_images']} images of {info['num_classes']} identities to {info['rec']}; "
          f"bins: {', '.join(info['bins']) or 'none'}")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
