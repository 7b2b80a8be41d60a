"""Declarative base, naming convention and the column shapes every table shares."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, MetaData, TypeDecorator, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import functions

# Named constraints, so that migrations can drop and alter them by a predictable name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """SQLite (the embedded mode, `app.embedded`) keeps no time zone: store UTC, read back aware UTC.
    Stored as text `YYYY-MM-DD HH:MM:SS.ffffff`, so text order is time order."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.astimezone(UTC) if value is not None and value.tzinfo is not None else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@compiles(functions.now, "sqlite")
def _sqlite_now(element: Any, compiler: Any, **kw: Any) -> str:
    # now() on SQLite is CURRENT_TIMESTAMP: whole seconds, and a text form that compares wrongly with
    # UTCDateTime's (`...:05` < `...:05.000000`). This writes UTCDateTime's form, to the millisecond.
    return "STRFTIME('%Y-%m-%d %H:%M:%f000', 'now')"


# Postgres is the service's database and keeps its types (the migrations describe those); the SQLite
# variants only serve the embedded fallback mode.
_JSON = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True).with_variant(UTCDateTime(), "sqlite"),
        dict[str, Any]: _JSON,
        list[Any]: _JSON,
    }


class UUIDPrimaryKey:
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4, sort_order=-1)


class CreatedAt:
    # The database clock, so rows written by the API and by workers on other hosts compare.
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), sort_order=90)


class Timestamps(CreatedAt):
    updated_at: Mapped[datetime] = mapped_column(
        server_default=func.now(), onupdate=func.now(), sort_order=91
    )
