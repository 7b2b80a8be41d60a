"""The embedded fallback mode: the whole service in one process, without Postgres or Redis.

Where Postgres or Redis cannot be reached, `scripts/main.sh` runs the main job against this app
instead (set `GATT_FORCE_EMBEDDED=1` there to choose it on purpose). It is the same FastAPI app
(`app.main.create_app`), composed with other parts:

- **job state in SQLite**: one database file under the data directory, artifacts beside it;
- **an in-process worker instead of Celery**: one thread takes jobs from a queue, one at a time,
  and runs each with `workers.tasks.run_job_by_id`, the very function the Celery task `jobs.run`
  calls, so leases (claim, heartbeat, finish), events, metrics and checkpoints go through the same
  code. When idle it sweeps like `jobs.reap`, so jobs left queued or running by an earlier process
  on the same data directory are picked up again (and resumed).

The mode says so: a warning in the log at start, `X-Gatt-Mode: embedded` on every response, and
`"mode": "embedded"` in `/readyz`, which checks SQLite and the worker thread instead of Postgres
and Redis.

    GATT_EMBEDDED_DIR=var/embedded .venv/bin/python -m app.embedded create-key TEAM   # prints a key
    GATT_EMBEDDED_DIR=var/embedded .venv/bin/uvicorn --factory app.embedded:factory    # or: ... serve

It is a fallback, not a deployment: one process (never run two on one data directory, nor uvicorn
with several workers), SQLite serializes writers, no per-key rate limits (they need Redis), and the
data directory is disposable. Other `GATT_*` settings (`GATT_MODEL_ROOTS`, `GATT_LEASE_S`, ...) apply
as usual.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import socket
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.orm import Session, sessionmaker

from app.core.errors import AppError, ServiceUnavailable, error_response
from app.core.headers import ResponseHeaders
from app.core.ratelimit import LocalRateLimiter
from app.jobs.chat import CHAT_BURST
from app.main import TITLE, create_app
from service.db import make_sessionmaker, session_scope
from service.logs import configure_logging
from service.models import Base
from service.reaper import reap
from service.repositories import jobs
from service.settings import Settings
from service.webhooks import deliver, resend_overdue

log = logging.getLogger(__name__)

DATA_DIR_ENV = "GATT_EMBEDDED_DIR"
DEFAULT_DATA_DIR = Path("var/embedded")
DATABASE_FILE = "gatt.sqlite3"
MODE_HEADER = "X-Gatt-Mode"


def data_dir_from_env() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def embedded_settings(data_dir: Path) -> Settings:
    """The settings of the environment, with the database and artifacts moved under `data_dir`."""
    data_dir = Path(data_dir).resolve()
    return Settings(database_url=f"sqlite:///{data_dir / DATABASE_FILE}", artifact_dir=data_dir / "artifacts")


def make_sqlite_engine(url: str) -> Engine:
    """An engine on a SQLite file that several threads (API, worker, heartbeat) can share."""
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _: Any) -> None:
        # The driver must not begin transactions on its own (its implicit BEGIN breaks SAVEPOINT,
        # which job creation uses); SQLAlchemy begins them, below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
        cursor.execute("PRAGMA foreign_keys=ON")  # enforce ON DELETE CASCADE/RESTRICT, as Postgres does
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: transactions queue on the busy timeout instead of
        # failing when a read-then-write transaction finds another writer got there first. There is
        # no row locking (`with_for_update` is a no-op on SQLite); this serializes writers instead.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def open_database(data_dir: Path) -> tuple[Settings, Engine, sessionmaker[Session]]:
    """The settings, engine and sessions of the embedded database, tables created if missing."""
    settings = embedded_settings(data_dir)
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    engine = make_sqlite_engine(settings.database_url)
    # Tables straight from the models, no Alembic: the migrations are for Postgres, the service's
    # database. The embedded mode is single-process and its data directory disposable; a column
    # added since the directory was made is added here, any other schema change means deleting it.
    Base.metadata.create_all(engine)
    _add_new_columns(engine)
    return settings, engine, make_sessionmaker(engine)


def _add_new_columns(engine: Engine) -> None:
    """Add the model's nullable columns (and indexes) that an older embedded database lacks."""
    with engine.begin() as connection:
        existing = inspect(connection)  # on this connection: another would wait for its write lock
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                if not column.nullable:
                    raise RuntimeError(
                        f"the embedded database lacks {table.name}.{column.name}, which cannot be added "
                        "in place: delete its data directory (GATT_EMBEDDED_DIR, default var/embedded)"
                    )
                kind = column.type.compile(dialect=engine.dialect)
                connection.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')
            for index in table.indexes:
                index.create(connection, checkfirst=True)


class EmbeddedWorker:
    """One thread that runs jobs one at a time, in the order they were handed over.

    Idle, it sweeps every `max(5, lease_s / 2)` seconds like the Celery reaper: abandoned cancels are
    closed, expired leases go back to queued, and queued jobs it does not hold are taken in.
    """

    def __init__(self, settings: Settings, factory: sessionmaker[Session]):
        self.settings, self.factory = settings, factory
        self._queue: queue.Queue[uuid.UUID | None] = queue.Queue()
        self._pending: set[uuid.UUID] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._owner_prefix = f"{socket.gethostname()}:{os.getpid()}:"  # see workers.tasks.run_job_by_id

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping.clear()
                self._thread = threading.Thread(target=self._loop, name="gatt-embedded-worker", daemon=True)
                self._thread.start()

    def submit(self, job_id: uuid.UUID) -> None:
        """The app's `enqueue`: hand a committed job to the worker."""
        with self._lock:
            if job_id in self._pending:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)
        self.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop taking jobs. A job still running is handed back (requeued): its run notices at its next
        heartbeat that the lease is gone and stops without writing an ending; the next start of the
        embedded service resumes it from its checkpoints and sampled chunks."""
        self._stopping.set()
        self._queue.put(None)
        with session_scope(self.factory) as s:
            jobs.requeue_owned(s, self._owner_prefix, "the embedded service stopped; job requeued")
        if self._thread is not None:
            self._thread.join(timeout_s)

    def sweep(self, queued_older_than: timedelta) -> None:
        reap(self.factory, queued_older_than, self.submit)
        # Webhooks: there is no broker, so the sweep makes the due delivery attempts itself.
        resend_overdue(self.factory, timedelta(0), partial(deliver, self.factory, self.settings))

    def _loop(self) -> None:
        from workers.tasks import run_job_by_id  # the engine (torch) loads on the first job, not at import

        interval = max(5.0, self.settings.lease_s / 2)
        try:
            self.sweep(timedelta(0))  # no broker kept messages: every queued job is ours to run
        except Exception:
            log.exception("embedded worker: sweep failed")
        while not self._stopping.is_set():
            try:
                job_id = self._queue.get(timeout=interval)
            except queue.Empty:
                try:
                    self.sweep(timedelta(seconds=self.settings.lease_s))
                except Exception:
                    log.exception("embedded worker: sweep failed")
                continue
            if job_id is None:
                break
            with self._lock:
                self._pending.discard(job_id)
            try:
                log.info("embedded worker: job %s: %s", job_id, "running")
                outcome = run_job_by_id(job_id, self.settings, self.factory)
                log.info("embedded worker: job %s: %s", job_id, outcome)
            except Exception:  # run_job_by_id records job failures itself; this is the database failing
                log.exception("embedded worker: job %s could not run", job_id)


class EmbeddedReadiness(BaseModel):
    status: Literal["ok"] = Field(default="ok", description='"ok": SQLite and the worker thread answer.')
    mode: Literal["embedded"] = Field(
        default="embedded", description="The embedded fallback: SQLite and an in-process worker."
    )
    checks: dict[str, str] = Field(description='"sqlite" and "worker", each "ok".')


class LocalChat:
    """The playground in this process (no broker): each reply in a thread of its own, the models in
    `workers.chat`'s cache (its lock lets one reply generate at a time)."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]):
        self.settings, self.factory = settings, factory

    async def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        from workers.chat import answer  # torch loads on the first reply

        with anyio.move_on_after(timeout_s):
            # The thread runs on when the wait ends; its answer is then dropped, as the service's is.
            return await anyio.to_thread.run_sync(
                answer, request, self.settings, self.factory, abandon_on_cancel=True
            )
        return None

    async def close(self) -> None:
        return None


def create_embedded_app(data_dir: Path) -> FastAPI:
    """The service on SQLite under `data_dir`, running its jobs in this process, one at a time."""
    data_dir = Path(data_dir)
    settings, engine, factory = open_database(data_dir)
    worker = EmbeddedWorker(settings, factory)

    @asynccontextmanager
    async def run_worker(_: FastAPI) -> AsyncIterator[None]:
        log.warning(
            "EMBEDDED MODE (no Postgres, no Redis): job state in %s, artifacts in %s, jobs run in this "
            "process one at a time. A fallback, not a deployment.",
            settings.database_url.removeprefix("sqlite:///"),
            settings.artifact_dir,
        )
        worker.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(worker.stop)

    app = create_app(
        settings,
        worker.submit,
        engine=engine,
        readiness=_readiness(settings, engine, worker),
        lifespan=run_worker,
        # Per-key limits as the service has them, in memory: there is no Redis, and one process.
        rate_limiter=(
            LocalRateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
            if settings.rate_limit_per_s > 0
            else None
        ),
        chat=LocalChat(settings, factory),
        chat_limiter=(
            LocalRateLimiter(settings.chat_per_minute / 60, CHAT_BURST)
            if settings.chat_per_minute > 0
            else None
        ),
        title=f"{TITLE} (embedded mode)",
    )
    app.state.worker, app.state.mode = worker, "embedded"
    app.add_middleware(ResponseHeaders, headers={MODE_HEADER: "embedded"})
    return app


def _readiness(settings: Settings, engine: Engine, worker: EmbeddedWorker) -> APIRouter:
    """/readyz of this mode: there is no Postgres or Redis, but SQLite and the worker thread."""
    router = APIRouter(tags=["health"])

    def check_sqlite() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    @router.get(
        "/readyz",
        response_model=EmbeddedReadiness,
        summary="Readiness",
        responses=error_response(503, "SQLite or the worker thread did not answer (`not_ready`)."),
    )
    async def readyz() -> EmbeddedReadiness:
        """Embedded mode: SQLite (`SELECT 1`) answers and the in-process worker thread is alive."""
        failures: dict[str, str] = {}
        try:
            with anyio.fail_after(settings.readiness_timeout_s):
                await anyio.to_thread.run_sync(check_sqlite, abandon_on_cancel=True)
        except Exception as e:  # the answer names the kind of failure; the log has the rest
            log.warning("readiness: sqlite failed: %s", e)
            failures["sqlite"] = f"{type(e).__name__} (details in the server log)"
        if not worker.alive:
            failures["worker"] = "the worker thread is not running"
        if failures:
            raise ServiceUnavailable(
                "Not ready: " + ", ".join(sorted(failures)) + " failed.",
                code="not_ready",
                details=[
                    {"code": "check_failed", "field": k, "message": v} for k, v in sorted(failures.items())
                ],
            )
        return EmbeddedReadiness(checks={"sqlite": "ok", "worker": "ok"})

    return router


def factory() -> FastAPI:
    """For `uvicorn --factory app.embedded:factory`: the data directory is $GATT_EMBEDDED_DIR
    (default var/embedded)."""
    app = create_embedded_app(data_dir_from_env())
    # The worker's lines beside the API's, JSON unless GATT_LOG_FORMAT=text (service/logs.py).
    configure_logging(app.state.settings.log_format, app.state.settings.log_level)
    return app


def create_key(data_dir: Path, team: str, name: str | None = None) -> str:
    """A new API key for `team` in the embedded database, creating the team if it does not exist.
    (`python -m app.admin` speaks to Postgres only.)"""
    from app.auth import service
    from service.repositories import auth as repository

    _, engine, sessions = open_database(data_dir)
    try:
        with session_scope(sessions) as session:
            if repository.get_team_by_name(session, team) is None:
                service.create_team(session, team)
            _, key = service.create_key(session, team, name)
            return key
    finally:
        engine.dispose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.embedded", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"default: ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR}"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("create-key", help="create a team (if new) and an API key; prints the key")
    p.add_argument("team")
    p.add_argument("--name", default=None, help="a label for the key")
    p = commands.add_parser("serve", help="run the embedded service with uvicorn")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.data_dir is not None:
        os.environ[DATA_DIR_ENV] = str(args.data_dir)
    data_dir = data_dir_from_env()

    if args.command == "create-key":
        try:
            key = create_key(data_dir, args.team, args.name)
        except AppError as e:
            print(f"error: {e.message} [{e.code}]", file=sys.stderr)
            return 1
        print(
            f"created key for team {args.team!r} in {data_dir} (embedded); store it now, it is not shown again:"
        )
        print(key)
    elif args.command == "serve":
        import uvicorn

        uvicorn.run("app.embedded:factory", factory=True, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
