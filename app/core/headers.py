"""Headers added to every response, whatever route or error produced it.

`ResponseHeaders` adds each of its headers unless the route set that header itself. Plain ASGI, so
streamed bodies (checkpoint archives) stay streamed. The service adds `SECURITY_HEADERS`:

- `X-Content-Type-Options: nosniff`: a browser renders a body only as its declared type, so a
  tenant's text served as JSON (an instruction, a sample) can never be run as HTML or script.
- `Cache-Control: no-store` unless the route set its own: answers are per key and change as jobs
  run; no proxy or browser cache may keep or share them.

The embedded mode adds `X-Gatt-Mode: embedded` the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class ResponseHeaders:
    def __init__(self, app: ASGIApp, headers: Mapping[str, str]) -> None:
        self.app = app
        self.headers = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.headers if name not in present]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
