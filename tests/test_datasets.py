"""datasets/: synthetic generator and conversion tools (lossless round trips, clear errors with exit code 2)."""
import hashlib
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from datasets import bin2images, folder2rec, pairs2bin, rec2folder, rec_info, synth, tools
from recognition.common import run_cli
from recognition.rec import RecordReader, read_property, safe_load_bin_pickle, save_bin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _content(rec):
    r = RecordReader(rec)
    return [(float(r.labels([k])[0]), r.read(k)[1]) for k in r.image_keys]


def _digest(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest()
            for f in ("train.rec", "train.idx", "property", "synth_val.bin")}


def test_synth_layout_and_determinism(tmp_path, tiny_data):
    again = synth.generate_dataset(str(tmp_path / "a"), num_classes=12, images_per_class=8, num_holdout=8,
                                   holdout_images=4, num_pairs=60, seed=0)
    assert _digest(os.path.dirname(tiny_data["rec"])) == _digest(str(tmp_path / "a"))
    assert read_property(str(tmp_path / "a")) == (12, 112, 112) and again["num_images"] == 96
    r = RecordReader(again["rec"])
    assert r.has_identity_records and r.identities[:2] == [(1, 9), (9, 17)]
    img = cv2.imdecode(np.frombuffer(r.read(1)[1], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (112, 112, 3)
    images, issame = safe_load_bin_pickle(again["bins"][0])
    assert len(issame) == 60 and sum(issame) == 30
    assert not set(images) & {d for _, d in _content(again["rec"])}  # pairs use held-out people only


def test_synth_domains_are_different_people_and_look(tmp_path):
    a = synth.identity_params(0, "A", 0, 3)
    b = synth.identity_params(0, "B", 0, 3)
    assert not np.allclose(a["skin"], b["skin"])
    imgs = {}
    for dom in "AB":
        info = synth.generate_dataset(str(tmp_path / dom), num_classes=6, images_per_class=6, num_holdout=0,
                                      bin_names=(), domain=dom, seed=0)
        r = RecordReader(info["rec"])
        imgs[dom] = np.stack([cv2.imdecode(np.frombuffer(r.read(k)[1], np.uint8), 1) for k in r.image_keys])
    # domain B is colder: relatively more blue than red (BGR channel order)
    ratio = {d: imgs[d][..., 0].mean() / imgs[d][..., 2].mean() for d in "AB"}
    assert ratio["B"] > ratio["A"] * 1.15


def test_synth_commands_and_shuffled_rec(tmp_path):
    out = tmp_path / "s"
    cmd = [sys.executable, "datasets/synth.py", "--out", str(out), "--num-classes", "3", "--images-per-class", "4",
           "--num-holdout", "2", "--holdout-images", "2", "--num-pairs", "4", "--no-identity-records", "--shuffle",
           "--workers", "1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    r = RecordReader(str(out / "train.rec"))
    assert not r.has_identity_records and sorted(r.labels()) == sorted(np.repeat([0, 1, 2], 4))
    p = subprocess.run([sys.executable, "-m", "datasets.synth", "--out", str(out), "--num-classes", "3",
                        "--shuffle"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == \
        "error: --shuffle needs --no-identity-records (identity records need images grouped by class)"


@pytest.mark.parametrize("identity_records", [True, False])
def test_rec_folder_rec_roundtrip(tmp_path, tiny_data, identity_records):
    src = tiny_data["rec"]
    if not identity_records:
        folder2rec.folder2rec(_unpack(src, tmp_path / "f0"), str(tmp_path / "s"), identity_records=False,
                              shuffle=True)
        src = str(tmp_path / "s" / "train.rec")
    assert rec2folder.main(["--rec", src, "--out", str(tmp_path / "f")]) == 0
    assert folder2rec.main(["--src", str(tmp_path / "f"), "--out", str(tmp_path / "r")]) == 0
    back = _content(str(tmp_path / "r" / "train.rec"))
    assert sorted(back) == sorted(_content(src))
    if identity_records:
        for f in ("train.rec", "train.idx", "property"):
            assert open(tmp_path / "r" / f, "rb").read() == open(os.path.join(os.path.dirname(src), f), "rb").read()


def _unpack(rec, out):
    rec2folder.rec2folder(rec, str(out))
    return str(out)


def test_lst_formats_and_resize(tmp_path, tiny_data):
    folder = _unpack(tiny_data["rec"], tmp_path / "f")
    items, _ = folder2rec.list_folder(folder)
    with open(tmp_path / "insight.lst", "w") as f:
        f.writelines(f"1\t{os.path.relpath(p, tmp_path)}\t{c}\n" for c, p in items)
    with open(tmp_path / "im2rec.lst", "w") as f:
        f.writelines(f"{i}\t{c}.000000\t{p}\n" for i, (c, p) in enumerate(items))
    for lst in ("insight.lst", "im2rec.lst"):
        folder2rec.folder2rec(str(tmp_path / lst), str(tmp_path / lst[:-4]))
        assert _content(str(tmp_path / lst[:-4] / "train.rec")) == _content(tiny_data["rec"])
    big = tmp_path / "big" / "alice"
    big.mkdir(parents=True)
    cv2.imwrite(str(big / "a.png"), np.full((150, 130, 3), 90, np.uint8))
    err = tmp_path / "err.txt"
    assert _run(folder2rec.main, ["--src", str(tmp_path / "big"), "--out", str(tmp_path / "o")], err) == 2
    assert err.read_text().strip() == f"error: {big / 'a.png'}: 130x150 PNG image, expected a 112x112 JPEG/PNG " \
                                      "(pass --resize to re-encode)"
    assert not (tmp_path / "o" / "train.rec").exists()
    folder2rec.folder2rec(str(tmp_path / "big"), str(tmp_path / "o"), resize=True)
    (lab, data), = _content(str(tmp_path / "o" / "train.rec"))
    assert lab == 0 and cv2.imdecode(np.frombuffer(data, np.uint8), 1).shape == (112, 112, 3)
    assert open(tmp_path / "o" / "classes.txt").read() == "alice\n"


def _run(main, argv, err_path):
    """run_cli(main, argv) with stderr captured to ``err_path``; returns the exit code."""
    import contextlib

    with open(err_path, "w") as f, contextlib.redirect_stderr(f):
        return run_cli(main, argv)


def test_bin_images_roundtrip_and_lfw_pairs(tmp_path, tiny_data):
    out = tmp_path / "u"
    assert tools.main(["bin2images", "--bin", tiny_data["bins"][0], "--out", str(out)]) == 0
    assert tools.main(["pairs2bin", "--pairs", str(out / "pairs.txt"), "--out", str(tmp_path / "v.bin")]) == 0
    assert safe_load_bin_pickle(str(tmp_path / "v.bin")) == safe_load_bin_pickle(tiny_data["bins"][0])
    images, _ = safe_load_bin_pickle(tiny_data["bins"][0])
    lfw = tmp_path / "lfw"
    for name, idx in (("Ann_A", (0, 1)), ("Bob_B", (2,))):
        (lfw / name).mkdir(parents=True)
        for j, i in enumerate(idx, 1):
            (lfw / name / f"{name}_{j:04d}.jpg").write_bytes(images[i])
    (lfw / "pairs.txt").write_text("1\t2\nAnn_A\t1\t2\nAnn_A\t2\tBob_B\t1\n")
    info = pairs2bin.pairs2bin(str(lfw / "pairs.txt"), str(tmp_path / "lfw.bin"))
    assert info["num_pairs"] == 2
    assert safe_load_bin_pickle(str(tmp_path / "lfw.bin")) == ([images[0], images[1], images[1], images[2]],
                                                               [True, False])


def test_info_reports_and_checks(tmp_path, tiny_data, capsys):
    assert rec_info.main([tiny_data["rec"]]) == 0
    out = capsys.readouterr().out
    assert "classes: 12" in out and "images: 96" in out and "min 8 median 8 max 8" in out and "112x112" in out
    folder = os.path.dirname(tiny_data["rec"])
    for f in ("train.rec", "train.idx"):
        (tmp_path / f).write_bytes(open(os.path.join(folder, f), "rb").read())
    (tmp_path / "property").write_text("12,96,96\n")
    assert _run(rec_info.main, [str(tmp_path / "train.rec")], tmp_path / "e") == 2
    assert "images are 112x112 but" in (tmp_path / "e").read_text()
    (tmp_path / "property").write_text("11,112,112\n")
    assert _run(rec_info.main, [str(tmp_path)], tmp_path / "e") == 2
    assert "label 11 >= num_classes 11" in (tmp_path / "e").read_text()


def test_bad_inputs_exit_2(tmp_path):
    (tmp_path / "faces" / "bob").mkdir(parents=True)
    (tmp_path / "faces" / "eve").mkdir()
    cv2.imwrite(str(tmp_path / "faces" / "bob" / "1.jpg"), np.zeros((112, 112, 3), np.uint8))
    p = subprocess.run([sys.executable, "datasets/folder2rec.py", "--src", str(tmp_path / "faces"), "--out",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == f"error: {tmp_path / 'faces' / 'eve'}: empty identity folder " \
                               "(no .jpg/.jpeg/.png/.bmp/.webp/.tif/.tiff files)"
    import pickle

    with open(tmp_path / "odd.bin", "wb") as f:
        pickle.dump(([b"x"] * 5, [True, False]), f)
    assert _run(bin2images.main, ["--bin", str(tmp_path / "odd.bin"), "--out", str(tmp_path / "u")],
                tmp_path / "e") == 2
    assert "5 images for 2 pairs; expected exactly 2 images per pair" in (tmp_path / "e").read_text()
    (tmp_path / "p.txt").write_text("a.jpg b.jpg maybe\n")
    assert _run(pairs2bin.main, ["--pairs", str(tmp_path / "p.txt"), "--out", str(tmp_path / "x.bin")],
                tmp_path / "e") == 2
    assert "p.txt:1: cannot parse 'a.jpg b.jpg maybe'" in (tmp_path / "e").read_text()
    assert _run(tools.main, ["nosuch"], tmp_path / "e") == 2
    assert "unknown tool 'nosuch'" in (tmp_path / "e").read_text()
    save_bin(str(tmp_path / "ok.bin"), [b"a", b"b"], [True])
    assert safe_load_bin_pickle(str(tmp_path / "ok.bin")) == ([b"a", b"b"], [True])
