"""GET /v1/jobs/{id}/stream live: the API as deployed (`uvicorn app.main:app`) follows a job that a
real `celery worker` runs; a client that drops the connection mid-job and reconnects with
`Last-Event-ID` sees every event exactly once, and the API listens (Postgres LISTEN) instead of
polling."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import text

from tests.app.factories import make_tenant
from tests.reliability.conftest import ROOT, Stack, free_port, start_api, tiny_config

pytestmark = pytest.mark.slow


def messages(response: httpx.Response) -> Iterator[dict[str, str]]:
    """Server-sent messages as they arrive (comments, the keep-alive pings, dropped)."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def test_a_client_reconnecting_mid_job_sees_every_event_once(stack: Stack) -> None:
    port = free_port()
    server = start_api(stack, port, stack.tmp / "api.log")
    tenant = make_tenant(stack.factory)
    timeout = httpx.Timeout(10, read=120)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=tenant.headers, timeout=timeout)
    try:
        lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)[:2]
        corpus = client.post("/v1/corpora", files={"file": ("c.jsonl", b"".join(lines))}).json()["id"]
        job_id = client.post("/v1/jobs", json={"corpus_id": corpus, "config": tiny_config()}).json()["id"]
        stack.start_worker()
        seen: list[int] = []  # event seqs
        steps: list[int] = []  # metric steps
        last_id = ""

        def take(message: dict[str, str]) -> None:
            nonlocal last_id
            last_id = message["id"]
            seq, step = (int(n) for n in last_id.split("."))
            if message["event"] == "job_event":
                seen.append(seq)
            else:
                steps.append(step)

        with client.stream("GET", f"/v1/jobs/{job_id}/stream") as first:
            assert first.status_code == 200
            for message in messages(first):
                take(message)
                if len(seen) == 3:  # "created", then what the worker writes: drop the connection
                    break
        assert stack.job(job_id).status.value == "running", "the job ended before the reconnect"
        with stack.factory() as s:  # the API process follows with one LISTEN connection
            listeners = s.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN gatt_job_events'")
            ).scalar()
        assert listeners == 1
        ended = None
        headers = {"Last-Event-ID": last_id}
        with client.stream("GET", f"/v1/jobs/{job_id}/stream", headers=headers) as second:
            for message in messages(second):
                if message["event"] == "end":
                    ended = json.loads(message["data"])["status"]
                    break
                take(message)
        assert ended == "succeeded"
        written = [e.seq for e in stack.events(job_id)]
        assert seen == written == list(range(1, len(written) + 1)), (seen, written)
        assert steps == stack.metric_steps(job_id) == [1, 2], steps
    finally:
        client.close()
        server.terminate()
        server.wait(30)
