"""A corpus of broken inputs, generated from tiny good data, each run through the real commands.

Every case has one expected outcome: a one-line ``error: ...`` with exit code 2 (refusal), a counted skip with the
run finishing (exit 0), or an accepted conversion. Never a traceback, a hang, or a silently wrong result.
Commands are run through their ``main`` (what ``python recognition/train.py`` etc. call) to keep the file fast;
the hostile pickle is also loaded by a fresh ``python -m recognition.verification`` process.
"""
import os
import pickle
import shutil
import struct
import subprocess
import sys

import cv2
import mxnet as mx
import numpy as np
import pytest

from datasets import rec_info
from recognition import train, verification
from recognition.common import run_cli, save_checkpoint
from recognition.image_iter import FaceImageIter
from recognition.metrics_log import read_metrics
from recognition.rec import RecordReader, save_bin, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """4 classes x 4 images (16 records, 2 batches of 8) and a 10-pair .bin."""
    from datasets.synth import generate_dataset

    out = tmp_path_factory.mktemp("good")
    return generate_dataset(str(out / "data"), num_classes=4, images_per_class=4, num_holdout=4, holdout_images=2,
                            num_pairs=10, seed=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A randomly initialised ``tiny`` embedding checkpoint ``PREFIX,0`` for the verification command."""
    from recognition.backbones import get_symbol

    sym = get_symbol("tiny")
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None, context=mx.cpu())
    mod.bind(data_shapes=[("data", (1, 3, 112, 112))], for_training=False)
    mod.init_params(mx.init.Xavier())
    arg, aux = mod.get_params()
    prefix = str(tmp_path_factory.mktemp("model") / "model")
    save_checkpoint(prefix, 0, sym, arg, aux)
    return prefix + ",0"


def copy_data(good, tmp_path) -> str:
    d = str(tmp_path / "bad")
    shutil.copytree(os.path.dirname(good["rec"]), d)
    return d


def record_offset(folder: str, key: int) -> int:
    with open(os.path.join(folder, "train.idx")) as f:
        return dict(tuple(map(int, line.split("\t"))) for line in f if line.strip())[key]


def run_train(capsys, folder, tmp_path, *extra, steps=2):
    argv = ["--network", "tiny", "--loss", "softmax", "--data-dir", folder, "--target", "", "--per-batch-size", "8",
            "--max-steps", str(steps), "--verbose", "100", "--frequent", "1", "--ckpt", "0", "--lr", "0.01",
            "--seed", "1", "--num-workers", "1", "--prefix", str(tmp_path / "run" / "model"), *extra]
    rc = run_cli(train.main, argv)
    return rc, capsys.readouterr().err.strip()


def assert_one_line_error(rc, err, *needles):
    """Exit code 2 and a last stderr line ``error: ...`` holding every needle (log lines may precede it)."""
    last = err.splitlines()[-1] if err else ""
    assert rc == 2 and last.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in last, err


# ------------------------------------------------------------------------------------------- broken train.rec sets
def _truncate_rec(d):
    path = os.path.join(d, "train.rec")
    os.truncate(path, os.path.getsize(path) * 6 // 10)


def _idx_past_end(d):
    size = os.path.getsize(os.path.join(d, "train.rec"))
    with open(os.path.join(d, "train.idx")) as f:
        lines = [line.split("\t") for line in f if line.strip()]
    lines[5][1] = str(size + 4096) + "\n"
    with open(os.path.join(d, "train.idx"), "w") as f:
        f.writelines("\t".join(parts) for parts in lines)


def _label_out_of_range(d):
    pos = record_offset(d, 3) + 8  # RecordIO header (magic, length), then IRHeader (flag uint32, label float32)
    with open(os.path.join(d, "train.rec"), "r+b") as f:
        f.seek(pos)
        flag = struct.unpack("<I", f.read(4))[0]
        assert flag == 0
        f.write(struct.pack("<f", 99.0))


def _empty_rec(d):
    for name in ("train.rec", "train.idx"):
        open(os.path.join(d, name), "w").close()


def _garbage_property(d):
    with open(os.path.join(d, "property"), "w") as f:
        f.write("\x00\x01 lots of, garbage\n")


REC_CASES = {
    "truncated_rec": (_truncate_rec, "past the end of the rec"),
    "idx_past_end": (_idx_past_end, "key 5 points at offset"),
    "label_out_of_range": (_label_out_of_range, "label 99 >= num_classes 4"),
    "empty_rec": (_empty_rec, "empty record file (no records)"),
    "garbage_property": (_garbage_property, "cannot parse"),
}


@pytest.mark.parametrize("case", sorted(REC_CASES))
def test_broken_dataset_is_refused_by_train_and_rec_info(good, tmp_path, capsys, case):
    make, needle = REC_CASES[case]
    d = copy_data(good, tmp_path)
    make(d)
    rc, err = run_train(capsys, d, tmp_path)
    assert_one_line_error(rc, err, needle)
    assert not os.path.exists(tmp_path / "run" / "model-0001.params")
    rc = run_cli(rec_info.main, [os.path.join(d, "train.rec")])
    assert_one_line_error(rc, capsys.readouterr().err.strip(), needle)


def test_corrupt_jpeg_is_skipped_counted_and_logged(good, tmp_path, capsys):
    d = copy_data(good, tmp_path)
    pos = record_offset(d, 6)
    with open(os.path.join(d, "train.rec"), "r+b") as f:
        f.seek(pos + 4)
        length = struct.unpack("<I", f.read(4))[0] & ((1 << 29) - 1)
        f.seek(pos + 8 + 24)  # keep the IRHeader (label), zero the JPEG bytes: offsets stay valid
        f.write(b"\0" * (length - 24))
    it = FaceImageIter(os.path.join(d, "train.rec"), 8, shuffle=False, rand_mirror=False, num_workers=0, seed=0)
    data, label = zip(*(it.next_numpy() for _ in range(it.num_batches)))
    assert it.num_skipped == 1 and np.all(np.isfinite(np.concatenate(data)))
    # record 6 is replaced by the next decodable record (7, same class): labels stay consistent with the images
    assert np.bincount(np.concatenate(label).astype(int)).tolist() == [4, 4, 4, 4]
    rc, err = run_train(capsys, d, tmp_path, steps=4)
    assert rc == 0, err
    with open(tmp_path / "run" / "train.log") as f:
        log = f.read()
    assert "record 6 is not a decodable image; skipped (counted in num_skipped)" in log
    assert len(read_metrics(str(tmp_path / "run" / "metrics.jsonl"), "train")) == 4
    rc = run_cli(rec_info.main, [os.path.join(d, "train.rec")])
    assert_one_line_error(rc, capsys.readouterr().err.strip(), "record 6 is not a decodable image")


def test_wrong_size_and_channel_count_are_converted_for_training_and_flagged_by_rec_info(tmp_path, capsys):
    rng = np.random.RandomState(0)
    gray = cv2.imencode(".jpg", rng.randint(0, 255, (64, 64), np.uint8))[1].tobytes()        # 1 channel, 64x64
    rgba = cv2.imencode(".png", rng.randint(0, 255, (112, 112, 4), np.uint8))[1].tobytes()   # 4 channels
    big = cv2.imencode(".jpg", rng.randint(0, 255, (150, 130, 3), np.uint8))[1].tobytes()    # 150x130
    ok = cv2.imencode(".jpg", rng.randint(0, 255, (112, 112, 3), np.uint8))[1].tobytes()
    samples = [(c, [gray, rgba, big, ok][i % 4]) for c in range(2) for i in range(4)]
    d = str(tmp_path / "mixed")
    write_dataset(d, samples, num_classes=2)
    it = FaceImageIter(os.path.join(d, "train.rec"), 8, shuffle=False, rand_mirror=False, num_workers=0, seed=0)
    data, _ = it.next_numpy()
    assert data.shape == (8, 3, 112, 112) and it.num_skipped == 0
    # grey decodes to three equal channels
    np.testing.assert_array_equal(data[0, 0], data[0, 1])
    rc, err = run_train(capsys, d, tmp_path, steps=1)
    assert rc == 0, err
    rc = run_cli(rec_info.main, [d])
    assert_one_line_error(rc, capsys.readouterr().err.strip(), "but", "says 112x112")


def test_nan_producing_learning_rate_stops_with_message(good, tmp_path, capsys):
    rc, err = run_train(capsys, os.path.dirname(good["rec"]), tmp_path, "--lr", "1e30", steps=6)
    assert_one_line_error(rc, err, "training diverged: loss is", "lower --lr")
    recs = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    diverged = [r for r in recs if r["kind"] == "diverged"]
    assert len(diverged) == 1 and not np.isfinite(diverged[0]["loss"])
    assert all(np.isfinite(r["loss"]) for r in recs if r["kind"] == "train")
    assert not os.path.exists(tmp_path / "run" / "model-0001.params")  # nothing saved from a diverged model


# --------------------------------------------------------------------------------------------------- broken .bin
class _RunsCode:
    """Unpickling this calls ``os.system(touch MARKER)``: a .bin must never be able to do that."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _bin_cases(good, tmp_path):
    images, issame = pickle.load(open(good["bins"][0], "rb"))
    cases = {}
    path = str(tmp_path / "odd.bin")
    with open(path, "wb") as f:
        pickle.dump((images[:-1], issame), f)
    cases["odd"] = (path, "odd number of images (19)")
    path = str(tmp_path / "mismatch.bin")
    with open(path, "wb") as f:
        pickle.dump((images[:-2], issame), f)
    cases["mismatch"] = (path, "18 images but 10 pair labels")
    path = str(tmp_path / "truncated.bin")
    with open(good["bins"][0], "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[:len(blob) // 2])
    cases["truncated"] = (path, "not a readable insightface .bin pickle")
    path = str(tmp_path / "undecodable.bin")
    with open(path, "wb") as f:
        pickle.dump(([b"not a jpeg"] * 2 + images[2:], issame), f)
    cases["undecodable"] = (path, "image 0 cannot be decoded")
    return cases


@pytest.mark.parametrize("case", ["odd", "mismatch", "truncated", "undecodable"])
def test_broken_bin_is_refused_by_verification_and_train(good, model, tmp_path, capsys, case):
    path, needle = _bin_cases(good, tmp_path)[case]
    rc = run_cli(verification.main, ["--model", model, "--target", path, "--no-progress"])
    assert_one_line_error(rc, capsys.readouterr().err.strip(), path, needle)
    rc, err = run_train(capsys, os.path.dirname(good["rec"]), tmp_path, "--target", path)
    assert_one_line_error(rc, err, needle)


def test_wrong_size_bin_images_are_resized(good, model, tmp_path, capsys):
    images, issame = pickle.load(open(good["bins"][0], "rb"))
    small = [cv2.imencode(".jpg", cv2.resize(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE),
                                             (80, 80)))[1].tobytes() for b in images]
    path = save_bin(str(tmp_path / "small.bin"), small, issame)
    rc = run_cli(verification.main, ["--model", model, "--target", path, "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "[small]Accuracy-Flip: " in out and "10 pairs" in out


def test_pickle_that_runs_code_is_refused_and_never_runs(good, model, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = str(tmp_path / "evil.bin")
    with open(path, "wb") as f:
        pickle.dump(([_RunsCode(marker)] * 2, [True]), f, protocol=2)
    with open(path, "rb") as f:  # the payload is live: a plain pickle.load would run it
        assert b"system" in f.read()
    needle = "refusing to unpickle forbidden global posix.system"
    rc = run_cli(verification.main, ["--model", model, "--target", path, "--no-progress"])
    assert_one_line_error(rc, capsys.readouterr().err.strip(), needle)
    rc, err = run_train(capsys, os.path.dirname(good["rec"]), tmp_path, "--target", path)
    assert_one_line_error(rc, err, needle)
    out = subprocess.run([sys.executable, "-m", "recognition.verification", "--model", model, "--target", path,
                          "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("error: ") and needle in out.stderr
    assert not marker.exists()
    with RecordReader(good["rec"]) as r:  # the good data stayed good
        assert len(r) == 16
