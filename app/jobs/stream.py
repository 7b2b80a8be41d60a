"""`GET /v1/jobs/{id}/stream`: a job's events as server-sent events, as they are written.

Clients that follow a job do not poll. `jobs.add_event` NOTIFYs the channel `gatt_job_events` with
the job's id in the event's own transaction (Postgres delivers it on commit), and each API process
keeps one LISTEN connection (`EventFeed`) that wakes the streams following that job; they then
share one read of the new events (`EventFeed.read`): one query per job and notification, however
many clients follow it. No event, no query. Without LISTEN (the embedded mode's SQLite, or while
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
from dataclasses import dataclass

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
        # Per job: how many times it was woken, and the read in flight (shared by its followers).
        self._generation: dict[uuid.UUID, int] = defaultdict(int)
        self._reads: dict[uuid.UUID, _SharedRead] = {}
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
                self._generation.pop(job_id, None)

    def generation(self, job_id: uuid.UUID) -> int:
        """How many times the job was woken: a follower notes it when it clears its wake."""
        return self._generation[job_id]

    async def read(self, job_id: uuid.UUID, after: Cursor, generation: int | None) -> Batch:
        """The job's events and metrics after `after`, and its status.

        Followers woken together share one database read: a read in flight serves a follower when it
        reads from no later a cursor and began after the wake-up the follower saw (`generation`), so
        it holds everything that wake-up announced. Otherwise the follower starts the read. A
        `generation` of None asks for a read that starts now (after having seen the job end)."""
        shared = self._reads.get(job_id)
        if (
            shared is None
            or generation is None
            or shared.generation < generation
            or shared.after[0] > after[0]
            or shared.after[1] > after[1]
        ):
            task = asyncio.ensure_future(run_in_threadpool(_read, self.factory, job_id, after))
            shared = _SharedRead(after, self._generation[job_id], task)
            self._reads[job_id] = shared
            task.add_done_callback(lambda _: self._forget(job_id, shared))
        return (await asyncio.shield(shared.task)).after(after)

    def _forget(self, job_id: uuid.UUID, shared: _SharedRead) -> None:
        if self._reads.get(job_id) is shared:
            del self._reads[job_id]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task

    def _wake(self, job_id: uuid.UUID) -> None:
        followers = self._followers.get(job_id)
        if not followers:
            return
        self._generation[job_id] += 1
        for wake in followers:
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


@dataclass(frozen=True)
class Batch:
    events: list[Event]
    metrics: list[Metric]
    status: JobStatus | None
    full: bool  # a page was full: more may follow at once

    def after(self, cursor: Cursor) -> Batch:
        """What of it follows `cursor` (a follower that had read further than the shared read)."""
        events = [e for e in self.events if e.seq > cursor[0]]
        metrics = [m for m in self.metrics if m.step > cursor[1]]
        return Batch(events, metrics, self.status, self.full)


@dataclass(frozen=True)
class _SharedRead:
    after: Cursor
    generation: int
    task: asyncio.Future[Batch]


def _read(factory: sessionmaker[Session], job_id: uuid.UUID, after: Cursor) -> Batch:
    with session_scope(factory) as s:
        events = jobs.events(s, job_id, after[0], PAGE)
        metrics = jobs.metrics(s, job_id, after[1], PAGE)
        status = jobs.status(s, job_id)
        return Batch(
            [Event.model_validate(r) for r in events],
            [Metric.model_validate(r, from_attributes=True) for r in metrics],
            status,
            len(events) == PAGE or len(metrics) == PAGE,
        )


async def job_events(feed: EventFeed, job_id: uuid.UUID, after: Cursor) -> AsyncIterator[ServerSentEvent]:
    """The job's events and metrics after `after`, then each new one as it is written, until the job
    has ended."""
    seq, step = after
    with feed.follow(job_id) as wake:
        ended = False
        while True:
            wake.clear()
            # Once the job is seen ended, one more read that starts after that one: the ending's
            # event may have committed after the events were read.
            generation = None if ended else feed.generation(job_id)
            batch = await feed.read(job_id, (seq, step), generation)
            for event in batch.events:
                seq = event.seq
                yield ServerSentEvent(event.model_dump_json(), event="job_event", id=f"{seq}.{step}")
            for metric in batch.metrics:
                step = metric.step
                yield ServerSentEvent(metric.model_dump_json(), event="metric", id=f"{seq}.{step}")
            if batch.full:
                continue
            status = batch.status
            if status in jobs.TERMINAL:
                if ended:  # this was the read after seeing the end: the ending's event is in by now
                    yield ServerSentEvent(json.dumps({"status": status}), event="end", id=f"{seq}.{step}")
                    return
                ended = True
                continue
            await wake.wait()
