"""Jobs: creation (validated config, idempotent retries), reads, cancellation, artifacts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core import quotas
from app.core.errors import Conflict, NotFound, Unprocessable
from app.jobs.schemas import CheckpointRef, JobCreate
from gatt.errors import Problem, ValidationFailed
from service import model_catalog, scheduling
from service.models import Checkpoint, Corpus, Job, JobStatus, Team
from service.pagination import PageParams, PageResult
from service.repositories import corpora, instruction_sets
from service.repositories import jobs as repository
from service.settings import Settings
from service.storage import (
    ArtifactMissing,
    ArtifactStore,
    InvalidKey,
    LocalStore,
    StoredFile,
    artifact_store,
    job_key,
)
from workers.engine.config import parse_options
from workers.engine.cost import Cost, estimate


def job_config(body_config: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The full options of a request (defaults filled in), or a 422 listing every problem."""
    try:
        config = parse_options(body_config).to_json()
        problems = []
        if (reward_model := config["reward"]["reward_model"]) is not None:
            problems = check_model_path(reward_model, settings, "reward.reward_model")
    except ValidationFailed as exc:
        problems = exc.problems
    if problems:
        raise Unprocessable.from_problems(
            problems,
            code="invalid_config",
            message="The job config is invalid; see details.",
            field_prefix="config",
        )
    return config


def job_cost(
    config: dict[str, Any], corpus: Corpus, settings: Settings, validation: Corpus | None = None
) -> Cost:
    """The job's bound on generated tokens, or a 422 `job_too_large` when it passes the server's."""
    stats = corpus.stats or {}
    held = (validation.stats or {}).get("dialogues", 0) if validation is not None else None
    cost = estimate(parse_options(config), stats.get("dialogues", 0), stats.get("user_turns", 0), held)
    limit = settings.max_job_generated_tokens
    if cost.generated_tokens > limit:
        raise Unprocessable(
            f"The job could generate up to {cost.generated_tokens:,} tokens, more than this service's "
            f"limit of {limit:,}: lower sampling.k, retries or max_new_tokens, data.max_dialogues or max_turns, "
            "or the evaluation's sizes.",
            code="job_too_large",
            param="config",
            details=[{"estimate": cost.to_json(), "limit": limit}],
        )
    return cost


def check_model_path(model: str, settings: Settings, field: str) -> list[Problem]:
    """A reward model named in a request must lie inside a configured model root."""
    path = Path(model)
    if not path.is_absolute():
        return [
            Problem("model_not_allowed", "give an absolute path under one of the server's model roots", field)
        ]
    real = path.resolve()  # symlinks resolved: a link inside a root must not lead outside it
    for root in settings.model_roots:
        if real.is_relative_to(root.resolve()):
            return []
    return [Problem("model_not_allowed", "the path is not under any of the server's model roots", field)]


@dataclass(frozen=True)
class Lineage:
    """What a new job starts from: a base model by id, and maybe a checkpoint of an earlier job."""

    model: str
    parent: Job | None = None
    parent_step: int | None = None


def base_model(session: Session, team: Team, requested: str | CheckpointRef, settings: Settings) -> Lineage:
    """The request's `model` checked: a model id of the catalog (or, as before ids, a path under a
    root), or one of the team's own checkpoints, whose base model the new job inherits."""
    roots = list(settings.model_roots)
    if isinstance(requested, CheckpointRef):
        parent = repository.get(session, team.id, requested.job_id)
        if parent is None:
            raise NotFound("No such job.", param="model.job_id")
        if parent.status != JobStatus.SUCCEEDED:
            raise Conflict(
                f"Job {parent.id} has {parent.status.value}; continue a job that has succeeded.",
                code="parent_not_succeeded",
                param="model.job_id",
            )
        steps = [c.step for c in repository.checkpoints(session, parent.id)]
        step = requested.step if requested.step is not None else max(steps, default=None)
        if step is None or step not in steps:
            raise NotFound(
                "The job has no checkpoint at this step; GET /v1/jobs/{job_id}/checkpoints lists them.",
                param="model.step",
            )
        _trainable(parent.model, roots, "model.job_id")
        _adapter_applies_to_base(session, parent)
        return Lineage(parent.model, parent, step)
    model_id = requested
    if requested.startswith("/"):  # a path under a root, as requests named models before ids
        model_id = model_catalog.id_of_path(requested, roots) or ""
        if not model_id:
            raise Unprocessable(
                "Name a model by its id (GET /v1/models lists them), not by a path.",
                code="model_not_allowed",
                param="model",
            )
    _trainable(model_id, roots, "model")
    return Lineage(model_id)


def _adapter_applies_to_base(session: Session, parent: Job) -> None:
    """A LoRA checkpoint is continued on its job's base model, which holds only while every job it
    continues trained LoRA: an adapter trained on another job's full weights applies to those."""
    job = parent
    for _ in range(1000):  # a chain is acyclic (a parent exists before its child); this bounds a bug
        if job.config["training"]["method"] != "lora" or job.parent_job_id is None:
            break
        ancestor = repository.get_any(session, job.parent_job_id)
        if ancestor is None or ancestor.config["training"]["method"] == "full":
            raise Unprocessable(
                f"Job {parent.id}'s adapter was trained on the full weights of an earlier job's "
                "checkpoint, not on its base model; continue from that checkpoint instead.",
                code="lineage_unsupported",
                param="model.job_id",
            )
        job = ancestor


def _trainable(model_id: str, roots: list[Path], param: str) -> None:
    try:
        model_catalog.resolve(model_id, roots)
    except model_catalog.ModelNotFound as exc:
        code = "model_not_found" if exc.info is None else "model_not_trainable"
        raise Unprocessable(str(exc), code=code, param=param) from None


# A LoRA checkpoint is continued by training its own adapter further (workers/engine/training.py):
# the new job's adapter has the parent's shape, so that it still loads onto the original base.
_ADAPTER_SHAPE = ("lora_r", "lora_alpha", "lora_targets")


def inherit_adapter(config: dict[str, Any], body_config: dict[str, Any], lineage: Lineage) -> dict[str, Any]:
    """`config` with the parent's adapter shape when both train LoRA; a 422 if the request set another."""
    if lineage.parent is None:
        return config
    parent, child = lineage.parent.config["training"], config["training"]
    if parent["method"] != "lora" or child["method"] != "lora":
        return config
    asked = body_config.get("training") if isinstance(body_config.get("training"), dict) else {}
    problems = [
        Problem(
            "lineage_conflict",
            f"the parent checkpoint's adapter has {key} = {parent[key]!r}; a LoRA job continuing it keeps "
            "that (leave the option out)",
            f"training.{key}",
        )
        for key in _ADAPTER_SHAPE
        if key in asked and child[key] != parent[key]
    ]
    if problems:
        raise Unprocessable.from_problems(
            problems, code="invalid_config", message=problems[0].message, field_prefix="config"
        )
    return {**config, "training": {**child, **{key: parent[key] for key in _ADAPTER_SHAPE}}}


def _request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create(
    session: Session, team: Team, body: JobCreate, settings: Settings, idempotency_key: str | None
) -> tuple[Job, bool]:
    """The new job and True, or (with a reused Idempotency-Key) the earlier job and False."""
    digest = _request_hash(body)
    if idempotency_key is not None:
        earlier = repository.get_by_idempotency_key(session, team.id, idempotency_key)
        if earlier is not None:
            return _same_request(earlier, digest), False
    quotas.check_job(session, team, settings)
    lineage = base_model(session, team, body.model, settings)
    config = inherit_adapter(job_config(body.config, settings), body.config, lineage)
    corpus = corpora.get_for_share(session, team.id, body.corpus_id)
    if corpus is None:
        raise NotFound("No such corpus.", param="corpus_id")
    validation = _validation_corpus(session, team, body.validation_corpus_id, config)
    cost = job_cost(config, corpus, settings, validation)
    set_id = body.instruction_set_id if isinstance(body.instruction_set_id, uuid.UUID) else None  # "default"
    if set_id is not None and instruction_sets.get_for_share(session, team.id, set_id) is None:
        raise NotFound("No such instruction set.", param="instruction_set_id")
    job = Job(
        team_id=team.id,
        status=JobStatus.QUEUED,
        model=lineage.model,
        parent_job_id=lineage.parent.id if lineage.parent else None,
        parent_step=lineage.parent_step,
        corpus_id=body.corpus_id,
        validation_corpus_id=body.validation_corpus_id,
        instruction_set_id=set_id,
        name=body.name,
        meta=body.metadata,
        config=config,
        queue=settings.job_queue,
        estimate=cost.to_json(),
        idempotency_key=idempotency_key,
        request_hash=digest,
    )
    try:
        with session.begin_nested():
            repository.add(session, job)
    except IntegrityError:
        # A concurrent retry with the same key won the insert: answer with its job.
        earlier = repository.get_by_idempotency_key(session, team.id, idempotency_key or "")
        if earlier is None:
            raise
        return _same_request(earlier, digest), False
    created = {"model": job.model, **({"parent": lineage_json(job)} if job.parent_job_id else {})}
    repository.add_event(session, job.id, "info", "created", "job created", created)
    return job, True


def _validation_corpus(
    session: Session, team: Team, id: uuid.UUID | None, config: dict[str, Any]
) -> Corpus | None:
    if id is None:
        return None
    if not config["evaluation"]["enabled"]:
        raise Unprocessable(
            "A validation corpus is for the evaluation: set evaluation.enabled, or leave it out.",
            code="invalid_request",
            param="validation_corpus_id",
        )
    corpus = corpora.get_for_share(session, team.id, id)  # not deleted while the job is created
    if corpus is None:
        raise NotFound("No such corpus.", param="validation_corpus_id")
    return corpus


def lineage_json(job: Job) -> dict[str, Any]:
    return {"job_id": str(job.parent_job_id), "step": job.parent_step}


def _same_request(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise Conflict(
            "This Idempotency-Key was used for a different request.",
            code="idempotency_key_reused",
            param="Idempotency-Key",
        )
    return job


def get(session: Session, team: Team, id: uuid.UUID) -> Job:
    job = repository.get(session, team.id, id)
    if job is None:
        raise NotFound("No such job.", param="job_id")
    return job


def version(session: Session, team: Team, id: uuid.UUID) -> tuple[datetime, int | None]:
    """What the job's ETag names, without loading the row: its last change, and its queue position
    while queued (which moves as other jobs start, with no change to its own row)."""
    row = repository.version(session, team.id, id)
    if row is None:
        raise NotFound("No such job.", param="job_id")
    position = None
    if row.status == JobStatus.QUEUED and row.queue is not None:
        position = scheduling.positions(session, row.queue).get(id)
    return row.updated_at, position


def queue_positions(session: Session, rows: list[Job]) -> dict[uuid.UUID, int]:
    """The queue position of each queued job among `rows` (one fair order per queue)."""
    positions: dict[uuid.UUID, int] = {}
    for queue in {row.queue for row in rows if row.status == JobStatus.QUEUED and row.queue is not None}:
        positions.update(scheduling.positions(session, queue))
    return positions


def delete(session: Session, team: Team, id: uuid.UUID, settings: Settings) -> None:
    """Delete a finished job: its files in the artifact store first, then its row (events, metrics,
    checkpoint rows by cascade). A store failure leaves the row, so deleting again finishes the job;
    the other order could leave files that no row counts against the team's quota."""
    job = get(session, team, id)
    if job.status not in repository.TERMINAL:
        raise Conflict("The job is queued or running; cancel it first.", code="job_active", param="job_id")
    if repository.continued_by_active(session, id):
        raise Conflict(
            "A queued or running job continues one of this job's checkpoints.", code="in_use", param="job_id"
        )
    store = artifact_store(settings)
    store.delete([f.key for f in store.list(job_key(job))])
    if isinstance(store, LocalStore):
        store.remove_empty_dirs(job_key(job))
    repository.delete(session, job)


def list_page(session: Session, team: Team, params: PageParams, status: JobStatus | None) -> PageResult[Job]:
    return repository.page(session, team.id, params, status)


def cancel(session: Session, team: Team, id: uuid.UUID) -> Job:
    job = get(session, team, id)
    if job.status in repository.TERMINAL:
        if job.status == JobStatus.CANCELLED:
            return job
        raise Conflict(f"The job has already {job.status.value}.", code="job_finished", param="job_id")
    if repository.cancel_queued(session, id):
        repository.add_event(session, id, "info", "cancelled", "cancelled before a worker started it", None)
    elif repository.request_cancel(session, id):
        repository.add_event(session, id, "info", "cancel_requested", "cancel requested; stopping", None)
    session.refresh(job)
    return job


def events(session: Session, team: Team, id: uuid.UUID, after_seq: int, limit: int):
    return repository.events(session, get(session, team, id).id, after_seq, limit)


def metrics(session: Session, team: Team, id: uuid.UUID, after_step: int, limit: int):
    return repository.metrics(session, get(session, team, id).id, after_step, limit)


def checkpoints(session: Session, team: Team, id: uuid.UUID) -> list[Checkpoint]:
    return repository.checkpoints(session, get(session, team, id).id)


# --- artifacts -------------------------------------------------------------------------------
# Read through the artifact store (service/storage.py): the shared directory, or S3 when configured.
# Keys are `<team>/<job>/...`, built from the job's row (or a checkpoint row's path), never from a request.


# A page of rows stops once it holds this much JSON (with at least one row): a row of a big job
# (K candidates of max_new_tokens each, for every turn) can be megabytes.
MAX_PAGE_BYTES = 8 * 1024 * 1024


def round_artifact(job: Job, name: str, round_: int) -> str:
    """Where round `round_` of the job keeps its `name` (`workers/engine/rounds.py`: round 1 in the
    job's folder, later rounds under rounds/<r>/); a round past the job's `rounds.count` is 404."""
    count = _round_count(job)
    if round_ > count:
        raise NotFound(
            f"The job runs {count} round{'s' if count > 1 else ''}; there is no round {round_}.",
            code="round_not_found",
            param="round",
        )
    return name if round_ == 1 else f"rounds/{round_}/{name}"


def artifact_page(settings: Settings, job: Job, name: str, offset: int, limit: int) -> bytes:
    """Rows `offset`.. of one of the job's JSONL artifacts (samples, training set) as the JSON of a
    page, `{"data": [...], "offset": ..., "has_more": ..., "next_after": ...}`, built from the stored lines without
    parsing them: a page costs its own bytes in memory, not a Python object per value."""
    rows: list[bytes] = []
    size = 0
    has_more = False
    # Line by line, as bytes: a worker may be appending right now (or died mid-append), and a last
    # line without its newline, possibly cut inside a UTF-8 sequence, is not a row yet (iter_lines
    # leaves it out). Closing the generator early closes the file or the S3 stream.
    lines = artifact_store(settings).iter_lines(f"{job_key(job)}/{name}")
    try:
        for i, line in enumerate(lines):
            if i < offset:
                continue
            if len(rows) == limit or (rows and size + len(line) > MAX_PAGE_BYTES):
                has_more = True
                break
            row = line.strip()
            rows.append(row)
            size += len(row)
    except ArtifactMissing:
        pass  # not written yet: no rows
    finally:
        lines.close()
    following = str(offset + len(rows)) if has_more else None
    tail = json.dumps({"offset": offset, "has_more": has_more, "next_after": following})[1:]
    return b'{"data": [' + b", ".join(rows) + b"], " + tail.encode()


def checkpoint_archive(
    session: Session, settings: Settings, team: Team, id: uuid.UUID, step: int
) -> Iterator[bytes]:
    """A checkpoint's files as a streamed .tar.gz, confined to the artifact store."""
    job = get(session, team, id)
    row = repository.checkpoint(session, job.id, step)
    if row is None:
        raise NotFound("No checkpoint at this step.", param="step")
    store = artifact_store(settings)
    try:
        # The listing gives every file with its size, which each tar header needs before its bytes.
        files = store.list(row.path)
    except InvalidKey:  # a path out of the store (`..`, absolute, a symlink leading out)
        files = []
    if not any(f.key == f"{row.path}/manifest.json" for f in files):  # gone, or never complete
        raise NotFound("The checkpoint's files are gone.", param="step")
    return _tar_stream(store, row.path, files, f"{job.id}-step-{step:06d}")


def _tar_stream(
    store: ArtifactStore, directory: str, files: list[StoredFile], prefix: str
) -> Iterator[bytes]:
    """A gzipped tar written piece by piece, each file streamed from the store in chunks, so a large
    merged checkpoint never sits in memory."""
    gzip = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    for file in files:
        info = tarfile.TarInfo(f"{prefix}/{file.key[len(directory) + 1 :]}")
        info.size = file.size
        info.mtime = int(file.mtime)
        info.mode = 0o644
        yield gzip.compress(info.tobuf(format=tarfile.PAX_FORMAT))
        sent = 0
        with contextlib.closing(store.iter_chunks(file.key)) as chunks:  # closes an S3 stream left early
            for data in chunks:
                sent += len(data)
                if sent > file.size:
                    break
                yield gzip.compress(data)
        if sent != file.size:
            # Changed since it was listed: a tar member of the wrong length would corrupt the rest.
            # Failing the response makes the client see a broken download, not a wrong checkpoint.
            raise RuntimeError(f"{file.key} changed while it was archived")
        yield gzip.compress(b"\0" * (-info.size % tarfile.BLOCKSIZE))  # pad to a whole block
    yield gzip.compress(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    yield gzip.flush()


def evaluation_file(session: Session, settings: Settings, team: Team, id: uuid.UUID, name: str) -> bytes:
    """One file of the job's evaluation (a JSON report or the PNG plot: small), whole."""
    return _evaluation_file(settings, get(session, team, id), name)


def _evaluation_file(settings: Settings, job: Job, name: str) -> bytes:
    data = artifact_store(settings).read_bytes(f"{job_key(job)}/evaluation/{name}")
    if data is None:
        raise NotFound("The job has no evaluation (yet).", code="not_evaluated", param="job_id")
    return data


def rounds(session: Session, settings: Settings, team: Team, id: uuid.UUID) -> dict[str, Any]:
    """The job's finished rounds (`workers/engine/rounds.py`) and how many it runs."""
    job = get(session, team, id)
    data = artifact_store(settings).read_bytes(f"{job_key(job)}/rounds.json")
    return {"count": _round_count(job), "data": json.loads(data) if data is not None else []}


def _round_count(job: Job) -> int:
    # Jobs stored before rounds existed have no rounds section: one round.
    return job.config.get("rounds", {}).get("count", 1)


def evaluation(session: Session, settings: Settings, team: Team, id: uuid.UUID) -> dict[str, Any]:
    job = get(session, team, id)
    # The report without its transcripts (every reply of every run: megabytes), written for this;
    # jobs evaluated before it existed have only the whole report.
    data = artifact_store(settings).read_bytes(f"{job_key(job)}/evaluation/adherence_summary.json")
    report = json.loads(data if data is not None else _evaluation_file(settings, job, "adherence.json"))
    for model_report in (report.get("base", {}), report.get("gatt", {})):
        model_report.pop("transcripts", None)
    attention = artifact_store(settings).read_bytes(f"{job_key(job)}/evaluation/attention.json")
    report["attention"] = json.loads(attention) if attention is not None else None
    return report
