"""Shared test fixtures: the real checkpoint in ../shared/fixtures (skipped when absent) and tiny generated data."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("IFR_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))


@pytest.fixture(scope="session")
def shared_dir():
    """``../shared/fixtures`` (skip the test where a clone has no ../shared)."""
    path = os.path.join(SHARED, "fixtures")
    if not os.path.isdir(path):
        pytest.skip("../shared/fixtures is absent")
    return path


@pytest.fixture(scope="session")
def fixture_model(shared_dir):
    """Prefix of the real insightface MobileFaceNet checkpoint (epoch 0)."""
    prefix = os.path.join(shared_dir, "model-y1-test2", "model")
    if not os.path.isfile(prefix + "-0000.params"):
        pytest.skip("model-y1-test2 fixture is absent")
    return prefix


@pytest.fixture(scope="session")
def params_contract():
    """insightface's parameter names and shapes per network (skip when absent)."""
    import json

    path = os.path.join(SHARED, "compat", "insightface_params.json")
    if not os.path.isfile(path):
        pytest.skip("../shared/compat is absent")
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small generated identity dataset in insightface form (12 classes x 8 images, one held-out .bin)."""
    from datasets.synth import generate_dataset

    out = tmp_path_factory.mktemp("tiny_data")
    return generate_dataset(str(out), num_classes=12, images_per_class=8, num_holdout=8, holdout_images=4,
                            num_pairs=60, seed=0)
