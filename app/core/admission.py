"""At most `limit` requests at once between arrival and the start of their response.

Why: FastAPI runs a request's sync dependencies and its endpoint as separate thread-pool calls
(`get_session`, `current_team`, the endpoint, the session's commit and close). A request holds its
pooled database connection from the key lookup until that commit, and in between it waits for a
thread more than once. Without a bound, enough concurrent requests fill the thread pool (40 threads)
with requests waiting for a connection while every connection belongs to a request waiting for a
thread: the server stalls until `pool_timeout` and answers 500s (measured in docs/benchmarks.md,
"API polling"). With fewer requests admitted than the pool has connections, a thread never waits
for a connection that only a thread-less request could give back.

The slot is released when the response starts: by then the session dependency (scope "function")
has committed and returned its connection, so a slow streamed download (a checkpoint archive) does
not keep a slot. Requests beyond the limit wait in the event loop, which costs no thread and no
connection. `/healthz` and `/metrics` are never held back: a probe or a scrape must not fail because the
server is busy.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

EXEMPT_PATHS = frozenset({"/healthz", "/metrics"})  # probes and scrapes see a busy server too


class AdmissionLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self._semaphore: asyncio.Semaphore | None = None  # made in the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit)
        semaphore = self._semaphore
        await semaphore.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                semaphore.release()

        # A request that waits without a thread or a connection (a chat reply, app/jobs/chat.py) gives
        # its slot back once its session has closed.
        scope["gatt.admission.release"] = release

        async def send_and_release(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            release()  # no response started (the client went away, or an error escaped)
