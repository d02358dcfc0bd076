"""Linear probe: features vs an independent forward pass, sklearn agreement, probe file round trip, CLI errors."""
import os
import pickle

import cv2
import numpy as np
import pytest

from recognition.common import ToolkitError, load_checkpoint, run_cli


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A seeded random-init ``tiny`` checkpoint (output fc1_output): ``PREFIX``, epoch 0."""
    import mxnet as mx

    from recognition.backbones import get_symbol
    from recognition.common import save_checkpoint

    sym = get_symbol("tiny")
    mx.random.seed(3)
    mod = mx.mod.Module(sym, data_names=["data"], label_names=None)
    mod.bind([("data", (1, 3, 112, 112))], for_training=False)
    mod.init_params(mx.init.Xavier(magnitude=2.0))
    arg, aux = mod.get_params()
    prefix = str(tmp_path_factory.mktemp("probe_ckpt") / "model")
    save_checkpoint(prefix, 0, sym, arg, aux)
    return prefix


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory):
    from datasets.synth import generate_dataset

    out = tmp_path_factory.mktemp("probe_data")
    return generate_dataset(str(out), num_classes=5, images_per_class=6, num_holdout=2, holdout_images=2,
                            num_pairs=4, seed=1)


def _rec_images(rec):
    """All images of a rec, decoded independently with mxnet's recordio: (uint8 (N,3,112,112) RGB, labels)."""
    import mxnet as mx

    r = mx.recordio.MXIndexedRecordIO(rec[:-4] + ".idx", rec, "r")
    header0, _ = mx.recordio.unpack(r.read_idx(0))
    imgs, labels = [], []
    for key in range(1, int(header0.label[0])):
        h, payload = mx.recordio.unpack(r.read_idx(key))
        bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        imgs.append(bgr[:, :, ::-1].transpose(2, 0, 1))
        labels.append(int(h.label))
    r.close()
    return np.stack(imgs), np.array(labels)


def _bind_output(prefix, node_name, x):
    """Forward ``x`` through the checkpoint cut at ``node_name`` with a plain executor (no toolkit code)."""
    import mxnet as mx

    sym = mx.sym.load(prefix + "-symbol.json").get_internals()[node_name]
    save = mx.nd.load(prefix + "-0000.params")
    args = {k[4:]: v for k, v in save.items() if k.startswith("arg:") and k[4:] in sym.list_arguments()}
    auxs = {k[4:]: v for k, v in save.items() if k.startswith("aux:")
            and k[4:] in sym.list_auxiliary_states()}
    args["data"] = mx.nd.array(x.astype(np.float32))
    ex = sym.bind(mx.cpu(), args, aux_states=auxs, grad_req="null")
    return ex.forward(is_train=False)[0].asnumpy()


def test_layer_pooling_equals_numpy_mean(tiny_ckpt, probe_data):
    from recognition.features import FeatureExtractor

    images, _ = _rec_images(probe_data["rec"])
    x = images[:5].astype(np.float32)
    fx = FeatureExtractor.from_checkpoint(tiny_ckpt, 0, "stage3_unit1_relu1", batch_size=4)
    assert fx.layer == "stage3_unit1_relu1_output"
    full = _bind_output(tiny_ckpt, "stage3_unit1_relu1_output", x)
    assert full.ndim == 4
    np.testing.assert_allclose(fx(x), full.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)
    emb = FeatureExtractor.from_checkpoint(tiny_ckpt, 0, batch_size=4)(x, flip=True)
    ref = _bind_output(tiny_ckpt, "fc1_output", x) + _bind_output(tiny_ckpt, "fc1_output", x[:, :, :, ::-1])
    np.testing.assert_allclose(emb, ref, rtol=1e-4, atol=1e-4)


def test_unknown_layer_lists_close_names(tiny_ckpt):
    from recognition.features import FeatureExtractor

    with pytest.raises(ToolkitError, match=r"--layer 'stage3_unit1_relu9_output': no such layer.*"
                                           r"close names: .*stage3_unit1_relu1_output"):
        FeatureExtractor.from_checkpoint(tiny_ckpt, 0, "stage3_unit1_relu9_output")


def test_stratified_split():
    from recognition.linear_probe import stratified_split

    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    tr, va = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(16))
    assert np.bincount(labels[va], minlength=3).tolist() == [2, 1, 0]
    np.testing.assert_array_equal(va, stratified_split(labels, 0.2, seed=0)[1])  # seeded
    with pytest.raises(ToolkitError, match="--val-split 1.5"):
        stratified_split(labels, 1.5)


@pytest.mark.parametrize("classifier", ["logreg", "svm"])
def test_probe_matches_sklearn_on_independent_features(tiny_ckpt, probe_data, tmp_path, classifier):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from recognition import linear_probe as lp

    data_dir = os.path.dirname(probe_data["rec"])
    out = str(tmp_path / "probe.pkl")
    assert run_cli(lp.main, ["train", "--model", f"{tiny_ckpt},0", "--data", data_dir, "--classifier", classifier,
                             "--output", out]) == 0
    probe = lp.load_probe(out)
    assert probe["layer"] == "fc1_output" and probe["class_names"] == [str(i) for i in range(5)]

    images, labels = _rec_images(probe_data["rec"])
    feats = _bind_output(tiny_ckpt, "fc1_output", images)
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    train_idx, val_idx = lp.stratified_split(labels, 0.2, seed=0)
    clf = LogisticRegression(max_iter=2000, random_state=0) if classifier == "logreg" \
        else LinearSVC(max_iter=5000, random_state=0)
    ref = make_pipeline(StandardScaler(), clf).fit(feats[train_idx], labels[train_idx])
    assert probe["val_acc"] == pytest.approx(np.mean(ref.predict(feats[val_idx]) == labels[val_idx]))

    names, scores, ids = lp.predict_images(probe, images[:8])
    np.testing.assert_array_equal(ids, ref.predict(feats[:8]))
    assert names == [str(i) for i in ids]
    if classifier == "logreg":
        np.testing.assert_allclose(scores, ref.predict_proba(feats[:8]).max(axis=1), rtol=1e-3, atol=1e-4)


def test_predict_cli_images_and_labelled(tiny_ckpt, probe_data, tmp_path, capsys):
    import json

    from recognition import linear_probe as lp

    data_dir = os.path.dirname(probe_data["rec"])
    out = str(tmp_path / "probe.pkl")
    assert run_cli(lp.main, ["train", "--model", f"{tiny_ckpt},0", "--data", data_dir, "--layer",
                             "stage2_unit1_relu1_output", "--val-split", "0", "--output", out]) == 0
    assert "val acc n/a" in capsys.readouterr().out
    images, labels = _rec_images(probe_data["rec"])
    paths = []
    for i in (0, 7):
        p = str(tmp_path / f"face{i}.png")  # lossless: same pixels as the rec decode
        cv2.imwrite(p, images[i].transpose(1, 2, 0)[:, :, ::-1])
        paths.append(p)
    assert run_cli(lp.main, ["predict", "--probe", out, "--images"] + paths + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    names, _, _ = lp.predict_images(lp.load_probe(out), images[[0, 7]])
    assert [g["name"] for g in got["predictions"]] == names
    assert run_cli(lp.main, ["predict", "--probe", out, "--data", data_dir]) == 0
    text = capsys.readouterr().out
    # --val-split 0: the labelled set is the training set, so predict's accuracy is train's training accuracy
    assert f"accuracy {lp.load_probe(out)['train_acc']:.4f} on 30 labelled images" in text
    assert text.splitlines()[0].startswith("1\t")  # record key, top-1 name, probability


def test_cli_errors(tiny_ckpt, probe_data, tmp_path, capsys):
    from recognition import linear_probe as lp

    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as f:
        pickle.dump({"something": 1}, f)
    assert run_cli(lp.main, ["predict", "--probe", str(bad), "--images", "x.jpg"]) == 2
    assert "not a linear probe file" in capsys.readouterr().err
    assert run_cli(lp.main, ["train", "--model", f"{tiny_ckpt},3", "--data", str(tmp_path), "--output",
                             str(tmp_path / "p.pkl")]) == 2
    assert "-0003.params does not exist" in capsys.readouterr().err
    assert run_cli(lp.main, ["train", "--model", f"{tiny_ckpt},0", "--data", str(tmp_path / "nope"), "--output",
                             str(tmp_path / "p.pkl")]) == 2
    assert "neither a folder nor a .rec" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p.pkl")


def test_folder_data_matches_rec(tiny_ckpt, probe_data, tmp_path):
    """A folder of identity sub-folders gives the same features and labels as the rec it came from."""
    from recognition.features import FeatureExtractor, LabelledImages, extract

    images, labels = _rec_images(probe_data["rec"])
    for i, (img, lab) in enumerate(zip(images, labels)):
        folder = tmp_path / f"person{lab:02d}"
        folder.mkdir(exist_ok=True)
        cv2.imwrite(str(folder / f"{i:03d}.png"), img.transpose(1, 2, 0)[:, :, ::-1])
    fx = FeatureExtractor(*load_checkpoint(tiny_ckpt, 0), batch_size=8)
    folder_data, rec_data = LabelledImages(str(tmp_path)), LabelledImages(os.path.dirname(probe_data["rec"]))
    assert folder_data.class_names == [f"person{i:02d}" for i in range(5)]
    np.testing.assert_array_equal(folder_data.labels, rec_data.labels)
    np.testing.assert_allclose(extract(fx, folder_data), extract(fx, rec_data), rtol=1e-5, atol=1e-5)
    rec_data.close()


def test_unknown_threshold_is_the_quantile_of_correct_validation_scores():
    from recognition.linear_probe import unknown_threshold

    rng = np.random.RandomState(0)
    scores, correct = rng.rand(200), rng.rand(200) < 0.8
    for rate in (0.95, 0.5, 1.0):
        ref = np.percentile(scores[correct], 100 * (1 - rate), method="lower")
        assert unknown_threshold(scores, correct, rate) == ref
    assert unknown_threshold(scores, np.zeros(200, bool)) is None


def test_open_set_unknown_under_the_probe_threshold(tiny_ckpt, probe_data, tmp_path, capsys):
    """train sets unknown_threshold from its validation split (checked against an independent sklearn fit);
    predict answers 'unknown' under it, --threshold overrides, 0 turns it off."""
    import json

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from recognition import linear_probe as lp

    data_dir = os.path.dirname(probe_data["rec"])
    out = str(tmp_path / "probe.pkl")
    assert run_cli(lp.main, ["train", "--model", f"{tiny_ckpt},0", "--data", data_dir, "--val-split", "0.5",
                             "--accept-rate", "0.5", "--output", out]) == 0
    assert "'unknown' under score" in capsys.readouterr().out
    probe = lp.load_probe(out)
    images, labels = _rec_images(probe_data["rec"])
    feats = _bind_output(tiny_ckpt, "fc1_output", images)
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    tr, va = lp.stratified_split(labels, 0.5, seed=0)
    ref = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0)).fit(feats[tr],
                                                                                               labels[tr])
    proba = ref.predict_proba(feats[va])
    good = proba.argmax(1) == labels[va]
    expected = np.percentile(proba.max(1)[good], 50, method="lower")
    assert probe["unknown_threshold"] == pytest.approx(expected, rel=1e-3)

    names, scores, ids = lp.predict_features(probe, feats)
    open_names, _, open_ids = lp.predict_features(probe, feats, probe["unknown_threshold"])
    under = scores < probe["unknown_threshold"]
    assert under.any() and not under.all()
    assert open_names == [lp.UNKNOWN if u else n for n, u in zip(names, under)]
    np.testing.assert_array_equal(open_ids, np.where(under, -1, ids))

    assert run_cli(lp.main, ["predict", "--probe", out, "--data", data_dir, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["threshold"] == probe["unknown_threshold"]
    assert sum(p["name"] == "unknown" for p in got["predictions"]) == int(
        (np.asarray([p["probability"] for p in got["predictions"]]) < probe["unknown_threshold"]).sum()) > 0
    assert run_cli(lp.main, ["predict", "--probe", out, "--data", data_dir, "--json", "--threshold", "0"]) == 0
    assert all(p["name"] != "unknown" for p in json.loads(capsys.readouterr().out)["predictions"])
    assert run_cli(lp.main, ["predict", "--probe", out, "--data", data_dir, "--threshold", "1.01"]) == 0
    text = capsys.readouterr().out
    assert "(30 answered unknown under 1.0100)" in text  # a probability never reaches 1.01


def test_rec_names_from_classes_txt(probe_data, tmp_path, caplog):
    import shutil

    from recognition.features import LabelledImages

    for name in ("train.rec", "train.idx", "property"):
        shutil.copy(os.path.join(os.path.dirname(probe_data["rec"]), name), tmp_path / name)
    names = ["ada", "bob", "cy", "dee", "eve"]
    (tmp_path / "classes.txt").write_text("".join(n + "\n" for n in names))
    data = LabelledImages(str(tmp_path))
    assert data.class_names == names
    data.close()
    (tmp_path / "classes.txt").write_text("ada\nbob\n")
    data = LabelledImages(str(tmp_path))
    assert data.class_names == [str(i) for i in range(5)]
    data.close()
    assert "has 2 names for 5 classes; using class numbers" in caplog.text
