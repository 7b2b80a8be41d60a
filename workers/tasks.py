"""Celery tasks: thin wrappers that load a job, call the engine and persist what it reports.

`jobs.run` takes the lease of the job it should start in Postgres (so a redelivered message never
starts a second run; service/scheduling.py picks the job), prepares the job's inputs in its
artifact directory, runs the engine with the hooks of a `JobRun` (workers/job_run.py: progress,
events, metrics and checkpoints to Postgres, fenced by the lease, renewed by a heartbeat), and
makes the one terminal transition.

`jobs.reap` finds jobs whose worker vanished (lease expired) and queued jobs whose message was
lost, and sends them again; a job that has used up its attempts fails with `worker_lost`.

With an S3 artifact store (`GATT_S3_BUCKET`), the artifact directory is this worker's scratch: the
hooks upload each checkpoint before its row is written and the other artifacts at every stage change,
the ending uploads what is left, and a new attempt first downloads what the store holds
(`workers/artifact_sync.py`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from gatt.errors import GattError
from service import logs, model_catalog, scheduling, webhooks
from service.db import make_engine, make_sessionmaker, session_scope
from service.models import Job, JobStatus
from service.queue import waiting_messages
from service.reaper import reap
from service.repositories import corpora, instruction_sets, jobs
from service.settings import Settings, get_settings
from service.storage import ArtifactMissing, StoreError, job_dir, job_key, remote_store
from workers import metrics as counters
from workers.artifact_sync import ScratchSync, artifact_bytes, stored_checkpoint
from workers.celery_app import JOB_TASK, REAP_TASK, WEBHOOK_TASK, celery
from workers.engine.hooks import Stopped
from workers.job_run import JobRun, end_run, transaction, transient_db_error
from workers.redact import server_paths
from workers.tracking import Tracker

log = logging.getLogger(__name__)

_factory = None


def sessions():
    global _factory
    if _factory is None:
        _factory = make_sessionmaker(make_engine(get_settings()))
        # Webhook events recorded by this worker's transactions (a job's ending, a checkpoint) are
        # sent once they commit; the reaper sends any whose message is lost.
        webhooks.send_after_commit(_factory, send_webhook)
    return _factory


def send_webhook(delivery_id: uuid.UUID, countdown: float | None = None) -> None:
    celery.send_task(WEBHOOK_TASK, args=[str(delivery_id)], countdown=countdown)


def prepare_config(job: Job, settings: Settings, out: Path, factory: sessionmaker[Session] | None = None):
    """The engine config of a stored job: its inputs written into the job's artifact directory."""
    from workers.engine.config import parse_config

    out.mkdir(parents=True, exist_ok=True)
    with session_scope(factory or sessions()) as s:
        content = corpora.read_content(s, job.corpus_id)
        held = corpora.read_content(s, job.validation_corpus_id) if job.validation_corpus_id else None
        spec = None
        if job.instruction_set_id is not None:
            spec = instruction_sets.spec(s, job.instruction_set_id)
    if content is None:
        raise JobFailure("corpus_deleted", "The job's corpus was deleted before the job ran.")
    (out / "corpus.jsonl").write_bytes(content)
    validation = None
    if job.validation_corpus_id is not None:
        if held is None:
            raise JobFailure("corpus_deleted", "The job's validation corpus was deleted before the job ran.")
        (out / "validation.jsonl").write_bytes(held)
        validation = str(out / "validation.jsonl")
    instructions = "default"
    if spec is not None:
        (out / "instruction_set.json").write_text(json.dumps(spec), encoding="utf-8")
        instructions = str(out / "instruction_set.json")
    raw = dict(job.config)
    raw["data"] = {
        **raw.get("data", {}),
        "corpus": str(out / "corpus.jsonl"),
        "validation": validation,
        "instructions": instructions,
    }
    base = _model_dir(job.model, settings)
    lineage: dict[str, object] = {"base_model": job.model}
    model = base
    if job.parent_job_id is not None:
        lineage.update(parent_job_id=str(job.parent_job_id), parent_step=job.parent_step)
        model = str(_parent_checkpoint(job, settings, out, factory or sessions()))
        if not (Path(model) / "adapter_config.json").is_file():
            # Full weights: an adapter trained on them applies to them, not to the base model.
            lineage["adapter_base"] = f"job:{job.parent_job_id}@{job.parent_step}"
    return parse_config(
        {**raw, "model": model, "base_model": base, "lineage": lineage, "output_dir": str(out)}
    )


def _model_dir(model_id: str, settings: Settings) -> str:
    """Where this worker finds the model `model_id` ("default" stays a name: the engine's own cache)."""
    roots = list(settings.model_roots)
    if model_id.startswith("/"):  # a job queued before models had ids
        model_id = model_catalog.id_of_path(model_id, roots) or model_id
    try:
        directory = model_catalog.resolve(model_id, roots)
    except model_catalog.ModelNotFound as exc:
        raise JobFailure("model_not_found" if exc.info is None else "model_not_trainable", str(exc)) from None
    return str(directory) if directory is not None else model_catalog.DEFAULT_ID


def _parent_checkpoint(job: Job, settings: Settings, out: Path, factory: sessionmaker[Session]) -> Path:
    """The directory of the checkpoint `job` continues: in place in a local store, downloaded from S3."""
    with session_scope(factory) as s:
        row = jobs.checkpoint(s, job.parent_job_id, job.parent_step) if job.parent_step else None
        key = row.path if row is not None else None
    missing = JobFailure(
        "parent_checkpoint_missing",
        f"The checkpoint this job continues (job {job.parent_job_id}, step {job.parent_step}) is gone.",
    )
    if key is None:
        raise missing
    try:
        directory = stored_checkpoint(settings, key, out)
    except ArtifactMissing:
        raise missing from None
    from workers.engine.checkpoints import verify_checkpoint  # torch loads here, in the worker

    if (problem := verify_checkpoint(directory)) is not None:
        raise JobFailure(
            "parent_checkpoint_invalid", f"The checkpoint this job continues is damaged: {problem}."
        )
    return directory


class JobFailure(GattError):
    """A job that cannot run for a reason of the service's (its corpus was deleted, ...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.job_code, self.message = code, message


def error_of(exc: BaseException) -> tuple[str, str]:
    """A stable code and a message a user can act on."""
    if isinstance(exc, GattError):
        return exc.job_code, str(exc)
    if isinstance(exc, StoreError):
        return "artifact_store", f"The artifact store failed: {exc}"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return (
            "out_of_memory",
            "The worker ran out of memory: lower sampling.batch_prompts or micro_batch_size.",
        )
    return "internal_error", f"{type(exc).__name__}: {exc}"


@celery.task(name=JOB_TASK, bind=True)
def run_job_task(self, job_id: str) -> str:
    return run_job_by_id(job_id, get_settings(), sessions(), on_abandon=_exit_worker_process)


def _exit_worker_process() -> None:
    """The job's engine is stuck in a thread nothing can stop, and the job has been ended: exit, so
    that the pool (prefork) or the supervisor (solo; compose restarts it) starts a fresh process."""
    log.error("exiting this worker process: a stuck job's thread cannot be stopped otherwise")
    logging.shutdown()
    os._exit(70)


def run_job_by_id(
    job_id: str | uuid.UUID,
    settings: Settings,
    factory: sessionmaker[Session],
    *,
    on_abandon: Callable[[], None] | None = None,
) -> str:
    """One run of a job: lease, engine, persist, terminal transition. The body of `jobs.run`, callable
    without Celery (the embedded mode's in-process worker, `app.embedded`). Returns what happened.
    `on_abandon` runs after a stuck engine's job was ended by its heartbeat (see `JobRun`).
    Every log line of the run names the job and the attempt (service/logs.py)."""
    started = time.monotonic()
    record = _Record()
    with logs.bind(job_id=str(job_id)):
        outcome = _run_job(job_id, settings, factory, on_abandon, record)
        record.tracker.finish(outcome, record.out, record.checkpoint)
    if outcome != "not claimed":
        counters.JOB_RUNS.labels(outcome.partition(":")[0]).inc()
        counters.JOB_DURATION.observe(time.monotonic() - started)
        counters.record_gpu_memory()
    return outcome


@dataclass
class _Record:
    """What a run leaves for its experiment tracking (workers/tracking.py) to log once it ends."""

    tracker: Tracker = field(default_factory=Tracker)
    out: Path = Path()
    checkpoint: Path | None = None


def _run_job(
    job_id: str | uuid.UUID,
    settings: Settings,
    factory: sessionmaker[Session],
    on_abandon: Callable[[], None] | None,
    record: _Record,
) -> str:
    import torch

    from workers.engine.pipeline import run_job  # torch loads here, not when Celery imports the tasks

    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with session_scope(factory) as s:
        # The message's job, or the fairest queued one of this worker's queue (service/scheduling.py).
        job = scheduling.claim(s, uuid.UUID(str(job_id)), owner, settings.lease_s, settings.job_queue)
        if job is None:
            return "not claimed"  # another worker holds it, or it has ended, and no other job waits
        jid = job.id
        logs.annotate(job_id=str(jid), attempt=job.attempts)  # the fairest job may not be the message's
        log.info("job %s: torch uses %d threads", jid, torch.get_num_threads())  # workers/threads.py
        if str(jid) != str(job_id):
            log.info("the message for job %s started job %s, whose team's turn it was", job_id, jid)
        if job.attempts > settings.max_attempts:
            message = f"The job's worker vanished {settings.max_attempts} times; giving up."
            # Like every other ending, this one is in the job's event log too.
            if jobs.finish(s, jid, owner, JobStatus.FAILED, error_code="worker_lost", error_message=message):
                jobs.add_event(s, jid, "error", "worker_lost", message, None)
            return "failed: attempts exhausted"
        # On the database's clock, which wrote started_at (another host may have started the job).
        elapsed = (jobs.current_time(s) - job.started_at).total_seconds() if job.started_at else 0.0
    seconds_left = settings.job_time_limit_s - elapsed
    if seconds_left <= 0:  # an earlier attempt ran out of time and never stopped (or its worker died)
        _end_timed_out(factory, jid, owner, settings)
        return "failed: time_limit"
    out = job_dir(settings, job)
    store = remote_store(settings)
    sync = ScratchSync(store, settings.artifact_dir, job_key(job)) if store is not None else None
    record.out, record.tracker = out, Tracker.start(settings, job)
    run = JobRun(
        jid,
        owner,
        settings,
        factory,
        sync,
        directory=out,
        seconds_left=seconds_left,
        on_abandon=on_abandon,
        tracker=record.tracker,
    )
    with run:
        try:
            if job.attempts > 1:
                run.event("warning", "resumed", f"attempt {job.attempts}: resuming from finished work", {})
                if sync is not None:  # the last attempt may have run on another machine
                    sync.restore()
            config = prepare_config(job, settings, out, factory)
            run.plan(config, job.estimate)
            # Confined again here, not only at creation: a symlink inside a root, or the base model
            # an adapter names, is only seen when the files are read. A parent checkpoint is ours.
            roots = [*settings.model_roots, *([Path(config.model)] if job.parent_job_id else [])]
            result = run_job(
                config,
                run.hooks(),
                allowed_roots=roots,
                vllm_url=settings.vllm_url,
                train_processes=settings.train_processes,
                train_sharding=settings.train_sharding,
            )
            record.checkpoint = result.final_checkpoint
            if sync is not None:
                sync.sync()  # before `succeeded`: a succeeded job's artifacts are all readable
        except Stopped:
            if run.lost.is_set():
                return "lease lost"  # another worker owns the job now; it writes the ending
            if sync is not None:
                sync.sync_quietly()
            if run.timed_out.is_set():
                _end_timed_out(factory, jid, owner, settings)
                return "failed: time_limit"
            end_run(
                factory,
                settings.lease_s,
                jid,
                owner,
                JobStatus.CANCELLED,
                "cancelled",
                "stopped on request",
                artifact_bytes=artifact_bytes(out),
            )
            return "cancelled"
        except Exception as exc:
            if transient_db_error(exc):
                # Postgres stayed away longer than a lease: not the job's fault, so it does not fail.
                # The lease lapses, the reaper requeues the job, and the next attempt resumes it.
                log.exception("job %s: database unavailable; left for the reaper", jid)
                return "database unavailable"
            code, message = error_of(exc)
            message = server_paths(message, settings.model_roots)  # the team reads it
            log.exception("job %s failed", jid)
            if sync is not None and not run.lost.is_set():
                sync.sync_quietly()  # what the job did before it failed stays readable
            _fail(factory, settings, jid, owner, code, message, artifact_bytes=artifact_bytes(out))
            return f"failed: {code}"

    stored = artifact_bytes(out)

    def succeed(s: Session) -> bool:
        # Tokens that carried loss, summed over the recorded steps as while running (a step trained
        # again after a takeover counts once); result.trained_tokens counts the training set only once.
        trained = jobs.trained_tokens(s, jid)
        done = {"progress": 1.0, "overall_progress": 1.0, "trained_tokens": trained, "artifact_bytes": stored}
        if not jobs.finish(s, jid, owner, JobStatus.SUCCEEDED, **done):
            return False
        jobs.add_event(s, jid, "info", "succeeded", "job succeeded", {"selection": result.selection})
        return True

    if not transaction(factory, settings.lease_s, succeed, what=f"job {jid}"):
        return "lease lost"  # taken over meanwhile; the new holder ends the job (from our checkpoints)
    return "succeeded"


def _end_timed_out(factory: sessionmaker[Session], jid: uuid.UUID, owner: str, settings: Settings) -> None:
    message = (
        f"The job ran longer than the service's limit of {settings.job_time_limit_s:g} s "
        "(from its first start); what it finished before is kept."
    )
    _fail(factory, settings, jid, owner, "time_limit", message)


def _fail(
    factory: sessionmaker[Session],
    settings: Settings,
    jid: uuid.UUID,
    owner: str,
    code: str,
    message: str,
    **fields: int,
) -> None:
    """End the job failed, if this worker still holds it, with the same error event."""
    end_run(factory, settings.lease_s, jid, owner, JobStatus.FAILED, code, message[:4000], **fields)


@celery.task(name=WEBHOOK_TASK)
def deliver_webhook_task(delivery_id: str) -> str:
    """One attempt of a webhook delivery (service/webhooks.py); a failed one that has attempts left
    is sent again with the backoff as its countdown (and the reaper sends it should that be lost)."""
    did = uuid.UUID(delivery_id)
    retry_in = webhooks.deliver(sessions(), get_settings(), did)
    if retry_in is None:
        return "done"
    send_webhook(did, countdown=retry_in)
    return f"retry in {retry_in:g} s"


@celery.task(name=REAP_TASK)
def reap_task() -> int:
    """Send again the jobs that need a worker, and the webhook deliveries whose message was lost;
    returns how many jobs."""
    settings = get_settings()
    webhooks.resend_overdue(sessions(), timedelta(seconds=settings.lease_s), send_webhook)
    return reap(
        sessions(),
        timedelta(seconds=settings.lease_s),
        lambda jid: celery.send_task(JOB_TASK, args=[str(jid)]),
        queue=settings.job_queue,
        waiting=lambda: waiting_messages(celery, settings.job_queue),
    )
