"""Per-team quotas (app/core/quotas.py): one team cannot fill the queue or the database, nothing is
stored past a quota, and another team is not affected. Real Postgres, the app in process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from service.models import Corpus, InstructionSet
from service.settings import Settings
from tests.app.factories import Tenant, count_rows, dialogue, jsonl, make_tenant

CORPUS = jsonl(dialogue(0), dialogue(1))  # stored as it is (already normalized): 328 bytes
SMALL = jsonl(dialogue(0))  # 164 bytes
LIMIT = 2 * len(CORPUS) + len(SMALL)


@pytest.fixture(scope="module")
def client(database_url: str) -> Iterator[TestClient]:
    settings = Settings(
        database_url=database_url,
        rate_limit_per_s=0,
        team_max_active_jobs=2,
        team_max_corpora=3,
        team_max_corpus_bytes=LIMIT,
        team_max_instruction_sets=2,
    )
    with TestClient(create_app(settings, enqueue=lambda _: None)) as c:
        yield c


@pytest.fixture
def tenant(client: TestClient) -> Tenant:
    return make_tenant(client.app.state.sessionmaker)  # type: ignore[attr-defined]


def _corpus(client: TestClient, tenant: Tenant, content: bytes = CORPUS):
    return client.post("/v1/corpora", headers=tenant.headers, files={"file": ("c.jsonl", content)})


def _job(client: TestClient, tenant: Tenant, corpus_id: str):
    return client.post("/v1/jobs", headers=tenant.headers, json={"corpus_id": corpus_id, "config": {}})


def _quota(response) -> dict:
    error = response.json()["error"]
    assert error["code"] == "quota_exceeded", response.text
    (detail,) = error["details"]
    return detail


def test_active_jobs_are_capped_per_team_and_free_up_when_a_job_ends(client: TestClient, tenant: Tenant):
    corpus = _corpus(client, tenant).json()["id"]
    first, second = _job(client, tenant, corpus), _job(client, tenant, corpus)
    assert first.status_code == second.status_code == 201
    refused = _job(client, tenant, corpus)
    assert refused.status_code == 429
    assert _quota(refused) == {"quota": "active_jobs", "limit": 2, "used": 2}
    listed = client.get("/v1/jobs", headers=tenant.headers).json()["data"]
    assert len(listed) == 2, "the refused job was not stored"
    # Another team is not affected by this one's full queue.
    other = make_tenant(client.app.state.sessionmaker)  # type: ignore[attr-defined]
    assert _job(client, other, _corpus(client, other).json()["id"]).status_code == 201
    # A cancelled job no longer counts.
    client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=tenant.headers)
    assert _job(client, tenant, corpus).status_code == 201


def test_an_idempotent_retry_is_answered_even_at_the_quota(client: TestClient, tenant: Tenant):
    corpus = _corpus(client, tenant).json()["id"]
    key = {"Idempotency-Key": "same"}
    body = {"corpus_id": corpus, "config": {}}
    first = client.post("/v1/jobs", headers={**tenant.headers, **key}, json=body)
    assert _job(client, tenant, corpus).status_code == 201
    retry = client.post("/v1/jobs", headers={**tenant.headers, **key}, json=body)
    assert retry.status_code == 200 and retry.json()["id"] == first.json()["id"]


def test_corpora_are_capped_by_bytes_and_count(client: TestClient, tenant: Tenant):
    db = client.app.state.sessionmaker  # type: ignore[attr-defined]
    assert _corpus(client, tenant).status_code == 201
    assert _corpus(client, tenant).status_code == 201
    refused = _corpus(client, tenant)  # a third would take 3 x 328 bytes, past 820
    assert refused.status_code == 422
    assert _quota(refused) == {"quota": "corpus_bytes", "limit": LIMIT, "used": 2 * len(CORPUS)}
    assert count_rows(db, Corpus, tenant.team.id) == 2, "nothing stored past the quota"
    assert _corpus(client, tenant, SMALL).status_code == 201, "a smaller one still fits, exactly"
    refused = _corpus(client, tenant, jsonl({"id": "x", "messages": [{"role": "user", "content": "q"}]}))
    assert refused.status_code == 422 and _quota(refused) == {"quota": "corpora", "limit": 3, "used": 3}
    # Deleting one frees its count and its bytes.
    victim = client.get("/v1/corpora", headers=tenant.headers).json()["data"][0]["id"]
    assert client.delete(f"/v1/corpora/{victim}", headers=tenant.headers).status_code == 204
    assert _corpus(client, tenant, SMALL).status_code == 201


def test_instruction_sets_are_capped(client: TestClient, tenant: Tenant):
    db = client.app.state.sessionmaker  # type: ignore[attr-defined]
    spec = client.get("/v1/instruction-sets/default", headers=tenant.headers).json()["spec"]
    for _ in range(2):
        made = client.post("/v1/instruction-sets", headers=tenant.headers, json={"name": "s", "spec": spec})
        assert made.status_code == 201
    refused = client.post("/v1/instruction-sets", headers=tenant.headers, json={"name": "s", "spec": spec})
    assert refused.status_code == 422
    assert _quota(refused) == {"quota": "instruction_sets", "limit": 2, "used": 2}
    assert count_rows(db, InstructionSet, tenant.team.id) == 2


def test_a_job_that_could_generate_too_much_is_refused_before_it_is_queued(database_url: str) -> None:
    settings = Settings(database_url=database_url, rate_limit_per_s=0, max_job_generated_tokens=10_000)
    with TestClient(create_app(settings, enqueue=lambda _: None)) as c:
        tenant = make_tenant(c.app.state.sessionmaker)  # type: ignore[attr-defined]
        corpus = _corpus(c, tenant).json()["id"]  # 2 dialogues of 1 turn
        small = {"sampling": {"k": 2, "max_new_tokens": 100}}  # 2 turns x 2 x 100 = 400 tokens
        made = c.post("/v1/jobs", headers=tenant.headers, json={"corpus_id": corpus, "config": small})
        assert made.status_code == 201 and made.json()["estimate"]["generated_tokens"] == 400
        large = {"sampling": {"k": 64, "max_new_tokens": 100}}  # 12,800
        refused = c.post("/v1/jobs", headers=tenant.headers, json={"corpus_id": corpus, "config": large})
        assert refused.status_code == 422
        error = refused.json()["error"]
        assert error["code"] == "job_too_large" and error["param"] == "config"
        assert error["details"] == [
            {
                "estimate": {
                    "sampled_turns": 2,
                    "sampling_tokens": 12_800,
                    "evaluation_tokens": 0,
                    "values_tokens": 0,
                    "generated_tokens": 12_800,
                },
                "limit": 10_000,
            }
        ]
        assert len(c.get("/v1/jobs", headers=tenant.headers).json()["data"]) == 1, "nothing stored"


def test_job_artifacts_are_capped_and_deleting_a_finished_job_frees_them(database_url: str, tmp_path) -> None:
    """The store's bytes are what each job's worker counted (workers/job_run.py; the end-to-end test
    checks that count against the files); here they are set on the rows, as a worker writes them."""
    from sqlalchemy import update

    from service.db import session_scope
    from service.models import Job, JobStatus

    settings = Settings(
        database_url=database_url, rate_limit_per_s=0, artifact_dir=tmp_path, team_max_artifact_bytes=1000
    )
    with TestClient(create_app(settings, enqueue=lambda _: None)) as c:
        db = c.app.state.sessionmaker  # type: ignore[attr-defined]
        tenant, other = make_tenant(db), make_tenant(db)
        corpus = _corpus(c, tenant).json()["id"]
        first, second = (_job(c, tenant, corpus).json()["id"] for _ in range(2))
        with session_scope(db) as s:
            s.execute(
                update(Job).where(Job.id == first).values(status=JobStatus.SUCCEEDED, artifact_bytes=600)
            )
            s.execute(update(Job).where(Job.id == second).values(status=JobStatus.FAILED, artifact_bytes=400))
        (tmp_path / str(tenant.team.id) / first / "train").mkdir(parents=True)
        (tmp_path / str(tenant.team.id) / first / "train" / "weights.safetensors").write_bytes(b"w" * 600)
        shown = c.get(f"/v1/jobs/{first}", headers=tenant.headers).json()
        assert shown["artifact_bytes"] == 600

        refused = _job(c, tenant, corpus)
        assert refused.status_code == 422
        assert _quota(refused) == {"quota": "artifact_bytes", "limit": 1000, "used": 1000}
        assert _job(c, other, _corpus(c, other).json()["id"]).status_code == 201  # another team's room

        assert c.delete(f"/v1/jobs/{first}", headers=other.headers).status_code == 404
        assert c.delete(f"/v1/jobs/{first}", headers=tenant.headers).status_code == 204
        assert not (tmp_path / str(tenant.team.id) / first).exists()
        assert c.get(f"/v1/jobs/{first}", headers=tenant.headers).status_code == 404
        assert c.get(f"/v1/jobs/{first}/events", headers=tenant.headers).status_code == 404
        assert _job(c, tenant, corpus).status_code == 201, "room again"


def test_a_job_is_deleted_only_once_it_has_ended_and_nothing_continues_it(
    database_url: str, tmp_path
) -> None:
    from sqlalchemy import update

    from service.db import session_scope
    from service.models import Checkpoint, Job, JobStatus

    settings = Settings(database_url=database_url, rate_limit_per_s=0, artifact_dir=tmp_path)
    with TestClient(create_app(settings, enqueue=lambda _: None)) as c:
        db = c.app.state.sessionmaker  # type: ignore[attr-defined]
        tenant = make_tenant(db)
        corpus = _corpus(c, tenant).json()["id"]
        parent = _job(c, tenant, corpus).json()["id"]
        active = c.delete(f"/v1/jobs/{parent}", headers=tenant.headers)
        assert active.status_code == 409 and active.json()["error"]["code"] == "job_active"
        with session_scope(db) as s:
            s.execute(update(Job).where(Job.id == parent).values(status=JobStatus.SUCCEEDED))
            s.add(Checkpoint(job_id=parent, step=1, path="x/step-000001", manifest={}))
        child = c.post(
            "/v1/jobs", headers=tenant.headers, json={"corpus_id": corpus, "model": {"job_id": parent}}
        ).json()["id"]
        in_use = c.delete(f"/v1/jobs/{parent}", headers=tenant.headers)
        assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "in_use"
        c.post(f"/v1/jobs/{child}/cancel", headers=tenant.headers)
        assert c.delete(f"/v1/jobs/{parent}", headers=tenant.headers).status_code == 204
        assert c.get(f"/v1/jobs/{child}", headers=tenant.headers).json()["parent_checkpoint"] is None
