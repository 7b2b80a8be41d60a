"""Headers every response carries, whatever route or error produced it.

- `X-Content-Type-Options: nosniff`: a browser renders a body only as its declared type, so a
  tenant's text served as JSON (an instruction, a sample) can never be run as HTML or script.
- `Cache-Control: no-store` unless the route set its own: answers are per key and change as jobs
  run; no proxy or browser cache may keep or share them.

Plain ASGI, so streamed bodies (checkpoint archives) stay streamed.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_NOSNIFF = (b"x-content-type-options", b"nosniff")
_NO_STORE = (b"cache-control", b"no-store")


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                if _NOSNIFF[0] not in names:
                    headers.append(_NOSNIFF)
                if _NO_STORE[0] not in names:
                    headers.append(_NO_STORE)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
