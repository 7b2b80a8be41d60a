"""Webhook endpoints over the API (real Postgres, no worker): create with its secret once, list, get,
delete, rotate, the delivery log; SSRF refusals at create time; the outbox row written with a job's
ending; and one delivery attempt against a local receiver, signature verified."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from app.main import create_app
from service import webhooks
from service.db import session_scope
from service.models import JobStatus, WebhookDelivery
from service.repositories import jobs
from service.secrets import secret_box
from service.settings import Settings
from tests.app.factories import Tenant, dialogue, jsonl, make_job, make_tenant

LOCAL = ["127.0.0.1/32"]


@pytest.fixture(scope="module")
def allowed(database_url: str) -> Iterator[tuple[TestClient, Settings]]:
    """An app whose operator allows 127.0.0.1 (the local receiver); no webhook messages are sent."""
    settings = Settings(
        database_url=database_url, webhook_allow_hosts=LOCAL, team_max_webhooks=3, webhook_backoff_s=1
    )
    with TestClient(create_app(settings, enqueue=lambda _: None)) as c:
        yield c, settings


@pytest.fixture
def me(allowed) -> Tenant:
    return make_tenant(allowed[0].app.state.sessionmaker)


class Receiver(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []
    received: list[tuple[dict, bytes]] = []
    extra_headers: dict[str, str] = {}

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((dict(self.headers), body))
        code = Receiver.answers.pop(0) if Receiver.answers else 204
        self.send_response(code)
        for k, v in Receiver.extra_headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.answers, Receiver.received, Receiver.extra_headers = [], [], {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks?x=1"
    finally:
        server.shutdown()


def _create(client, tenant, url, types=("job.succeeded",)):
    return client.post("/v1/webhooks", json={"url": url, "event_types": list(types)}, headers=tenant.headers)


def test_create_shows_the_secret_once_and_the_team_owns_the_endpoint(allowed, me, receiver):
    client, _ = allowed
    r = _create(client, me, receiver, ["job.succeeded", "job.failed", "job.succeeded"])
    assert r.status_code == 201, r.text
    hook = r.json()
    assert hook["secret"].startswith("whsec_") and hook["event_types"] == ["job.succeeded", "job.failed"]
    got = client.get(f"/v1/webhooks/{hook['id']}", headers=me.headers).json()
    assert "secret" not in got and got["url"] == receiver
    listed = client.get("/v1/webhooks?limit=1", headers=me.headers).json()
    assert [h["id"] for h in listed["data"]] == [hook["id"]] and "secret" not in listed["data"][0]

    other = make_tenant(client.app.state.sessionmaker)
    for method, path in [
        ("get", ""),
        ("delete", ""),
        ("post", "/rotate-secret"),
        ("get", "/deliveries"),
    ]:
        r = getattr(client, method)(f"/v1/webhooks/{hook['id']}{path}", headers=other.headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (method, path)
    assert client.get("/v1/webhooks", headers=other.headers).json()["data"] == []

    rotated = client.post(f"/v1/webhooks/{hook['id']}/rotate-secret", headers=me.headers).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != hook["secret"]
    assert client.delete(f"/v1/webhooks/{hook['id']}", headers=me.headers).status_code == 204
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=me.headers).status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://[::1]/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://10.1.2.3/x",
        "http://192.168.0.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/x",
        "http://224.0.0.1/x",
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://user:pw@example.com/x",
        "http:///nohost",
        "http://example.com:99999/x",
    ],
)
def test_non_public_and_odd_urls_are_refused_without_the_allowlist(client, tenant, url):
    r = _create(client, tenant, url)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_webhook_url" and r.json()["error"]["param"] == "url"
    assert client.get("/v1/webhooks", headers=tenant.headers).json()["data"] == []


def test_a_host_with_any_private_address_is_refused():
    def resolve(host, port, type):  # one public and one private address: refused
        return [
            (socket.AF_INET, type, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, type, 6, "", ("10.0.0.5", port)),
        ]

    with pytest.raises(webhooks.UrlRefused, match="10.0.0.5"):
        webhooks.check_url("https://hooks.example.com/x", [], resolve=resolve)
    assert webhooks.check_url(
        "https://hooks.example.com/x", ["10.0.0.0/8", "93.184.216.0/24"], resolve=resolve
    )
    assert webhooks.check_url("https://hooks.example.com/x", ["hooks.example.com"], resolve=resolve)
    target = webhooks.check_url(
        "https://Hooks.Example.com/a?b=c", [], resolve=lambda h, p, type: resolve(h, p, type)[:1]
    )
    assert (target.address, target.port, target.path, target.host) == (
        "93.184.216.34",
        443,
        "/a?b=c",
        "hooks.example.com",
    )


def test_bad_bodies_and_the_quota(allowed, me, receiver):
    client, _ = allowed
    too_long = "http://127.0.0.1/" + "a" * 2048
    assert _create(client, me, too_long).status_code == 422
    assert _create(client, me, receiver, ["job.exploded"]).status_code == 422
    assert _create(client, me, receiver, []).status_code == 422
    for _ in range(3):
        assert _create(client, me, receiver).status_code == 201
    r = _create(client, me, receiver)
    assert r.status_code == 422 and r.json()["error"]["code"] == "quota_exceeded"
    assert r.json()["error"]["details"][0] == {"quota": "webhooks", "limit": 3, "used": 3}


def _ended_job(client, tenant, status: JobStatus, owner="w1") -> uuid.UUID:
    factory = client.app.state.sessionmaker
    r = client.post("/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0)))}, headers=tenant.headers)
    job_id = make_job(factory, tenant.team.id, uuid.UUID(r.json()["id"]))
    with session_scope(factory) as s:
        assert jobs.claim(s, job_id, owner, 60) is not None
    with session_scope(factory) as s:  # the ending, as a worker writes it
        assert jobs.finish(
            s, job_id, owner, status, error_code="boom" if status == JobStatus.FAILED else None
        )
    return job_id


def test_an_ending_records_one_delivery_per_subscribed_endpoint_and_it_is_signed(allowed, me, receiver):
    client, settings = allowed
    factory = client.app.state.sessionmaker
    hook = _create(client, me, receiver, ["job.succeeded"]).json()
    failed_only = _create(client, me, receiver, ["job.failed"]).json()
    job_id = _ended_job(client, me, JobStatus.SUCCEEDED)
    log = client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=me.headers).json()["data"]
    assert len(log) == 1 and log[0]["status"] == "pending" and log[0]["attempts"] == 0
    assert log[0]["payload"]["data"]["job_id"] == str(job_id) and log[0]["payload"]["type"] == "job.succeeded"
    assert client.get(f"/v1/webhooks/{failed_only['id']}/deliveries", headers=me.headers).json()["data"] == []
    with session_scope(factory) as s:  # writing the same cause again records nothing new
        jobs.webhooks.record_job_ended(s, job_id)
    assert len(client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=me.headers).json()["data"]) == 1

    Receiver.answers = [500]
    delivery_id = uuid.UUID(log[0]["id"])
    assert webhooks.deliver(factory, settings, delivery_id) == 1.0  # failed: retry after the backoff
    assert webhooks.deliver(factory, settings, delivery_id) is None  # not due yet: nothing sent
    with session_scope(factory) as s:
        s.get(WebhookDelivery, delivery_id).next_attempt_at = jobs.current_time(s)
    assert webhooks.deliver(factory, settings, delivery_id) is None  # delivered
    assert len(Receiver.received) == 2
    (h1, b1), (h2, b2) = Receiver.received
    assert h1["webhook-id"] == h2["webhook-id"] == log[0]["event_id"] and b1 == b2
    assert Webhook(hook["secret"]).verify(b2, h2)["data"]["status"] == "succeeded"
    entry = client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=me.headers).json()["data"][0]
    assert (entry["status"], entry["attempts"], entry["last_status_code"]) == ("delivered", 2, 204)
    assert entry["delivered_at"] and entry["next_attempt_at"] is None


def test_redirects_are_not_followed_and_attempts_are_bounded(allowed, me, receiver):
    client, base = allowed
    settings = base.model_copy(update={"webhook_max_attempts": 2})
    factory = client.app.state.sessionmaker
    hook = _create(client, me, receiver, ["job.failed"]).json()
    _ended_job(client, me, JobStatus.FAILED)
    delivery_id = uuid.UUID(
        client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=me.headers).json()["data"][0]["id"]
    )
    Receiver.answers, Receiver.extra_headers = [302, 302], {"Location": "http://169.254.169.254/"}
    assert webhooks.deliver(factory, settings, delivery_id) == 1.0
    with session_scope(factory) as s:
        s.get(WebhookDelivery, delivery_id).next_attempt_at = jobs.current_time(s)
    assert webhooks.deliver(factory, settings, delivery_id) is None
    assert len(Receiver.received) == 2  # only the receiver, never the Location
    entry = client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=me.headers).json()["data"][0]
    assert (entry["status"], entry["attempts"], entry["last_status_code"]) == ("failed", 2, 302)
    assert "redirect" in entry["last_error"] and entry["payload"]["data"]["error"]["code"] == "boom"


def test_a_delivery_to_a_loopback_url_is_refused_at_send_time_without_the_allowlist(allowed, me, receiver):
    client, settings = allowed
    factory = client.app.state.sessionmaker
    hook = _create(client, me, receiver, ["job.cancelled"]).json()
    _ended_job(client, me, JobStatus.CANCELLED)
    delivery_id = uuid.UUID(
        client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=me.headers).json()["data"][0]["id"]
    )
    strict = settings.model_copy(update={"webhook_allow_hosts": []})  # the operator took it back
    assert webhooks.deliver(factory, strict, delivery_id) == 1.0
    assert Receiver.received == []
    entry = client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=me.headers).json()["data"][0]
    assert entry["last_error"].startswith("refused") and entry["last_status_code"] is None


def test_a_large_answer_is_read_only_in_part(allowed, me):
    class Big(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(50 * 1024 * 1024))
            self.end_headers()
            try:
                for _ in range(50 * 1024):
                    self.wfile.write(b"x" * 1024)
            except OSError:
                pass  # the client hung up after a few KiB, as it should

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Big)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = webhooks.check_url(f"http://127.0.0.1:{server.server_address[1]}/", LOCAL)
        outcome = webhooks.post(target, {}, json.dumps({}).encode(), 5)
        assert outcome.ok and outcome.status_code == 200
    finally:
        server.shutdown()


def _deliveries(client, tenant, hook_id):
    return client.get(f"/v1/webhooks/{hook_id}/deliveries", headers=tenant.headers).json()["data"]


def test_an_endpoint_that_keeps_failing_is_disabled_then_enabled_and_a_delivery_resent(allowed, me, receiver):
    client, base = allowed
    settings = base.model_copy(update={"webhook_max_attempts": 1, "webhook_disable_after": 2})
    factory = client.app.state.sessionmaker
    hook = _create(client, me, receiver, ["job.succeeded", "job.failed"]).json()
    other = _create(client, me, receiver, ["job.failed"]).json()  # its failures are its own
    Receiver.answers = [500, 503]
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        _ended_job(client, me, status)
    log = _deliveries(client, me, hook["id"])
    # One failure: the endpoint still counts as working; a delivered one in between would reset it.
    assert webhooks.deliver(factory, settings, uuid.UUID(log[1]["id"])) is None
    assert client.get(f"/v1/webhooks/{hook['id']}", headers=me.headers).json()["enabled"]
    assert webhooks.deliver(factory, settings, uuid.UUID(log[0]["id"])) is None
    shown = client.get(f"/v1/webhooks/{hook['id']}", headers=me.headers).json()
    assert (
        not shown["enabled"]
        and shown["disabled_at"]
        and "2 deliveries in a row failed" in shown["disabled_reason"]
    )
    assert {d["status"] for d in _deliveries(client, me, other["id"])} == {"pending"}

    # Disabled: nothing more is recorded for it, and a resend is refused until it is enabled.
    _ended_job(client, me, JobStatus.SUCCEEDED)
    assert len(_deliveries(client, me, hook["id"])) == 2
    refused = client.post(f"/v1/webhooks/{hook['id']}/deliveries/{log[0]['id']}/resend", headers=me.headers)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "webhook_disabled"

    assert client.post(f"/v1/webhooks/{hook['id']}/enable", headers=me.headers).json()["enabled"]
    resent = client.post(f"/v1/webhooks/{hook['id']}/deliveries/{log[0]['id']}/resend", headers=me.headers)
    assert resent.status_code == 200, resent.text
    assert (resent.json()["status"], resent.json()["attempts"]) == ("pending", 0)
    Receiver.received.clear()
    assert webhooks.deliver(factory, settings, uuid.UUID(log[0]["id"])) is None
    ((headers, _),) = Receiver.received
    assert headers["webhook-id"] == log[0]["event_id"]  # the same event: receivers de-duplicate on it
    assert _deliveries(client, me, hook["id"])[0]["status"] == "delivered"
    _ended_job(client, me, JobStatus.FAILED)  # enabled again: new events are recorded
    assert len(_deliveries(client, me, hook["id"])) == 3
    missing = client.post(f"/v1/webhooks/{other['id']}/deliveries/{log[0]['id']}/resend", headers=me.headers)
    assert missing.status_code == 404


def test_secrets_are_sealed_at_rest_with_the_operators_keys(database_url, receiver):
    from cryptography.fernet import Fernet

    from service.models import WebhookEndpoint

    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings = Settings(database_url=database_url, webhook_allow_hosts=LOCAL, secret_keys=[old_key])
    with TestClient(create_app(settings, enqueue=lambda _: None)) as client:
        factory = client.app.state.sessionmaker
        me = make_tenant(factory)
        made = _create(client, me, receiver, ["job.succeeded"]).json()
        with session_scope(factory) as s:
            stored = s.get(WebhookEndpoint, uuid.UUID(made["id"])).secret
        assert stored.startswith("fernet:") and made["secret"] not in stored
        assert Fernet(old_key).decrypt(stored.removeprefix("fernet:").encode()).decode() == made["secret"]

        # The operator puts a new key first; the old one still opens what it sealed.
        rotated_keys = settings.model_copy(update={"secret_keys": [new_key, old_key]})
        _ended_job(client, me, JobStatus.SUCCEEDED)
        (entry,) = client.get(f"/v1/webhooks/{made['id']}/deliveries", headers=me.headers).json()["data"]
        assert webhooks.deliver(factory, rotated_keys, uuid.UUID(entry["id"])) is None
        ((headers, body),) = Receiver.received
        assert Webhook(made["secret"]).verify(body, headers)["type"] == "job.succeeded"
        with session_scope(factory) as s:  # sealed again with the new first key at that delivery
            resealed = s.get(WebhookEndpoint, uuid.UUID(made["id"])).secret
        assert Fernet(new_key).decrypt(resealed.removeprefix("fernet:").encode()).decode() == made["secret"]

        # A process without the key cannot sign, and says why instead of sending a wrong signature.
        with pytest.raises(ValueError, match="GATT_SECRET_KEYS"):
            secret_box(()).open(resealed)
