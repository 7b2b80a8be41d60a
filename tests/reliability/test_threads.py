"""Torch threads per worker (workers/threads.py): each job slot gets its share of the cores it is
given, unless the operator chose; a real prefork worker with two slots hands that to its jobs."""

from __future__ import annotations

import os

import pytest

from tests.reliability.conftest import Stack, create_job, tiny_config
from workers.threads import job_slots, size_torch_threads, threads_per_job

CORES = len(os.sched_getaffinity(0))


def test_slots_share_the_cores() -> None:
    assert job_slots(4, "celery.concurrency.prefork", 8) == 4
    assert job_slots(4, "solo", 8) == 1, "the solo pool runs one job at a time"
    assert job_slots("auto", "prefork", 8) == 8
    assert [threads_per_job(8, s) for s in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_the_operator_chooses_first() -> None:
    env = {"GATT_TORCH_THREADS": "3", "OMP_NUM_THREADS": "7"}
    assert "3 per job" in size_torch_threads(2, "prefork", env) and env["OMP_NUM_THREADS"] == "3"
    env = {"OMP_NUM_THREADS": "7"}
    size_torch_threads(2, "prefork", env)
    assert env == {"OMP_NUM_THREADS": "7"}, "an OMP_NUM_THREADS already set is left alone"
    env = {}
    size_torch_threads(2, "prefork", env)
    assert env == {"OMP_NUM_THREADS": str(max(1, CORES // 2))}


@pytest.mark.slow
def test_a_prefork_worker_with_two_slots_gives_each_job_half_the_cores(stack: Stack, api) -> None:
    job_id, _ = create_job(api, stack, tiny_config(), n_dialogues=1)
    worker = stack.start_worker(pool="prefork", concurrency=2, OMP_NUM_THREADS="")
    stack.wait_terminal(job_id, 600)
    expected = max(1, CORES // 2)
    log = worker.text()
    assert f"torch threads: {expected} per job ({CORES} cores / 2 job slots)" in log, log[-3000:]
    assert f"job {job_id}: torch uses {expected} threads" in log, log[-3000:]
