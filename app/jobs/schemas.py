from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from app.core.pagination import Page
from app.core.safe_json import JSONObject, StoredText
from service.models import Job as JobRow
from service.models import JobStage, JobStatus

CONFIG_DESCRIPTION = """\
The job's hyperparameters, by section; every field is optional and has a default
(`GET /v1/jobs/config-defaults` returns them all):

- `seed` (0): one seed for instruction synthesis, sampling and training.
- `data`: `max_dialogues` (all), `max_turns` (3) user turns sampled per dialogue, `sample_turns`
  (`all`: sample every assistant turn in order, each on the earlier samples; `last`, the paper's
  reading: keep the corpus's earlier replies as context and sample only the last), `train_history`
  (`sampled`: train the dialogue as sampled; `corpus`: each kept reply alone after the corpus's
  own earlier replies, so that only the first turn's instruction explains it; `both`), `replay`
  (0: plain corpus dialogues per GAtt example, with no instruction and loss on the corpus's
  replies, to keep the model's answers where no instruction is given; at most 10).
- `placement`: `attach` (`prefix`|`suffix`) where the instruction goes on each user turn while
  sampling; `keep` (`first_user`|`system`) where it stays in the training dialogue.
- `sampling`: `k` (4) candidates per turn, `temperature` (0.8), `top_p` (0.95), `max_new_tokens`,
  `batch_prompts` (prompts per forward pass), `seed` (mixed with the job seed for sampling),
  `compile` (false: true runs decode steps through torch.compile, as CUDA graphs on a GPU, about
  3x faster there after a compilation of 20-30 s per prompt-batch shape).
- `reward`: `verifier_weight` (1), `reward_model` (a local path under the server's model roots),
  `reward_model_weight` (0), `relevance_weight` (0: weight of the question-reply relevance, the
  cosine of sentence embeddings with the instruction's words ignored), `min_reward` (0.5: a turn
  whose best candidate scores lower is dropped), `max_repeat_similarity` (0.8: a candidate this
  similar to an earlier reply of its dialogue is never chosen; null: no check), `max_echo` (0.75: a
  candidate that repeats this share of the question it answers is never chosen; null: no check),
  `min_relevance` (null: a candidate less relevant than this is never chosen; 0.28 is reached by 95%
  of real answers), `prefer` (`relevant`: among candidates with equal reward keep the most relevant,
  then the longer; `shorter`; `longer`).
- `loss_scope`: `all_turns` (one sequence, loss on every sampled reply) or `last_turn` (the paper:
  one example per reply).
- `training`: `method` (`lora`|`full`), LoRA `lora_r`/`lora_alpha`/`lora_dropout`, `lora_targets`
  (`all-linear`, module names joined by `|`, or a list of module names), `learning_rate`,
  `schedule` (`cosine`|`linear`|`constant`), `warmup_steps`, `max_steps` or `epochs`,
  `micro_batch_size`, `grad_accum`, `max_grad_norm`, `max_seq_len`, `checkpoint_every`,
  `keep_checkpoints`, `merge_on_save`.
- `evaluation`: `enabled` (false), `heldout_dialogues` (8: the corpus's last dialogues, never
  trained on), `turns` (8, at most 64), `conditions` (`once`, `every_turn`; also `none`, and
  `once_fixed`, `every_turn_fixed`, `none_fixed`, where the earlier assistant turns are the corpus's
  own replies, so that adherence measures memory of the instruction, not imitation of the model's
  earlier replies), `max_new_tokens`, `pass_threshold` (0.5), `batch_prompts`, `attention` (true),
  `max_repeat_similarity` (0.8: a reply this similar to an earlier reply of its context scores 0;
  null: no check), `max_echo` (0.75: a reply repeating this share of its question is an echo, not
  useful), `relevance` (true: report the question-reply relevance).
- `values`: `enabled` (false): the model proposes the hobby and public-figure values itself, as in
  the paper (`families`, `per_family`, `mode` merge|replace, `min_values`, `samples`, ...).

Unknown fields are errors (422 `invalid_config`, every problem with its path in `details`).
Every size is bounded, and a larger one is refused with its limit: `sampling.k` and
`values.samples` 64, `max_new_tokens` 4096, `batch_prompts` 256, `reward.batch_size` 1024,
`lora_r` 512, `max_steps`/`warmup_steps`/`checkpoint_every` 1,000,000, `epochs` 100,
`micro_batch_size` 512, `grad_accum` 1024, `max_seq_len` 131,072, `keep_checkpoints` 50,
`data.max_turns` 64 (evaluation sizes likewise). Verifier `pattern`s are RE2 (linear time).
"""


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: StoredText = Field(
        default="default",
        max_length=1024,
        description='"default" (the embedded SmolLM2-135M-Instruct) or a local model directory under one '
        "of the server's configured model roots (safetensors only).",
    )
    corpus_id: UUID = Field(description="The dialogue corpus to train on (`POST /v1/corpora`).")
    instruction_set_id: UUID | None = Field(
        default=None, description="The instruction set to synthesize from; null for the default set."
    )
    config: JSONObject = Field(default_factory=dict, description=CONFIG_DESCRIPTION)


class JobError(BaseModel):
    code: str = Field(
        description="Stable code, e.g. `no_accepted_samples`, `model_<reason>` (such as `model_no_chat_template`), "
        "`chat_template`, `corpus_deleted`, `out_of_memory`, `worker_lost`, `internal_error`."
    )
    message: str = Field(description="What went wrong and what to do about it.")


class Job(BaseModel):
    id: UUID = Field(description="The job's id.")
    status: JobStatus = Field(description="queued → running → succeeded | failed | cancelled.")
    stage: JobStage | None = Field(
        description="While running: synthesize, sample (sampling and reward ranking, turn by turn), train, "
        "evaluate. The last stage reached once finished."
    )
    progress: float = Field(description="Progress of the current stage, 0 to 1.")
    progress_done: int = Field(description="Units done in the current stage (dialogues, steps).")
    progress_total: int = Field(description="Units in the current stage.")
    eta_s: float | None = Field(description="Estimated seconds left in the current stage, when known.")
    model: str = Field(description="The base model.")
    corpus_id: UUID = Field(description="The corpus.")
    instruction_set_id: UUID | None = Field(description="The instruction set; null for the default set.")
    config: dict[str, Any] = Field(description="The job's full configuration, defaults filled in.")
    error: JobError | None = Field(description="Why the job failed; null otherwise.")
    trained_tokens: int = Field(description="Tokens that carried loss so far.")
    latest_metrics: dict[str, Any] | None = Field(description="The metrics of the latest training step.")
    cancel_requested: bool = Field(description="A cancel was asked for; the worker stops within one step.")
    attempts: int = Field(description="How many times a worker started the job (more after a worker crash).")
    created_at: datetime = Field(description="When the job was created.")
    started_at: datetime | None = Field(description="When a worker first started it.")
    finished_at: datetime | None = Field(description="When it reached a final status.")
    updated_at: datetime = Field(description="Last change of any field.")

    @classmethod
    def from_row(cls, row: JobRow) -> Job:
        error = JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None
        return cls(
            id=row.id,
            status=row.status,
            stage=row.stage,
            progress=row.progress,
            progress_done=row.progress_done,
            progress_total=row.progress_total,
            eta_s=row.eta_s,
            model=row.model,
            corpus_id=row.corpus_id,
            instruction_set_id=row.instruction_set_id,
            config=row.config,
            error=error,
            trained_tokens=row.trained_tokens,
            latest_metrics=row.latest_metrics,
            cancel_requested=row.cancel_requested,
            attempts=row.attempts,
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
    data: list[Event] = Field(description="Events after `after_seq`, oldest first.")
    next_after_seq: int = Field(description="Pass as `after_seq` to poll for newer events.")


class Metric(BaseModel):
    step: int = Field(description="Optimiser step, from 1.")
    values: dict[str, float] = Field(
        description="loss, learning_rate, grad_norm, trained_tokens, tokens, tokens_per_s, elapsed_s, eta_s, epoch."
    )
    created_at: datetime = Field(description="When it was recorded.")


class MetricList(BaseModel):
    data: list[Metric] = Field(description="Steps after `after_step`, in order.")
    next_after_step: int = Field(description="Pass as `after_step` to poll for newer steps.")


class CheckpointOut(BaseModel):
    step: int = Field(description="The optimiser step it was written at.")
    manifest: dict[str, Any] = Field(description="Files with sha256 and size, base model, method.")
    metrics: dict[str, Any] | None = Field(description="The metrics at that step.")
    created_at: datetime = Field(description="When it was recorded.")
    download_url: str = Field(description="Where to download it as a .tar.gz archive.")


class CheckpointList(BaseModel):
    data: list[CheckpointOut] = Field(description="The job's checkpoints, oldest first.")


class ArtifactRows(BaseModel):
    data: list[dict[str, Any]] = Field(description="Rows of the artifact, in order.")
    offset: int = Field(description="Index of the first row returned.")
    has_more: bool = Field(description="Whether rows follow; pass offset + len(data) to continue.")
