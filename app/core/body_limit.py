"""A cap on request body size, counted as the body streams in.

`BodyLimitMiddleware` gives every request a default cap (`max_json_body_bytes`). A route that accepts
more (the corpus upload) raises its own cap with `set_body_limit` before it reads the body, so the cap
lives next to the route rather than in a table of paths here. A declared `Content-Length` over the cap
is refused on the first read, before any byte is taken; a body without one (chunked) is refused as
soon as the count passes the cap. Requests that never read their body are not affected.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_SCOPE_KEY = "gatt.body_limit"


class BodyTooLarge(HTTPException):
    """An HTTPException on purpose: FastAPI re-raises those from its body parsing (anything else
    becomes a 400 there), and the global handler renders it as `payload_too_large`."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"The request body is larger than {limit} bytes.")


@dataclass
class _Counter:
    limit: int
    content_length: int | None
    received: int = 0

    def check(self) -> None:
        if self.content_length is not None and self.content_length > self.limit:
            raise BodyTooLarge(self.limit)
        if self.received > self.limit:
            raise BodyTooLarge(self.limit)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared: int | None = int(Request(scope).headers.get("content-length", ""))
        except ValueError:
            declared = None
        counter = _Counter(self.max_body_bytes, declared)
        scope[_SCOPE_KEY] = counter

        async def receive_counted() -> Message:
            counter.check()
            message = await receive()
            if message["type"] == "http.request":
                counter.received += len(message.get("body", b""))
                counter.check()
            return message

        await self.app(scope, receive_counted, send)


def set_body_limit(request: Request, limit: int) -> None:
    """Give this request a different body cap; call before reading the body."""
    counter = request.scope.get(_SCOPE_KEY)
    if counter is not None:
        counter.limit = limit
