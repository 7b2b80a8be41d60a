"""`/v1/keys`: a team makes, lists and revokes its own keys; never another team's."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.test_errors import error_of

URL = "/v1/keys"


def test_a_team_rotates_its_keys(client, tenant, other_tenant):
    made = client.post(URL, json={"name": "ci"}, headers=tenant.headers)
    assert made.status_code == 201, made.text
    new = made.json()
    assert (
        new["key"].startswith(f"gatt_{new['prefix']}_") and new["name"] == "ci" and new["revoked_at"] is None
    )
    new_headers = {"Authorization": f"Bearer {new['key']}"}
    assert client.get("/v1/corpora", headers=new_headers).status_code == 200  # it works at once

    listed = client.get(URL, headers=new_headers).json()["data"]
    assert {k["prefix"] for k in listed} == {tenant.prefix, new["prefix"]}
    assert all("key" not in k for k in listed)  # only the answer that made it holds the key

    # Another team sees none of them and cannot revoke them.
    assert {k["prefix"] for k in client.get(URL, headers=other_tenant.headers).json()["data"]} == {
        other_tenant.prefix
    }
    error_of(client.delete(f"{URL}/{new['prefix']}", headers=other_tenant.headers), 404, "not_found")

    # The new key revokes the old one: the old stops authenticating, the new goes on.
    revoked = client.delete(f"{URL}/{tenant.prefix}", headers=new_headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    error_of(client.get("/v1/corpora", headers=tenant.headers), 401, "invalid_api_key")
    assert client.get("/v1/corpora", headers=new_headers).status_code == 200
    error_of(client.delete(f"{URL}/NOT-A-PREFIX", headers=new_headers), 422, "invalid_request")
    error_of(client.post(URL, json={"name": "x" * 101}, headers=new_headers), 422, "invalid_request")


def test_keys_are_bounded_per_team(settings, tenant):
    app = create_app(settings.model_copy(update={"team_max_api_keys": 2}), enqueue=lambda job_id: None)
    with TestClient(app) as client:
        assert client.post(URL, json={}, headers=tenant.headers).status_code == 201  # 2 of 2
        error = error_of(client.post(URL, json={}, headers=tenant.headers), 422, "quota_exceeded")
        assert error["details"] == [{"quota": "api_keys", "limit": 2, "used": 2}]
        assert len(client.get(URL, headers=tenant.headers).json()["data"]) == 2  # nothing stored
