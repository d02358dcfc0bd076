"""datasets.synth: held-out pairs are not solvable from raw pixels or colour, while identities stay distinct.

No training here: the checks are numpy computations on generated ``.bin`` pairs, scored with insightface's
verification maths (``recognition.verification.evaluate``, best threshold over all pairs).
"""
import numpy as np
import pytest

from datasets import synth
from recognition.verification import evaluate, read_bin

NUM_PAIRS = 300
# chance plus three binomial standard deviations of an accuracy over NUM_PAIRS pairs, plus 0.05 for the geometry
# a pixel match legitimately sees (same face shape and hair layout): ~0.64
BOUND = 0.5 + 0.05 + 3 * np.sqrt(0.25 / NUM_PAIRS)


def _l2n(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pooled_pixels(images):
    """(N, 3, 112, 112) uint8 -> 4x4 average-pooled, flip-summed pixels (N, 3*28*28), L2-normalised."""
    n = len(images)
    p = images.astype(np.float32).reshape(n, 3, 28, 4, 28, 4).mean(axis=(3, 5))
    return _l2n((p + p[..., ::-1]).reshape(n, -1))


def mean_colour(images):
    """Mean RGB per image, centred over the set, L2-normalised: the colour cue alone."""
    m = images.astype(np.float64).mean(axis=(2, 3))
    return _l2n(m - m.mean(axis=0))


def _bin(tmp_path, domain, **nuisance):
    saved = {k: getattr(synth, k) for k in nuisance}
    try:
        for k, v in nuisance.items():
            setattr(synth, k, v)
        info = synth.generate_dataset(str(tmp_path / f"{domain}{len(nuisance)}"), num_classes=1, images_per_class=1,
                                      num_holdout=40, holdout_images=4, num_pairs=NUM_PAIRS, domain=domain, seed=5)
    finally:
        for k, v in saved.items():
            setattr(synth, k, v)
    return read_bin(info["bins"][0])


@pytest.mark.parametrize("domain", ["A", "B"])
def test_raw_pixels_and_colour_do_not_verify(tmp_path, domain):
    images, issame = _bin(tmp_path, domain)
    assert issame.sum() == NUM_PAIRS // 2
    pixels = evaluate(pooled_pixels(images), issame)["best_threshold_acc"]
    colour = evaluate(mean_colour(images), issame)["best_threshold_acc"]
    assert pixels < BOUND, (pixels, BOUND)
    assert colour < BOUND, (colour, BOUND)


def test_camera_response_is_what_hides_colour(tmp_path):
    """Without the per-image camera response and clutter the same people match by colour clearly better: the
    nuisance (not an absence of identity) keeps the pixel cues near chance."""
    plain_images, issame = _bin(tmp_path, "A", WHITE_BALANCE=0.0, BRIGHTNESS=(1.0, 1.0), GAMMA=(1.0, 1.0),
                                CLUTTER=(0, 0))
    images, issame2 = _bin(tmp_path, "A")
    assert np.array_equal(issame, issame2)
    plain = evaluate(pooled_pixels(plain_images), issame)["best_threshold_acc"]
    hidden = evaluate(pooled_pixels(images), issame)["best_threshold_acc"]
    assert plain > hidden + 0.03, (plain, hidden)
    # identities differ: each held-out person's own images are closer to each other than to other people's in
    # the nuisance-free rendering (mean same-pair vs different-pair distance)
    f = pooled_pixels(plain_images)
    d = np.sum((f[0::2] - f[1::2]) ** 2, axis=1)
    assert d[issame].mean() < d[~issame].mean()
