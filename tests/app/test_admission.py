"""Many concurrent requests against a small connection pool: the server must keep answering.

Without the admission limit (app/core/admission.py) this load stalls the server: every thread of
the pool waits for a database connection held by a request that waits for a thread, and after
`pool_timeout` the answers are 500s (see docs/benchmarks.md, "API polling"). The pool here is tiny
so that the stall would need only a few dozen requests in flight.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.main import create_app
from service.settings import Settings
from tests.app.factories import make_tenant
from tests.servers import serving

CLIENTS = 120


@pytest.fixture
def small_pool_server(database_url: str):
    settings = Settings(
        database_url=database_url,
        db_pool_size=2,
        db_max_overflow=1,
        db_pool_timeout_s=3,  # a stall shows up as 500s within seconds, not a hung test
        max_requests_in_flight=2,
        rate_limit_per_s=0,
    )
    app = create_app(settings, enqueue=lambda _: None)
    with serving(app) as port:
        yield app, f"http://127.0.0.1:{port}"


def test_many_concurrent_requests_on_a_small_pool_all_succeed(small_pool_server) -> None:
    app, base = small_pool_server
    tenant = make_tenant(app.state.sessionmaker)

    async def load() -> list[int]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=base, headers=tenant.headers, limits=limits, timeout=60) as c:

            async def one(i: int) -> int:
                path = "/v1/jobs" if i % 2 else "/v1/instruction-sets"
                return (await c.get(path)).status_code

            return await asyncio.gather(*(one(i) for i in range(CLIENTS)))

    codes = asyncio.run(load())
    assert codes.count(200) == CLIENTS, sorted(set(codes))
    # Liveness is never queued behind the limit.
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200


def test_an_admission_limit_the_pool_cannot_cover_is_refused(database_url: str) -> None:
    settings = Settings(
        database_url=database_url, db_pool_size=5, db_max_overflow=5, max_requests_in_flight=10
    )
    with pytest.raises(ValueError, match="GATT_MAX_REQUESTS_IN_FLIGHT"):
        create_app(settings)
