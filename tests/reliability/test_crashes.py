"""Workers die (SIGKILL) mid-job and others take over; nothing is lost, nothing happens twice.

Each test starts real `celery worker` processes of the real app on a private queue, against a
private Postgres and Redis (see conftest), creates a job over HTTP, and kills a worker at a chosen
point. The reaper (`jobs.reap`, called here as beat would call it) requeues the job once the dead
worker's lease (GATT_LEASE_S=6) ran out, and a new worker resumes it. Afterwards the job must have
ended once, with gap-free events, each metric step and checkpoint once, each dialogue sampled once,
and the work finished before the kill reused rather than redone.
"""

from __future__ import annotations

import json

import pytest

from tests.reliability.conftest import (
    Stack,
    check_finished_job,
    create_job,
    sample_lines,
    tiny_config,
    wait_for,
)

pytestmark = pytest.mark.slow

# Generous: they only matter when something hangs. Unloaded, a worker starts, loads the model and
# samples its first dialogue in ~10 s, and a whole tiny job takes ~15 s.
START_TIMEOUT = 300
RUN_TIMEOUT = 600


def _samples_path(stack: Stack, job_id: str):
    return stack.job_dir(stack.job(job_id)) / "samples.jsonl"


def test_kill_during_sampling_resumes_without_resampling(stack: Stack, api) -> None:
    job_id, tenant = create_job(api, stack, tiny_config())
    path = _samples_path(stack, job_id)
    first = stack.start_worker()

    # One dialogue sampled and fsynced, the second one in progress: kill.
    wait_for(lambda: len(sample_lines(path)) >= 1, START_TIMEOUT, 0.02, "the first sampled dialogue")
    first.kill()
    before = sample_lines(path)
    assert len(before) == 1, "the kill came too late: both dialogues were already sampled"
    job = stack.job(job_id)
    assert job.status.value == "running" and job.stage is not None and job.stage.value == "sample"
    # A crash in the middle of the next append would leave a torn line: add one. The API serves the
    # complete rows meanwhile.
    with open(path, "ab") as f:
        f.write(b'{"index": 1, "dialogue_id": "train-0')
    r = api.get(f"/v1/jobs/{job_id}/samples", headers=tenant.headers)
    assert r.status_code == 200 and [row["index"] for row in r.json()["data"]] == [0], r.text

    # The dead worker's lease still runs: the reaper must leave the job alone until it expires.
    assert stack.reap() == 0 and stack.job(job_id).status.value == "running"
    stack.wait_lease_expired(job_id)
    assert stack.reap() == 1
    assert stack.job(job_id).status.value == "queued"
    assert stack.reap() == 0, "a requeued job is sent once, not on every sweep"

    stack.start_worker()
    stack.wait_terminal(job_id, RUN_TIMEOUT)
    done = check_finished_job(stack, job_id, n_dialogues=2, steps=2)

    after = sample_lines(path)
    assert after[0] == before[0], "the dialogue sampled before the kill was sampled again"
    assert len(after) == 2
    job = done["job"]
    assert job.attempts == 2
    kinds = [e.kind for e in done["events"]]
    assert kinds.count("worker_lost") == 1
    resumed = [e for e in done["events"] if e.kind == "resumed"]
    assert resumed and resumed[0].message.startswith("attempt 2")
    assert job.trained_tokens > 0


def test_kill_during_training_resumes_from_the_last_checkpoint(stack: Stack, api) -> None:
    steps = 6
    job_id, _ = create_job(api, stack, tiny_config(training={"max_steps": steps, "checkpoint_every": 1}))
    first = stack.start_worker()

    # At least one step trained and checkpointed, training not over: kill.
    wait_for(lambda: stack.checkpoints(job_id), START_TIMEOUT, 0.02, "the first checkpoint")
    first.kill()
    job = stack.job(job_id)
    out = stack.job_dir(job)
    steps_at_kill = stack.metric_steps(job_id)
    ckpt_at_kill = max(c.step for c in stack.checkpoints(job_id))
    assert job.status.value == "running" and max(steps_at_kill) < steps, "the kill came too late"
    samples_before = (out / "samples.jsonl").read_bytes()
    training_set_before = (out / "training_set.jsonl").read_bytes()

    stack.wait_lease_expired(job_id)
    assert stack.reap() == 1
    stack.start_worker()
    stack.wait_terminal(job_id, RUN_TIMEOUT)
    done = check_finished_job(stack, job_id, n_dialogues=2, steps=steps)

    # Sampling was finished before the kill: reused byte for byte, and the training set rebuilt the same.
    assert (out / "samples.jsonl").read_bytes() == samples_before
    assert (out / "training_set.jsonl").read_bytes() == training_set_before
    # Training resumed from a checkpoint at least as new as the last one seen before the kill.
    resumed = [e for e in done["events"] if e.kind == "resumed" and e.message.startswith("resuming from")]
    assert len(resumed) == 1 and resumed[0].data["step"] >= ckpt_at_kill, resumed
    started = [e.data["start_step"] for e in done["events"] if e.kind == "train_started"]
    assert started == [0, resumed[0].data["step"]]
    # Only the kept checkpoints are listed (keep_checkpoints: 2), each once.
    assert [c.step for c in done["checkpoints"]] == [steps - 1, steps]
    # Tokens are counted once per step, even for the steps trained twice.
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert done["job"].trained_tokens == sum(m["trained_tokens"] for m in metrics)
    assert done["job"].attempts == 2


def test_a_duplicate_message_while_the_job_runs_starts_no_second_run(stack: Stack, api) -> None:
    # Two task slots in one worker: the duplicate is taken while the first run is still going.
    worker = stack.start_worker(pool="threads", concurrency=2)
    job_id, _ = create_job(api, stack, tiny_config())
    wait_for(lambda: stack.job(job_id).stage is not None, START_TIMEOUT, 0.1, "the job to start")
    stack.send(job_id)  # e.g. Redis redelivering after its visibility timeout
    wait_for(lambda: "'not claimed'" in worker.text(), 60, 0.1, "the duplicate to be refused")
    assert stack.job(job_id).status.value == "running", "the duplicate must arrive while the job runs"

    stack.wait_terminal(job_id, RUN_TIMEOUT)
    done = check_finished_job(stack, job_id, n_dialogues=2, steps=2)
    assert done["job"].attempts == 1
    stages = [e.message for e in done["events"] if e.kind == "stage"]
    assert stages.count("synthesize") == 1 and stages.count("sample") == 1
    assert "resumed" not in [e.kind for e in done["events"]]
    # One run returned "succeeded" (Celery's line per task, a JSON object: service/logs.py).
    lines = [json.loads(line) for line in worker.text().splitlines() if line.startswith("{")]
    assert sum(line["message"].endswith(": 'succeeded'") for line in lines) == 1


def test_attempts_exhausted_fail_with_worker_lost(stack: Stack, api) -> None:
    job_id, _ = create_job(api, stack, tiny_config())
    first = stack.start_worker(GATT_MAX_ATTEMPTS="1")
    wait_for(lambda: stack.job(job_id).status.value == "running", START_TIMEOUT, 0.05, "the job to start")
    first.kill()
    stack.wait_lease_expired(job_id)
    assert stack.reap() == 1
    stack.start_worker(GATT_MAX_ATTEMPTS="1")
    job = stack.wait_terminal(job_id, 120)

    assert job.status.value == "failed" and job.error_code == "worker_lost", (job.status, job.error_code)
    assert job.attempts == 2 and job.finished_at is not None and job.lease_expires_at is None
    events = stack.events(job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    # The log ends with the failure, like every other ending (succeeded, cancelled, error).
    assert events[-1].level == "error" and events[-1].kind == "worker_lost", [e.kind for e in events]


def test_a_cancel_whose_worker_died_ends_cancelled_with_an_event(stack: Stack, api) -> None:
    job_id, tenant = create_job(api, stack, tiny_config())
    first = stack.start_worker()
    wait_for(lambda: stack.job(job_id).status.value == "running", START_TIMEOUT, 0.05, "the job to start")
    first.kill()
    r = api.post(f"/v1/jobs/{job_id}/cancel", headers=tenant.headers)
    assert r.status_code == 200 and r.json()["cancel_requested"], r.text
    stack.wait_lease_expired(job_id)
    stack.reap()  # the worker is gone: nobody is left to stop, so the reaper ends the job
    job = stack.job(job_id)
    assert job.status.value == "cancelled" and job.finished_at is not None
    events = stack.events(job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind == "cancelled", [e.kind for e in events]
