"""A run that lost its job's lease writes nothing more (workers/tasks.py `JobRun`, the engine's
`fence` hook), and leases run on the database's clock, not each host's.

The fencing test freezes a real worker (SIGSTOP) while it samples, lets a second worker take the
job over and finish it, then thaws the first: it wakes up in the middle of a chunk whose dialogue
the second already sampled, and must neither append it, nor write an event or a metric.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import pytest
from sqlalchemy import select

from service.db import make_engine, make_sessionmaker, session_scope
from service.models import Corpus, Job
from service.repositories import jobs
from service.settings import Settings
from tests.app.factories import dialogue, jsonl, make_tenant
from tests.reliability.conftest import (
    Stack,
    check_finished_job,
    create_job,
    sample_lines,
    tiny_config,
    wait_for,
)

START_TIMEOUT = 300
RUN_TIMEOUT = 600


def test_leases_are_written_on_the_databases_clock(database_url: str, monkeypatch) -> None:
    """A host whose clock runs ten minutes behind still writes a lease that lasts a lease."""
    factory = make_sessionmaker(make_engine(Settings(database_url=database_url)))
    tenant = make_tenant(factory)
    with session_scope(factory) as s:
        content = jsonl(dialogue(0))
        corpus = Corpus(
            team_id=tenant.team.id,
            name="c",
            content=content,
            size_bytes=len(content),
            stats={},
            sha256="0" * 64,
        )
        s.add(corpus)
        s.flush()
        job = Job(team_id=tenant.team.id, corpus_id=corpus.id, config={}, model="default")
        s.add(job)
        s.flush()
        job_id = job.id
    behind = jobs.now() - timedelta(minutes=10)
    monkeypatch.setattr(jobs, "now", lambda: behind)
    with session_scope(factory) as s:
        assert jobs.claim(s, job_id, "slow-clock-host", 60.0) is not None
    with session_scope(factory) as s:
        expires = s.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
        left = expires - jobs.current_time(s)
        # On the host's clock it would have expired nine minutes ago, and the reaper would take a
        # live job from its worker.
        assert timedelta(seconds=55) < left <= timedelta(seconds=60), left


@pytest.mark.slow
def test_a_run_taken_over_while_frozen_writes_nothing_when_it_wakes(stack: Stack, api) -> None:
    job_id, _ = create_job(api, stack, tiny_config(data={"max_dialogues": 3}), n_dialogues=3)
    path = stack.job_dir(stack.job(job_id)) / "samples.jsonl"
    # Frozen inside a transaction, its session would hold the job's row: Postgres ends it after 3 s.
    first = stack.start_worker(GATT_DB_IDLE_IN_TRANSACTION_TIMEOUT_S="3")
    wait_for(lambda: sample_lines(path), START_TIMEOUT, 0.02, "the first sampled dialogue")
    os.kill(first.pid, signal.SIGSTOP)  # in the middle of the next dialogue
    try:
        stack.wait_lease_expired(job_id)
        assert stack.reap() == 1
        stack.start_worker()
        stack.wait_terminal(job_id, RUN_TIMEOUT)
        finished = check_finished_job(stack, job_id, n_dialogues=3, steps=2)
        samples, events = path.read_bytes(), [e.seq for e in finished["events"]]
        metric_steps = stack.metric_steps(job_id)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    wait_for(lambda: "lease lost" in first.text(), 120, 0.2, "the thawed worker to stop")
    assert path.read_bytes() == samples, "the thawed run appended to samples.jsonl"
    assert [e.seq for e in stack.events(job_id)] == events, "the thawed run wrote an event"
    assert stack.metric_steps(job_id) == metric_steps
    assert stack.job(job_id).status.value == "succeeded"
