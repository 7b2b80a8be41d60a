from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, BackgroundTasks, Header, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse

from app.auth.dependencies import CurrentTeam
from app.core.db import SessionDep, SettingsDep
from app.core.errors import AUTH_RESPONSES, ERROR_RESPONSES, Unprocessable, error_response
from app.core.openapi import REF
from app.core.pagination import PageParamsDep
from app.jobs import service
from app.jobs.schemas import (
    CheckpointList,
    CheckpointOut,
    Event,
    EventList,
    Job,
    JobCreate,
    JobList,
    Metric,
    MetricList,
    RoundList,
    SampleRows,
    TrainingRows,
)
from app.jobs.stream import PING_S, job_events, parse_cursor
from service import links
from service.models import JobStatus
from workers.engine.config import LIMITS, JobOptions

log = logging.getLogger(__name__)
# Sequence numbers, steps and offsets are 32-bit in the database; a larger one is a 422, not a
# database error.
MAX_INT = 2**31 - 1

router = APIRouter(prefix="/jobs", tags=["jobs"])

# Every list pages the same way: `limit`, and `after` set to the `next_after` of the page before.
# Here the cursor is a position (an event's seq, a step, a row index); the older names of it
# (`after_seq`, `after_step`, `offset`) are still taken.
After = Annotated[
    str | None,
    Query(
        max_length=10,
        pattern=r"^[0-9]+$",
        description="The `next_after` of the previous page; absent: from the start.",
    ),
]


def _position(after: str | None, older: int, param: str = "after") -> int:
    if after is None:
        return older
    if int(after) > MAX_INT:
        raise Unprocessable("The cursor is past any position.", code="invalid_cursor", param=param)
    return int(after)


JobId = Annotated[UUID, Path(description="The job's id.")]


def enqueue(request: Request, job_id: UUID) -> None:
    """Hand the job to the workers. Runs after the response, so after the job row is committed."""
    try:
        request.app.state.enqueue(job_id)
    except Exception:  # the broker is down: the job stays queued and the reaper enqueues it again
        log.exception("could not enqueue job %s", job_id)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Job,
    summary="Create a job",
    responses={
        **ERROR_RESPONSES,
        200: {"description": "A retry with the same `Idempotency-Key`: the job created the first time."},
        **error_response(409, "`idempotency_key_reused`: the key was used for a different request body."),
        **error_response(
            422,
            "`invalid_config` (every problem in `details`, with paths like `config.sampling.top_p`), "
            "`model_not_allowed`, `invalid_request`; `job_too_large`: the job could generate more tokens "
            "than the server allows (`details`: `estimate`, `limit`).",
        ),
        429: {
            **AUTH_RESPONSES[429],
            "description": "`quota_exceeded`: the team has as many queued and running jobs as it may "
            "(`details`: `quota` `active_jobs`, `limit`, `used`); retry when one has ended. `rate_limited`: "
            "too many requests with this key; retry after `Retry-After`.",
        },
    },
)
def create_job(
    body: JobCreate,
    session: SessionDep,
    team: CurrentTeam,
    settings: SettingsDep,
    request: Request,
    response: Response,
    background: BackgroundTasks,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=255,
            description="Makes retries safe: a second request with the same key and body returns the "
            "first job instead of creating another.",
        ),
    ] = None,
) -> Job:
    """Create a GAtt job: synthesize instructions, sample and rank replies, fine-tune with the GAtt
    loss mask. The job is queued; poll `GET /v1/jobs/{id}` or its events."""
    job, created = service.create(session, team, body, settings, idempotency_key)
    if created:
        background.add_task(enqueue, request, job.id)
    else:
        response.status_code = status.HTTP_200_OK
    return Job.from_row(job, service.queue_positions(session, [job]).get(job.id))


@router.get("", response_model=JobList, summary="List jobs", responses=AUTH_RESPONSES)
def list_jobs(
    session: SessionDep,
    team: CurrentTeam,
    page: PageParamsDep,
    status_filter: Annotated[
        JobStatus | None, Query(alias="status", description="Only jobs in this status.")
    ] = None,
) -> JobList:
    """The team's jobs, newest first, a page at a time (`after`, `limit`)."""
    result = service.list_page(session, team, page, status_filter)
    positions = service.queue_positions(session, result.items)
    return JobList.of(result, lambda row: Job.from_row(row, positions.get(row.id)))


# Declared before "/{job_id}" so that "config-defaults" is never taken for an id.
@router.get("/config-defaults", summary="Get the default job config", responses=AUTH_RESPONSES)
def get_config_defaults(team: CurrentTeam) -> JobOptions:
    """Every field of a job's `config` with its default value: what a job created with `"config": {}`
    runs with. Copy it and change what you need."""
    return JobOptions()


ETAG_HEADER = {
    "description": "The job's version: send it as `If-None-Match` to be answered 304 while it holds.",
    "schema": {"type": "string"},
}


def _etag(job_id: UUID, updated_at: datetime, queue_position: int | None) -> str:
    # Every write to a job sets updated_at (explicitly or by the column's onupdate), so (id, updated_at)
    # names one state of the row; the response is a function of the row and, while the job is queued,
    # of its queue position.
    version = f"{job_id}|{updated_at.isoformat()}"
    if queue_position is not None:
        version += f"|{queue_position}"
    digest = hashlib.blake2b(version.encode(), digest_size=12).hexdigest()
    return f'"{digest}"'


def _etag_matches(if_none_match: str, etag: str) -> bool:
    """If-None-Match uses the weak comparison: W/ prefixes are ignored; "*" matches any job."""
    tags = [t.strip() for t in if_none_match.split(",")]
    return any(t == "*" or t.removeprefix("W/") == etag for t in tags)


@router.get(
    "/{job_id}",
    response_model=Job,
    summary="Get a job",
    responses={
        **ERROR_RESPONSES,
        200: {"description": "The job.", "headers": {"ETag": ETAG_HEADER}},
        304: {
            "description": "Not modified: `If-None-Match` holds the job's current `ETag`. No body.",
            "headers": {"ETag": ETAG_HEADER},
        },
    },
)
def get_job(
    session: SessionDep,
    team: CurrentTeam,
    job_id: JobId,
    response: Response,
    if_none_match: Annotated[
        str | None,
        Header(
            description="The `ETag` of an earlier answer: an unchanged job is answered 304 without a body, "
            "from one indexed read (and, while the job is queued, a look at its queue)."
        ),
    ] = None,
) -> Job | Response:
    """Status, stage, progress, ETA, queue position, timestamps, error, trained tokens and latest
    metrics. The answer carries an `ETag`; poll with `If-None-Match` to get 304 while the job has not
    changed."""
    position: int | None = None
    if if_none_match is not None:
        # The cheap path: no row loaded, by primary key (and team, so another team's job is a 404);
        # a queued job's position costs one look at its queue, which is not taken twice below.
        updated_at, position = service.version(session, team, job_id)
        etag = _etag(job_id, updated_at, position)
        if _etag_matches(if_none_match, etag):
            return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    job = service.get(session, team, job_id)
    if if_none_match is None or job.status != JobStatus.QUEUED:
        position = service.queue_positions(session, [job]).get(job.id)
    response.headers["ETag"] = _etag(job.id, job.updated_at, position)
    return Job.from_row(job, position)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a job",
    responses={
        **ERROR_RESPONSES,
        **error_response(
            409,
            "`job_active`: it is queued or running (cancel it first). `in_use`: a queued or running job "
            "continues one of its checkpoints.",
        ),
    },
)
def delete_job(session: SessionDep, team: CurrentTeam, settings: SettingsDep, job_id: JobId) -> None:
    """Delete a finished job and everything it wrote: checkpoints, samples, training set, evaluation,
    events and metrics. What it kept counts against the team's artifact quota
    (`GATT_TEAM_MAX_ARTIFACT_BYTES`) until then. Jobs that continued its checkpoints keep their own
    files and their lineage in their manifests; their `parent_checkpoint` becomes null."""
    service.delete(session, team, job_id, settings)


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    summary="Cancel a job",
    responses={**ERROR_RESPONSES, **error_response(409, "`job_finished`: it already succeeded or failed.")},
)
def cancel_job(session: SessionDep, team: CurrentTeam, job_id: JobId) -> Job:
    """A queued job is cancelled at once; a running one stops within one training step (or sampling
    batch) and ends `cancelled`. Checkpoints written so far are kept. Cancelling twice is harmless."""
    return Job.from_row(service.cancel(session, team, job_id))


@router.get(
    "/{job_id}/events", response_model=EventList, summary="List a job's events", responses=ERROR_RESPONSES
)
def list_events(
    session: SessionDep,
    team: CurrentTeam,
    job_id: JobId,
    after: After = None,
    after_seq: Annotated[
        int, Query(ge=0, le=MAX_INT, description="The same as `after` (an event's `seq`); older name.")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many events.")] = 100,
) -> EventList:
    """The append-only log: stage changes, warnings, errors, checkpoints written. The log grows while
    the job runs: `next_after` is where to poll from next, also when `has_more` is false."""
    start = _position(after, after_seq)
    rows = service.events(session, team, job_id, start, limit + 1)
    last = rows[:limit][-1].seq if rows else start
    return EventList(
        data=[Event.model_validate(r) for r in rows[:limit]],
        has_more=len(rows) > limit,
        next_after=str(last),
        next_after_seq=last,
    )


@router.get(
    "/{job_id}/stream",
    summary="Stream a job's events",
    response_class=EventSourceResponse,
    responses={
        **ERROR_RESPONSES,
        200: {
            "description": "`text/event-stream`: `event: job_event` (data: an `Event`) and `event: "
            "metric` (data: a `Metric`), each with `id: <event seq>.<metric step>`; after the job's last "
            'event, `event: end` with `{"status": ...}`; a comment every 15 s while quiet.',
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
)
def stream_events(
    session: SessionDep,
    team: CurrentTeam,
    job_id: JobId,
    request: Request,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=32,
            description="Resume after this message id, `<event seq>.<metric step>` (what an EventSource "
            "sends when it reconnects).",
        ),
    ] = None,
    after_seq: Annotated[
        int, Query(ge=0, le=MAX_INT, description="Start after this event, when no Last-Event-ID is sent.")
    ] = 0,
    after_step: Annotated[
        int,
        Query(ge=0, le=MAX_INT, description="Start after this metric step, when no Last-Event-ID is sent."),
    ] = 0,
) -> EventSourceResponse:
    """The job's events and training metrics as they are written, as server-sent events: what came
    after `Last-Event-ID` (or `after_seq` and `after_step`) first, then each new one, until the job
    has ended. Reconnecting with the last `id` received continues without a gap or a repeat."""
    job = service.get(session, team, job_id)
    after = (after_seq, after_step)
    if last_event_id is not None:
        parsed = parse_cursor(last_event_id)
        if parsed is None:
            raise Unprocessable(
                "Last-Event-ID must be an id this stream sent: <event seq>.<metric step>.",
                code="invalid_request",
                param="Last-Event-ID",
            )
        after = parsed
    return EventSourceResponse(job_events(request.app.state.event_feed, job.id, after), ping=PING_S)


@router.get(
    "/{job_id}/metrics", response_model=MetricList, summary="List a job's metrics", responses=ERROR_RESPONSES
)
def list_metrics(
    session: SessionDep,
    team: CurrentTeam,
    job_id: JobId,
    after: After = None,
    after_step: Annotated[
        int, Query(ge=0, le=MAX_INT, description="The same as `after` (a step); older name.")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=10000, description="At most this many steps.")] = 1000,
) -> MetricList:
    """One row per optimiser step. Steps come while the job trains: `next_after` is where to poll
    from next, also when `has_more` is false."""
    start = _position(after, after_step)
    rows = service.metrics(session, team, job_id, start, limit + 1)
    last = rows[:limit][-1].step if rows else start
    return MetricList(
        data=[Metric(step=r.step, values=r.values, created_at=r.created_at) for r in rows[:limit]],
        has_more=len(rows) > limit,
        next_after=str(last),
        next_after_step=last,
    )


def _rows(session, settings, team, job_id, name: str, round_: int, offset: int, limit: int) -> Response:
    # The stored rows as they are, unparsed (app/jobs/service.py, artifact_page); the response model
    # documents them.
    job = service.get(session, team, job_id)
    name = service.round_artifact(job, name, round_)
    return Response(service.artifact_page(settings, job, name, offset, limit), media_type="application/json")


Offset = Annotated[
    int, Query(ge=0, le=MAX_INT, description="The same as `after` (the index of the first row); older name.")
]
Limit = Annotated[int, Query(ge=1, le=500, description="At most this many rows.")]
RoundNumber = Annotated[
    int,
    Query(
        alias="round",
        ge=1,
        le=LIMITS["rounds"],
        description="The round (`rounds.count`): each samples with the model the round before trained "
        "and trains on its own samples; past the job's count: 404 `round_not_found`.",
    ),
]


@router.get(
    "/{job_id}/samples",
    response_model=SampleRows,
    summary="List sampled dialogues",
    responses=ERROR_RESPONSES,
)
def list_samples(
    session: SessionDep,
    team: CurrentTeam,
    settings: SettingsDep,
    job_id: JobId,
    after: After = None,
    offset: Offset = 0,
    limit: Limit = 50,
    round_: RoundNumber = 1,
) -> Response:
    """One row per sampled dialogue: its instruction, and per turn every candidate with its reward
    and reason, the chosen index (null when the turn was dropped) and statistics."""
    return _rows(session, settings, team, job_id, "samples.jsonl", round_, _position(after, offset), limit)


@router.get(
    "/{job_id}/training-set",
    response_model=TrainingRows,
    summary="List the training set",
    responses=ERROR_RESPONSES,
)
def list_training_set(
    session: SessionDep,
    team: CurrentTeam,
    settings: SettingsDep,
    job_id: JobId,
    after: After = None,
    offset: Offset = 0,
    limit: Limit = 50,
    round_: RoundNumber = 1,
) -> Response:
    """The training dialogues (instruction in the first turn only), which messages train, and the
    trained spans decoded from tokens: each sampled reply plus its end-of-turn token."""
    return _rows(
        session, settings, team, job_id, "training_set.jsonl", round_, _position(after, offset), limit
    )


@router.get(
    "/{job_id}/rounds", response_model=RoundList, summary="List a job's rounds", responses=ERROR_RESPONSES
)
def list_rounds(
    session: SessionDep, team: CurrentTeam, settings: SettingsDep, job_id: JobId
) -> dict[str, Any]:
    """Each finished round of sampling, ranking and training (`rounds.count`; 1 for a plain job):
    the reward of the candidates it kept, over the round and by batch of dialogues sampled
    together (the paper's appendix plots it falling as rounds go on), what it trained and the
    steps it took. Empty until the first round has trained."""
    return service.rounds(session, settings, team, job_id)


@router.get(
    "/{job_id}/evaluation",
    summary="Get a job's evaluation",
    response_model=None,
    responses={
        200: {
            "description": "The evaluation (transcripts left out).",
            "content": {"application/json": {"schema": {"$ref": REF.format(model="JobEvaluation")}}},
        },
        **ERROR_RESPONSES,
        **error_response(404, "`not_evaluated`: the job has no evaluation (yet)."),
    },
)
def get_evaluation(
    session: SessionDep, team: CurrentTeam, settings: SettingsDep, job_id: JobId
) -> dict[str, Any]:
    """Adherence by turn before (`base`) and after (`gatt`) training, on held-out dialogues with
    instructions drawn apart from training: per condition (`once`: the instruction in the first turn
    only; `every_turn`: the ceiling) and turn, the rate with its 95% Wilson interval, per family;
    `compare` (differences and whether intervals overlap), `overlap` (held-out vs training data),
    `table` (plain text), and `attention` (share of attention on the instruction per turn) when measured.
    Jobs run it when `config.evaluation.enabled` is true."""
    return service.evaluation(session, settings, team, job_id)


@router.get(
    "/{job_id}/evaluation/attention.png",
    summary="Get the attention plot",
    response_class=Response,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"image/png": {}}, "description": "A PNG."},
        **error_response(
            404, "`not_found`: no such job; `not_evaluated`: the job has no attention plot (yet)."
        ),
    },
)
def get_attention_plot(
    session: SessionDep, team: CurrentTeam, settings: SettingsDep, job_id: JobId
) -> Response:
    """Share of attention on the instruction's tokens per turn, base vs fine-tuned (max and mean over
    heads and layers)."""
    png = service.evaluation_file(session, settings, team, job_id, "attention.png")
    return Response(png, media_type="image/png")


@router.get(
    "/{job_id}/checkpoints",
    response_model=CheckpointList,
    summary="List checkpoints",
    responses=ERROR_RESPONSES,
)
def list_checkpoints(
    session: SessionDep, team: CurrentTeam, settings: SettingsDep, job_id: JobId, request: Request
) -> CheckpointList:
    """Checkpoints written so far, with the metrics at their step and an absolute download URL."""

    def download_url(step: int) -> str:
        # GATT_PUBLIC_URL where the service sits behind a proxy; else the address this request used.
        return links.public_url(settings, links.checkpoint_path(job_id, step)) or str(
            request.url_for("download_checkpoint", job_id=job_id, step=step)
        )

    return CheckpointList(
        data=[
            CheckpointOut(
                step=c.step,
                manifest=c.manifest,
                metrics=c.metrics,
                created_at=c.created_at,
                download_url=download_url(c.step),
            )
            for c in service.checkpoints(session, team, job_id)
        ]
    )


@router.get(
    "/{job_id}/checkpoints/{step}/archive",
    summary="Download a checkpoint",
    response_class=StreamingResponse,
    responses={
        **ERROR_RESPONSES,
        200: {"content": {"application/gzip": {}}, "description": "A .tar.gz."},
        **error_response(404, "`not_found`: no such job, no checkpoint at this step, or its files are gone."),
    },
)
def download_checkpoint(
    session: SessionDep,
    team: CurrentTeam,
    settings: SettingsDep,
    job_id: JobId,
    step: Annotated[int, Path(ge=0, le=MAX_INT, description="The checkpoint's step.")],
) -> StreamingResponse:
    """The checkpoint as a streamed .tar.gz: adapter or full weights (safetensors), tokenizer with its
    chat template, configs and a manifest with the sha256 of every file. Loads with
    `PeftModel.from_pretrained` / `AutoModelForCausalLM.from_pretrained` once unpacked."""
    stream = service.checkpoint_archive(session, settings, team, job_id, step)
    name = f"{job_id}-step-{step:06d}.tar.gz"
    return StreamingResponse(
        stream,
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
