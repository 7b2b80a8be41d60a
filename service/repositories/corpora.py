from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, or_, select
from sqlalchemy.orm import Session

from service.models import ACTIVE_JOB_STATUSES, Corpus, Job
from service.pagination import PageParams, PageResult, keyset_page


def add(
    session: Session,
    team_id: uuid.UUID,
    name: str,
    content: bytes,
    stats: dict[str, Any],
    sha256: str,
) -> Corpus:
    row = Corpus(
        team_id=team_id, name=name, content=content, size_bytes=len(content), stats=stats, sha256=sha256
    )
    session.add(row)
    session.flush()
    return row


def _live(team_id: uuid.UUID, id: uuid.UUID) -> Any:
    return select(Corpus).where(Corpus.id == id, Corpus.team_id == team_id, Corpus.deleted_at.is_(None))


def get(session: Session, team_id: uuid.UUID, id: uuid.UUID, *, for_update: bool = False) -> Corpus | None:
    """The team's live corpus, without its content. `for_update` locks the row (see delete)."""
    stmt = _live(team_id, id)
    if for_update:
        stmt = stmt.with_for_update()
    return session.scalars(stmt).one_or_none()


def get_for_share(session: Session, team_id: uuid.UUID, id: uuid.UUID) -> Corpus | None:
    """The team's live corpus locked FOR SHARE: take it when creating a job that uses the corpus, so a
    concurrent delete either waits and then sees the job, or goes first and this finds nothing."""
    return session.scalars(_live(team_id, id).with_for_update(read=True)).one_or_none()


def page(session: Session, team_id: uuid.UUID, params: PageParams) -> PageResult[Corpus]:
    stmt = select(Corpus).where(Corpus.team_id == team_id, Corpus.deleted_at.is_(None))
    return keyset_page(session, stmt, params, Corpus.created_at, Corpus.id)


def usage(session: Session, team_id: uuid.UUID) -> tuple[int, int]:
    """The team's live corpora: how many, and their stored bytes."""
    count, size = session.execute(
        select(func.count(), func.coalesce(func.sum(Corpus.size_bytes), 0)).where(
            Corpus.team_id == team_id, Corpus.deleted_at.is_(None)
        )
    ).one()
    return int(count), int(size)


def read_content(session: Session, id: uuid.UUID) -> bytes | None:
    """The whole stored JSONL (for workers); None when the corpus is deleted or unknown."""
    return session.scalar(select(Corpus.content).where(Corpus.id == id))


def read_content_chunk(session: Session, id: uuid.UUID, offset: int, length: int) -> bytes | None:
    """`length` bytes of the stored JSONL from `offset` (0-based); None when it is gone."""
    # substr, not substring: both Postgres (bytea) and SQLite (the embedded mode's BLOB) have it.
    stmt = select(func.substr(Corpus.content, offset + 1, length)).where(
        Corpus.id == id, Corpus.deleted_at.is_(None)
    )
    return session.scalar(stmt)


def used_by_active_job(session: Session, id: uuid.UUID) -> bool:
    return bool(
        session.scalar(
            select(
                exists().where(
                    or_(Job.corpus_id == id, Job.validation_corpus_id == id),
                    Job.status.in_(ACTIVE_JOB_STATUSES),
                )
            )
        )
    )


def mark_deleted(session: Session, row: Corpus, when: datetime) -> None:
    # The row stays for the jobs that used it; the data goes.
    row.deleted_at = when
    row.content = None
    session.flush()
