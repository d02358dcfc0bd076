"""Face registry service: real HTTP on 127.0.0.1 (urllib) against a tiny random-init checkpoint and synthetic faces."""
import base64
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from datasets.synth import render_identity
from deploy.face_model import FaceModel, decode_image
from deploy.server import make_server
from recognition.common import ToolkitError, save_checkpoint


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """PREFIX of a seeded random-init ``tiny`` checkpoint (no ../shared needed)."""
    import mxnet as mx

    from recognition.backbones import get_symbol

    sym = get_symbol("tiny")
    rng = np.random.RandomState(0)
    arg_shapes, _, aux_shapes = sym.infer_shape(data=(1, 3, 112, 112))
    arg = {n: mx.nd.array(rng.normal(0, 0.05, s) if not n.endswith("_gamma") else rng.uniform(0.5, 1.0, s))
           for n, s in zip(sym.list_arguments(), arg_shapes) if n != "data"}
    aux = {n: mx.nd.array(np.zeros(s) if n.endswith("mean") else np.ones(s))
           for n, s in zip(sym.list_auxiliary_states(), aux_shapes)}
    prefix = str(tmp_path_factory.mktemp("srv_model") / "tiny")
    save_checkpoint(prefix, 0, sym, arg, aux)
    return prefix


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return FaceModel(tiny_ckpt + ",0", batch_size=4)


@pytest.fixture(scope="module")
def faces():
    """JPEG bytes: 3 identities x 3 images."""
    return {f"p{i}": render_identity(0, "A", 1, i, 3) for i in range(3)}


class Running:
    """A server on an ephemeral port served from a thread; ``call(method, path, body)`` -> (status, json)."""

    def __init__(self, model, db, threshold=0.3, **kw):
        self.server = make_server(model, db, "127.0.0.1", 0, threshold, **kw)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def call(self, method, path, body=None, raw=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def running(model, tmp_path):
    srv = Running(model, str(tmp_path / "gallery.sqlite"))
    yield srv
    srv.stop()


def b64(jpeg: bytes) -> str:
    return base64.b64encode(jpeg).decode()


def feature(model, jpeg):
    return model.get_feature(decode_image(jpeg))


def test_register_detect_delete_list(running, model, faces):
    st, out = running.call("POST", "/registerFace", {"name": "alice", "images": [b64(j) for j in faces["p0"][:2]]})
    assert (st, out) == (200, {"name": "alice", "added": 2, "count": 2})
    st, out = running.call("POST", "/registerFace", {"name": "bob", "image": b64(faces["p1"][0])})
    assert st == 200 and out["count"] == 1
    assert running.call("GET", "/faces") == (200, {"faces": [{"name": "alice", "count": 2},
                                                             {"name": "bob", "count": 1}], "total": 3})

    # detect: the score is the best cosine over stored embeddings, computed here with numpy
    gallery = {"alice": [feature(model, j) for j in faces["p0"][:2]], "bob": [feature(model, faces["p1"][0])]}
    for probe in (faces["p0"][2], faces["p1"][0], faces["p2"][0]):
        q = feature(model, probe)
        scores = {n: max(float(np.dot(q, e)) for e in embs) for n, embs in gallery.items()}
        best = max(scores, key=scores.get)
        st, out = running.call("POST", "/detectFace", {"image": b64(probe)})
        assert st == 200 and out["candidate"] == best
        assert out["score"] == pytest.approx(scores[best], abs=1e-5)
        assert out["name"] == (best if scores[best] >= 0.3 else "unknown")
    st, out = running.call("POST", "/detectFace", {"image": b64(faces["p1"][0])})
    assert out["name"] == "bob" and out["score"] == pytest.approx(1.0, abs=1e-5)  # the very image registered

    assert running.call("POST", "/deleteFace", {"name": "alice"}) == (200, {"name": "alice", "deleted": 2})
    assert running.call("GET", "/faces")[1]["faces"] == [{"name": "bob", "count": 1}]
    st, out = running.call("GET", "/health")
    assert st == 200 and out["status"] == "ok" and out["embeddings"] == 1
    assert out["embedding_size"] == model.embedding_size


def test_threshold_unknown(model, faces, tmp_path):
    # The threshold sits between a different person's score and 1, so it is derived from the model, not assumed.
    q, e = feature(model, faces["p2"][1]), feature(model, faces["p0"][0])
    score = float(np.dot(q, e))
    assert score < 1 - 1e-6  # premise: a different person's image is not identical
    threshold = (score + 1.0) / 2
    srv = Running(model, str(tmp_path / "g.sqlite"), threshold=threshold)
    try:
        st, out = srv.call("POST", "/detectFace", {"image": b64(faces["p0"][0])})
        assert st == 200 and out["name"] == "unknown" and out["score"] is None and out["candidate"] is None
        assert out["threshold"] == pytest.approx(threshold)
        srv.call("POST", "/registerFace", {"name": "alice", "images": [b64(faces["p0"][0])]})
        st, out = srv.call("POST", "/detectFace", {"image": b64(faces["p2"][1])})
        assert st == 200 and out["name"] == "unknown" and out["candidate"] == "alice"
        assert out["score"] == pytest.approx(score, abs=1e-4)
        st, out = srv.call("POST", "/detectFace", {"image": b64(faces["p0"][0])})
        assert st == 200 and out["name"] == "alice"  # the registered image itself scores ~1, above the threshold
    finally:
        srv.stop()


def test_bad_requests(running, faces):
    # not decodable
    st, out = running.call("POST", "/registerFace", {"name": "x", "images": [b64(b"not an image at all")]})
    assert st == 400 and "images[0]" in out["error"] and "decode" in out["error"]
    st, out = running.call("POST", "/detectFace", {"image": "%%%not base64"})
    assert st == 400 and "base64" in out["error"]
    # wrong size without --resize: nothing stored, even for the good image before it
    import cv2

    small = cv2.imencode(".png", np.zeros((50, 40, 3), np.uint8))[1].tobytes()
    st, out = running.call("POST", "/registerFace", {"name": "x", "images": [b64(faces["p0"][0]), b64(small)]})
    assert st == 400 and "images[1]" in out["error"] and "40x50" in out["error"]
    assert running.call("GET", "/faces")[1]["total"] == 0
    # unknown name, bad JSON, missing fields, unknown endpoint, wrong method
    st, out = running.call("POST", "/deleteFace", {"name": "nobody"})
    assert st == 404 and "nobody" in out["error"]
    assert running.call("POST", "/detectFace", raw=b"{bad json")[0] == 400
    assert running.call("POST", "/registerFace", {"images": [b64(faces["p0"][0])]})[0] == 400
    assert running.call("POST", "/registerFace", {"name": "x", "images": []})[0] == 400
    assert running.call("GET", "/nope")[0] == 404
    assert running.call("GET", "/registerFace")[0] == 405


def test_oversized_body_refused(model, faces, tmp_path):
    srv = Running(model, str(tmp_path / "g.sqlite"), max_body=1000)
    try:
        st, out = srv.call("POST", "/registerFace", {"name": "big", "images": [b64(faces["p0"][0])]})
        assert st == 413 and "1000" in out["error"]
        st, out = srv.call("POST", "/detectFace", {"image": "A" * 3_000_000})  # the client sends it all
        assert st == 413 and "3000013 bytes" in out["error"]
        assert srv.call("GET", "/health")[0] == 200  # still serving
    finally:
        srv.stop()


def test_concurrent_requests_and_restart_keeps_gallery(model, faces, tmp_path):
    db = str(tmp_path / "g.sqlite")
    srv = Running(model, db)
    jobs = [(name, j) for name, imgs in faces.items() for j in imgs]  # 9 registrations, 3 names

    def work(job):
        name, jpeg = job
        st, _ = srv.call("POST", "/registerFace", {"name": name, "images": [b64(jpeg)]})
        st2, out = srv.call("POST", "/detectFace", {"image": b64(jpeg)})
        return st, st2, out

    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(work, jobs))
        assert all(st == 200 and st2 == 200 for st, st2, _ in results)
        # the image itself was registered before its own detection: it scores 1 against its name or a twin
        assert all(out["score"] == pytest.approx(1.0, abs=1e-5) for _, _, out in results)
        listing = srv.call("GET", "/faces")[1]
        assert listing == {"faces": [{"name": n, "count": 3} for n in sorted(faces)], "total": 9}
    finally:
        srv.stop()
    srv = Running(model, db)  # restart on the same file
    try:
        assert srv.call("GET", "/faces")[1] == listing
        st, out = srv.call("POST", "/detectFace", {"image": b64(faces["p1"][2])})
        assert out["name"] == "p1" and out["score"] == pytest.approx(1.0, abs=1e-5)
    finally:
        srv.stop()


def test_db_of_another_model_refused(model, tmp_path):
    from deploy.server import FaceGallery

    db = str(tmp_path / "g.sqlite")
    g = FaceGallery(db)
    g.add("x", np.ones((1, model.embedding_size + 1), np.float32))
    g.close()
    with pytest.raises(ToolkitError, match="--db .*%d-d embeddings but the model gives %d-d"
                       % (model.embedding_size + 1, model.embedding_size)):
        make_server(model, db, "127.0.0.1", 0)
    with pytest.raises(ToolkitError, match="--threshold"):
        make_server(model, str(tmp_path / "h.sqlite"), "127.0.0.1", 0, threshold=3)
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(ToolkitError, match="--port %d: cannot listen" % busy.getsockname()[1]):
            make_server(model, str(tmp_path / "h.sqlite"), "127.0.0.1", busy.getsockname()[1])


def test_cli_serves_and_reports_bad_model(model, tiny_ckpt, tmp_path):
    """``python -m deploy.server`` end to end: listens, answers /health; a missing checkpoint is one line, exit 2."""
    import re
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "deploy.server", "--model", str(tmp_path / "none") + ",0",
                          "--db", str(tmp_path / "g.sqlite")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --model: checkpoint file")
    proc = subprocess.Popen([sys.executable, "-m", "deploy.server", "--model", tiny_ckpt + ",0",
                             "--db", str(tmp_path / "g.sqlite"), "--port", "0", "--no-flip"],
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            m = re.search(r"serving on http://127.0.0.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "server did not report its port"
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=30) as resp:
            health = json.loads(resp.read())
        assert health["status"] == "ok" and health["embedding_size"] == model.embedding_size
    finally:
        proc.terminate()
        proc.wait(30)


def test_fixed_handler_pool_and_idle_keepalive_timeout(model, tmp_path):
    """Requests run on at most ``threads`` handler threads (a thread per request grew RSS, see server.py); an
    idle keep-alive connection holding the only thread is closed after ``idle_timeout``, so others get served."""
    import socket

    srv = Running(model, str(tmp_path / "pool.sqlite"), threads=1, idle_timeout=0.5)
    try:
        for _ in range(30):
            assert srv.call("GET", "/health")[0] == 200
        assert len(srv.server._pool._threads) == 1  # every request on the one pool thread
        host, port = srv.server.server_address[:2]
        with socket.create_connection((host, port)) as idle:  # connects, sends nothing: occupies the thread
            idle.settimeout(10)
            st, out = srv.call("GET", "/health")  # waits in the queue until the idle connection times out
            assert st == 200 and out["status"] == "ok"
            assert idle.recv(1) == b""  # the server closed the idle connection
    finally:
        srv.stop()
    for kw, msg in (({"threads": 0}, r"--threads 0: must be >= 1"),
                    ({"idle_timeout": 0}, r"--idle-timeout 0: must be > 0 seconds")):
        with pytest.raises(ToolkitError, match=msg):
            make_server(model, str(tmp_path / "bad.sqlite"), "127.0.0.1", 0, **kw)
