"""GET /v1/jobs/{id} with ETag / If-None-Match: 304 while the job is unchanged, from a narrow read."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from service.models import JobStatus
from tests.app.factories import Tenant, dialogue, jsonl, make_job, set_job_status


@pytest.fixture
def job_id(client: TestClient, tenant: Tenant, db: sessionmaker[Session]) -> str:
    data = jsonl(dialogue(0, turns=2))
    r = client.post("/v1/corpora", files={"file": ("c.jsonl", data)}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    return str(make_job(db, tenant.team.id, r.json()["id"]))


def get(client: TestClient, tenant: Tenant, job_id: str, if_none_match: str | None = None):
    headers = dict(tenant.headers)
    if if_none_match is not None:
        headers["If-None-Match"] = if_none_match
    return client.get(f"/v1/jobs/{job_id}", headers=headers)


def test_unchanged_job_is_not_modified(client, tenant, job_id):
    first = get(client, tenant, job_id)
    assert first.status_code == 200, first.text
    etag = first.headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    assert get(client, tenant, job_id).headers["ETag"] == etag  # stable while nothing changes

    again = get(client, tenant, job_id, etag)
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["ETag"] == etag


@pytest.mark.parametrize("form", ["W/{etag}", '"other", {etag}', "*", " {etag} "])
def test_if_none_match_forms(client, tenant, job_id, form):
    etag = get(client, tenant, job_id).headers["ETag"]
    assert get(client, tenant, job_id, form.format(etag=etag)).status_code == 304


def test_other_etag_gets_the_job(client, tenant, job_id):
    etag = get(client, tenant, job_id).headers["ETag"]
    r = get(client, tenant, job_id, '"not-it"')
    assert r.status_code == 200
    assert r.json()["id"] == job_id
    assert r.headers["ETag"] == etag


def test_a_change_gives_a_new_etag(client, tenant, job_id, db):
    etag = get(client, tenant, job_id).headers["ETag"]
    set_job_status(db, job_id, JobStatus.RUNNING)
    r = get(client, tenant, job_id, etag)
    assert r.status_code == 200
    assert r.json()["status"] == "running"
    assert r.headers["ETag"] != etag
    assert get(client, tenant, job_id, r.headers["ETag"]).status_code == 304


def test_other_teams_and_unknown_jobs_are_404(client, tenant, other_tenant, job_id):
    etag = get(client, tenant, job_id).headers["ETag"]
    for tag in (etag, "*"):
        r = get(client, other_tenant, job_id, tag)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
    assert get(client, tenant, "00000000-0000-0000-0000-000000000000", "*").status_code == 404


def test_not_modified_reads_no_row(client, tenant, job_id, app: FastAPI):
    etag = get(client, tenant, job_id).headers["ETag"]
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        statements.append(statement)

    event.listen(app.state.engine, "before_cursor_execute", record)
    try:
        assert get(client, tenant, job_id, etag).status_code == 304
    finally:
        event.remove(app.state.engine, "before_cursor_execute", record)
    on_jobs = [s for s in statements if "FROM jobs" in s]
    assert len(on_jobs) == 1, statements
    assert on_jobs[0].split("FROM")[0].split() == ["SELECT", "jobs.updated_at,", "jobs.status,", "jobs.queue"]


def test_the_etag_header_is_declared_in_openapi(client):
    responses = client.get("/openapi.json").json()["paths"]["/v1/jobs/{job_id}"]["get"]["responses"]
    assert "ETag" in responses["200"]["headers"] and "ETag" in responses["304"]["headers"]
