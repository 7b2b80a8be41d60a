"""GET /v1/jobs/{id}/stream in process, on a job whose events are already written (the live case,
with a real worker and the API as a process, is tests/reliability/test_stream.py)."""

from __future__ import annotations

import json
import threading
import time
import uuid

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.embedded import create_embedded_app, create_key, open_database
from service.db import session_scope
from service.models import Job, JobStatus, Team
from service.repositories import jobs
from tests.app.factories import dialogue, jsonl, make_job, set_job_status


def parse_sse(text: str) -> list[dict[str, str]]:
    """The messages of an event stream (comments dropped), each as its fields."""
    messages = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = fields.get(name, "") + value.removeprefix(" ")
        if fields:
            messages.append(fields)
    return messages


def _ended_job(client, tenant, db) -> uuid.UUID:
    r = client.post("/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0)))}, headers=tenant.headers)
    job_id = make_job(db, tenant.team.id, uuid.UUID(r.json()["id"]))
    with session_scope(db) as s:
        jobs.add_event(s, job_id, "info", "stage", "stage happened", {"n": 1})
        for step in (1, 2):
            jobs.upsert_metric(s, job_id, step, {"loss": 1.0 / step})
        for kind in ("checkpoint", "succeeded"):
            jobs.add_event(s, job_id, "info", kind, f"{kind} happened", {"n": 1})
    set_job_status(db, job_id, JobStatus.SUCCEEDED)
    return job_id


def test_an_ended_jobs_stream_sends_its_events_then_end(client, tenant, db) -> None:
    job_id = _ended_job(client, tenant, db)
    r = client.get(f"/v1/jobs/{job_id}/stream", headers=tenant.headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    messages = parse_sse(r.text)
    assert [(m["event"], m["id"]) for m in messages] == [
        ("job_event", "1.0"),
        ("job_event", "2.0"),
        ("job_event", "3.0"),
        ("metric", "3.1"),
        ("metric", "3.2"),
        ("end", "3.2"),
    ]
    assert json.loads(messages[2]["data"])["kind"] == "succeeded"
    assert json.loads(messages[4]["data"])["values"] == {"loss": 0.5}
    assert json.loads(messages[5]["data"]) == {"status": "succeeded"}


def test_last_event_id_resumes_after_it(client, tenant, db) -> None:
    job_id = _ended_job(client, tenant, db)
    r = client.get(f"/v1/jobs/{job_id}/stream", headers={**tenant.headers, "Last-Event-ID": "2.1"})
    assert [m["id"] for m in parse_sse(r.text)] == ["3.1", "3.2", "3.2"]
    r = client.get(f"/v1/jobs/{job_id}/stream", headers={**tenant.headers, "Last-Event-ID": "3"})
    assert [m["id"] for m in parse_sse(r.text)] == ["3.1", "3.2", "3.2"]
    r = client.get(f"/v1/jobs/{job_id}/stream?after_seq=2&after_step=2", headers=tenant.headers)
    assert [m["id"] for m in parse_sse(r.text)] == ["3.2", "3.2"]
    for bad in ("x", "1.x", "-1", "99999999999"):
        r = client.get(f"/v1/jobs/{job_id}/stream", headers={**tenant.headers, "Last-Event-ID": bad})
        assert r.status_code == 422 and r.json()["error"]["param"] == "Last-Event-ID", bad


def test_another_teams_stream_is_404(client, tenant, other_tenant, db) -> None:
    job_id = _ended_job(client, tenant, db)
    assert client.get(f"/v1/jobs/{job_id}/stream", headers=other_tenant.headers).status_code == 404


def test_the_embedded_mode_streams_by_polling(tmp_path) -> None:
    """SQLite has no LISTEN: the feed wakes the stream each second, and a new event still arrives."""

    key = create_key(tmp_path, "team")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_embedded_app(tmp_path)) as client:
        corpus = client.post("/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0)))}, headers=headers)
        _, engine, factory = open_database(tmp_path)
        with session_scope(factory) as s:
            team_id = s.scalar(select(Team.id))
            job = Job(team_id=team_id, corpus_id=uuid.UUID(corpus.json()["id"]), config={}, model="default")
            job.status = JobStatus.RUNNING  # as if a worker ran it: no event yet
            s.add(job)
            s.flush()
            job_id = job.id

        def finish_later() -> None:
            time.sleep(1.5)
            with session_scope(factory) as s:
                jobs.add_event(s, job_id, "info", "succeeded", "done", None)
            set_job_status(factory, job_id, JobStatus.SUCCEEDED)

        threading.Thread(target=finish_later).start()
        with client.stream("GET", f"/v1/jobs/{job_id}/stream", headers=headers) as r:
            body = "".join(r.iter_text())
        engine.dispose()
    assert [(m["event"], m["id"]) for m in parse_sse(body)] == [("job_event", "1.0"), ("end", "1.0")]


def test_followers_of_one_job_share_one_read_per_event(client, tenant, db, database_url, monkeypatch) -> None:
    # Ten streams of one running job on the real Postgres LISTEN feed: each new event costs one
    # read, not ten, and every stream still gets every event.
    import asyncio

    from app.jobs import stream

    reads = []
    real_read = stream._read
    monkeypatch.setattr(stream, "_read", lambda *a: reads.append(a[2]) or real_read(*a))
    r = client.post("/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0)))}, headers=tenant.headers)
    job_id = make_job(db, tenant.team.id, uuid.UUID(r.json()["id"]))
    set_job_status(db, job_id, JobStatus.RUNNING)

    async def scenario() -> list[list[int]]:
        feed = stream.EventFeed(db, database_url)
        seen: list[list[int]] = [[] for _ in range(10)]

        async def follow(i: int) -> None:
            async for message in stream.job_events(feed, job_id, (0, 0)):
                if message.event == "job_event":
                    seen[i].append(json.loads(message.data)["seq"])
                if len(seen[i]) == 3:
                    return

        followers = [asyncio.create_task(follow(i)) for i in range(10)]
        while not feed.listening:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # every follower has read (nothing) and waits
        before = len(reads)
        for n in range(3):
            with session_scope(db) as s:
                jobs.add_event(s, job_id, "info", "step", f"step {n}", None)
            await asyncio.sleep(0.5)
        await asyncio.wait_for(asyncio.gather(*followers), 10)
        await feed.close()
        assert len(reads) - before <= 3 + 1, reads  # one per event (a late follower may read once more)
        return seen

    assert asyncio.run(scenario()) == [[1, 2, 3]] * 10
