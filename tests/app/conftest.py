from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.main import create_app
from tests.app.factories import Tenant, make_tenant

# Small limits so that the limit tests move kilobytes, not megabytes.
MAX_CORPUS_BYTES = 64 * 1024
MAX_JSON_BODY_BYTES = 32 * 1024


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        max_corpus_bytes=MAX_CORPUS_BYTES,
        max_json_body_bytes=MAX_JSON_BODY_BYTES,
    )


@pytest.fixture(scope="session")
def enqueued() -> list:
    """Job ids the API handed to the workers. These tests run no worker, so nothing goes to Redis
    (a stray message would be picked up by the end-to-end test's real worker)."""
    return []


@pytest.fixture(scope="session")
def app(settings: Settings, enqueued: list) -> FastAPI:
    return create_app(settings, enqueue=enqueued.append)


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def db(app: FastAPI) -> sessionmaker[Session]:
    """Sessions on the app's engine, for arranging rows and counting them."""
    factory: sessionmaker[Session] = app.state.sessionmaker
    return factory


@pytest.fixture
def tenant(db: sessionmaker[Session]) -> Tenant:
    return make_tenant(db)


@pytest.fixture
def other_tenant(db: sessionmaker[Session]) -> Tenant:
    return make_tenant(db)
