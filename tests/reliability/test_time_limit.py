"""Every job has a wall-clock limit (GATT_JOB_TIME_LIMIT_S, from its first start, over all attempts).

Real `celery worker` processes on the private stack (see conftest): a job past its limit ends
`failed` with `time_limit` at the engine's next should_stop; an attempt frozen past the limit (as
an engine stuck where it never asks should_stop) loses its lease, and the next worker to claim the
job ends it without running anything.
"""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from service.settings import Settings
from tests.reliability.conftest import Stack, create_job, sample_lines, tiny_config, wait_for
from workers.tasks import JobRun

pytestmark = pytest.mark.slow
START_TIMEOUT = 300
RUN_TIMEOUT = 600


def _ending(stack: Stack, job_id: str) -> tuple[str, str | None, list[str]]:
    job = stack.job(job_id)
    return job.status.value, job.error_code, [e.kind for e in stack.events(job_id)]


def test_a_job_past_its_time_limit_ends_failed(stack: Stack, api) -> None:
    job_id, tenant = create_job(api, stack, tiny_config())
    stack.start_worker(GATT_JOB_TIME_LIMIT_S="3")  # less than loading the model and sampling take
    stack.wait_terminal(job_id, RUN_TIMEOUT)
    status, code, kinds = _ending(stack, job_id)
    assert (status, code) == ("failed", "time_limit") and kinds[-1] == "time_limit", kinds
    job = api.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert job["error"]["code"] == "time_limit" and "3 s" in job["error"]["message"]
    assert job["attempts"] == 1


def test_an_attempt_frozen_past_the_limit_is_ended_by_the_next_claim(stack: Stack, api) -> None:
    job_id, _ = create_job(api, stack, tiny_config())
    # The default time limit (a day). Frozen inside a transaction, its session would hold the job's
    # row lock: Postgres ends it after 3 s here (GATT_DB_IDLE_IN_TRANSACTION_TIMEOUT_S, 60 s by default).
    first = stack.start_worker(GATT_DB_IDLE_IN_TRANSACTION_TIMEOUT_S="3")
    path = stack.job_dir(stack.job(job_id)) / "samples.jsonl"
    wait_for(lambda: sample_lines(path), START_TIMEOUT, 0.05, "the first sampled dialogue")
    os.kill(first.pid, signal.SIGSTOP)  # stuck: no heartbeat, no should_stop
    try:
        stack.wait_lease_expired(job_id)
        assert stack.reap() == 1
        stack.start_worker(GATT_JOB_TIME_LIMIT_S="5")  # the job has run longer than this by now
        stack.wait_terminal(job_id, RUN_TIMEOUT)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    status, code, kinds = _ending(stack, job_id)
    assert (status, code) == ("failed", "time_limit") and kinds[-1] == "time_limit", kinds
    assert stack.job(job_id).attempts == 2 and "resumed" not in kinds  # ended, not run again


def test_the_heartbeat_stops_renewing_an_engine_stuck_past_its_limit() -> None:
    # Past the limit by more than a lease, the engine has not stopped: the heartbeat returns (the
    # lease lapses) instead of renewing it for ever. No database is touched on the way out.
    settings = Settings(lease_s=0.2)
    run = JobRun(uuid.uuid4(), "owner", settings, factory=object(), seconds_left=-1.0)  # type: ignore[arg-type]
    run._beat()
    assert run.timed_out.is_set() and run.should_stop()
