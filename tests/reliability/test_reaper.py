"""The API process sweeps for jobs whose worker vanished: no beat, no idle worker needed.

Beat's `jobs.reap` message waits on a queue until a worker takes it, and the documented deployment's
one worker is busy for as long as a job runs. Here no beat runs and nobody calls the reaper: the
service API process (`uvicorn app.main:app`, as deployed, sweeping every second) must requeue the
job of a worker killed mid-job, and a new worker must finish it.
"""

from __future__ import annotations

import httpx
import pytest

from tests.app.factories import make_tenant
from tests.reliability.conftest import ROOT, Stack, free_port, sample_lines, start_api, tiny_config, wait_for

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
