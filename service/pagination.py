"""Keyset pagination, newest first: one page of a query's rows and the opaque cursor to the next.

Use from a repository::

    stmt = select(Corpus).where(Corpus.team_id == team_id)
    return keyset_page(session, stmt, params, Corpus.created_at, Corpus.id)

The cursor is the last item's `(created_at, id)`, so a page continues exactly after that item even
if rows were added or deleted meanwhile: no duplicates, no gaps. `id` breaks ties between rows
created in the same transaction. The API decodes cursors and renders pages (`app.core.pagination`).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

from sqlalchemy import Select, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

M = TypeVar("M")


@dataclass(frozen=True)
class Cursor:
    created_at: datetime
    id: UUID


def encode_cursor(created_at: datetime, id: UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True)
class PageParams:
    after: Cursor | None
    limit: int


@dataclass(frozen=True)
class PageResult(Generic[M]):
    items: list[M]
    has_more: bool
    next_after: str | None


def keyset_page(
    session: Session,
    stmt: Select[M],
    params: PageParams,
    created_at: InstrumentedAttribute[datetime],
    id: InstrumentedAttribute[UUID],
) -> PageResult[M]:
    """One page of `stmt`'s rows, newest first. `stmt` selects one ORM entity with those columns;
    back it with an index on (team_id, created_at, id)."""
    if params.after is not None:
        stmt = stmt.where(tuple_(created_at, id) < tuple_(params.after.created_at, params.after.id))
    # One extra row tells whether another page exists without a COUNT.
    stmt = stmt.order_by(created_at.desc(), id.desc()).limit(params.limit + 1)
    rows = list(session.scalars(stmt).all())
    has_more = len(rows) > params.limit
    rows = rows[: params.limit]
    last: Any = rows[-1] if rows else None
    next_after = encode_cursor(last.created_at, last.id) if has_more else None
    return PageResult(rows, has_more, next_after)
