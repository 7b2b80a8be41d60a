"""The API process sweeps for jobs whose worker vanished: no beat, no idle worker needed.

Beat's `jobs.reap` message waits on a queue until a worker takes it, and the documented deployment's
one worker is busy for as long as a job runs. Here no beat runs and nobody calls the reaper: the
service API process (`uvicorn app.main:app`, as deployed, sweeping every second) must requeue the
job of a worker killed mid-job, and a new worker must finish it.
"""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from service.queue import waiting_messages
from tests.app.factories import make_tenant
from tests.reliability.conftest import (
    LEASE_S,
    ROOT,
    Stack,
    free_port,
    sample_lines,
    start_api,
    tiny_config,
    wait_for,
)

pytestmark = pytest.mark.slow
START_TIMEOUT = 300
RUN_TIMEOUT = 600


def test_the_api_process_requeues_a_dead_workers_job(stack: Stack) -> None:
    port = free_port()
    server = start_api(stack, port, stack.tmp / "api.log", GATT_REAPER_INTERVAL_S="1")
    tenant = make_tenant(stack.factory)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=tenant.headers, timeout=10)
    try:
        lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)[:2]
        corpus = client.post("/v1/corpora", files={"file": ("c.jsonl", b"".join(lines))}).json()["id"]
        created = client.post("/v1/jobs", json={"corpus_id": corpus, "config": tiny_config()})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        first = stack.start_worker()
        path = stack.job_dir(stack.job(job_id)) / "samples.jsonl"
        wait_for(lambda: sample_lines(path), START_TIMEOUT, 0.05, "the first sampled dialogue")
        first.kill()
        stack.start_worker()
        job = stack.wait_terminal(job_id, RUN_TIMEOUT)  # no reap_every: only the API sweeps
        assert job.status.value == "succeeded" and job.attempts == 2
        assert [e.kind for e in stack.events(job_id)].count("worker_lost") == 1
    finally:
        client.close()
        server.terminate()
        server.wait(30)


def test_jobs_waiting_their_turn_are_not_sent_again_and_lost_messages_are(stack: Stack) -> None:
    """No worker: three jobs wait with their messages for two leases of sweeps (every second), and
    the queue stays at three messages (it grew by three per lease before). Then the messages are
    lost (as with a Redis restart without persistence): the next sweeps send three, once."""
    port = free_port()
    server = start_api(stack, port, stack.tmp / "api.log", GATT_REAPER_INTERVAL_S="1")
    tenant = make_tenant(stack.factory)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=tenant.headers, timeout=10)
    waiting = lambda: waiting_messages(stack.broker, stack.queue)  # noqa: E731
    try:
        lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)[:1]
        corpus = client.post("/v1/corpora", files={"file": ("c.jsonl", b"".join(lines))}).json()["id"]
        for _ in range(3):
            assert (
                client.post("/v1/jobs", json={"corpus_id": corpus, "config": tiny_config()}).status_code
                == 201
            )
        wait_for(lambda: waiting() == 3, 10, 0.1, "the three messages")
        time.sleep(2 * LEASE_S + 2)  # every job is stale twice over; the API swept about 14 times
        assert waiting() == 3
        redis.Redis.from_url(stack.redis.url).delete(stack.queue)
        wait_for(lambda: waiting() == 3, LEASE_S + 5, 0.1, "the lost messages sent again")
        time.sleep(LEASE_S + 2)
        assert waiting() == 3, "sent once, not once per sweep"
    finally:
        client.close()
        server.terminate()
        server.wait(30)
