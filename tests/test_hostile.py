"""Hostile input, as issue 14 reproduced it: the face service over raw sockets, crafted ``.bin`` pickles, broken
checkpoints. Every case ends in one clear JSON error or one ``error:`` line, within bounded time and memory."""
import base64
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from deploy.server import make_server
from recognition.common import ToolkitError

KEY = "hostile-key-0123456789"


class PixelModel:
    """A deterministic stand-in network: the embedding is the mean colour per image quarter (12-d, normalised).
    ``delay`` seconds per image emulate a slow model."""

    embedding_size, image_size, resize = 12, (112, 112), False

    def __init__(self, delay=0.0):
        self.delay, self.calls = delay, 0

    def get_features(self, faces):
        self.calls += len(faces)
        time.sleep(self.delay * len(faces))
        out = np.stack([np.asarray(f, np.float32).reshape(2, 56, 2, 56, 3).mean((1, 3)).ravel() + 1 for f in faces])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def png(w, h, valid_pixels=True):
    """A PNG declaring ``w x h``; with ``valid_pixels=False`` only the header is right (a decoder would fail)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress((b"\x00" + b"\x07" * (w * 3)) * h if valid_pixels else b"\x00" * 1000)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


FACE = png(112, 112)


@pytest.fixture
def svc(tmp_path):
    """Factory: ``svc(**settings)`` -> a started service (stopped after the test)."""
    started = []

    def make(model=None, key=KEY, **kw):
        s = make_server(model or PixelModel(), str(tmp_path / f"g{len(started)}.sqlite"), "127.0.0.1", 0,
                        api_key=key, insecure_no_auth=key is None, **kw).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def raw(port, data, timeout=10.0, chunks=()):
    """Send ``data`` (then each of ``chunks``) on a fresh connection -> ``(status, json body or None, seconds)``."""
    t = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            for c in chunks:
                s.sendall(c)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking it all: what we want
        got = b""
        try:
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < _length(got):
                part = s.recv(65536)
                if not part:
                    break
                got += part
        except (ConnectionResetError, socket.timeout):
            pass
    if not got:
        return None, None, time.monotonic() - t
    head, _, body = got.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(body[:_length(got)] or b"null"), time.monotonic() - t
    except ValueError:
        return status, body, time.monotonic() - t


def _length(got):
    for line in got.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            return int(v)
    return 1 << 30


def post(path, body, key=KEY, ctype="application/json", extra=""):
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    if key:
        head += f"X-API-Key: {key}\r\n"
    return (head + extra + "\r\n").encode() + body


def register_json(n, name="x"):
    return json.dumps({"name": name, "images": [base64.b64encode(FACE).decode()] * n}).encode()


def faces_total(s):
    st, out, _ = raw(s.port, f"GET /faces HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\n\r\n".encode())
    assert st == 200
    return out["total"]


# -------------------------------------------------------------------------------------------------- body and size
def test_negative_content_length_is_400_and_the_body_is_not_read(svc):
    s = svc()
    head = (f"POST /registerFace HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\nContent-Type: application/json"
            "\r\nContent-Length: -1\r\n\r\n").encode()
    st, out, _ = raw(s.port, head, chunks=[b"x" * 2 ** 20] * 20)
    assert st == 400 and "malformed HTTP request" in out["error"]
    assert faces_total(s) == 0


def test_announced_huge_body_is_413_at_once(svc):
    s = svc(max_body=10_000)
    head = (f"POST /registerFace HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\nContent-Type: application/json"
            f"\r\nContent-Length: {200 * 2 ** 20}\r\n\r\n").encode()
    st, out, seconds = raw(s.port, head)  # no body follows: the answer must not wait for it
    assert st == 413 and out["error"] == f"request body of {200 * 2 ** 20} bytes exceeds the limit of 10000 bytes"
    assert seconds < 5


def test_chunked_body_is_cut_at_the_limit(svc):
    s = svc(max_body=10_000)
    head = (f"POST /registerFace HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\nContent-Type: application/json"
            "\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"4000\r\n" + b"a" * 16384 + b"\r\n"
    st, out, _ = raw(s.port, head, chunks=[chunk] * 400)  # 6.5 MB offered as 16 KB chunks, no length announced
    assert st == 413 and out["error"].startswith("request body exceeds the limit of 10000 bytes (stopped reading at ")
    assert int(out["error"].rsplit(" ", 1)[1].rstrip(")")) < 2 ** 20  # what arrived by then, not the whole body


def test_pixel_bomb_is_refused_from_its_header(svc):
    model = PixelModel()
    s = svc(model)
    bomb = png(10000, 10000, valid_pixels=False)  # the header declares 100 megapixels; the pixels are not there
    assert len(bomb) < 2000
    body = json.dumps({"name": "b", "images": [base64.b64encode(bomb).decode()] * 4}).encode()
    st, out, _ = raw(s.port, post("/registerFace", body))
    assert st == 413 and out["error"] == ("images[0]: image declares 10000x10000 pixels (100000000), over the limit of "
                                          "16777216; nothing was decoded")
    st, out, _ = raw(s.port, post("/detectFace", json.dumps({"image": base64.b64encode(png(5000, 4000, False))
                                                                       .decode()}).encode()))
    assert st == 413 and "5000x4000" in out["error"]
    assert model.calls == 0 and faces_total(s) == 0


def test_too_many_images_per_request(svc):
    from test_server import multipart  # tests/ is on sys.path (as test_deploy_inference does)

    s = svc(max_images=3)
    st, out, _ = raw(s.port, post("/registerFace", register_json(4)))
    assert st == 413 and out["error"] == "images: 4 images, more than --max-images 3"
    data, ctype = multipart({"name": "m"}, [("images", f"{i}.png", FACE) for i in range(4)])
    st, out, _ = raw(s.port, post("/registerFace", data, ctype=ctype))
    assert st == 413 and "Too many files" in out["error"]
    assert raw(s.port, post("/registerFace", register_json(3)))[0] == 200


def test_slow_body_gets_408(svc):
    s = svc(body_timeout=1.0)
    head = (f"POST /detectFace HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\nContent-Type: application/json"
            "\r\nContent-Length: 1000\r\n\r\n{\"image\": ").encode()
    st, out, seconds = raw(s.port, head)
    assert st == 408 and out["error"] == "request body not received within 1 s" and seconds < 5


def test_oversized_headers_are_a_json_400(svc):
    s = svc()
    st, out, _ = raw(s.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 200_000 + b"\r\n\r\n")
    assert st == 400 and out["error"].startswith("malformed HTTP request")


def test_deeply_nested_json_is_400(svc):
    s = svc()
    st, out, _ = raw(s.port, post("/detectFace", b"[" * 500_000 + b"]" * 500_000))
    assert (st, out) == (400, {"error": "body: JSON nested too deeply"})
    assert raw(s.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


# ---------------------------------------------------------------------------------------- authentication and CSRF
def test_api_key_required(svc):
    s = svc()
    body = register_json(1)
    assert raw(s.port, post("/registerFace", body, key=None))[:2] == (
        401, {"error": "missing or wrong API key (send the header X-API-Key: KEY)"})
    assert raw(s.port, post("/registerFace", body, key="wrong-key-0123456789"))[0] == 401
    bearer = post("/registerFace", body, key=None, extra=f"Authorization: Bearer {KEY}\r\n")
    assert raw(s.port, bearer)[0] == 200
    assert raw(s.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200  # liveness stays open


def test_cross_site_requests_register_nothing(svc):
    s = svc()
    evil = "Origin: http://evil.example\r\n"
    st, out, _ = raw(s.port, post("/registerFace", register_json(1), ctype="text/plain", key=None, extra=evil))
    assert st == 401  # a browser cannot add the key header without a CORS preflight, which is never granted
    st, out, _ = raw(s.port, post("/registerFace", register_json(1), ctype="text/plain"))
    assert st == 415 and "text/plain" in out["error"]
    st, out, _ = raw(s.port, post("/registerFace", b"name=x", ctype="application/x-www-form-urlencoded"))
    assert st == 415
    st, out, _ = raw(s.port, post("/registerFace", register_json(1), extra=evil))
    assert (st, out) == (403, {"error": "Origin 'http://evil.example': cross-site requests are refused"})
    assert faces_total(s) == 0
    own = "Origin: http://127.0.0.1\r\n"  # the service's own page (its /docs) may post
    assert raw(s.port, post("/registerFace", register_json(1), extra=own))[0] == 200


def test_without_a_key_only_loopback_names_and_same_origin(svc):
    from test_server import multipart  # tests/ is on sys.path (as test_deploy_inference does)

    s = svc(key=None)
    data, ctype = multipart({"name": "m"}, [("images", "0.png", FACE)])
    st, out, _ = raw(s.port, post("/registerFace", data, ctype=ctype, key=None, extra="Origin: http://evil.example\r\n"))
    assert st == 403  # a plain HTML form posting multipart from another site
    rebound = post("/registerFace", register_json(1), key=None).replace(b"Host: 127.0.0.1", b"Host: evil.example")
    st, out, _ = raw(s.port, rebound)  # DNS rebinding: the browser thinks it talks to evil.example
    assert st == 403 and "Host 'evil.example'" in out["error"]
    assert raw(s.port, post("/registerFace", data, ctype=ctype, key=None))[0] == 200


# ------------------------------------------------------------------------------------------- methods and names
@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_are_json_405(svc, method):
    s = svc()
    st, out, _ = raw(s.port, f"{method} /faces HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {KEY}\r\nContent-Type: "
                             "application/json\r\nContent-Length: 2\r\n\r\n{}".encode())
    assert (st, out) == (405, {"error": f"{method} /faces: method not allowed"})


def test_lone_surrogate_name_is_400(svc):
    s = svc()
    body = b'{"name": "a\\ud800b", "images": ["' + base64.b64encode(FACE) + b'"]}'
    st, out, _ = raw(s.port, post("/registerFace", body))
    assert (st, out) == (400, {"error": "name: not valid Unicode text (a lone surrogate at character 1)"})
    assert faces_total(s) == 0


# --------------------------------------------------------------------------------------- slow clients and load
def test_slow_and_idle_clients_do_not_starve_others(svc):
    s = svc(header_timeout=1.5, idle_timeout=1.0)
    stop = threading.Event()
    closed = []

    def trickle():  # one header byte at a time, forever
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            try:
                for b in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 1000:
                    if stop.is_set():
                        return
                    c.sendall(bytes([b]))
                    time.sleep(0.2)
            except OSError:
                closed.append(True)

    slow = [threading.Thread(target=trickle) for _ in range(8)]
    idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(16)]
    try:
        for t in slow:
            t.start()
        time.sleep(0.5)
        for _ in range(5):
            st, out, seconds = raw(s.port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert st == 200 and seconds < 1.0
        for c in idle:  # the idle ones are closed by the header deadline
            c.settimeout(5)
            assert c.recv(1) == b""
        time.sleep(2.0)
        assert len(closed) == 8  # and so are the trickling ones
    finally:
        stop.set()
        for c in idle:
            c.close()
        for t in slow:
            t.join(10)


def test_long_registration_does_not_hold_the_model(svc):
    """A 32-image registration runs in chunks: a detection sent after it starts finishes long before it ends."""
    s = svc(PixelModel(delay=0.05), chunk=2)
    done = {}

    def register():
        done["register"] = (raw(s.port, post("/registerFace", register_json(32)), timeout=60)[0], time.monotonic())

    t = threading.Thread(target=register)
    t.start()
    time.sleep(0.3)
    body = json.dumps({"image": base64.b64encode(FACE).decode()}).encode()
    st, _, _ = raw(s.port, post("/detectFace", body), timeout=60)
    detected = time.monotonic()
    t.join(60)
    assert st == 200 and done["register"][0] == 200
    assert detected < done["register"][1] - 0.5  # 32 x 0.05 s = 1.6 s of model time; detection waited one chunk


def test_full_queue_is_503(svc):
    gate = threading.Event()

    class Held(PixelModel):
        def get_features(self, faces):
            gate.wait(30)
            return super().get_features(faces)

    s = svc(Held(), queue=1)
    body = json.dumps({"image": base64.b64encode(FACE).decode()}).encode()
    first = threading.Thread(target=lambda: raw(s.port, post("/detectFace", body), timeout=60))
    first.start()
    try:
        for _ in range(100):
            if raw(s.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[1]["queue"] == 1:
                break
            time.sleep(0.05)
        st, out, _ = raw(s.port, post("/detectFace", body))
        assert (st, out) == (503, {"error": "busy: 1 inference jobs queued (--queue 1); retry later"})
    finally:
        gate.set()
        first.join(30)


def test_tampered_gallery_stops_startup_with_one_line(tmp_path):
    import sqlite3

    from deploy.gallery import FaceGallery

    db = str(tmp_path / "g.sqlite")
    g = FaceGallery(db)
    g.add("ok", PixelModel().get_features([np.zeros((112, 112, 3), np.uint8)]))
    g.close()
    con = sqlite3.connect(db)
    con.execute("UPDATE faces SET embedding = ? WHERE id = 1", (b"abc",))
    con.commit()
    con.close()
    with pytest.raises(ToolkitError, match=r"^--db .*: row id 1 \(name 'ok'\): embedding of 3 bytes where dim 12"):
        make_server(PixelModel(), db, "127.0.0.1", 0, api_key=KEY)


# ------------------------------------------------------------------------------------------------------ loaders
class _Alloc:
    """Pickles as an array allocation of ``n`` bytes (what a crafted .bin asks the loader to build)."""

    def __init__(self, n, via="reconstruct"):
        self.n, self.via = n, via

    def __reduce__(self):
        if self.via == "reconstruct":
            return np.core.multiarray._reconstruct, (np.ndarray, (self.n,), b"b")
        return np.ndarray, ((self.n,), "u1")


def _load_in_child(path):
    """Load ``path`` in a fresh process; -> (exit code, last stderr line, peak RSS in MB)."""
    # VmHWM of the child's own address space: ru_maxrss would carry the forking parent's peak (Linux keeps it
    # across fork and exec), so a big pytest process made this check fail after a long suite
    code = ("import sys\nfrom recognition.common import run_cli\nfrom recognition.rec import "
            "safe_load_bin_pickle\nrc = run_cli(lambda a: safe_load_bin_pickle(sys.argv[1]) and 0)\n"
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
            "print(int(hwm.split()[1]) // 1024)\nsys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stderr.strip().splitlines()[-1], int(p.stdout.split()[-1])


def test_tiny_bin_declaring_huge_arrays_is_refused_without_allocating(tmp_path):
    import pickle

    big = _Alloc(500_000_000)
    path = tmp_path / "memo.bin"
    path.write_bytes(pickle.dumps(([big, big, big, big], [True, False]), protocol=2))  # one object, 4 uses
    assert len(path.read_bytes()) < 200
    rc, line, rss = _load_in_child(str(path))
    assert rc == 2 and line == (f"error: {path}: refusing an array of shape (500000000,): the pickle would allocate "
                                f"500000000 bytes, more than its {path.stat().st_size}-byte file can hold "
                                f"(a crafted .bin)")
    assert rss < 400  # the 2 GB were never built


def test_bin2images_writes_nothing_for_a_crafted_bin(tmp_path):
    import pickle

    path = tmp_path / "two.bin"
    path.write_bytes(pickle.dumps(([_Alloc(2 ** 30), _Alloc(2 ** 30, "ndarray")], [True]), protocol=2))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "datasets.bin2images", "--bin", str(path), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "refusing an array of shape (1073741824,)" in p.stderr.strip().splitlines()[-1]
    assert not out.exists()


def test_memo_reused_bytes_and_pixel_bombs_in_a_bin(tmp_path):
    import pickle

    from recognition.rec import safe_load_bin_pickle
    from recognition.verification import read_bin

    blob = b"\xff\xd8" + b"x" * (4 * 2 ** 20)
    reused = tmp_path / "reuse.bin"
    reused.write_bytes(pickle.dumps(([blob] * 40, [True] * 20), protocol=4))  # 4 MB on disk, 160 MB in use
    size = reused.stat().st_size
    for fn in (safe_load_bin_pickle, read_bin):
        with pytest.raises(ToolkitError, match=r"add up to more than %d bytes when every reference is counted"
                           % (size + 16 * 2 ** 20)):
            fn(str(reused))
    bomb = tmp_path / "bomb.bin"
    bomb.write_bytes(pickle.dumps(([FACE, png(10000, 10000, False)], [True]), protocol=2))
    for fn in (safe_load_bin_pickle, read_bin):
        with pytest.raises(ToolkitError, match=r"bomb.bin: image 1: image declares 10000x10000 pixels"):
            fn(str(bomb))
    with pytest.raises(ToolkitError, match=r"image 0: image of %d bytes exceeds the limit of 100 " % len(FACE)):
        safe_load_bin_pickle(str(bomb), max_image_bytes=100)
    assert safe_load_bin_pickle(str(bomb), max_image_pixels=10 ** 8)[0][1] == png(10000, 10000, False)


def _params(tmp_path):
    """A real two-array checkpoint and, derived from the format by hand, the byte where array 1's data ends."""
    import mxnet as mx

    from recognition.common import save_checkpoint

    prefix = str(tmp_path / "m")
    data = mx.sym.Variable("data")
    sym = mx.sym.FullyConnected(data, num_hidden=3, name="fc1")
    save_checkpoint(prefix, 0, sym, {"fc1_weight": mx.nd.ones((3, 5)), "fc1_bias": mx.nd.zeros((3,))}, {})
    # file header 24 bytes; each array: magic+stype 8, ndim 4, dims 8*ndim, context+dtype 12, data 4*size
    total = 24 + sum(8 + 4 + 8 * nd + 12 + 4 * n for nd, n in ((2, 15), (1, 3)))
    return prefix, total


def test_truncated_params_and_garbage_symbol_keep_their_cause(tmp_path):
    from recognition.common import load_checkpoint

    prefix, arrays_end = _params(tmp_path)
    params = prefix + "-0000.params"
    full = open(params, "rb").read()
    cut = arrays_end - 7  # inside the last array's data
    open(params, "wb").write(full[:cut])
    with pytest.raises(ToolkitError) as err:
        load_checkpoint(prefix, 0)
    assert str(err.value) == (f"{params}: not a readable MXNet params file (truncated at byte {cut} (expected "
                              f"{arrays_end}): array 1 data is cut short)")
    p = subprocess.run([sys.executable, "-m", "deploy.model_slim", "--model", prefix + ",0", "--output",
                        str(tmp_path / "slim")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].endswith(f"truncated at byte {cut} (expected "
                                                                           f"{arrays_end}): array 1 data is cut short)")
    open(params, "wb").write(full)
    sym_path = prefix + "-symbol.json"
    for text, cause in ((b"garbage{", "not JSON at line 1 column 1: Expecting value"),
                        (b'{"nodes": [1,', "not JSON at line 1 column 14: Expecting value"),
                        (b"\xff\xfe{}", "not UTF-8 text: byte 0 is 0xff"),
                        (b'{"a": 1}', "JSON, but no 'nodes' list and 'heads'")):
        open(sym_path, "wb").write(text)
        with pytest.raises(ToolkitError) as err:
            load_checkpoint(prefix, 0)
        assert str(err.value) == f"{sym_path}: not a readable MXNet symbol ({cause})"
