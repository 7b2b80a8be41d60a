"""The FastAPI application: `uvicorn app.main:app`, or `create_app(settings, ...)` composed with other
parts (tests, the embedded mode)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from uuid import UUID

from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

from app.api import api_router
from app.auth.service import authenticate
from app.core.admission import AdmissionLimit
from app.core.body_first import BodyFirst
from app.core.body_limit import BodyLimitMiddleware
from app.core.docs import install_docs
from app.core.errors import install_error_handlers
from app.core.headers import SECURITY_HEADERS, ResponseHeaders
from app.core.observe import HttpMetrics, JobsCollector, Observe, metrics_router
from app.core.openapi import publish_schemas
from app.core.ratelimit import Limiter, RateLimiter
from app.corpora.upload import MULTIPART_OVERHEAD_BYTES
from app.health import endpoints as health
from app.instruction_sets.spec_schema import InstructionSetSpec
from app.jobs.chat import CHAT_BURST, Chat, RedisChat, Waiting
from app.jobs.stream import EventFeed
from app.reaper import reaping
from app.ui import install_ui
from service.db import make_engine, make_sessionmaker
from service.logs import configure_logging
from service.queue import send_chat, send_job, send_webhook, waiting_jobs
from service.settings import Settings, get_settings
from service.webhooks import send_after_commit
from workers.engine.eval_schema import JobEvaluation
from workers.engine.records import SampleRow, TrainingRow

DESCRIPTION = """\
Ghost Attention (GAtt) fine-tuning as a service.

Authenticate with `Authorization: Bearer <key>` (keys look like `gatt_<prefix>_<secret>`). Every
resource belongs to the key's team; another team's ids answer 404.

Errors always have the body `{"error": {"code", "message", "param", "details"?}}`: `code` is stable
(`missing_api_key`, `invalid_api_key`, `not_found`, `invalid_request`, `invalid_corpus`,
`invalid_instruction_set`, `invalid_cursor`, `in_use`, `payload_too_large`, `rate_limited`, `quota_exceeded`,
`internal_error`, ...), `param` names the request field at fault, `details` lists every problem of a
validation error.

Each API key may make `GATT_RATE_LIMIT_PER_S` requests a second on average, with bursts up to
`GATT_RATE_LIMIT_BURST`; past that the answer is 429 `rate_limited` with a `Retry-After` header.
Each team may have `GATT_TEAM_MAX_ACTIVE_JOBS` queued and running jobs (429 `quota_exceeded` past
that) and store up to its corpus and instruction-set quotas (422 `quota_exceeded`). Queued jobs start
in a fair order across teams; each shows its `queue_position`.

Every list pages with `limit` and `after` (the `next_after` of the previous page) and says `has_more`:
resources newest first; a job's events and metrics oldest first, where `next_after` is also where to
poll from for new ones.
"""


TITLE = "GAtt fine-tuning service"


def create_app(
    settings: Settings | None = None,
    enqueue: Callable[[UUID], None] | None = None,
    *,
    engine: Engine | None = None,
    readiness: APIRouter | None = None,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    rate_limiter: Limiter | None = None,
    send_webhook_delivery: Callable[[UUID], None] | None = None,
    chat: Chat | None = None,
    chat_limiter: Limiter | None = None,
    title: str = TITLE,
) -> FastAPI:
    """The app, composed of what it runs on.

    `engine` holds job state (default: the database of `settings`); the app disposes it when it
    stops. `enqueue` hands a committed job to the workers (default: a Celery message by name,
    `service.queue.send_job`). `readiness` serves `/readyz` (default: Postgres, Redis and, with
    S3, the bucket). `lifespan` runs inside the app's own, to start and stop what the caller adds
    (the embedded mode's worker thread). `rate_limiter` checks each key's rate (default: buckets in
    Redis when `GATT_RATE_LIMIT_PER_S` > 0). `send_webhook_delivery` hands a committed webhook
    delivery to the workers (default: a `webhooks.deliver` message when `enqueue` is the default too;
    else none, and the reaper's sweeps or the embedded worker deliver). `chat` answers the playground
    (default: a `chat.reply` message, the answer read from Redis); `chat_limiter` checks each team's
    chat rate (default: buckets in Redis when `GATT_CHAT_PER_MINUTE` > 0).
    """
    settings = settings or get_settings()
    engine = engine if engine is not None else make_engine(settings)
    limiter = rate_limiter
    if limiter is None and settings.rate_limit_per_s > 0:
        limiter = RateLimiter.from_url(
            settings.redis_url, settings.rate_limit_per_s, settings.rate_limit_burst
        )

    chat = chat if chat is not None else RedisChat(settings.redis_url, send_chat)
    if chat_limiter is None and settings.chat_per_minute > 0:
        chat_limiter = RateLimiter.from_url(settings.redis_url, settings.chat_per_minute / 60, CHAT_BURST)

    @asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            await app.state.event_feed.close()
            engine.dispose()
            if limiter is not None:
                limiter.close()
            if chat_limiter is not None:
                chat_limiter.close()
            await chat.close()

    app = FastAPI(
        title=title,
        version="0.1.0",
        description=DESCRIPTION,
        docs_url=None,  # served from local copies below, not from a CDN (app/core/docs.py)
        redoc_url=None,
        lifespan=app_lifespan,
        # operationId = the endpoint function's name (`create_job`, `list_jobs`, ...): what client
        # generators name their methods after.
        generate_unique_id_function=lambda route: route.name,
        # One schema per model (not "-Input"/"-Output" pairs): `JobOptions` is named by the job
        # schemas' $ref (app/jobs/schemas.py).
        separate_input_output_schemas=False,
        openapi_tags=[
            {"name": "instruction sets", "description": "The instructions GAtt teaches a model to keep."},
            {"name": "corpora", "description": "Dialogue corpora (JSONL) that jobs train on."},
            {
                "name": "jobs",
                "description": "GAtt fine-tuning jobs, their events, metrics, samples and checkpoints.",
            },
            {
                "name": "webhooks",
                "description": "Signed notifications (Standard Webhooks) of job endings and checkpoints.",
            },
            {"name": "keys", "description": "The team's API keys: create, list and revoke them."},
            {"name": "health", "description": "Liveness and readiness probes."},
        ],
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.enqueue = enqueue or send_job
    # Webhook events this app's transactions record (a cancel ends a job) go out after the commit.
    if send_webhook_delivery is None and enqueue is None:
        send_webhook_delivery = send_webhook
    app.state.send_webhook = send_webhook_delivery
    if send_webhook_delivery is not None:
        send_after_commit(app.state.sessionmaker, send_webhook_delivery)
    # What the reaper compares queued jobs with (service/reaper.py); None with another enqueue.
    app.state.waiting_jobs = waiting_jobs if enqueue is None else None
    # Wakes the job event streams of this process (app/jobs/stream.py); started by the first one.
    app.state.event_feed = EventFeed(app.state.sessionmaker, settings.database_url)
    app.state.rate_limiter = limiter  # per API key, checked in app.auth.dependencies.current_team
    app.state.chat, app.state.chat_limiter, app.state.chat_waiting = chat, chat_limiter, Waiting()

    # /metrics: this app's request metrics and, read at each scrape, the jobs (app/core/observe.py).
    registry = CollectorRegistry()
    app.state.http_metrics = HttpMetrics(registry)
    registry.register(JobsCollector(app.state.sessionmaker, app.state.waiting_jobs, settings.job_queue))

    install_error_handlers(app)
    _add_middleware(app, settings)
    app.include_router(health.liveness)
    app.include_router(metrics_router(registry, settings.metrics_token))
    app.include_router(readiness if readiness is not None else health.readiness)
    app.include_router(api_router)
    install_docs(app)
    install_ui(app)
    publish_schemas(app, [SampleRow, TrainingRow, JobEvaluation, InstructionSetSpec])
    return app


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    # Outermost last: headers on every answer; the whole body in before a slot is taken
    # (app/core/body_first.py); then a slot before any other work (app/core/admission.py).
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_json_body_bytes)
    app.add_middleware(AdmissionLimit, limit=settings.max_requests_in_flight)

    def check_key(authorization: str | None) -> None:
        with app.state.sessionmaker() as session:
            authenticate(session, authorization)

    app.add_middleware(
        BodyFirst,
        authenticate=check_key,
        # The connections the admission limit leaves spare (service/db.py): a key check is one
        # thread call that never holds a connection while it waits for anything else.
        auth_slots=max(1, settings.db_pool_size + settings.db_max_overflow - settings.max_requests_in_flight),
        max_bytes=max(settings.max_json_body_bytes, settings.max_corpus_bytes + MULTIPART_OVERHEAD_BYTES),
        grace_s=settings.body_grace_s,
        min_bytes_per_s=settings.body_min_bytes_per_s,
    )
    app.add_middleware(ResponseHeaders, headers=SECURITY_HEADERS)
    # Outermost: every answer is counted and logged with its request id, the refusals above too.
    app.add_middleware(Observe, metrics=app.state.http_metrics)


def __getattr__(name: str) -> FastAPI:
    # `uvicorn app.main:app`: the service app is built when first asked for, not when this module is
    # imported, so that importing `create_app` (tests, the embedded mode) builds nothing.
    if name == "app":
        settings = get_settings()
        configure_logging(settings.log_format, settings.log_level)
        lifespan = reaping(settings.reaper_interval_s) if settings.reaper_interval_s > 0 else None
        globals()["app"] = built = create_app(settings, lifespan=lifespan)
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
