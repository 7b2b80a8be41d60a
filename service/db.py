"""Engine, sessions and the unit of work.

Services and repositories never commit: whoever opened the session owns the transaction. For HTTP
that is `get_session` (commit when the endpoint returns, roll back when it raises); for scripts and
workers it is `session_scope`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings


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
        connect_args={
            "connect_timeout": settings.db_connect_timeout_s,
            # A process frozen or stuck inside a transaction (a paused VM, a worker stopped mid-write)
            # would hold its row locks for as long as its connection lives, and the reaper's and the
            # API's updates of that job would wait for ever: Postgres ends such a session instead.
            "options": f"-c idle_in_transaction_session_timeout={int(settings.db_idle_in_transaction_timeout_s * 1000)}",
        },
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
