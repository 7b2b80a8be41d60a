"""Webhooks end to end, every part real: the API under uvicorn (with its reaper), a `celery worker`
process on a private webhook queue, Postgres and Redis (GATT_TEST_REDIS_URL). A local receiver on
127.0.0.1 (allowed by the operator's allowlist, as it must be) gets each event and verifies its
Standard Webhooks signature. No job runs the model: jobs reach their endings through the API (a
cancel) or through the worker's own ending function (`end_run`), as a worker writes them."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from celery import Celery
from standardwebhooks import Webhook

from app.main import create_app
from app.reaper import reaping
from service import webhooks
from service.db import make_engine, make_sessionmaker, session_scope
from service.models import JobStatus
from service.repositories import jobs
from service.repositories import webhooks as webhook_rows
from service.settings import Settings
from tests.app.factories import dialogue, jsonl, make_job, make_tenant
from tests.servers import serving
from workers.job_run import end_run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("GATT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ALLOW = ["127.0.0.1/32"]


class Receiver(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []
    received: list[tuple[dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        code = Receiver.answers.pop(0) if Receiver.answers else 200
        Receiver.received.append((dict(self.headers), body))
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def stack(database_url, tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("webhooks")
    queue = f"webhooks-test-{uuid.uuid4().hex[:8]}"  # no other session's worker takes our deliveries
    common = {"database_url": database_url, "redis_url": REDIS_URL, "artifact_dir": tmp / "artifacts"}
    settings = Settings(
        **common,
        job_queue=f"gpu-unused-{uuid.uuid4().hex[:8]}",
        webhook_queue=queue,
        webhook_allow_hosts=ALLOW,
        webhook_backoff_s=1,
        lease_s=2,  # the reaper re-sends a delivery overdue by a lease
        rate_limit_per_s=0,
    )
    broker = Celery(broker=REDIS_URL)

    def send(delivery_id: uuid.UUID) -> None:
        broker.send_task("webhooks.deliver", args=[str(delivery_id)], queue=queue)

    app = create_app(settings, enqueue=lambda _: None, send_webhook_delivery=send, lifespan=reaping(1.0))
    env = {
        **os.environ,
        "GATT_DATABASE_URL": database_url,
        "GATT_REDIS_URL": REDIS_URL,
        "GATT_ARTIFACT_DIR": str(tmp / "artifacts"),
        "GATT_WEBHOOK_QUEUE": queue,
        "GATT_WEBHOOK_ALLOW_HOSTS": json.dumps(ALLOW),
        "GATT_WEBHOOK_BACKOFF_S": "1",
    }
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    log = open(tmp / "worker.log", "w")  # noqa: SIM115 - closed in the finally below
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", queue, "--pool", "solo",
         "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    # What a worker's sessions are: its transactions' deliveries are sent once they commit.
    engine = make_engine(settings)
    worker_sessions = make_sessionmaker(engine)
    webhooks.send_after_commit(worker_sessions, send)
    try:
        with serving(app) as port:
            yield {
                "api": f"http://127.0.0.1:{port}",
                "hook_url": f"http://127.0.0.1:{receiver.server_address[1]}/gatt",
                "settings": settings,
                "app": app,
                "worker_sessions": worker_sessions,
            }
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        receiver.shutdown()
        engine.dispose()
        log.close()
        print((tmp / "worker.log").read_text()[-3000:])


def _setup(stack, types):
    tenant = make_tenant(stack["app"].state.sessionmaker)
    api = httpx.Client(base_url=stack["api"], headers=tenant.headers, timeout=30)
    r = api.post("/v1/webhooks", json={"url": stack["hook_url"], "event_types": types})
    assert r.status_code == 201, r.text
    corpus = api.post("/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0)))}).json()["id"]
    return tenant, api, r.json(), corpus


def _received(event_type: str, job_id: str, timeout: float = 60) -> list[tuple[dict, bytes]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = [(h, b) for h, b in Receiver.received if json.loads(b)["data"]["job_id"] == job_id]
        if any(json.loads(b)["type"] == event_type for _, b in got):
            return got
        time.sleep(0.2)
    pytest.fail(f"no {event_type} for job {job_id}; received {Receiver.received}")


def test_a_cancelled_job_is_announced_signed_to_the_local_receiver(stack):
    tenant, api, hook, corpus = _setup(stack, ["job.cancelled", "job.succeeded"])
    job_id = str(make_job(stack["app"].state.sessionmaker, tenant.team.id, uuid.UUID(corpus)))
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    [(headers, body)] = _received("job.cancelled", job_id)
    event = Webhook(hook["secret"]).verify(body, headers)  # raises unless signed with our secret
    assert event["type"] == "job.cancelled" and event["data"]["status"] == "cancelled"
    assert headers["webhook-id"].startswith("msg_")
    with pytest.raises(Exception, match="signature"):
        Webhook(webhooks.new_secret()).verify(body, headers)
    log = api.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"]
    assert log[0]["event_id"] == headers["webhook-id"] and log[0]["status"] in ("delivered", "pending")


def test_a_refused_attempt_is_retried_with_the_same_event_id(stack):
    tenant, api, hook, corpus = _setup(stack, ["job.succeeded"])
    job_id = make_job(stack["app"].state.sessionmaker, tenant.team.id, uuid.UUID(corpus))
    with session_scope(stack["worker_sessions"]) as s:
        assert jobs.claim(s, job_id, "w-e2e", 60) is not None
    Receiver.answers = [503]
    # The worker's own ending of a run, in the worker's kind of sessions.
    end_run(stack["worker_sessions"], 60, job_id, "w-e2e", JobStatus.SUCCEEDED, "succeeded", "job succeeded")
    deadline = time.monotonic() + 60
    while len([1 for h, b in Receiver.received if json.loads(b)["data"]["job_id"] == str(job_id)]) < 2:
        assert time.monotonic() < deadline, Receiver.received
        time.sleep(0.2)
    (h1, b1), (h2, b2) = [
        (h, b) for h, b in Receiver.received if json.loads(b)["data"]["job_id"] == str(job_id)
    ]
    assert h1["webhook-id"] == h2["webhook-id"] and b1 == b2
    assert Webhook(hook["secret"]).verify(b2, h2)["data"]["status"] == "succeeded"
    deadline = time.monotonic() + 20
    while (entry := api.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["data"][0])[
        "status"
    ] != "delivered":
        assert time.monotonic() < deadline, entry
        time.sleep(0.2)
    assert entry["attempts"] == 2 and entry["last_status_code"] == 200 and entry["delivered_at"]


def test_a_delivery_whose_message_was_lost_is_sent_by_the_reaper(stack):
    tenant, api, hook, corpus = _setup(stack, ["job.failed"])
    factory = stack["app"].state.sessionmaker
    job_id = make_job(factory, tenant.team.id, uuid.UUID(corpus))
    # A session that sends nothing after its commit: as if Redis had been down then.
    lost = make_sessionmaker(factory.kw["bind"])
    with session_scope(lost) as s:
        assert jobs.claim(s, job_id, "w-lost", 60) is not None
        assert jobs.finish(s, job_id, "w-lost", JobStatus.FAILED, error_code="boom", error_message="x")
        assert s.info.get(webhook_rows.PENDING_KEY)
    [(headers, body)] = _received("job.failed", str(job_id), timeout=60)
    assert Webhook(hook["secret"]).verify(body, headers)["data"]["error"]["code"] == "boom"
