"""Every API operation as a `Call`: its method, path, parameters and how its answer is read.

The sync and async clients send the same calls, so an operation is written once here; each
builder is named after the operation's `operationId` in openapi.json and registered in
`OPERATIONS`, which tests/client/test_contract.py compares with the API's own list.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from uuid import UUID

import httpx
from pydantic import BaseModel

from gatt_client import models as m

T = TypeVar("T")
Id = UUID | str
OPERATIONS: set[str] = set()


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def operation(builder: Callable[..., Any]) -> Callable[..., Any]:
    OPERATIONS.add(builder.__name__)
    return builder


def _model(cls: type[T]) -> Callable[[httpx.Response], T]:
    return lambda response: cls.model_validate(response.json())  # type: ignore[attr-defined, no-any-return]


def _none(response: httpx.Response) -> None:
    return None


def _bytes(response: httpx.Response) -> bytes:
    return response.content


def _params(**values: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, UUID) else v) for k, v in values.items() if v is not None}


def _dump(value: BaseModel | Mapping[str, Any] | None) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True, by_alias=True)
    return value


# --- health ---------------------------------------------------------------------------------


@operation
def healthz() -> Call[m.Health]:
    return Call("GET", "/healthz", _model(m.Health))


@operation
def readyz() -> Call[m.Readiness]:
    return Call("GET", "/readyz", _model(m.Readiness))


# --- corpora --------------------------------------------------------------------------------


def corpus_bytes(source: str | Path | bytes | Iterable[Mapping[str, Any]]) -> tuple[bytes, str]:
    """A corpus upload's content and default name: a JSONL file's path, its bytes, or dialogues
    (each a mapping with `messages`) written as JSONL."""
    if isinstance(source, bytes):
        return source, "corpus.jsonl"
    if isinstance(source, str | Path):
        path = Path(source)
        return path.read_bytes(), path.name
    lines = [json.dumps(dict(dialogue), ensure_ascii=False) for dialogue in source]
    return ("\n".join(lines) + "\n").encode(), "corpus.jsonl"


@operation
def create_corpus(content: bytes, name: str) -> Call[m.Corpus]:
    return Call("POST", "/v1/corpora", _model(m.Corpus), files={"file": (name, content, "application/jsonl")})


@operation
def list_corpora(after: str | None = None, limit: int | None = None) -> Call[m.CorpusList]:
    return Call("GET", "/v1/corpora", _model(m.CorpusList), _params(after=after, limit=limit))


@operation
def get_corpus(corpus_id: Id) -> Call[m.Corpus]:
    return Call("GET", f"/v1/corpora/{corpus_id}", _model(m.Corpus))


@operation
def get_corpus_content(corpus_id: Id) -> Call[bytes]:
    return Call("GET", f"/v1/corpora/{corpus_id}/content", _bytes)


@operation
def delete_corpus(corpus_id: Id) -> Call[None]:
    return Call("DELETE", f"/v1/corpora/{corpus_id}", _none)


# --- instruction sets -----------------------------------------------------------------------


@operation
def create_instruction_set(
    name: str, spec: m.InstructionSetSpec | Mapping[str, Any]
) -> Call[m.InstructionSet]:
    body = m.InstructionSetCreate.model_validate({"name": name, "spec": _dump(spec)})
    return Call("POST", "/v1/instruction-sets", _model(m.InstructionSet), json=_dump(body))


@operation
def list_instruction_sets(after: str | None = None, limit: int | None = None) -> Call[m.InstructionSetList]:
    params = _params(after=after, limit=limit)
    return Call("GET", "/v1/instruction-sets", _model(m.InstructionSetList), params)


@operation
def get_default_instruction_set() -> Call[m.DefaultInstructionSet]:
    return Call("GET", "/v1/instruction-sets/default", _model(m.DefaultInstructionSet))


@operation
def get_instruction_set(instruction_set_id: Id) -> Call[m.InstructionSet]:
    return Call("GET", f"/v1/instruction-sets/{instruction_set_id}", _model(m.InstructionSet))


@operation
def delete_instruction_set(instruction_set_id: Id) -> Call[None]:
    return Call("DELETE", f"/v1/instruction-sets/{instruction_set_id}", _none)


# --- jobs -----------------------------------------------------------------------------------


@operation
def create_job(body: m.JobCreate, idempotency_key: str | None = None) -> Call[m.Job]:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return Call("POST", "/v1/jobs", _model(m.Job), json=_dump(body), headers=headers)


@operation
def list_jobs(
    after: str | None = None, limit: int | None = None, status: str | None = None
) -> Call[m.JobList]:
    return Call("GET", "/v1/jobs", _model(m.JobList), _params(after=after, limit=limit, status=status))


@operation
def get_config_defaults() -> Call[m.JobOptions]:
    return Call("GET", "/v1/jobs/config-defaults", _model(m.JobOptions))


def _job_and_etag(response: httpx.Response) -> tuple[m.Job | None, str | None]:
    etag = response.headers.get("ETag")
    if response.status_code == 304:
        return None, etag
    return m.Job.model_validate(response.json()), etag


@operation
def get_job(job_id: Id, if_none_match: str | None = None) -> Call[tuple[m.Job | None, str | None]]:
    """The job and its ETag; (None, etag) when `if_none_match` still holds (304)."""
    headers = {"If-None-Match": if_none_match} if if_none_match else {}
    return Call("GET", f"/v1/jobs/{job_id}", _job_and_etag, headers=headers)


@operation
def cancel_job(job_id: Id) -> Call[m.Job]:
    return Call("POST", f"/v1/jobs/{job_id}/cancel", _model(m.Job))


@operation
def chat_with_job(job_id: Id, body: Mapping[str, Any]) -> Call[m.ChatReply]:
    return Call("POST", f"/v1/jobs/{job_id}/chat", _model(m.ChatReply), json=dict(body))


@operation
def delete_job(job_id: Id) -> Call[None]:
    return Call("DELETE", f"/v1/jobs/{job_id}", _none)


@operation
def list_events(job_id: Id, after: str | None = None, limit: int | None = None) -> Call[m.EventList]:
    params = _params(after=after, limit=limit)
    return Call("GET", f"/v1/jobs/{job_id}/events", _model(m.EventList), params)


@operation
def stream_events(job_id: Id, last_event_id: str | None = None) -> Call[None]:
    """Sent with a streaming client (`Client.jobs.follow`); `parse` is never called."""
    headers = {"Last-Event-ID": last_event_id, "Accept": "text/event-stream"} if last_event_id else {}
    return Call("GET", f"/v1/jobs/{job_id}/stream", _none, headers=headers)


@operation
def list_metrics(job_id: Id, after: str | None = None, limit: int | None = None) -> Call[m.MetricList]:
    params = _params(after=after, limit=limit)
    return Call("GET", f"/v1/jobs/{job_id}/metrics", _model(m.MetricList), params)


@operation
def list_samples(
    job_id: Id, after: str | None = None, limit: int | None = None, round_: int | None = None
) -> Call[m.SampleRows]:
    params = _params(after=after, limit=limit, round=round_)
    return Call("GET", f"/v1/jobs/{job_id}/samples", _model(m.SampleRows), params)


@operation
def list_training_set(
    job_id: Id, after: str | None = None, limit: int | None = None, round_: int | None = None
) -> Call[m.TrainingRows]:
    params = _params(after=after, limit=limit, round=round_)
    return Call("GET", f"/v1/jobs/{job_id}/training-set", _model(m.TrainingRows), params)


@operation
def get_evaluation(job_id: Id) -> Call[m.JobEvaluation]:
    return Call("GET", f"/v1/jobs/{job_id}/evaluation", _model(m.JobEvaluation))


@operation
def list_rounds(job_id: Id) -> Call[m.RoundList]:
    return Call("GET", f"/v1/jobs/{job_id}/rounds", _model(m.RoundList))


@operation
def get_attention_plot(job_id: Id) -> Call[bytes]:
    return Call("GET", f"/v1/jobs/{job_id}/evaluation/attention.png", _bytes)


@operation
def list_checkpoints(job_id: Id) -> Call[m.CheckpointList]:
    return Call("GET", f"/v1/jobs/{job_id}/checkpoints", _model(m.CheckpointList))


@operation
def download_checkpoint(job_id: Id, step: int) -> Call[None]:
    """Sent with a streaming client (`Client.jobs.download_checkpoint`); `parse` is never called."""
    return Call("GET", f"/v1/jobs/{job_id}/checkpoints/{step}/archive", _none)


# --- webhooks -------------------------------------------------------------------------------


@operation
def create_webhook(url: str, event_types: Iterable[str]) -> Call[m.WebhookWithSecret]:
    body = m.WebhookCreate.model_validate({"url": url, "event_types": list(event_types)})
    return Call("POST", "/v1/webhooks", _model(m.WebhookWithSecret), json=_dump(body))


@operation
def list_webhooks(after: str | None = None, limit: int | None = None) -> Call[m.WebhookList]:
    return Call("GET", "/v1/webhooks", _model(m.WebhookList), _params(after=after, limit=limit))


@operation
def get_webhook(webhook_id: Id) -> Call[m.Webhook]:
    return Call("GET", f"/v1/webhooks/{webhook_id}", _model(m.Webhook))


@operation
def delete_webhook(webhook_id: Id) -> Call[None]:
    return Call("DELETE", f"/v1/webhooks/{webhook_id}", _none)


@operation
def rotate_webhook_secret(webhook_id: Id) -> Call[m.WebhookWithSecret]:
    return Call("POST", f"/v1/webhooks/{webhook_id}/rotate-secret", _model(m.WebhookWithSecret))


@operation
def enable_webhook(webhook_id: Id) -> Call[m.Webhook]:
    return Call("POST", f"/v1/webhooks/{webhook_id}/enable", _model(m.Webhook))


@operation
def resend_webhook_delivery(webhook_id: Id, delivery_id: Id) -> Call[m.Delivery]:
    return Call("POST", f"/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/resend", _model(m.Delivery))


@operation
def list_webhook_deliveries(
    webhook_id: Id, after: str | None = None, limit: int | None = None
) -> Call[m.DeliveryList]:
    params = _params(after=after, limit=limit)
    return Call("GET", f"/v1/webhooks/{webhook_id}/deliveries", _model(m.DeliveryList), params)


# --- keys -----------------------------------------------------------------------------------


@operation
def create_key(name: str | None = None) -> Call[m.NewKey]:
    body = m.KeyCreate.model_validate({"name": name} if name is not None else {})
    return Call("POST", "/v1/keys", _model(m.NewKey), json=_dump(body))


@operation
def list_keys() -> Call[m.KeyList]:
    return Call("GET", "/v1/keys", _model(m.KeyList))


@operation
def revoke_key(prefix: str) -> Call[m.Key]:
    return Call("DELETE", f"/v1/keys/{prefix}", _model(m.Key))


# --- models ---------------------------------------------------------------------------------


@operation
def list_models() -> Call[m.ModelList]:
    return Call("GET", "/v1/models", _model(m.ModelList))


@operation
def get_model(model_id: str) -> Call[m.ModelInfo]:
    return Call("GET", f"/v1/models/{model_id}", _model(m.ModelInfo))
