"""The reliability harness: private Postgres and Redis servers, real worker processes, invariants.

Crash and restart tests kill workers and restart servers. Doing that to the machine's shared Postgres
and Redis would disturb every other test run on it (and the reaper would requeue other runs' jobs), so
these tests start servers of their own from the same binaries: a throwaway Postgres cluster (`initdb`,
`pg_ctl`, run as the `postgres` user when we are root) and a `redis-server`, both on free ports,
restarted for real by the restart tests. Where the binaries are missing those tests are skipped.

Fuzz and rate-limit tests need no restarts: they use the shared test database (`database_url`) and
Redis like the rest of the suite.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.main import create_app
from service.db import make_engine, make_sessionmaker
from service.models import Checkpoint, Job, JobEvent, JobMetric
from service.settings import Settings
from tests.app.factories import Tenant, make_tenant
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 6.0
TERMINAL = {"succeeded", "failed", "cancelled"}
# Small enough for 2 shared cores: each dialogue samples in ~1-4 s, each step trains in ~0.5-1.5 s.
TINY_CONFIG: dict[str, Any] = {
    "data": {"max_dialogues": 2, "max_turns": 1},
    "sampling": {"k": 2, "max_new_tokens": 24, "batch_prompts": 1},
    "reward": {"min_reward": 0.0},
    "training": {"max_steps": 2, "micro_batch_size": 1, "checkpoint_every": 1},
}


def tiny_config(**sections: dict[str, Any]) -> dict[str, Any]:
    return {k: {**TINY_CONFIG.get(k, {}), **sections.get(k, {})} for k in {*TINY_CONFIG, *sections}}


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll until `predicate()` is truthy; return its value, or fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what or predicate}")
        time.sleep(interval)


# --- servers ---------------------------------------------------------------------------------


def _pg_bindir() -> Path | None:
    if configured := os.environ.get("GATT_TEST_PG_BINDIR"):
        return Path(configured)
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """A private Postgres cluster on a free port; `restart()` is a real server restart."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gatt-rel-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self._as_postgres = os.geteuid() == 0  # initdb refuses to run as root
        if self._as_postgres:
            shutil.chown(self.dir, "postgres")

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)

    def start(self) -> None:
        if not self.data.exists():
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-N",
            )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, down_s: float = 0.0) -> None:
        """Stop (fast: every connection is cut), stay down `down_s`, start; wait until it answers."""
        self.stop("fast")
        time.sleep(down_s)
        self.start()
        wait_for(self.ready, 30, 0.1, "postgres to answer")

    def ready(self) -> bool:
        try:
            with psycopg.connect(self.libpq("postgres"), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def libpq(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE and migrate it to head; returns its SQLAlchemy URL."""
        from alembic import command
        from alembic.config import Config

        with psycopg.connect(self.libpq("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        cfg = Config(str(ROOT / "alembic.ini"))
        cfg.attributes["url"] = self.url(name)
        command.upgrade(cfg, "head")
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer:
    """A private redis-server on a free port, without persistence (like the machine's)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gatt-rel-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        args += ["no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ready, 30, 0.05, "redis to answer")

    def ready(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """SHUTDOWN NOSAVE: every queued and unacknowledged message is gone, as after a crash."""
        # redis-cli, not redis-py: redis-py retries the connection the server just closed (seconds).
        subprocess.run(
            ["redis-cli", "-p", str(self.port), "shutdown", "nosave"], capture_output=True, timeout=30
        )
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("no Postgres server binaries (initdb, pg_ctl) for a private test cluster")
    try:
        server = PostgresServer(bindir)
    except (LookupError, OSError) as e:  # root without a `postgres` user to run it as
        pytest.skip(f"could not prepare a private Postgres cluster: {e}")
    try:
        server.start()
    except (subprocess.SubprocessError, OSError) as e:
        server.destroy()
        pytest.skip(f"could not start a private Postgres cluster: {e}")
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary for a private Redis")
    server = RedisServer()
    server.start()
    yield server
    server.destroy()


# --- workers ---------------------------------------------------------------------------------


@dataclass
class Worker:
    """One `celery worker` process of the real app, on the stack's private queue."""

    proc: subprocess.Popen[bytes]
    log: Path
    name: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no cleanup, no ack, no final write; as if the machine vanished."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """Cold shutdown (SIGQUIT): the tests are over, nothing needs a graceful end."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Stack:
    """Private Postgres database + Redis + queue + artifact dir; the API in process; workers as processes."""

    settings: Settings
    queue: str
    tmp: Path
    factory: sessionmaker[Session]
    broker: Celery
    pg: PostgresServer
    redis: RedisServer
    workers: list[Worker] = field(default_factory=list)

    @property
    def artifact_dir(self) -> Path:
        return self.settings.artifact_dir

    def app(self, **overrides: Any):
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        return create_app(settings, enqueue=self.send)

    def send(self, job_id: Any) -> None:
        self.broker.send_task("jobs.run", args=[str(job_id)], queue=self.queue)

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "GATT_DATABASE_URL": self.settings.database_url,
            "GATT_REDIS_URL": self.settings.redis_url,
            "GATT_ARTIFACT_DIR": str(self.artifact_dir),
            "GATT_JOB_QUEUE": self.queue,
            "GATT_LEASE_S": str(self.settings.lease_s),
            "GATT_MAX_ATTEMPTS": str(self.settings.max_attempts),
            "PYTHONUNBUFFERED": "1",
            # One torch thread: on 2 cores shared with other processes, torch's default thread pool
            # spins against itself and a tiny job takes ten times longer.
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            **extra,
        }

    def start_worker(self, *, pool: str = "solo", concurrency: int = 1, **env: str) -> Worker:
        name = f"w{len(self.workers) + 1}-{uuid.uuid4().hex[:6]}"
        log = self.tmp / f"{name}.log"
        cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", self.queue]
        cmd += ["--pool", pool, "--concurrency", str(concurrency), "-n", f"{name}@%h"]
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO"]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=self.env(**env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(proc, log, name)
        self.workers.append(worker)
        return worker

    # -- the reaper, run from here (as beat would run it in the worker) --------------------------
    def reap(self) -> int:
        """One `jobs.reap` sweep against this stack's database, re-sending to this stack's queue."""
        import workers.tasks as tasks

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(tasks, "get_settings", lambda: self.settings)
            mp.setattr(tasks, "sessions", lambda: self.factory)
            mp.setattr(tasks, "_factory", self.factory)
            mp.setattr(tasks, "celery", _QueueSender(self))
            return int(tasks.reap_task())

    # -- reading state ------------------------------------------------------------------------
    def job(self, job_id: Any) -> Job:
        with self.factory() as s:
            job = s.get(Job, uuid.UUID(str(job_id)))
            assert job is not None
            s.expunge(job)
            return job

    def events(self, job_id: Any) -> list[JobEvent]:
        with self.factory() as s:
            rows = s.scalars(
                select(JobEvent).where(JobEvent.job_id == uuid.UUID(str(job_id))).order_by(JobEvent.seq)
            ).all()
            for r in rows:
                s.expunge(r)
            return list(rows)

    def metric_steps(self, job_id: Any) -> list[int]:
        with self.factory() as s:
            q = (
                select(JobMetric.step)
                .where(JobMetric.job_id == uuid.UUID(str(job_id)))
                .order_by(JobMetric.step)
            )
            return list(s.scalars(q))

    def checkpoints(self, job_id: Any) -> list[Checkpoint]:
        with self.factory() as s:
            q = (
                select(Checkpoint)
                .where(Checkpoint.job_id == uuid.UUID(str(job_id)))
                .order_by(Checkpoint.step)
            )
            rows = list(s.scalars(q))
            for r in rows:
                s.expunge(r)
            return rows

    def job_dir(self, job: Job) -> Path:
        return self.artifact_dir / str(job.team_id) / str(job.id)

    def wait_lease_expired(self, job_id: Any, timeout: float = 30) -> None:
        def expired() -> bool:
            with self.factory() as s:
                from sqlalchemy import func

                q = select(Job.lease_expires_at < func.now()).where(Job.id == uuid.UUID(str(job_id)))
                return bool(s.scalar(q))

        wait_for(expired, timeout, 0.2, "the dead worker's lease to expire")

    def wait_terminal(self, job_id: Any, timeout: float, *, reap_every: float | None = None) -> Job:
        """Wait for a final status; with `reap_every`, sweep like beat would meanwhile."""
        deadline = time.monotonic() + timeout
        last_reap = time.monotonic()
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.status.value in TERMINAL:
                return job
            if reap_every is not None and time.monotonic() - last_reap >= reap_every:
                self.reap()
                last_reap = time.monotonic()
            time.sleep(0.25)
        logs = "\n".join(f"--- {w.name}\n{w.text()[-4000:]}" for w in self.workers)
        pytest.fail(f"job {job_id} not finished after {timeout}s: {self.job(job_id).status}\n{logs}")


class _QueueSender:
    """Stands in for `workers.tasks.celery` in the test process: sends to the stack's queue."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def send_task(self, name: str, args: list[Any] | None = None, **_: Any) -> None:
        self.stack.broker.send_task(name, args=args, queue=self.stack.queue)

    def connection_for_read(self) -> Any:
        return self.stack.broker.connection_for_read()


@pytest.fixture(scope="module")
def stack_base(pg_server: PostgresServer, redis_server: RedisServer, tmp_path_factory) -> Iterator[dict]:
    """One private database per test module."""
    name = f"gatt_rel_{uuid.uuid4().hex[:8]}"
    url = pg_server.create_database(name)
    yield {"url": url, "tmp": tmp_path_factory.mktemp("rel")}


@pytest.fixture
def stack(stack_base, pg_server: PostgresServer, redis_server: RedisServer) -> Iterator[Stack]:
    """A fresh queue and artifact dir per test (a private database per module); workers stopped after."""
    tmp = Path(tempfile.mkdtemp(dir=stack_base["tmp"]))
    queue = f"rel-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=stack_base["url"],
        redis_url=redis_server.url,
        artifact_dir=tmp / "artifacts",
        job_queue=queue,
        lease_s=LEASE_S,
        rate_limit_per_s=0,
    )
    engine = make_engine(settings)
    broker = Celery(broker=redis_server.url)
    broker.conf.broker_connection_retry_on_startup = True
    s = Stack(settings, queue, tmp, make_sessionmaker(engine), broker, pg_server, redis_server)
    try:
        yield s
    finally:
        for w in s.workers:
            w.stop()
        broker.close()
        engine.dispose()


@pytest.fixture
def api(stack: Stack) -> Iterator[TestClient]:
    with TestClient(stack.app()) as client:
        yield client


def start_api(stack: Stack, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """The service API (`uvicorn app.main:app`, as deployed) as a process on the stack."""
    import httpx

    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=stack.env(**env), stdout=out, stderr=subprocess.STDOUT)

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # died: stop waiting, the caller's asserts say why

    wait_for(up, 60, 0.1, "the API to answer")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc


# --- requests and invariants -----------------------------------------------------------------


def upload_corpus(client: TestClient, tenant: Tenant, n: int = 2) -> str:
    lines = (ROOT / "examples" / "dialogues.jsonl").read_bytes().splitlines(keepends=True)[:n]
    r = client.post("/v1/corpora", files={"file": ("chats.jsonl", b"".join(lines))}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def create_job(
    client: TestClient, stack: Stack, config: dict[str, Any], n_dialogues: int = 2
) -> tuple[str, Tenant]:
    tenant = make_tenant(stack.factory)
    body = {"corpus_id": upload_corpus(client, tenant, n_dialogues), "config": config}
    r = client.post("/v1/jobs", json=body, headers=tenant.headers)
    assert r.status_code == 201, r.text
    return r.json()["id"], tenant


def sample_lines(path: Path) -> list[bytes]:
    """Complete lines of samples.jsonl (a torn last line does not count)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True)


def check_finished_job(stack: Stack, job_id: str, *, n_dialogues: int, steps: int) -> dict[str, Any]:
    """What must hold for a job that ended `succeeded`, however many workers died on the way."""
    job = stack.job(job_id)
    assert job.status.value == "succeeded", (job.status, job.error_code, job.error_message)
    assert job.finished_at is not None and job.lease_expires_at is None and job.progress == 1.0

    events = stack.events(job_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1)), "event seq has gaps or repeats"
    terminal = [e for e in events if e.kind in ("succeeded", "cancelled") or e.level == "error"]
    assert [e.kind for e in terminal] == ["succeeded"] and events[-1].kind == "succeeded"

    metric_steps = stack.metric_steps(job_id)
    assert metric_steps == list(range(1, steps + 1)), f"metric steps {metric_steps}"
    checkpoints = stack.checkpoints(job_id)
    ckpt_steps = [c.step for c in checkpoints]
    assert len(ckpt_steps) == len(set(ckpt_steps)) and ckpt_steps[-1] == steps, ckpt_steps
    for c in checkpoints:  # every listed checkpoint is on disk and complete
        assert (stack.artifact_dir / c.path / "manifest.json").is_file(), c.path

    out = stack.job_dir(job)
    records = [json.loads(line) for line in sample_lines(out / "samples.jsonl")]
    indices = [r["index"] for r in records]
    assert sorted(indices) == list(range(n_dialogues)), f"samples.jsonl dialogues {indices}"
    assert (out / "samples.jsonl").read_bytes().endswith(b"\n"), "torn line left in samples.jsonl"
    disk_steps = [
        json.loads(line)["step"] for line in (out / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert disk_steps == list(range(1, steps + 1)), f"train/metrics.jsonl steps {disk_steps}"
    assert not list((out / "train" / "checkpoints").glob("*.tmp")), "a half-written checkpoint was left"
    return {"job": job, "events": events, "checkpoints": checkpoints}
