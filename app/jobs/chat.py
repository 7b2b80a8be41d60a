"""`POST /v1/jobs/{id}/chat`: the playground. One reply of a job's checkpoint (or of its base
model) to an OpenAI-style conversation, generated on a chat worker (workers/chat.py); the API
never loads a model.

The endpoint checks everything it can (the team's job, the checkpoint, the conversation's sizes
and shape, the team's chat rate) in its database session, then returns a `ChatResponse`, which
waits for the worker's answer only once the session is closed and the request's admission slot
given back (app/core/admission.py): a waiting chat holds no thread and no connection. Each team
has at most `IN_FLIGHT_PER_TEAM` replies waiting per API process, each process `MAX_WAITING`.

The transport is a Celery message on `GATT_CHAT_QUEUE` carrying the conversation and a Redis key;
the worker pushes its answer there and the API waits on it with BLPOP (`RedisChat`). The embedded
mode answers in a thread of its own process instead (`app/embedded.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Protocol

from fastapi import APIRouter, Request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from app.auth.dependencies import CurrentTeam
from app.core.db import SessionDep, SettingsDep
from app.core.errors import AUTH_RESPONSES, AppError, Conflict, RateLimited, error_response
from app.core.safe_json import check_text
from app.jobs import service
from app.jobs.endpoints import JobId
from service.models import JobStatus
from service.repositories import jobs

log = logging.getLogger(__name__)
MAX_MESSAGES = 64
MAX_MESSAGE_CHARS = 8_000
MAX_CHARS = 32_000
IN_FLIGHT_PER_TEAM = 2
CHAT_BURST = 5  # replies a team may ask for at once before its per-minute rate applies
MAX_WAITING = 64
REPLY_KEY = "gatt:chat:reply:"

router = APIRouter(prefix="/jobs", tags=["jobs"])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: Annotated[str, StringConstraints(max_length=MAX_MESSAGE_CHARS), AfterValidator(check_text)] = (
        Field(description=f"What is said, at most {MAX_MESSAGE_CHARS:,} characters.")
    )


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] = Field(
        min_length=1,
        max_length=MAX_MESSAGES,
        description=f"The conversation so far, ending with a user turn; a system message only first. At "
        f"most {MAX_MESSAGES} messages and {MAX_CHARS:,} characters in all. To see GAtt at work, give "
        "the instruction once, in the first user turn, and keep the model's replies as they came.",
    )
    model: Literal["checkpoint", "base"] = Field(
        "checkpoint", description="The job's fine-tuned checkpoint, or the base model it started from."
    )
    step: int | None = Field(
        None, ge=1, le=2**31 - 1, description="Which checkpoint; null: the job's last. Ignored for `base`."
    )
    max_new_tokens: int = Field(128, ge=1, le=512, description="Tokens the reply may have at most.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0: greedy, the same reply every time.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling, when temperature > 0.")
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Seeds the sampling, when temperature > 0."
    )

    @model_validator(mode="after")
    def _shape(self) -> ChatRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        if any(m.role == "system" for m in self.messages[1:]):
            raise ValueError("a system message may only come first")
        if sum(len(m.content) for m in self.messages) > MAX_CHARS:
            raise ValueError(f"the conversation has more than {MAX_CHARS:,} characters")
        return self


class ChatUsage(BaseModel):
    prompt_tokens: int = Field(description="Tokens of the conversation, as the model's template renders it.")
    completion_tokens: int = Field(description="Tokens generated (the end-of-turn token included).")


class ChatReply(BaseModel):
    message: ChatMessage = Field(description="The model's reply, role `assistant`.")
    model: Literal["checkpoint", "base"] = Field(description="Which model replied.")
    step: int | None = Field(description="The checkpoint's step; null for the base model.")
    finish_reason: Literal["stop", "length"] = Field(
        description="`stop`: the model ended its turn; `length`: cut at max_new_tokens."
    )
    usage: ChatUsage = Field(description="Tokens in and out.")


class Chat(Protocol):
    async def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The worker's answer to `request`, or None when none came within `timeout_s`."""

    async def close(self) -> None: ...


class RedisChat:
    """A `chat.reply` message (sent by `send`), its answer read from Redis."""

    def __init__(self, redis_url: str, send: Callable[[dict[str, Any]], None]):
        self.redis_url, self.send = redis_url, send
        self._client: Any = None

    async def ask(self, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        if self._client is None:
            # BLPOP waits on the server's clock; the socket must outwait it.
            self._client = aioredis.Redis.from_url(
                self.redis_url, socket_connect_timeout=5, socket_timeout=timeout_s + 5
            )
        key = f"{REPLY_KEY}{uuid.uuid4().hex}"
        try:
            await asyncio.to_thread(self.send, {**request, "reply_to": key})
            answer = await self._client.blpop([key], timeout=timeout_s)
        except (RedisError, OSError) as exc:
            log.warning("chat: the broker is unreachable: %s", exc)
            return {"ok": False, "code": "chat_unavailable", "message": "The chat queue cannot be reached."}
        return None if answer is None else json.loads(answer[1])

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class Waiting:
    """Replies waiting in this process, by team: the bound on what chats may hold at once."""

    def __init__(self) -> None:
        self.by_team: Counter[uuid.UUID] = Counter()
        self.lock = threading.Lock()  # taken in the endpoint's thread, given back in the event loop

    def take(self, team_id: uuid.UUID) -> None:
        with self.lock:
            if self.by_team[team_id] >= IN_FLIGHT_PER_TEAM or self.by_team.total() >= MAX_WAITING:
                raise RateLimited(
                    f"At most {IN_FLIGHT_PER_TEAM} chat replies per team wait at once; retry when one is back.",
                    retry_after_s=1,
                )
            self.by_team[team_id] += 1

    def give_back(self, team_id: uuid.UUID) -> None:
        with self.lock:
            self.by_team[team_id] -= 1
            if self.by_team[team_id] <= 0:
                del self.by_team[team_id]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(AppError(message, code=code).body(), status_code=status)


class ChatResponse(Response):
    """Waits for the answer when it is sent, after the request's session has closed, having
    first given back the request's admission slot."""

    def __init__(self, wait: Callable[[], Awaitable[Response]], done: Callable[[], None]):
        super().__init__()
        self.wait, self.done = wait, done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        release = scope.get("gatt.admission.release")
        if release is not None:
            release()
        try:
            response = await self.wait()
        finally:
            self.done()
        await response(scope, receive, send)


@router.post(
    "/{job_id}/chat",
    response_model=ChatReply,
    summary="Chat with a job's model",
    responses={
        **AUTH_RESPONSES,
        **error_response(404, "No such job for this team (`not_found`)."),
        **error_response(
            409,
            "`no_checkpoint`: the job has no checkpoint (yet), or none at `step`; chat with `model: base`, "
            "or wait for the job.",
        ),
        **error_response(413, "The body is larger than the JSON body limit (`payload_too_large`)."),
        **error_response(
            422,
            "`invalid_request`: the conversation's shape or sizes; `context_too_long`: the conversation "
            "and max_new_tokens pass the model's context.",
        ),
        **error_response(
            429,
            "`rate_limited`: more than `GATT_CHAT_PER_MINUTE` replies a minute for the team, or two "
            "waiting at once; `Retry-After` says when to try again.",
        ),
        **error_response(
            502, "`chat_failed` (or the model's own code): the worker could not load it or reply."
        ),
        **error_response(503, "`chat_unavailable`: the chat queue (Redis) cannot be reached."),
        **error_response(504, "`chat_timeout`: no chat worker answered within `GATT_CHAT_TIMEOUT_S`."),
    },
)
def chat_with_job(
    request: Request,
    session: SessionDep,
    team: CurrentTeam,
    settings: SettingsDep,
    job_id: JobId,
    body: ChatRequest,
) -> Response:
    """The next assistant turn of the conversation, from the job's checkpoint (the last by default)
    or its base model, run on a chat worker. Nothing is stored. Greedy by default: the same
    conversation gets the same reply, so base and checkpoint can be compared turn by turn."""
    job = service.get(session, team, job_id)
    step = None
    if body.model == "checkpoint":
        listed = [c.step for c in jobs.checkpoints(session, job.id)]
        step = body.step if body.step is not None else (listed[-1] if listed else None)
        if step is None or step not in listed:
            if body.step is not None and listed:
                message = f"The job has no checkpoint at step {body.step}; its checkpoints: {listed}."
            elif job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
                message = "The job has no checkpoint yet; chat with `model: base` meanwhile."
            else:
                message = "The job has no checkpoint; chat with `model: base`."
            raise Conflict(message, code="no_checkpoint", param="step" if body.step is not None else "model")
    limiter = request.app.state.chat_limiter
    if limiter is not None:
        decision = limiter.check(f"chat:{team.id}")
        if not decision.allowed:
            raise RateLimited(
                f"More than {settings.chat_per_minute:g} chat replies a minute; retry in {decision.retry_after_s} s.",
                retry_after_s=decision.retry_after_s,
            )
    waiting: Waiting = request.app.state.chat_waiting
    waiting.take(team.id)
    payload = {
        "job_id": str(job.id),
        "model": body.model,
        "step": step,
        "messages": [m.model_dump() for m in body.messages],
        "max_new_tokens": body.max_new_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
    }
    broker: Chat = request.app.state.chat

    async def wait() -> Response:
        answer = await broker.ask(payload, settings.chat_timeout_s)
        if answer is None:
            return _error(
                504,
                "chat_timeout",
                f"No chat worker answered within {settings.chat_timeout_s:g} s; is one running on the "
                f"'{settings.chat_queue}' queue?",
            )
        if not answer["ok"]:
            status = {"context_too_long": 422, "chat_unavailable": 503}.get(answer["code"], 502)
            return _error(status, answer["code"], answer["message"])
        reply = ChatReply(
            message=ChatMessage(role="assistant", content=answer["content"]),
            model=body.model,
            step=step,
            finish_reason=answer["finish_reason"],
            usage=ChatUsage(
                prompt_tokens=answer["prompt_tokens"], completion_tokens=answer["completion_tokens"]
            ),
        )
        return JSONResponse(reply.model_dump(mode="json"))

    return ChatResponse(wait, lambda: waiting.give_back(team.id))
