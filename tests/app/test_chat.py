"""`POST /v1/jobs/{id}/chat` up to the worker: what the API refuses before sending anything, the
message it sends (real Celery on the real Redis, to a private queue no worker reads), the 504 when
no worker answers, the team's limits, and that a waiting chat holds no admission slot. The worker's
side, on the real model, is in tests/app/test_embedded.py and tests/e2e/test_service_e2e.py."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import time
import uuid

import httpx
import pytest
import redis
from celery import Celery

from app.jobs.chat import RedisChat
from app.main import create_app
from service.db import session_scope
from service.models import JobStatus
from service.queue import CHAT_TASK
from service.repositories import jobs
from tests.app.factories import dialogue, jsonl, make_job, make_tenant
from tests.servers import serving

REDIS_URL = os.environ.get("GATT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ASK = [{"role": "user", "content": "Hello?"}]


@pytest.fixture(scope="module")
def chat_stack(settings):
    """The API on uvicorn with one admission slot, chats to a private queue, 1.5 s to answer."""
    queue = f"chat-test-{uuid.uuid4().hex[:8]}"
    broker = Celery(broker=REDIS_URL)
    chat_settings = settings.model_copy(
        update={
            "redis_url": REDIS_URL,
            "chat_timeout_s": 1.5,
            "chat_per_minute": 3,
            "max_requests_in_flight": 1,
            "max_json_body_bytes": 256 * 1024,
        }
    )
    app = create_app(
        chat_settings,
        enqueue=lambda job_id: None,
        chat=RedisChat(REDIS_URL, lambda request: broker.send_task(CHAT_TASK, args=[request], queue=queue)),
    )
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}", app, queue
    redis.Redis.from_url(REDIS_URL).delete(queue)


def corpus(url, tenant) -> uuid.UUID:
    files = {"file": ("c.jsonl", jsonl(dialogue(0)))}
    r = httpx.post(f"{url}/v1/corpora", files=files, headers={"Authorization": f"Bearer {tenant.key}"})
    assert r.status_code == 201, r.text
    return uuid.UUID(r.json()["id"])


def succeeded_job(url, app, tenant) -> uuid.UUID:
    """A succeeded job of `tenant` with a checkpoint at step 4 (rows only: no worker reads them here)."""
    factory = app.state.sessionmaker
    job_id = make_job(factory, tenant.team.id, corpus(url, tenant), status=JobStatus.SUCCEEDED)
    with session_scope(factory) as s:
        jobs.upsert_checkpoint(s, job_id, 4, "team/job/train/checkpoints/step-000004", {}, None)
    return job_id


def post(url, key, job_id, body, **kw):
    return httpx.post(
        f"{url}/v1/jobs/{job_id}/chat", json=body, headers={"Authorization": f"Bearer {key}"}, **kw
    )


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "assistant", "content": "Hi"}], "the last message must be the user's"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            "system message may only come first",
        ),
        ([{"role": "user", "content": "x" * 8001}], "messages[0].content"),
        ([{"role": "user", "content": "x" * 7000}] * 5, "more than 32,000 characters"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([], "messages"),
    ],
)
def test_a_bad_conversation_is_refused_before_anything_is_sent(chat_stack, messages, field):
    url, app, queue = chat_stack
    tenant = make_tenant(app.state.sessionmaker)
    r = post(url, tenant.key, succeeded_job(url, app, tenant), {"messages": messages})
    assert r.status_code == 422, r.text
    assert field in json.dumps(r.json()["error"])
    assert redis.Redis.from_url(REDIS_URL).llen(queue) == 0


def test_another_teams_job_and_a_job_without_a_checkpoint(chat_stack):
    url, app, queue = chat_stack
    owner, other = make_tenant(app.state.sessionmaker), make_tenant(app.state.sessionmaker)
    job_id = succeeded_job(url, app, owner)
    assert post(url, other.key, job_id, {"messages": ASK}).status_code == 404
    r = post(url, owner.key, job_id, {"messages": ASK, "step": 3})
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (
        409,
        "no_checkpoint",
        "step",
    )
    assert "[4]" in r.json()["error"]["message"]
    queued = make_job(app.state.sessionmaker, owner.team.id, corpus(url, owner))
    r = post(url, owner.key, queued, {"messages": ASK})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "no_checkpoint")
    assert redis.Redis.from_url(REDIS_URL).llen(queue) == 0


def test_without_a_worker_the_request_is_sent_and_answered_504_without_holding_a_slot(chat_stack):
    url, app, queue = chat_stack
    tenant = make_tenant(app.state.sessionmaker)
    job_id = succeeded_job(url, app, tenant)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(post, url, tenant.key, job_id, {"messages": ASK, "model": "base"}, timeout=10)
        time.sleep(0.5)
        # The one admission slot is free again while the chat waits: another request goes through.
        started = time.monotonic()
        listed = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {tenant.key}"}, timeout=10)
        assert listed.status_code == 200 and not waiting.done(), listed.text
        assert time.monotonic() - started < 1.0
        r = waiting.result()
    assert (r.status_code, r.json()["error"]["code"]) == (504, "chat_timeout")
    assert "'chat' queue" in r.json()["error"]["message"]  # the operator's setting, not our private one
    # What went to the workers: the conversation, the model and a key to answer on.
    sent = json.loads(redis.Redis.from_url(REDIS_URL).lpop(queue))
    body = json.loads(base64.b64decode(sent["body"]))[0][0]  # Celery's protocol 2: [args, kwargs, embed]
    assert body["job_id"] == str(job_id) and body["model"] == "base" and body["messages"] == ASK
    assert body["reply_to"].startswith("gatt:chat:reply:") and body["step"] is None
    redis.Redis.from_url(REDIS_URL).delete(queue)


def test_a_team_has_two_replies_waiting_at_most_and_a_rate_per_minute(chat_stack):
    url, app, queue = chat_stack
    tenant, other = make_tenant(app.state.sessionmaker), make_tenant(app.state.sessionmaker)
    job_id = succeeded_job(url, app, tenant)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = [pool.submit(post, url, tenant.key, job_id, {"messages": ASK}, timeout=10) for _ in range(2)]
        time.sleep(0.5)
        third = post(url, tenant.key, job_id, {"messages": ASK}, timeout=10)
        assert third.status_code == 429 and third.headers["Retry-After"] == "1", third.text
        assert "2 chat replies" in third.json()["error"]["message"]
        assert [f.result().status_code for f in first] == [504, 504]
    # Burst 5 at 3 a minute: three spent above, two more, then refused for ~20 s; another team is not.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        more = list(
            pool.map(lambda _: post(url, tenant.key, job_id, {"messages": ASK}, timeout=10), range(2))
        )
    assert [r.status_code for r in more] == [504, 504]
    refused = post(url, tenant.key, job_id, {"messages": ASK})
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "rate_limited")
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    other_job = succeeded_job(url, app, other)
    assert post(url, other.key, other_job, {"messages": ASK}, timeout=10).status_code == 504
    redis.Redis.from_url(REDIS_URL).delete(queue)
