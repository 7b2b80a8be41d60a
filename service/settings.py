"""The service's one settings object, read from the environment (prefix `GATT_`) and `.env`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gatt.dialogues import CorpusLimits
from service.model_catalog import check_roots, parse_roots
from service.secrets import check_key as check_secret_key

_CORPUS_DEFAULTS = CorpusLimits()
MiB = 1024 * 1024


class Settings(BaseSettings):
    """Infrastructure settings. Job hyperparameters are not here: they travel with each job."""

    model_config = SettingsConfigDict(env_prefix="GATT_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/gatt",
        description="SQLAlchemy URL of the Postgres database (psycopg 3 driver).",
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis URL (Celery broker).")
    artifact_dir: Path = Field(
        default=Path("var/artifacts"),
        description="Where checkpoints and other job artifacts are written. Without an S3 bucket it is the "
        "artifact store, shared by the API and the workers; with one, it is each worker's local scratch.",
    )
    s3_bucket: str | None = Field(
        default=None,
        description="Keep artifacts in this S3 (or S3-compatible) bucket instead of the shared artifact "
        "directory: workers upload what they write, the API reads from the bucket. Credentials come from "
        "the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles).",
    )
    s3_prefix: str = Field(
        default="",
        description="Key prefix inside the bucket (e.g. `gatt/artifacts`); empty: the bucket's root.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible server (MinIO: `http://minio:9000`); unset: AWS S3.",
    )
    s3_region: str | None = Field(
        default=None, description="The bucket's region; unset: from the AWS config chain (AWS_REGION)."
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] | None = Field(
        default=None,
        description="How buckets are addressed: `path` (host/bucket/key) or `virtual` (bucket.host/key). "
        "Unset: `path` with an endpoint URL (what MinIO and most S3-compatible servers need), else `auto`.",
    )
    max_corpus_bytes: int = Field(
        default=20 * MiB, gt=0, description="Largest accepted corpus file, in bytes."
    )
    max_json_body_bytes: int = Field(default=1 * MiB, gt=0, description="Largest accepted JSON request body.")
    corpus_max_line_bytes: int = Field(default=_CORPUS_DEFAULTS.max_line_bytes, gt=0)
    corpus_max_turns: int = Field(default=_CORPUS_DEFAULTS.max_turns, gt=0)
    corpus_max_content_chars: int = Field(default=_CORPUS_DEFAULTS.max_content_chars, gt=0)
    corpus_max_dialogues: int = Field(default=_CORPUS_DEFAULTS.max_dialogues, gt=0)
    corpus_max_problems: int = Field(default=_CORPUS_DEFAULTS.max_problems, gt=0)
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description=(
            "Directories whose model folders jobs may fine-tune (`GET /v1/models` lists them by name). "
            "Empty: only the embedded `default` model. From the environment as paths joined by `:` "
            "(GATT_MODEL_ROOTS=/models:/data/models) or a JSON list; each must be an existing directory, "
            "or the process does not start."
        ),
    )
    vllm_url: str | None = Field(
        default=None,
        description="This worker's vLLM server (`http://127.0.0.1:8000`, an OpenAI-compatible `vllm serve` "
        "serving the job's model under its model id, started with `--generation-config vllm`); jobs "
        "with `sampling.backend` auto (on a GPU) or vllm sample through it. Unset: the engine's loop.",
    )
    train_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Training processes per job on this worker, one per GPU: above 1, a job's training "
        "stage runs in `torchrun --standalone --nproc_per_node=N` children (NCCL on GPUs, gloo on CPUs), "
        "each taking a share of every step's micro-batches, while the worker keeps the job's lease.",
    )
    train_sharding: Literal["auto", "replicate", "fsdp"] = Field(
        default="auto",
        description="With train_processes above 1: `replicate` gives each rank a whole copy of the model, "
        "`fsdp` shards weights, gradients and optimiser state over the ranks (FSDP2, one unit per decoder "
        "layer), `auto` shards on GPUs when the training state would take more than half of one GPU.",
    )
    lease_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job's lease: a worker renews it every lease_s/4; if it is not renewed in "
        "time, the worker is taken for gone and the job may be taken over.",
    )
    max_attempts: int = Field(
        default=3, gt=0, description="Worker starts per job before a job whose workers keep vanishing fails."
    )
    job_time_limit_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        le=30 * 24 * 3600.0,
        description="Wall-clock seconds a job may run, from its first start, over all its attempts; past "
        "it the job ends failed with `time_limit` (workers/tasks.py).",
    )
    stall_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        le=24 * 3600.0,
        description="Seconds a job's engine may go without calling any of its hooks (it calls them "
        "between sampling batches, training steps and writes); past it the job ends failed with "
        "`stalled` and a Celery worker process exits to free its slot (workers/tasks.py).",
    )
    reaper_interval_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="How often the API process sends again the jobs whose worker vanished or whose message "
        "was lost (service/reaper.py); 0: only Celery beat's `jobs.reap` does.",
    )
    job_queue: str = Field(default="gpu", description="Celery queue that job runs are sent to.")
    readiness_timeout_s: float = Field(default=2.0, gt=0, description="Per-check timeout of /readyz.")
    db_connect_timeout_s: int = Field(
        default=5, gt=0, description="Postgres connect timeout (whole seconds)."
    )
    db_pool_size: int = Field(
        default=10, gt=0, description="Database connections each API process keeps open."
    )
    db_max_overflow: int = Field(
        default=20, ge=0, description="Connections an API process may open beyond db_pool_size under load."
    )
    db_pool_timeout_s: float = Field(
        default=30.0, gt=0, description="How long a request waits for a free database connection."
    )
    db_idle_in_transaction_timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Postgres ends a session left idle inside a transaction this long (a frozen or stuck "
        "process), releasing its locks.",
    )
    max_requests_in_flight: int = Field(
        default=20,
        gt=0,
        description="Requests an API process works on at once (until their response starts); more wait "
        "their turn. Must be below db_pool_size + db_max_overflow (see app/core/admission.py).",
    )
    body_grace_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Seconds a request body may take before body_min_bytes_per_s applies; a slower body "
        "is answered 408 (app/core/body_first.py).",
    )
    body_min_bytes_per_s: float = Field(
        default=32 * 1024,
        gt=0,
        description="Average rate a request body must keep up after body_grace_s.",
    )
    max_job_generated_tokens: int = Field(
        default=100_000_000,
        gt=0,
        description="Largest bound on the tokens one job may generate (sampling, evaluation, value "
        "lists; every reply counted at its longest, workers/engine/cost.py); a larger job is refused "
        "with 422 `job_too_large` before it is queued.",
    )
    team_max_active_jobs: int = Field(
        default=20,
        gt=0,
        description="Queued and running jobs one team may have at once; one more is answered 429 "
        "`quota_exceeded` (app/core/quotas.py).",
    )
    team_max_corpora: int = Field(default=100, gt=0, description="Corpora one team may store.")
    team_max_corpus_bytes: int = Field(
        default=500 * MiB, gt=0, description="Bytes of stored (normalized) corpora one team may hold."
    )
    team_max_artifact_bytes: int = Field(
        default=50 * 1024 * MiB,
        gt=0,
        description="Bytes of job artifacts (checkpoints, samples, evaluations) one team may keep; past it "
        "new jobs are refused until finished jobs are deleted (`DELETE /v1/jobs/{id}`).",
    )
    team_max_instruction_sets: int = Field(
        default=100, gt=0, description="Instruction sets one team may store."
    )
    team_max_api_keys: int = Field(
        default=50, gt=0, description="Unrevoked API keys one team may have (app/core/quotas.py)."
    )
    team_max_webhooks: int = Field(
        default=10, gt=0, description="Webhook endpoints one team may have (app/core/quotas.py)."
    )
    webhook_allow_hosts: list[str] = Field(
        default_factory=list,
        description="Webhook targets allowed although they are not public addresses: host names (exact) "
        "or CIDRs (`10.0.0.0/8`, `127.0.0.1/32`). Empty: only hosts whose every address is public. "
        'From the environment as JSON: GATT_WEBHOOK_ALLOW_HOSTS=\'["hooks.internal", "10.1.0.0/16"]\'.',
    )
    webhook_queue: str = Field(
        default="webhooks",
        description="Celery queue of `webhooks.deliver`: its own, so that deliveries do not wait behind "
        "a job on a busy GPU worker.",
    )
    chat_queue: str = Field(
        default="chat",
        description="Celery queue of `chat.reply` (the playground, `POST /v1/jobs/{id}/chat`): its own, "
        "so that a reply does not wait behind a job; run a worker with `-Q chat`.",
    )
    chat_timeout_s: float = Field(
        default=60.0, gt=0, le=600, description="How long the API waits for a chat reply before 504."
    )
    chat_max_models: int = Field(
        default=2, gt=0, le=16, description="Models a chat worker keeps loaded (least recently used goes)."
    )
    chat_per_minute: float = Field(
        default=20.0,
        ge=0,
        le=6000,
        description="Chat replies one team may ask for per minute (a burst of 5); 0: no limit.",
    )
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, le=60, description="Connect, write and read timeout of one delivery attempt."
    )
    webhook_max_attempts: int = Field(
        default=8, gt=0, le=20, description="Attempts per delivery before it is marked failed."
    )
    webhook_disable_after: int = Field(
        default=5,
        gt=0,
        le=1000,
        description="An endpoint whose deliveries fail this many times in a row (each after all its "
        "attempts) is disabled until its team enables it (`POST /v1/webhooks/{id}/enable`).",
    )
    webhook_backoff_s: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="Wait before the first retry of a delivery; it doubles after each failed attempt, up "
        "to 6 hours.",
    )
    public_url: str = Field(
        default="",
        description="The API's public base URL (`https://gatt.example.com`), put in front of the links in "
        "webhook payloads (a checkpoint's `download_url`); empty: the links are paths.",
    )
    rate_limit_per_s: float = Field(
        default=20.0,
        ge=0,
        description="Requests a second each API key may make on average (a token bucket in Redis, shared "
        "by every API process); 0 turns rate limiting off.",
    )
    rate_limit_burst: int = Field(
        default=100,
        gt=0,
        description="Requests an API key may make at once before the per-second rate applies.",
    )

    @field_validator("secret_keys", mode="before")
    @classmethod
    def _keys_as_written(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return list(value or [])

    @field_validator("secret_keys")
    @classmethod
    def _keys_are_fernet_keys(cls, value: list[str]) -> list[str]:
        return [check_secret_key(key) for key in value]

    @field_validator("model_roots", mode="before")
    @classmethod
    def _roots_as_written(cls, value: Any) -> list[Path]:
        return parse_roots(value)

    @field_validator("model_roots")
    @classmethod
    def _roots_exist(cls, value: list[Path]) -> list[Path]:
        return check_roots(value)

    log_format: Literal["json", "text"] = Field(
        default="json",
        description="`json`: one JSON object per line (timestamp, level, logger, message, request_id, "
        "team_id, job_id, attempt); `text`: plain lines for a terminal.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Root log level."
    )
    metrics_token: str | None = Field(
        default=None,
        description="When set, `GET /metrics` asks for `Authorization: Bearer <token>` (Prometheus: "
        "`authorization` in the scrape config); unset, it is open, so serve it on a private network.",
    )
    worker_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="A worker serves its Prometheus metrics on this port (`/metrics`); 0: not served.",
    )

    secret_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Fernet keys, comma-separated, that seal webhook signing secrets at rest (the first "
        "seals, all open: put a new key first to rotate). Unset: secrets are stored as they are.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="Log each job as an MLflow run (params, step metrics, evaluation, final checkpoint) to "
        "this tracking server or store (`http://mlflow:5000`, `sqlite:////var/lib/gatt/mlflow.db`); "
        "unset: no tracking (workers/tracking.py).",
    )
    mlflow_artifact_location: str | None = Field(
        default=None,
        description="Where new experiments keep run artifacts (a directory or URI). Unset: the tracking "
        "server's own artifact root; with a local `sqlite:` store, set it, or MLflow uses ./mlruns.",
    )
    mlflow_experiment: str = Field(
        default="gatt",
        max_length=200,
        description="Experiment name prefix: a team's runs go to `<prefix>/<team id>`.",
    )

    def corpus_limits(self) -> CorpusLimits:
        return CorpusLimits(
            max_line_bytes=self.corpus_max_line_bytes,
            max_turns=self.corpus_max_turns,
            max_content_chars=self.corpus_max_content_chars,
            max_dialogues=self.corpus_max_dialogues,
            max_problems=self.corpus_max_problems,
        )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings. Tests build their own `Settings(...)` and pass it to `create_app`.

    A bad setting stops the process with one line naming it, not a traceback."""
    try:
        return Settings()
    except ValidationError as exc:
        raise SystemExit(f"gatt: invalid settings: {one_line(exc)}") from None


def one_line(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = "GATT_" + "_".join(str(part) for part in error["loc"][:1]).upper()
        problems.append(f"{name}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)
