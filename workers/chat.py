"""The playground's replies (`POST /v1/jobs/{id}/chat`): one reply of a job's base model or of one
of its checkpoints to a conversation, on a chat worker (`celery ... worker -Q chat`).

The API checks the request (team, job, checkpoint, sizes) and sends `chat.reply` with a Redis key
to answer on; this worker loads the model (or finds it in its cache of `GATT_CHAT_MAX_MODELS`,
least recently used first out), renders the conversation with the model's own chat template,
generates until the template's end-of-turn token or `max_new_tokens`, and pushes
`{"ok": true, "content", "finish_reason", "prompt_tokens", "completion_tokens"}` (or
`{"ok": false, "code", "message"}`) to that key, which expires soon after. Nothing is stored.

`generate` is the right tool here, unlike in sampling (workers/engine/rollout.py): one prompt at
a time, no per-turn masks to keep. A worker with a vLLM server (`GATT_VLLM_URL`) that serves the
job's base model asks it instead, for the base model and for LoRA checkpoints (loaded into the
server for the reply): the server holds the weights, this worker only the tokenizer.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.db import session_scope
from service.queue import CHAT_TASK
from service.repositories import jobs
from service.settings import Settings, get_settings
from workers.artifact_sync import stored_checkpoint
from workers.celery_app import celery
from workers.redact import server_paths
from workers.tasks import JobFailure, _model_dir, sessions

log = logging.getLogger(__name__)

REPLY_TTL_S = 120  # an answer the API no longer waits for is gone after this


class ChatFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ModelCache:
    """Loaded models by (checkpoint directory or base model, base), the least recently used evicted
    past `size`; with `files`, what a reply from the vLLM server needs of them instead (tokenizer,
    adapter, context: `models.model_files`). One lock: a worker runs one reply at a time (solo
    pool), and a second thread (the embedded mode) waits rather than loading the same weights twice."""

    def __init__(self, size: int):
        self.size = size
        self.models: OrderedDict[tuple[str, str, bool], Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, source: str, base: str, roots: list[Path], *, files: bool = False) -> Any:
        from workers.engine.models import load_model, model_files

        key = (source, base, files)
        if key in self.models:
            self.models.move_to_end(key)
            return self.models[key]
        load = model_files if files else load_model
        loaded = load(source, base=base, allowed_roots=roots)
        self.models[key] = loaded
        while len(self.models) > self.size:
            self.models.popitem(last=False)
        return loaded


_cache: ModelCache | None = None


def cache(settings: Settings) -> ModelCache:
    global _cache
    if _cache is None:
        _cache = ModelCache(settings.chat_max_models)
    return _cache


@dataclass(frozen=True)
class Source:
    """The model a chat request asks for: what to load, its base, the roots confining the reads,
    and the job's model id (the name a vLLM server serves the base weights under)."""

    path: str
    base: str
    roots: list[Path]
    model_id: str


def _model_source(request: dict[str, Any], settings: Settings, factory: sessionmaker[Session]) -> Source:
    job_id = uuid.UUID(request["job_id"])
    with session_scope(factory) as s:
        job = jobs.get_any(s, job_id)
        if job is None:
            raise ChatFailure("not_found", "The job is gone.")
        try:
            base = _model_dir(job.model, settings)
        except JobFailure as exc:
            raise ChatFailure(exc.job_code, exc.message) from exc
        row = jobs.checkpoint(s, job_id, request["step"]) if request["model"] == "checkpoint" else None
        key = row.path if row is not None else None
        model_id = job.model
    roots = list(settings.model_roots)
    if request["model"] == "base":
        return Source(base, base, roots, model_id)
    if key is None:
        raise ChatFailure("checkpoint_not_found", f"The job has no checkpoint at step {request['step']}.")
    directory = stored_checkpoint(settings, key, settings.artifact_dir / ".chat" / request["job_id"])
    return Source(str(directory), base, [*roots, directory], model_id)


def reply(request: dict[str, Any], settings: Settings, factory: sessionmaker[Session]) -> dict[str, Any]:
    """The model's next assistant turn for `request` (see app/jobs/chat.py, `ChatRequest`): from the
    worker's vLLM server where it holds the model, else generated here."""
    from workers.engine.models import ModelError
    from workers.engine.vllm import SamplerUnavailable

    source = _model_source(request, settings, factory)
    try:
        if _served(settings.vllm_url, source):
            with cache(settings).lock:
                files = cache(settings).get(source.path, source.base, source.roots, files=True)
            return served_reply(settings.vllm_url, source, files, request)
    except SamplerUnavailable as exc:  # the server is down or refused: this worker can still reply
        log.warning("chat reply for job %s generated here: %s", request["job_id"], exc)
    except ModelError as exc:
        raise ChatFailure(exc.code, str(exc)) from exc
    with cache(settings).lock:
        try:
            loaded = cache(settings).get(source.path, source.base, source.roots)
        except ModelError as exc:
            raise ChatFailure(exc.code, str(exc)) from exc
        return generated_reply(loaded, request)


def _served(url: str | None, source: Source) -> bool:
    """Whether the vLLM server at `url` can reply as `source`: it serves the job's base weights, and
    the checkpoint asked for is none (the base model) or a LoRA adapter of those weights. Full
    checkpoints, and adapters trained on a parent job's full weights, are generated here."""
    from workers.engine.vllm import served_models

    if not url or source.model_id not in served_models(url):
        return False
    if source.path == source.base:
        return True
    adapter = Path(source.path) / "adapter_config.json"
    if not adapter.is_file():
        return False
    try:
        return json.loads(adapter.read_text()).get("base_model_name_or_path") == source.model_id
    except ValueError:
        return False


def _prompt(tokenizer: Any, context: int | None, request: dict[str, Any]) -> list[int]:
    prompt = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=True)
    if hasattr(prompt, "keys"):  # transformers 5 returns a BatchEncoding
        prompt = prompt["input_ids"]
    if context is not None and len(prompt) + request["max_new_tokens"] > context:
        raise ChatFailure(
            "context_too_long",
            f"The conversation is {len(prompt)} tokens; with max_new_tokens it passes the model's {context}.",
        )
    return list(prompt)


def served_reply(url: str, source: Source, files: Any, request: dict[str, Any]) -> dict[str, Any]:
    """The reply from the vLLM server, as `generated_reply` gives it; `files` is `source`'s
    `models.model_files`. A checkpoint's adapter is
    loaded under a name of this request's own and unloaded after: a job sampling with the same
    checkpoint (its next round) keeps its own copy, which this never unloads."""
    from workers.engine.config import SamplingConfig
    from workers.engine.models import end_of_turn_ids
    from workers.engine.vllm import VllmSampler, adapter_name, load_adapter, unload_adapter

    prompt = _prompt(files.tokenizer, files.context, request)
    name = source.model_id
    if files.adapter_dir is not None:
        name = f"{adapter_name(files.adapter_dir)}-chat-{uuid.uuid4().hex[:12]}"
        load_adapter(url, name, files.adapter_dir)
    seed = request.get("seed")
    config = SamplingConfig(
        k=1,
        temperature=request["temperature"],
        top_p=request["top_p"],
        max_new_tokens=request["max_new_tokens"],
        seed=secrets.randbelow(2**31 - 1) if seed is None else seed,  # unseeded: another reply each time
    )
    try:
        sampler = VllmSampler(url, name, files.tokenizer, end_of_turn_ids(files.tokenizer))
        ((candidate,),) = sampler.candidates([prompt], config)
    finally:
        if files.adapter_dir is not None:
            unload_adapter(url, name)
    return {
        "ok": True,
        "content": candidate.text.strip(),
        "finish_reason": "stop" if candidate.finished else "length",
        "prompt_tokens": len(prompt),
        "completion_tokens": len(candidate.token_ids) + candidate.finished,  # the stop token counts
    }


def generated_reply(loaded: Any, request: dict[str, Any]) -> dict[str, Any]:
    """The reply `loaded` (a `LoadedModel`) generates in this process."""
    import torch

    from workers.engine.models import end_of_turn_ids

    tokenizer, model = loaded.tokenizer, loaded.model
    prompt = _prompt(tokenizer, getattr(model.config, "max_position_embeddings", None), request)
    stops = end_of_turn_ids(tokenizer)
    ids = torch.tensor([prompt], device=loaded.device)
    sampled = request["temperature"] > 0
    generator_seed = request.get("seed")
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=request["max_new_tokens"],
            do_sample=sampled,
            temperature=request["temperature"] if sampled else None,
            top_p=request["top_p"] if sampled else None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, len(prompt) :].tolist()
    finished = bool(new) and new[-1] in stops
    text = tokenizer.decode(new[:-1] if finished else new, skip_special_tokens=True)
    return {
        "ok": True,
        "content": text.strip(),
        "finish_reason": "stop" if finished else "length",
        "prompt_tokens": len(prompt),
        "completion_tokens": len(new),
    }


def answer(request: dict[str, Any], settings: Settings, factory: sessionmaker[Session]) -> dict[str, Any]:
    """`reply`, with a failure turned into the answer the API relays."""
    try:
        return reply(request, settings, factory)
    except ChatFailure as exc:  # the team reads it
        return {"ok": False, "code": exc.code, "message": server_paths(str(exc), settings.model_roots)}
    except Exception:
        log.exception("chat reply for job %s failed", request.get("job_id"))
        return {
            "ok": False,
            "code": "chat_failed",
            "message": "The model could not reply; see the worker's log.",
        }


@celery.task(name=CHAT_TASK, acks_late=False, ignore_result=True)
def reply_task(request: dict[str, Any]) -> None:
    import redis

    settings = get_settings()
    result = answer(request, settings, sessions())
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.rpush(request["reply_to"], json.dumps(result))
        client.expire(request["reply_to"], REPLY_TTL_S)
    finally:
        client.close()
