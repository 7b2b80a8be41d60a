"""Redis, Postgres and the API restart while a job runs; the job still ends, and ends once.

The servers are the suite's private ones (see conftest), so restarting them disturbs no other test
run on the machine. The reaper is swept every few seconds meanwhile, as beat would, so that a job is
never left `running` by a dead run. Postgres is restarted for real (`pg_ctl restart -m fast`, which
cuts every connection); its connections are also cut one by one with `pg_terminate_backend`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from tests.app.factories import make_tenant
from tests.reliability.conftest import (
    ROOT,
    Stack,
    check_finished_job,
    create_job,
    free_port,
    start_api,
    tiny_config,
    wait_for,
)

pytestmark = pytest.mark.slow

START_TIMEOUT = 300
RUN_TIMEOUT = 600
REAP_EVERY = 3.0  # beat sweeps every max(5, lease/2) s; a little more often here to save time


def _stage(stack: Stack, job_id: str) -> str | None:
    stage = stack.job(job_id).stage
    return stage.value if stage is not None else None


def test_redis_restart_mid_job(stack: Stack) -> None:
    worker = stack.start_worker()
    # Rate limiting on: while Redis is down it must let requests through, not fail them.
    with TestClient(stack.app(rate_limit_per_s=50, rate_limit_burst=100)) as api:
        job_id, tenant = create_job(api, stack, tiny_config(training={"max_steps": 3}))
        wait_for(lambda: _stage(stack, job_id) == "sample", START_TIMEOUT, 0.05, "sampling to start")

        stack.redis.stop()  # no persistence: queued and unacknowledged messages are gone
        # The API keeps answering without Redis, and still accepts a job (its message cannot be sent).
        r = api.get(f"/v1/jobs/{job_id}", headers=tenant.headers)
        assert r.status_code == 200 and r.json()["status"] == "running", r.text
        # Two dialogues, like the first job: with one, both of its 24-token samples can be cut back to
        # too little to train on, and the job would fail with no_accepted_samples.
        second, _ = create_job(api, stack, tiny_config(training={"max_steps": 1}))
        assert stack.job(second).status.value == "queued"
        time.sleep(1.0)
        stack.redis.start()

        first = stack.wait_terminal(job_id, RUN_TIMEOUT, reap_every=REAP_EVERY)
        check_finished_job(stack, job_id, n_dialogues=2, steps=3)
        assert first.attempts == 1, "the running job never needed another worker"
        # The job whose message was lost is sent again by the reaper and runs on the same worker.
        stack.wait_terminal(second, RUN_TIMEOUT, reap_every=REAP_EVERY)
        check_finished_job(stack, second, n_dialogues=2, steps=1)
        assert stack.job(second).attempts == 1
        # Rate limiting is back on once Redis is: the bucket exists again.
        assert api.get(f"/v1/jobs/{job_id}", headers=tenant.headers).status_code == 200
    assert worker.alive(), "the worker process must survive a broker restart"
    assert len(stack.workers) == 1


def test_postgres_restart_mid_job(stack: Stack, api) -> None:
    steps = 6
    worker = stack.start_worker()
    job_id, tenant = create_job(api, stack, tiny_config(training={"max_steps": steps}))
    wait_for(lambda: _stage(stack, job_id) == "sample", START_TIMEOUT, 0.05, "sampling to start")
    stack.pg.restart(down_s=2.0)  # during sampling
    wait_for(lambda: stack.metric_steps(job_id), START_TIMEOUT, 0.05, "training to start")
    stack.pg.restart(down_s=2.0)  # during training: every step asks Postgres whether to stop

    job = stack.wait_terminal(job_id, RUN_TIMEOUT, reap_every=REAP_EVERY)
    check_finished_job(stack, job_id, n_dialogues=2, steps=steps)
    # The API's own pooled connections were cut too; it answers again without a restart.
    r = api.get(f"/v1/jobs/{job_id}", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["status"] == "succeeded"
    # The run felt the outage (a hook found Postgres down) and rode it out: one attempt, no takeover.
    assert "database unavailable, retrying" in worker.text()
    assert job.attempts == 1, "a brief Postgres outage must not cost the run"
    assert "worker_lost" not in [e.kind for e in stack.events(job_id)]
    assert worker.alive()


def _terminate_backends(stack: Stack) -> int:
    """Cut every connection to the stack's database but this one (the worker's and the API's)."""
    database = stack.settings.database_url.rsplit("/", 1)[1]
    with psycopg.connect(stack.pg.libpq("postgres"), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


def test_connections_cut_mid_job(stack: Stack, api) -> None:
    stack.start_worker()
    job_id, tenant = create_job(api, stack, tiny_config(training={"max_steps": 4}))
    wait_for(lambda: _stage(stack, job_id) is not None, START_TIMEOUT, 0.05, "the job to start")
    cuts = 0
    heartbeats = set()
    while stack.job(job_id).status.value == "running":
        cuts += _terminate_backends(stack)
        heartbeats.add(stack.job(job_id).heartbeat_at)
        time.sleep(0.5)
    assert cuts >= 5
    print(f"\nconnections cut while the job ran: {cuts}")
    # The heartbeat thread outlived the cuts: the lease kept being renewed.
    assert len(heartbeats) >= 3
    job = stack.wait_terminal(job_id, RUN_TIMEOUT, reap_every=REAP_EVERY)
    check_finished_job(stack, job_id, n_dialogues=2, steps=4)
    assert job.attempts == 1


def test_api_restart_while_a_client_polls(stack: Stack) -> None:
    stack.start_worker()
    port = free_port()
    log = stack.tmp / "api.log"
    server = start_api(stack, port, log)
    tenant = make_tenant(stack.factory)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=tenant.headers, timeout=10)
    try:
        lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)[:2]
        r = client.post("/v1/corpora", files={"file": ("c.jsonl", b"".join(lines))})
        assert r.status_code == 201, r.text
        body = {"corpus_id": r.json()["id"], "config": tiny_config(training={"max_steps": 3})}
        idem = {"Idempotency-Key": "reliability-restart"}
        created = client.post("/v1/jobs", json=body, headers=idem)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        order = ["queued", "running", "succeeded"]
        seen: list[str] = []
        failed_polls = 0
        restarts = 0
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            try:
                r = client.get(f"/v1/jobs/{job_id}")
            except httpx.TransportError:  # the API is down: a polling client retries
                failed_polls += 1
                time.sleep(0.2)
                continue
            assert r.status_code == 200, r.text
            job = r.json()
            assert job["id"] == job_id
            seen.append(job["status"])
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            if job["status"] == "running" and restarts == 0:
                # Crash the API (SIGKILL) mid-job, then start a new process on the same port.
                server.send_signal(signal.SIGKILL)
                server.wait(30)
                with pytest.raises(httpx.TransportError):  # what the client sees meanwhile
                    client.get(f"/v1/jobs/{job_id}")
                failed_polls += 1
                server = start_api(stack, port, log)
                restarts += 1
            time.sleep(0.3)
        assert restarts == 1 and failed_polls >= 1 and seen[-1] == "succeeded", (restarts, seen)
        # Status never went backwards across the restart.
        ranks = [order.index(s) for s in seen]
        assert ranks == sorted(ranks), seen
        # A graceful restart (SIGTERM) too: the new process answers with the same finished job.
        finished = client.get(f"/v1/jobs/{job_id}").json()
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert "Application shutdown complete" in log.read_text()
        server = start_api(stack, port, log)
        assert client.get(f"/v1/jobs/{job_id}").json() == finished
        # A client that retries its create after the restart gets the same job back, not a second one.
        again = client.post("/v1/jobs", json=body, headers=idem)
        assert (again.status_code, again.json()["id"]) == (200, job_id)
        check_finished_job(stack, job_id, n_dialogues=2, steps=3)
    finally:
        client.close()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    assert os.path.exists(log)
