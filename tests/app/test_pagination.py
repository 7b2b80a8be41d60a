from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.core.pagination import decode_cursor
from service.pagination import encode_cursor
from tests.app.factories import Tenant, dialogue, jsonl

URL = "/v1/instruction-sets"
SPEC = {
    "custom": [
        {"text": "Start every reply with 'Ahoy!'", "verifiers": [{"type": "starts_with", "text": "Ahoy!"}]}
    ]
}


def make_sets(client: TestClient, tenant: Tenant, n: int) -> list[str]:
    ids = []
    for i in range(n):
        response = client.post(URL, json={"name": f"s{i}", "spec": SPEC}, headers=tenant.headers)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids[::-1]  # newest first


def page(client: TestClient, tenant: Tenant, **params) -> dict:
    response = client.get(URL, params=params, headers=tenant.headers)
    assert response.status_code == 200, response.text
    return response.json()


def test_exactly_limit_items_has_no_more(client: TestClient, tenant: Tenant) -> None:
    ids = make_sets(client, tenant, 3)
    body = page(client, tenant, limit=3)
    assert [s["id"] for s in body["data"]] == ids
    assert body["has_more"] is False and body["next_after"] is None


def test_limit_plus_one_has_more_and_after_continues(client: TestClient, tenant: Tenant) -> None:
    ids = make_sets(client, tenant, 7)
    seen: list[str] = []
    params: dict = {"limit": 3}
    pages = 0
    while True:
        body = page(client, tenant, **params)
        pages += 1
        seen += [s["id"] for s in body["data"]]
        if not body["has_more"]:
            assert body["next_after"] is None
            break
        assert len(body["data"]) == 3
        params["after"] = body["next_after"]
    assert pages == 3
    assert seen == ids  # every item once, newest first


def test_cursor_survives_deleting_the_item_it_points_at(client: TestClient, tenant: Tenant) -> None:
    ids = make_sets(client, tenant, 4)
    first = page(client, tenant, limit=2)
    assert first["has_more"] is True
    assert client.delete(f"{URL}/{ids[1]}", headers=tenant.headers).status_code == 204
    second = page(client, tenant, limit=2, after=first["next_after"])
    assert [s["id"] for s in second["data"]] == ids[2:]
    assert second["has_more"] is False


def test_default_limit_and_bounds(client: TestClient, tenant: Tenant) -> None:
    make_sets(client, tenant, 21)
    body = page(client, tenant)
    assert len(body["data"]) == 20 and body["has_more"] is True
    assert len(page(client, tenant, limit=100)["data"]) == 21
    for bad in (0, 101, -1):
        response = client.get(URL, params={"limit": bad}, headers=tenant.headers)
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "invalid_request"
        assert response.json()["error"]["param"] == "limit"


@pytest.mark.parametrize("cursor", ["garbage", "", "e30", encode_cursor.__name__, "WyJ4IiwgInkiXQ"])
def test_invalid_cursor(client: TestClient, tenant: Tenant, cursor: str) -> None:
    response = client.get(URL, params={"after": cursor}, headers=tenant.headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_cursor" and error["param"] == "after"


def test_cursor_round_trip() -> None:
    import uuid
    from datetime import UTC, datetime

    when, id_ = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), uuid.uuid4()
    cursor = decode_cursor(encode_cursor(when, id_))
    assert (cursor.created_at, cursor.id) == (when, id_)


def test_corpora_paginate_too(client: TestClient, tenant: Tenant) -> None:
    for i in range(3):
        files = {"file": (f"c{i}.jsonl", jsonl(dialogue(i)))}
        assert client.post("/v1/corpora", files=files, headers=tenant.headers).status_code == 201
    first = client.get("/v1/corpora", params={"limit": 2}, headers=tenant.headers).json()
    assert [c["name"] for c in first["data"]] == ["c2.jsonl", "c1.jsonl"] and first["has_more"]
    rest = client.get(
        "/v1/corpora", params={"limit": 2, "after": first["next_after"]}, headers=tenant.headers
    ).json()
    assert [c["name"] for c in rest["data"]] == ["c0.jsonl"] and not rest["has_more"]
