"""FaceImageIter: pixels against mxnet's own decoder, exact resume, augmentation, filters, bad inputs."""
import os
import shutil

import mxnet as mx
import numpy as np
import pytest

from recognition.common import ToolkitError
from recognition.image_iter import FaceImageIter
from recognition.rec import RecordReader, write_dataset, write_property


def _reference(rec, keys):
    """(N, 3, 112, 112) float32 RGB via mx.image.imdecode: an independent decode path."""
    r = RecordReader(rec)
    return np.stack([mx.image.imdecode(r.read(k)[1]).asnumpy().transpose(2, 0, 1) for k in keys]).astype(np.float32)


def test_plain_order_pixels_and_labels(tiny_data):
    it = FaceImageIter(tiny_data["rec"], 16, shuffle=False, rand_mirror=False, num_workers=2, seed=0)
    assert it.num_classes == 12 and it.num_images == 96 and it.num_batches == 6
    keys = RecordReader(tiny_data["rec"]).image_keys
    batch = it.next()
    assert batch.data[0].shape == (16, 3, 112, 112) and batch.data[0].dtype == np.float32
    np.testing.assert_array_equal(batch.data[0].asnumpy(), _reference(tiny_data["rec"], keys[:16]))
    np.testing.assert_array_equal(batch.label[0].asnumpy(), np.repeat([0, 1], 8))
    assert sum(1 for _ in it) == 5  # rest of the epoch, then StopIteration


def test_mirror_each_image_plain_or_flipped(tiny_data):
    it = FaceImageIter(tiny_data["rec"], 32, shuffle=False, rand_mirror=True, seed=5)
    data, _ = it.next_numpy()
    ref = _reference(tiny_data["rec"], RecordReader(tiny_data["rec"]).image_keys[:32])
    flipped = [np.array_equal(d, r[:, :, ::-1]) for d, r in zip(data, ref)]
    plain = [np.array_equal(d, r) for d, r in zip(data, ref)]
    assert all(f or p for f, p in zip(flipped, plain)) and 4 < sum(flipped) < 28


def test_shuffle_epoch_covers_each_image_once_and_reset_reshuffles(tiny_data):
    it = FaceImageIter(tiny_data["rec"], 16, seed=1, rand_mirror=False)
    labels1 = np.concatenate([b.label[0].asnumpy() for b in it])
    assert sorted(labels1) == sorted(np.repeat(np.arange(12), 8))
    it.reset()
    labels2 = np.concatenate([b.label[0].asnumpy() for b in it])
    assert sorted(labels2) == sorted(labels1) and not np.array_equal(labels1, labels2)


def test_resume_is_exact_and_threads_do_not_matter(tiny_data):
    kw = dict(seed=7, cutoff=24, color_jitter=0.3)
    full = FaceImageIter(tiny_data["rec"], 16, num_workers=2, **kw)
    run = []
    for _ in range(2):
        run += [full.next_numpy() for _ in range(full.num_batches)]
        full.reset()
    part = FaceImageIter(tiny_data["rec"], 16, num_workers=2, **kw)
    for _ in range(4):
        part.next_numpy()
    state = part.get_state()
    resumed = FaceImageIter(tiny_data["rec"], 16, num_workers=0, seed=99, cutoff=24, color_jitter=0.3)
    resumed.set_state(state)
    rest = [resumed.next_numpy() for _ in range(2)]
    resumed.reset()
    rest += [resumed.next_numpy() for _ in range(resumed.num_batches)]
    for (a, la), (b, lb) in zip(run[4:], rest):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    bad = FaceImageIter(tiny_data["rec"], 8, seed=1)
    with pytest.raises(ToolkitError, match="batch_size was 16, now 8"):
        bad.set_state(state)


def test_cutoff_and_jitter(tiny_data):
    ref = _reference(tiny_data["rec"], RecordReader(tiny_data["rec"]).image_keys[:32])
    it = FaceImageIter(tiny_data["rec"], 32, shuffle=False, rand_mirror=False, cutoff=30, seed=2)
    data, _ = it.next_numpy()
    changed = 0
    for d, r in zip(data, ref):
        diff = d != r
        if diff.any():
            changed += 1
            assert np.all(d[diff] == 127)  # only the erased square differs, and it is grey
            ys, xs = np.nonzero(diff.any(0))
            assert ys.max() - ys.min() < 30 and xs.max() - xs.min() < 30
    assert 4 < changed < 28
    it = FaceImageIter(tiny_data["rec"], 32, shuffle=False, rand_mirror=False, color_jitter=0.4, seed=2)
    data, _ = it.next_numpy()
    assert data.min() >= 0 and data.max() <= 255 and not np.allclose(data, ref)
    # brightness/contrast/saturation keep the picture: still strongly correlated with the plain decode
    assert np.corrcoef(data[0].ravel(), ref[0].ravel())[0, 1] > 0.8


def test_images_filter_and_triplet_batches(tmp_path, tiny_data):
    rng = np.random.RandomState(0)
    r = RecordReader(tiny_data["rec"])
    samples = [(c, r.read(k)[1]) for c in range(6) for k in r.image_keys[c * 8:c * 8 + (2 if c % 2 else 8)]]
    write_dataset(str(tmp_path), samples, num_classes=6)
    it = FaceImageIter(str(tmp_path / "train.rec"), 4, images_filter=3, seed=0)
    assert it.num_images == 24 and it.num_classes == 6
    labels = np.concatenate([b.label[0].asnumpy() for b in it])
    assert set(labels) == {0, 2, 4}
    t = FaceImageIter(tiny_data["rec"], 12, images_per_identity=4, seed=int(rng.randint(100)))
    assert t.num_batches == 4
    for b in t:
        lab = b.label[0].asnumpy().reshape(3, 4)
        assert np.all(lab == lab[:, :1]) and len(set(lab[:, 0])) == 3
    with pytest.raises(ToolkitError, match="not a multiple of images_per_identity 5"):
        FaceImageIter(tiny_data["rec"], 12, images_per_identity=5)


def test_undecodable_record_is_skipped_and_counted(tmp_path, tiny_data, caplog):
    r = RecordReader(tiny_data["rec"])
    samples = [(int(r.labels([k])[0]), r.read(k)[1]) for k in r.image_keys[:32]]
    samples[3] = (samples[3][0], b"\xff\xd8\xff not really a jpeg")
    write_dataset(str(tmp_path), samples, num_classes=12)
    it = FaceImageIter(str(tmp_path / "train.rec"), 8, shuffle=False, rand_mirror=False, seed=0)
    with caplog.at_level("WARNING"):
        batches = [b for b in it]
    assert len(batches) == 4 and it.num_skipped == 1
    assert sum("record 4 is not a decodable image" in m for m in caplog.messages) == 1
    first = batches[0].data[0].asnumpy()
    np.testing.assert_array_equal(first[3], first[4])  # replaced by the next decodable image


def _copy(tiny_data, tmp_path):
    src = os.path.dirname(tiny_data["rec"])
    for f in ("train.rec", "train.idx", "property"):
        shutil.copy(os.path.join(src, f), tmp_path / f)
    return str(tmp_path / "train.rec")


def test_bad_inputs(tmp_path, tiny_data):
    rec = _copy(tiny_data, tmp_path)
    write_property(str(tmp_path), 5)
    with pytest.raises(ToolkitError, match=r"train\.rec: label 11 >= num_classes 5 from .*property"):
        FaceImageIter(rec, 8)
    write_property(str(tmp_path), 13)
    with pytest.raises(ToolkitError, match="12 identity records but .*property says 13 classes"):
        FaceImageIter(rec, 8)
    os.remove(tmp_path / "property")
    with pytest.raises(ToolkitError, match="property file does not exist"):
        FaceImageIter(rec, 8)
    write_property(str(tmp_path), 12)
    os.remove(tmp_path / "train.idx")
    with pytest.raises(ToolkitError, match=r"train\.idx: index file does not exist"):
        FaceImageIter(rec, 8)
    open(tmp_path / "train.idx", "w").close()
    open(rec, "wb").close()
    with pytest.raises(ToolkitError, match="empty record file"):
        FaceImageIter(rec, 8)
