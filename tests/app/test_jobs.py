"""The jobs API without a worker: creation, validation, idempotency, isolation, cancel, reads."""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.models import Job, JobStatus
from service.repositories import jobs as repository
from tests.app.factories import Tenant, dialogue, jsonl

URL = "/v1/jobs"


@pytest.fixture
def corpus_id(client: TestClient, tenant: Tenant) -> str:
    data = jsonl(dialogue(0, turns=2), dialogue(1, turns=2))
    r = client.post("/v1/corpora", files={"file": ("c.jsonl", data)}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def create(client, tenant, body, key=None):
    headers = dict(tenant.headers)
    if key:
        headers["Idempotency-Key"] = key
    return client.post(URL, json=body, headers=headers)


def test_create_fills_defaults_and_enqueues(client, tenant, corpus_id, enqueued):
    r = create(client, tenant, {"corpus_id": corpus_id, "config": {"sampling": {"k": 2}}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["model"] == "default" and job["instruction_set_id"] is None
    assert job["config"]["sampling"]["k"] == 2
    assert job["config"]["sampling"]["top_p"] == 0.95  # a default, filled in and shown
    assert job["config"]["training"]["method"] == "lora"
    assert "corpus" not in job["config"]["data"] and "output_dir" not in job["config"]
    assert uuid.UUID(job["id"]) in enqueued
    events = client.get(f"{URL}/{job['id']}/events", headers=tenant.headers).json()
    assert [e["kind"] for e in events["data"]] == ["created"] and events["next_after_seq"] == 1


def test_invalid_config_lists_every_problem_with_its_path(client, tenant, corpus_id):
    body = {
        "corpus_id": corpus_id,
        "config": {
            "sampling": {"k": "four", "topp": 1},
            "training": {"method": "qlora"},
            "output_dir": "/etc",
        },
    }
    r = create(client, tenant, body)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_config"
    fields = {(d["field"], d["code"]) for d in error["details"]}
    assert ("config.output_dir", "server_field") in fields
    r = create(
        client,
        tenant,
        {**body, "config": {"sampling": {"k": "four", "topp": 1}, "training": {"method": "qlora"}}},
    )
    fields = {(d["field"], d["code"]) for d in r.json()["error"]["details"]}
    assert fields == {
        ("config.sampling.k", "invalid_type"),
        ("config.sampling.topp", "unknown_field"),
        ("config.training.method", "invalid_value"),
    }


# Each of these was accepted and queued before the engine config had upper bounds.
UNBOUNDED = [
    ({"sampling": {"k": 10_000}}, "config.sampling.k", "k must be <= 64"),
    ({"sampling": {"max_new_tokens": 10**9}}, "config.sampling.max_new_tokens", "must be <= 4096"),
    ({"sampling": {"batch_prompts": 10**6}}, "config.sampling.batch_prompts", "must be <= 256"),
    ({"sampling": {"temperature": 1e6}}, "config.sampling.temperature", "must be <= 10"),
    ({"reward": {"batch_size": 10**7}}, "config.reward.batch_size", "batch_size must be <= 1024"),
    ({"reward": {"relevance_weight": 1e12}}, "config.reward.relevance_weight", "must be <= 100"),
    ({"training": {"lora_r": 10**6}}, "config.training.lora_r", "lora_r must be <= 512"),
    ({"training": {"max_steps": 10**12}}, "config.training.max_steps", "max_steps must be <= 1000000"),
    ({"training": {"micro_batch_size": 10**5}}, "config.training.micro_batch_size", "must be <= 512"),
    ({"training": {"keep_checkpoints": 10**9}}, "config.training.keep_checkpoints", "must be <= 50"),
    ({"training": {"epochs": 1e9}}, "config.training.epochs", "epochs must be <= 100"),
    ({"training": {"lora_targets": "(.|.)*Q"}}, "config.training.lora_targets", "lora_targets must be"),
    ({"training": {"lora_targets": ["q"] * 65}}, "config.training.lora_targets", "1 to 64 module names"),
    ({"values": {"samples": 10**4}}, "config.values.samples", "samples must be <= 64"),
    ({"values": {"families": ["f"] * 33}}, "config.values.families", "at most 32"),
    ({"data": {"max_dialogues": -5}}, "config.data.max_dialogues", "max_dialogues must be >= 1"),
    ({"data": {"max_turns": 0}}, "config.data.max_turns", "max_turns must be >= 1"),
    ({"data": {"max_turns": 10**6}}, "config.data.max_turns", "max_turns must be <= 64"),
    ({"evaluation": {"turns": 65}}, "config.evaluation.turns", "turns must be <= 64"),
]


@pytest.mark.parametrize(("config", "field", "message"), UNBOUNDED)
def test_every_size_a_job_asks_for_is_bounded(client, tenant, corpus_id, config, field, message):
    r = create(client, tenant, {"corpus_id": corpus_id, "config": config})
    assert r.status_code == 422, r.text
    (detail,) = r.json()["error"]["details"]
    assert detail["field"] == field and message in detail["message"], detail


def test_lora_targets_may_name_modules(client, tenant, corpus_id):
    for targets in ("q_proj|v_proj", ["q_proj", "v_proj"], "all-linear"):
        r = create(
            client, tenant, {"corpus_id": corpus_id, "config": {"training": {"lora_targets": targets}}}
        )
        assert r.status_code == 201, r.text


def test_models_are_named_by_id_and_paths_must_lie_under_a_model_root(client, tenant, corpus_id):
    # This app has no model roots: "default" is the only model (tests/app/test_models.py has roots).
    for model, code in (
        ("/etc", "model_not_allowed"),
        ("../models/x", "model_not_found"),
        ("x/y", "model_not_found"),
    ):
        r = create(client, tenant, {"corpus_id": corpus_id, "model": model})
        assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
    r = create(
        client,
        tenant,
        {"corpus_id": corpus_id, "config": {"reward": {"reward_model": "/etc", "reward_model_weight": 1}}},
    )
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "config.reward.reward_model"


def test_idempotency_key_returns_the_same_job(client, tenant, corpus_id, enqueued):
    key = f"retry-{uuid.uuid4()}"
    first = create(client, tenant, {"corpus_id": corpus_id}, key)
    sent = len(enqueued)
    again = create(client, tenant, {"corpus_id": corpus_id}, key)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert len(enqueued) == sent  # not sent to the workers twice
    other = create(client, tenant, {"corpus_id": corpus_id, "config": {"seed": 1}}, key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_other_teams_cannot_see_or_use(client, tenant, other_tenant, corpus_id):
    job = create(client, tenant, {"corpus_id": corpus_id}).json()
    for path in ("", "/events", "/metrics", "/checkpoints", "/samples", "/training-set", "/rounds"):
        r = client.get(f"{URL}/{job['id']}{path}", headers=other_tenant.headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    assert client.post(f"{URL}/{job['id']}/cancel", headers=other_tenant.headers).status_code == 404
    # nor build a job on another team's corpus
    r = create(client, other_tenant, {"corpus_id": corpus_id})
    assert r.status_code == 404 and r.json()["error"]["param"] == "corpus_id"
    listed = client.get(URL, headers=other_tenant.headers).json()
    assert job["id"] not in [j["id"] for j in listed["data"]]


def test_cancel_queued_at_once_and_finished_refused(client, tenant, corpus_id, db: sessionmaker[Session]):
    job = create(client, tenant, {"corpus_id": corpus_id}).json()
    r = client.post(f"{URL}/{job['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.post(f"{URL}/{job['id']}/cancel", headers=tenant.headers).json()["status"] == "cancelled"

    done = create(client, tenant, {"corpus_id": corpus_id}).json()
    with db() as s, s.begin():
        s.get(Job, uuid.UUID(done["id"])).status = JobStatus.SUCCEEDED
    r = client.post(f"{URL}/{done['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_cancel_running_asks_the_worker(client, tenant, corpus_id, db):
    job = create(client, tenant, {"corpus_id": corpus_id}).json()
    with db() as s, s.begin():
        assert repository.claim(s, uuid.UUID(job["id"]), "test-worker", 60) is not None
    r = client.post(f"{URL}/{job['id']}/cancel", headers=tenant.headers)
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    with db() as s, s.begin():
        assert repository.cancel_requested(s, uuid.UUID(job["id"]))
        # a worker that lost the race cannot finish someone else's run
        assert not repository.finish(s, uuid.UUID(job["id"]), "another-worker", JobStatus.SUCCEEDED)
        assert repository.finish(s, uuid.UUID(job["id"]), "test-worker", JobStatus.CANCELLED)


def test_a_stopping_process_hands_back_its_jobs_and_ends_those_asked_to_cancel(client, tenant, corpus_id, db):
    # The embedded worker's stop(): a requeued job with a pending cancel could never be claimed
    # again (claim refuses cancel_requested) and stayed queued for ever.
    plain, cancelling = (
        uuid.UUID(create(client, tenant, {"corpus_id": corpus_id}).json()["id"]) for _ in "ab"
    )
    with db() as s, s.begin():
        for job_id in (plain, cancelling):
            assert repository.claim(s, job_id, "host:1:abc", 60) is not None
        assert repository.request_cancel(s, cancelling)
    with db() as s, s.begin():
        assert repository.requeue_owned(s, "host:1:", "stopped") == [plain]
    for job_id, status, last_event in ((plain, "queued", "requeued"), (cancelling, "cancelled", "cancelled")):
        job = client.get(f"{URL}/{job_id}", headers=tenant.headers).json()
        assert job["status"] == status
        events = client.get(f"{URL}/{job_id}/events", headers=tenant.headers).json()["data"]
        assert events[-1]["kind"] == last_event


def test_claim_is_exclusive_until_the_lease_expires(client, tenant, corpus_id, db):
    job_id = uuid.UUID(create(client, tenant, {"corpus_id": corpus_id}).json()["id"])
    with db() as s, s.begin():
        assert repository.claim(s, job_id, "a", 60) is not None
    with db() as s, s.begin():
        assert (
            repository.claim(s, job_id, "b", 60) is None
        )  # a redelivered message does not start a second run
        assert not repository.heartbeat(s, job_id, "b", 60)
    with db() as s, s.begin():
        s.get(Job, job_id).lease_expires_at = repository.now()  # worker a vanished
    with db() as s, s.begin():
        taken = repository.claim(s, job_id, "b", 60)
        assert taken is not None and taken.attempts == 2 and taken.lease_owner == "b"
        assert not repository.heartbeat(s, job_id, "a", 60)  # a learns it lost the job


def test_list_filters_by_status_and_paginates(client, tenant, corpus_id):
    ids = [create(client, tenant, {"corpus_id": corpus_id}).json()["id"] for _ in range(4)]
    client.post(f"{URL}/{ids[0]}/cancel", headers=tenant.headers)
    page = client.get(URL, params={"limit": 2, "status": "queued"}, headers=tenant.headers).json()
    assert [j["id"] for j in page["data"]] == [ids[3], ids[2]] and page["has_more"]
    rest = client.get(
        URL, params={"limit": 2, "status": "queued", "after": page["next_after"]}, headers=tenant.headers
    ).json()
    assert [j["id"] for j in rest["data"]] == [ids[1]] and not rest["has_more"]
    cancelled = client.get(URL, params={"status": "cancelled"}, headers=tenant.headers).json()
    assert ids[0] in [j["id"] for j in cancelled["data"]]
    assert client.get(URL, params={"status": "nope"}, headers=tenant.headers).status_code == 422


def test_checkpoint_archive_unknown_step(client, tenant, corpus_id):
    job = create(client, tenant, {"corpus_id": corpus_id}).json()
    r = client.get(f"{URL}/{job['id']}/checkpoints/5/archive", headers=tenant.headers)
    assert r.status_code == 404 and r.json()["error"]["param"] == "step"
    listed = client.get(f"{URL}/{job['id']}/checkpoints", headers=tenant.headers).json()
    assert listed == {"data": [], "has_more": False, "next_after": None}
    assert client.get(f"{URL}/{job['id']}/samples", headers=tenant.headers).json()["data"] == []


def test_config_defaults_are_what_an_empty_config_runs_with(client, tenant, corpus_id):
    defaults = client.get(f"{URL}/config-defaults", headers=tenant.headers)
    assert defaults.status_code == 200
    job = create(client, tenant, {"corpus_id": corpus_id}).json()
    assert job["config"] == defaults.json()
    assert defaults.json()["sampling"]["k"] == 4 and "output_dir" not in defaults.json()
    assert client.get(f"{URL}/config-defaults").status_code == 401


def test_openapi_publishes_the_config_with_defaults_and_bounds(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for model in ("JobCreate", "Job"):
        ref = schemas[model]["properties"]["config"]["allOf"][0]["$ref"]
        assert ref == "#/components/schemas/JobOptions", model
    options = schemas["JobOptions"]
    assert options["additionalProperties"] is False
    sections = {"data", "placement", "sampling", "reward", "training", "evaluation", "values"}
    assert sections < options["properties"].keys() and "output_dir" not in options["properties"]

    def section(name):
        return schemas[options["properties"][name]["$ref"].rsplit("/", 1)[-1]]

    k = section("sampling")["properties"]["k"]
    assert (k["type"], k["default"], k["minimum"], k["maximum"]) == ("integer", 4, 1, 64)
    assert "corpus" not in section("data")["properties"]
    assert section("training")["properties"]["method"]["enum"] == ["lora", "full"]
    for name in sections:
        for field, value in section(name)["properties"].items():
            # FastAPI leaves nulls out of the document, so a null default shows as a nullable field.
            assert "default" in value or {"type": "null"} in value["anyOf"], f"{name}.{field}"


def test_openapi_publishes_the_sample_and_training_rows_and_every_ref_resolves(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    samples = spec["paths"]["/v1/jobs/{job_id}/samples"]["get"]["responses"]["200"]["content"]
    rows = schemas[samples["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert rows["properties"]["data"]["items"] == {"$ref": "#/components/schemas/SampleRow"}
    assert {"instruction", "turns", "stopped"} <= schemas["SampleRow"]["properties"].keys()
    assert {"history", "messages", "trained_spans"} <= schemas["TrainingRow"]["properties"].keys()
    refs, stack = set(), [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    assert refs and {r.rsplit("/", 1)[-1] for r in refs} <= schemas.keys()


def test_reaper_requeues_a_vanished_worker_once_per_lease(client, tenant, corpus_id, db):
    from datetime import timedelta

    job_id = uuid.UUID(create(client, tenant, {"corpus_id": corpus_id}).json()["id"])
    with db() as s, s.begin():
        repository.claim(s, job_id, "gone", 60)
        s.get(Job, job_id).lease_expires_at = repository.now() - timedelta(seconds=1)
    with db() as s, s.begin():
        assert job_id in repository.requeue_expired(s)
    with db() as s, s.begin():
        job = s.get(Job, job_id)
        assert job.status == JobStatus.QUEUED and job.lease_owner is None
        assert job_id not in repository.requeue_expired(s)  # already requeued: not sent again
        assert job_id not in repository.stale_queued(s, timedelta(seconds=60))  # just touched
        assert not repository.heartbeat(s, job_id, "gone", 60)  # the old worker, if alive, stops
    with db() as s, s.begin():
        assert job_id in repository.stale_queued(s, timedelta(seconds=-1))
    events = client.get(f"{URL}/{job_id}/events", headers=tenant.headers).json()["data"]
    assert "worker_lost" in [e["kind"] for e in events]


def test_integers_beyond_the_database_are_refused_not_a_server_error(client, tenant, corpus_id):
    job_id = create(client, tenant, {"corpus_id": corpus_id}).json()["id"]
    huge = 9223372036854775808  # 2**63: past every integer column
    for path in (
        f"{URL}/{job_id}/checkpoints/{huge}/archive",
        f"{URL}/{job_id}/events?after_seq={huge}",
        f"{URL}/{job_id}/metrics?after_step={huge}",
        f"{URL}/{job_id}/samples?offset={huge}",
    ):
        r = client.get(path, headers=tenant.headers)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (path, r.text)


def test_row_pages_stop_at_a_byte_cap_and_serve_rows_as_stored(client, tenant, corpus_id, db, settings):
    from app.jobs import service as job_service
    from service.storage import job_dir

    job_id = create(client, tenant, {"corpus_id": corpus_id}).json()["id"]
    with db() as s:
        path = job_dir(settings, s.get(Job, uuid.UUID(job_id)))
    path.mkdir(parents=True, exist_ok=True)
    big = "x" * (job_service.MAX_PAGE_BYTES // 2 + 1)  # two such rows are more than a page
    rows = [f'{{"index": {i}, "text": "{big if i < 3 else "é"}"}}' for i in range(5)]
    (path / "samples.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")

    def page(offset: int, limit: int = 50) -> dict:
        r = client.get(f"{URL}/{job_id}/samples?offset={offset}&limit={limit}", headers=tenant.headers)
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text[:200]
        return r.json()

    first = page(0)
    assert [row["index"] for row in first["data"]] == [0] and first["has_more"] is True
    assert first["offset"] == 0 and len(first["data"][0]["text"]) == len(big)
    assert [row["index"] for row in page(1)["data"]] == [1]
    assert [row["index"] for row in page(2)["data"]] == [2, 3, 4]  # small rows fill the rest of a page
    last = page(3)
    assert (
        last["data"] == [{"index": 3, "text": "é"}, {"index": 4, "text": "é"}] and last["has_more"] is False
    )
    assert [row["index"] for row in page(3, limit=1)["data"]] == [3] and page(3, limit=1)["has_more"] is True
    assert page(5)["data"] == [] and page(5)["has_more"] is False
    # The cursor every list takes: `after` is the `next_after` of the page before.
    seen, after = [], None
    while True:
        query = {"limit": 2, **({"after": after} if after else {})}
        got = client.get(f"{URL}/{job_id}/samples", params=query, headers=tenant.headers).json()
        seen += [row["index"] for row in got["data"]]
        if not got["has_more"]:
            assert got["next_after"] is None
            break
        after = got["next_after"]
    assert seen == [0, 1, 2, 3, 4]


def test_events_and_metrics_page_with_the_same_cursor_and_poll_from_it(client, tenant, corpus_id, db):
    job_id = create(client, tenant, {"corpus_id": corpus_id}).json()["id"]
    with db() as s:
        for i in range(2):
            repository.add_event(s, uuid.UUID(job_id), "info", "probe", f"event {i}", None)
        for step in (1, 2, 3):
            repository.upsert_metric(s, uuid.UUID(job_id), step, {"loss": 1.0 / step})
        s.commit()

    def get(what: str, **query) -> dict:
        r = client.get(f"{URL}/{job_id}/{what}", params=query, headers=tenant.headers)
        assert r.status_code == 200, r.text
        return r.json()

    first = get("events", limit=2)
    assert [e["seq"] for e in first["data"]] == [1, 2] and first["has_more"] and first["next_after"] == "2"
    rest = get("events", limit=2, after=first["next_after"])
    assert [e["seq"] for e in rest["data"]] == [3] and not rest["has_more"] and rest["next_after"] == "3"
    assert get("events", after="3") == {"data": [], "has_more": False, "next_after": "3", "next_after_seq": 3}
    assert [e["seq"] for e in get("events", after_seq=2)["data"]] == [3]  # the older name still works
    metrics = get("metrics", limit=2, after="1")
    assert [m["step"] for m in metrics["data"]] == [2, 3] and not metrics["has_more"]
    assert metrics["next_after"] == "3" and metrics["next_after_step"] == 3
    bad = client.get(f"{URL}/{job_id}/events", params={"after": "9999999999"}, headers=tenant.headers)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_cursor"
    assert (
        client.get(f"{URL}/{job_id}/events", params={"after": "-1"}, headers=tenant.headers).status_code
        == 422
    )


def test_the_evaluation_is_served_from_its_summary_without_transcripts(
    client, tenant, corpus_id, db, settings
):
    from service.storage import job_dir

    job_id = create(client, tenant, {"corpus_id": corpus_id}).json()["id"]
    with db() as s:
        evaluation = job_dir(settings, s.get(Job, uuid.UUID(job_id))) / "evaluation"
    evaluation.mkdir(parents=True, exist_ok=True)
    runs = [{"reply": "x" * 1000}] * 100
    whole = {m: {"conditions": {}, "transcripts": {"once": runs}} for m in ("base", "gatt")}

    def served() -> dict:
        r = client.get(f"{URL}/{job_id}/evaluation", headers=tenant.headers)
        assert r.status_code == 200, r.text
        return r.json()

    # A job evaluated before the summary existed: the whole report, transcripts left out.
    (evaluation / "adherence.json").write_text(json.dumps({**whole, "table": "whole"}))
    got = served()
    assert got["table"] == "whole" and "transcripts" not in got["base"] and got["attention"] is None
    # Now: the summary written beside it is what is read.
    summary = {m: {"conditions": {}} for m in ("base", "gatt")}
    (evaluation / "adherence_summary.json").write_text(json.dumps({**summary, "table": "summary"}))
    assert served()["table"] == "summary"


def test_rounds_are_listed_as_the_worker_finishes_them(client, tenant, corpus_id, db, settings):
    from service.storage import job_dir

    job_id = create(client, tenant, {"corpus_id": corpus_id, "config": {"rounds": {"count": 3}}}).json()["id"]
    r = client.get(f"{URL}/{job_id}/rounds", headers=tenant.headers)
    assert r.status_code == 200 and r.json() == {"count": 3, "data": []}  # none finished yet
    with db() as s:
        directory = job_dir(settings, s.get(Job, uuid.UUID(job_id)))
    directory.mkdir(parents=True, exist_ok=True)
    finished = {
        "round": 1,
        "selection": {"turns": 4, "accepted": 4, "mean_reward": 0.5, "mean_best_reward": 0.75},
        "batches": [{"batch": 0, "turns": 4, "max_reward": 1.0, "median_reward": 0.75, "pass_rate": 0.5}],
        "examples": 4,
        "trained_tokens": 120,
        "steps": {"first": 1, "last": 2},
        "final_loss": 2.5,
    }
    (directory / "rounds.json").write_text(json.dumps([finished]))
    got = client.get(f"{URL}/{job_id}/rounds", headers=tenant.headers).json()
    assert got == {"count": 3, "data": [finished]}
    assert client.get(f"{URL}/{uuid.uuid4()}/rounds", headers=tenant.headers).status_code == 404


def test_a_later_rounds_samples_and_training_set_are_served_by_round(client, tenant, corpus_id, db, settings):
    from service.storage import job_dir

    job_id = create(client, tenant, {"corpus_id": corpus_id, "config": {"rounds": {"count": 3}}}).json()["id"]
    with db() as s:
        directory = job_dir(settings, s.get(Job, uuid.UUID(job_id)))
    (directory / "rounds" / "2").mkdir(parents=True)
    (directory / "samples.jsonl").write_text(json.dumps({"index": 0, "round": 1}) + "\n")
    (directory / "rounds" / "2" / "samples.jsonl").write_text(json.dumps({"index": 0, "round": 2}) + "\n")
    (directory / "rounds" / "2" / "training_set.jsonl").write_text(json.dumps({"round": 2}) + "\n")

    def rows(path: str, **params) -> list:
        r = client.get(f"{URL}/{job_id}/{path}", params=params, headers=tenant.headers)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    assert rows("samples") == [{"index": 0, "round": 1}]
    assert rows("samples", round=2) == [{"index": 0, "round": 2}]
    assert rows("training-set", round=2) == [{"round": 2}]
    assert rows("samples", round=3) == []  # not sampled yet
    r = client.get(f"{URL}/{job_id}/samples", params={"round": 4}, headers=tenant.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "round_not_found"
    assert r.json()["error"]["param"] == "round"
    r = client.get(f"{URL}/{job_id}/training-set", params={"round": 0}, headers=tenant.headers)
    assert r.status_code == 422


def test_the_default_instruction_set_can_be_named_by_its_id(client, tenant, corpus_id):
    default_id = client.get("/v1/instruction-sets/default", headers=tenant.headers).json()["id"]
    r = create(client, tenant, {"corpus_id": corpus_id, "instruction_set_id": default_id})
    assert r.status_code == 201, r.text
    assert r.json()["instruction_set_id"] is None  # the default set, as with null
    bad = create(client, tenant, {"corpus_id": corpus_id, "instruction_set_id": "defaults"})
    assert bad.status_code == 422


def test_a_job_keeps_its_name_and_metadata(client, tenant, corpus_id):
    body = {"corpus_id": corpus_id, "name": "emoji run 3", "metadata": {"team": "search", "ticket": "GA-12"}}
    job = create(client, tenant, body).json()
    assert (job["name"], job["metadata"]) == ("emoji run 3", {"team": "search", "ticket": "GA-12"})
    got = client.get(f"{URL}/{job['id']}", headers=tenant.headers).json()
    assert (got["name"], got["metadata"]) == (job["name"], job["metadata"])
    for bad in (
        {"name": ""},
        {"name": "x" * 201},
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        {"metadata": {"k": "v" * 513}},
        {"metadata": {"k": 1}},
        {"metadata": {"k\u0000": "v"}},
    ):
        r = create(client, tenant, {"corpus_id": corpus_id, **bad})
        assert r.status_code == 422, (bad, r.text)


def test_checkpoint_download_urls_are_absolute(app, client, tenant, corpus_id, db, settings):
    from service.models import Checkpoint

    job_id = create(client, tenant, {"corpus_id": corpus_id}).json()["id"]
    with db.begin() as session:
        session.add(
            Checkpoint(job_id=uuid.UUID(job_id), step=3, path="x", manifest={"step": 3}, metrics=None)
        )
    listed = client.get(f"{URL}/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    assert listed[0]["download_url"] == f"http://testserver/v1/jobs/{job_id}/checkpoints/3/archive"
    # Behind a proxy the operator names the public address.
    from app.main import create_app

    public = create_app(
        settings.model_copy(update={"public_url": "https://gatt.example.com/"}), enqueue=lambda j: None
    )
    with TestClient(public) as behind:
        listed = behind.get(f"{URL}/{job_id}/checkpoints", headers=tenant.headers).json()["data"]
    assert listed[0]["download_url"] == f"https://gatt.example.com/v1/jobs/{job_id}/checkpoints/3/archive"


def test_a_validation_corpus_is_held_out_instead_of_the_tail(client, tenant, other_tenant, corpus_id):
    held = client.post(
        "/v1/corpora",
        files={"file": ("held.jsonl", jsonl(dialogue(7, turns=2), dialogue(8, turns=2), dialogue(9)))},
        headers=tenant.headers,
    ).json()["id"]
    evaluation = {
        "enabled": True,
        "heldout_dialogues": 2,
        "turns": 2,
        "conditions": ["once"],
        "max_new_tokens": 8,
    }
    config = {"evaluation": evaluation, "sampling": {"k": 2, "max_new_tokens": 10}, "data": {"max_turns": 1}}
    r = create(client, tenant, {"corpus_id": corpus_id, "validation_corpus_id": held, "config": config})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["validation_corpus_id"] == held
    # The training corpus (2 dialogues) is sampled whole; 2 validation dialogues x 2 turns x 1
    # condition x 2 models are evaluated.
    assert job["estimate"]["sampled_turns"] == 2 and job["estimate"]["evaluation_tokens"] == 2 * 2 * 2 * 8
    in_use = client.delete(f"/v1/corpora/{held}", headers=tenant.headers)
    assert in_use.status_code == 409 and in_use.json()["error"]["code"] == "in_use"

    off = create(client, tenant, {"corpus_id": corpus_id, "validation_corpus_id": held})
    assert off.status_code == 422 and off.json()["error"]["param"] == "validation_corpus_id"
    theirs = client.post(
        "/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0)))}, headers=other_tenant.headers
    )
    stranger = create(
        client,
        tenant,
        {"corpus_id": corpus_id, "validation_corpus_id": theirs.json()["id"], "config": config},
    )
    assert stranger.status_code == 404 and stranger.json()["error"]["param"] == "validation_corpus_id"
