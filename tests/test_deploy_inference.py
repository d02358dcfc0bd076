"""Deploy inference: FaceModel, extract (resumable), compare, search, align; bad inputs by message and exit code."""
import os

import cv2
import mxnet as mx
import numpy as np
import pytest
from test_verification import tiny_symbol  # noqa: E402 (one small test network; tests/ is on sys.path)

from deploy import align, compare, extract, search
from deploy.face_model import FaceModel
from recognition.common import ToolkitError, run_cli, save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A slim and a full (fc7) checkpoint with the same backbone weights; returns (slim, full, sym, args, aux)."""
    folder = tmp_path_factory.mktemp("ckpt")
    sym = tiny_symbol()
    rng = np.random.RandomState(0)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1, 3, 112, 112))
    args = {n: mx.nd.array(rng.normal(0, 0.3, s)) for n, s in zip(sym.list_arguments(), arg_shapes) if n != "data"}
    aux = {n: mx.nd.array(rng.uniform(0.5, 1.5, s)) for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
    save_checkpoint(str(folder / "slim"), 0, sym, args, aux)
    full_args = dict(args, fc7_weight=mx.nd.array(rng.normal(size=(7, 16))), fc7_bias=mx.nd.zeros(7))
    save_checkpoint(str(folder / "full"), 3, tiny_symbol(with_fc7=7), full_args, aux)
    return f"{folder}/slim,0", f"{folder}/full,3", sym, args, aux


def faces(n, seed=0, size=112):
    """Smooth random 'faces' (low-frequency colour fields) so that JPEG/PNG round trips stay close."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 256, (n, 8, 8, 3)).astype(np.uint8)
    return np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_CUBIC) for s in small])


def write_rgb(path, img):
    assert cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return str(path)


def reference_features(sym, args, aux, imgs, flip=True):
    """Independent path: one executor over all images, flip-sum and normalise in numpy."""
    x = imgs.transpose(0, 3, 1, 2).astype(np.float32)
    exe = sym.simple_bind(mx.cpu(), data=x.shape, grad_req="null")
    exe.copy_params_from(args, aux)
    e = exe.forward(is_train=False, data=mx.nd.array(x))[0].asnumpy().copy()
    if flip:
        e = e + exe.forward(is_train=False, data=mx.nd.array(x[:, :, :, ::-1].copy()))[0].asnumpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def make_people(root, names, per_id, seed=0):
    """root/<name>/<i>.png from smooth random faces; returns {name: [images]}."""
    out = {}
    for k, name in enumerate(names):
        os.makedirs(root / name, exist_ok=True)
        imgs = faces(per_id, seed=seed + 100 * k)
        out[name] = imgs
        for i, im in enumerate(imgs):
            write_rgb(root / name / f"{i}.png", im)
    return out


# ------------------------------------------------------------------------------------------------ FaceModel
def test_face_model_flip_sum_matches_manual(ckpt, tmp_path):
    slim, full, sym, args, aux = ckpt
    imgs = faces(5, seed=1)
    model = FaceModel(slim, batch_size=2)
    feats = model.get_features(list(imgs))
    np.testing.assert_allclose(feats, reference_features(sym, args, aux, imgs), atol=1e-5)
    assert feats.dtype == np.float32 and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    no_flip = FaceModel(slim, flip=False, batch_size=3).get_features(list(imgs))
    np.testing.assert_allclose(no_flip, reference_features(sym, args, aux, imgs, flip=False), atol=1e-5)
    # files are read as BGR by OpenCV and must be converted: PNG is lossless, so equal to the arrays
    paths = [write_rgb(tmp_path / f"{i}.png", im) for i, im in enumerate(imgs)]
    np.testing.assert_allclose(model.get_features(paths, batch_size=4), feats, atol=1e-6)
    assert model.get_feature(paths[0]).shape == (16,)
    # a full training checkpoint (fc7 + softmax) gives the same embedding
    np.testing.assert_allclose(FaceModel(full).get_features(list(imgs)), feats, atol=1e-6)


def test_face_model_bad_inputs(ckpt, tmp_path):
    model = FaceModel(ckpt[0])
    big = faces(1, size=128)[0]
    with pytest.raises(ToolkitError, match="image is 128x128, the model takes aligned 112x112"):
        model.get_feature(big)
    resized = FaceModel(ckpt[0], resize=True).get_feature(big)
    assert resized.shape == (16,) and np.isfinite(resized).all()
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ToolkitError, match=f"{bad}: cannot read image"):
        model.get_feature(str(bad))
    with pytest.raises(ToolkitError, match="--model: checkpoint file .*nope-0000.params does not exist"):
        FaceModel(f"{tmp_path}/nope,0")


# -------------------------------------------------------------------------------------------------- extract
def test_extract_folder_resumes_and_skips_unreadable(ckpt, tmp_path):
    people = make_people(tmp_path / "people", ["ann", "bob", "cid"], 3)
    (tmp_path / "people" / "bob" / "9_corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
    model = FaceModel(ckpt[0], batch_size=2)
    out = str(tmp_path / "feats")
    r1 = extract.extract(model, str(tmp_path / "people"), out, chunk_size=4)
    assert (r1["num_images"], r1["num_skipped"], r1["chunks_done"], r1["chunks_reused"]) == (9, 1, 3, 0)
    emb = np.load(r1["embeddings"])
    index = extract.load_index(r1["index"])
    assert [n for n, _, _ in index] == ["ann"] * 3 + ["bob"] * 3 + ["cid"] * 3
    assert [lab for _, lab, _ in index] == [0] * 3 + [1] * 3 + [2] * 3
    expected = model.get_features(list(np.concatenate([people[n] for n in ("ann", "bob", "cid")])))
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert open(os.path.join(out, "skipped.txt")).read().strip().endswith("9_corrupt.jpg")
    # second run: everything reused, same bytes
    r2 = extract.extract(model, str(tmp_path / "people"), out, chunk_size=4)
    assert (r2["chunks_done"], r2["chunks_reused"]) == (0, 3)
    np.testing.assert_array_equal(np.load(r2["embeddings"]), emb)
    # an interrupted run (one chunk missing) recomputes only that chunk
    os.remove(os.path.join(out, "chunks", "chunk_000001.npz"))
    r3 = extract.extract(model, str(tmp_path / "people"), out, chunk_size=4)
    assert (r3["chunks_done"], r3["chunks_reused"]) == (1, 2)
    np.testing.assert_allclose(np.load(r3["embeddings"]), emb, atol=1e-6)
    with pytest.raises(ToolkitError, match="different input, model or --chunk-size"):
        extract.extract(model, str(tmp_path / "people"), out, chunk_size=5)


def test_extract_list_file_and_rec_agree(ckpt, tmp_path):
    from recognition.rec import write_dataset

    imgs = faces(4, seed=7)
    paths = [write_rgb(tmp_path / f"p{i}.png", im) for i, im in enumerate(imgs)]
    labels = [0, 0, 1, 1]
    lst = tmp_path / "faces.lst"
    lst.write_text("".join(f"1\t{os.path.basename(p)}\t{lab}\n" for p, lab in zip(paths, labels)))
    model = FaceModel(ckpt[0])
    r_list = extract.extract(model, str(lst), str(tmp_path / "o1"))
    pngs = [cv2.imencode(".png", cv2.cvtColor(im, cv2.COLOR_RGB2BGR))[1].tobytes() for im in imgs]
    write_dataset(str(tmp_path / "rec"), list(zip(labels, pngs)), num_classes=2)
    r_rec = extract.extract(model, str(tmp_path / "rec"), str(tmp_path / "o2"))
    np.testing.assert_allclose(np.load(r_list["embeddings"]), np.load(r_rec["embeddings"]), atol=1e-6)
    assert [lab for _, lab, _ in extract.load_index(r_rec["index"])] == labels


def test_extract_cli(ckpt, tmp_path, capsys):
    make_people(tmp_path / "people", ["a", "b"], 2)
    rc = run_cli(extract.main, ["--model", ckpt[0], "--input", str(tmp_path / "people"), "--output",
                                str(tmp_path / "o"), "--no-progress", "--chunk-size", "3"])
    assert rc == 0 and "4 embeddings" in capsys.readouterr().out
    assert run_cli(extract.main, ["--model", ckpt[0], "--input", str(tmp_path / "nothing"), "--output",
                                  str(tmp_path / "o")]) == 2
    assert "--input" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ compare / search
def test_compare_faces_and_cli(ckpt, tmp_path, capsys):
    model = FaceModel(ckpt[0])
    a, b = faces(2, seed=11)
    same = compare.compare_faces(model, a, a.copy(), threshold=0.5)
    assert same["same"] and abs(same["cosine"] - 1) < 1e-5 and same["dist"] < 1e-5
    r = compare.compare_faces(model, a, b, threshold=0.5)
    fa, fb = model.get_feature(a), model.get_feature(b)
    assert abs(r["cosine"] - float(fa @ fb)) < 1e-5 and abs(r["dist"] - float(((fa - fb) ** 2).sum())) < 1e-5
    assert abs(r["dist"] - (2 - 2 * r["cosine"])) < 1e-5
    pa, pb = write_rgb(tmp_path / "a.png", a), write_rgb(tmp_path / "b.png", b)
    assert run_cli(compare.main, ["--model", ckpt[0], pa, pb, "--threshold", "0.5"]) == 0
    assert f"cosine {r['cosine']:.5f}" in capsys.readouterr().out
    assert run_cli(compare.main, ["--model", ckpt[0], pa, str(tmp_path / "none.jpg")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.jpg'}: cannot read image " \
                                      "(missing, unreadable or not an image)\n"
    assert run_cli(compare.main, ["--model", ckpt[0], pa, pb, "--threshold", "7"]) == 2


def test_search_topk_and_rank1(ckpt, tmp_path, capsys):
    names = ["ann", "bob", "cid", "dan"]
    people = make_people(tmp_path / "gallery", names, 3, seed=0)
    model = FaceModel(ckpt[0])
    # 'all' mode, probes are the gallery images themselves: each finds itself first
    g_all = search.build_gallery(model, str(tmp_path / "gallery"), "all")
    os.symlink(tmp_path / "gallery", tmp_path / "probe")
    acc, n = search.rank1_accuracy(model, g_all, str(tmp_path / "probe"))
    assert (acc, n) == (1.0, 12)
    # 'mean' mode top-k against a brute-force numpy ranking of cosine to normalised class means
    g_mean = search.build_gallery(model, str(tmp_path / "gallery"), "mean")
    emb = {k: model.get_features(list(v)) for k, v in people.items()}
    means = np.stack([emb[k].mean(0) / np.linalg.norm(emb[k].mean(0)) for k in names])
    q = model.get_features(list(faces(3, seed=99)))
    for row, qv in zip(g_mean.search(q, top_k=3), q):
        cos = means @ qv
        order = np.argsort(-cos)[:3]
        assert [nm for nm, _ in row] == [names[i] for i in order]
        np.testing.assert_allclose([s for _, s in row], cos[order], atol=1e-5)
    # 'all' mode returns distinct identities with their best image's score
    row = g_all.search(q[:1], top_k=4)[0]
    best = {k: float((emb[k] @ q[0]).max()) for k in names}
    assert sorted(nm for nm, _ in row) == sorted(names)
    for nm, s in row:
        assert abs(s - best[nm]) < 1e-5
    # gallery .npz round trip through the CLI
    npz = str(tmp_path / "g.npz")
    assert run_cli(search.main, ["--model", ckpt[0], "--gallery", str(tmp_path / "gallery"), "--save-gallery", npz,
                                 "--probe", str(tmp_path / "probe"), "--mode", "all"]) == 0
    assert "rank-1 accuracy 1.0000 on 12 probe images" in capsys.readouterr().out
    loaded = search.Gallery.load(npz)
    np.testing.assert_allclose(loaded.embeddings, g_all.embeddings, atol=1e-7)
    assert run_cli(search.main, ["--model", ckpt[0], "--gallery", npz, "--query", str(tmp_path / "gallery/ann/0.png"),
                                 "--top-k", "2"]) == 0
    assert "\tann:1.0000" in capsys.readouterr().out
    os.makedirs(tmp_path / "strangers" / "eve")
    write_rgb(tmp_path / "strangers" / "eve" / "0.png", faces(1)[0])
    assert run_cli(search.main, ["--model", ckpt[0], "--gallery", npz, "--probe", str(tmp_path / "strangers")]) == 2
    assert "probe identities not in the gallery: eve" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- align
def test_similarity_estimate_recovers_known_transform():
    rng = np.random.RandomState(0)
    src = rng.uniform(0, 100, (5, 2))
    theta, s, t = 0.3, 1.7, np.array([12.0, -5.0])
    rot = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = align.umeyama_similarity(src, src @ rot.T + t)
    np.testing.assert_allclose(m, np.c_[rot, t], atol=1e-9)
    m_cv, _ = cv2.estimateAffinePartial2D(src, src @ rot.T + t)  # second implementation
    np.testing.assert_allclose(m, m_cv, atol=1e-6)


def test_align_round_trip(tmp_path, capsys):
    face = faces(1, seed=5)[0]
    theta, s, t = np.deg2rad(20.0), 1.6, np.array([60.0, 40.0])
    a = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    m = np.c_[a, t]  # aligned crop -> photo coordinates
    photo = cv2.warpAffine(face, m, (300, 300), flags=cv2.INTER_CUBIC)
    landmarks = align.ARCFACE_REFERENCE @ a.T + t
    back = align.norm_crop(photo, landmarks)
    assert back.shape == (112, 112, 3)
    inner = (slice(8, 104), slice(8, 104))
    err = np.abs(back[inner].astype(float) - face[inner].astype(float)).mean()
    assert err < 2.0, err
    other = np.abs(back[inner].astype(float) - faces(1, seed=6)[0][inner].astype(float)).mean()
    assert other > 10 * err  # the comparison is sensitive
    # through the command
    src = write_rgb(tmp_path / "photo.png", photo)
    out = str(tmp_path / "aligned.png")
    lm = ",".join(f"{v:.4f}" for v in landmarks.ravel())
    assert run_cli(align.main, ["--image", src, "--landmarks", lm, "--output", out]) == 0
    got = cv2.cvtColor(cv2.imread(out), cv2.COLOR_BGR2RGB)
    assert np.abs(got[inner].astype(float) - back[inner].astype(float)).max() <= 1
    assert run_cli(align.main, ["--image", src, "--landmarks", "1,2,3", "--output", out]) == 2
    assert "expected 10 landmark numbers (5 points), got 3" in capsys.readouterr().err


@pytest.mark.parametrize("module", [compare, extract, search, align])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
