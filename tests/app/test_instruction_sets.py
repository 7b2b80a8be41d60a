from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from app.instruction_sets.spec_schema import CustomSpec, FamilySpec, InstructionSetSpec
from gatt import instructions
from service.models import InstructionSet, JobStatus
from tests.app.factories import Tenant, count_rows, dialogue, jsonl, make_job, set_job_status

URL = "/v1/instruction-sets"

SPEC = {
    "families": [
        {
            "name": "language",
            "verbose": ["Always answer in {value}."],
            "terse": ["Language: {value}."],
            "values": ["French", "Spanish"],
            "verifier": {"type": "language", "language": "{value}"},
        }
    ]
}


def create(client: TestClient, tenant: Tenant, name: str = "langs", spec: dict | None = None) -> dict:
    response = client.post(URL, json={"name": name, "spec": spec or SPEC}, headers=tenant.headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_get_list_normalized(client: TestClient, tenant: Tenant) -> None:
    created = create(client, tenant, name="  langs  ")
    assert created["name"] == "langs"
    # Normalized: the optional fields are filled in.
    assert created["spec"]["terse_probability"] == 0.5 and created["spec"]["custom"] == []
    got = client.get(f"{URL}/{created['id']}", headers=tenant.headers)
    assert got.status_code == 200 and got.json() == created
    listed = client.get(URL, headers=tenant.headers).json()
    assert listed["data"] == [created] and listed["has_more"] is False and listed["next_after"] is None


def test_every_problem_with_its_path(client: TestClient, tenant: Tenant, db: sessionmaker[Session]) -> None:
    spec = {
        "families": [
            {
                "name": "hobby",
                "verbose": ["You like it."],  # no {value}
                "terse": ["Hobby: {value}."],
                "values": ["chess", "Chess"],  # duplicate
                "verifier": {"type": "no-such-verifier"},
            }
        ],
        "min_constraints": 0,
        "colour": "blue",
    }
    response = client.post(URL, json={"name": "bad", "spec": spec}, headers=tenant.headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_instruction_set"
    found = {(d["field"], d["code"]) for d in error["details"]}
    assert {
        ("spec.colour", "unknown_field"),
        ("spec.min_constraints", "invalid_range"),
        ("spec.families[0].verbose[0]", "missing_placeholder"),
        ("spec.families[0].values[1]", "duplicate"),
    } <= found
    assert any(f.startswith("spec.families[0].verifier") for f, _ in found)
    assert error["param"] == error["details"][0]["field"]
    assert all(d["message"] for d in error["details"])
    assert count_rows(db, InstructionSet, tenant.team.id) == 0


def test_spec_must_be_an_object(client: TestClient, tenant: Tenant) -> None:
    response = client.post(URL, json={"name": "x", "spec": []}, headers=tenant.headers)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "spec"
    response = client.post(URL, json={"name": "x", "spec": {}}, headers=tenant.headers)
    assert response.json()["error"]["code"] == "invalid_instruction_set"


def test_default_set_readable_by_every_team(client: TestClient, tenant: Tenant, other_tenant: Tenant) -> None:
    a = client.get(f"{URL}/default", headers=tenant.headers)
    b = client.get(f"{URL}/default", headers=other_tenant.headers)
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()
    body = a.json()
    assert body["id"] == "default"
    assert {f["name"] for f in body["spec"]["families"]} >= {"hobby", "language"}
    # It is a valid spec: it can be posted back as a team's own set.
    create(client, tenant, name="copy", spec=body["spec"])
    assert client.get(f"{URL}/default").status_code == 401


def test_other_teams_set_is_404(client: TestClient, tenant: Tenant, other_tenant: Tenant) -> None:
    created = create(client, tenant)
    for method in ("GET", "DELETE"):
        response = client.request(method, f"{URL}/{created['id']}", headers=other_tenant.headers)
        assert response.status_code == 404, method
        assert response.json()["error"]["code"] == "not_found"
    assert client.get(URL, headers=other_tenant.headers).json()["data"] == []
    assert client.get(f"{URL}/{created['id']}", headers=tenant.headers).status_code == 200


def test_unknown_id_is_404(client: TestClient, tenant: Tenant) -> None:
    response = client.get(f"{URL}/{uuid.uuid4()}", headers=tenant.headers)
    assert response.status_code == 404 and response.json()["error"]["param"] == "instruction_set_id"


def test_delete(client: TestClient, tenant: Tenant) -> None:
    created = create(client, tenant)
    assert client.delete(f"{URL}/{created['id']}", headers=tenant.headers).status_code == 204
    assert client.get(f"{URL}/{created['id']}", headers=tenant.headers).status_code == 404
    assert client.delete(f"{URL}/{created['id']}", headers=tenant.headers).status_code == 404
    assert client.get(URL, headers=tenant.headers).json()["data"] == []


def test_delete_refused_while_a_job_uses_it(
    client: TestClient, tenant: Tenant, db: sessionmaker[Session]
) -> None:
    created = create(client, tenant)
    corpus = client.post(
        "/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue()))}, headers=tenant.headers
    ).json()
    job = make_job(db, tenant.team.id, uuid.UUID(corpus["id"]), instruction_set_id=uuid.UUID(created["id"]))
    for status in (JobStatus.QUEUED, JobStatus.RUNNING):
        set_job_status(db, job, status)
        response = client.delete(f"{URL}/{created['id']}", headers=tenant.headers)
        assert response.status_code == 409 and response.json()["error"]["code"] == "in_use"
    set_job_status(db, job, JobStatus.SUCCEEDED)
    assert client.delete(f"{URL}/{created['id']}", headers=tenant.headers).status_code == 204


def test_the_published_spec_schema_matches_the_validator(client, tenant):
    # The same fields (the validator's own lists), and the same required ones.
    assert tuple(InstructionSetSpec.model_fields) == instructions._SET_KEYS
    assert tuple(FamilySpec.model_fields) == instructions._FAMILY_KEYS
    assert all(f.is_required() for f in FamilySpec.model_fields.values())
    assert [n for n, f in CustomSpec.model_fields.items() if f.is_required()] == list(
        instructions._CUSTOM_KEYS
    )
    # Every spec the validator takes, raw or normalized, fits the schema; every example set is valid.
    examples = Path(__file__).resolve().parents[2] / "examples"
    found = [json.loads(p.read_text()) for p in sorted(examples.glob("**/*.json"))]
    raw = [spec for spec in found if isinstance(spec, dict) and {"families", "custom"} & spec.keys()]
    default = client.get("/v1/instruction-sets/default", headers=tenant.headers).json()["spec"]
    assert raw and default["families"]
    for spec in [*raw, default]:
        instructions.parse_instruction_set(spec)
        InstructionSetSpec.model_validate(spec)
    # What the validator refuses for its size or shape, the schema refuses too.
    for change in ({"max_constraints": 65}, {"terse_probability": 2}, {"aggregate": "max"}, {"colour": 1}):
        bad = {**default, **change}
        with pytest.raises(instructions.ValidationFailed):
            instructions.parse_instruction_set(bad)
        with pytest.raises(ValidationError):
            InstructionSetSpec.model_validate(bad)
