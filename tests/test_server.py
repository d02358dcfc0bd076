"""Face registry service: real HTTP on 127.0.0.1 (urllib) against a tiny random-init checkpoint and synthetic faces.

Hostile requests and files are in tests/test_hostile.py; the gallery's own checks in tests/test_gallery.py.
"""
import base64
import json
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from datasets.synth import render_identity
from deploy.face_model import FaceModel, decode_image
from deploy.server import make_server
from recognition.common import ToolkitError, save_checkpoint

KEY = "test-key-0123456789"


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
    """A started service on an ephemeral port; ``call(method, path, body)`` -> (status, json)."""

    def __init__(self, model, db, key=KEY, **kw):
        self.service = make_server(model, db, "127.0.0.1", 0, api_key=key, insecure_no_auth=key is None,
                                   **kw).start()
        self.url, self.key = self.service.url, key

    def call(self, method, path, body=None, raw=None, headers=None, files=None, fields=None):
        h = {"Content-Type": "application/json"}
        if self.key:
            h["X-API-Key"] = self.key
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if files is not None or fields is not None:
            data, h["Content-Type"] = multipart(fields or {}, files or [])
        h.update(headers or {})
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stop(self):
        self.service.stop()


def multipart(fields, files):
    """(body, content type) of a multipart/form-data request; ``files`` = [(field, filename, bytes)]."""
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for field, filename, raw in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + raw + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


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
    st, out = running.call("GET", "/health", headers={"X-API-Key": ""})  # open without a key
    assert st == 200 and out["status"] == "ok" and out["embedding_size"] == model.embedding_size


def test_multipart_uploads_equal_json(running, model, faces):
    """The same images as multipart files and as base64 JSON give the same stored embeddings and scores."""
    files = [("images", f"{i}.jpg", j) for i, j in enumerate(faces["p0"][:2])]
    st, out = running.call("POST", "/registerFace", fields={"name": "carol"}, files=files)
    assert (st, out) == (200, {"name": "carol", "added": 2, "count": 2})
    probe = faces["p0"][2]
    expected = max(float(np.dot(feature(model, probe), feature(model, j))) for j in faces["p0"][:2])
    st, up = running.call("POST", "/detectFace", files=[("image", "q.jpg", probe)])
    st2, js = running.call("POST", "/detectFace", {"image": b64(probe)})
    assert st == st2 == 200 and up == js and up["candidate"] == "carol"
    assert up["score"] == pytest.approx(expected, abs=1e-5)
    st, out = running.call("POST", "/detectFace", files=[("image", "q.jpg", b"not an image")])
    assert st == 400 and "image" in out["error"] and "decode" in out["error"]


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
    st, out = running.call("POST", "/registerFace", {"name": "x", "images": [b64(b"not an image at all")]})
    assert st == 400 and "images[0]" in out["error"] and "decode" in out["error"]
    st, out = running.call("POST", "/detectFace", {"image": "%%%not base64"})
    assert st == 400 and "base64" in out["error"]
    import cv2

    small = cv2.imencode(".png", np.zeros((50, 40, 3), np.uint8))[1].tobytes()
    st, out = running.call("POST", "/registerFace", {"name": "x", "images": [b64(faces["p0"][0]), b64(small)]})
    assert st == 400 and "images[1]" in out["error"] and "40x50" in out["error"]
    assert running.call("GET", "/faces")[1]["total"] == 0  # nothing stored, even the good image before it
    st, out = running.call("POST", "/deleteFace", {"name": "nobody"})
    assert st == 404 and "nobody" in out["error"]
    st, out = running.call("POST", "/detectFace", raw=b"{bad json")
    assert st == 400 and "not valid JSON" in out["error"]
    st, out = running.call("POST", "/registerFace", {"images": [b64(faces["p0"][0])]})
    assert st == 422 and out["error"] == "name: Field required"
    st, out = running.call("POST", "/registerFace", {"name": "x", "images": [3]})
    assert st == 422 and out["error"].startswith("images.0:")
    assert running.call("POST", "/registerFace", {"name": "x", "images": []})[0] == 422
    assert running.call("POST", "/detectFace", raw=b"[1, 2]") == (422, {"error": "body: expected a JSON object"})
    assert running.call("GET", "/nope") == (404, {"error": "/nope: no such endpoint"})
    assert running.call("GET", "/registerFace") == (405, {"error": "GET /registerFace: method not allowed"})


def test_openapi_documents_the_endpoints(running):
    with urllib.request.urlopen(running.url + "/openapi.json", timeout=30) as resp:
        spec = json.loads(resp.read())
    assert {"/registerFace", "/detectFace", "/deleteFace", "/faces", "/health"} <= set(spec["paths"])
    body = spec["paths"]["/registerFace"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "APIKeyHeader" in spec["components"]["securitySchemes"]
    with urllib.request.urlopen(running.url + "/docs", timeout=30) as resp:
        assert resp.status == 200 and b"swagger" in resp.read().lower()


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


def test_startup_refusals_are_one_line(model, tmp_path):
    from deploy.gallery import FaceGallery

    db = str(tmp_path / "g.sqlite")
    g = FaceGallery(db)
    wide = np.ones((1, model.embedding_size + 1), np.float32)
    g.add("x", wide / np.linalg.norm(wide))
    g.close()
    with pytest.raises(ToolkitError, match="--db .*%d-d embeddings but the model gives %d-d"
                       % (model.embedding_size + 1, model.embedding_size)):
        make_server(model, db, "127.0.0.1", 0, api_key=KEY)
    other = str(tmp_path / "h.sqlite")
    for kw, msg in (({"api_key": KEY, "threshold": 3}, "--threshold 3"),
                    ({"api_key": KEY, "max_images": 0}, "--max-images 0: must be > 0"),
                    ({}, "no API key: pass --api-key KEY or set IFR_API_KEY"),
                    ({"api_key": "short"}, "--api-key: too short")):
        with pytest.raises(ToolkitError, match=msg):
            make_server(model, other, "127.0.0.1", 0, **kw)
    with pytest.raises(ToolkitError, match="--insecure-no-auth: only allowed on a loopback --host"):
        make_server(model, other, "0.0.0.0", 0, insecure_no_auth=True)
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(ToolkitError, match="--port %d: cannot listen" % busy.getsockname()[1]):
            make_server(model, other, "127.0.0.1", busy.getsockname()[1], api_key=KEY).start(timeout=10)


def test_cli_serves_and_reports_bad_input(model, tiny_ckpt, tmp_path):
    """``python -m deploy.server`` end to end: listens, answers with the key from the environment; a missing
    checkpoint or a missing key is one line, exit 2."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "IFR_API_KEY"}
    base = [sys.executable, "-m", "deploy.server", "--db", str(tmp_path / "g.sqlite"), "--port", "0", "--no-flip"]
    for extra, msg in (([], "error: no API key"), (["--model", str(tmp_path / "none") + ",0"],
                                                     "error: --model: checkpoint file")):
        bad = subprocess.run(base + (extra or ["--model", tiny_ckpt + ",0"]), capture_output=True, text=True,
                             timeout=120, env=dict(env, IFR_API_KEY=KEY) if extra else env)
        assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(msg), bad.stderr
    proc = subprocess.Popen(base + ["--model", tiny_ckpt + ",0"], stderr=subprocess.PIPE, text=True,
                            env=dict(env, IFR_API_KEY=KEY))
    try:
        port = None
        for line in proc.stderr:
            m = re.search(r"serving on http://127.0.0.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "server did not report its port"
        url = "http://127.0.0.1:%d/faces" % port
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=30)
        assert err.value.code == 401
        with urllib.request.urlopen(urllib.request.Request(url, headers={"X-API-Key": KEY}), timeout=30) as resp:
            assert json.loads(resp.read()) == {"faces": [], "total": 0}
    finally:
        proc.terminate()
        proc.wait(30)


def test_inference_runs_off_the_event_loop(model, tmp_path):
    """While the inference thread is busy, /health still answers at once (it never waits for the model)."""
    gate = threading.Event()

    class Blocking:
        embedding_size, image_size, resize = model.embedding_size, model.image_size, False

        def get_features(self, faces):
            gate.wait(30)
            return model.get_features(faces)

    srv = Running(Blocking(), str(tmp_path / "b.sqlite"))
    import cv2

    img = b64(cv2.imencode(".png", np.zeros((112, 112, 3), np.uint8))[1].tobytes())
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(srv.call, "POST", "/detectFace", {"image": img})
            for _ in range(100):  # the job is on the inference thread now
                if srv.call("GET", "/health")[1]["queue"] == 1:
                    break
                threading.Event().wait(0.05)
            st, out = srv.call("GET", "/health")
            assert st == 200 and out["queue"] == 1 and not pending.done()
            gate.set()
            assert pending.result(60)[0] == 200
    finally:
        gate.set()
        srv.stop()
