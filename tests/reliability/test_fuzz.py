"""Hostile input: schemathesis over the whole OpenAPI schema, then the cases a fuzzer rarely builds.

The app runs in process (ASGI) against the shared test database, authenticated with a real key of a
fresh team that owns a real corpus, instruction set and job (with a checkpoint on disk), so generated
ids are sometimes real ones and requests get past the 404s. Every answer must be below 500 and match
the schema: status code documented, body valid against the documented model, the error envelope on
every non-2xx.

More examples: GATT_FUZZ_EXAMPLES=200 (per operation; default 25). Generation is derandomized so CI
sees the same cases on every run; GATT_FUZZ_RANDOM=1 explores new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings

from app.jobs.chat import RedisChat
from app.main import create_app
from service.db import session_scope
from service.models import Checkpoint
from service.queue import CHAT_TASK
from service.settings import Settings
from tests.app.factories import dialogue, jsonl, make_tenant
from tests.model_dirs import write_model

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

REDIS_URL = os.environ.get("GATT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MAX_JSON = 64 * 1024
MAX_CORPUS = 256 * 1024
EXAMPLES = int(os.environ.get("GATT_FUZZ_EXAMPLES", "25"))
RANDOM = os.environ.get("GATT_FUZZ_RANDOM") == "1"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
COUNTS: Counter[str] = Counter()


def _plant_checkpoint(
    factory: Any, artifact_dir: Path, team_id: uuid.UUID, job_id: str, step: int, path: str
) -> None:
    with session_scope(factory) as s:
        s.add(
            Checkpoint(job_id=uuid.UUID(job_id), step=step, path=path, manifest={"step": step}, metrics=None)
        )


@pytest.fixture(scope="module")
def fuzz(database_url: str, tmp_path_factory) -> Iterator[SimpleNamespace]:
    tmp = tmp_path_factory.mktemp("fuzz")
    models, outside = tmp / "models", tmp / "outside"
    write_model(models / "tiny")
    outside.mkdir()
    (outside / "secret.txt").write_text("not yours")
    (models / "escape").symlink_to(outside)  # a link inside the root that leads out of it
    settings_ = Settings(
        database_url=database_url,
        artifact_dir=tmp / "artifacts",
        model_roots=[models],
        rate_limit_per_s=0,
        max_json_body_bytes=MAX_JSON,
        max_corpus_bytes=MAX_CORPUS,
        # No chat worker here: a chat the fuzzer gets through is sent, unread, to a queue of its own
        # and answered 504 at once, not after a minute.
        redis_url=REDIS_URL,
        chat_timeout_s=0.05,
        chat_per_minute=0,
    )
    chat_queue = f"fuzz-chat-{uuid.uuid4().hex[:8]}"
    broker = Celery(broker=REDIS_URL)
    chat = RedisChat(REDIS_URL, lambda request: broker.send_task(CHAT_TASK, args=[request], queue=chat_queue))
    app = create_app(settings_, enqueue=lambda _: None, chat=chat)
    factory = app.state.sessionmaker
    tenant = make_tenant(factory)
    with TestClient(app, raise_server_exceptions=False) as client:
        corpus = client.post(
            "/v1/corpora",
            files={"file": ("c.jsonl", jsonl(dialogue(0), dialogue(1)))},
            headers=tenant.headers,
        ).json()["id"]
        spec = client.get("/v1/instruction-sets/default", headers=tenant.headers).json()["spec"]
        iset = client.post("/v1/instruction-sets", json={"name": "s", "spec": spec}, headers=tenant.headers)
        job = client.post(
            "/v1/jobs",
            json={"corpus_id": corpus, "instruction_set_id": iset.json()["id"]},
            headers=tenant.headers,
        ).json()["id"]
        # A real checkpoint on disk, and the artifacts a running job has (samples with a torn last line).
        job_dir = settings_.artifact_dir / str(tenant.team.id) / job
        ckpt = job_dir / "train" / "checkpoints" / "step-000001"
        ckpt.mkdir(parents=True)
        (ckpt / "adapter_config.json").write_text("{}")
        (ckpt / "manifest.json").write_text(json.dumps({"step": 1}))
        (ckpt / "leak").symlink_to(outside / "secret.txt")  # a symlinked file is never archived
        _plant_checkpoint(
            factory,
            settings_.artifact_dir,
            tenant.team.id,
            job,
            1,
            str(ckpt.relative_to(settings_.artifact_dir)),
        )
        (job_dir / "samples.jsonl").write_text('{"index": 0}\n{"index": 1}\n{"index": 2, "tu')
        yield SimpleNamespace(
            app=app,
            client=client,
            settings=settings_,
            factory=factory,
            tenant=tenant,
            models=models,
            outside=outside,
            ids={"corpus_id": corpus, "instruction_set_id": iset.json()["id"], "job_id": job, "step": 1},
        )
    redis.Redis.from_url(REDIS_URL).delete(chat_queue)
    if COUNTS:
        print(f"\nfuzz: {sum(COUNTS.values())} requests, by status: {dict(sorted(COUNTS.items()))}")


# The schema is static (routes, not settings): read it from an app built here, and send each case to
# the fixture's app, which has the test database and the planted resources. (A lazy schema from a
# fixture, schemathesis.pytest.from_fixture, does not run under pytest 9.)
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(Settings(rate_limit_per_s=0), enqueue=lambda _: None)
).exclude(path="/v1/jobs/{job_id}/stream")  # streams until the job ends: tests/app/test_stream.py


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(case, fuzz: SimpleNamespace) -> None:
    # Half the time, point at the team's real resources so the request reaches the handler's logic.
    if random.random() < 0.5:
        for name, value in fuzz.ids.items():
            if case.path_parameters and name in case.path_parameters:
                case.path_parameters[name] = value
        if isinstance(case.body, dict):
            for name in ("corpus_id", "instruction_set_id"):
                if name in case.body:
                    case.body[name] = fuzz.ids[name]
    # The real key replaces a generated bearer token. A negative case that left the header out on
    # purpose goes without one (and must get 401).
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    generated_auth = len(headers) != len(case.headers or {})
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    if generated_auth or not negative:
        headers["Authorization"] = fuzz.tenant.headers["Authorization"]
    case.headers = headers
    response = case.call(app=fuzz.app)
    COUNTS[str(response.status_code)] += 1
    # 413 (a body over the server's cap, which negative lists past maxItems soon are) rejects the
    # data too, though it is not among the statuses negative_data_rejection expects.
    checks = [c for c in CHECKS if response.status_code != 413 or c is not negative_data_rejection]
    case.validate_response(response, checks=checks)


# --- explicit hostile cases -------------------------------------------------------------------


@pytest.fixture
def c(fuzz: SimpleNamespace) -> TestClient:
    return fuzz.client


@pytest.fixture
def headers(fuzz: SimpleNamespace) -> dict[str, str]:
    return fuzz.tenant.headers


def _error(r, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert error["code"] == code, error
    return error


def _post_json(c: TestClient, url: str, raw: bytes | str, headers: dict[str, str], **extra: str):
    return c.post(url, content=raw, headers={**headers, "content-type": "application/json", **extra})


def test_oversized_json_bodies_are_413(c, headers, fuzz) -> None:
    big = json.dumps({"corpus_id": fuzz.ids["corpus_id"], "config": {"pad": "x" * MAX_JSON}})
    _error(_post_json(c, "/v1/jobs", big, headers), 413, "payload_too_large")
    _error(_post_json(c, "/v1/instruction-sets", big, headers), 413, "payload_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
        yield b'{"name": "x", "spec": {"pad": "'
        for _ in range(MAX_JSON // 1024 + 1):
            yield b"x" * 1024
        yield b'"}}'

    r = c.post(
        "/v1/instruction-sets", content=chunks(), headers={**headers, "content-type": "application/json"}
    )
    _error(r, 413, "payload_too_large")


def test_oversized_corpus_is_413(c, headers) -> None:
    line = json.dumps(dialogue(0)).encode() + b"\n"
    r = c.post(
        "/v1/corpora", files={"file": ("c.jsonl", line * (MAX_CORPUS // len(line) + 2))}, headers=headers
    )
    _error(r, 413, "payload_too_large")


@pytest.mark.parametrize("depth", [40, 100, 500, 900, 990, 5000, 20000])
def test_deeply_nested_json_is_4xx(c, headers, fuzz, depth: int) -> None:
    objects = '{"a":' * depth + "1" + "}" * depth
    arrays = "[" * depth + "]" * depth
    corpus = fuzz.ids["corpus_id"]
    bodies = {
        "/v1/jobs": [
            f'{{"corpus_id":"{corpus}","config":{objects}}}',
            f'{{"corpus_id":"{corpus}","config":{{"sampling":{objects}}}}}',
            f'{{"corpus_id":{arrays}}}',
        ],
        "/v1/instruction-sets": [
            f'{{"name":"n","spec":{objects}}}',
            f'{{"name":"n","spec":{{"custom":{arrays}}}}}',
        ],
    }
    for url, raws in bodies.items():
        for raw in raws:
            r = _post_json(c, url, raw, headers)
            assert 400 <= r.status_code < 500, (url, depth, r.status_code, r.text[:300])
            codes = ("invalid_request", "invalid_config", "invalid_instruction_set", "payload_too_large")
            assert r.json()["error"]["code"] in codes


def test_invalid_utf8_in_json_is_422_with_a_code(c, headers) -> None:
    for raw in (b'{"name": "\xff\xfe", "spec": {}}', b'{"name": "caf\xe9", "spec": {}}', b"\xc3\x28"):
        for url in ("/v1/instruction-sets", "/v1/jobs"):
            error = _error(_post_json(c, url, raw, headers), 422, "invalid_request")
            assert "UTF-8" in error["message"] and error["details"][0]["location"] == "body"


def test_unpaired_surrogates_and_nul_in_json_are_4xx(c, headers, fuzz) -> None:
    spec = c.get("/v1/instruction-sets/default", headers=headers).json()["spec"]
    custom = {"name": "n", "text": "Say hi", "verifiers": [{"type": "starts_with", "text": "hi"}]}
    cases = [
        ("/v1/instruction-sets", {"name": "\ud800", "spec": spec}),
        ("/v1/instruction-sets", {"name": "a\u0000b", "spec": spec}),
        (
            "/v1/instruction-sets",
            {"name": "n", "spec": {**spec, "custom": [{**custom, "text": "Say\u0000"}]}},
        ),
        ("/v1/jobs", {"corpus_id": fuzz.ids["corpus_id"], "model": "\ud800"}),
        ("/v1/jobs", {"corpus_id": fuzz.ids["corpus_id"], "model": f"{fuzz.models}/tiny\u0000x"}),
        (
            "/v1/jobs",
            {"corpus_id": fuzz.ids["corpus_id"], "config": {"reward": {"reward_model": "/m\u0000"}}},
        ),
        (
            "/v1/jobs",
            {"corpus_id": fuzz.ids["corpus_id"], "config": {"training": {"lora_targets": ["q\u0000"]}}},
        ),
    ]
    for url, body in cases:
        r = _post_json(c, url, json.dumps(body), headers)
        assert 400 <= r.status_code < 500, (url, body, r.status_code, r.text[:300])
        assert r.json()["error"]["code"]


def test_invalid_utf8_in_a_corpus_is_422_with_line_and_code(c, headers) -> None:
    good = json.dumps(dialogue(0)).encode()
    bad = b'{"messages": [{"role": "user", "content": "\xff\xfe"}, {"role": "assistant", "content": "ok"}]}'
    r = c.post("/v1/corpora", files={"file": ("c.jsonl", good + b"\n" + bad + b"\n")}, headers=headers)
    error = _error(r, 422, "invalid_corpus")
    assert [(d["line"], d["code"]) for d in error["details"]] == [(2, "invalid_utf8")]
    r = c.post(
        "/v1/corpora", files={"file": ("c.jsonl", good + b"\n")}, data={"name": "a\x00b"}, headers=headers
    )
    assert 400 <= r.status_code < 500, r.text


def test_thousands_of_turns_are_422_too_many_messages(c, headers) -> None:
    r = c.post("/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0, turns=2000)))}, headers=headers)
    error = _error(r, 422, "invalid_corpus")
    assert [d["code"] for d in error["details"]] == ["too_many_messages"]
    assert error["details"][0]["line"] == 1


def test_model_paths_cannot_escape_the_model_roots(c, headers, fuzz) -> None:
    root = fuzz.models
    escaping = [
        "../tiny",
        f"{root}/../outside",
        f"{root}/tiny/../../outside",
        f"{root}/escape",  # a symlink inside the root to a directory outside it
        f"{root}/escape/secret.txt",
        "/etc",
        "~/models",
    ]
    for model in escaping:
        r = c.post("/v1/jobs", json={"corpus_id": fuzz.ids["corpus_id"], "model": model}, headers=headers)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] in ("model_not_allowed", "model_not_found"), r.text
        assert str(root) not in r.text
        r = c.post(
            "/v1/jobs",
            json={"corpus_id": fuzz.ids["corpus_id"], "config": {"reward": {"reward_model": model}}},
            headers=headers,
        )
        error = _error(r, 422, "invalid_config")
        assert [d["code"] for d in error["details"]] == ["model_not_allowed"], error
    # A model under the root, by its path as before ids or by its id (the worker checks it again).
    for model in (f"{root}/tiny", "tiny"):
        r = c.post("/v1/jobs", json={"corpus_id": fuzz.ids["corpus_id"], "model": model}, headers=headers)
        assert r.status_code == 201 and r.json()["model"] == "tiny", r.text


def test_checkpoint_archives_never_leave_the_artifact_dir(c, headers, fuzz) -> None:
    job = fuzz.ids["job_id"]
    artifacts = fuzz.settings.artifact_dir
    link = artifacts / "link-out"
    link.symlink_to(fuzz.outside)
    for step, path in [(7, "../../etc"), (8, "/etc"), (9, "link-out"), (10, "../" * 20 + "etc/passwd")]:
        _plant_checkpoint(fuzz.factory, artifacts, fuzz.tenant.team.id, job, step, path)
        r = c.get(f"/v1/jobs/{job}/checkpoints/{step}/archive", headers=headers)
        _error(r, 404, "not_found")
    # The real checkpoint downloads, without the file that links out of it.
    import io
    import tarfile

    r = c.get(f"/v1/jobs/{job}/checkpoints/1/archive", headers=headers)
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = sorted(Path(n).name for n in tar.getnames())
    assert names == ["adapter_config.json", "manifest.json"]
    assert hashlib.sha256(r.content).hexdigest()  # a complete gzip stream


def test_a_torn_last_line_of_samples_is_not_served(c, headers, fuzz) -> None:
    """A worker appends samples.jsonl while the API reads it (or died mid-append): the half-written
    last line is not a row yet."""
    r = c.get(f"/v1/jobs/{fuzz.ids['job_id']}/samples", headers=headers)
    assert r.status_code == 200, r.text
    assert [row["index"] for row in r.json()["data"]] == [0, 1] and not r.json()["has_more"]


def test_other_teams_see_404_for_every_real_id(c, fuzz) -> None:
    other = make_tenant(fuzz.factory)
    ids = fuzz.ids
    for url in [
        f"/v1/corpora/{ids['corpus_id']}",
        f"/v1/corpora/{ids['corpus_id']}/content",
        f"/v1/instruction-sets/{ids['instruction_set_id']}",
        f"/v1/jobs/{ids['job_id']}",
        f"/v1/jobs/{ids['job_id']}/samples",
        f"/v1/jobs/{ids['job_id']}/checkpoints/1/archive",
    ]:
        _error(c.get(url, headers=other.headers), 404, "not_found")
