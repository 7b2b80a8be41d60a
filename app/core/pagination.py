"""Cursor pagination, newest first, for every list endpoint.

A list answers `{"data": [...], "has_more": bool, "next_after": str | null}`. To get the next page
pass `after=<next_after>`. The cursor is opaque to clients; inside it is the last item's
`(created_at, id)`, so a page continues exactly after that item even if rows were added or deleted
meanwhile: no duplicates, no gaps. `id` breaks ties between rows created in the same transaction.

Use from a repository::

    stmt = select(Corpus).where(Corpus.team_id == team_id)
    return keyset_page(session, stmt, params, Corpus.created_at, Corpus.id)

and from an endpoint: take `page: PageParamsDep`, return `XList.of(result, to_schema)`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Generic, Self, TypeVar
from uuid import UUID

from fastapi import Depends, Query
from pydantic import BaseModel, Field
from sqlalchemy import Select, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.core.errors import Unprocessable

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

M = TypeVar("M")
T = TypeVar("T")


@dataclass(frozen=True)
class Cursor:
    created_at: datetime
    id: UUID


def encode_cursor(created_at: datetime, id: UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(value: str) -> Cursor:
    """The cursor in `value`, or a 422 `invalid_cursor` on `after`."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        created_at, id_ = json.loads(raw)
        cursor = Cursor(datetime.fromisoformat(created_at), UUID(id_))
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as e:
        raise Unprocessable(
            "Invalid cursor: pass the `next_after` of a previous page.", code="invalid_cursor", param="after"
        ) from e
    if cursor.created_at.tzinfo is None:
        raise Unprocessable("Invalid cursor.", code="invalid_cursor", param="after")
    return cursor


@dataclass(frozen=True)
class PageParams:
    after: Cursor | None
    limit: int


def page_params(
    after: Annotated[
        str | None,
        Query(description="Return items after this cursor: the `next_after` of the previous page."),
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description=f"Items per page, 1 to {MAX_LIMIT}.")
    ] = DEFAULT_LIMIT,
) -> PageParams:
    return PageParams(after=decode_cursor(after) if after is not None else None, limit=limit)


PageParamsDep = Annotated[PageParams, Depends(page_params)]


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


class Page(BaseModel, Generic[T]):
    """Subclass per resource (`class CorpusList(Page[Corpus])`) for a readable OpenAPI name."""

    data: list[T] = Field(description="The items of this page, newest first.")
    has_more: bool = Field(description="Whether more items follow this page.")
    next_after: str | None = Field(
        description="Pass as `after` to get the next page; null when `has_more` is false."
    )

    @classmethod
    def of(cls, result: PageResult[Any], convert: Callable[[Any], T]) -> Self:
        return cls(
            data=[convert(item) for item in result.items],
            has_more=result.has_more,
            next_after=result.next_after,
        )
