"""A request with a body shows a valid key, then sends the body in full at a minimum rate, and only
then is admitted.

Why: the admission limit (app/core/admission.py) gives a few requests at a time a slot, and a slot
used to be taken before the body was read. About 20 connections that sent `POST /v1/jobs` headers
with a large `Content-Length` and then one byte every 2 s held every slot, without a key, and
`/readyz` and every team's requests timed out until those sockets closed.

Here the key is checked first (`authenticate`: one thread hop, one short session, at most
`auth_slots` at once, which are the connections the admission limit leaves spare, so they never wait
on admitted requests), then the body is read, outside the limit, into memory up to 1 MiB and into a
temporary file beyond that, and only then does the request wait for a slot and run, reading the
stored body. Without a key nothing is read; a slow sender with one costs an idle coroutine and a
socket, not a slot. The endpoint authenticates again as usual (the key may be revoked meanwhile).
The sender must also keep up a minimum average rate: after `grace_s`, every second must have
brought `min_bytes_per_s` more bytes, or the request is answered 408 `request_timeout` and the
connection closed. A body larger than the
largest any route takes is refused (413) from its `Content-Length`, before a byte is read; each
route's own cap still applies after (app/core/body_limit.py).
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from typing import IO

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import AppError

MEMORY_BYTES = 1024 * 1024  # bodies up to this stay in memory; larger ones go to a temporary file
CHUNK = 64 * 1024


class _TooSlow(Exception):
    pass


class _TooLarge(Exception):
    pass


class BodyFirst:
    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Callable[[str | None], object],
        auth_slots: int,
        max_bytes: int,
        grace_s: float,
        min_bytes_per_s: float,
    ) -> None:
        self.app = app
        self.authenticate = authenticate  # raises an AppError (401) for a missing or bad key
        self.auth_slots = auth_slots
        self._auth_semaphore: asyncio.Semaphore | None = None  # made in the server's event loop
        self.max_bytes = max_bytes
        self.grace_s = grace_s
        self.min_bytes_per_s = min_bytes_per_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        try:
            await self._authenticate(scope)
        except AppError as error:
            await _answer(scope, send, error)
            return
        too_large = AppError(
            f"The request body is larger than {self.max_bytes} bytes.",
            code="payload_too_large",
            status_code=413,
        )
        if (_content_length(scope) or 0) > self.max_bytes:
            await _answer(scope, send, too_large)
            return
        body = tempfile.SpooledTemporaryFile(max_size=MEMORY_BYTES)  # noqa: SIM115 (closed below)
        try:
            try:
                size = await self._read(receive, body)
            except _TooSlow:
                message = f"The request body arrived slower than {self.min_bytes_per_s:g} bytes a second."
                slow = AppError(
                    message, code="request_timeout", status_code=408, headers={"Connection": "close"}
                )
                await _answer(scope, send, slow)
                return
            except _TooLarge:
                await _answer(scope, send, too_large)
                return
            if size is None:
                return  # the client left before its body was in: there is no one to answer
            body.seek(0)
            await self.app(scope, _replay(body, size, receive), send)
        finally:
            body.close()

    async def _authenticate(self, scope: Scope) -> None:
        authorization = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
        )
        if self._auth_semaphore is None:
            self._auth_semaphore = asyncio.Semaphore(self.auth_slots)
        async with self._auth_semaphore:
            await run_in_threadpool(self.authenticate, authorization)

    async def _read(self, receive: Receive, body: IO[bytes]) -> int | None:
        """Store the whole body and return its size; None if the client disconnected first."""
        started, size = time.monotonic(), 0
        while True:
            allowed = started + self.grace_s + size / self.min_bytes_per_s - time.monotonic()
            if allowed <= 0:
                raise _TooSlow
            try:
                message = await asyncio.wait_for(receive(), allowed)
            except TimeoutError:
                raise _TooSlow from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            body.write(chunk)
            if not message.get("more_body", False):
                return size


def _replay(body: IO[bytes], size: int, receive: Receive) -> Receive:
    """The stored body in chunks, then the client's own messages (its disconnect)."""
    sent = False

    async def receive_stored() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        chunk = body.read(CHUNK)
        sent = body.tell() >= size
        return {"type": "http.request", "body": chunk, "more_body": not sent}

    return receive_stored


def _has_body(scope: Scope) -> bool:
    chunked = any(k == b"transfer-encoding" and b"chunked" in v for k, v in scope["headers"])
    return chunked or (_content_length(scope) or 0) > 0


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _answer(scope: Scope, send: Send, error: AppError) -> None:
    response = JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)
    await response(scope, _disconnected, send)


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}
