"""All SQL of jobs and of what their runs write (events, metrics, checkpoints).

State changes are conditional updates (`UPDATE ... WHERE status = ...`): whoever's update matches
owns the transition, so two workers can never both start, or both finish, one job.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.models import ACTIVE_JOB_STATUSES, Checkpoint, Job, JobEvent, JobMetric, JobStage, JobStatus
from service.pagination import PageParams, PageResult, keyset_page
from service.repositories import webhooks

TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
# Postgres NOTIFY channel: the id of a job that has a new event or metric, sent when it commits
# (app/jobs/stream.py follows it).
EVENTS_CHANNEL = "gatt_job_events"


def now() -> datetime:
    return datetime.now(UTC)


def clock(session: Session) -> Any:
    """The time leases and timestamps are written and compared in. On Postgres it is the
    database's (`now()`): workers and API processes on several hosts share one clock, so a host
    whose clock runs behind cannot write a lease that is already expired for the reaper. SQLite
    (the embedded mode: one process) uses this host's."""
    return func.now() if session.get_bind().dialect.name == "postgresql" else now()


def current_time(session: Session) -> datetime:
    """`clock` as a value."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.now()))  # type: ignore[return-value]
    return now()


def _insert(session: Session, table: Any) -> Any:
    """The dialect's INSERT with ON CONFLICT: Postgres, or SQLite in the embedded mode."""
    dialect = session.get_bind().dialect.name
    return (sqlite if dialect == "sqlite" else postgresql).insert(table)


def add(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()
    return job


def get(session: Session, team_id: uuid.UUID, id: uuid.UUID) -> Job | None:
    return session.scalars(select(Job).where(Job.id == id, Job.team_id == team_id)).one_or_none()


def get_any(session: Session, id: uuid.UUID) -> Job | None:
    """A job of any team: only for workers, which receive ids from the queue."""
    return session.get(Job, id, populate_existing=True)


def version(session: Session, team_id: uuid.UUID, id: uuid.UUID) -> Any:
    """The job's `updated_at`, `status` and `queue` (what its ETag depends on), or None."""
    stmt = select(Job.updated_at, Job.status, Job.queue).where(Job.id == id, Job.team_id == team_id)
    return session.execute(stmt).one_or_none()


def get_by_idempotency_key(session: Session, team_id: uuid.UUID, key: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.team_id == team_id, Job.idempotency_key == key)
    ).one_or_none()


def count_active(session: Session, team_id: uuid.UUID) -> int:
    """The team's queued and running jobs."""
    stmt = select(func.count()).where(Job.team_id == team_id, Job.status.in_(ACTIVE_JOB_STATUSES))
    return int(session.scalar(stmt) or 0)


def counts_by_state(session: Session) -> list[tuple[str | None, JobStatus, JobStage | None, int]]:
    """How many jobs there are of each (queue, status, stage), over all teams: for /metrics."""
    stmt = select(Job.queue, Job.status, Job.stage, func.count()).group_by(Job.queue, Job.status, Job.stage)
    return [(queue, status, stage, int(count)) for queue, status, stage, count in session.execute(stmt)]


def artifact_bytes(session: Session, team_id: uuid.UUID) -> int:
    """What the team's jobs keep in the artifact store, as their workers last counted it."""
    stmt = select(func.coalesce(func.sum(Job.artifact_bytes), 0)).where(Job.team_id == team_id)
    return int(session.scalar(stmt) or 0)


def continued_by_active(session: Session, job_id: uuid.UUID) -> bool:
    """Whether a queued or running job continues one of this job's checkpoints."""
    stmt = select(Job.id).where(Job.parent_job_id == job_id, Job.status.in_(ACTIVE_JOB_STATUSES)).limit(1)
    return session.scalar(stmt) is not None


def delete(session: Session, job: Job) -> None:
    """The job's row and, by cascade, its events, metrics and checkpoint rows."""
    session.delete(job)
    session.flush()


def page(
    session: Session, team_id: uuid.UUID, params: PageParams, status: JobStatus | None
) -> PageResult[Job]:
    stmt = select(Job).where(Job.team_id == team_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    return keyset_page(session, stmt, params, Job.created_at, Job.id)


def cancel_queued(session: Session, id: uuid.UUID) -> bool:
    """Cancel a job no worker has started. False if it is no longer queued."""
    t = clock(session)
    result = session.execute(
        update(Job)
        .where(Job.id == id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=t, updated_at=t)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _ended(session, id)
    return True


def request_cancel(session: Session, id: uuid.UUID) -> bool:
    """Ask the worker running the job to stop; it checks between batches and optimiser steps."""
    result = session.execute(
        update(Job)
        .where(Job.id == id, Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=clock(session))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


# --- used by workers -------------------------------------------------------------------------


def claim(session: Session, id: uuid.UUID, owner: str, lease_s: float) -> Job | None:
    """Start (or take over) a job: queued, or running with an expired lease (its worker vanished).

    Returns the job when this worker now holds the lease, None when another does or it has ended.
    """
    t = clock(session)
    stmt = (
        update(Job)
        .where(
            Job.id == id,
            Job.cancel_requested.is_(False),
            (Job.status == JobStatus.QUEUED)
            | ((Job.status == JobStatus.RUNNING) & (Job.lease_expires_at < t)),
        )
        .values(
            status=JobStatus.RUNNING,
            lease_owner=owner,
            lease_expires_at=t + timedelta(seconds=lease_s),
            heartbeat_at=t,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, t),
            updated_at=t,
        )
        .returning(Job.id)
    )
    if session.execute(stmt).scalar_one_or_none() is None:
        return None
    return get_any(session, id)


def heartbeat(session: Session, id: uuid.UUID, owner: str, lease_s: float, **fields: Any) -> bool:
    """Renew the lease and write progress. False when the lease is no longer ours."""
    t = clock(session)
    result = session.execute(
        update(Job)
        .where(Job.id == id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
        .values(heartbeat_at=t, lease_expires_at=t + timedelta(seconds=lease_s), updated_at=t, **fields)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def finish(session: Session, id: uuid.UUID, owner: str, status: JobStatus, **fields: Any) -> bool:
    """The one terminal transition of a run; only the lease holder can make it."""
    t = clock(session)
    result = session.execute(
        update(Job)
        .where(Job.id == id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
        .values(
            status=status,
            finished_at=t,
            updated_at=t,
            lease_expires_at=None,
            eta_s=None,
            overall_eta_s=None,
            **fields,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    _ended(session, id)
    return True


def _ended(session: Session, id: uuid.UUID) -> None:
    """Every ending of a job goes through here: its webhook event is recorded in the same
    transaction as the transition (an outbox), so an ending is never announced without happening,
    nor happens without being announced."""
    webhooks.record_job_ended(session, id)


def status(session: Session, id: uuid.UUID) -> JobStatus | None:
    """Only the job's status (one indexed read)."""
    return session.scalar(select(Job.status).where(Job.id == id))


def cancel_requested(session: Session, id: uuid.UUID) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == id)))


def add_event(
    session: Session,
    job_id: uuid.UUID,
    level: str,
    kind: str,
    message: str,
    data: dict | None,
    *,
    owner: str | None = None,
) -> bool:
    """Append an event; with `owner`, only while that run holds the job's lease (False if not)."""
    # seq is per job and gap-free; the row lock on the job serialises writers of one job.
    locked = select(Job.id).where(Job.id == job_id)
    if owner is not None:
        locked = locked.where(Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
    if session.execute(locked.with_for_update()).scalar_one_or_none() is None:
        return False
    seq = session.scalar(
        select(func.coalesce(func.max(JobEvent.seq), 0) + 1).where(JobEvent.job_id == job_id)
    )
    session.add(JobEvent(job_id=job_id, seq=seq, level=level, kind=kind, message=message, data=data))
    session.flush()
    _notify(session, job_id)
    return True


def _notify(session: Session, job_id: uuid.UUID) -> None:
    """Tell the API processes following the job that it has news (delivered when this commits)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(EVENTS_CHANNEL, str(job_id))))


def holds(session: Session, job_id: uuid.UUID, owner: str) -> bool:
    """Whether the run `owner` still holds the job's lease (one indexed read)."""
    stmt = select(Job.id).where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
    return session.execute(stmt).scalar_one_or_none() is not None


def upsert_metric(session: Session, job_id: uuid.UUID, step: int, values: dict[str, Any]) -> None:
    # A resumed run recomputes the steps after its checkpoint: the newer values replace the old.
    stmt = _insert(session, JobMetric).values(id=uuid.uuid4(), job_id=job_id, step=step, values=values)
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "step"], set_={"values": stmt.excluded["values"]}
        )
    )
    _notify(session, job_id)


def upsert_checkpoint(
    session: Session, job_id: uuid.UUID, step: int, path: str, manifest: dict, metrics: dict | None
) -> None:
    stmt = _insert(session, Checkpoint).values(
        id=uuid.uuid4(), job_id=job_id, step=step, path=path, manifest=manifest, metrics=metrics
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "step"],
            set_={
                "path": stmt.excluded.path,
                "manifest": stmt.excluded.manifest,
                "metrics": stmt.excluded.metrics,
            },
        )
    )


# --- reads for the API -----------------------------------------------------------------------


def events(session: Session, job_id: uuid.UUID, after_seq: int, limit: int) -> list[JobEvent]:
    stmt = (
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
        .order_by(JobEvent.seq)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def metrics(session: Session, job_id: uuid.UUID, after_step: int, limit: int) -> list[JobMetric]:
    stmt = (
        select(JobMetric)
        .where(JobMetric.job_id == job_id, JobMetric.step > after_step)
        .order_by(JobMetric.step)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def checkpoints(session: Session, job_id: uuid.UUID) -> list[Checkpoint]:
    return list(
        session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step))
    )


def unlist_checkpoint(session: Session, row: Checkpoint) -> None:
    session.delete(row)


def checkpoint(session: Session, job_id: uuid.UUID, step: int) -> Checkpoint | None:
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
    return session.scalars(stmt).one_or_none()


def trained_tokens(session: Session, job_id: uuid.UUID) -> int:
    """Tokens trained so far: the sum over the job's recorded steps (a resumed step counts once)."""
    total = select(func.coalesce(func.sum(JobMetric.values["trained_tokens"].as_float()), 0)).where(
        JobMetric.job_id == job_id
    )
    return int(session.scalar(total) or 0)


def requeue_expired(session: Session) -> list[uuid.UUID]:
    """Running jobs whose worker stopped renewing its lease go back to queued. A worker that was
    only slow learns at its next heartbeat that the job is no longer its own and stops."""
    t = clock(session)
    stmt = (
        update(Job)
        .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < t, Job.cancel_requested.is_(False))
        .values(status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None, updated_at=t)
        .returning(Job.id)
    )
    ids = list(session.scalars(stmt))
    for id in ids:
        add_event(
            session, id, "warning", "worker_lost", "the worker stopped renewing its lease; job requeued", None
        )
    return ids


def requeue_owned(session: Session, owner_prefix: str, message: str) -> list[uuid.UUID]:
    """Running jobs whose lease owner starts with `owner_prefix` go back to queued, each with a
    `requeued` event: a process hands back the jobs it holds when it stops. A job whose cancel
    was asked for ends `cancelled` instead, since `claim` would never take it again."""
    t = clock(session)
    owned = (Job.status == JobStatus.RUNNING, Job.lease_owner.startswith(owner_prefix))
    cancelled = update(Job).where(*owned, Job.cancel_requested.is_(True))
    for id in list(
        session.scalars(
            cancelled.values(status=JobStatus.CANCELLED, finished_at=t, lease_expires_at=None).returning(
                Job.id
            )
        )
    ):
        add_event(session, id, "info", "cancelled", "cancelled; its worker stopped", None)
        _ended(session, id)
    stmt = (
        update(Job)
        .where(*owned)
        .values(status=JobStatus.QUEUED, lease_owner=None, lease_expires_at=None)
        .returning(Job.id)
    )
    ids = list(session.scalars(stmt))
    for id in ids:
        add_event(session, id, "warning", "requeued", message, None)
    return ids


def stale_queued(session: Session, older_than: timedelta, queue: str | None = None) -> list[uuid.UUID]:
    """Queued jobs no worker took within `older_than` (their message may be lost), oldest first;
    with `queue`, those of that queue and those of no queue (created before jobs had one)."""
    stmt = select(Job.id).where(Job.status == JobStatus.QUEUED, Job.updated_at < clock(session) - older_than)
    if queue is not None:
        stmt = stmt.where(_sent_to(queue))
    return list(session.scalars(stmt.order_by(Job.created_at, Job.id)))


def count_queued(session: Session, queue: str | None) -> int:
    """Queued jobs (of `queue` and of no queue, as `stale_queued` selects them)."""
    stmt = select(func.count()).where(Job.status == JobStatus.QUEUED)
    if queue is not None:
        stmt = stmt.where(_sent_to(queue))
    return int(session.scalar(stmt) or 0)


def _sent_to(queue: str) -> Any:
    """Jobs of `queue`, and those of no queue (created before jobs recorded theirs)."""
    return (Job.queue == queue) | Job.queue.is_(None)


def mark_sent(session: Session, ids: list[uuid.UUID]) -> None:
    """A fresh updated_at for queued jobs sent again: not stale for another `older_than`."""
    if ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status == JobStatus.QUEUED)
            .values(updated_at=clock(session))
        )


def cancel_abandoned(session: Session) -> int:
    """Running jobs whose worker vanished after a cancel was asked for: nothing left to stop."""
    t = clock(session)
    stmt = (
        update(Job)
        .where(Job.status == JobStatus.RUNNING, Job.cancel_requested.is_(True), Job.lease_expires_at < t)
        .values(status=JobStatus.CANCELLED, finished_at=t, updated_at=t, lease_expires_at=None)
        .returning(Job.id)
    )
    ids = list(session.scalars(stmt))
    for id in ids:
        add_event(session, id, "info", "cancelled", "cancelled; its worker had stopped", None)
        _ended(session, id)
    return len(ids)
