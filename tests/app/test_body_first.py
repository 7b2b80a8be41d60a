"""BodyFirst hands the app the exact body it stored, in memory or on disk, chunked or not."""

from __future__ import annotations

import hashlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app.core.body_first import MEMORY_BYTES, BodyFirst
from app.core.errors import Unauthorized


async def digest(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"size": len(body), "sha256": hashlib.sha256(body).hexdigest()})


def client(max_bytes: int = 8 * MEMORY_BYTES) -> TestClient:
    def authenticate(authorization: str | None) -> None:
        if authorization != "Bearer ok":
            raise Unauthorized("No API key.", code="missing_api_key")

    app = Starlette(routes=[Route("/", digest, methods=["POST"])])
    wrapped = BodyFirst(
        app, authenticate=authenticate, auth_slots=1, max_bytes=max_bytes, grace_s=5, min_bytes_per_s=1
    )
    return TestClient(wrapped)


def test_the_app_reads_the_body_it_was_sent():
    body = bytes(range(256)) * (3 * MEMORY_BYTES // 256 + 7)  # beyond memory: replayed from a file
    for content in (body, b'{"a": 1}', iter([body[:1000], body[1000:]])):  # the last one is chunked
        expected = body if not isinstance(content, bytes) else content
        r = client().post("/", content=content, headers={"Authorization": "Bearer ok"})
        assert r.json() == {"size": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}


def test_no_key_no_read_and_too_large_is_refused_before_reading():
    r = client().post("/", content=b"x" * 10, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = client(max_bytes=100).post("/", content=b"x" * 101, headers={"Authorization": "Bearer ok"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    chunked = iter([b"x" * 60, b"x" * 60])  # no Content-Length: counted as it arrives
    r = client(max_bytes=100).post("/", content=chunked, headers={"Authorization": "Bearer ok"})
    assert r.status_code == 413
