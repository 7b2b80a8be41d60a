"""A real job with S3 artifact storage (moto's standalone S3 server; see the `s3_server` fixture): the
worker uploads as it goes, a crash after the first checkpoint is resumed "on another machine" (the
local scratch directory wiped) from what the store holds, and the API serves samples, the training
set, the evaluation and a checkpoint archive from S3 alone.

The job runs in this process through `run_job_by_id` (the body of the Celery task `jobs.run`, as the
embedded mode calls it), on the embedded SmolLM2 with a tiny config, against the real Postgres.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import uuid
from datetime import timedelta
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, update

import workers.engine.evaluation as evaluation_module
import workers.engine.sample_stage as sample_stage
from app.main import create_app
from service.db import session_scope
from service.models import Job
from service.settings import Settings
from tests.app.factories import make_tenant
from workers import tasks
from workers.engine.eval_schema import JobEvaluation
from workers.tasks import JobRun, run_job_by_id

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PREFIX = "gatt/artifacts"

CONFIG = {
    "seed": 0,
    "data": {"max_dialogues": 1, "max_turns": 1},
    "sampling": {"k": 2, "max_new_tokens": 16},
    "reward": {"min_reward": 0},
    # keep_checkpoints 1: step 1 is rotated out when step 2 is written, so its store copy must go too.
    "training": {"max_steps": 2, "checkpoint_every": 1, "keep_checkpoints": 1},
    "evaluation": {
        "enabled": True,
        "heldout_dialogues": 1,
        "turns": 1,
        "conditions": ["once"],
        "max_new_tokens": 8,
    },
}


class Crash(BaseException):
    """The worker vanishing: not an Exception, so the task writes no ending, as after a SIGKILL."""


def _keys(bucket: str, endpoint: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=PREFIX + "/")
    return [o["Key"][len(PREFIX) + 1 :] for page in pages for o in page.get("Contents", [])]


def test_job_artifacts_live_in_s3_and_survive_a_move_to_another_machine(
    database_url, s3_server, s3_bucket, tmp_path, monkeypatch, one_thread
) -> None:
    scratch = tmp_path / "scratch"
    settings = Settings(
        database_url=database_url,
        artifact_dir=scratch,
        s3_bucket=s3_bucket,
        s3_prefix=PREFIX,
        s3_endpoint_url=s3_server,
        s3_region="us-east-1",
        rate_limit_per_s=0,
        # A queue of its own: a worker starts the fairest job of its queue, and the shared test
        # database holds other tests' queued jobs on the default one.
        job_queue=f"s3-{uuid.uuid4().hex[:8]}",
    )
    calls = {"sample": 0, "evaluate": 0}
    sample_chunk, evaluate = sample_stage._sample_chunk, evaluation_module.evaluate_adherence

    def counting_sample_chunk(*args, **kwargs):
        calls["sample"] += 1
        return sample_chunk(*args, **kwargs)

    def counting_evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(sample_stage, "_sample_chunk", counting_sample_chunk)
    monkeypatch.setattr(evaluation_module, "evaluate_adherence", counting_evaluate)

    app = create_app(settings, enqueue=lambda job_id: None)
    factory = app.state.sessionmaker
    tenant = make_tenant(factory)
    headers = tenant.headers
    with TestClient(app) as client:
        lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)[:2]
        corpus = client.post("/v1/corpora", files={"file": ("c.jsonl", b"".join(lines))}, headers=headers)
        assert corpus.status_code == 201, corpus.text
        created = client.post(
            "/v1/jobs", json={"corpus_id": corpus.json()["id"], "config": CONFIG}, headers=headers
        )
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        job_key = f"{tenant.team.id}/{job_id}"

        # Attempt 1: the worker vanishes right after its first checkpoint is recorded.
        checkpoint = JobRun.checkpoint

        def crash_after_first(self, step, path, manifest):
            checkpoint(self, step, path, manifest)
            raise Crash

        with monkeypatch.context() as m:
            m.setattr(JobRun, "checkpoint", crash_after_first)
            with pytest.raises(Crash):
                run_job_by_id(job_id, settings, factory)
        assert calls == {"sample": 1, "evaluate": 1}  # one dialogue sampled; the base model evaluated
        keys = _keys(s3_bucket, s3_server)
        assert f"{job_key}/train/checkpoints/step-000001/manifest.json" in keys
        for name in ("samples.jsonl", "training_set.jsonl", "evaluation/base.json", "train/metrics.jsonl"):
            assert f"{job_key}/{name}" in keys, name
        # Served from S3 while the job is still "running" (its worker gone).
        rows = client.get(f"/v1/jobs/{job_id}/samples", headers=headers).json()
        assert len(rows["data"]) == 1 and not rows["has_more"]

        # Attempt 2, on "another machine": the scratch directory is empty, the lease has lapsed.
        shutil.rmtree(scratch)
        with session_scope(factory) as s:
            expired = func.now() - timedelta(seconds=1)
            s.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(lease_expires_at=expired))
        assert run_job_by_id(job_id, settings, factory) == "succeeded"
        # Sampling and the base evaluation came back from the store; only the trained model was evaluated.
        assert calls == {"sample": 1, "evaluate": 2}
        events = client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()["data"]
        resumed = [e for e in events if e["kind"] == "resumed"]
        assert [e["data"] and e["data"].get("step") for e in resumed] == [None, 1], resumed
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        assert job["status"] == "succeeded" and job["attempts"] == 2

        # Only the newest checkpoint is kept: the rotated one is gone from the store and unlisted.
        keys = _keys(s3_bucket, s3_server)
        assert not [k for k in keys if "step-000001" in k]
        assert f"{job_key}/summary.json" in keys and f"{job_key}/evaluation/attention.png" in keys
        # What GET /evaluation reads: the report without its transcripts.
        assert f"{job_key}/evaluation/adherence_summary.json" in keys

        # The API reads from S3 alone.
        shutil.rmtree(scratch)
        samples = client.get(f"/v1/jobs/{job_id}/samples", headers=headers).json()
        assert len(samples["data"]) == 1 and len(samples["data"][0]["turns"][0]["candidates"]) == 2
        assert client.get(f"/v1/jobs/{job_id}/samples?offset=1", headers=headers).json()["data"] == []
        training = client.get(f"/v1/jobs/{job_id}/training-set", headers=headers).json()["data"]
        assert len(training) == 1
        evaluation = client.get(f"/v1/jobs/{job_id}/evaluation", headers=headers)
        assert evaluation.status_code == 200 and evaluation.json()["attention"]["base"], evaluation.text
        JobEvaluation.model_validate(evaluation.json())  # the published schema holds
        plot = client.get(f"/v1/jobs/{job_id}/evaluation/attention.png", headers=headers)
        assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
        assert plot.headers["content-type"] == "image/png"

        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=headers).json()["data"]
        assert [c["step"] for c in checkpoints] == [2]
        archive = client.get(checkpoints[0]["download_url"], headers=headers)
        assert archive.status_code == 200 and archive.headers["content-type"] == "application/gzip"
        out = tmp_path / "download"
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            tar.extractall(out, filter="data")
        (ckpt,) = list(out.iterdir())
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert manifest == checkpoints[0]["manifest"] and manifest["step"] == 2
        extracted = {
            p.relative_to(ckpt).as_posix(): p
            for p in ckpt.rglob("*")
            if p.is_file() and p.name != "manifest.json"
        }
        assert set(extracted) == set(manifest["files"]) and "adapter_model.safetensors" in extracted
        for rel, info in manifest["files"].items():
            data = extracted[rel].read_bytes()
            assert (hashlib.sha256(data).hexdigest(), len(data)) == (info["sha256"], info["bytes"]), rel

        # A checkpoint whose files are gone from the store answers 404, as with a local directory.
        client_s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
        client_s3.delete_object(
            Bucket=s3_bucket, Key=f"{PREFIX}/{job_key}/train/checkpoints/step-000002/manifest.json"
        )
        gone = client.get(checkpoints[0]["download_url"], headers=headers)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert tasks.error_of(tasks.StoreError("boom"))[0] == "artifact_store"
