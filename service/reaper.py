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
    factory: sessionmaker[Session], queued_older_than: timedelta, send: Callable[[uuid.UUID], None]
) -> int:
    """One sweep: end abandoned cancels, requeue expired jobs and those queued longer than
    `queued_older_than` (a lease; 0 where no broker keeps messages), send each; how many were sent."""
    with session_scope(factory) as s:
        jobs.cancel_abandoned(s)
        # A running job whose lease expired goes back to queued (its worker is gone), and a queued
        # job nobody started within a lease (its message was lost) is sent again. Both get a fresh
        # updated_at, so the next sweep does not send them again before another lease has passed.
        ids = jobs.requeue_expired(s) + jobs.stale_queued(s, queued_older_than)
    for jid in ids:
        send(jid)
    return len(ids)
