"""All SQL of webhook endpoints and their deliveries (the outbox and its log).

Events are recorded by `record_*` in the transaction of the change they announce (a job's ending, a
checkpoint's row), one delivery per subscribed endpoint, and the ids are put in `session.info`
(`PENDING_KEY`) for `service.webhooks.send_after_commit` to hand to the workers once the transaction
commits. Whatever happens to that message, the row says the delivery is due, and the reaper sends
overdue ones again (`overdue`). An event id is derived from what the event is about (the job and
its ending, or the job and the checkpoint's step), so writing the same cause again records nothing new.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.models import (
    DeliveryStatus,
    Job,
    JobStatus,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)
from service.pagination import PageParams, PageResult, keyset_page

# A module, not names: jobs.py records endings through this one, so each imports the other.
from service.repositories import jobs

PENDING_KEY = "webhook_deliveries"
_EVENT_NAMESPACE = uuid.UUID("8f1c7c1e-5b0e-4d61-9d9e-6c0b9f6a2f10")  # any constant: ids are uuid5s
_ENDED = {
    JobStatus.SUCCEEDED: WebhookEvent.JOB_SUCCEEDED,
    JobStatus.FAILED: WebhookEvent.JOB_FAILED,
    JobStatus.CANCELLED: WebhookEvent.JOB_CANCELLED,
}


# --- endpoints ---------------------------------------------------------------------------------


def add(
    session: Session, team_id: uuid.UUID, url: str, event_types: list[str], secret: str
) -> WebhookEndpoint:
    row = WebhookEndpoint(team_id=team_id, url=url, event_types=event_types, secret=secret)
    session.add(row)
    session.flush()
    return row


def get(
    session: Session, team_id: uuid.UUID, id: uuid.UUID, *, for_update: bool = False
) -> WebhookEndpoint | None:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.id == id, WebhookEndpoint.team_id == team_id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalars(stmt).one_or_none()


def page(session: Session, team_id: uuid.UUID, params: PageParams) -> PageResult[WebhookEndpoint]:
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.team_id == team_id)
    return keyset_page(session, stmt, params, WebhookEndpoint.created_at, WebhookEndpoint.id)


def count(session: Session, team_id: uuid.UUID) -> int:
    return int(session.scalar(select(func.count()).where(WebhookEndpoint.team_id == team_id)) or 0)


def remove(session: Session, row: WebhookEndpoint) -> None:
    # Its deliveries go with it (ON DELETE CASCADE): pending ones are never sent.
    session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == row.id))


def rotate(session: Session, row: WebhookEndpoint, secret: str, old_valid_until: datetime) -> None:
    row.previous_secret, row.previous_secret_expires_at = row.secret, old_valid_until
    row.secret = secret
    session.flush()


def deliveries(session: Session, endpoint_id: uuid.UUID, params: PageParams) -> PageResult[WebhookDelivery]:
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    return keyset_page(session, stmt, params, WebhookDelivery.created_at, WebhookDelivery.id)


# --- recording events (the outbox) ---------------------------------------------------------------


def event_id(*about: object) -> str:
    """A stable id for an event: the same cause recorded twice is one event (`msg_<hex>`)."""
    return "msg_" + uuid.uuid5(_EVENT_NAMESPACE, ":".join(str(a) for a in about)).hex


def _record(session: Session, team_id: uuid.UUID, kind: WebhookEvent, eid: str, data: dict[str, Any]) -> None:
    subscribed = select(WebhookEndpoint.id, WebhookEndpoint.event_types).where(
        WebhookEndpoint.team_id == team_id, WebhookEndpoint.disabled_at.is_(None)
    )
    targets = [id for id, types in session.execute(subscribed) if kind.value in types]
    if not targets:
        return
    t = jobs.current_time(session)
    payload = {"type": kind.value, "timestamp": t.isoformat(), "data": data}
    pending: list[uuid.UUID] = session.info.setdefault(PENDING_KEY, [])
    for endpoint_id in targets:
        stmt = jobs._insert(session, WebhookDelivery).values(
            id=uuid.uuid4(),
            endpoint_id=endpoint_id,
            event_id=eid,
            event_type=kind.value,
            payload=payload,
            status=DeliveryStatus.PENDING,
            attempts=0,
            next_attempt_at=t,
        )
        stmt = stmt.on_conflict_do_nothing(index_elements=["endpoint_id", "event_id"]).returning(
            WebhookDelivery.id
        )
        new = session.execute(stmt).scalar_one_or_none()
        if new is not None:
            pending.append(new)


def record_job_ended(session: Session, job_id: uuid.UUID) -> None:
    """`job.succeeded` / `job.failed` / `job.cancelled` for a job that has just ended, in the
    transaction that ended it."""
    row = session.execute(
        select(Job.team_id, Job.status, Job.name, Job.error_code, Job.error_message, Job.finished_at).where(
            Job.id == job_id
        )
    ).one_or_none()
    if row is None or row.status not in _ENDED:
        return
    data: dict[str, Any] = {
        "job_id": str(job_id),
        "status": row.status.value,
        "name": row.name,
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
    }
    if row.status == JobStatus.FAILED:
        data["error"] = {"code": row.error_code, "message": row.error_message}
    kind = _ENDED[row.status]
    _record(session, row.team_id, kind, event_id(job_id, kind.value), data)


def record_checkpoint(session: Session, job_id: uuid.UUID, step: int, download_url: str) -> None:
    """`checkpoint.created`, in the transaction that lists the checkpoint."""
    team_id = session.scalar(select(Job.team_id).where(Job.id == job_id))
    if team_id is None:
        return
    data = {
        "job_id": str(job_id),
        "status": JobStatus.RUNNING.value,
        "step": step,
        "download_url": download_url,
    }
    kind = WebhookEvent.CHECKPOINT_CREATED
    _record(session, team_id, kind, event_id(job_id, kind.value, step), data)


# --- delivering ----------------------------------------------------------------------------------


def claim(session: Session, id: uuid.UUID, hold: timedelta) -> tuple[WebhookDelivery, WebhookEndpoint] | None:
    """Take a due delivery for one attempt: `attempts + 1`, and its next attempt pushed `hold` ahead,
    so that a duplicate message (or the reaper) does not send it at the same time; if this worker
    dies mid-attempt, the delivery is due again after `hold`. None: not due, done, or deleted."""
    t = jobs.clock(session)
    stmt = (
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= t,
        )
        .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=t + hold, updated_at=t)
        .returning(WebhookDelivery.id)
    )
    if session.execute(stmt).scalar_one_or_none() is None:
        return None
    delivery = session.get(WebhookDelivery, id, populate_existing=True)
    endpoint = session.get(WebhookEndpoint, delivery.endpoint_id) if delivery is not None else None
    if delivery is None or endpoint is None:
        return None
    return delivery, endpoint


def finish_attempt(
    session: Session,
    id: uuid.UUID,
    attempt: int,
    *,
    ok: bool,
    status_code: int | None,
    error: str | None,
    retry_in: timedelta | None,
    disable_after: int,
) -> bool:
    """Record attempt `attempt`'s outcome: delivered, due again after `retry_in`, or (None) failed.
    A delivery that failed for good counts against its endpoint, which is disabled at
    `disable_after` in a row (a delivered one resets the count); returns whether it was disabled now."""
    t = jobs.clock(session)
    if ok:
        values: dict[str, Any] = {
            "status": DeliveryStatus.DELIVERED,
            "delivered_at": t,
            "next_attempt_at": None,
        }
    elif retry_in is None:
        values = {"status": DeliveryStatus.FAILED, "next_attempt_at": None}
    else:
        values = {"next_attempt_at": t + retry_in}
    endpoint_id = session.execute(
        update(WebhookDelivery)
        # Only the attempt that claimed it writes (a later attempt may have claimed it since).
        .where(WebhookDelivery.id == id, WebhookDelivery.attempts == attempt)
        .values(last_status_code=status_code, last_error=error, updated_at=t, **values)
        .returning(WebhookDelivery.endpoint_id)
    ).scalar_one_or_none()
    if endpoint_id is None or not (ok or retry_in is None):
        return False
    failures = 0 if ok else func.coalesce(WebhookEndpoint.consecutive_failures, 0) + 1
    count = session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id)
        .values(consecutive_failures=failures)
        .returning(WebhookEndpoint.consecutive_failures)
    ).scalar_one_or_none()
    if ok or count is None or count < disable_after:
        return False
    reason = f"{count} deliveries in a row failed; the last: {error or status_code}"
    disable(session, endpoint_id, reason[:500], t)
    return True


def disable(session: Session, endpoint_id: uuid.UUID, reason: str, t: Any) -> None:
    """Stop sending to the endpoint: disabled, and its pending deliveries failed (nothing is left
    for the reaper to send again)."""
    session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.disabled_at.is_(None))
        .values(disabled_at=t, disabled_reason=reason, updated_at=t)
    )
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == DeliveryStatus.PENDING)
        .values(
            status=DeliveryStatus.FAILED, next_attempt_at=None, last_error="endpoint disabled", updated_at=t
        )
    )


def enable(session: Session, row: WebhookEndpoint) -> None:
    row.disabled_at, row.disabled_reason, row.consecutive_failures = None, None, 0
    session.flush()


def resend(session: Session, delivery: WebhookDelivery) -> None:
    """The delivery pending again from now, with a fresh set of attempts and the same event id."""
    t = jobs.current_time(session)
    delivery.status, delivery.attempts, delivery.next_attempt_at = DeliveryStatus.PENDING, 0, t
    delivery.delivered_at = None
    session.flush()
    session.info.setdefault(PENDING_KEY, []).append(delivery.id)


def delivery(session: Session, endpoint_id: uuid.UUID, id: uuid.UUID) -> WebhookDelivery | None:
    return session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.id == id, WebhookDelivery.endpoint_id == endpoint_id)
    ).one_or_none()


def overdue(session: Session, older_than: timedelta, limit: int = 500) -> list[uuid.UUID]:
    """Pending deliveries due for longer than `older_than`: their message was lost (or no worker
    serves the queue). Their next attempt is set to now, so the next sweep leaves them alone for
    another `older_than`."""
    t = jobs.clock(session)
    ids = list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == DeliveryStatus.PENDING,
                WebhookDelivery.next_attempt_at < t - older_than,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        )
    )
    if ids:
        session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(ids)).values(next_attempt_at=t))
    return ids
