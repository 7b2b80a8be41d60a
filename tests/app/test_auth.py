from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app import admin
from app.auth import keys
from app.auth import service as auth_service
from service.db import session_scope
from tests.app.factories import Tenant

URL = "/v1/instruction-sets"


def assert_401(response, code: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["param"] is None


def test_missing_key(client: TestClient) -> None:
    assert_401(client.get(URL), "missing_api_key")
    assert_401(client.get(URL, headers={"Authorization": ""}), "missing_api_key")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer gatt_abcdefgh_" + "x" * 43,  # well formed, unknown prefix
    ],
)
def test_invalid_key(client: TestClient, header: str) -> None:
    assert_401(client.get(URL, headers={"Authorization": header}), "invalid_api_key")


def test_right_prefix_wrong_secret(client: TestClient, tenant: Tenant) -> None:
    forged = f"gatt_{tenant.prefix}_" + "A" * 43
    assert keys.parse_prefix(forged) == tenant.prefix
    assert_401(client.get(URL, headers={"Authorization": f"Bearer {forged}"}), "invalid_api_key")


def test_valid_key_and_scheme_case(client: TestClient, tenant: Tenant) -> None:
    assert client.get(URL, headers=tenant.headers).status_code == 200
    assert client.get(URL, headers={"Authorization": f"bearer {tenant.key}"}).status_code == 200


def test_revoked_key(client: TestClient, tenant: Tenant, db: sessionmaker[Session]) -> None:
    with session_scope(db) as session:
        auth_service.revoke_key(session, tenant.prefix)
    response = client.get(URL, headers=tenant.headers)
    assert_401(response, "invalid_api_key")
    assert "revoked" in response.json()["error"]["message"]


def test_key_format() -> None:
    new = keys.generate_key()
    assert new.key.startswith(f"gatt_{new.prefix}_") and len(new.prefix) == 8
    assert keys.parse_prefix(new.key) == new.prefix
    assert new.key_hash == keys.hash_key(new.key) and len(new.key_hash) == 64
    assert keys.key_matches(new.key, new.key_hash)
    assert not keys.key_matches(new.key + "x", new.key_hash)
    assert new.key not in new.key_hash


def test_admin_cli_create_team_key_revoke(
    client: TestClient, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import uuid

    team = f"cli-{uuid.uuid4().hex[:10]}"
    assert admin.main(["create-team", team]) == 0
    assert admin.main(["create-team", team]) == 1  # exists
    assert "team_exists" in capsys.readouterr().err

    assert admin.main(["create-key", team, "--name", "ci"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get(URL, headers=headers).status_code == 200

    prefix = keys.parse_prefix(key)
    assert prefix is not None
    assert admin.main(["list-keys", team]) == 0
    listing = capsys.readouterr().out
    assert prefix in listing and key not in listing

    assert admin.main(["revoke-key", prefix]) == 0
    assert_401(client.get(URL, headers=headers), "invalid_api_key")
    assert admin.main(["create-key", "no-such-team-" + uuid.uuid4().hex]) == 1
