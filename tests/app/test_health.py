from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app
from service.settings import Settings


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_ok(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok", "checks": {"postgres": "ok", "redis": "ok"}}


def test_readyz_names_the_failing_dependency(settings: Settings) -> None:
    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0", "readiness_timeout_s": 1.0})
    with TestClient(create_app(broken)) as c:
        response = c.get("/readyz")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "not_ready"
    assert [d["field"] for d in error["details"]] == ["redis"]
    # the probe needs no key: it must not tell anyone where the dependencies live
    assert "127.0.0.1" not in response.text and ":1" not in error["details"][0]["message"]


def test_readyz_checks_the_s3_bucket_when_artifacts_go_there(
    settings: Settings, s3_server: str, s3_bucket: str
) -> None:
    s3 = {"s3_endpoint_url": s3_server, "s3_region": "us-east-1"}
    with TestClient(create_app(settings.model_copy(update={**s3, "s3_bucket": s3_bucket}))) as c:
        response = c.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"postgres": "ok", "redis": "ok", "artifact_store": "ok"}

    missing = settings.model_copy(update={**s3, "s3_bucket": f"{s3_bucket}-missing"})
    with TestClient(create_app(missing)) as c:
        response = c.get("/readyz")
    assert response.status_code == 503
    assert [d["field"] for d in response.json()["error"]["details"]] == ["artifact_store"]
