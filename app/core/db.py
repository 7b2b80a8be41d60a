"""Engine, sessions and the request-scoped unit of work.

Services and repositories never commit: whoever opened the session owns the transaction. For HTTP
that is `get_session` (commit when the endpoint returns, roll back when it raises); for scripts and
workers it is `session_scope`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings


def make_engine(settings: Settings) -> Engine:
    if settings.max_requests_in_flight >= settings.db_pool_size + settings.db_max_overflow:
        # The admission limit only prevents the pool/thread-pool stall when it leaves connections
        # free for work that checks one out inside a single thread call (streamed corpus chunks).
        raise ValueError(
            "GATT_MAX_REQUESTS_IN_FLIGHT must be below GATT_DB_POOL_SIZE + GATT_DB_MAX_OVERFLOW "
            f"({settings.max_requests_in_flight} >= {settings.db_pool_size} + {settings.db_max_overflow})"
        )
    return create_engine(
        settings.database_url,
        pool_pre_ping=True,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        connect_args={"connect_timeout": settings.db_connect_timeout_s},
    )


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: endpoints serialize ORM objects after the dependency committed.
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception (for CLIs and workers)."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def get_sessionmaker(request: Request) -> sessionmaker[Session]:
    factory: sessionmaker[Session] = request.app.state.sessionmaker
    return factory


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(get_sessionmaker(request)) as session:
        yield session


# scope="function": the commit happens when the endpoint returns and before the response is sent, so
# a failed commit is answered with a 500 instead of a success the database never saw.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_sessionmaker)]


def get_request_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_request_settings)]
