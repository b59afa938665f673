"""What every request passes through before a route: a body-size limit, a per-token rate
limit, and the security and cache headers on every answer.

Each is a plain ASGI middleware (no ``BaseHTTPMiddleware``): nothing is buffered or copied
between the route and the socket, so streamed answers and 304s stay as cheap as before. The
limits answer with the API's usual error body (``{"error", "message", "field"}``).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

from cachetools import LRUCache
from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpo.api.errors import error_response
from hpo.service.settings import Settings

# The dashboard's own files and scripts only; no inline code, no other origin, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# The interactive API docs load their scripts from a CDN: they keep the browser's defaults.
DOCS_PATHS = ("/docs", "/redoc")


def install(app: FastAPI, settings: Settings) -> None:
    """Put the three middlewares in front of ``app``: headers outermost, so that the limits'
    own answers carry them too; then the rate limit; then the body limit."""
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RateLimit, per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst)
    app.add_middleware(SecurityHeaders)


class SecurityHeaders:
    """Adds ``X-Content-Type-Options``, ``X-Frame-Options``, ``Referrer-Policy`` and the
    Content-Security-Policy to every HTTP answer, and a ``Cache-Control`` where the route set
    none: ``no-cache`` (keep it, but revalidate) for an answer with an ETag, else ``no-store``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = not scope["path"].startswith(DOCS_PATHS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
                if policy:
                    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "no-cache" if "etag" in headers else "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyLimit:
    """Answers 413 to a request whose body is larger than ``max_bytes``.

    A declared ``Content-Length`` is judged before a byte of the body is read, and the answer
    closes the connection, so the rest is never read. A chunked body (no length) is read up to
    the limit, then either refused or handed on whole.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(f"{int(declared)} bytes", scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(f"more than {self.max_bytes} bytes", scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        await self.app(scope, _replay(messages, receive), send)

    async def _refuse(self, size: str, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            "payload_too_large",
            f"body: the request body is {size}; at most {self.max_bytes} bytes are accepted",
            field="body",
        )
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands out ``messages`` first, then asks the server again."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


class RateLimit:
    """At most ``per_s`` requests a second per caller, in bursts of up to ``burst``: a token
    bucket per API token, and one ``ADDRESS_SHARE`` times larger per client address (the
    ranks and notebooks of one host share it), kept in memory for the callers seen last. A
    request spends from both, so neither spelling one token many ways nor sending many
    made-up tokens from one address gets past the limits. Over a limit: 429 with
    ``Retry-After`` (whole seconds). ``per_s <= 0`` turns the limit off.

    Buckets live in one process's memory: each server of a deployment counts on its own.
    """

    def __init__(
        self,
        app: ASGIApp,
        per_s: float,
        burst: int,
        *,
        callers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.per_s = per_s
        self.burst = max(1, burst)
        self.clock = clock
        # Only ever touched from the event loop, so no lock: caller -> (tokens, as of when).
        self.buckets: LRUCache[bytes, tuple[float, float]] = LRUCache(maxsize=callers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.per_s <= 0:
            await self.app(scope, receive, send)
            return
        wait_s = self.take(*_callers(scope))
        if wait_s <= 0:
            await self.app(scope, receive, send)
            return
        response = error_response(
            429,
            "rate_limited",
            f"too many requests: at most {self.per_s:g} a second (bursts of {self.burst}) "
            f"per token; retry in {wait_s:.2f} s",
        )
        response.headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
        await response(scope, receive, send)

    def take(self, *callers: tuple[bytes, float]) -> float:
        """Spend one request of every caller's bucket (``(key, share)``: a bucket ``share``
        times the base rate and burst): 0 when each had one, else the seconds until all will
        have one again (nothing is spent then)."""
        now = self.clock()
        levels = {}
        for caller, share in callers:
            burst, rate = self.burst * share, self.per_s * share
            tokens, then = self.buckets.get(caller, (float(burst), now))
            levels[caller] = (min(float(burst), tokens + (now - then) * rate), rate)
        waits = [(1 - tokens) / rate for tokens, rate in levels.values() if tokens < 1]
        for caller, (tokens, _) in levels.items():
            self.buckets[caller] = (tokens if waits else tokens - 1, now)
        return max(waits, default=0.0)


# A client address may send this many times one token's rate (its ranks, notebooks, pages).
ADDRESS_SHARE = 10


def _callers(scope: Scope) -> tuple[tuple[bytes, float], ...]:
    """Whom a request counts against: its client address, and its bearer token as the server
    reads it (scheme in any case, spaces around the token ignored; a digest, so the secret
    itself is not kept)."""
    host = (scope.get("client") or ("?", 0))[0]
    callers = [(b"a" + str(host).encode(), float(ADDRESS_SHARE))]
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, given = value.partition(b" ")
            token = scheme.lower() + b" " + given.strip()
            callers.append((b"t" + hashlib.blake2b(token, digest_size=16).digest(), 1.0))
    return tuple(callers)
