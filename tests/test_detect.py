"""MTCNN detection and raw-photo alignment: box maths against numpy references (no ../shared needed), then the
real detector on the real photos in ../shared/raw (skipped when absent)."""
import os
import shutil

import cv2
import numpy as np
import pytest

from deploy import mtcnn_boxes as mb
from deploy.detect import Face, MtcnnDetector, alignment_offsets, crop_faces, select_faces
from recognition.common import ToolkitError, run_cli, symbol_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("IFR_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))  # as conftest.py
RAW = os.path.join(SHARED, "raw")
MTCNN = os.path.join(SHARED, "models", "mtcnn")
LFW_PHOTOS = ["Nathalie_Baye_0002", "Rob_Lowe_0001", "Rob_Lowe_0002"]
# t1.jpg's six people, face centres (x, y) read off the photo by eye (the 1280x886 original)
T1_FACES = [(960, 130), (790, 410), (316, 212), (112, 330), (517, 337), (1178, 334)]


# ---------------------------------------------------------------- box maths, synthetic

def _reference_nms(boxes, threshold, mode):
    """Pairwise overlap matrix, then one greedy pass in score order with a suppression mask."""
    x1, y1, x2, y2, s = boxes.T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    iw = np.clip(np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]) + 1, 0, None)
    ih = np.clip(np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]) + 1, 0, None)
    inter = iw * ih
    over = inter / (np.minimum(area[:, None], area[None]) if mode == "min" else area[:, None] + area[None] - inter)
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for i in sorted(range(len(boxes)), key=lambda k: (-s[k], k)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= over[i] > threshold
    return keep


@pytest.mark.parametrize("mode", ["union", "min"])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_numpy_reference(mode, threshold):
    rng = np.random.RandomState(7)
    for _ in range(20):
        n = rng.randint(1, 60)
        xy = rng.uniform(0, 200, (n, 2))
        wh = rng.uniform(5, 80, (n, 2))
        boxes = np.column_stack([xy, xy + wh, rng.uniform(0, 1, n)])
        assert mb.nms(boxes, threshold, mode).tolist() == _reference_nms(boxes, threshold, mode)
    assert mb.nms(np.zeros((0, 5)), 0.5).size == 0
    with pytest.raises(ValueError, match="expected 'union' or 'min'"):
        mb.nms(boxes, 0.5, "iou")


def test_pnet_candidates_map_cells_to_image_windows():
    rng = np.random.RandomState(1)
    prob = rng.uniform(0, 0.5, (9, 13))
    prob[2, 3], prob[7, 11], prob[0, 0] = 0.9, 0.8, 0.65
    reg = rng.normal(0, 0.1, (4, 9, 13))
    scale = 0.37
    got = mb.pnet_candidates(prob, reg, scale, 0.6)
    rows = []
    for y in range(9):  # row-major, as the function returns them
        for x in range(13):
            if prob[y, x] > 0.6:
                rows.append([round((2 * x + 1) / scale), round((2 * y + 1) / scale), round((2 * x + 13) / scale),
                             round((2 * y + 13) / scale), prob[y, x], *reg[:, y, x]])
    np.testing.assert_allclose(got, np.array(rows, np.float32), rtol=1e-6)
    assert mb.pnet_candidates(prob, reg, scale, 0.95).shape == (0, 9)


def test_regress_square_and_pyramid():
    box = np.array([[10, 20, 29, 59, 0.9]], np.float32)  # 20 wide, 40 high (inclusive pixels)
    np.testing.assert_allclose(mb.regress(box, np.array([[0.1, -0.05, 0.2, 0.0]]))[0, :4], [12, 18, 33, 59])
    np.testing.assert_allclose(mb.to_square(box)[0], [0, 20, 39, 59, 0.9])  # 40x40 around the same centre
    # 100 px short side, 20 px faces: 12/20 = 0.6 first, then x0.709 while the short side stays >= 12 px
    np.testing.assert_allclose(mb.pyramid_scales(100, 300, 20, 0.709), [0.6 * 0.709 ** k for k in range(5)])
    assert mb.pyramid_scales(10, 10, 20, 0.709) == []


def test_crop_resized_zero_pads_outside_the_image():
    rng = np.random.RandomState(3)
    img = rng.randint(0, 256, (40, 50, 3)).astype(np.float32)
    boxes = np.array([[-10, -5, 19, 24], [30, 20, 59, 49], [5, 5, 14, 14]], np.float32)
    got = mb.crop_resized(img, boxes, 24)
    padded = np.pad(img, ((20, 20), (20, 20), (0, 0)))  # the same crops from an explicitly zero-padded image
    for g, (x1, y1, x2, y2) in zip(got, boxes.astype(int)):
        want = cv2.resize(padded[y1 + 20:y2 + 21, x1 + 20:x2 + 21], (24, 24), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(g, want, atol=1e-4)


def _face(x1, y1, x2, y2, score):
    return Face(np.array([x1, y1, x2, y2], np.float32), score, np.zeros((5, 2), np.float32))


def test_select_faces_rules():
    faces = [_face(0, 0, 30, 30, 0.99), _face(80, 40, 120, 80, 0.95), _face(150, 10, 199, 60, 0.9)]
    shape = (100, 200, 3)  # centre (99.5, 49.5): the second face's centre (100, 60) is nearest
    assert select_faces(faces, "largest", shape) == [faces[2]]
    assert select_faces(faces, "central", shape) == [faces[1]]
    assert select_faces(faces, "all", shape) == faces
    assert select_faces([], "largest", shape) == []
    with pytest.raises(ToolkitError, match="--faces 'biggest': choose one of largest, central, all"):
        select_faces(faces, "biggest", shape)


def _write_tiny_net(prefix, params=True):
    import mxnet as mx

    sym = mx.sym.Convolution(mx.sym.var("data"), num_filter=2, kernel=(3, 3), name="conv1")
    with open(prefix + "-symbol.json", "w") as f:
        f.write(symbol_json(sym))
    if params:
        mx.nd.save(prefix + "-0001.params", {"arg:conv1_weight": mx.nd.zeros((2, 3, 3, 3)),
                                             "arg:conv1_bias": mx.nd.zeros((2,))})


def test_bad_model_folder_is_one_line_naming_the_file(tmp_path, capsys):
    from deploy import compare

    with pytest.raises(ToolkitError, match="--detect .*nowhere: no such folder"):
        MtcnnDetector(str(tmp_path / "nowhere"))
    _write_tiny_net(str(tmp_path / "det1"))
    with pytest.raises(ToolkitError, match=r"det2-symbol\.json: MTCNN file missing"):
        MtcnnDetector(str(tmp_path))
    for name in ("det2", "det3"):
        _write_tiny_net(str(tmp_path / name))
    (tmp_path / "det1-0001.params").write_bytes(b"not params")
    with pytest.raises(ToolkitError, match=r"det1-0001\.params: not an MXNet params file"):
        MtcnnDetector(str(tmp_path))
    (tmp_path / "det1-symbol.json").write_text("{broken")
    with pytest.raises(ToolkitError, match=r"det1-symbol\.json: not an MXNet symbol file"):
        MtcnnDetector(str(tmp_path))
    _write_tiny_net(str(tmp_path / "det1"), params=False)
    import mxnet as mx

    mx.nd.save(str(tmp_path / "det1-0001.params"), {"arg:other": mx.nd.zeros((1,))})
    with pytest.raises(ToolkitError, match=r"det1-0001\.params: lacks 2 parameter\(s\) of det1"):
        MtcnnDetector(str(tmp_path))
    mx.nd.save(str(tmp_path / "det1-0001.params"), {"arg:conv1_weight": mx.nd.zeros((2, 3, 5, 5)),
                                                   "arg:conv1_bias": mx.nd.zeros((2,))})
    with pytest.raises(ToolkitError, match=r"det1-0001\.params: parameter shapes do not fit det1's graph: "
                                           r"conv1_weight \(2, 3, 5, 5\) \(graph: \(2, 3, 3, 3\)\)"):
        MtcnnDetector(str(tmp_path))
    with pytest.raises(ToolkitError, match="thresholds"):
        MtcnnDetector(str(tmp_path), thresholds=(0.6, 0.7, 1.5))
    # through a command: one line, exit 2 (the model is never loaded)
    rc = run_cli(compare.main, ["--model", "m,0", "--detect", str(tmp_path / "nowhere"), "a.jpg", "b.jpg"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nowhere: no such folder" in err[0]


# ---------------------------------------------------------------- the real detector on real photos

@pytest.fixture(scope="module")
def detector():
    if not (os.path.isfile(os.path.join(MTCNN, "det3-0001.params")) and os.path.isdir(RAW)):
        pytest.skip("../shared/models/mtcnn or ../shared/raw is absent")
    return MtcnnDetector(MTCNN)


def _photo(name):
    from deploy.face_model import read_image

    return read_image(os.path.join(RAW, name))


def test_group_photo_every_face_found(detector):
    faces = detector.detect(_photo("t1.jpg"))
    assert [f.score for f in faces] == sorted((f.score for f in faces), reverse=True)
    for cx, cy in T1_FACES:
        hits = [f for f in faces if f.box[0] <= cx <= f.box[2] and f.box[1] <= cy <= f.box[3]]
        assert len(hits) == 1 and hits[0].score > 0.98, (cx, cy, hits)
        lm = hits[0].landmarks  # eyes above the nose above the mouth corners, inside the box
        assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()
        assert np.all((lm >= hits[0].box[:2]) & (lm <= hits[0].box[2:]))
    # at the published thresholds one 20-pixel patch of lace also passes O-Net (0.84); 0.9 leaves the six people
    strict = MtcnnDetector(MTCNN, thresholds=(0.6, 0.7, 0.9)).detect(_photo("t1.jpg"))
    assert len(strict) == 6 and len(faces) <= 7


def test_single_face_and_no_face(detector):
    faces = detector.detect(_photo("image_T1.jpeg"))
    assert len(faces) == 1 and faces[0].score > 0.99
    assert detector.detect(_photo("view.jpg")) == []
    grey = cv2.cvtColor(_photo("Rob_Lowe_0001.jpg"), cv2.COLOR_RGB2GRAY)  # (H, W) input is accepted
    assert len(detector.detect(grey)) == 1


def test_detect_from_several_threads_equals_serial(detector):
    from concurrent.futures import ThreadPoolExecutor

    photos = [_photo(n + ".jpg") for n in LFW_PHOTOS] * 4
    serial = [detector.detect(p) for p in photos]
    with ThreadPoolExecutor(4) as pool:  # without the lock: wrong outputs or "Cannot find attribute shape"
        threaded = [f for _ in range(2) for f in pool.map(detector.detect, photos)]
    for a, b in zip(serial * 2, threaded):
        assert len(a) == len(b) == 1
        np.testing.assert_array_equal(a[0].landmarks, b[0].landmarks)


def test_alignment_lands_where_the_reference_aligner_put_the_face(detector):
    """Register each reference crop (another aligner, MTCNN landmarks) onto the toolkit's crop: the five template
    points may move by at most 3 crop pixels (measured: 2.4 at worst)."""
    for name in LFW_PHOTOS:
        crops = crop_faces(_photo(name + ".jpg"), detector.detect(_photo(name + ".jpg")), "largest")
        assert len(crops) == 1 and crops[0][0].shape == (112, 112, 3)
        dev = alignment_offsets(crops[0][0], _photo(os.path.join("aligned_reference", name + ".jpg")))
        assert dev.max() < 3.0, (name, dev)


def test_embedding_of_raw_photo_matches_reference_crop(detector, fixture_model):
    """y1 embeddings: toolkit crop vs the same photo's reference crop (measured 0.970-0.980) is far above two photos
    of one person (0.75-0.78) and different people (about 0)."""
    from deploy.face_model import FaceModel

    model = FaceModel(fixture_model + ",0")
    mine = model.get_features([crop_faces(_photo(n + ".jpg"), detector.detect(_photo(n + ".jpg")))[0][0]
                               for n in LFW_PHOTOS])
    ref = model.get_features([_photo(os.path.join("aligned_reference", n + ".jpg")) for n in LFW_PHOTOS])
    same_photo = np.sum(mine * ref, axis=1)
    assert same_photo.min() > 0.95, same_photo
    rob = float(mine[1] @ mine[2])
    assert 0.5 < rob < same_photo.min() - 0.1
    assert max(abs(float(mine[0] @ mine[1])), abs(float(mine[0] @ mine[2]))) < 0.2


def _src_tree(tmp_path):
    src = tmp_path / "photos"
    for person, files in {"rob": ["Rob_Lowe_0001.jpg", "view.jpg"], "group": ["t1.jpg"]}.items():
        (src / person).mkdir(parents=True)
        for f in files:
            shutil.copy(os.path.join(RAW, f), src / person / f)
    return src


def _read_report(out):
    with open(out / "align_report.tsv") as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    return {r[1]: (float(r[2]), np.array(r[3].split(","), float)) for r in rows}


def test_align_tool_writes_folder2rec_layout_and_lists_faceless_photos(detector, tmp_path, capsys, caplog):
    from datasets import align_faces, folder2rec

    src, out = _src_tree(tmp_path), tmp_path / "aligned"
    with caplog.at_level("INFO", logger="recognition"):
        assert run_cli(align_faces.main, ["--src", str(src), "--out", str(out), "--detector", MTCNN]) == 0
    stdout = capsys.readouterr().out
    assert "3 photos: 2 faces written" in stdout and "1 without a face" in stdout
    assert (out / "no_face.txt").read_text().split() == [str(src / "rob" / "view.jpg")]
    assert "view.jpg: no face found" in caplog.text and "t1.jpg: 7 faces, kept the largest" in caplog.text
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert written == ["group/t1.jpg", "rob/Rob_Lowe_0001.jpg"]
    assert cv2.imread(str(out / "rob" / "Rob_Lowe_0001.jpg")).shape == (112, 112, 3)
    largest = _read_report(out)["group/t1.jpg"][1]
    info = folder2rec.folder2rec(str(out), str(tmp_path / "rec"))  # ready for folder2rec as written
    assert info["num_images"] == 2 and info["num_classes"] == 2

    # --faces all (strict threshold: the six people) and central, on the group photo alone
    outs = {}
    for rule in ("all", "central"):
        outs[rule] = tmp_path / rule
        args = ["--src", str(src / "group"), "--out", str(outs[rule]), "--detector", MTCNN, "--faces", rule,
                "--det-threshold", "0.9"]
        with caplog.at_level("INFO", logger="recognition"):
            assert run_cli(align_faces.main, args) == 0
    every = _read_report(outs["all"])
    assert sorted(every) == [f"group/t1_{k}.jpg" for k in range(6)]
    assert "t1.jpg: 6 faces, kept all 6" in caplog.text
    boxes = np.array([b for _, b in every.values()])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    np.testing.assert_allclose(boxes[np.argmax(areas)], largest, atol=0.11)
    dist = np.hypot((boxes[:, 0] + boxes[:, 2]) / 2 - 639.5, (boxes[:, 1] + boxes[:, 3]) / 2 - 442.5)
    np.testing.assert_allclose(_read_report(outs["central"])["group/t1.jpg"][1], boxes[np.argmin(dist)], atol=0.11)
    assert not np.allclose(boxes[np.argmin(dist)], largest, atol=1)

    # only faceless photos: listed, and one error line
    empty = tmp_path / "empty" / "p"
    empty.mkdir(parents=True)
    shutil.copy(os.path.join(RAW, "view.jpg"), empty / "view.jpg")
    rc = run_cli(align_faces.main, ["--src", str(empty.parent), "--out", str(tmp_path / "o2"), "--detector", MTCNN])
    assert rc == 2 and "no face found in any of the 1 photos" in capsys.readouterr().err
    assert (tmp_path / "o2" / "no_face.txt").read_text().strip().endswith("view.jpg")


def test_deploy_tools_take_raw_photos(detector, fixture_model, tmp_path, capsys):
    from deploy import compare, extract
    from deploy.face_model import FaceModel

    a, b = os.path.join(RAW, "Rob_Lowe_0001.jpg"), os.path.join(RAW, "Rob_Lowe_0002.jpg")
    assert run_cli(compare.main, ["--model", fixture_model + ",0", "--detect", MTCNN, a, b]) == 0
    printed = float(capsys.readouterr().out.split()[1])
    emb = FaceModel(fixture_model + ",0").get_features([crop_faces(_photo(p), detector.detect(_photo(p)))[0][0]
                                                        for p in (a, b)])
    assert printed == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)

    gallery = tmp_path / "g"
    (gallery / "rob").mkdir(parents=True)
    shutil.copy(a, gallery / "rob")
    shutil.copy(os.path.join(RAW, "view.jpg"), gallery / "rob")
    assert run_cli(extract.main, ["--model", fixture_model + ",0", "--detect", MTCNN, "--input", str(gallery),
                                  "--output", str(tmp_path / "feats"), "--no-progress"]) == 0
    assert (tmp_path / "feats" / "skipped.txt").read_text().split() == [str(gallery / "rob" / "view.jpg")]
    feats = np.load(tmp_path / "feats" / "embeddings.npy")
    assert feats.shape == (1, 128) and float(feats[0] @ emb[0]) == pytest.approx(1.0, abs=1e-5)


def test_server_takes_raw_photos(detector, fixture_model, tmp_path):
    """``server.py --detect``: a raw photo registers and identifies by its detected face; a faceless photo is a 400."""
    import base64
    import json
    import urllib.error
    import urllib.request

    from deploy.detect import FaceDetectingModel
    from deploy.face_model import FaceModel
    from deploy.server import make_server

    plain = FaceModel(fixture_model + ",0")
    service = make_server(FaceDetectingModel(plain, detector), str(tmp_path / "g.sqlite"), "127.0.0.1", 0,
                          api_key="k" * 16).start()

    def call(path, name):
        body = json.dumps({"name": "rob", "image": base64.b64encode(open(os.path.join(RAW, name), "rb").read())
                           .decode()}).encode()
        req = urllib.request.Request(service.url + path, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "X-API-Key": "k" * 16})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        assert call("/registerFace", "Rob_Lowe_0001.jpg")[0] == 200
        st, out = call("/detectFace", "Rob_Lowe_0002.jpg")
        # second code path: detect + align here, embed with the plain model, cosine with numpy
        emb = plain.get_features([crop_faces(_photo(p), detector.detect(_photo(p)))[0][0]
                                  for p in ("Rob_Lowe_0001.jpg", "Rob_Lowe_0002.jpg")])
        assert st == 200 and out["candidate"] == "rob"
        assert out["score"] == pytest.approx(float(emb[0] @ emb[1]), abs=1e-4)
        st, out = call("/detectFace", "view.jpg")
        assert st == 400 and "no face found" in out["error"]
    finally:
        service.stop()
