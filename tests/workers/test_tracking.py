"""Experiment tracking (workers/tracking.py) against a real local MLflow store (SQLite): a real job
on the embedded SmolLM2, run in this process through `run_job_by_id` against the real Postgres,
its worker lost after the first checkpoint and the job resumed; one MLflow run holds it all.
A tracking server that cannot be reached does not fail a job."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, update

from app.main import create_app
from service.db import session_scope
from service.models import Job
from service.settings import Settings
from tests.app.factories import make_tenant
from tests.threads import one_torch_thread
from workers.tasks import JobRun, run_job_by_id

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIG = {
    "data": {"max_dialogues": 1, "max_turns": 1},
    "sampling": {"k": 2, "max_new_tokens": 16},
    "reward": {"min_reward": 0},
    "training": {"max_steps": 2, "checkpoint_every": 1, "lora_r": 4},
    "evaluation": {
        "enabled": True,
        "heldout_dialogues": 1,
        "turns": 1,
        "conditions": ["once"],
        "max_new_tokens": 8,
    },
}


@pytest.fixture
def one_thread():
    with one_torch_thread():
        yield


class Crash(BaseException):
    """The worker vanishing (not an Exception: no ending is written)."""


def _job(settings: Settings, name: str) -> tuple[str, object, object]:
    app = create_app(settings, enqueue=lambda job_id: None)
    factory = app.state.sessionmaker
    tenant = make_tenant(factory)
    with TestClient(app) as client:
        lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)[:2]
        corpus = client.post(
            "/v1/corpora", files={"file": ("c.jsonl", b"".join(lines))}, headers=tenant.headers
        )
        body = {"corpus_id": corpus.json()["id"], "config": CONFIG, "name": name}
        created = client.post("/v1/jobs", json=body, headers=tenant.headers)
        assert created.status_code == 201, created.text
    return created.json()["id"], factory, tenant


def test_a_job_is_one_mlflow_run_across_its_attempts(database_url, tmp_path, monkeypatch, one_thread) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = Settings(
        database_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        rate_limit_per_s=0,
        job_queue=f"mlflow-{uuid.uuid4().hex[:8]}",
        mlflow_tracking_uri=uri,
        mlflow_artifact_location=str(tmp_path / "mlartifacts"),
    )
    job_id, factory, tenant = _job(settings, "tracked")
    checkpoint = JobRun.checkpoint

    def crash_after_first(self, step, path, manifest):
        checkpoint(self, step, path, manifest)
        raise Crash

    with monkeypatch.context() as m:
        m.setattr(JobRun, "checkpoint", crash_after_first)
        with pytest.raises(Crash):
            run_job_by_id(job_id, settings, factory)
    with session_scope(factory) as s:  # the lease lapses: the next attempt may take the job
        s.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job_id))
            .values(lease_expires_at=func.now() - timedelta(seconds=1))
        )
    assert run_job_by_id(job_id, settings, factory) == "succeeded"

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(f"gatt/{tenant.team.id}")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.tags["gatt.job_id"] == job_id and run.data.tags["gatt.model"] == "default"
    assert run.data.params["training.max_steps"] == "2" and run.data.params["training.lora_r"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/adapter_model.safetensors", "checkpoint/manifest.json"} <= artifacts
    assert "checkpoint/optimizer.pt" not in artifacts
    assert (tmp_path / "mlartifacts").is_dir() and not (ROOT / "mlruns").exists()
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/adherence_summary.json", "evaluation/adherence_table.md"} <= evaluation


def test_an_unreachable_tracking_server_does_not_fail_the_job(database_url, tmp_path, one_thread) -> None:
    settings = Settings(
        database_url=database_url,
        artifact_dir=tmp_path / "artifacts",
        rate_limit_per_s=0,
        job_queue=f"mlflow-{uuid.uuid4().hex[:8]}",
        mlflow_tracking_uri="http://127.0.0.1:9/",  # discard: nothing listens
    )
    job_id, factory, _ = _job(settings, "untracked")
    assert run_job_by_id(job_id, settings, factory) == "succeeded"
