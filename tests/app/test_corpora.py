from __future__ import annotations

import hashlib
import json
import uuid

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.models import Corpus, JobStatus
from tests.app.conftest import MAX_CORPUS_BYTES
from tests.app.factories import Tenant, count_rows, dialogue, jsonl, make_job, set_job_status

URL = "/v1/corpora"


def upload(
    client: TestClient, tenant: Tenant, data: bytes, name: str | None = None, filename: str = "chat.jsonl"
):
    form = {"name": name} if name is not None else None
    return client.post(
        URL, files={"file": (filename, data, "application/jsonl")}, data=form, headers=tenant.headers
    )


def test_upload_valid(client: TestClient, tenant: Tenant) -> None:
    data = jsonl(dialogue(0, turns=2), dialogue(1, system=None)) + b"\n"  # a trailing blank line is fine
    response = upload(client, tenant, data, name="my chats")
    assert response.status_code == 201, response.text
    corpus = response.json()
    assert corpus["name"] == "my chats"
    stats = corpus["stats"]
    assert stats["dialogues"] == 2 and stats["user_turns"] == 3 and stats["system_prompts"] == 1
    assert stats["estimated_tokens"] > 0

    got = client.get(f"{URL}/{corpus['id']}", headers=tenant.headers)
    assert got.status_code == 200 and got.json() == corpus
    assert "content" not in got.json()

    content = client.get(f"{URL}/{corpus['id']}/content", headers=tenant.headers)
    assert content.status_code == 200
    assert content.headers["content-type"].startswith("application/jsonl")
    assert int(content.headers["content-length"]) == corpus["bytes"] == len(content.content)
    assert hashlib.sha256(content.content).hexdigest() == corpus["sha256"]
    lines = content.content.decode().splitlines()
    assert [json.loads(line) for line in lines] == [dialogue(0, turns=2), dialogue(1, system=None)]


def test_name_defaults_to_the_file_name(client: TestClient, tenant: Tenant) -> None:
    response = upload(client, tenant, jsonl(dialogue()), filename="C:\\data\\support.jsonl")
    assert response.status_code == 201 and response.json()["name"] == "support.jsonl"


def test_content_download_of_a_large_corpus_in_chunks(
    client: TestClient, tenant: Tenant, db: sessionmaker[Session], monkeypatch
) -> None:
    from app.corpora import service

    monkeypatch.setattr(service, "CONTENT_CHUNK_BYTES", 1000)
    data = jsonl(*(dialogue(i, turns=3) for i in range(40)))
    corpus = upload(client, tenant, data).json()
    content = client.get(f"{URL}/{corpus['id']}/content", headers=tenant.headers).content
    assert len(content) == corpus["bytes"] > 5000
    assert hashlib.sha256(content).hexdigest() == corpus["sha256"]


def test_malformed_lines_listed_and_nothing_stored(
    client: TestClient, tenant: Tenant, db: sessionmaker[Session]
) -> None:
    good = json.dumps(dialogue(0)).encode()
    bad_json = b'{"messages": [}'
    bad_role = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}
    ).encode()
    typo = json.dumps({"mesages": []}).encode()
    data = b"\n".join([good, bad_json, b"", bad_role, typo]) + b"\n"
    response = upload(client, tenant, data)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_corpus"
    found = {(d["line"], d["field"], d["code"]) for d in error["details"]}
    assert (2, "", "invalid_json") in found
    assert (4, "messages[1].role", "unknown_role") in found
    assert (5, "mesages", "unknown_field") in found
    assert (5, "messages", "missing_field") in found
    assert all(d["line"] != 1 for d in error["details"])
    assert all(d["message"] for d in error["details"])
    assert count_rows(db, Corpus, tenant.team.id) == 0


def test_empty_and_not_utf8(client: TestClient, tenant: Tenant, db: sessionmaker[Session]) -> None:
    response = upload(client, tenant, b"")
    assert response.status_code == 422 and response.json()["error"]["details"][0]["code"] == "empty_corpus"
    response = upload(client, tenant, b'{"messages": "\xff"}\n')
    assert response.json()["error"]["details"][0]["code"] == "invalid_utf8"
    assert count_rows(db, Corpus, tenant.team.id) == 0


def corpus_of_size(size: int) -> bytes:
    """Valid JSONL of exactly `size` bytes (blank lines, which are allowed, pad it)."""
    data, i = b"", 0
    while len(data) + 400 < size:
        data += jsonl(dialogue(i))
        i += 1
    return data + b"\n" * (size - len(data))


def test_oversized_is_413_and_nothing_stored(
    client: TestClient, tenant: Tenant, db: sessionmaker[Session]
) -> None:
    response = upload(client, tenant, corpus_of_size(MAX_CORPUS_BYTES + 1))
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and error["param"] == "file"
    assert count_rows(db, Corpus, tenant.team.id) == 0
    # Exactly at the limit is accepted.
    assert upload(client, tenant, corpus_of_size(MAX_CORPUS_BYTES)).status_code == 201
    assert count_rows(db, Corpus, tenant.team.id) == 1


def test_whole_body_over_the_upload_limit(
    client: TestClient, tenant: Tenant, db: sessionmaker[Session]
) -> None:
    # A huge extra field is stopped by the body cap, not only by the file count.
    body = b"x" * (3 * MAX_CORPUS_BYTES)
    response = client.post(
        URL, content=body, headers={**tenant.headers, "Content-Type": "multipart/form-data; boundary=zz"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert count_rows(db, Corpus, tenant.team.id) == 0


def test_upload_needs_a_key_before_anything_else(client: TestClient) -> None:
    response = client.post(URL, files={"file": ("c.jsonl", b"x" * (2 * MAX_CORPUS_BYTES))})
    assert response.status_code == 401


def test_bad_forms(client: TestClient, tenant: Tenant) -> None:
    response = client.post(URL, json={"file": "x"}, headers=tenant.headers)
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"
    response = client.post(URL, data={"name": "x"}, files={"other": ("a", b"b")}, headers=tenant.headers)
    assert response.status_code == 422 and response.json()["error"]["param"] == "other"
    response = client.post(URL, files={"name": (None, b"only a name")}, headers=tenant.headers)
    assert response.status_code == 422 and response.json()["error"]["param"] == "file"
    response = client.post(URL, data={"name": "x"}, headers=tenant.headers)  # urlencoded
    assert response.status_code == 415
    response = client.post(
        URL,
        files={"name": (None, b"x" * 101), "file": ("c.jsonl", jsonl(dialogue()))},
        headers=tenant.headers,
    )
    assert response.status_code == 422 and response.json()["error"]["param"] == "name"


def test_other_teams_corpus_is_404(client: TestClient, tenant: Tenant, other_tenant: Tenant) -> None:
    corpus = upload(client, tenant, jsonl(dialogue())).json()
    for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        response = client.request(method, f"{URL}/{corpus['id']}{suffix}", headers=other_tenant.headers)
        assert response.status_code == 404, (method, suffix)
        assert response.json()["error"]["code"] == "not_found"
    assert client.get(URL, headers=other_tenant.headers).json()["data"] == []
    assert client.get(f"{URL}/{corpus['id']}", headers=tenant.headers).status_code == 200


def test_delete(client: TestClient, tenant: Tenant, db: sessionmaker[Session]) -> None:
    corpus = upload(client, tenant, jsonl(dialogue())).json()
    assert client.delete(f"{URL}/{corpus['id']}", headers=tenant.headers).status_code == 204
    for suffix in ("", "/content"):
        assert client.get(f"{URL}/{corpus['id']}{suffix}", headers=tenant.headers).status_code == 404
    assert client.get(URL, headers=tenant.headers).json()["data"] == []
    with db() as session:
        row = session.get(Corpus, uuid.UUID(corpus["id"]))
        assert row is not None and row.deleted_at is not None and row.content is None


def test_delete_refused_while_a_job_uses_it(
    client: TestClient, tenant: Tenant, db: sessionmaker[Session]
) -> None:
    corpus = upload(client, tenant, jsonl(dialogue())).json()
    job = make_job(db, tenant.team.id, uuid.UUID(corpus["id"]))
    for status in (JobStatus.QUEUED, JobStatus.RUNNING):
        set_job_status(db, job, status)
        response = client.delete(f"{URL}/{corpus['id']}", headers=tenant.headers)
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] == "in_use"
    set_job_status(db, job, JobStatus.FAILED)
    assert client.delete(f"{URL}/{corpus['id']}", headers=tenant.headers).status_code == 204
