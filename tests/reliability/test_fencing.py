"""A run that lost its job's lease writes nothing more (workers/tasks.py `JobRun`, the engine's
`fence` hook; tests/workers/test_training.py covers what training writes), and leases run on the
database's clock, not each host's. Real Postgres; the run is driven as the engine would drive it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import make_engine, make_sessionmaker, session_scope
from service.models import Corpus, Job
from service.repositories import jobs
from service.settings import Settings
from tests.app.factories import dialogue, jsonl, make_tenant
from workers.engine.hooks import Stopped
from workers.tasks import JobRun


def _queued_job(factory: sessionmaker[Session]) -> uuid.UUID:
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
        return job.id


def test_leases_are_written_on_the_databases_clock(database_url: str, monkeypatch) -> None:
    """A host whose clock runs ten minutes behind still writes a lease that lasts a lease."""
    factory = make_sessionmaker(make_engine(Settings(database_url=database_url)))
    job_id = _queued_job(factory)
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


def test_a_run_that_lost_its_lease_writes_no_row_and_stops(database_url: str) -> None:
    """A run taken over (its lease expired, another worker claimed the job) writes no event and no
    metric, and each hook tells the engine to stop, before its own heartbeat has even noticed."""
    settings = Settings(database_url=database_url)
    factory = make_sessionmaker(make_engine(settings))
    job_id = _queued_job(factory)
    with session_scope(factory) as s:
        assert jobs.claim(s, job_id, "first", 60.0) is not None
    run = JobRun(job_id, "first", settings, factory)
    run.event("info", "probe", "written while the lease is ours", {})
    run.metrics(1, {"loss": 1.0, "trained_tokens": 3.0})
    run.fence()
    with session_scope(factory) as s:  # the first worker froze past its lease; a second took over
        s.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=func.now() - timedelta(seconds=1))
        )
    with session_scope(factory) as s:
        assert jobs.claim(s, job_id, "second", 60.0) is not None
    for write in (
        lambda: run.event("info", "probe", "written after the takeover", {}),
        lambda: run.metrics(2, {"loss": 0.5, "trained_tokens": 3.0}),
        run.fence,
    ):
        with pytest.raises(Stopped):
            write()
    assert run.lost.is_set() and run.should_stop()
    with session_scope(factory) as s:
        events = [e.message for e in jobs.events(s, job_id, 0, 100)]
        steps = [m.step for m in jobs.metrics(s, job_id, 0, 100)]
    assert events == ["written while the lease is ours"] and steps == [1]


def test_events_a_team_reads_name_no_server_directory(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    settings = Settings(database_url=database_url, model_roots=[tmp_path / "models"])
    factory = make_sessionmaker(make_engine(settings))
    job_id = _queued_job(factory)
    with session_scope(factory) as s:
        assert jobs.claim(s, job_id, "run", 60.0) is not None
    JobRun(job_id, "run", settings, factory).event(
        "warning",
        "probe",
        f"read /srv/gatt/artifacts/t/j/corpus.jsonl and {tmp_path}/models/mine/config.json",
        {},
    )
    with session_scope(factory) as s:
        (event,) = jobs.events(s, job_id, 0, 10)
        assert event.message == "read …/corpus.jsonl and mine/config.json"


def test_a_write_is_tried_again_through_a_brief_database_outage(database_url: str) -> None:
    """What every hook write and the job's ending go through (workers/job_run.py `transaction`): a
    cut connection is tried again, anything else is raised at once."""
    from sqlalchemy.exc import OperationalError

    from workers.job_run import transaction

    factory = make_sessionmaker(make_engine(Settings(database_url=database_url)))
    calls = []

    def flaky(s: Session) -> int:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
        return int(s.scalar(select(func.count()).select_from(Job)) or 0) + 1

    assert transaction(factory, 5.0, flaky) >= 1 and len(calls) == 2

    def broken(s: Session) -> None:
        calls.append(1)
        raise ValueError("not a database outage")

    with pytest.raises(ValueError):
        transaction(factory, 5.0, broken)
    assert len(calls) == 3
