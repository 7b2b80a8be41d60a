"""Test database helpers: create, migrate and drop databases on the real Postgres server.

The server is GATT_TEST_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432); test databases
live beside the `postgres` maintenance database on it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parents[2]
SERVER_URL = os.environ.get("GATT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432").rstrip("/")
TEST_DATABASE = os.environ.get("GATT_TEST_DATABASE", "gatt_test")
_MIGRATION_LOCK = 0x6A7A7E57  # any constant; serializes concurrent test sessions migrating the same db


def url_for(database: str) -> str:
    return f"{SERVER_URL}/{database}"


def _libpq(database: str) -> str:
    return url_for(database).replace("postgresql+psycopg://", "postgresql://", 1)


def create_database(name: str) -> None:
    """CREATE DATABASE unless it exists (a concurrent creator is fine too)."""
    with psycopg.connect(_libpq("postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # created concurrently
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(name: str) -> None:
    with psycopg.connect(_libpq("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def migrate(name: str) -> None:
    """`alembic upgrade head` on the database, in process, under an advisory lock."""
    from alembic import command
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["url"] = url_for(name)
    with psycopg.connect(_libpq(name), autocommit=True) as lock:
        lock.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            command.upgrade(cfg, "head")
        finally:
            lock.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
