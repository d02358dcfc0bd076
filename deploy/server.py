"""The face registry service: register, identify, delete and list faces over a persistent SQLite gallery.

    IFR_API_KEY=secret python deploy/server.py --model ../models/model-y1-test2/model,0 --db gallery.sqlite --port 8080

FastAPI on uvicorn; the OpenAPI description is at ``/docs`` (and ``/openapi.json``). Every request but ``GET
/health`` needs the API key (``--api-key`` or ``IFR_API_KEY``) as ``X-API-Key: KEY``; ``--insecure-no-auth`` drops it,
only on a loopback address. Endpoints (JSON, or ``multipart/form-data`` with image files; answers are JSON):

- ``POST /registerFace`` ``{"name": str, "images": [base64 JPEG/PNG, ...]}`` (or ``"image"``; multipart: ``name``
  plus ``images``/``image`` files) -> ``{name, added, count}``
- ``POST /detectFace`` ``{"image": base64}`` (multipart: an ``image`` file) -> ``{name, score, candidate,
  threshold}``; ``name`` is ``"unknown"`` under ``--threshold`` (``candidate`` still names the nearest identity)
- ``POST /deleteFace`` ``{"name": str}`` -> ``{name, deleted}`` (404 for a name not in the gallery)
- ``GET /faces`` -> ``{faces: [{name, count}], total}``; ``GET /health`` -> ``{status, embedding_size, queue}``

Errors are ``{"error": "one line"}`` with 400 (bad JSON/base64/image/name), 401 (API key), 403 (foreign Origin or
Host), 404, 405, 408 (body too slow), 413 (body, image pixels or image count over a limit), 415 (not JSON or
multipart), 422 (fields of the wrong type) or 503 (inference queue full). Limits: ``deploy/http_guard.py``.

Images go through :func:`decode_faces` (bytes -> aligned RGB crops: the pixel count is read from the header before
anything is decoded); inference runs on one worker thread behind a bounded queue (``--queue``), a registration in
chunks of ``--chunk`` images so that identifications interleave with a long one. Scores: cosine of L2-normalised
embeddings; an identity scores its best stored embedding (``deploy/gallery.py``).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import logging
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Sequence

import numpy as np

from deploy.gallery import FaceGallery
from deploy.http_guard import LOOPBACK_HOSTS, Guard, protocol_with_header_timeout
from recognition.common import ToolkitError, run_cli
from recognition.image_header import MAX_IMAGE_PIXELS, ImageTooLarge, check_image

logger = logging.getLogger("deploy.server")

MAX_BODY = 16 * 2 ** 20
API_KEY_ENV = "IFR_API_KEY"
__all__ = ["FaceGallery", "FaceService", "ApiError", "Settings", "create_app", "decode_faces", "make_server"]


class ApiError(Exception):
    """An answer with a 4xx/5xx status and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Settings:
    """The service's limits (see ``main``'s flags)."""

    def __init__(self, threshold: float = 0.3, max_body: int = MAX_BODY, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_images: int = 32, queue: int = 64, chunk: int = 8, body_timeout: float = 30.0):
        if not -1.0 <= float(threshold) <= 1.0:
            raise ToolkitError(f"--threshold {threshold}: a cosine similarity threshold must lie in [-1, 1]")
        for flag, value in (("--max-body-mb", max_body), ("--max-pixels", max_pixels), ("--max-images", max_images),
                            ("--queue", queue), ("--chunk", chunk), ("--body-timeout", body_timeout)):
            if not value > 0:
                raise ToolkitError(f"{flag} {value}: must be > 0")
        self.threshold, self.max_body, self.max_pixels = float(threshold), int(max_body), int(max_pixels)
        self.max_images, self.queue, self.chunk, self.body_timeout = int(max_images), int(queue), int(chunk), \
            float(body_timeout)


def decode_faces(raw: bytes, field: str, model, max_pixels: int = MAX_IMAGE_PIXELS) -> List[np.ndarray]:
    """Encoded image bytes -> aligned faces, each ``uint8 (H, W, 3)`` RGB of the model's input size.

    The one place where the service turns bytes into faces. With ``--detect`` (``model`` is a
    :class:`deploy.detect.FaceDetectingModel`) the photo is raw: MTCNN finds the face the ``--faces`` rule keeps and
    it is aligned on the ArcFace template; a photo without a face is a 400. The header's pixel count is checked
    before decoding (:class:`ImageTooLarge` -> 413); an undecodable image or one of the wrong size (without
    ``--resize``) -> :class:`ToolkitError` (400).
    """
    from deploy.detect import FaceDetectingModel
    from deploy.face_model import decode_image, prepare_face

    check_image(raw, field, max_bytes=len(raw) + 1, max_pixels=max_pixels)
    img = decode_image(raw, field)
    try:
        if isinstance(model, FaceDetectingModel):
            return [model.prepare(img)]
        return [prepare_face(img, getattr(model, "image_size", (112, 112)), getattr(model, "resize", False))]
    except ToolkitError as exc:
        raise ToolkitError(f"{field}: {str(exc).split(': ', 1)[-1]}") from None


class Inference:
    """One worker thread for the model (an MXNet executor is not re-entrant) behind a queue of at most ``limit``
    waiting jobs; a job past that is refused at once with 503 instead of piling up."""

    def __init__(self, model, limit: int, max_pixels: int):
        self.model, self.limit, self.max_pixels = model, int(limit), int(max_pixels)
        self.pending = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="face-infer")

    def _embed(self, raws: Sequence[bytes], fields: Sequence[str]) -> np.ndarray:
        faces = []
        for raw, field in zip(raws, fields):
            try:
                faces.extend(decode_faces(raw, field, self.model, self.max_pixels))
            except ImageTooLarge as exc:
                raise ApiError(413, str(exc)) from None
            except ToolkitError as exc:
                raise ApiError(400, str(exc)) from None
        # faces are aligned crops by now: embed them with the plain model (a FaceDetectingModel would detect again)
        embedder = getattr(self.model, "model", self.model) if hasattr(self.model, "detector") else self.model
        return np.asarray(embedder.get_features(faces), np.float32)

    async def embed(self, raws: Sequence[bytes], fields: Sequence[str]) -> np.ndarray:
        """Decode and embed on the worker thread -> ``(N, E)`` float32 L2-normalised."""
        if self.pending >= self.limit:
            raise ApiError(503, f"busy: {self.pending} inference jobs queued (--queue {self.limit}); retry later")
        self.pending += 1  # only touched on the event loop thread
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._embed, raws, fields)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def b64_image(text: object, field: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise ApiError(422, f"{field}: expected a base64 string of a JPEG/PNG image")
    if text.startswith("data:") and "," in text:  # data URL from a browser
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{field}: not valid base64") from None


def create_app(model, gallery: FaceGallery, settings: Settings, api_key: Optional[str]):
    """The ASGI application: FastAPI routes wrapped in :class:`deploy.http_guard.Guard`. ``model`` needs
    ``get_features([rgb uint8]) -> (N, E)`` and ``embedding_size`` (a :class:`deploy.face_model.FaceModel`)."""
    from deploy.server_routes import build_routes

    inference = Inference(model, settings.queue, settings.max_pixels)
    app = build_routes(model, gallery, settings, inference)
    guarded = Guard(app, api_key, settings.max_body, settings.body_timeout)
    guarded.fastapi, guarded.inference = app, inference  # type: ignore[attr-defined]
    return guarded


class FaceService:
    """The service on uvicorn: ``start()`` serves from a thread (tests, benchmarks), ``serve()`` blocks (the CLI);
    ``url`` once started; ``stop()`` closes connections, the inference thread and the gallery."""

    def __init__(self, model, gallery: FaceGallery, settings: Settings, api_key: Optional[str], host: str,
                 port: int, header_timeout: float = 10.0, idle_timeout: float = 5.0, max_connections: int = 1000):
        import uvicorn

        self.gallery, self.settings, self.host = gallery, settings, host
        self.app = create_app(model, gallery, settings, api_key)
        config = uvicorn.Config(self.app, host=host, port=int(port), http=protocol_with_header_timeout(header_timeout),
                                timeout_keep_alive=float(idle_timeout), limit_concurrency=int(max_connections),
                                log_level="warning", access_log=False, lifespan="off", ws="none",
                                log_config=None)  # the toolkit's logging as configured, not uvicorn's
        self.server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None
        self._port_wanted, self.port, self._closed = int(port), None, False

    @property
    def url(self) -> str:
        return f"http://{self.host if ':' not in self.host else '[' + self.host + ']'}:{self.port}"

    def _bind(self) -> socket.socket:
        """Listen before uvicorn runs, so that a bad address is one line here (uvicorn would ``sys.exit``)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port_wanted))
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            self.close()
            raise ToolkitError(f"--host {self.host} --port {self._port_wanted}: cannot listen "
                               f"({exc.strerror or exc})") from None
        sock.set_inheritable(True)
        self.port = int(sock.getsockname()[1])
        return sock

    def start(self, timeout: float = 30.0) -> "FaceService":
        """Serve from a background thread; returns once the service accepts connections."""
        sock = self._bind()
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="face-service",
                                        daemon=True)
        self._thread.start()
        for _ in range(int(timeout * 50)):
            if self.server.started or not self._thread.is_alive():
                break
            self._thread.join(0.02)
        if not self.server.started:
            self.stop()
            raise ToolkitError(f"--host {self.host} --port {self.port}: the service did not start")
        return self

    def serve(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM."""
        sock = self._bind()
        logger.info("serving on %s (gallery %s: %d embeddings)", self.url, self.gallery.db_path, self.gallery.size())
        try:
            self.server.run(sockets=[sock])
        finally:
            self.close()

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.app.inference.close()
            self.gallery.close()


def make_server(model, db_path: str, host: str = "127.0.0.1", port: int = 8080, api_key: Optional[str] = None,
                insecure_no_auth: bool = False, **kwargs) -> FaceService:
    """Open the gallery and build the service (``port=0``: any free port; see ``service.port`` after ``start()``).

    ``kwargs``: :class:`Settings` fields and ``header_timeout``/``idle_timeout``/``max_connections``. An API key is
    required unless ``insecure_no_auth`` on a loopback ``host``.
    """
    service_kw = {k: kwargs.pop(k) for k in ("header_timeout", "idle_timeout", "max_connections") if k in kwargs}
    settings = Settings(**kwargs)
    if api_key is not None and len(api_key) < 8:
        raise ToolkitError("--api-key: too short (use at least 8 characters, e.g. from `openssl rand -hex 16`)")
    if not api_key:
        if not insecure_no_auth:
            raise ToolkitError(f"no API key: pass --api-key KEY or set {API_KEY_ENV} (or --insecure-no-auth on "
                               f"a loopback address)")
        if host not in LOOPBACK_HOSTS:
            raise ToolkitError(f"--insecure-no-auth: only allowed on a loopback --host (127.0.0.1, ::1), not {host}")
    gallery = FaceGallery(db_path)
    try:
        gallery.check_dim(int(model.embedding_size))
        return FaceService(model, gallery, settings, api_key or None, host, port, **service_kw)
    except BaseException:
        gallery.close()
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    from deploy.detect import FaceDetectingModel, add_detect_args, detector_from_args
    from deploy.face_model import add_model_args, model_from_args

    p = argparse.ArgumentParser(description="Face registry HTTP service over a checkpoint and an SQLite gallery.")
    add_model_args(p)
    add_detect_args(p)
    p.set_defaults(batch_size=8)
    p.add_argument("--db", required=True, help="SQLite gallery file (created when absent)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help=f"required key (default: ${API_KEY_ENV})")
    p.add_argument("--insecure-no-auth", action="store_true", help="no API key (loopback --host only)")
    p.add_argument("--threshold", type=float, default=0.3, help="cosine under which a face is 'unknown'")
    p.add_argument("--max-body-mb", type=float, default=MAX_BODY / 2 ** 20, help="largest request body (MiB)")
    p.add_argument("--max-pixels", type=int, default=MAX_IMAGE_PIXELS, help="largest width x height per image")
    p.add_argument("--max-images", type=int, default=32, help="most images in one request")
    p.add_argument("--queue", type=int, default=64, help="inference jobs that may wait; more get 503")
    p.add_argument("--chunk", type=int, default=8, help="images per inference job of a registration")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds to receive a request's headers")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds to receive a request's body")
    p.add_argument("--idle-timeout", type=float, default=5.0, help="seconds an idle keep-alive connection stays")
    p.add_argument("--max-connections", type=int, default=1000, help="concurrent connections (uvicorn's limit)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for flag in ("header_timeout", "idle_timeout", "max_connections"):
        if not getattr(args, flag) > 0:
            raise ToolkitError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be > 0")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    model = model_from_args(args)
    detector = detector_from_args(args)
    if detector is not None:
        model = FaceDetectingModel(model, detector, args.faces)
    service = make_server(model, args.db, args.host, args.port, api_key, args.insecure_no_auth,
                          threshold=args.threshold, max_body=int(args.max_body_mb * 2 ** 20),
                          max_pixels=args.max_pixels, max_images=args.max_images, queue=args.queue, chunk=args.chunk,
                          body_timeout=args.body_timeout, header_timeout=args.header_timeout,
                          idle_timeout=args.idle_timeout, max_connections=args.max_connections)
    try:
        service.serve()
    except KeyboardInterrupt:
        logger.info("stopping")
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
