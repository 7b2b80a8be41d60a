"""The hooks of one run of a job, and the lease that fences them.

`JobRun` is what the engine reports to while a worker runs a job (`workers.tasks.run_job_by_id`):
progress, events, metrics and checkpoints go to Postgres in short transactions of their own, each
written only while this run holds the job's lease. A heartbeat thread renews the lease every
lease/4; when renewal fails (another worker took the job over after this one was presumed dead),
the engine is told to stop. The heartbeat also ties liveness to progress: the engine calls a hook
between sampling batches, training steps and before every write, and a run that calls none for
`GATT_STALL_TIMEOUT_S`, or leaves a cancel unseen for a lease, is ended from the heartbeat thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service import links
from service.db import session_scope
from service.models import JobStage, JobStatus
from service.repositories import jobs, webhooks
from service.settings import Settings
from workers import metrics as counters
from workers.artifact_sync import ScratchSync, artifact_bytes
from workers.engine.config import JobOptions
from workers.engine.hooks import Hooks, Stage, Stopped
from workers.engine.progress import JobProgress, plan
from workers.redact import server_paths
from workers.tracking import Tracker

log = logging.getLogger(__name__)

_STAGES = {s.value for s in JobStage}
T = TypeVar("T")


def transient_db_error(exc: BaseException) -> bool:
    """Postgres unreachable, restarting, or the connection cut: worth trying again shortly."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def transaction(
    factory: sessionmaker[Session], lease_s: float, body: Callable[[Session], T], *, what: str = "job"
) -> T:
    """One short transaction. Through a brief Postgres outage (a restart, a cut connection) it is
    tried again for up to one lease; past that the lease has lapsed anyway, and it raises."""
    deadline = time.monotonic() + lease_s
    delay = 0.2
    while True:
        try:
            with session_scope(factory) as s:
                return body(s)
        except DBAPIError as exc:
            if not transient_db_error(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unavailable, retrying in %.1f s: %s", what, delay, exc.orig)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def end_run(
    factory: sessionmaker[Session],
    lease_s: float,
    job_id: uuid.UUID,
    owner: str,
    status: JobStatus,
    kind: str,
    message: str,
    **fields: Any,
) -> None:
    """A run's terminal transition and its event (`kind`; for `failed`, also the job's error), if
    the run still holds the job; tried again through a brief database outage like every hook write
    (a lost ending would leave the job to the reaper and a needless new attempt). `fields`: more
    columns to set with it."""
    failed = {"error_code": kind, "error_message": message} if status == JobStatus.FAILED else {}

    def end(s: Session) -> None:
        if jobs.finish(s, job_id, owner, status, **failed, **fields):
            jobs.add_event(s, job_id, "error" if failed else "info", kind, message, None)

    transaction(factory, lease_s, end, what=f"job {job_id}")


class JobRun:
    """The hooks of one run, writing to Postgres in short transactions of their own."""

    def __init__(
        self,
        job_id: uuid.UUID,
        owner: str,
        settings: Settings,
        factory: sessionmaker[Session],
        sync: ScratchSync | None = None,
        *,
        directory: Path | None = None,
        seconds_left: float = math.inf,
        on_abandon: Callable[[], None] | None = None,
        tracker: Tracker | None = None,
    ):
        self.job_id, self.owner, self.settings = job_id, owner, settings
        # Called after the heartbeat has ended a job whose engine stopped calling its hooks: the
        # stuck thread cannot be stopped, so a worker process exits (and is restarted) to free its slot.
        self.on_abandon = on_abandon
        self.sessions = factory
        self.sync = sync  # None: the artifact directory is the store (local); else uploads to S3
        self.directory = directory  # the job's files, counted for the team's storage quota
        self.tracker = tracker or Tracker()  # the job's MLflow run, when the operator set one up
        self.lost = threading.Event()
        # The job's wall-clock limit: the engine is stopped at its next should_stop after it.
        self.deadline = time.monotonic() + seconds_left
        self.timed_out = threading.Event()
        self._last_progress = 0.0
        self._last_call = time.monotonic()  # the engine's last hook call: liveness is progress
        self._cancelled = False
        self._stop_heartbeat = threading.Event()
        self._stage: str | None = None  # the stage in progress and when it began, for its duration
        self._stage_started = 0.0
        self.overall: JobProgress | None = None  # set by plan() once the job's config is known

    def _tx(self, body: Callable[[Session], T]) -> T:
        return transaction(self.sessions, self.settings.lease_s, body, what=f"job {self.job_id}")

    # -- lease ---------------------------------------------------------------------------------
    def renew(self, **fields: Any) -> None:
        if not self._tx(
            lambda s: jobs.heartbeat(s, self.job_id, self.owner, self.settings.lease_s, **fields)
        ):
            self.lost.set()
        else:
            counters.HEARTBEAT.set_to_current_time()

    def _beat(self) -> None:
        while not self._stop_heartbeat.wait(self.settings.lease_s / 4):
            if time.monotonic() > self.deadline + self.settings.lease_s:
                # The engine has not stopped within a lease of the limit: it is stuck somewhere that
                # never asks should_stop. The lease lapses, and the next claim ends the job.
                log.error(
                    "job %s: past its time limit and not stopping; the lease is left to lapse", self.job_id
                )
                self.timed_out.set()
                return
            idle = time.monotonic() - self._last_call
            try:
                if idle > self.settings.stall_timeout_s:
                    return self._abandon(
                        JobStatus.FAILED,
                        "stalled",
                        f"The engine made no progress for {idle:.0f} s (the service's limit is "
                        f"{self.settings.stall_timeout_s:g} s); the job was stopped.",
                    )
                self.renew()
                # A cancel the engine does not see (it asks between batches and steps): give up.
                if idle > self.settings.lease_s and self._tx(lambda s: jobs.cancel_requested(s, self.job_id)):
                    return self._abandon(
                        JobStatus.CANCELLED,
                        "cancelled",
                        "cancelled; the engine did not stop by itself within a lease, so its run was ended",
                    )
            except Exception:  # Postgres briefly away: try again next beat; the lease has slack
                log.exception("heartbeat failed for job %s", self.job_id)

    def _abandon(self, status: JobStatus, code: str, message: str) -> None:
        """End the job from the heartbeat thread, the engine being stuck where it calls no hook."""
        log.error("job %s: %s", self.job_id, message)
        self.lost.set()  # whatever the stuck thread does next, it writes nothing
        end_run(self.sessions, self.settings.lease_s, self.job_id, self.owner, status, code, message)
        if self.on_abandon is not None:
            self.on_abandon()

    def __enter__(self) -> JobRun:
        threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_heartbeat.set()

    # -- engine hooks --------------------------------------------------------------------------
    # Every write is fenced by the lease: a run that was taken over (its worker frozen, or cut off
    # from Postgres past a lease) writes no row and no file once it knows, and stops.
    def _stop_if_lost(self) -> None:
        if self.lost.is_set():
            raise Stopped("lease lost: another worker runs the job now")

    def fence(self) -> None:
        self._last_call = time.monotonic()
        if not self.lost.is_set() and not self._tx(lambda s: jobs.holds(s, self.job_id, self.owner)):
            self.lost.set()
        self._stop_if_lost()

    def plan(self, options: JobOptions, estimate: dict[str, Any] | None) -> None:
        """Weigh the job's stages for its overall progress (workers/engine/progress.py)."""
        self.overall = JobProgress(options, plan(options, estimate))

    def _overall(self) -> dict[str, Any]:
        if self.overall is None:
            return {}
        return {"overall_progress": self.overall.fraction, "overall_eta_s": self.overall.eta_s}

    def progress(self, stage: str, done: int, total: int) -> None:
        now = self._last_call = time.monotonic()
        if self.overall is not None:
            self.overall.report(stage, done, total)
        if done != total and now - self._last_progress < 1.0:  # at most one write a second
            return
        self._last_progress = now
        self.renew(
            progress=done / total if total else 0.0,
            progress_done=done,
            progress_total=total,
            **self._overall(),
        )
        self._stop_if_lost()

    def event(self, level: str, kind: str, message: str, data: dict[str, Any]) -> None:
        self._last_call = time.monotonic()
        message = server_paths(message, self.settings.model_roots)  # the team reads it
        if not self._tx(
            lambda s: jobs.add_event(s, self.job_id, level, kind, message, data or None, owner=self.owner)
        ):
            self.lost.set()
        self._stop_if_lost()

    def stage(self, stage: Stage) -> None:
        self._last_call = now = time.monotonic()
        if self._stage is not None:
            counters.STAGE_DURATION.labels(self._stage).observe(now - self._stage_started)
        self._stage, self._stage_started = (stage.value if stage.value in _STAGES else None), now
        if self.overall is not None:
            self.overall.stage(stage.value)
        if stage.value in _STAGES:  # `done` is no stage of the row: it keeps the last one reached
            self.renew(
                stage=JobStage(stage.value),
                progress=0.0,
                progress_done=0,
                progress_total=0,
                eta_s=None,
                **self._overall(),
                **self._stored(),
            )
        else:
            self.fence()
        self._stop_if_lost()
        if self.sync is not None:
            self.sync.sync()  # what the previous stage wrote (samples, training set, ...) becomes readable

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._last_call = time.monotonic()
        counters.TRAINING_STEPS.inc()
        counters.TRAINED_TOKENS.inc(values.get("trained_tokens", 0))
        self.tracker.metrics(step, values)

        def write(s: Session) -> int | None:
            if not jobs.holds(s, self.job_id, self.owner):
                return None
            jobs.upsert_metric(s, self.job_id, step, values)
            return jobs.trained_tokens(s, self.job_id)

        trained = self._tx(write)
        if trained is None:
            self.lost.set()
        self._stop_if_lost()
        self.renew(latest_metrics={"step": step, **values}, trained_tokens=trained, eta_s=values.get("eta_s"))
        self._stop_if_lost()

    def checkpoint(self, step: int, path: str, manifest: dict[str, Any]) -> None:
        self._last_call = time.monotonic()
        relative = Path(path).resolve().relative_to(self.settings.artifact_dir.resolve()).as_posix()
        root = self.settings.artifact_dir.resolve()
        if self.lost.is_set():
            raise Stopped("lease lost; the checkpoint is left unrecorded")
        if self.sync is not None:
            # Before the row: a listed checkpoint can always be downloaded, whichever machine asks.
            self.sync.upload_checkpoint(Path(path), relative)

        stored = self._stored()

        def write(s: Session) -> bool:
            # Fenced by the lease: a worker that was taken over must not list (or unlist) checkpoints.
            if not jobs.heartbeat(s, self.job_id, self.owner, self.settings.lease_s):
                return False
            jobs.upsert_checkpoint(s, self.job_id, step, relative, manifest, manifest.get("metrics"))
            jobs.heartbeat(s, self.job_id, self.owner, self.settings.lease_s, **stored)
            # The trainer keeps only the newest checkpoints on disk: unlist the ones it deleted.
            for row in jobs.checkpoints(s, self.job_id):
                if not (root / row.path).is_dir():
                    jobs.unlist_checkpoint(s, row)
            jobs.add_event(s, self.job_id, "info", "checkpoint", f"checkpoint at step {step}", {"step": step})
            # The outbox: announced in the transaction that lists it (and once per step).
            path = links.checkpoint_path(self.job_id, step)
            url = links.public_url(self.settings, path) or path  # a path when no public URL is set
            webhooks.record_checkpoint(s, self.job_id, step, url)
            return True

        if not self._tx(write):
            self.lost.set()
            raise Stopped("lease lost; the checkpoint is left unrecorded")
        if self.sync is not None:
            self.sync.prune_checkpoints()  # after the rows: a listed checkpoint is never deleted first
            self.sync.sync()  # the metrics files, up to this step

    def _stored(self) -> dict[str, int]:
        return {"artifact_bytes": artifact_bytes(self.directory)} if self.directory is not None else {}

    def should_stop(self) -> bool:
        self._last_call = time.monotonic()
        # Asked between sampling batches and between micro-batches: one indexed read (about a
        # millisecond) against steps of tenths of seconds or more, so a cancel takes effect before
        # the next step starts.
        if self.lost.is_set() or self._cancelled or self.timed_out.is_set():
            return True
        if time.monotonic() >= self.deadline:
            self.timed_out.set()
            return True
        self._cancelled = self._tx(lambda s: jobs.cancel_requested(s, self.job_id))
        return self._cancelled

    def hooks(self) -> Hooks:
        return Hooks(
            progress=self.progress,
            event=self.event,
            metrics=self.metrics,
            checkpoint=self.checkpoint,
            stage=self.stage,
            should_stop=self.should_stop,
            fence=self.fence,
            sampled=counters.SAMPLED_TOKENS.inc,
        )
