"""Liveness is progress (workers/tasks.py `JobRun`): a job whose engine stops calling its hooks is
ended even though its worker process, and its heartbeat, live on; and a cancel reaches it.

Real `celery worker` processes on the private stack (conftest), each with a fault injected: its
engine hangs in sampling (`faults/sitecustomize.py`). Before, such a job stayed `running` for as
long as the process lived, its lease renewed every beat, and a cancel was never seen.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.conftest import Stack, create_job, tiny_config, wait_for

pytestmark = pytest.mark.slow
FAULTS = str(Path(__file__).parent / "faults")
START_TIMEOUT = 300


def _hanging_worker(stack: Stack, **env: str):
    return stack.start_worker(GATT_FAULT="hang_in_sampling", PYTHONPATH=FAULTS, **env)


def _sampling(stack: Stack, job_id: str) -> bool:
    job = stack.job(job_id)
    return job.stage is not None and job.stage.value == "sample"


def test_a_stalled_engine_ends_its_job_and_its_worker_process(stack: Stack, api) -> None:
    job_id, tenant = create_job(api, stack, tiny_config())
    worker = _hanging_worker(stack, GATT_STALL_TIMEOUT_S="5")
    wait_for(lambda: _sampling(stack, job_id), START_TIMEOUT, 0.1, "sampling to start")
    job = stack.wait_terminal(job_id, 60)
    assert (job.status.value, job.error_code) == ("failed", "stalled"), job.error_message
    assert "no progress for" in (job.error_message or "")
    assert [e.kind for e in stack.events(job_id)][-1] == "stalled"
    wait_for(lambda: worker.proc.poll() is not None, 30, 0.1, "the worker process to exit")
    body = api.get(f"/v1/jobs/{job_id}", headers=tenant.headers).json()
    assert body["error"]["code"] == "stalled"


def test_a_cancel_reaches_a_job_whose_engine_hangs(stack: Stack, api) -> None:
    job_id, tenant = create_job(api, stack, tiny_config())
    worker = _hanging_worker(stack)  # the default stall limit: half an hour
    wait_for(lambda: _sampling(stack, job_id), START_TIMEOUT, 0.1, "sampling to start")
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers).status_code == 200
    job = stack.wait_terminal(job_id, 60)  # within about a lease (6 s here), with no reaper
    assert job.status.value == "cancelled"
    assert [e.kind for e in stack.events(job_id)][-2:] == ["cancel_requested", "cancelled"]
    wait_for(lambda: worker.proc.poll() is not None, 30, 0.1, "the worker process to exit")
