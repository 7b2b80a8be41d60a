from __future__ import annotations

import logging
from typing import Literal

import anyio
import redis
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from sqlalchemy import text

from app.core.errors import ServiceUnavailable, error_response
from service.storage import remote_store

log = logging.getLogger(__name__)

# Two routers, so that a composition (the embedded mode) can serve its own readiness check.
liveness = APIRouter(tags=["health"])
readiness = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = Field(default="ok", description='Always "ok" when the process answers.')


class Readiness(BaseModel):
    status: Literal["ok"] = Field(default="ok", description='"ok": every dependency answered.')
    checks: dict[str, str] = Field(
        description='Each dependency checked ("postgres", "redis", and "artifact_store" when artifacts go to '
        'S3) and "ok".'
    )


@liveness.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """The process is up and serving requests. Checks nothing else (see /readyz)."""
    return Health()


def _check_postgres(request: Request) -> None:
    with request.app.state.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _check_redis(request: Request, timeout_s: float) -> None:
    client = redis.Redis.from_url(
        request.app.state.settings.redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    try:
        client.ping()
    finally:
        client.close()


@readiness.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    responses=error_response(
        503, "A dependency did not answer in time (`not_ready`); `details` says which and why."
    ),
)
async def readyz(request: Request) -> Readiness:
    """Postgres (`SELECT 1`) and Redis (`PING`) answer within a short timeout, and, when artifacts go
    to S3, the bucket answers a HEAD request with these credentials."""
    settings = request.app.state.settings
    timeout_s = settings.readiness_timeout_s
    checks = {"postgres": lambda: _check_postgres(request), "redis": lambda: _check_redis(request, timeout_s)}
    store = remote_store(settings)
    if store is not None:
        checks["artifact_store"] = store.check
    failures: dict[str, str] = {}

    async def run(name: str) -> None:
        try:
            with anyio.fail_after(timeout_s):
                # abandon_on_cancel: a hung driver call must not hold the probe past its timeout.
                await anyio.to_thread.run_sync(checks[name], abandon_on_cancel=True)
        except TimeoutError:
            failures[name] = f"no answer within {timeout_s:g} s"
        except Exception as e:
            # The probe needs no key: the answer names the failure's kind, never the dependency's
            # address or credentials (the log has the whole message).
            log.warning("readiness: %s failed: %s", name, e)
            failures[name] = f"{type(e).__name__} (details in the server log)"

    async with anyio.create_task_group() as tg:
        for name in checks:
            tg.start_soon(run, name)
    if failures:
        raise ServiceUnavailable(
            "Not ready: " + ", ".join(sorted(failures)) + " failed.",
            code="not_ready",
            details=[
                {"code": "check_failed", "field": name, "message": failures[name]}
                for name in sorted(failures)
            ],
        )
    return Readiness(checks=dict.fromkeys(checks, "ok"))
