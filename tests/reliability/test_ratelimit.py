"""Per-key rate limits: a token bucket per API key in Redis, shared by API processes, failing open."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient

from app.core.ratelimit import KEY_PREFIX, LocalRateLimiter, RateLimiter
from app.embedded import create_embedded_app, create_key
from app.main import create_app
from service.settings import Settings
from tests.app.factories import Tenant, make_tenant
from tests.reliability.conftest import RedisServer, free_port

REDIS_URL = os.environ.get("GATT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def limited_settings(database_url: str) -> Settings:
    # 1 token a second, 3 at once: a burst of 3 passes, the 4th is refused for about a second.
    return Settings(database_url=database_url, redis_url=REDIS_URL, rate_limit_per_s=1, rate_limit_burst=3)


@pytest.fixture(scope="module")
def limited(limited_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(limited_settings, enqueue=lambda _: None)) as c:
        yield c


@pytest.fixture
def tenant(limited: TestClient) -> Tenant:
    return make_tenant(limited.app.state.sessionmaker)  # type: ignore[attr-defined]


def _get(client: TestClient, tenant: Tenant):
    return client.get("/v1/jobs", headers=tenant.headers)


def test_a_burst_passes_then_429_with_retry_after(limited: TestClient, tenant: Tenant) -> None:
    assert [_get(limited, tenant).status_code for _ in range(3)] == [200, 200, 200]
    refused = _get(limited, tenant)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and error["param"] is None
    assert refused.headers["Retry-After"] == "1"
    time.sleep(int(refused.headers["Retry-After"]) + 0.05)
    assert _get(limited, tenant).status_code == 200, "a token is back after Retry-After"


def test_each_key_has_its_own_bucket(limited: TestClient, tenant: Tenant) -> None:
    other = make_tenant(limited.app.state.sessionmaker)  # type: ignore[attr-defined]
    for _ in range(4):
        _get(limited, tenant)
    assert _get(limited, tenant).status_code == 429
    assert _get(limited, other).status_code == 200


def test_every_authenticated_route_is_limited(limited: TestClient, tenant: Tenant) -> None:
    for _ in range(3):
        limited.get("/v1/instruction-sets/default", headers=tenant.headers)
    assert limited.post("/v1/corpora", headers=tenant.headers, files={"file": ("c", b"")}).status_code == 429
    assert limited.get("/v1/jobs/config-defaults", headers=tenant.headers).status_code == 429
    # Probes need no key and are never limited.
    assert limited.get("/healthz").status_code == 200


def test_bad_keys_are_401_and_spend_nothing(limited: TestClient, tenant: Tenant) -> None:
    # Checked after authentication: a wrong secret with someone's prefix cannot drain their bucket.
    forged = {"Authorization": f"Bearer gatt_{tenant.prefix}_{'A' * 43}"}
    assert [limited.get("/v1/jobs", headers=forged).status_code for _ in range(6)] == [401] * 6
    assert [_get(limited, tenant).status_code for _ in range(3)] == [200, 200, 200]


def test_the_bucket_is_shared_by_api_processes(limited_settings: Settings, tenant: Tenant) -> None:
    """Two app instances (as two API processes would) draw from the same bucket in Redis."""
    # A token per 100 s: the first requests of two fresh apps can take over a second on a busy CI
    # machine, and at 1/s a token refilled in between let the fourth request through.
    slow = limited_settings.model_copy(update={"rate_limit_per_s": 0.01})
    with (
        TestClient(create_app(slow, enqueue=lambda _: None)) as a,
        TestClient(create_app(slow, enqueue=lambda _: None)) as b,
    ):
        assert [_get(a, tenant).status_code, _get(b, tenant).status_code, _get(a, tenant).status_code] == [
            200
        ] * 3
        assert _get(b, tenant).status_code == 429


def test_idle_buckets_expire(limited: TestClient, tenant: Tenant) -> None:
    _get(limited, tenant)
    ttl_ms = redis.Redis.from_url(REDIS_URL).pttl(KEY_PREFIX + tenant.prefix)
    assert 0 < ttl_ms <= 1000 + 1000  # refilled in ~1 s (1 token spent at 1/s), plus a second's margin


def test_retry_after_follows_the_rate() -> None:
    limiter = RateLimiter.from_url(REDIS_URL, per_s=0.25, burst=1)
    key = f"test-{time.monotonic_ns()}"
    assert limiter.check(key).allowed
    decision = limiter.check(key)
    assert not decision.allowed and decision.retry_after_s == 4
    limiter.close()


def test_redis_down_fails_open_with_one_warning(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """No Redis: requests pass (the limit protects capacity; the key was checked against Postgres),
    one warning is logged, and Redis is not asked again on every request."""
    settings = Settings(
        database_url=database_url,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        rate_limit_per_s=1,
        rate_limit_burst=1,
    )
    with TestClient(create_app(settings, enqueue=lambda _: None)) as client:
        tenant = make_tenant(client.app.state.sessionmaker)  # type: ignore[attr-defined]
        with caplog.at_level(logging.WARNING, logger="app.core.ratelimit"):
            started = time.monotonic()
            codes = [_get(client, tenant).status_code for _ in range(10)]
            elapsed = time.monotonic() - started
    assert codes == [200] * 10, "fail open: no request refused while Redis is away"
    warnings = [r for r in caplog.records if r.name == "app.core.ratelimit"]
    assert len(warnings) == 1 and "fail open" in warnings[0].getMessage()
    assert elapsed < 5, "after one failure Redis is not asked again for a while"


def test_limits_resume_when_redis_comes_back(redis_server: RedisServer) -> None:
    """Redis restarts (the suite's private one): fail open while it is down, limit again once back."""
    limiter = RateLimiter.from_url(redis_server.url, per_s=1, burst=1, retry_after_error_s=0.2)
    key = f"test-{time.monotonic_ns()}"
    assert limiter.check(key).allowed and not limiter.check(key).allowed
    redis_server.stop()
    try:
        assert all(limiter.check(key).allowed for _ in range(5))
    finally:
        redis_server.start()
    time.sleep(0.25)  # past retry_after_error_s: Redis is asked again (its script cache is empty now)
    assert limiter.check(key).allowed and not limiter.check(key).allowed
    limiter.close()


def test_zero_turns_rate_limiting_off(database_url: str) -> None:
    app = create_app(Settings(database_url=database_url, rate_limit_per_s=0), enqueue=lambda _: None)
    assert app.state.rate_limiter is None


def test_the_in_memory_bucket_refills_expires_and_keeps_keys_apart() -> None:
    now = [0.0]
    limiter = LocalRateLimiter(per_s=1, burst=3, clock=lambda: now[0])
    assert [limiter.check("a").allowed for _ in range(3)] == [True, True, True]
    refused = limiter.check("a")
    assert not refused.allowed and refused.retry_after_s == 1
    assert limiter.check("b").allowed, "another key has its own bucket"
    now[0] += 1.0
    assert limiter.check("a").allowed and not limiter.check("a").allowed
    now[0] += 10.0
    assert limiter.check("c").allowed
    assert set(limiter._buckets) == {"c"}, "buckets that refilled are dropped as the limiter goes"
    assert LocalRateLimiter(per_s=0.25, burst=1).check("x").allowed
    slow = LocalRateLimiter(per_s=0.25, burst=1, clock=lambda: 0.0)
    slow.check("x")
    assert slow.check("x").retry_after_s == 4


def test_the_embedded_server_limits_each_key_without_redis(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GATT_RATE_LIMIT_PER_S", "1")
    monkeypatch.setenv("GATT_RATE_LIMIT_BURST", "3")
    monkeypatch.setenv("GATT_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing there: not used
    key = create_key(tmp_path, "team-a")
    other = create_key(tmp_path, "team-b")
    with TestClient(create_embedded_app(tmp_path)) as client:
        headers = {"Authorization": f"Bearer {key}"}
        assert [client.get("/v1/jobs", headers=headers).status_code for _ in range(3)] == [200] * 3
        refused = client.get("/v1/jobs", headers=headers)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "rate_limited"
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {other}"}).status_code == 200
