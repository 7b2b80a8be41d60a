"""What operators see of the API (app/core/observe.py, service/logs.py): a request id on every
answer, one JSON access line per request naming the team, and `/metrics` counting requests by route
template and jobs by state. Real Postgres, the app in process; tests/e2e/test_service_e2e.py scrapes
a running job and a real worker's metrics and JSON logs."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from service import logs
from service.settings import Settings
from tests.app.factories import dialogue, jsonl, make_tenant


@pytest.fixture(scope="module")
def client(database_url: str):
    settings = Settings(database_url=database_url, rate_limit_per_s=0, metrics_token="scrape-me")
    with TestClient(create_app(settings, enqueue=lambda _: None)) as c:
        yield c


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def test_every_answer_has_a_request_id_and_one_access_line(client, caplog) -> None:
    tenant = make_tenant(client.app.state.sessionmaker)
    with caplog.at_level(logging.INFO, logger="gatt.access"):
        given = client.get("/v1/corpora", headers={**tenant.headers, "X-Request-ID": "trace-42.a"})
        made = client.get("/v1/corpora/00000000-0000-0000-0000-000000000000", headers=tenant.headers)
        odd = client.get("/healthz", headers={"X-Request-ID": "no spaces allowed"})
    assert given.headers["x-request-id"] == "trace-42.a"
    assert len(made.headers["x-request-id"]) == 32 and made.status_code == 404
    assert odd.headers["x-request-id"] != "no spaces allowed"
    lines = [r for r in caplog.records if r.name == "gatt.access"]
    assert [(r.getMessage(), r.status) for r in lines] == [
        ("GET /v1/corpora 200", 200),
        ("GET /v1/corpora/{corpus_id} 404", 404),
        ("GET /healthz 200", 200),
    ]
    assert lines[0].request_id == "trace-42.a" and lines[0].team_id == str(tenant.team.id)
    assert lines[1].request_id == made.headers["x-request-id"] and not hasattr(lines[2], "team_id")


def test_metrics_count_requests_by_route_and_jobs_by_state(client) -> None:
    tenant = make_tenant(client.app.state.sessionmaker)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scrape = {"Authorization": "Bearer scrape-me"}
    before = client.get("/metrics", headers=scrape).text
    corpus = client.post(
        "/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0)))}, headers=tenant.headers
    )
    job = client.post("/v1/jobs", json={"corpus_id": corpus.json()["id"]}, headers=tenant.headers).json()
    client.get(f"/v1/jobs/{job['id']}", headers=tenant.headers)
    after = client.get("/metrics", headers=scrape)
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")

    def count(text: str, **labels: str) -> float:
        return sum(
            v for found, v in samples(text, "gatt_http_requests_total") if labels.items() <= found.items()
        )

    assert (
        count(after.text, route="/v1/jobs/{job_id}", status="200")
        == count(before, route="/v1/jobs/{job_id}", status="200") + 1
    )
    assert count(after.text, route="/v1/jobs", method="POST", status="201") >= 1
    assert not [x for x, _ in samples(after.text, "gatt_http_requests_total") if job["id"] in x["route"]]

    def queued(text: str) -> float:
        return sum(
            v for x, v in samples(text, "gatt_jobs") if x["status"] == "queued" and x["queue"] == "gpu"
        )

    assert queued(after.text) == queued(before) + 1


def test_json_lines_carry_the_bound_context(capsys) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure_logging("json", "INFO")
        with logs.bind(job_id="j-1", attempt=2):
            logs.annotate(team_id="t-9")
            logging.getLogger("gatt.test").info("sampling %d dialogues", 3)
        logging.getLogger("gatt.test").warning("outside")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines()[-2:])
    assert (
        first["message"] == "sampling 3 dialogues"
        and first["level"] == "INFO"
        and first["logger"] == "gatt.test"
    )
    assert (first["job_id"], first["attempt"], first["team_id"]) == (
        "j-1",
        "2",
        "t-9",
    ) and "timestamp" in first
    assert second["message"] == "outside" and "job_id" not in second
