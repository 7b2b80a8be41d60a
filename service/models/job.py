"""A fine-tuning job and what its run writes: events, metrics, checkpoints."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, CreatedAt, Timestamps, UUIDPrimaryKey


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
"""A job in one of these still needs its corpus and instruction set: they cannot be deleted."""


class JobStage(enum.StrEnum):
    SYNTHESIZE = "synthesize"
    SAMPLE = "sample"
    TRAIN = "train"
    EVALUATE = "evaluate"


def _str_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    # VARCHAR + CHECK rather than a native ENUM type: adding a value later is a plain migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
    )


class Job(UUIDPrimaryKey, Timestamps, Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index(None, "team_id", "created_at", "id"),
        Index(None, "team_id", "status"),
        # For workers and the lease reaper: running jobs whose lease ran out.
        Index(None, "status", "lease_expires_at"),
        # For workers picking the fairest queued job of their queue (service/scheduling.py).
        Index(None, "queue", "status"),
        # NULLs are distinct in Postgres, so only jobs that were given a key are constrained.
        UniqueConstraint("team_id", "idempotency_key"),
    )

    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    status: Mapped[JobStatus] = mapped_column(
        _str_enum(JobStatus, "job_status"), default=JobStatus.QUEUED, server_default=JobStatus.QUEUED.value
    )
    stage: Mapped[JobStage | None] = mapped_column(_str_enum(JobStage, "job_stage"))
    progress: Mapped[float] = mapped_column(default=0.0, server_default=text("0"))
    progress_done: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    progress_total: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    eta_s: Mapped[float | None]
    # The whole job's progress and ETA (workers/engine/progress.py); the four above are the stage's.
    overall_progress: Mapped[float] = mapped_column(default=0.0, server_default=text("0"))
    overall_eta_s: Mapped[float | None]
    config: Mapped[dict[str, Any]]
    model: Mapped[str] = mapped_column(String(1024))
    # RESTRICT: corpora and instruction sets are only soft-deleted, so these never dangle.
    corpus_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("corpora.id", ondelete="RESTRICT"), index=True)
    # Held-out dialogues for the evaluation; NULL: the tail of the training corpus is held out.
    validation_corpus_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("corpora.id", ondelete="RESTRICT"), index=True
    )
    # NULL means the default instruction set (gatt.instructions.default_instruction_set()).
    instruction_set_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("instruction_sets.id", ondelete="RESTRICT"), index=True
    )
    # A job that continues an earlier job's checkpoint (`model` is then that job's base model).
    # SET NULL: the lineage is also in every checkpoint's manifest, which outlives the row.
    parent_job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    parent_step: Mapped[int | None] = mapped_column(Integer)
    # The Celery queue its messages go to; NULL for jobs created before the column existed.
    queue: Mapped[str | None] = mapped_column(String(255))
    # The client's own label and tags (`metadata` is the column; the name is taken on a model).
    name: Mapped[str | None] = mapped_column(String(200))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    # The bound on what it can generate (workers/engine/cost.py), computed before it was queued.
    estimate: Mapped[dict[str, Any] | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    trained_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    # Bytes of its files in the artifact store, as its worker last counted them (at each stage,
    # checkpoint and ending); what the team's storage quota adds up. NULL: not counted yet.
    artifact_bytes: Mapped[int | None] = mapped_column(BigInteger)
    latest_metrics: Mapped[dict[str, Any] | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False, server_default=false())
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEvent(CreatedAt, Base):
    """A line of a job's log. Append-only, so no updated_at; bigserial id for cheap appends."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    # bigserial on Postgres; INTEGER PRIMARY KEY on SQLite (embedded mode), its only autoincrementing type.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True, sort_order=-1
    )
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int]
    level: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class JobMetric(UUIDPrimaryKey, CreatedAt, Base):
    """The metrics logged at one training step. Append-only."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    # Named as the API names it; on the Table use table.c["values"] (table.c.values is a method).
    values: Mapped[dict[str, Any]]


class Checkpoint(UUIDPrimaryKey, CreatedAt, Base):
    """A saved checkpoint of a job; the files live under Settings.artifact_dir. Append-only."""

    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int]
    path: Mapped[str] = mapped_column(String(1024))  # relative to Settings.artifact_dir
    manifest: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any] | None]
