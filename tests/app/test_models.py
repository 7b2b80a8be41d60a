"""`/v1/models` and a job's `model`: ids, never paths; a team's own checkpoint as a base.

The API on the real Postgres with a model root holding real (tiny) model directories; no worker
runs here (tests/e2e/test_service_e2e.py trains on a dropped-in model and continues a checkpoint)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.main import create_app
from service.db import session_scope
from service.models import Checkpoint
from service.models.job import JobStatus
from service.settings import Settings
from tests.app.factories import Tenant, dialogue, jsonl, make_tenant, set_job_status
from tests.model_dirs import write_model


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("roots") / "models"
    write_model(root / "chat")
    write_model(root / "org" / "llama3-chat", "llama3")
    write_model(root / "no-template")
    (root / "no-template" / "chat_template.jinja").unlink()
    return root


@pytest.fixture(scope="module")
def api(database_url: str, root: Path) -> Iterator[tuple[TestClient, sessionmaker[Session]]]:
    app = create_app(Settings(database_url=database_url, model_roots=[root]), enqueue=lambda _: None)
    with TestClient(app) as client:
        yield client, app.state.sessionmaker


@pytest.fixture
def tenant(api) -> Tenant:
    return make_tenant(api[1])


@pytest.fixture
def corpus(api, tenant) -> str:
    r = api[0].post(
        "/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0), dialogue(1)))}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_models_are_listed_by_id_with_what_training_will_use(api, tenant, root) -> None:
    client, _ = api
    r = client.get("/v1/models", headers=tenant.headers)
    assert r.status_code == 200, r.text
    models = {m["id"]: m for m in r.json()["data"]}
    assert list(models) == ["default", "chat", "no-template", "org/llama3-chat"]
    assert (
        models["default"]["source"] == "embedded" and models["default"]["end_of_turn_token"] == "<|im_end|>"
    )
    assert (
        models["org/llama3-chat"]["end_of_turn_token"] == "<|eot_id|>"
        and models["org/llama3-chat"]["trainable"]
    )
    assert (
        models["no-template"]["problem"]["code"] == "no_chat_template"
        and not models["no-template"]["trainable"]
    )
    assert str(root) not in r.text and str(root.parent) not in r.text
    one = client.get("/v1/models/org/llama3-chat", headers=tenant.headers)
    assert one.status_code == 200 and one.json() == models["org/llama3-chat"]
    missing = client.get("/v1/models/nothing-here", headers=tenant.headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert client.get("/v1/models").status_code == 401


def test_a_job_names_its_model_by_id_and_a_path_becomes_the_id(api, tenant, corpus, root) -> None:
    client, _ = api
    for model, expected in [
        ("chat", "chat"),
        ("org/llama3-chat", "org/llama3-chat"),
        (str(root / "chat"), "chat"),
    ]:
        r = client.post("/v1/jobs", json={"corpus_id": corpus, "model": model}, headers=tenant.headers)
        assert r.status_code == 201, r.text
        assert r.json()["model"] == expected and r.json()["parent_checkpoint"] is None
    refused = [
        ("nothing-here", "model_not_found"),
        ("../chat", "model_not_found"),
        ("no-template", "model_not_trainable"),
        ("/etc", "model_not_allowed"),
        (f"{root}/../models/chat", "model_not_allowed"),
    ]
    for model, code in refused:
        r = client.post("/v1/jobs", json={"corpus_id": corpus, "model": model}, headers=tenant.headers)
        assert r.status_code == 422 and r.json()["error"]["code"] == code, (model, r.text)
        assert r.json()["error"]["param"] == "model" and str(root) not in r.text


def _succeeded_parent(api, tenant, corpus, config, steps=(1, 2)) -> str:
    client, factory = api
    r = client.post(
        "/v1/jobs", json={"corpus_id": corpus, "model": "chat", "config": config}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    job_id = uuid.UUID(r.json()["id"])
    set_job_status(factory, job_id, JobStatus.SUCCEEDED)
    with session_scope(factory) as s:
        for step in steps:
            s.add(
                Checkpoint(
                    job_id=job_id,
                    step=step,
                    path=f"x/{job_id}/train/checkpoints/step-{step:06d}",
                    manifest={},
                )
            )
    return str(job_id)


def test_a_team_continues_its_own_checkpoint_and_inherits_the_adapter_shape(api, tenant, corpus) -> None:
    client, _ = api
    parent = _succeeded_parent(api, tenant, corpus, {"training": {"lora_r": 8, "lora_alpha": 16}})

    r = client.post(
        "/v1/jobs", json={"corpus_id": corpus, "model": {"job_id": parent}}, headers=tenant.headers
    )
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["model"] == "chat" and child["parent_checkpoint"] == {"job_id": parent, "step": 2}
    assert (child["config"]["training"]["lora_r"], child["config"]["training"]["lora_alpha"]) == (8, 16)
    events = client.get(f"/v1/jobs/{child['id']}/events", headers=tenant.headers).json()["data"]
    assert events[0]["data"] == {"model": "chat", "parent": {"job_id": parent, "step": 2}}

    at_one = client.post(
        "/v1/jobs", json={"corpus_id": corpus, "model": {"job_id": parent, "step": 1}}, headers=tenant.headers
    )
    assert at_one.status_code == 201 and at_one.json()["parent_checkpoint"]["step"] == 1
    # Full fine-tuning starts from the merged weights: its own options stand.
    full = client.post(
        "/v1/jobs",
        json={"corpus_id": corpus, "model": {"job_id": parent}, "config": {"training": {"method": "full"}}},
        headers=tenant.headers,
    )
    assert full.status_code == 201, full.text
    conflict = client.post(
        "/v1/jobs",
        json={"corpus_id": corpus, "model": {"job_id": parent}, "config": {"training": {"lora_r": 4}}},
        headers=tenant.headers,
    )
    assert conflict.status_code == 422, conflict.text
    (detail,) = conflict.json()["error"]["details"]
    assert detail["code"] == "lineage_conflict" and detail["field"] == "config.training.lora_r"


def test_a_checkpoint_is_only_its_teams_and_only_once_the_job_succeeded(api, tenant, corpus) -> None:
    client, factory = api
    parent = _succeeded_parent(api, tenant, corpus, {})
    other = make_tenant(factory)
    other_corpus = client.post(
        "/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0)))}, headers=other.headers
    ).json()["id"]
    stranger = client.post(
        "/v1/jobs", json={"corpus_id": other_corpus, "model": {"job_id": parent}}, headers=other.headers
    )
    assert stranger.status_code == 404 and stranger.json()["error"]["param"] == "model.job_id", stranger.text

    no_step = client.post(
        "/v1/jobs", json={"corpus_id": corpus, "model": {"job_id": parent, "step": 7}}, headers=tenant.headers
    )
    assert no_step.status_code == 404 and no_step.json()["error"]["param"] == "model.step"

    running = client.post("/v1/jobs", json={"corpus_id": corpus}, headers=tenant.headers).json()["id"]
    early = client.post(
        "/v1/jobs", json={"corpus_id": corpus, "model": {"job_id": running}}, headers=tenant.headers
    )
    assert early.status_code == 409 and early.json()["error"]["code"] == "parent_not_succeeded"
    bad = client.post(
        "/v1/jobs",
        json={"corpus_id": corpus, "model": {"job_id": parent, "extra": 1}},
        headers=tenant.headers,
    )
    assert bad.status_code == 422


def test_an_adapter_trained_on_another_jobs_full_weights_is_not_continued(api, tenant, corpus) -> None:
    client, factory = api
    full = _succeeded_parent(api, tenant, corpus, {"training": {"method": "full"}})
    r = client.post("/v1/jobs", json={"corpus_id": corpus, "model": {"job_id": full}}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    lora_on_full = r.json()["id"]
    set_job_status(factory, uuid.UUID(lora_on_full), JobStatus.SUCCEEDED)
    with session_scope(factory) as s:
        s.add(Checkpoint(job_id=uuid.UUID(lora_on_full), step=1, path="x/y/step-000001", manifest={}))
    # The full checkpoint can be continued again; the adapter trained on it cannot.
    again = client.post(
        "/v1/jobs", json={"corpus_id": corpus, "model": {"job_id": full}}, headers=tenant.headers
    )
    assert again.status_code == 201, again.text
    refused = client.post(
        "/v1/jobs", json={"corpus_id": corpus, "model": {"job_id": lora_on_full}}, headers=tenant.headers
    )
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "lineage_unsupported", (
        refused.text
    )
