"""Fair shares across teams (service/scheduling.py): one team's queued backlog does not hold back
another team's job, and each queued job shows its expected position.

Real Postgres; the first test drives `scheduling.claim` as workers would, the second runs a real
`celery worker` on the private stack (conftest) over jobs sent in the order teams created them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from service import scheduling
from service.db import session_scope
from service.settings import Settings
from tests.app.factories import Tenant, dialogue, jsonl, make_tenant
from tests.reliability.conftest import Stack, tiny_config, upload_corpus


@pytest.fixture
def client(database_url: str) -> Iterator[TestClient]:
    # A queue of its own: the shared test database holds other tests' jobs on other queues.
    settings = Settings(
        database_url=database_url, rate_limit_per_s=0, job_queue=f"fair-{uuid.uuid4().hex[:8]}"
    )
    with TestClient(create_app(settings, enqueue=lambda _: None)) as c:
        yield c


def _jobs(client: TestClient, tenant: Tenant, n: int) -> list[str]:
    corpus = client.post("/v1/corpora", headers=tenant.headers, files={"file": ("c", jsonl(dialogue(0)))})
    ids = []
    for _ in range(n):
        r = client.post(
            "/v1/jobs", headers=tenant.headers, json={"corpus_id": corpus.json()["id"], "config": {}}
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def test_round_robin_over_teams_with_positions_on_the_jobs(client: TestClient) -> None:
    factory = client.app.state.sessionmaker  # type: ignore[attr-defined]
    queue = client.app.state.settings.job_queue  # type: ignore[attr-defined]
    a, b, c = (make_tenant(factory) for _ in range(3))
    a1, a2, a3 = _jobs(client, a, 3)
    (b1,) = _jobs(client, b, 1)
    (c1,) = _jobs(client, c, 1)
    owner = {a1: a, a2: a, a3: a, b1: b, c1: c}

    def position(job: str) -> int | None:
        return client.get(f"/v1/jobs/{job}", headers=owner[job].headers).json()["queue_position"]

    def start(message_for: str) -> str | None:
        with session_scope(factory) as s:
            job = scheduling.claim(s, uuid.UUID(message_for), "test-worker", 60.0, queue)
            return str(job.id) if job is not None else None

    # Nobody has run anything: teams in the order of their first job, each team's oldest first.
    assert [position(j) for j in (a1, b1, c1, a2, a3)] == [0, 1, 2, 3, 4]
    etag = client.get(f"/v1/jobs/{b1}", headers=b.headers).headers["ETag"]
    # Whichever job a message names, the fairest queued job starts.
    assert start(a3) == a1
    assert position(a1) is None
    assert [position(j) for j in (b1, c1, a2, a3)] == [0, 1, 2, 3]
    moved = client.get(f"/v1/jobs/{b1}", headers={**b.headers, "If-None-Match": etag})
    assert moved.status_code == 200, "a queued job's ETag changes with its position"
    assert start(a2) == b1  # team A has a job running: B's one job does not wait behind A's backlog
    assert start(a3) == c1
    # A message whose own job already runs still starts a job: every team now runs one, and A
    # started least recently.
    assert start(b1) == a2
    assert start(c1) == a3
    assert start(a1) is None  # nothing left
    listed = client.get("/v1/jobs", headers=a.headers).json()["data"]
    assert {j["status"] for j in listed} == {"running"} and {j["queue_position"] for j in listed} == {None}


@pytest.mark.slow
def test_a_worker_starts_one_teams_job_between_anothers_backlog(stack: Stack, api: TestClient) -> None:
    a, b = make_tenant(stack.factory), make_tenant(stack.factory)
    corpus_a, corpus_b = upload_corpus(api, a, 1), upload_corpus(api, b, 1)

    def create(tenant: Tenant, corpus: str) -> str:
        r = api.post("/v1/jobs", json={"corpus_id": corpus, "config": tiny_config()}, headers=tenant.headers)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    # Messages reach the queue in this order: A's three jobs, then B's one.
    jobs = [create(a, corpus_a) for _ in range(3)] + [create(b, corpus_b)]
    assert api.get(f"/v1/jobs/{jobs[3]}", headers=b.headers).json()["queue_position"] == 1
    # One worker; each job stops at its 3 s time limit, long enough to be seen starting.
    stack.start_worker(GATT_JOB_TIME_LIMIT_S="3")
    for job in jobs:
        stack.wait_terminal(job, 600)
    started = sorted(jobs, key=lambda j: stack.job(j).started_at)
    assert started == [jobs[0], jobs[3], jobs[1], jobs[2]], "B's job ran second, not fourth"
