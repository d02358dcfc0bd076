"""FaceImageIter(augment=...): a datasets.shift kind per image with probability p, seeded and exactly resumable."""
import numpy as np
import pytest

from recognition.common import ToolkitError
from recognition.image_iter import FaceImageIter


def _batches(it, n):
    out = [it.next_numpy() for _ in range(n)]
    it.close()
    return out


def test_grey_always_equals_numpy_luma_of_the_plain_batch(tiny_data):
    kw = dict(batch_size=16, shuffle=True, rand_mirror=True, seed=3, num_workers=2)
    plain = _batches(FaceImageIter(tiny_data["rec"], **kw), 3)
    grey = _batches(FaceImageIter(tiny_data["rec"], augment="grey@1", **kw), 3)
    for (x, y), (gx, gy) in zip(plain, grey):
        assert np.array_equal(y, gy)  # same order, labels; mirror draws unchanged by the extra stream
        luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # RGB planes of the un-augmented images
        for c in range(3):
            assert np.abs(gx[:, c] - luma).max() <= 0.51


def test_probability_share_and_determinism(tiny_data):
    kw = dict(batch_size=32, seed=5, augment="mask@0.7:0.5")
    plain = _batches(FaceImageIter(tiny_data["rec"], batch_size=32, seed=5), 2)
    a = _batches(FaceImageIter(tiny_data["rec"], num_workers=2, **kw), 2)
    b = _batches(FaceImageIter(tiny_data["rec"], num_workers=0, **kw), 2)
    changed = 0
    for (px, _), (ax, _), (bx, _) in zip(plain, a, b):
        assert np.array_equal(ax, bx)  # threads do not matter
        changed += int(np.sum(np.any(px != ax, axis=(1, 2, 3))))
    assert 16 <= changed <= 48  # about half of 64 images (p = 0.5; binomial 99.99% range)


def test_resume_is_exact_with_augment(tiny_data):
    kw = dict(batch_size=16, seed=11, augment="lowres@0.8+jpeg@0.5:0.7", cutoff=20)
    full = _batches(FaceImageIter(tiny_data["rec"], **kw), 4)
    first = FaceImageIter(tiny_data["rec"], **kw)
    _batches_first = [first.next_numpy() for _ in range(2)]
    state = first.get_state()
    first.close()
    resumed = FaceImageIter(tiny_data["rec"], **dict(kw, seed=0))
    resumed.set_state(state)
    rest = _batches(resumed, 2)
    for (x, y), (rx, ry) in zip(full[2:], rest):
        assert np.array_equal(x, rx) and np.array_equal(y, ry)
    assert np.array_equal(full[0][0], _batches_first[0][0])


def test_bad_augment_is_one_clear_error(tiny_data):
    with pytest.raises(ToolkitError, match="shift kind 'snow'"):
        FaceImageIter(tiny_data["rec"], 8, augment="snow:0.5")
    with pytest.raises(ToolkitError, match=r"probability 2.0 must be in \(0, 1\]"):
        FaceImageIter(tiny_data["rec"], 8, augment="mask:2")
