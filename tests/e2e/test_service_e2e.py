"""End to end, with every real part: Postgres, Redis, a `celery worker` process and the embedded
SmolLM2 model. A job is created over HTTP, polled to `succeeded`, and its events, metrics and
checkpoint are read back; the checkpoint loads with stock transformers/peft. A second job is
cancelled while it trains and must stop within one step."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery
from fastapi.testclient import TestClient

from app.main import create_app
from service.settings import Settings
from tests.app.factories import make_tenant
from workers.engine.eval_schema import JobEvaluation

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("GATT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stack(database_url, tmp_path_factory):
    """The API (in-process, over HTTP via TestClient) and one real worker process on a private queue."""
    tmp = tmp_path_factory.mktemp("e2e")
    queue = f"gpu-test-{uuid.uuid4().hex[:8]}"  # no other session's worker can take our jobs
    env = {
        **os.environ,
        "GATT_DATABASE_URL": database_url,
        "GATT_REDIS_URL": REDIS_URL,
        "GATT_ARTIFACT_DIR": str(tmp / "artifacts"),
        "GATT_JOB_QUEUE": queue,
        "GATT_LEASE_S": "30",
    }
    broker = Celery(broker=REDIS_URL)
    settings = Settings(
        database_url=database_url, redis_url=REDIS_URL, artifact_dir=tmp / "artifacts", job_queue=queue
    )
    app = create_app(
        settings, enqueue=lambda job_id: broker.send_task("jobs.run", args=[str(job_id)], queue=queue)
    )
    with open(tmp / "worker.log", "w") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                "worker",
                "-Q",
                queue,
                "--pool",
                "solo",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            with TestClient(app) as client:
                yield client, app, tmp
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
    print((tmp / "worker.log").read_text()[-5000:])


def _corpus(client, headers, n: int) -> str:
    lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)[:n]
    r = client.post("/v1/corpora", files={"file": ("chats.jsonl", b"".join(lines))}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _ahoy_set(client, headers) -> str:
    spec = {
        "custom": [
            {
                "name": "ahoy",
                "text": "Always start your reply with 'Ahoy!'",
                "verifiers": [{"type": "starts_with", "text": "Ahoy!"}],
            }
        ]
    }
    r = client.post("/v1/instruction-sets", json={"name": "ahoy", "spec": spec}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _wait(client, headers, job_id, until, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if until(job):
            return job
        time.sleep(1)
    pytest.fail(f"job {job_id} did not get there in {timeout}s: {job}")


def test_job_runs_to_success_and_its_checkpoint_loads(stack):
    client, app, tmp = stack
    tenant = make_tenant(app.state.sessionmaker)
    headers = tenant.headers
    body = {
        "corpus_id": _corpus(client, headers, 3),
        "instruction_set_id": _ahoy_set(client, headers),
        "config": {
            "data": {"max_turns": 2},
            "evaluation": {"enabled": True, "heldout_dialogues": 1, "turns": 2, "max_new_tokens": 16},
            "sampling": {"k": 2, "max_new_tokens": 32, "batch_prompts": 2},
            # The e2e test is about the plumbing: accept any finished reply.
            "reward": {"min_reward": 0.0},
            "training": {"max_steps": 2, "micro_batch_size": 2, "checkpoint_every": 1},
        },
    }
    created = client.post("/v1/jobs", json=body, headers=headers)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    job = _wait(client, headers, job_id, lambda j: j["status"] in TERMINAL, timeout=900)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["trained_tokens"] > 0 and job["finished_at"]
    assert job["latest_metrics"]["step"] == 2

    events = client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()["data"]
    kinds = [e["kind"] for e in events]
    stages = [e["message"] for e in events if e["kind"] == "stage"]
    assert stages[:4] == ["synthesize", "sample", "evaluate", "train"]
    assert kinds.count("checkpoint") == 2 and kinds[-1] == "succeeded"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

    metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=headers).json()["data"]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["values"]["loss"] > 0 for m in metrics)

    samples = client.get(f"/v1/jobs/{job_id}/samples", headers=headers).json()["data"]
    assert len(samples) == 2 and all(len(t["candidates"]) == 2 for s in samples for t in s["turns"])
    training = client.get(f"/v1/jobs/{job_id}/training-set", headers=headers).json()["data"]
    assert training and all(
        span.endswith("<|im_end|>") for row in training for ex in row["trained_spans"] for span in ex
    )

    evaluation = client.get(f"/v1/jobs/{job_id}/evaluation", headers=headers).json()
    JobEvaluation.model_validate(evaluation)  # the published schema holds
    assert [row["turn"] for row in evaluation["gatt"]["conditions"]["once"]["turns"]] == [1, 2]
    assert "once" in evaluation["table"] and evaluation["attention"]["base"]
    plot = client.get(f"/v1/jobs/{job_id}/evaluation/attention.png", headers=headers)
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    assert stages.count("evaluate") == 2  # before training (base) and after

    checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=headers).json()["data"]
    assert [c["step"] for c in checkpoints] == [1, 2]
    archive = client.get(checkpoints[-1]["download_url"], headers=headers)
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/gzip"
    out = tmp / "download"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        tar.extractall(out, filter="data")
    (ckpt,) = list(out.iterdir())
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 2 and "adapter_model.safetensors" in manifest["files"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engine.models import default_model_dir

    base = AutoModelForCausalLM.from_pretrained(default_model_dir(), local_files_only=True)
    model = PeftModel.from_pretrained(base, ckpt)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_cancel_stops_a_training_job_within_one_step(stack):
    client, app, _ = stack
    tenant = make_tenant(app.state.sessionmaker)
    headers = tenant.headers
    body = {
        "corpus_id": _corpus(client, headers, 2),
        "config": {
            "data": {"max_turns": 1},
            "sampling": {"k": 2, "max_new_tokens": 24, "batch_prompts": 2},
            "reward": {"min_reward": 0.0},
            "training": {"max_steps": 500, "micro_batch_size": 1},
        },
    }
    job_id = client.post("/v1/jobs", json=body, headers=headers).json()["id"]
    _wait(
        client,
        headers,
        job_id,
        lambda j: (j["latest_metrics"] or {}).get("step", 0) >= 1 or j["status"] in TERMINAL,
        timeout=900,
    )
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["cancel_requested"], r.text
    # Steps recorded once the cancel is stored: the step in flight may still finish, no other may start.
    steps_at_cancel = max(
        m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics", headers=headers).json()["data"]
    )
    job = _wait(client, headers, job_id, lambda j: j["status"] in TERMINAL, timeout=120)
    assert job["status"] == "cancelled", job
    steps = [m["step"] for m in client.get(f"/v1/jobs/{job_id}/metrics", headers=headers).json()["data"]]
    assert max(steps) <= steps_at_cancel + 1  # the step in flight may finish; no further one starts
    kinds = [e["kind"] for e in client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()["data"]]
    assert "cancel_requested" in kinds and kinds[-1] == "cancelled"
