"""The face service's FastAPI routes and their OpenAPI description (the HTTP front is ``deploy/server.py``).

Bodies are parsed here rather than by FastAPI's own binding so that one endpoint takes JSON (base64 images) and
multipart uploads alike, and so that every failure is one line in ``{"error": ...}`` with the right status.
"""
from __future__ import annotations

import asyncio
import json
from typing import Dict, List, Optional, Tuple

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy.gallery import check_name

API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="the service's --api-key")
API_KEY_DEP = Security(API_KEY)  # documents the key in OpenAPI; deploy/http_guard.py checks it


class RegisterIn(BaseModel):
    name: str
    images: Optional[List[str]] = None
    image: Optional[str] = None


class DetectIn(BaseModel):
    image: str


class DeleteIn(BaseModel):
    name: str


class RegisterOut(BaseModel):
    name: str
    added: int
    count: int


class DetectOut(BaseModel):
    name: str
    score: Optional[float]
    candidate: Optional[str]
    threshold: float


class DeleteOut(BaseModel):
    name: str
    deleted: int


class FaceCount(BaseModel):
    name: str
    count: int


class FacesOut(BaseModel):
    faces: List[FaceCount]
    total: int


def _body_doc(model: type, files: Dict[str, dict]) -> dict:
    """OpenAPI ``requestBody``: the JSON model, or multipart with the same names (files for images)."""
    form = {"type": "object", "properties": {k: v for k, v in files.items()}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()},
        "multipart/form-data": {"schema": form}}}}


_FILE = {"type": "string", "format": "binary"}
_ERRORS = {s: {"description": d, "content": {"application/json": {"example": {"error": "one line"}}}}
           for s, d in ((400, "bad image, base64, JSON or name"), (401, "missing or wrong API key"),
                        (413, "body, image pixels or image count over a limit"), (415, "not JSON or multipart"),
                        (422, "fields of the wrong type"), (503, "inference queue full"))}


def build_routes(model, gallery, settings, inference) -> FastAPI:
    """FastAPI app with the five endpoints and JSON error handlers."""
    from deploy.server import ApiError, b64_image

    app = FastAPI(title="insightface-finetune face service", version="2",
                  description="Register and identify faces against an SQLite gallery. Send the API key as "
                              "X-API-Key. Images: aligned face crops (JPEG/PNG) as base64 JSON or multipart files.")

    async def payload(request: Request, schema: type) -> Tuple[BaseModel, Optional[List[bytes]]]:
        """The validated JSON fields, or for multipart the text fields and the uploaded image bytes."""
        ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=settings.max_images, max_fields=16,
                                          max_part_size=settings.max_body)
            except Exception as exc:  # starlette's MultiPartException and parser errors
                raise ApiError(413 if "Too many files" in str(exc) else 400,
                               f"multipart body: {getattr(exc, 'detail', exc)}") from None
            files = [f for key in ("images", "image") for f in form.getlist(key) if not isinstance(f, str)]
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            if "image" in schema.model_fields and files:
                fields.setdefault("image", "(upload)")
            raws = [await f.read() for f in files]
            try:
                return schema.model_validate(fields), raws
            except ValidationError as exc:
                raise ApiError(422, _validation_line(exc)) from None
        body = await request.body()
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"body: not valid JSON ({exc})") from None
        except RecursionError:  # "[[[[..." a million deep fits in the body limit
            raise ApiError(400, "body: JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise ApiError(422, "body: expected a JSON object")
        try:
            return schema.model_validate(data), None
        except ValidationError as exc:
            raise ApiError(422, _validation_line(exc)) from None

    def name_of(value: str) -> str:
        try:
            return check_name(value)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    @app.post("/registerFace", response_model=RegisterOut, responses=_ERRORS,
              openapi_extra=_body_doc(RegisterIn, {"name": {"type": "string"}, "images": {"type": "array",
                                                                                         "items": _FILE}}))
    async def register_face(request: Request, key: Optional[str] = API_KEY_DEP) -> dict:
        """Add one or more images of a person (all are checked before anything is stored)."""
        body, raws = await payload(request, RegisterIn)
        name = name_of(body.name)
        if raws is None:
            texts = body.images if body.images is not None else ([body.image] if body.image is not None else [])
            if len(texts) > settings.max_images:
                raise ApiError(413, f"images: {len(texts)} images, more than --max-images {settings.max_images}")
            raws = [b64_image(t, f"images[{i}]") for i, t in enumerate(texts)]
        if not raws:
            raise ApiError(422, "images: expected a non-empty list of base64 JPEG/PNG images (or 'image')")
        fields = [f"images[{i}]" for i in range(len(raws))]
        embs = []
        for start in range(0, len(raws), settings.chunk):  # one job per chunk: detections get in between
            embs.append(await inference.embed(raws[start:start + settings.chunk], fields[start:start + settings.chunk]))
        count = await asyncio.to_thread(gallery.add, name, np.concatenate(embs))  # SQLite commit: off the loop
        return {"name": name, "added": len(raws), "count": count}

    @app.post("/detectFace", response_model=DetectOut, responses=_ERRORS,
              openapi_extra=_body_doc(DetectIn, {"image": _FILE}))
    async def detect_face(request: Request, key: Optional[str] = API_KEY_DEP) -> dict:
        """Identify the face in one image: the best-matching name, or ``unknown`` under the threshold."""
        body, raws = await payload(request, DetectIn)
        if raws is None:
            raws = [b64_image(body.image, "image")]
        if len(raws) != 1:
            raise ApiError(422, f"image: expected exactly one image, got {len(raws)}")
        emb = (await inference.embed(raws, ["image"]))[0]
        best, score = await asyncio.to_thread(gallery.match, emb)  # (N, E) @ (E,): ~0.1 s at 1M rows
        known = best is not None and score >= settings.threshold
        return {"name": best if known else "unknown", "score": score, "candidate": best,
                "threshold": settings.threshold}

    @app.post("/deleteFace", response_model=DeleteOut, responses=_ERRORS,
              openapi_extra=_body_doc(DeleteIn, {"name": {"type": "string"}}))
    async def delete_face(request: Request, key: Optional[str] = API_KEY_DEP) -> dict:
        """Remove every stored image of a person."""
        body, _ = await payload(request, DeleteIn)
        name = name_of(body.name)
        n = await asyncio.to_thread(gallery.delete, name)
        if not n:
            raise ApiError(404, f"name {name!r}: not in the gallery")
        return {"name": name, "deleted": n}

    @app.get("/faces", response_model=FacesOut, responses={401: _ERRORS[401]})
    async def faces(key: Optional[str] = API_KEY_DEP) -> dict:
        """Every registered name with its number of stored images."""
        listing = [{"name": n, "count": c} for n, c in gallery.listing()]
        return {"faces": listing, "total": sum(f["count"] for f in listing)}

    @app.get("/health")
    async def health() -> dict:
        """Liveness (no API key needed): the model's embedding size and the inference queue."""
        return {"status": "ok", "embedding_size": int(model.embedding_size), "queue": inference.pending,
                "queue_limit": inference.limit}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        known = {404: f"{request.url.path}: no such endpoint",
                 405: f"{request.method} {request.url.path}: method not allowed"}
        message = known.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _validation_line(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("deploy.server").exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    return app


def _validation_line(exc) -> str:
    """pydantic's errors as one line: ``images.0: Input should be a valid string; name: Field required``."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
