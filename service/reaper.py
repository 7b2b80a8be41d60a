"""Jobs whose worker vanished, or whose message was lost, are sent to the workers again.

`reap` is one sweep. The service API process runs it on a timer (`app/reaper.py`), because the
API is always up: beat's `jobs.reap` message waits in a queue until a worker is free, and the
documented deployment's one worker is busy for the whole length of a job, which is exactly when
a second job's worker may have died. Celery beat may still send `jobs.reap` (`workers/tasks.py`);
sweeps running at once are harmless, as each requeue is one conditional UPDATE that only one of
them wins (a requeued job has a fresh `updated_at` and is no longer expired).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from service.db import session_scope
from service.repositories import jobs


def reap(
    factory: sessionmaker[Session],
    queued_older_than: timedelta,
    send: Callable[[uuid.UUID], None],
    *,
    queue: str | None = None,
    waiting: Callable[[], int] | None = None,
) -> int:
    """One sweep: end abandoned cancels, requeue expired jobs and send each, and send the jobs
    queued longer than `queued_older_than` (a lease; 0 where no broker keeps messages) whose message
    was lost; how many were sent.

    `waiting` counts the messages waiting on the broker for `queue`. With it, only as many queued
    jobs are sent again as have no message there (the oldest first): jobs that wait their turn
    behind busy workers still have theirs, and sending them every sweep would pile up a copy per
    job per lease. Without it (the embedded worker, which drops duplicates) every such job is sent."""
    with session_scope(factory) as s:
        jobs.cancel_abandoned(s)
        # A running job whose lease expired goes back to queued (its worker is gone; its message went
        # with it), and a queued job nobody started within a lease may have lost its message. Each
        # sent gets a fresh updated_at, so the next sweep does not send it again before another lease.
        queued = jobs.count_queued(s, queue) if waiting is not None else 0  # before the requeues
        expired = jobs.requeue_expired(s)
        stale = jobs.stale_queued(s, queued_older_than, queue)
        if waiting is not None and stale:
            stale = stale[: max(0, queued - waiting())]
        jobs.mark_sent(s, stale)
    ids = expired + stale
    for jid in ids:
        send(jid)
    return len(ids)
