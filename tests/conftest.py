"""Fixtures shared across the test tree. None is autouse: tests that do not ask for the database (all
of tests/gatt, for instance) never import the service or touch Postgres."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# One cache of the dequantized embedded model for the whole test run, inside the checkout rather
# than $HOME; subprocesses (the Celery worker of the end-to-end test) inherit it.
os.environ.setdefault(
    "GATT_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), "var", "cache")
)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """The URL of the test database (GATT_TEST_DATABASE, default gatt_test) on the real Postgres:
    created if missing and migrated to head once per session. Also exported as GATT_DATABASE_URL.
    Tests share it and stay apart by making their own rows (a fresh team each)."""
    from tests.app import db

    try:
        db.create_database(db.TEST_DATABASE)
        db.migrate(db.TEST_DATABASE)
    except Exception as e:  # pragma: no cover - the message is the point
        pytest.fail(f"test database unavailable at {db.SERVER_URL} ({e}); start it with scripts/services.sh")
    url = db.url_for(db.TEST_DATABASE)
    from service.settings import get_settings

    previous = os.environ.get("GATT_DATABASE_URL")
    os.environ["GATT_DATABASE_URL"] = url
    get_settings.cache_clear()
    yield url
    if previous is None:
        os.environ.pop("GATT_DATABASE_URL", None)
    else:
        os.environ["GATT_DATABASE_URL"] = previous
    get_settings.cache_clear()
