"""The embedded fallback mode (`app.embedded`): the service on SQLite with an in-process worker.

This is the one test on SQLite. It tests the fallback that `scripts/main.sh` uses where Postgres or
Redis cannot be reached, not the service's database behaviour: every other test of the API runs on
the real Postgres (and the end-to-end test on Redis with a real Celery worker).

A job with a tiny config runs to `succeeded` on the real embedded SmolLM2, in this process, through
the same job runner the Celery task uses; its events, metrics and checkpoint are read back over
HTTP, and the data directory is opened again by a second app.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.ratelimit import LocalRateLimiter
from app.embedded import create_embedded_app, create_key

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "seed": 0,
    "data": {"max_dialogues": 1, "max_turns": 1},
    "sampling": {"k": 2, "max_new_tokens": 16},
    "reward": {"min_reward": 0},
    "training": {"max_steps": 1},
}


def test_embedded_mode_runs_a_job_to_success_on_sqlite(tmp_path: Path, one_thread) -> None:
    data_dir = tmp_path / "embedded"
    key = create_key(data_dir, "embedded-team", "test")
    headers = {"Authorization": f"Bearer {key}"}
    assert (data_dir / "gatt.sqlite3").is_file()

    with TestClient(create_embedded_app(data_dir)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json() == {
            "status": "ok",
            "mode": "embedded",
            "checks": {"sqlite": "ok", "worker": "ok"},
        }
        assert ready.headers["X-Gatt-Mode"] == "embedded"
        assert client.get("/v1/corpora").status_code == 401  # still authenticated
        # Per-key rate limits without Redis: the buckets live in the one process.
        assert isinstance(client.app.state.rate_limiter, LocalRateLimiter)

        lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)
        corpus_ids = []
        for i in range(2):
            r = client.post(
                "/v1/corpora", files={"file": (f"c{i}.jsonl", b"".join(lines[:2]))}, headers=headers
            )
            assert r.status_code == 201, r.text
            corpus_ids.append(r.json()["id"])
        # Keyset pagination over SQLite timestamps: newest first, no duplicates, no gaps.
        first = client.get("/v1/corpora", params={"limit": 1}, headers=headers).json()
        second = client.get("/v1/corpora", params={"limit": 1, "after": first["next_after"]}, headers=headers)
        assert second.status_code == 200, second.text
        assert [first["data"][0]["id"], second.json()["data"][0]["id"]] == corpus_ids[::-1]
        assert not second.json()["has_more"]

        body = {"corpus_id": corpus_ids[0], "config": TINY}
        created = client.post("/v1/jobs", json=body, headers={**headers, "Idempotency-Key": "tiny"})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        again = client.post("/v1/jobs", json=body, headers={**headers, "Idempotency-Key": "tiny"})
        assert (again.status_code, again.json()["id"]) == (200, job_id)

        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        events = client.get(f"/v1/jobs/{job_id}/events", headers=headers).json()["data"]
        assert job["status"] == "succeeded", (job, events)
        assert job["stage"] in ("train", "evaluate") and job["progress"] == 1.0 and job["attempts"] == 1
        assert (job["overall_progress"], job["overall_eta_s"]) == (1.0, None)
        assert job["trained_tokens"] > 0 and job["finished_at"] is not None

        kinds = [e["kind"] for e in events]
        assert kinds[0] == "created" and kinds[-1] == "succeeded" and "checkpoint" in kinds
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))

        metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=headers).json()["data"]
        assert [m["step"] for m in metrics] == [1]
        assert metrics[0]["values"]["trained_tokens"] == job["trained_tokens"]

        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=headers).json()["data"]
        assert [c["step"] for c in checkpoints] == [1]
        archive = client.get(checkpoints[0]["download_url"], headers=headers)
        assert archive.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            names = tar.getnames()
        assert any(n.endswith("/manifest.json") for n in names)

        samples = client.get(f"/v1/jobs/{job_id}/samples", headers=headers).json()["data"]
        assert len(samples) == 1 and len(samples[0]["turns"][0]["candidates"]) == 2
        assert (data_dir / "artifacts").is_dir()

        # The playground, answered in this process: each greedy reply is what stock transformers and
        # peft say with the downloaded checkpoint (and without it, for the base model).
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            tar.extractall(tmp_path / "download", filter="data")
        checkpoint = next((tmp_path / "download").rglob("adapter_config.json")).parent
        conversation = [
            {"role": "user", "content": "Always answer in French.\n\nWhat is the capital of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "And of Spain?"},
        ]
        for model, adapter in (("checkpoint", checkpoint), ("base", None)):
            body = {"messages": conversation, "model": model, "max_new_tokens": 16}
            r = client.post(f"/v1/jobs/{job_id}/chat", json=body, headers=headers)
            assert r.status_code == 200, r.text
            reply = r.json()
            assert reply["model"] == model and reply["step"] == (1 if model == "checkpoint" else None)
            assert reply["message"]["role"] == "assistant" and reply["usage"]["completion_tokens"] > 0
            assert reply["message"]["content"] == stock_reply(conversation, 16, adapter)
        missing = client.post(
            f"/v1/jobs/{job_id}/chat", json={"messages": conversation, "step": 9}, headers=headers
        )
        assert (missing.status_code, missing.json()["error"]["code"]) == (409, "no_checkpoint")

    # The data directory outlives the process: a new app finds the key, the job and its files.
    with TestClient(create_embedded_app(data_dir)) as client:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        assert job["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{job_id}/checkpoints", headers=headers).json()["data"]


def stock_reply(messages: list[dict[str, str]], max_new_tokens: int, adapter: Path | None) -> str:
    """The greedy reply of the embedded model (with `adapter`, a LoRA checkpoint) by stock
    transformers and peft, stopping at the template's end of turn."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engine.models import default_model_dir

    base = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_an_older_embedded_database_gets_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    create_key(tmp_path, "team")  # makes the database
    with sqlite3.connect(tmp_path / "gatt.sqlite3") as db:  # as it was before jobs had a queue
        db.execute("DROP INDEX ix_jobs_queue_status")
        db.execute("ALTER TABLE jobs DROP COLUMN queue")
    key = create_key(tmp_path, "team")
    with sqlite3.connect(tmp_path / "gatt.sqlite3") as db:
        assert "queue" in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        assert ("ix_jobs_queue_status",) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
    with TestClient(create_embedded_app(tmp_path)) as client:
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
