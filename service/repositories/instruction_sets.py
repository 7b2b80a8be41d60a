from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from service.models import ACTIVE_JOB_STATUSES, InstructionSet, Job
from service.pagination import PageParams, PageResult, keyset_page


def add(session: Session, team_id: uuid.UUID, name: str, spec: dict[str, Any]) -> InstructionSet:
    row = InstructionSet(team_id=team_id, name=name, spec=spec)
    session.add(row)
    session.flush()  # fills in id and created_at
    return row


def count(session: Session, team_id: uuid.UUID) -> int:
    """The team's live instruction sets."""
    stmt = select(func.count()).where(InstructionSet.team_id == team_id, InstructionSet.deleted_at.is_(None))
    return int(session.scalar(stmt) or 0)


def get(
    session: Session, team_id: uuid.UUID, id: uuid.UUID, *, for_update: bool = False
) -> InstructionSet | None:
    """The team's live (not deleted) set. `for_update` locks the row until the transaction ends, which
    orders a delete against a job being created with the same set."""
    stmt = select(InstructionSet).where(
        InstructionSet.id == id, InstructionSet.team_id == team_id, InstructionSet.deleted_at.is_(None)
    )
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalars(stmt).one_or_none()


def get_for_share(session: Session, team_id: uuid.UUID, id: uuid.UUID) -> InstructionSet | None:
    """Like `get`, locking the row FOR SHARE: what a job creation takes, so that a concurrent delete
    waits for it (and then sees the job) or it waits for the delete (and then finds no set)."""
    stmt = (
        select(InstructionSet)
        .where(
            InstructionSet.id == id, InstructionSet.team_id == team_id, InstructionSet.deleted_at.is_(None)
        )
        .with_for_update(read=True)
    )
    return session.scalars(stmt).one_or_none()


def spec(session: Session, id: uuid.UUID) -> dict[str, Any] | None:
    """The set's spec, deleted or not (a job keeps the set it was created with)."""
    return session.scalar(select(InstructionSet.spec).where(InstructionSet.id == id))


def page(session: Session, team_id: uuid.UUID, params: PageParams) -> PageResult[InstructionSet]:
    stmt = select(InstructionSet).where(
        InstructionSet.team_id == team_id, InstructionSet.deleted_at.is_(None)
    )
    return keyset_page(session, stmt, params, InstructionSet.created_at, InstructionSet.id)


def used_by_active_job(session: Session, id: uuid.UUID) -> bool:
    stmt = select(exists().where(Job.instruction_set_id == id, Job.status.in_(ACTIVE_JOB_STATUSES)))
    return bool(session.scalar(stmt))


def mark_deleted(session: Session, row: InstructionSet, when: datetime) -> None:
    row.deleted_at = when
    session.flush()
