"""Cursor pagination, newest first, for every list endpoint.

A list answers `{"data": [...], "has_more": bool, "next_after": str | null}`. To get the next page
pass `after=<next_after>`. The cursor is opaque to clients; inside it is the last item's
`(created_at, id)`, so a page continues exactly after that item even if rows were added or deleted
meanwhile: no duplicates, no gaps. `id` breaks ties between rows created in the same transaction.

Repositories page with `service.pagination.keyset_page`; an endpoint takes `page: PageParamsDep`
and returns `XList.of(result, to_schema)`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Generic, Self, TypeVar
from uuid import UUID

from fastapi import Depends, Query
from pydantic import BaseModel, Field

from app.core.errors import Unprocessable
from service.pagination import Cursor, PageParams, PageResult

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

T = TypeVar("T")


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
