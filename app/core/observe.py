"""What operators see of the API: a request id, an access log line and Prometheus metrics per request,
and `GET /metrics`.

The middleware sits outermost, so that it sees every answer, the ones the admission limit and the
body checks give too. It takes the client's `X-Request-ID` when it is a plain token (else makes one),
returns it, binds it to the request's log records (service/logs.py) and logs one line when the
answer is sent: method, route template, status, duration, and the team once the key was checked.

`/metrics` (prometheus-client, text format) holds this process's request counts and latencies by
route and status, and, read from Postgres at each scrape, jobs by queue, status and stage, plus the
job-queue messages waiting on the broker. Each app has its own registry: tests build many apps in
one process. Workers serve their own metrics (workers/metrics.py).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import AppError
from service import logs
from service.repositories import jobs

log = logging.getLogger("gatt.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Routes are labelled by template (`/v1/jobs/{job_id}`), never by path: ids would make a series each.
_UNMATCHED = "unmatched"


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "gatt_http_requests", "API requests answered", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "gatt_http_request_duration_seconds",
            "Time to the end of each answer (the whole stream, for event streams)",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )


class Observe:
    """Pure ASGI (a streaming answer is not buffered): request id, access log, request metrics."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        started = time.perf_counter()
        status = 500  # unless an answer starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        with logs.bind(request_id=request_id) as fields:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                template = route_template(scope)
                elapsed = time.perf_counter() - started
                self.metrics.requests.labels(scope["method"], template, str(status)).inc()
                self.metrics.latency.labels(scope["method"], template).observe(elapsed)
                log.info(
                    "%s %s %d",
                    scope["method"],
                    template,
                    status,
                    extra={
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 1),
                        "request_id": request_id,
                        **_team(fields),
                    },
                )


def route_template(scope: Scope) -> str:
    """The matched route's template with its routers' prefixes (`/v1/jobs/{job_id}`). The route knows
    its template below the routers that include it, so the path's part before it is the prefix (ours
    are literal, like `/v1`)."""
    route = scope.get("route")
    regex, template = getattr(route, "path_regex", None), getattr(route, "path_format", None)
    if regex is None or template is None:
        return _UNMATCHED
    path = scope["path"]
    for cut in (i for i, c in enumerate(path) if c == "/"):
        if regex.fullmatch(path[cut:]):
            return path[:cut] + template
    return _UNMATCHED


def _team(fields: dict[str, Any]) -> dict[str, Any]:
    return {"team_id": str(fields["team_id"])} if "team_id" in fields else {}


class JobsCollector(Collector):
    """Read at each scrape: jobs by queue, status and stage, and the broker's waiting job messages."""

    def __init__(self, sessions: sessionmaker[Session], waiting: Callable[[], int] | None, queue: str):
        self.sessions, self.waiting, self.queue = sessions, waiting, queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "gatt_jobs", "Jobs by queue, status and stage", labels=["queue", "status", "stage"]
        )
        with self.sessions() as session:
            for queue, status, stage, count in jobs.counts_by_state(session):
                family.add_metric([queue or "", status.value, stage.value if stage else ""], count)
        yield family
        if self.waiting is not None:
            broker = GaugeMetricFamily(
                "gatt_broker_waiting_messages", "Job messages waiting on the broker", labels=["queue"]
            )
            try:
                broker.add_metric([self.queue], self.waiting())
            except Exception:  # the broker is down: /readyz says so; the scrape still answers
                logging.getLogger(__name__).warning("cannot count the broker's messages", exc_info=True)
            else:
                yield broker


class MetricsForbidden(AppError):
    status_code, code, message = (
        401,
        "invalid_metrics_token",
        "Give the metrics token: Authorization: Bearer <token>.",
    )


def metrics_router(registry: CollectorRegistry, token: str | None) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if token is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                raise MetricsForbidden()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
