"""GET /v1/jobs/{id}/stream in process, on a job whose events are already written (the live case,
with a real worker and the API as a process, is tests/reliability/test_stream.py)."""

from __future__ import annotations

import json
import uuid

from service.db import session_scope
from service.models import JobStatus
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
        for kind in ("stage", "checkpoint", "succeeded"):
            jobs.add_event(s, job_id, "info", kind, f"{kind} happened", {"n": 1})
    set_job_status(db, job_id, JobStatus.SUCCEEDED)
    return job_id


def test_an_ended_jobs_stream_sends_its_events_then_end(client, tenant, db) -> None:
    job_id = _ended_job(client, tenant, db)
    r = client.get(f"/v1/jobs/{job_id}/stream", headers=tenant.headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    messages = parse_sse(r.text)
    assert [(m["event"], m["id"]) for m in messages] == [
        ("job_event", "1"),
        ("job_event", "2"),
        ("job_event", "3"),
        ("end", "3"),
    ]
    assert json.loads(messages[2]["data"])["kind"] == "succeeded"
    assert json.loads(messages[3]["data"]) == {"status": "succeeded"}


def test_last_event_id_resumes_after_it(client, tenant, db) -> None:
    job_id = _ended_job(client, tenant, db)
    r = client.get(f"/v1/jobs/{job_id}/stream", headers={**tenant.headers, "Last-Event-ID": "2"})
    assert [m["id"] for m in parse_sse(r.text)] == ["3", "3"]
    r = client.get(f"/v1/jobs/{job_id}/stream?after_seq=1", headers=tenant.headers)
    assert [m["id"] for m in parse_sse(r.text)] == ["2", "3", "3"]
    bad = client.get(f"/v1/jobs/{job_id}/stream", headers={**tenant.headers, "Last-Event-ID": "x"})
    assert bad.status_code == 422


def test_another_teams_stream_is_404(client, tenant, other_tenant, db) -> None:
    job_id = _ended_job(client, tenant, db)
    assert client.get(f"/v1/jobs/{job_id}/stream", headers=other_tenant.headers).status_code == 404
