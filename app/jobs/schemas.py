from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator

from app.core.openapi import REF, rows_of
from app.core.pagination import Page
from app.core.safe_json import JSONObject, StoredText
from service.models import Job as JobRow
from service.models import JobStage, JobStatus

# A request's `config` is checked by the engine's own model (workers/engine/config.py), so that its
# 422 keeps the `invalid_config` code, `server_field` and "did you mean"; OpenAPI shows that model.
CONFIG_SCHEMA = {"allOf": [{"$ref": REF.format(model="JobOptions")}]}


MetadataKey = Annotated[StoredText, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[StoredText, StringConstraints(max_length=512)]


class CheckpointRef(BaseModel):
    """A checkpoint of one of the team's own jobs, as the base of a new one."""

    model_config = ConfigDict(extra="forbid")

    job_id: UUID = Field(description="A job of this team that has succeeded.")
    step: int | None = Field(
        default=None, ge=1, le=10**9, description="Its checkpoint's step; null: its latest checkpoint."
    )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[StoredText, StringConstraints(max_length=1024)] | CheckpointRef = Field(
        default="default",
        title="Model id or checkpoint",
        description='A model id from `GET /v1/models` ("default": the embedded SmolLM2-135M-Instruct), or '
        '`{"job_id": ..., "step": ...}` to continue from a checkpoint of one of the team\'s own jobs: a '
        "LoRA checkpoint goes on training its adapter (same rank, alpha and targets), and a job with "
        "`training.method: full` starts from its merged weights.",
    )
    corpus_id: UUID = Field(description="The dialogue corpus to train on (`POST /v1/corpora`).")
    validation_corpus_id: UUID | None = Field(
        default=None,
        description="Dialogues the evaluation holds out (its first `evaluation.heldout_dialogues`), apart from "
        "the training corpus, which is then trained on whole; null: the training corpus's last "
        "`evaluation.heldout_dialogues` are held out. Needs `evaluation.enabled`.",
    )
    name: StoredText | None = Field(
        default=None, min_length=1, max_length=200, description="Your own label for the job."
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(
        default=None,
        max_length=16,
        description="Your own tags, string to string (at most 16; keys up to 64 characters, values up "
        "to 512), returned with the job.",
    )
    instruction_set_id: UUID | Literal["default"] | None = Field(
        default=None,
        description='The instruction set to synthesize from; null or "default" (the id `GET '
        "/v1/instruction-sets/default` answers with) for the default set.",
    )

    @field_validator("instruction_set_id")
    @classmethod
    def _default_is_none(cls, value: UUID | str | None) -> UUID | str | None:
        return None if value == "default" else value

    config: Annotated[JSONObject, WithJsonSchema(CONFIG_SCHEMA)] = Field(
        default_factory=dict,
        description="The job's hyperparameters by section (`JobOptions`); every field is optional "
        "(`GET /v1/jobs/config-defaults` returns them all).",
    )


class JobError(BaseModel):
    code: str = Field(
        description="Stable code, e.g. `no_accepted_samples`, `model_<reason>` (such as `model_no_chat_template`), "
        "`chat_template`, `corpus_deleted`, `out_of_memory`, `worker_lost`, `time_limit`, `sampler_unavailable`, "
        "`internal_error`."
    )
    message: str = Field(description="What went wrong and what to do about it.")


class JobEstimate(BaseModel):
    """Bounds computed before the job was queued, counting every reply at its longest."""

    sampled_turns: int = Field(
        description="Turns sampled at most, over all rounds (each with `sampling.k` candidates, drawn up to `1 + sampling.retries` times)."
    )
    sampling_tokens: int = Field(description="Tokens sampling can generate.")
    evaluation_tokens: int = Field(description="Tokens the evaluation can generate (both models).")
    values_tokens: int = Field(description="Tokens the model's own value lists can take (`values`).")
    generated_tokens: int = Field(
        description="All of these: at most the server's `GATT_MAX_JOB_GENERATED_TOKENS`, or the job "
        "is refused with 422 `job_too_large`."
    )


class Job(BaseModel):
    id: UUID = Field(description="The job's id.")
    status: JobStatus = Field(description="queued → running → succeeded | failed | cancelled.")
    stage: JobStage | None = Field(
        description="While running: synthesize, sample (sampling and reward ranking, turn by turn), train, "
        "evaluate. The last stage reached once finished."
    )
    overall_progress: float = Field(
        default=0.0,
        description="Progress of the whole job, 0 to 1: its stages weighed by the work each is bounded to "
        "(generated tokens; training's examples at a measured cost per example). It does not go back "
        "within an attempt; 1 once succeeded.",
    )
    overall_eta_s: float | None = Field(
        default=None,
        description="Estimated seconds until the whole job ends, from the rates this attempt has measured "
        "(the current stage's own, the attempt's for later stages); null until some work was timed, "
        "and once the job is not running.",
    )
    progress: float = Field(description="Progress of the current stage, 0 to 1.")
    progress_done: int = Field(description="Units done in the current stage (dialogues, steps).")
    progress_total: int = Field(description="Units in the current stage.")
    eta_s: float | None = Field(description="Estimated seconds left in the current stage, when known.")
    model: str = Field(
        description="The base model's id; for a job continuing a checkpoint, that job's base model."
    )
    parent_checkpoint: CheckpointRef | None = Field(
        default=None, description="The checkpoint this job continues from; null when it starts from `model`."
    )
    corpus_id: UUID = Field(description="The corpus.")
    validation_corpus_id: UUID | None = Field(
        default=None, description="The evaluation's held-out corpus; null: the training corpus's tail."
    )
    instruction_set_id: UUID | None = Field(description="The instruction set; null for the default set.")
    config: Annotated[dict[str, Any], WithJsonSchema(CONFIG_SCHEMA)] = Field(
        description="The job's options, defaults filled in."
    )
    error: JobError | None = Field(description="Why the job failed; null otherwise.")
    trained_tokens: int = Field(description="Tokens that carried loss so far.")
    artifact_bytes: int | None = Field(
        default=None,
        description="Bytes the job keeps in the artifact store (checkpoints, samples, evaluation), as its "
        "worker last counted them; they count against the team's quota until the job is deleted. Null "
        "until counted.",
    )
    latest_metrics: dict[str, Any] | None = Field(description="The metrics of the latest training step.")
    cancel_requested: bool = Field(description="A cancel was asked for; the worker stops within one step.")
    name: str | None = Field(default=None, description="Your label for the job.")
    metadata: dict[str, str] | None = Field(default=None, description="Your tags for the job.")
    attempts: int = Field(description="How many times a worker started the job (more after a worker crash).")
    estimate: JobEstimate | None = Field(
        default=None, description="What the job can cost, bounded before it was queued; null for older jobs."
    )
    queue_position: int | None = Field(
        default=None,
        description="While queued: how many queued jobs are expected to start before it, under fair "
        "shares across teams (round robin; the team with the fewest running jobs first). 0: it starts "
        "when a worker is free. Null once it has started.",
    )
    created_at: datetime = Field(description="When the job was created.")
    started_at: datetime | None = Field(description="When a worker first started it.")
    finished_at: datetime | None = Field(description="When it reached a final status.")
    updated_at: datetime = Field(description="Last change of any field.")

    @classmethod
    def from_row(cls, row: JobRow, queue_position: int | None = None) -> Job:
        error = JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None
        return cls(
            id=row.id,
            status=row.status,
            stage=row.stage,
            overall_progress=row.overall_progress,
            overall_eta_s=row.overall_eta_s if row.status == JobStatus.RUNNING else None,
            progress=row.progress,
            progress_done=row.progress_done,
            progress_total=row.progress_total,
            eta_s=row.eta_s if row.status == JobStatus.RUNNING else None,
            model=row.model,
            parent_checkpoint=(
                CheckpointRef(job_id=row.parent_job_id, step=row.parent_step) if row.parent_job_id else None
            ),
            corpus_id=row.corpus_id,
            validation_corpus_id=row.validation_corpus_id,
            instruction_set_id=row.instruction_set_id,
            config=row.config,
            error=error,
            trained_tokens=row.trained_tokens,
            artifact_bytes=row.artifact_bytes,
            latest_metrics=row.latest_metrics,
            cancel_requested=row.cancel_requested,
            attempts=row.attempts,
            name=row.name,
            metadata=row.meta,
            queue_position=queue_position,
            estimate=row.estimate,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            updated_at=row.updated_at,
        )


class JobList(Page[Job]):
    """One page of the team's jobs, newest first."""


class Event(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    seq: int = Field(description="Position in the job's log, from 1, without gaps.")
    level: str = Field(description="info, warning or error.")
    kind: str = Field(description="stage, warning kinds such as context_length, checkpoint, error, ...")
    message: str = Field(description="Human-readable text.")
    data: dict[str, Any] | None = Field(description="Structured details, if any.")
    created_at: datetime = Field(description="When it happened.")


class EventList(BaseModel):
    data: list[Event] = Field(description="Events after the cursor, oldest first.")
    has_more: bool = Field(description="Whether more events were already written after this page.")
    next_after: str = Field(description="Pass as `after` for the next page, or later to poll for new events.")
    next_after_seq: int = Field(description="`next_after` as a number (for `after_seq`, the older name).")


class Metric(BaseModel):
    step: int = Field(description="Optimiser step, from 1 (numbered across rounds when `rounds.count` > 1).")
    values: dict[str, float] = Field(
        description="loss, learning_rate, grad_norm, trained_tokens, tokens, tokens_per_s, elapsed_s, eta_s, epoch; "
        "with training.objective dpo or sft+dpo also preference_accuracy (the share of the step's pairs whose "
        "chosen reply the model prefers more than the reference does) and preference_margin (beta times "
        "that log-ratio margin, averaged)."
    )
    created_at: datetime = Field(description="When it was recorded.")


class MetricList(BaseModel):
    data: list[Metric] = Field(description="Steps after the cursor, in order.")
    has_more: bool = Field(description="Whether more steps were already recorded after this page.")
    next_after: str = Field(description="Pass as `after` for the next page, or later to poll for new steps.")
    next_after_step: int = Field(description="`next_after` as a number (for `after_step`, the older name).")


class CheckpointOut(BaseModel):
    step: int = Field(description="The optimiser step it was written at.")
    manifest: dict[str, Any] = Field(description="Files with sha256 and size, base model, method.")
    metrics: dict[str, Any] | None = Field(description="The metrics at that step.")
    created_at: datetime = Field(description="When it was recorded.")
    download_url: str = Field(
        description="Where to download it as a .tar.gz archive: an absolute URL (on `GATT_PUBLIC_URL` when "
        "the server sets it)."
    )


class CheckpointList(BaseModel):
    data: list[CheckpointOut] = Field(
        description="The job's checkpoints, oldest first: all of them (a job keeps `training.keep_checkpoints`)."
    )
    has_more: bool = Field(default=False, description="Always false: one page holds them all.")
    next_after: str | None = Field(default=None, description="Always null: one page holds them all.")


class RoundSteps(BaseModel):
    first: int = Field(description="The round's first optimiser step (steps are numbered across rounds).")
    last: int = Field(description="Its last: the step of the checkpoint the round ended with.")


class RoundBatch(BaseModel):
    batch: int = Field(description="Dialogues `batch * sampling.batch_prompts` onwards, sampled together.")
    turns: int = Field(description="Turns sampled in the batch.")
    max_reward: float | None = Field(description="The highest kept-candidate reward of its turns.")
    median_reward: float | None = Field(description="The median over its turns of each turn's best reward.")
    pass_rate: float | None = Field(description="Share of its candidates that passed `reward.min_reward`.")


class Round(BaseModel):
    round: int = Field(description="From 1.")
    selection: dict[str, float | int] = Field(
        description="Over the round's sampled turns: turns, accepted, mean_reward (all candidates), "
        "mean_best_reward, pass_rate, mean_gain (best minus mean)."
    )
    batches: list[RoundBatch] = Field(description="The reward by batch of sampled dialogues, in order.")
    examples: int = Field(description="Training examples (or preference pairs) the round trained on.")
    trained_tokens: int = Field(description="Tokens that carried loss in them.")
    steps: RoundSteps = Field(description="The optimiser steps the round took, in the job's numbering.")
    final_loss: float | None = Field(description="The loss at the round's last step.")


class RoundList(BaseModel):
    count: int = Field(description="`rounds.count`: the rounds the job runs.")
    data: list[Round] = Field(description="The rounds finished so far, in order.")


class ArtifactRows(BaseModel):
    data: list[dict[str, Any]] = Field(description="Rows of the artifact, in order.")
    offset: int = Field(description="Index of the first row returned.")
    has_more: bool = Field(description="Whether rows follow.")
    next_after: str | None = Field(
        description="Pass as `after` for the next page; null when `has_more` is false."
    )


# Rows are served as the job wrote them (workers/engine/records.py has their schema).
class SampleRows(ArtifactRows):
    data: Annotated[list[dict[str, Any]], WithJsonSchema(rows_of("SampleRow"))] = Field(
        description="Sampled dialogues (`samples.jsonl`), in corpus order."
    )


class TrainingRows(ArtifactRows):
    data: Annotated[list[dict[str, Any]], WithJsonSchema(rows_of("TrainingRow"))] = Field(
        description="Training dialogues (`training_set.jsonl`), in order."
    )
