"""What stands between the network and the face service's endpoints: one ASGI middleware and uvicorn's protocol
with a header deadline.

:class:`Guard` (ASGI middleware), in this order, before an endpoint runs or a body byte is read:

1. API key (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``, constant-time compare) on every path but the open
   ones (``/health``, ``/docs``, ``/openapi.json``) -> 401. Without a key (``--insecure-no-auth``, loopback only)
   the ``Host`` must be a loopback name (-> 403): a DNS-rebinding page cannot reach the service either.
2. A browser's ``Origin`` other than the service's own -> 403 (CSRF: a custom header or JSON body already forces a
   CORS preflight that is never granted; this also covers multipart forms, which browsers send without one).
3. ``Content-Length`` over the limit -> 413 at once (the body is never read; the connection is closed).
4. ``Content-Type`` of a POST not JSON or multipart -> 415 (``text/plain`` is how a CSRF form posts "JSON").
5. The body is read with a running count (413 as soon as it passes the limit, chunked or not) and a deadline for
   the whole body (408), then replayed to the endpoint.

:class:`TimedH11Protocol` closes a connection whose request headers have not all arrived within ``header_timeout``
seconds (slowloris: a byte every 5 s would otherwise hold it forever), and answers malformed HTTP (a negative
``Content-Length``, oversized headers) with a JSON 400 instead of uvicorn's plain text. Idle keep-alive connections
are closed by uvicorn after ``timeout_keep_alive``. Every refusal is ``{"error": "..."}``.

A refusal sent before the request body was all read (413, 408, a malformed request's 400) ends in a *lingering close*:
the answer is flushed, the sending side is shut (FIN), and what the client still sends is read and thrown away for up
to ``linger`` seconds before the socket is closed. Closing at once with unread bytes makes the kernel send a reset,
which can destroy the answer in the client's receive queue before the client reads it (the client then sees
"connection reset" instead of the 413). Nothing read while lingering is kept, so memory does not grow.
"""
from __future__ import annotations

import asyncio
import hmac
import json
from typing import Iterable, Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


async def send_error(send, status: int, message: str, close: bool = False, extra: Iterable = ()) -> None:
    """Answer ``{"error": message}`` with ``status``; ``close`` when the request body was left unread."""
    body = error_body(message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def host_name(host_header: str) -> str:
    """``"[::1]:8080"`` -> ``"[::1]"``, ``"localhost:80"`` -> ``"localhost"``."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """ASGI middleware enforcing the checks in the module docstring; see :func:`deploy.server.create_app`."""

    def __init__(self, app, api_key: Optional[str], max_body: int, body_timeout: float):
        self.app, self.max_body, self.body_timeout = app, int(max_body), float(body_timeout)
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        problem = self._refuse(scope, headers)
        if problem:
            await send_error(send, *problem, close=True)
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(receive, send)
            if body is None:
                return
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # only http.disconnect can come now

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)

    def _refuse(self, scope, headers: dict):
        """``(status, message)`` when the request is refused before its body is read, else ``None``."""
        path, method = scope["path"], scope["method"]
        host = headers.get("host", "")
        if path not in OPEN_PATHS:
            if self.api_key is None:
                if host_name(host) not in LOOPBACK_HOSTS:
                    return 403, f"Host {host!r}: without an API key the service only answers loopback names"
            else:
                auth = headers.get("authorization", "")
                given = headers.get("x-api-key") or (auth[7:].strip() if auth.lower().startswith("bearer ") else "")
                if not given or not hmac.compare_digest(given.encode("latin-1"), self.api_key):
                    return 401, "missing or wrong API key (send the header X-API-Key: KEY)"
        origin = headers.get("origin")
        if origin is not None and origin != "null" and origin.split("://", 1)[-1] != host:
            return 403, f"Origin {origin!r}: cross-site requests are refused"
        if origin == "null":
            return 403, "Origin 'null': cross-site requests are refused"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return 413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body} bytes"
        if method in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype not in ("application/json", "multipart/form-data"):
                return 415, (f"Content-Type {ctype or '(none)'!r}: send application/json (or multipart/form-data "
                             "image uploads)")
        return None

    async def _read_body(self, receive, send) -> Optional[bytes]:
        """The whole body, or ``None`` after answering 413 (too large) / 408 (too slow) / nothing (client left)."""
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                await send_error(send, 408, f"request body not received within {self.body_timeout:g} s", close=True)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await send_error(send, 413, f"request body exceeds the limit of {self.max_body} bytes "
                                            f"(stopped reading at {size})", close=True)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _LingeringTransport:
    """The socket transport as uvicorn sees it: ``close()`` while the request body is still arriving becomes a
    lingering close (see the module docstring); everything else is the real transport's."""

    def __init__(self, transport, protocol: "TimedH11Protocol"):
        self._transport, self._protocol, self._lingering = transport, protocol, False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def close(self) -> None:
        if self._lingering or self._transport.is_closing():
            return
        if self._protocol.conn.their_state is h11.SEND_BODY:
            self.linger_close()
        else:
            self._transport.close()

    def linger_close(self) -> None:
        """Flush the answer, shut the sending side and drop what still arrives for ``linger`` seconds, then close."""
        if self._lingering or self._transport.is_closing():
            return
        if not self._transport.can_write_eof() or self._protocol.linger <= 0:
            self._transport.close()
            return
        self._lingering = True
        self._transport.write_eof()  # the answer is flushed first, then FIN
        self._transport.resume_reading()  # uvicorn may have paused reads while its body buffer was full
        self._protocol.start_lingering()


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers, JSON 400s and a lingering close (subclassed with
    ``header_timeout`` set, see :func:`protocol_with_header_timeout`)."""

    header_timeout = 10.0
    linger = 2.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._header_timer = self._linger_timer = None
        super().connection_made(_LingeringTransport(transport, self))
        self._arm()

    def start_lingering(self) -> None:
        self._disarm()
        self._linger_timer = self.loop.call_later(self.linger, self._end_lingering)

    def _end_lingering(self) -> None:
        self._linger_timer = None
        self.transport._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            return  # lingering: the rest of a refused body is read and dropped
        super().data_received(data)

    def eof_received(self):
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._end_lingering()  # the client has sent everything and read (or dropped) the answer
            return None
        return super().eof_received()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        waiting = self.cycle is None or self.cycle.response_complete  # between requests or inside a header
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # headers are in; the body has its own deadline in Guard

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's headers (an idle connection is closed by keep-alive sooner)

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = error_body(f"malformed HTTP request ({msg.rstrip('.')})")
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            pass
        self.transport.linger_close()  # a malformed request may still be sending its body


def protocol_with_header_timeout(seconds: float) -> type:
    """A :class:`TimedH11Protocol` subclass with ``header_timeout = seconds`` (uvicorn takes a class)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": float(seconds)})
