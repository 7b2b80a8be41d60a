"""The error envelope everywhere, body limits, and the OpenAPI documentation of both."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from app.main import create_app
from service.settings import Settings
from tests.app.conftest import MAX_JSON_BODY_BYTES
from tests.app.factories import Tenant


def error_of(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"code", "message", "param"} <= set(error)
    assert error["code"] == code, error
    return error


def test_unknown_route(client: TestClient) -> None:
    error = error_of(client.get("/v1/nope"), 404, "not_found")
    assert error["param"] is None


def test_wrong_method(client: TestClient) -> None:
    response = client.put("/v1/instruction-sets")
    error_of(response, 405, "method_not_allowed")
    assert response.headers["allow"]


def test_bad_query_param(client: TestClient, tenant: Tenant) -> None:
    error = error_of(client.get("/v1/corpora?limit=0", headers=tenant.headers), 422, "invalid_request")
    assert error["param"] == "limit"
    assert error["details"][0]["location"] == "query"
    error = error_of(client.get("/v1/corpora?limit=abc", headers=tenant.headers), 422, "invalid_request")
    assert error["param"] == "limit"


def test_bad_path_param(client: TestClient, tenant: Tenant) -> None:
    error = error_of(client.get("/v1/corpora/not-a-uuid", headers=tenant.headers), 422, "invalid_request")
    assert error["param"] == "corpus_id"


def test_bad_json_body(client: TestClient, tenant: Tenant) -> None:
    response = client.post(
        "/v1/instruction-sets",
        content=b'{"name": ',
        headers={**tenant.headers, "Content-Type": "application/json"},
    )
    error_of(response, 422, "invalid_request")
    error = error_of(
        client.post("/v1/instruction-sets", json={"spec": {}, "extra": 1}, headers=tenant.headers),
        422,
        "invalid_request",
    )
    assert {d["field"] for d in error["details"]} == {"name", "extra"}


def test_unexpected_exception_is_500_without_traceback(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as c:
        response = c.get("/boom")
    error = error_of(response, 500, "internal_error")
    assert "secret" not in response.text and "Traceback" not in response.text
    assert error["param"] is None


def test_json_body_over_limit_by_content_length(client: TestClient, tenant: Tenant) -> None:
    body = {"name": "big", "spec": {"families": [], "padding": "x" * MAX_JSON_BODY_BYTES}}
    error = error_of(
        client.post("/v1/instruction-sets", json=body, headers=tenant.headers), 413, "payload_too_large"
    )
    assert error["message"]


def test_json_body_over_limit_when_streamed(client: TestClient, tenant: Tenant) -> None:
    chunks = (
        [b'{"name": "big", "spec": {"x": "'] + [b"x" * 4096] * (MAX_JSON_BODY_BYTES // 4096 + 2) + [b'"}}']
    )
    response = client.post(
        "/v1/instruction-sets",
        content=iter(chunks),  # no Content-Length: chunked
        headers={**tenant.headers, "Content-Type": "application/json"},
    )
    error_of(response, 413, "payload_too_large")


def test_openapi_documents_everything(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            where = f"{method.upper()} {path}"
            assert op.get("summary") and op.get("description"), where
            assert op.get("tags"), where
            if path.startswith("/v1"):
                has_input = bool(op.get("parameters") or op.get("requestBody"))
                for status in ("401", "422") if has_input else ("401",):
                    schema = op["responses"][status]["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, where
                assert op.get("security") == [{"ApiKey": []}], where
            for param in op.get("parameters", []):
                assert param.get("description"), f"{where} {param['name']}"
    for name, schema in spec["components"]["schemas"].items():
        assert name not in ("HTTPValidationError", "ValidationError")
        for prop, value in schema.get("properties", {}).items():
            assert value.get("description"), f"{name}.{prop}"
    upload = spec["paths"]["/v1/corpora"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["required"] == ["file"]


def test_operation_ids_read_as_method_names(client: TestClient) -> None:
    # Client generators name their methods after these.
    spec = client.get("/openapi.json").json()
    ids = {
        f"{method.upper()} {path}": op["operationId"]
        for path, methods in spec["paths"].items()
        for method, op in methods.items()
    }
    assert ids["POST /v1/jobs"] == "create_job"
    assert ids["GET /v1/jobs"] == "list_jobs"
    assert ids["GET /v1/jobs/{job_id}"] == "get_job"
    assert ids["POST /v1/jobs/{job_id}/cancel"] == "cancel_job"
    assert ids["GET /v1/corpora/{corpus_id}"] == "get_corpus"
    assert ids["DELETE /v1/instruction-sets/{instruction_set_id}"] == "delete_instruction_set"
    assert len(set(ids.values())) == len(ids)


def test_every_response_carries_the_security_headers(client: TestClient, tenant) -> None:
    for response in (
        client.get("/v1/jobs", headers=tenant.headers),  # a tenant's data
        client.get("/v1/nope"),  # an error
        client.get("/healthz"),
    ):
        assert response.headers["x-content-type-options"] == "nosniff", response.url
        assert response.headers["cache-control"] == "no-store", response.url


def test_the_docs_pages_load_no_script_from_another_site(client) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200 and "text/html" in html.headers["content-type"]
        sources = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert sources and all(s.startswith("/") for s in sources), sources
        for source in sources:
            asset = client.get(source)
            assert asset.status_code == 200 and len(asset.content) > 1000, source
