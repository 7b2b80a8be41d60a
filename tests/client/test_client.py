"""The Python client against a real uvicorn server on the real Postgres (no worker: jobs stay
queued unless cancelled): typed answers and errors, pages, idempotent creation, waiting with
If-None-Match, the event stream, retries after Retry-After, and checkpoint verification."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gatt_client import ApiError, AsyncClient, ChecksumMismatch, Client, models
from gatt_client._archive import unpack_verified
from gatt_client.errors import Conflict, NotFound, RateLimited, Unprocessable
from pydantic import ValidationError

from app.main import create_app
from service.settings import Settings
from tests.app.factories import Tenant, dialogue, make_tenant
from tests.servers import serving

REDIS_URL = os.environ.get("GATT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory) -> Iterator[tuple[str, object]]:
    settings = Settings(database_url=database_url, artifact_dir=tmp_path_factory.mktemp("artifacts"))
    app = create_app(settings, enqueue=lambda job_id: None)
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}", app


@pytest.fixture
def tenant(server) -> Tenant:
    return make_tenant(server[1].state.sessionmaker)


@pytest.fixture
def client(server, tenant) -> Iterator[Client]:
    with Client(server[0], tenant.key) as c:
        yield c


def test_corpora_upload_pages_and_typed_errors(client, tmp_path):
    first = client.corpora.upload([dialogue(i, turns=2) for i in range(3)], name="from dialogues")
    assert isinstance(first, models.Corpus)
    assert (first.name, first.stats.dialogues, first.stats.user_turns) == ("from dialogues", 3, 6)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(dialogue(i)) + "\n" for i in range(2)))
    second = client.corpora.upload(path)
    assert second.name == "chats.jsonl" and client.corpora.get(second.id) == second
    assert client.corpora.content(second.id).count(b"\n") == 2
    # Every page, followed to the end: three pages of one.
    client.corpora.upload([dialogue(9)])
    assert len(list(client.corpora.list(limit=1))) == 3

    with pytest.raises(Unprocessable) as bad:
        client.corpora.upload(b'{"messages": []}\nnot json\n')
    assert bad.value.code == "invalid_corpus"
    assert {d["line"] for d in bad.value.details} == {1, 2}
    assert "line 2" in str(bad.value)
    with pytest.raises(NotFound) as missing:
        client.corpora.get("00000000-0000-0000-0000-000000000000")
    assert missing.value.code == "not_found"


def test_jobs_create_idempotently_wait_and_follow_to_the_end(client):
    corpus = client.corpora.upload([dialogue(i) for i in range(2)])
    with pytest.raises(ValidationError, match="max_stepz"):  # checked against the schema before it is sent
        client.jobs.create(corpus.id, config={"training": {"max_stepz": 3}})
    request = {"config": {"training": {"max_steps": 3}}, "name": "nightly", "metadata": {"run": "7"}}
    job = client.jobs.create(corpus.id, **request, idempotency_key="key-1")
    again = client.jobs.create(corpus.id, **request, idempotency_key="key-1")
    assert again.id == job.id and job.status.value == "queued" and job.metadata == {"run": "7"}
    with pytest.raises(Conflict) as reused:
        client.jobs.create(corpus.id, idempotency_key="key-1")
    assert reused.value.code == "idempotency_key_reused"
    assert job.config.training.max_steps == 3
    assert any(j.id == job.id for j in client.jobs.list(status="queued"))

    # Nothing runs it: waiting times out, each poll after the first answered 304.
    seen = []
    with pytest.raises(TimeoutError):
        client.jobs.wait(job.id, timeout=0.5, interval=0.1, on_change=seen.append)
    assert len(seen) == 1

    client.jobs.cancel(job.id)
    assert client.jobs.wait(job.id, timeout=10).status.value == "cancelled"
    items = list(client.jobs.follow(job.id))
    assert [i.kind for i in items][-1] == "end" and items[-1].status == "cancelled"
    kinds = [i.event.kind for i in items if i.kind == "event"]
    assert kinds[-1] == "cancelled" and kinds == [e.kind for e in client.jobs.events(job.id)]
    # Resuming after the first message gives the rest, without a repeat.
    rest = list(client.jobs.follow(job.id, last_event_id=items[0].id))
    assert [i.id for i in rest] == [i.id for i in items[1:]]


def test_the_client_waits_out_a_rate_limit(database_url, tmp_path):
    settings = Settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        artifact_dir=tmp_path,
        rate_limit_per_s=2.0,
        rate_limit_burst=1,
    )
    app = create_app(settings, enqueue=lambda job_id: None)
    tenant = make_tenant(app.state.sessionmaker)
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}"
        with Client(url, tenant.key, max_retries=0) as impatient:
            impatient.jobs.config_defaults()
            with pytest.raises(RateLimited) as limited:
                impatient.jobs.config_defaults()
            assert limited.value.code == "rate_limited" and limited.value.retry_after is not None
        with Client(url, tenant.key) as patient:
            started = time.monotonic()
            for _ in range(3):
                assert patient.jobs.config_defaults().training.max_steps is None
            assert time.monotonic() - started > 0.4  # it waited for the bucket, as Retry-After said


def test_the_async_client_does_the_same(server, tenant):
    async def scenario() -> list[str]:
        async with AsyncClient(server[0], tenant.key) as client:
            corpus = await client.corpora.upload([dialogue(1)])
            job = await client.jobs.create(corpus.id, idempotency_key="async")
            await client.jobs.cancel(job.id)
            ended = await client.jobs.wait(job.id, timeout=10, interval=0.1)
            assert ended.status.value == "cancelled"
            listed = [c.id async for c in client.corpora.list(limit=1)]
            assert listed == [corpus.id]
            return [item.kind async for item in client.jobs.follow(job.id)]

    kinds = asyncio.run(scenario())
    assert kinds[-1] == "end" and "event" in kinds


def _archive(
    tmp_path: Path, files: dict[str, bytes], manifest_files: dict | None = None
) -> tuple[Path, dict]:
    listed = {
        "step": 2,
        "files": manifest_files
        or {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for name, data in files.items()
        },
    }
    path = tmp_path / "ckpt.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in {**files, "manifest.json": json.dumps(listed).encode()}.items():
            info = tarfile.TarInfo(f"job-step-000002/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, listed


def test_a_checkpoint_unpacks_only_when_every_file_matches_its_manifest(tmp_path):
    files = {"adapter_model.safetensors": b"weights", "tokenizer/tokenizer.json": b"{}"}
    archive, listed = _archive(tmp_path, files)
    folder = unpack_verified(archive, tmp_path / "ok", listed)
    assert (folder / "tokenizer" / "tokenizer.json").read_bytes() == b"{}"
    with pytest.raises(FileExistsError):
        unpack_verified(archive, tmp_path / "ok", listed)

    # A file changed after its hash was taken; a file the manifest does not list; a manifest
    # other than the one the API lists.
    good = {k: {"sha256": hashlib.sha256(v).hexdigest(), "bytes": len(v)} for k, v in files.items()}
    tampered, _ = _archive(tmp_path, {**files, "adapter_model.safetensors": b"weightz"}, good)
    extra, _ = (
        _archive(tmp_path / "x", {**files, "run.sh": b"rm -rf /"}, good)
        if (tmp_path / "x").mkdir() is None
        else None
    )
    for archive_path, manifest in ((tampered, listed), (extra, listed)):
        with pytest.raises(ChecksumMismatch):
            unpack_verified(archive_path, tmp_path / "bad", manifest)
    assert not any((tmp_path / "bad").iterdir())  # nothing of a refused checkpoint stays


def test_webhooks_through_the_client(database_url, tmp_path):
    settings = Settings(
        database_url=database_url, artifact_dir=tmp_path, webhook_allow_hosts=["127.0.0.2/32"]
    )
    app = create_app(settings, enqueue=lambda job_id: None, send_webhook_delivery=lambda delivery_id: None)
    tenant = make_tenant(app.state.sessionmaker)
    with serving(app) as port, Client(f"http://127.0.0.1:{port}", tenant.key) as client:
        with pytest.raises(Unprocessable) as refused:  # loopback, and not on the operator's list
            client.webhooks.create("http://127.0.0.1:9/hook", ["job.succeeded"])
        assert refused.value.code == "invalid_webhook_url" and refused.value.param == "url"
        created = client.webhooks.create("http://127.0.0.2:9/hook", ["job.succeeded", "checkpoint.created"])
        assert created.secret.startswith("whsec_")
        assert [w.id for w in client.webhooks.list()] == [created.id]
        rotated = client.webhooks.rotate_secret(created.id)
        assert rotated.secret != created.secret and client.webhooks.get(created.id).url == created.url
        assert list(client.webhooks.deliveries(created.id)) == []
        client.webhooks.delete(created.id)
        with pytest.raises(NotFound):
            client.webhooks.get(created.id)

        # The same through the command line.
        import subprocess
        import sys

        env = {**os.environ, "GATT_URL": f"http://127.0.0.1:{port}", "GATT_API_KEY": tenant.key}

        def gatt(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "gatt_client", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        made = gatt("--json", "webhooks", "create", "http://127.0.0.2:9/cli", "--event", "job.failed")
        assert made.returncode == 0, made.stderr
        hook = json.loads(made.stdout)
        assert hook["secret"].startswith("whsec_") and hook["event_types"] == ["job.failed"]
        assert f"{hook['id']}  http://127.0.0.2:9/cli  job.failed" in gatt("webhooks", "list").stdout
        assert gatt("webhooks", "rotate-secret", hook["id"]).stdout.startswith("secret whsec_")
        assert gatt("webhooks", "deliveries", hook["id"]).stdout == ""
        assert gatt("webhooks", "delete", hook["id"]).stdout.strip() == f"{hook['id']} deleted"
        refused = gatt("webhooks", "create", "http://127.0.0.1:9/x")
        assert refused.returncode == 1 and "invalid_webhook_url" in refused.stderr


def test_keys_through_the_client_and_the_command_line(server, tenant, tmp_path):
    import subprocess
    import sys

    url = server[0]
    with Client(url, tenant.key) as client:
        made = client.keys.create("ci")
        assert made.key.startswith(f"gatt_{made.prefix}_")
    # The command line, configured by a profile file only.
    profile = tmp_path / "config.toml"
    profile.write_text(f'[profiles.work]\nurl = "{url}"\napi_key = "{made.key}"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("GATT_URL", "GATT_API_KEY")}
    env.update(GATT_CONFIG=str(profile), GATT_PROFILE="work")

    def gatt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gatt_client", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = gatt("--json", "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert {json.loads(line)["prefix"] for line in listed.stdout.splitlines()} == {tenant.prefix, made.prefix}
    assert gatt("keys", "revoke", tenant.prefix).stdout.strip() == f"{tenant.prefix} revoked"
    with Client(url, tenant.key) as old, pytest.raises(ApiError) as refused:
        old.keys.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    missing = gatt("keys", "revoke", "zzzzzzzz")
    assert missing.returncode == 1 and "404 not_found" in missing.stderr
