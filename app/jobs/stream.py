"""`GET /v1/jobs/{id}/stream`: a job's events as server-sent events, as they are written.

Clients that follow a job do not poll. `jobs.add_event` NOTIFYs the channel `gatt_job_events` with
the job's id in the event's own transaction (Postgres delivers it on commit), and each API process
keeps one LISTEN connection (`EventFeed`) that wakes the streams following that job; each then
reads its new events once. No event, no query. Without LISTEN (the embedded mode's SQLite, or while
the listener reconnects) the feed wakes every stream each `poll_s` instead.

Messages are `event: job_event` (the `Event` schema's JSON) and `event: metric` (a training step,
the `Metric` schema), each with `id: <event seq>.<metric step>`, what has been sent so far. A
client that reconnects with that `Last-Event-ID` gets what came after it: no gap, no repeat (a step
recomputed after a worker takeover is not sent again). After the job's terminal event the stream
sends `event: end` with the final status and closes. A comment every `PING_S` keeps proxies from closing a quiet stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator

from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sse_starlette import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from app.jobs.schemas import Event, Metric
from service.db import session_scope
from service.models import JobStatus
from service.repositories import jobs
from service.repositories.jobs import EVENTS_CHANNEL

log = logging.getLogger(__name__)

PING_S = 15
PAGE = 500


class EventFeed:
    """One per API process: wakes the streams following a job when it has new events."""

    def __init__(self, factory: sessionmaker[Session], database_url: str, poll_s: float = 1.0) -> None:
        self.factory, self.poll_s = factory, poll_s
        url = make_url(database_url)
        # psycopg's own DSN for the listener (no SQLAlchemy driver suffix); None: no LISTEN (SQLite).
        self.dsn = (
            url.set(drivername="postgresql").render_as_string(hide_password=False)
            if (url.get_backend_name() == "postgresql")
            else None
        )
        self.listening = False
        self._warned = False
        self._followers: dict[uuid.UUID, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def follow(self, job_id: uuid.UUID) -> Iterator[asyncio.Event]:
        """An event set whenever the job may have new events (clear it before reading them)."""
        if self._task is None or self._task.done() or self._task.get_loop() is not asyncio.get_running_loop():
            self._task = asyncio.get_running_loop().create_task(self._run())
        wake = asyncio.Event()
        self._followers[job_id].add(wake)
        try:
            yield wake
        finally:
            self._followers[job_id].discard(wake)
            if not self._followers[job_id]:
                del self._followers[job_id]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task

    def _wake(self, job_id: uuid.UUID) -> None:
        for wake in self._followers.get(job_id, ()):
            wake.set()

    def _wake_all(self) -> None:
        for job_id in list(self._followers):
            self._wake(job_id)

    async def _run(self) -> None:
        while True:
            if self.dsn is not None:
                try:
                    await self._listen(self.dsn)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Postgres away: poll meanwhile, listen again soon
                    if self.listening or not self._warned:  # once per outage, not every retry
                        log.warning("event feed: LISTEN failed (%s); polling until it is back", exc)
                    self._warned = True
                self.listening = False
            for _ in range(5 if self.dsn else 1):
                self._wake_all()
                await asyncio.sleep(self.poll_s)

    async def _listen(self, dsn: str) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
            await connection.execute(f"LISTEN {EVENTS_CHANNEL}")
            self.listening, self._warned = True, False
            self._wake_all()  # anything written while nobody listened
            async for notify in connection.notifies():
                with contextlib.suppress(ValueError):
                    self._wake(uuid.UUID(notify.payload))


Cursor = tuple[int, int]  # (event seq, metric step) sent so far


def parse_cursor(value: str) -> Cursor | None:
    """A message id, `<seq>.<step>` (or `<seq>`), as sent by this stream; None if it is not one."""
    seq, _, step = value.strip().partition(".")
    if not seq.isdigit() or (step and not step.isdigit()):
        return None
    cursor = (int(seq), int(step or 0))
    return cursor if max(cursor) < 2**31 else None


def _read(
    factory: sessionmaker[Session], job_id: uuid.UUID, after: Cursor
) -> tuple[list[Event], list[Metric], JobStatus | None]:
    with session_scope(factory) as s:
        events = jobs.events(s, job_id, after[0], PAGE)
        metrics = jobs.metrics(s, job_id, after[1], PAGE)
        status = jobs.status(s, job_id)
        return (
            [Event.model_validate(r) for r in events],
            [Metric.model_validate(r, from_attributes=True) for r in metrics],
            status,
        )


async def job_events(feed: EventFeed, job_id: uuid.UUID, after: Cursor) -> AsyncIterator[ServerSentEvent]:
    """The job's events and metrics after `after`, then each new one as it is written, until the job
    has ended."""
    seq, step = after
    with feed.follow(job_id) as wake:
        ended = False
        while True:
            wake.clear()
            events, metrics, status = await run_in_threadpool(_read, feed.factory, job_id, (seq, step))
            for event in events:
                seq = event.seq
                yield ServerSentEvent(event.model_dump_json(), event="job_event", id=f"{seq}.{step}")
            for metric in metrics:
                step = metric.step
                yield ServerSentEvent(metric.model_dump_json(), event="metric", id=f"{seq}.{step}")
            if len(events) == PAGE or len(metrics) == PAGE:
                continue
            if status in jobs.TERMINAL:
                if ended:  # this was the read after seeing the end: the ending's event is in by now
                    yield ServerSentEvent(json.dumps({"status": status}), event="end", id=f"{seq}.{step}")
                    return
                ended = True
                continue
            await wake.wait()
