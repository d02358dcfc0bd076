"""datasets/shift.py: each shift against a numpy reference, seeded determinism, rec/.bin round trips, the CLI."""
import os

import cv2
import numpy as np
import pytest

from datasets import shift as sh
from recognition.common import ToolkitError, run_cli


def _face(seed=0, size=112):
    """A smooth random BGR image (gradients + blobs), uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    img = np.stack([80 + 100 * xx, 60 + 120 * yy, 200 - 90 * xx * yy], -1)
    img += cv2.GaussianBlur(rng.normal(0, 40, (size, size, 3)), (0, 0), 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _bilinear_up2(small):
    """numpy reference of OpenCV's bilinear x2 (half-pixel centres, edges clamped): (h, w, 3) -> (2h, 2w, 3)."""
    h, w = small.shape[:2]
    s = small.astype(np.float64)

    def axis(n):
        src = (np.arange(2 * n) + 0.5) / 2 - 0.5
        lo = np.floor(src).astype(int)
        t = src - lo
        return np.clip(lo, 0, n - 1), np.clip(lo + 1, 0, n - 1), t

    y0, y1, ty = axis(h)
    x0, x1, tx = axis(w)
    rows = s[y0] * (1 - ty)[:, None, None] + s[y1] * ty[:, None, None]
    return rows[:, x0] * (1 - tx)[None, :, None] + rows[:, x1] * tx[None, :, None]


def test_lowres_is_block_mean_then_bilinear_up():
    img = _face(1)
    sev = 5 / 9  # 1 - 0.9 * 5/9 = 0.5: 112 -> 56 -> 112
    out = sh.lowres(img, sev, np.random.default_rng(0))
    small = img.astype(np.float64).reshape(56, 2, 56, 2, 3).mean((1, 3))  # area average of 2x2 blocks
    ref = _bilinear_up2(np.round(small))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out - ref).max() <= 1.5  # two uint8 roundings + OpenCV's fixed-point weights
    assert np.abs(out - ref).mean() < 0.4  # rounding of quarter/half values
    checker = np.repeat((255 * (np.indices((112, 112)).sum(0) % 2)).astype(np.uint8)[:, :, None], 3, 2)
    assert np.abs(sh.lowres(checker, sev, None).astype(int) - 128).max() <= 1  # 1-px detail is gone


def test_grey_is_bt601_luma_blend():
    img = _face(2)
    b, g, r = [img[:, :, i].astype(np.float64) for i in range(3)]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    full = sh.grey(img, 1.0, np.random.default_rng(0)).astype(np.float64)
    for c in range(3):
        assert np.abs(full[:, :, c] - luma).max() <= 0.51
    half = sh.grey(img, 0.5, np.random.default_rng(0)).astype(np.float64)
    assert np.abs(half - (0.5 * img + 0.5 * luma[:, :, None])).max() <= 0.51


def test_nir_is_grey_and_seeded():
    img = _face(3)
    a = sh.nir(img, 1.0, np.random.default_rng(7))
    assert np.array_equal(a[:, :, 0], a[:, :, 1]) and np.array_equal(a[:, :, 1], a[:, :, 2])
    assert np.array_equal(a, sh.nir(img, 1.0, np.random.default_rng(7)))
    assert not np.array_equal(a, sh.nir(img, 1.0, np.random.default_rng(8)))  # the sensor noise is drawn


def test_mask_covers_nose_and_mouth_not_eyes():
    from deploy.align import reference_landmarks

    img = np.full((112, 112, 3), 128, np.uint8)
    img[..., 0] = 7  # a colour no mask colour has, so every painted pixel differs
    lm = np.round(reference_landmarks(112)).astype(int)
    for sev in (0.3, 1.0):
        out = sh.mask(img, sev, np.random.default_rng(0))
        changed = np.any(out != img, axis=2)
        assert all(changed[y, x] for x, y in lm[3:])  # mouth corners
        assert not any(changed[y, x] for x, y in lm[:2])  # eyes
        assert changed[lm[2, 1], lm[2, 0]] == (sev == 1.0)  # nose tip covered only when the mask is pulled up
        poly = sh.mask_polygon(112, 112, sev)
        inside = np.zeros((112, 112), np.uint8)
        cv2.fillPoly(inside, [np.round(poly).astype(np.int32)], 1)
        assert changed.sum() > 0.5 * inside.sum()  # roughly the polygon (placement jitter is +-3 px)
        assert np.array_equal(out[~changed], img[~changed])  # nothing else touched
    # 128 px crops scale the template
    big = sh.mask_polygon(224, 224, 0.5)
    assert np.allclose(big, 2 * sh.mask_polygon(112, 112, 0.5))


def test_motion_blur_matches_numpy_convolution():
    k0 = sh.motion_kernel(5, 0.0)
    assert np.allclose(k0[2], 0.2) and np.allclose(np.delete(k0, 2, 0), 0)
    assert np.allclose(sh.motion_kernel(5, 90.0), k0.T)
    img = _face(4)
    out = sh.blur(img, 0.3, np.random.default_rng(11))  # length 1 + round(4.2) = 5
    angle = np.random.default_rng(11).uniform(0, 180)
    k = sh.motion_kernel(5, angle)
    pad = np.pad(img.astype(np.float64), ((2, 2), (2, 2), (0, 0)), mode="edge")
    ref = sum(k[i, j] * pad[i:i + 112, j:j + 112] for i in range(5) for j in range(5))
    assert np.abs(out - ref).max() <= 1.01


def test_jpeg_quality_and_stored_bytes():
    img = _face(5)
    assert sh.jpeg_quality(1.0) == 5 and sh.jpeg_quality(0.5) == 50
    errs = [np.abs(sh.jpeg(img, s, None).astype(int) - img).mean() for s in (0.2, 0.6, 1.0)]
    assert errs[0] < errs[1] < errs[2]
    ok, buf = cv2.imencode(".png", img)
    spec = sh.parse_spec("lowres@0.5+jpeg@0.9")
    payload = sh.shift_jpeg(buf.tobytes(), spec, np.random.default_rng(0))
    # a trailing jpeg kind stores its own degraded bytes: decoding them gives jpeg(lowres(img)) exactly
    ref = sh.jpeg(sh.lowres(img, 0.5, None), 0.9, None)
    assert np.array_equal(cv2.imdecode(np.frombuffer(payload, np.uint8), 1), ref)
    assert sh.shift_jpeg(b"not an image", spec, np.random.default_rng(0)) is None


def test_parse_spec_and_augment_errors():
    assert sh.parse_spec("lowres@0.8+jpeg", 0.3) == [("lowres", 0.8), ("jpeg", 0.3)]
    assert sh.parse_augment("mask@0.7:0.25") == ([("mask", 0.7)], 0.25)
    assert sh.parse_augment("grey") == ([("grey", sh.DEFAULT_SEVERITY)], 1.0)
    with pytest.raises(ToolkitError, match="shift kind 'fog'"):
        sh.parse_spec("lowres+fog")
    with pytest.raises(ToolkitError, match=r"severity 1.5 must be in \(0, 1\]"):
        sh.parse_spec("blur@1.5")
    with pytest.raises(ToolkitError, match="probability 'x' is not a number"):
        sh.parse_augment("mask:x")


def test_image_rng_is_per_image_and_seeded():
    spec = sh.parse_spec("mask")
    img = _face(6)
    a = [sh.apply_shift(img, spec, sh.image_rng(3, i, spec)) for i in range(6)]
    b = [sh.apply_shift(img, spec, sh.image_rng(3, i, spec)) for i in reversed(range(6))][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # order does not matter
    assert any(not np.array_equal(a[0], x) for x in a[1:])  # images get their own draws
    c = sh.apply_shift(img, spec, sh.image_rng(4, 0, spec))
    assert not np.array_equal(a[0], c) or not np.array_equal(a[1], sh.apply_shift(img, spec, sh.image_rng(4, 1, spec)))


def test_rec_round_trip_keeps_layout_and_shifts_images(tmp_path, tiny_data):
    from recognition.rec import RecordReader

    src = os.path.dirname(tiny_data["rec"])
    out = str(tmp_path / "shifted")
    done = sh.shift_path(src, out, sh.parse_spec("lowres@0.7+jpeg@0.5"), seed=9)
    assert {os.path.basename(d["path"]) for d in done} >= {"shifted", "synth_val.bin"}
    a, b = RecordReader(tiny_data["rec"]), RecordReader(os.path.join(out, "train.rec"))
    assert a.keys == b.keys and a.image_keys == b.image_keys and a.identities == b.identities
    assert np.array_equal(a.labels(), b.labels())
    spec = sh.parse_spec("lowres@0.7+jpeg@0.5")
    for key in a.image_keys[:5]:
        orig, shifted = a.read(key)[1], b.read(key)[1]
        assert shifted == sh.shift_jpeg(orig, spec, sh.image_rng(9, key, spec))
        assert shifted != orig
    with open(os.path.join(src, "property")) as f, open(os.path.join(out, "property")) as g:
        assert f.read() == g.read()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_bin_round_trip_and_determinism(tmp_path, tiny_data):
    from recognition.rec import safe_load_bin_pickle

    src = tiny_data["bins"][0]
    spec = sh.parse_spec("mask@0.6")
    p1, p2, p3 = (str(tmp_path / n) for n in ("a.bin", "b.bin", "c.bin"))
    sh.shift_bin(src, p1, spec, seed=1)
    sh.shift_bin(src, p2, spec, seed=1)
    sh.shift_bin(src, p3, spec, seed=2)
    imgs, same = safe_load_bin_pickle(src)
    i1, s1 = safe_load_bin_pickle(p1)
    assert s1 == same and len(i1) == len(imgs)
    assert open(p1, "rb").read() == open(p2, "rb").read()
    assert open(p1, "rb").read() != open(p3, "rb").read()
    assert i1[3] == sh.shift_jpeg(bytes(imgs[3]), spec, sh.image_rng(1, 3, spec))


def test_cli_errors_are_one_line(tmp_path, tiny_data, capsys):
    src = os.path.dirname(tiny_data["rec"])
    assert run_cli(sh.main, ["--src", src, "--out", str(tmp_path / "o"), "--kind", "rain"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: shift kind 'rain'") and "\n" not in err
    assert run_cli(sh.main, ["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--kind", "grey"]) == 2
    assert "neither a .bin file nor a dataset folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")
    from datasets.tools import main as tools_main

    out_bin = str(tmp_path / "g.bin")
    assert run_cli(tools_main, ["shift", "--src", tiny_data["bins"][0], "--out", out_bin, "--kind", "grey@1"]) == 0
    assert "60 pairs shifted by grey@1" in capsys.readouterr().out
