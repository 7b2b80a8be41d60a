"""`Client` and `AsyncClient`: the API's operations (`_calls.py`) sent over httpx, with what a
script would otherwise write around each call: the key, retries on 429/503 after `Retry-After`,
typed errors, pages followed to the end, waiting on a job with `If-None-Match`, its event stream
resumed with `Last-Event-ID`, and checkpoint downloads verified against their manifest.

Both clients have the same resources (`corpora`, `instruction_sets`, `jobs`, `webhooks`, `keys`,
`models`) and methods; the async ones are coroutines and async iterators.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from gatt_client import _calls as ops
from gatt_client import models as m
from gatt_client._archive import unpack_verified
from gatt_client.errors import GattError, StreamEnded, error_for, retry_after

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUSES = frozenset({429, 503})  # not processed: safe to send again, whatever the method
MAX_RETRY_WAIT_S = 60.0


@dataclass(frozen=True)
class StreamItem:
    """One message of a job's stream: `kind` is "event" (`event` set), "metric" (`metric` set) or
    "end" (`status` set: the job's final status). `id` resumes the stream after this message."""

    kind: str
    id: str | None
    event: m.Event | None = None
    metric: m.Metric | None = None
    status: str | None = None


def _stream_item(sse: ServerSentEvent) -> StreamItem | None:
    if sse.event == "job_event":
        return StreamItem("event", sse.id or None, event=m.Event.model_validate_json(sse.data))
    if sse.event == "metric":
        return StreamItem("metric", sse.id or None, metric=m.Metric.model_validate_json(sse.data))
    if sse.event == "end":
        return StreamItem("end", sse.id or None, status=json.loads(sse.data).get("status"))
    return None  # a kind this client does not know yet


def _settings(url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    from gatt_client import __version__

    base = (url or os.environ.get("GATT_URL") or DEFAULT_URL).rstrip("/")
    key = api_key or os.environ.get("GATT_API_KEY")
    headers = {"User-Agent": f"gatt-client/{__version__}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return base, headers


def _delay(response: httpx.Response, attempt: int) -> float:
    return min(retry_after(response) or 2.0**attempt, MAX_RETRY_WAIT_S)


# A model id, or a checkpoint of the team's own: {"job_id": ..., "step": ...}.
ModelChoice = str | m.CheckpointRef | Mapping[str, Any] | None


def job_body(
    corpus_id: ops.Id,
    *,
    instruction_set_id: ops.Id | None = None,
    config: m.JobOptions | Mapping[str, Any] | None = None,
    model: ModelChoice = None,
    name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    validation_corpus_id: ops.Id | None = None,
) -> m.JobCreate:
    """A job request, validated here against the API's schema before it is sent. `model` is a model
    id (`client.models.list()`), or `{"job_id": ..., "step": ...}` to continue a checkpoint."""
    fields = {
        "corpus_id": str(corpus_id),
        "instruction_set_id": None if instruction_set_id is None else str(instruction_set_id),
        "config": ops._dump(config),
        "model": ops._dump(model) if isinstance(model, (m.CheckpointRef, Mapping)) else model,
        "name": name,
        "metadata": dict(metadata) if metadata is not None else None,
        "validation_corpus_id": None if validation_corpus_id is None else str(validation_corpus_id),
    }
    return m.JobCreate.model_validate({k: v for k, v in fields.items() if v is not None})


# --- sync -----------------------------------------------------------------------------------


class Client:
    """The API over HTTP. `url` and `api_key` default to GATT_URL and GATT_API_KEY; `http` lets a
    caller pass its own httpx.Client (proxies, certificates, a test transport)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        http: httpx.Client | None = None,
    ) -> None:
        self.url, headers = _settings(url, api_key)
        self.max_retries = max_retries
        self._http = http or httpx.Client(base_url=self.url, timeout=timeout, follow_redirects=False)
        self._http.headers.update(headers)
        self.corpora = Corpora(self)
        self.instruction_sets = InstructionSets(self)
        self.jobs = Jobs(self)
        self.webhooks = Webhooks(self)
        self.keys = Keys(self)
        self.models = Models(self)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, call: ops.Call[T]) -> T:
        """Send `call`, retrying 429 and 503 answers; its parsed answer, or an ApiError."""
        for attempt in range(self.max_retries + 1):
            response = self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                files=call.files,
                headers=call.headers,
            )
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                break
            time.sleep(_delay(response, attempt))
        if response.status_code >= 400:
            raise error_for(response)
        return call.parse(response)

    def health(self) -> m.Health:
        return self.request(ops.healthz())

    def ready(self) -> m.Readiness:
        return self.request(ops.readyz())

    def _pages(self, page: Callable[[str | None], Any]) -> Iterator[Any]:
        after = None
        while True:
            result = self.request(page(after))
            yield from result.data
            if not result.has_more or result.next_after is None:
                return
            after = result.next_after


class Corpora:
    def __init__(self, client: Client) -> None:
        self._c = client

    def upload(
        self, source: str | Path | bytes | Iterable[Mapping[str, Any]], name: str | None = None
    ) -> m.Corpus:
        """Upload a JSONL corpus from a path, its bytes, or an iterable of dialogues."""
        content, default_name = ops.corpus_bytes(source)
        return self._c.request(ops.create_corpus(content, name or default_name))

    def list(self, limit: int | None = None) -> Iterator[m.Corpus]:
        return self._c._pages(lambda after: ops.list_corpora(after, limit))

    def get(self, corpus_id: ops.Id) -> m.Corpus:
        return self._c.request(ops.get_corpus(corpus_id))

    def content(self, corpus_id: ops.Id) -> bytes:
        return self._c.request(ops.get_corpus_content(corpus_id))

    def delete(self, corpus_id: ops.Id) -> None:
        self._c.request(ops.delete_corpus(corpus_id))


class InstructionSets:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str, spec: m.InstructionSetSpec | Mapping[str, Any]) -> m.InstructionSet:
        return self._c.request(ops.create_instruction_set(name, spec))

    def list(self, limit: int | None = None) -> Iterator[m.InstructionSet]:
        return self._c._pages(lambda after: ops.list_instruction_sets(after, limit))

    def get(self, instruction_set_id: ops.Id) -> m.InstructionSet:
        return self._c.request(ops.get_instruction_set(instruction_set_id))

    def default(self) -> m.DefaultInstructionSet:
        return self._c.request(ops.get_default_instruction_set())

    def delete(self, instruction_set_id: ops.Id) -> None:
        self._c.request(ops.delete_instruction_set(instruction_set_id))


class Jobs:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(
        self,
        corpus_id: ops.Id,
        *,
        instruction_set_id: ops.Id | None = None,
        config: m.JobOptions | Mapping[str, Any] | None = None,
        model: ModelChoice = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        validation_corpus_id: ops.Id | None = None,
    ) -> m.Job:
        """Create a job; with `idempotency_key`, sending it again returns the same job."""
        body = job_body(
            corpus_id,
            instruction_set_id=instruction_set_id,
            config=config,
            model=model,
            name=name,
            metadata=metadata,
            validation_corpus_id=validation_corpus_id,
        )
        return self._c.request(ops.create_job(body, idempotency_key))

    def get(self, job_id: ops.Id) -> m.Job:
        job, _ = self._c.request(ops.get_job(job_id))
        assert job is not None  # no If-None-Match was sent
        return job

    def list(self, limit: int | None = None, status: str | None = None) -> Iterator[m.Job]:
        return self._c._pages(lambda after: ops.list_jobs(after, limit, status))

    def cancel(self, job_id: ops.Id) -> m.Job:
        return self._c.request(ops.cancel_job(job_id))

    def chat(
        self,
        job_id: ops.Id,
        messages: Sequence[Mapping[str, str]],
        *,
        model: str = "checkpoint",
        step: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> m.ChatReply:
        """The next assistant turn of `messages` from the job's checkpoint (the last unless `step`)
        or, with `model="base"`, its base model. Greedy unless `temperature` > 0."""
        return self._c.request(
            ops.chat_with_job(job_id, _chat_body(messages, model, step, max_new_tokens, temperature, seed))
        )

    def delete(self, job_id: ops.Id) -> None:
        """Delete a finished job and all it wrote (frees the team's artifact quota)."""
        self._c.request(ops.delete_job(job_id))

    def config_defaults(self) -> m.JobOptions:
        return self._c.request(ops.get_config_defaults())

    def wait(
        self,
        job_id: ops.Id,
        *,
        timeout: float | None = None,
        interval: float = 2.0,
        on_change: Callable[[m.Job], None] | None = None,
    ) -> m.Job:
        """Poll until the job has ended and return it. Polls with `If-None-Match`, so an unchanged
        job costs the server a 304; `on_change` sees each new version. TimeoutError after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        etag: str | None = None
        job: m.Job | None = None
        while True:
            changed, etag = self._c.request(ops.get_job(job_id, etag))
            if changed is not None:
                job = changed
                if on_change is not None:
                    on_change(job)
            assert job is not None
            if job.status.value in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout} s")
            time.sleep(interval)

    def follow(self, job_id: ops.Id, *, last_event_id: str | None = None) -> Iterator[StreamItem]:
        """The job's events and metrics as they are written (server-sent events), ending with an
        "end" item. A dropped connection is resumed from the last id received, without a gap or a
        repeat, up to `max_retries` times in a row."""
        failures = 0
        while True:
            call = ops.stream_events(job_id, last_event_id)
            try:
                with connect_sse(self._c._http, "GET", call.path, headers=call.headers) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        raise error_for(source.response)
                    for sse in source.iter_sse():
                        item = _stream_item(sse)
                        if item is None:
                            continue
                        failures = 0
                        last_event_id = item.id or last_event_id
                        yield item
                        if item.kind == "end":
                            return
            except httpx.TransportError as e:
                failures += 1
                if failures > self._c.max_retries:
                    raise StreamEnded(f"the stream of job {job_id} broke off {failures} times: {e}") from e
                time.sleep(min(2.0**failures, MAX_RETRY_WAIT_S))
                continue
            # The server closed the stream without an end message: reconnect and continue.
            failures += 1
            if failures > self._c.max_retries:
                raise StreamEnded(f"the stream of job {job_id} closed {failures} times without its end")

    def events(self, job_id: ops.Id, *, after_seq: int = 0) -> Iterator[m.Event]:
        return self._c._pages(lambda after: ops.list_events(job_id, after or str(after_seq)))

    def metrics(self, job_id: ops.Id, *, after_step: int = 0) -> Iterator[m.Metric]:
        return self._c._pages(lambda after: ops.list_metrics(job_id, after or str(after_step)))

    def samples(self, job_id: ops.Id, round_: int | None = None) -> Iterator[m.SampleRow]:
        """Sampled dialogues, of round 1 or of round `round_` (`rounds.count`)."""
        return self._c._pages(lambda after: ops.list_samples(job_id, after, round_=round_))

    def training_set(self, job_id: ops.Id, round_: int | None = None) -> Iterator[m.TrainingRow]:
        """Training dialogues, of round 1 or of round `round_`."""
        return self._c._pages(lambda after: ops.list_training_set(job_id, after, round_=round_))

    def evaluation(self, job_id: ops.Id) -> m.JobEvaluation:
        return self._c.request(ops.get_evaluation(job_id))

    def rounds(self, job_id: ops.Id) -> m.RoundList:
        """The job's finished rounds of sampling, ranking and training, with their reward."""
        return self._c.request(ops.list_rounds(job_id))

    def attention_plot(self, job_id: ops.Id) -> bytes:
        return self._c.request(ops.get_attention_plot(job_id))

    def checkpoints(self, job_id: ops.Id) -> list[m.CheckpointOut]:
        return list(self._c.request(ops.list_checkpoints(job_id)).data)

    def download_checkpoint(self, job_id: ops.Id, step: int | None = None, dest: str | Path = ".") -> Path:
        """Download a checkpoint (the latest when `step` is None), check every file against its
        manifest and unpack it into `dest`; returns the checkpoint's folder."""
        listed = _pick(self.checkpoints(job_id), step, job_id)
        call = ops.download_checkpoint(job_id, listed.step)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest, prefix=".download-", suffix=".tar.gz") as archive:
            with self._c._http.stream("GET", call.path) as response:
                if response.status_code >= 400:
                    response.read()
                    raise error_for(response)
                for chunk in response.iter_bytes():
                    archive.write(chunk)
            archive.flush()
            return unpack_verified(Path(archive.name), dest, listed.manifest)


class Webhooks:
    """Endpoints that receive `job.succeeded`, `job.failed`, `job.cancelled` and
    `checkpoint.created`, signed per Standard Webhooks with the secret `create` returns once."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, url: str, event_types: Iterable[str]) -> m.WebhookWithSecret:
        return self._c.request(ops.create_webhook(url, event_types))

    def list(self, limit: int | None = None) -> Iterator[m.Webhook]:
        return self._c._pages(lambda after: ops.list_webhooks(after, limit))

    def get(self, webhook_id: ops.Id) -> m.Webhook:
        return self._c.request(ops.get_webhook(webhook_id))

    def delete(self, webhook_id: ops.Id) -> None:
        self._c.request(ops.delete_webhook(webhook_id))

    def rotate_secret(self, webhook_id: ops.Id) -> m.WebhookWithSecret:
        return self._c.request(ops.rotate_webhook_secret(webhook_id))

    def enable(self, webhook_id: ops.Id) -> m.Webhook:
        """Send to an endpoint again after it was disabled for failing."""
        return self._c.request(ops.enable_webhook(webhook_id))

    def resend(self, webhook_id: ops.Id, delivery_id: ops.Id) -> m.Delivery:
        """Send a failed (or delivered) delivery again, with its event id."""
        return self._c.request(ops.resend_webhook_delivery(webhook_id, delivery_id))

    def deliveries(self, webhook_id: ops.Id, limit: int | None = None) -> Iterator[m.Delivery]:
        return self._c._pages(lambda after: ops.list_webhook_deliveries(webhook_id, after, limit))


class Keys:
    """The team's API keys: `create` returns the key once; `revoke` takes its prefix."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str | None = None) -> m.NewKey:
        return self._c.request(ops.create_key(name))

    def list(self) -> list[m.Key]:
        return list(self._c.request(ops.list_keys()).data)

    def revoke(self, prefix: str) -> m.Key:
        return self._c.request(ops.revoke_key(prefix))


class Models:
    """What jobs can fine-tune: the server's models by id."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[m.ModelInfo]:
        return list(self._c.request(ops.list_models()).data)

    def get(self, model_id: str) -> m.ModelInfo:
        return self._c.request(ops.get_model(model_id))


def _pick(checkpoints: list[m.CheckpointOut], step: int | None, job_id: ops.Id) -> m.CheckpointOut:
    if not checkpoints:
        raise GattError(f"job {job_id} has no checkpoint yet")
    if step is None:
        return max(checkpoints, key=lambda c: c.step)
    for checkpoint in checkpoints:
        if checkpoint.step == step:
            return checkpoint
    raise GattError(f"job {job_id} has no checkpoint at step {step}: {[c.step for c in checkpoints]}")


# --- async ----------------------------------------------------------------------------------


class AsyncClient:
    """`Client`'s operations as coroutines, over an httpx.AsyncClient."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.url, headers = _settings(url, api_key)
        self.max_retries = max_retries
        self._http = http or httpx.AsyncClient(base_url=self.url, timeout=timeout, follow_redirects=False)
        self._http.headers.update(headers)
        self.corpora = AsyncCorpora(self)
        self.instruction_sets = AsyncInstructionSets(self)
        self.jobs = AsyncJobs(self)
        self.webhooks = AsyncWebhooks(self)
        self.keys = AsyncKeys(self)
        self.models = AsyncModels(self)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, call: ops.Call[T]) -> T:
        for attempt in range(self.max_retries + 1):
            response = await self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                files=call.files,
                headers=call.headers,
            )
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                break
            await asyncio.sleep(_delay(response, attempt))
        if response.status_code >= 400:
            raise error_for(response)
        return call.parse(response)

    async def health(self) -> m.Health:
        return await self.request(ops.healthz())

    async def ready(self) -> m.Readiness:
        return await self.request(ops.readyz())

    async def _pages(self, page: Callable[[str | None], Any]) -> AsyncIterator[Any]:
        after = None
        while True:
            result = await self.request(page(after))
            for item in result.data:
                yield item
            if not result.has_more or result.next_after is None:
                return
            after = result.next_after


class AsyncCorpora:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def upload(
        self, source: str | Path | bytes | Iterable[Mapping[str, Any]], name: str | None = None
    ) -> m.Corpus:
        content, default_name = ops.corpus_bytes(source)
        return await self._c.request(ops.create_corpus(content, name or default_name))

    def list(self, limit: int | None = None) -> AsyncIterator[m.Corpus]:
        return self._c._pages(lambda after: ops.list_corpora(after, limit))

    async def get(self, corpus_id: ops.Id) -> m.Corpus:
        return await self._c.request(ops.get_corpus(corpus_id))

    async def content(self, corpus_id: ops.Id) -> bytes:
        return await self._c.request(ops.get_corpus_content(corpus_id))

    async def delete(self, corpus_id: ops.Id) -> None:
        await self._c.request(ops.delete_corpus(corpus_id))


class AsyncInstructionSets:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, name: str, spec: m.InstructionSetSpec | Mapping[str, Any]) -> m.InstructionSet:
        return await self._c.request(ops.create_instruction_set(name, spec))

    def list(self, limit: int | None = None) -> AsyncIterator[m.InstructionSet]:
        return self._c._pages(lambda after: ops.list_instruction_sets(after, limit))

    async def get(self, instruction_set_id: ops.Id) -> m.InstructionSet:
        return await self._c.request(ops.get_instruction_set(instruction_set_id))

    async def default(self) -> m.DefaultInstructionSet:
        return await self._c.request(ops.get_default_instruction_set())

    async def delete(self, instruction_set_id: ops.Id) -> None:
        await self._c.request(ops.delete_instruction_set(instruction_set_id))


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(
        self,
        corpus_id: ops.Id,
        *,
        instruction_set_id: ops.Id | None = None,
        config: m.JobOptions | Mapping[str, Any] | None = None,
        model: ModelChoice = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        validation_corpus_id: ops.Id | None = None,
    ) -> m.Job:
        body = job_body(
            corpus_id,
            instruction_set_id=instruction_set_id,
            config=config,
            model=model,
            name=name,
            metadata=metadata,
            validation_corpus_id=validation_corpus_id,
        )
        return await self._c.request(ops.create_job(body, idempotency_key))

    async def get(self, job_id: ops.Id) -> m.Job:
        job, _ = await self._c.request(ops.get_job(job_id))
        assert job is not None
        return job

    def list(self, limit: int | None = None, status: str | None = None) -> AsyncIterator[m.Job]:
        return self._c._pages(lambda after: ops.list_jobs(after, limit, status))

    async def cancel(self, job_id: ops.Id) -> m.Job:
        return await self._c.request(ops.cancel_job(job_id))

    async def chat(
        self,
        job_id: ops.Id,
        messages: Sequence[Mapping[str, str]],
        *,
        model: str = "checkpoint",
        step: int | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
    ) -> m.ChatReply:
        body = _chat_body(messages, model, step, max_new_tokens, temperature, seed)
        return await self._c.request(ops.chat_with_job(job_id, body))

    async def delete(self, job_id: ops.Id) -> None:
        await self._c.request(ops.delete_job(job_id))

    async def config_defaults(self) -> m.JobOptions:
        return await self._c.request(ops.get_config_defaults())

    async def wait(
        self,
        job_id: ops.Id,
        *,
        timeout: float | None = None,
        interval: float = 2.0,
        on_change: Callable[[m.Job], None] | None = None,
    ) -> m.Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        etag: str | None = None
        job: m.Job | None = None
        while True:
            changed, etag = await self._c.request(ops.get_job(job_id, etag))
            if changed is not None:
                job = changed
                if on_change is not None:
                    on_change(job)
            assert job is not None
            if job.status.value in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout} s")
            await asyncio.sleep(interval)

    async def follow(self, job_id: ops.Id, *, last_event_id: str | None = None) -> AsyncIterator[StreamItem]:
        failures = 0
        while True:
            call = ops.stream_events(job_id, last_event_id)
            try:
                async with aconnect_sse(self._c._http, "GET", call.path, headers=call.headers) as source:
                    if source.response.status_code >= 400:
                        await source.response.aread()
                        raise error_for(source.response)
                    async for sse in source.aiter_sse():
                        item = _stream_item(sse)
                        if item is None:
                            continue
                        failures = 0
                        last_event_id = item.id or last_event_id
                        yield item
                        if item.kind == "end":
                            return
            except httpx.TransportError as e:
                failures += 1
                if failures > self._c.max_retries:
                    raise StreamEnded(f"the stream of job {job_id} broke off {failures} times: {e}") from e
                await asyncio.sleep(min(2.0**failures, MAX_RETRY_WAIT_S))
                continue
            failures += 1
            if failures > self._c.max_retries:
                raise StreamEnded(f"the stream of job {job_id} closed {failures} times without its end")

    def events(self, job_id: ops.Id, *, after_seq: int = 0) -> AsyncIterator[m.Event]:
        return self._c._pages(lambda after: ops.list_events(job_id, after or str(after_seq)))

    def metrics(self, job_id: ops.Id, *, after_step: int = 0) -> AsyncIterator[m.Metric]:
        return self._c._pages(lambda after: ops.list_metrics(job_id, after or str(after_step)))

    async def evaluation(self, job_id: ops.Id) -> m.JobEvaluation:
        return await self._c.request(ops.get_evaluation(job_id))

    async def rounds(self, job_id: ops.Id) -> m.RoundList:
        return await self._c.request(ops.list_rounds(job_id))

    async def checkpoints(self, job_id: ops.Id) -> list[m.CheckpointOut]:
        return list((await self._c.request(ops.list_checkpoints(job_id))).data)

    async def download_checkpoint(
        self, job_id: ops.Id, step: int | None = None, dest: str | Path = "."
    ) -> Path:
        listed = _pick(await self.checkpoints(job_id), step, job_id)
        call = ops.download_checkpoint(job_id, listed.step)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest, prefix=".download-", suffix=".tar.gz") as archive:
            async with self._c._http.stream("GET", call.path) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise error_for(response)
                async for chunk in response.aiter_bytes():
                    archive.write(chunk)
            archive.flush()
            return unpack_verified(Path(archive.name), dest, listed.manifest)


class AsyncWebhooks:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, url: str, event_types: Iterable[str]) -> m.WebhookWithSecret:
        return await self._c.request(ops.create_webhook(url, event_types))

    def list(self, limit: int | None = None) -> AsyncIterator[m.Webhook]:
        return self._c._pages(lambda after: ops.list_webhooks(after, limit))

    async def get(self, webhook_id: ops.Id) -> m.Webhook:
        return await self._c.request(ops.get_webhook(webhook_id))

    async def delete(self, webhook_id: ops.Id) -> None:
        await self._c.request(ops.delete_webhook(webhook_id))

    async def rotate_secret(self, webhook_id: ops.Id) -> m.WebhookWithSecret:
        return await self._c.request(ops.rotate_webhook_secret(webhook_id))

    async def enable(self, webhook_id: ops.Id) -> m.Webhook:
        return await self._c.request(ops.enable_webhook(webhook_id))

    async def resend(self, webhook_id: ops.Id, delivery_id: ops.Id) -> m.Delivery:
        return await self._c.request(ops.resend_webhook_delivery(webhook_id, delivery_id))

    def deliveries(self, webhook_id: ops.Id, limit: int | None = None) -> AsyncIterator[m.Delivery]:
        return self._c._pages(lambda after: ops.list_webhook_deliveries(webhook_id, after, limit))


class AsyncKeys:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, name: str | None = None) -> m.NewKey:
        return await self._c.request(ops.create_key(name))

    async def list(self) -> list[m.Key]:
        return list((await self._c.request(ops.list_keys())).data)

    async def revoke(self, prefix: str) -> m.Key:
        return await self._c.request(ops.revoke_key(prefix))


class AsyncModels:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> list[m.ModelInfo]:
        return list((await self._c.request(ops.list_models())).data)

    async def get(self, model_id: str) -> m.ModelInfo:
        return await self._c.request(ops.get_model(model_id))


def _chat_body(
    messages: Sequence[Mapping[str, str]],
    model: str,
    step: int | None,
    max_new_tokens: int | None,
    temperature: float | None,
    seed: int | None,
) -> dict[str, Any]:
    body = {"messages": [dict(m) for m in messages], "model": model, "step": step}
    extra = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    return {**body, **{k: v for k, v in extra.items() if v is not None}}
