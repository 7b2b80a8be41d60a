"""End to end, with every real part: Postgres, Redis, uvicorn, a `celery worker` process and the
embedded SmolLM2 model. A job is driven through the Python client (`gatt_client`): created,
waited on to `succeeded`, its events, stream, metrics and artifacts read back, its checkpoint
downloaded (every file checked against the manifest) and loaded with stock transformers/peft.
Another runs through the `gatt` command line. A third is cancelled while it trains and must stop
within one step. A model dropped under the model root trains, and a second job continues that
job's LoRA checkpoint; the result loads with stock transformers/peft."""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from gatt_client import Client
from gatt_client.errors import NotFound
from standardwebhooks import Webhook

from app.jobs.chat import RedisChat
from app.main import create_app
from service.queue import CHAT_TASK
from service.settings import Settings
from tests.app.factories import make_tenant
from tests.browser import chromium, screenshot
from tests.servers import free_port, serving
from workers.engine.eval_schema import JobEvaluation

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("GATT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ALLOW = ["127.0.0.1/32"]


class Receiver(http.server.BaseHTTPRequestHandler):
    """A team's webhook endpoint: keeps what it is sent, answers 200."""

    received: list[tuple[dict, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.received.append((dict(self.headers), body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def stack(database_url, tmp_path_factory):
    """The API on a real uvicorn server and one real worker process on a private queue."""
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "models").mkdir()  # the model root: empty until a test drops a model in
    queue = f"gpu-test-{uuid.uuid4().hex[:8]}"  # no other session's worker can take our jobs
    metrics_port = free_port()
    env = {
        **os.environ,
        "GATT_DATABASE_URL": database_url,
        "GATT_REDIS_URL": REDIS_URL,
        "GATT_ARTIFACT_DIR": str(tmp / "artifacts"),
        "GATT_JOB_QUEUE": queue,
        # The same worker delivers webhooks (to the test's receiver on 127.0.0.1, allowed here).
        "GATT_WEBHOOK_QUEUE": queue,
        "GATT_WEBHOOK_ALLOW_HOSTS": json.dumps(ALLOW),
        "GATT_LEASE_S": "30",
        "GATT_MODEL_ROOTS": str(tmp / "models"),
        "GATT_WORKER_METRICS_PORT": str(metrics_port),
        "GATT_LOG_FORMAT": "json",
    }
    broker = Celery(broker=REDIS_URL)
    settings = Settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        artifact_dir=tmp / "artifacts",
        job_queue=queue,
        webhook_queue=queue,
        webhook_allow_hosts=ALLOW,
        model_roots=[tmp / "models"],
        # The one worker loads both models for the first chat turn: on 2 busy cores that can pass 60 s.
        chat_timeout_s=300,
    )
    app = create_app(
        settings,
        enqueue=lambda job_id: broker.send_task("jobs.run", args=[str(job_id)], queue=queue),
        send_webhook_delivery=lambda id: broker.send_task("webhooks.deliver", args=[str(id)], queue=queue),
        chat=RedisChat(REDIS_URL, lambda request: broker.send_task(CHAT_TASK, args=[request], queue=queue)),
    )
    app.state.worker_metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # for the tests below
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
            with serving(app) as port:
                yield f"http://127.0.0.1:{port}", app, tmp
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
    print((tmp / "worker.log").read_text()[-5000:])


def _corpus(client: Client, n: int) -> str:
    lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)[:n]
    return str(client.corpora.upload(b"".join(lines), name="chats.jsonl").id)


AHOY = {
    "custom": [
        {
            "name": "ahoy",
            "text": "Always start your reply with 'Ahoy!'",
            "verifiers": [{"type": "starts_with", "text": "Ahoy!"}],
        }
    ]
}


def test_job_runs_to_success_through_the_client_and_its_checkpoint_loads(stack, receiver):
    url, app, tmp = stack
    tenant = make_tenant(app.state.sessionmaker)
    client = Client(url, tenant.key)
    hook = client.webhooks.create(receiver, ["job.succeeded", "checkpoint.created"])
    corpus_id = _corpus(client, 3)
    config = {
        "data": {"max_turns": 2},
        "evaluation": {"enabled": True, "heldout_dialogues": 1, "turns": 2, "max_new_tokens": 16},
        "sampling": {"k": 2, "max_new_tokens": 32, "batch_prompts": 2},
        # The e2e test is about the plumbing: accept any finished reply.
        "reward": {"min_reward": 0.0},
        "training": {"max_steps": 2, "micro_batch_size": 2, "checkpoint_every": 1},
    }
    created = client.jobs.create(
        corpus_id,
        instruction_set_id=client.instruction_sets.create("ahoy", AHOY).id,
        config=config,
        idempotency_key="e2e-success",
    )
    seen: list = []
    job = client.jobs.wait(created.id, timeout=900, interval=1, on_change=seen.append)
    assert job.status.value == "succeeded", job
    assert job.progress == 1.0 and job.trained_tokens > 0 and job.finished_at
    # One figure for the whole job: it only grows, and an ETA comes once some work was timed.
    running = [j for j in seen if j.status.value == "running"]
    overall = [j.overall_progress for j in running]
    assert overall == sorted(overall) and any(0 < p < 1 for p in overall), overall
    assert any(j.overall_eta_s is not None and j.overall_eta_s >= 0 for j in running), running
    assert (job.overall_progress, job.overall_eta_s, job.eta_s) == (1.0, None, None)
    assert job.latest_metrics["step"] == 2

    events = list(client.jobs.events(job.id))
    kinds = [e.kind for e in events]
    stages = [e.message for e in events if e.kind == "stage"]
    assert stages[:4] == ["synthesize", "sample", "evaluate", "train"]
    assert kinds.count("checkpoint") == 2 and kinds[-1] == "succeeded"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    # The stream replays the same events, then the metrics, and ends with the status.
    streamed = list(client.jobs.follow(job.id))
    assert [i.event.seq for i in streamed if i.kind == "event"] == [e.seq for e in events]
    assert streamed[-1].status == "succeeded"

    metrics = list(client.jobs.metrics(job.id))
    assert [m.step for m in metrics] == [1, 2]
    assert all(m.values["loss"] > 0 for m in metrics)

    samples = list(client.jobs.samples(job.id))
    assert len(samples) == 2 and all(len(t.candidates) == 2 for s in samples for t in s.turns)
    training = list(client.jobs.training_set(job.id))
    assert training and all(
        span.endswith("<|im_end|>") for row in training for ex in row.trained_spans for span in ex
    )

    evaluation = client.jobs.evaluation(job.id)
    JobEvaluation.model_validate(evaluation.model_dump(mode="json"))  # the server's schema holds too
    assert [row.turn for row in evaluation.gatt.conditions["once"].turns] == [1, 2]
    assert "once" in evaluation.table and evaluation.attention["base"]
    assert client.jobs.attention_plot(job.id).startswith(b"\x89PNG")
    assert stages.count("evaluate") == 2  # before training (base) and after
    losses = evaluation.validation_loss
    assert (
        losses["base"].loss > 0 and losses["gatt"].loss > 0 and losses["gatt"].tokens == losses["base"].tokens
    )
    assert "Validation loss" in evaluation.table

    listed = client.jobs.checkpoints(job.id)
    assert [c.step for c in listed] == [1, 2]
    assert listed[-1].download_url == f"{url}/v1/jobs/{job.id}/checkpoints/2/archive"
    ckpt = client.jobs.download_checkpoint(job.id, dest=tmp / "download")  # sha256 of each file checked
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 2 and "adapter_model.safetensors" in manifest["files"]

    # Signed webhooks for both checkpoints and the ending, each delivered once it committed.
    deadline = time.monotonic() + 60
    while len(Receiver.received) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    messages = [Webhook(hook.secret).verify(body, headers) for headers, body in Receiver.received]
    assert sorted((m["type"], m["data"].get("step")) for m in messages) == [
        ("checkpoint.created", 1),
        ("checkpoint.created", 2),
        ("job.succeeded", None),
    ]
    assert all(m["data"]["job_id"] == str(job.id) for m in messages)
    assert {d.status.value for d in client.webhooks.deliveries(hook.id)} == {"delivered"}

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


def test_the_cli_runs_a_job_and_downloads_its_checkpoint(stack):
    url, app, tmp = stack
    tenant = make_tenant(app.state.sessionmaker)
    corpus = tmp / "cli-corpus.jsonl"
    corpus.write_bytes(b"".join((ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(True)[:2]))
    config = tmp / "cli-job.yaml"
    config.write_text(
        "data: {max_turns: 1}\n"
        "sampling: {k: 2, max_new_tokens: 16, batch_prompts: 2}\n"
        "reward: {min_reward: 0.0}\n"
        "training: {max_steps: 1, micro_batch_size: 2}\n"
        "evaluation: {enabled: false}\n"
    )
    env = {**os.environ, "GATT_URL": url, "GATT_API_KEY": tenant.key, "GATT_CONFIG": str(tmp / "none.toml")}
    gatt = [sys.executable, "-m", "gatt_client"]
    followed = subprocess.run(
        [
            *gatt,
            "--json",
            "jobs",
            "create",
            "--corpus-file",
            str(corpus),
            "--config",
            str(config),
            "--follow",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert followed.returncode == 0, followed.stdout + followed.stderr
    lines = [json.loads(line) for line in followed.stdout.splitlines()]
    job = lines[-1]["job"]
    assert job["status"] == "succeeded"
    assert [line["event"]["kind"] for line in lines[:-1]][-1] == "succeeded"

    # The same job as a person sees it: its events as lines, then its results.
    shown = subprocess.run(
        [*gatt, "jobs", "follow", job["id"]], env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    assert "[info] succeeded" in shown.stdout and f"job {job['id']} succeeded" in shown.stdout
    assert "final checkpoint: step 1" in shown.stdout
    events = subprocess.run(
        [*gatt, "jobs", "events", job["id"]], env=env, capture_output=True, text=True, timeout=60
    )
    assert events.returncode == 0 and "[info] stage: synthesize" in events.stdout, (
        events.stdout + events.stderr
    )
    listed = subprocess.run([*gatt, "jobs", "list"], env=env, capture_output=True, text=True, timeout=60)
    assert job["id"] in listed.stdout and "succeeded" in listed.stdout
    downloaded = subprocess.run(
        [*gatt, "checkpoints", "download", job["id"], "--dest", str(tmp / "cli-download")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert downloaded.returncode == 0, downloaded.stderr
    folder = Path(downloaded.stdout.strip())
    assert (folder / "adapter_model.safetensors").is_file() and folder.parent == tmp / "cli-download"
    missing = subprocess.run(
        [*gatt, "jobs", "get", "00000000-0000-0000-0000-000000000000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "404 not_found" in missing.stderr


def test_the_job_page_follows_a_job_and_shows_its_results_in_a_browser(stack):
    """Headless Chromium on /ui: a key typed in, the jobs list, one job followed from running to
    succeeded, then its curves, reward table, adherence table, attention plot, and the samples and
    training-set browsers, each checked against what the API returns; screenshots kept."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, app, _ = stack
    tenant = make_tenant(app.state.sessionmaker)
    client = Client(url, tenant.key)
    config = {
        "data": {"max_turns": 2},
        "evaluation": {"enabled": True, "heldout_dialogues": 1, "turns": 2, "max_new_tokens": 16},
        "sampling": {"k": 2, "max_new_tokens": 24, "batch_prompts": 2},
        "reward": {"min_reward": 0.0},
        "training": {"max_steps": 3, "micro_batch_size": 2},
    }
    # A name a careless page would run as markup.
    name = '<img src=x onerror="document.title=1">run'
    job = client.jobs.create(_corpus(client, 4), config=config, name=name)

    with chromium() as driver:
        wait = WebDriverWait(
            driver, 30, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
        )
        driver.get(f"{url}/ui")
        key = wait.until(lambda d: d.find_element(By.NAME, "key"))
        key.send_keys("gatt_wrong_key")
        key.submit()
        wait.until(lambda d: "does not work" in d.find_element(By.CSS_SELECTOR, "form .error").text)
        key = driver.find_element(By.NAME, "key")
        key.clear()
        key.send_keys(tenant.key)
        key.submit()
        link = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-job="{job.id}"] a'))
        assert link.text == name  # shown as text, not run
        screenshot(driver, "ui-jobs")
        link.click()

        # While it runs: the whole job's bar, then its end, as the page polls.
        statuses = set()

        def ended(d):  # read in the page: the view re-renders under a held element reference
            shown = d.execute_script(
                "return document.querySelector('#summary [data-status]')?.dataset.status"
            )
            if shown == "running" and "running" not in statuses:
                screenshot(d, "ui-job-running")
            statuses.add(shown)
            return shown in ("succeeded", "failed", "cancelled") and shown

        assert WebDriverWait(driver, 900, poll_frequency=0.5).until(ended) == "succeeded", statuses
        assert "running" in statuses or "queued" in statuses
        assert driver.title == "GAtt jobs" and not driver.find_elements(By.CSS_SELECTOR, "h1 img")
        job_bar = driver.find_element(By.CSS_SELECTOR, '[data-progress="job"] [role=progressbar]')
        assert job_bar.get_attribute("aria-valuenow") == "100"

        metrics = list(client.jobs.metrics(job.id))
        wait.until(lambda d: d.find_element(By.ID, "attention-plot"))
        loss = driver.find_element(By.CSS_SELECTOR, 'svg[data-chart="loss"]')
        assert loss.get_attribute("data-points") == str(len(metrics)) == "3"
        lr = driver.find_element(By.CSS_SELECTOR, 'svg[data-chart="learning_rate"]')
        assert lr.get_attribute("data-points") == "3"
        evaluation = client.jobs.evaluation(job.id)
        shown = driver.execute_script("return document.getElementById('adherence-table').textContent")
        assert shown == evaluation.table
        assert driver.execute_script("return document.getElementById('attention-plot').naturalWidth") > 100
        samples = list(client.jobs.samples(job.id))
        batches = driver.find_elements(By.CSS_SELECTOR, "#reward-table tbody tr")
        assert len(batches) == len({s.index // 2 for s in samples})  # batch_prompts: 2

        # The samples browser: the first dialogue's candidates, the chosen one marked.
        first = samples[0]
        shown = driver.find_elements(By.CSS_SELECTOR, "#samples .candidate .text")
        assert [e.text for e in shown] == [c.text.strip() for t in first.turns for c in t.candidates]
        chosen = driver.find_elements(By.CSS_SELECTOR, '#samples .candidate[data-chosen="true"] .text')
        assert [e.text for e in chosen] == [t.candidates[t.chosen].text.strip() for t in first.turns]
        driver.find_element(By.XPATH, "//section[@id='samples']//button[contains(., 'Next')]").click()
        wait.until(
            lambda d: (
                d.find_element(By.CSS_SELECTOR, "#samples .sample").get_attribute("data-dialogue")
                == str(samples[1].index)
            )
        )
        # The training set: exactly its trained messages highlighted.
        row = next(iter(client.jobs.training_set(job.id)))
        trained = driver.find_elements(By.CSS_SELECTOR, '#training-set .msg[data-trained="true"]')
        assert [e.text.split("\n", 1)[1] for e in trained] == [
            m.content.strip() for m, t in zip(row.messages, row.trained, strict=True) if t
        ]
        assert trained and all("trained" in e.get_attribute("class") for e in trained)
        screenshot(driver, "ui-job")

        # The playground: three turns, the instruction given once, base and checkpoint side by side.
        driver.find_element(By.ID, "chat-link").click()
        wait.until(lambda d: d.find_element(By.ID, "instruction")).send_keys("Always answer in French.")
        asked = ["What is the capital of Italy?", "And of Spain?", "Which one is bigger?"]
        for turn, text in enumerate(asked, start=1):
            driver.find_element(By.ID, "message").send_keys(text)
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 300).until(
                lambda d, n=turn: (
                    all(
                        len(d.find_elements(By.CSS_SELECTOR, f"#chat-{m} .msg[data-role=assistant]")) == n
                        for m in ("base", "checkpoint")
                    )
                    or d.find_element(By.ID, "chat-error").text
                )
            )
            assert driver.find_element(By.ID, "chat-error").text == ""
        assert not driver.find_element(By.ID, "instruction").is_enabled()  # given once
        for model in ("base", "checkpoint"):
            shown = driver.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map(e => [e.dataset.role, e.lastChild.textContent])",
                f"#chat-{model} .msg",
            )
            assert [role for role, _ in shown] == ["user", "assistant"] * 3
            users = [content for role, content in shown if role == "user"]
            assert users == ["Always answer in French.\n\n" + asked[0], *asked[1:]]
            # Each reply is what the API gives for the conversation before it (greedy: the same).
            history = [{"role": role, "content": content} for role, content in shown]
            last = client.jobs.chat(job.id, history[:-1], model=model)
            assert last.message.content == history[-1]["content"]
            assert last.step == (3 if model == "checkpoint" else None)
        screenshot(driver, "ui-playground")
        # No script error and no Content-Security-Policy violation on the way.
        severe = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert [e for e in severe if "401" not in e["message"]] == [], severe


def test_cancel_stops_a_training_job_within_one_step(stack):
    """Also what operators see of it: the running job in the API's /metrics, the worker's own
    metrics, and the worker's JSON log lines found by the job's id."""
    import httpx

    url, app, tmp = stack
    client = Client(url, make_tenant(app.state.sessionmaker).key)
    config = {
        "data": {"max_turns": 1},
        "sampling": {"k": 2, "max_new_tokens": 24, "batch_prompts": 2},
        "reward": {"min_reward": 0.0},
        "training": {"max_steps": 500, "micro_batch_size": 1},
    }
    job = client.jobs.create(_corpus(client, 2), config=config)
    deadline = time.monotonic() + 900
    while (client.jobs.get(job.id).latest_metrics or {}).get("step", 0) < 1:
        assert time.monotonic() < deadline, "no training step in 900 s"
        time.sleep(1)
    scraped = httpx.get(f"{url}/metrics", timeout=30).text
    queue = app.state.settings.job_queue
    assert _metric(scraped, "gatt_jobs", queue=queue, status="running", stage="train") == 1
    assert client.jobs.cancel(job.id).cancel_requested
    # Steps recorded once the cancel is stored: the step in flight may still finish, no other may start.
    steps_at_cancel = max(m.step for m in client.jobs.metrics(job.id))
    assert client.jobs.wait(job.id, timeout=120, interval=1).status.value == "cancelled"
    steps = [m.step for m in client.jobs.metrics(job.id)]
    assert max(steps) <= steps_at_cancel + 1  # the step in flight may finish; no further one starts

    worker = httpx.get(app.state.worker_metrics_url, timeout=30).text
    assert _metric(worker, "gatt_worker_sampled_tokens_total") > 0
    assert _metric(worker, "gatt_worker_trained_tokens_total") > 0
    assert _metric(worker, "gatt_worker_job_runs_total", outcome="cancelled") >= 1
    assert _metric(worker, "gatt_worker_stage_duration_seconds_count", stage="sample") >= 1
    assert _metric(worker, "gatt_worker_last_heartbeat_timestamp_seconds") > time.time() - 3600
    lines = [
        json.loads(line) for line in (tmp / "worker.log").read_text().splitlines() if line.startswith("{")
    ]
    mine = [line for line in lines if line.get("job_id") == str(job.id)]
    assert any("torch uses" in line["message"] for line in mine), lines[-5:]
    assert {line["attempt"] for line in mine} == {"1"} and all("timestamp" in line for line in mine)
    kinds = [e.kind for e in client.jobs.events(job.id)]
    assert "cancel_requested" in kinds and kinds[-1] == "cancelled"


def _drop_in(source: Path, target: Path) -> None:
    """Copy a model directory as an operator would (hard links where the disk allows: 0.5 GB)."""
    target.mkdir(parents=True)
    for f in source.iterdir():
        try:
            os.link(f, target / f.name)
        except OSError:
            shutil.copy(f, target / f.name)


def test_a_dropped_in_model_trains_and_a_team_continues_its_checkpoint(stack):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from workers.engine.models import default_model_dir

    url, app, tmp = stack
    root = tmp / "models"
    tenant = make_tenant(app.state.sessionmaker)
    client = Client(url, tenant.key)
    assert [m.id for m in client.models.list()] == ["default"]
    _drop_in(default_model_dir(), root / "smol-copy")
    listed = {m.id: m for m in client.models.list()}
    assert listed["smol-copy"].trainable and listed["smol-copy"].end_of_turn_token == "<|im_end|>"

    corpus_id = _corpus(client, 2)
    config = {
        "data": {"max_turns": 1},
        "sampling": {"k": 2, "max_new_tokens": 16, "batch_prompts": 2},
        "reward": {"min_reward": 0.0},
        "training": {"max_steps": 2, "micro_batch_size": 2, "lora_r": 4, "lora_alpha": 8},
    }
    parent = client.jobs.wait(client.jobs.create(corpus_id, model="smol-copy", config=config).id, timeout=900)
    assert parent.status.value == "succeeded" and parent.model == "smol-copy", parent
    # The child leaves the adapter's shape out: it inherits r=4, alpha=8 from its parent.
    child_config = {**config, "training": {"max_steps": 1, "micro_batch_size": 2, "learning_rate": 1e-4}}
    created = client.jobs.create(corpus_id, model={"job_id": str(parent.id)}, config=child_config)
    child = client.jobs.wait(created.id, timeout=900)
    assert child.status.value == "succeeded", (child, list(client.jobs.events(child.id)))
    assert child.model == "smol-copy" and child.parent_checkpoint.step == 2
    assert (child.config.training.lora_r, child.config.training.lora_alpha) == (4, 8)

    stranger = Client(url, make_tenant(app.state.sessionmaker).key)
    with pytest.raises(NotFound):
        stranger.jobs.create(_corpus(stranger, 2), model={"job_id": str(parent.id)})

    parent_dir = client.jobs.download_checkpoint(parent.id, dest=tmp / "lineage-parent")
    child_dir = client.jobs.download_checkpoint(child.id, dest=tmp / "lineage-child")
    manifest = json.loads((child_dir / "manifest.json").read_text())
    assert manifest["lineage"] == {
        "base_model": "smol-copy",
        "parent_job_id": str(parent.id),
        "parent_step": 2,
    }
    adapter_config = json.loads((child_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "smol-copy" and adapter_config["r"] == 4

    # The child's adapter is the parent's trained further, not a new one (a new one starts at B = 0).
    before = load_file(parent_dir / "adapter_model.safetensors")
    after = load_file(child_dir / "adapter_model.safetensors")
    b_keys = [k for k in before if "lora_B" in k]
    assert b_keys and before.keys() == after.keys()
    moved = sum(float((after[k] - before[k]).norm()) for k in b_keys)
    size = sum(float(before[k].norm()) for k in b_keys)
    assert 0 < moved < size

    base = AutoModelForCausalLM.from_pretrained(root / "smol-copy", local_files_only=True)
    model = PeftModel.from_pretrained(base, child_dir)
    assert model.peft_config["default"].r == 4

    # Nothing a team reads names the server's model root.
    texts = [
        client.jobs.get(child.id).model_dump_json(),
        *(e.model_dump_json() for e in client.jobs.events(child.id)),
    ]
    texts += [json.dumps(m.model_dump(mode="json")) for m in client.models.list()]
    texts += [
        (child_dir / name).read_text()
        for name in ("manifest.json", "adapter_config.json", "trainer_state.json")
    ]
    assert not [t for t in texts if str(root) in t or str(tmp) in t]

    # What each job keeps is counted against the team's quota, and deleting a job frees it; the
    # parent is deleted last: a job that continues it keeps its files and its manifest's lineage.
    for job in (parent, child):
        directory = tmp / "artifacts" / str(tenant.team.id) / str(job.id)
        files = [p for p in directory.rglob("*") if p.is_file() and ".parent" not in p.parts]
        assert job.artifact_bytes == sum(p.stat().st_size for p in files) > 0
    client.jobs.delete(parent.id)
    assert not (tmp / "artifacts" / str(tenant.team.id) / str(parent.id)).exists()
    assert client.jobs.get(child.id).parent_checkpoint is None
    assert json.loads((child_dir / "manifest.json").read_text())["lineage"]["parent_step"] == 2
    with pytest.raises(NotFound):
        client.jobs.get(parent.id)


def _metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


@contextlib.contextmanager
def _job_page(url: str, key: str, job_id) -> Iterator[tuple[Any, Any]]:
    """Chromium on a job's page, signed in with `key`: the driver and a 30-second wait."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as driver:
        wait = WebDriverWait(
            driver, 30, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
        )
        driver.get(f"{url}/ui")
        field = wait.until(lambda d: d.find_element(By.NAME, "key"))
        field.send_keys(key)
        field.submit()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"] a')).click()
        yield driver, wait


def test_a_gatt_job_trains_with_dpo_on_its_own_candidates(stack):
    """objective sft+dpo over REST: pairs of a turn's kept reply and a candidate it beat, in the
    training set with the reason each was rejected, and a LoRA checkpoint trained on them; the job
    page shows the rejected reply beside the kept one."""
    from selenium.webdriver.common.by import By

    url, app, _ = stack
    tenant = make_tenant(app.state.sessionmaker)
    client = Client(url, tenant.key)
    short = {
        "custom": [
            {
                "name": "short",
                "text": "Answer in at most 15 words.",
                "verifiers": [{"type": "max_words", "n": 15}],
            }
        ]
    }
    config = {
        "data": {"max_turns": 2, "replay": 0.5},
        "sampling": {"k": 4, "max_new_tokens": 32, "batch_prompts": 3},
        "reward": {"min_reward": 0.0},
        "training": {
            "objective": "sft+dpo",
            "dpo": {"rejected": "repeats", "beta": 0.2},
            "max_steps": 2,
            "micro_batch_size": 2,
        },
    }
    job = client.jobs.create(
        _corpus(client, 3),
        instruction_set_id=client.instruction_sets.create("short", short).id,
        config=config,
    )
    job = client.jobs.wait(job.id, timeout=900, interval=1)
    assert job.status.value == "succeeded", job
    assert job.latest_metrics["step"] == 2 and math.isfinite(job.latest_metrics["loss"])
    assert job.trained_tokens > 0

    rows = list(client.jobs.training_set(job.id))
    pairs = [r for r in rows if r.history.value != "replay"]
    assert pairs and [r.history.value for r in rows[len(pairs) :]] == ["replay"] * (len(rows) - len(pairs))
    samples = {s.index: s for s in client.jobs.samples(job.id)}
    for row in pairs:
        kept = row.messages[-1].content
        assert row.rejected.text != kept and row.rejected.margin > 0.1
        assert row.rejected.reason.value in ("copy", "echo", "ranked lower")
        # Both replies are candidates of the same sampled turn: the kept one and the rejected one.
        turn = next(
            t
            for t in samples[row.index].turns
            if t.chosen is not None and t.candidates[t.chosen].text == kept
        )
        assert turn.candidates[row.rejected.candidate].text == row.rejected.text
        assert turn.ranked[turn.chosen] - turn.ranked[row.rejected.candidate] == row.rejected.margin

    with _job_page(url, tenant.key, job.id) as (driver, wait):
        shown = wait.until(
            lambda d: d.find_elements(By.CSS_SELECTOR, '#training-set .msg[data-rejected="true"]')
        )
        assert shown[0].text.split("\n", 1)[1] == pairs[0].rejected.text.strip()
        kept = driver.find_elements(By.CSS_SELECTOR, '#training-set .msg[data-trained="true"]')
        assert kept[0].text.split("\n", 1)[1] == pairs[0].messages[-1].content.strip()
        screenshot(driver, "ui-dpo-pair")


def test_a_gatt_job_runs_two_rounds_each_sampling_with_the_last_ones_model(stack, tmp_path):
    """rounds.count 2 over REST: the second round samples with the first round's model and trains
    it further; metrics and checkpoints are numbered across rounds, and the rounds endpoint gives
    each round's reward and steps."""
    url, app, _ = stack
    tenant = make_tenant(app.state.sessionmaker)
    client = Client(url, tenant.key)
    config = {
        "data": {"max_turns": 2},
        "sampling": {"k": 3, "max_new_tokens": 24, "batch_prompts": 2},
        "reward": {"min_reward": 0.0},
        "training": {"max_steps": 2, "micro_batch_size": 2, "checkpoint_every": 1},
        "rounds": {"count": 2, "instructions": "fresh"},
    }
    job = client.jobs.create(_corpus(client, 3), config=config)
    job = client.jobs.wait(job.id, timeout=900, interval=1)
    assert job.status.value == "succeeded", job
    assert [m.step for m in client.jobs.metrics(job.id)] == [1, 2, 3, 4]
    assert [c.step for c in client.jobs.checkpoints(job.id)] == [1, 2, 3, 4]

    rounds = client.jobs.rounds(job.id)
    assert rounds.count == 2
    assert [(r.round, r.steps.first, r.steps.last) for r in rounds.data] == [(1, 1, 2), (2, 3, 4)]
    # Round 1's figures are those of the samples the API serves (round 1's).
    samples = list(client.jobs.samples(job.id))
    turns = [t for s in samples for t in s.turns]
    assert rounds.data[0].selection["turns"] == len(turns)
    first_batch = [t.stats.max_reward for s in samples if s.index < 2 for t in s.turns]
    assert rounds.data[0].batches[0].max_reward == max(first_batch)
    for r in rounds.data:
        assert r.examples > 0 and r.trained_tokens > 0 and math.isfinite(r.final_loss)
    # Round 2's own samples and training set, which its figures count.
    second = list(client.jobs.samples(job.id, round_=2))
    assert len(second) == len(samples) and second != samples
    assert rounds.data[1].selection["turns"] == sum(len(s.turns) for s in second)
    assert len(list(client.jobs.training_set(job.id, round_=2))) == rounds.data[1].examples
    with pytest.raises(NotFound) as exc:
        list(client.jobs.samples(job.id, round_=3))
    assert exc.value.code == "round_not_found"
    # The last checkpoint is round 2's own step 2, which its manifest places in the job's numbering.
    final = client.jobs.download_checkpoint(job.id, 4, tmp_path / "round2")
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["lineage"]["round"] == {"round": 2, "first_step": 3}
    assert "adapter_model.safetensors" in manifest["files"]

    from selenium.webdriver.common.by import By

    with _job_page(url, tenant.key, job.id) as (driver, wait):
        shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#rounds-table tbody tr"))
        assert [row.get_attribute("data-round") for row in shown] == ["1", "2"]
        assert shown[1].find_elements(By.TAG_NAME, "td")[1].text == "3–4"
        plot = driver.find_element(By.CSS_SELECTOR, '#rounds svg[data-chart="round_reward"]')
        assert plot.get_attribute("data-points") == str(sum(len(r.batches) for r in rounds.data))
        screenshot(driver, "ui-rounds")
