from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.main import create_app
from service.settings import Settings
from tests.app.factories import Tenant, make_tenant

# Small limits so that the limit tests move kilobytes, not megabytes.
MAX_CORPUS_BYTES = 64 * 1024
MAX_JSON_BODY_BYTES = 32 * 1024


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        max_corpus_bytes=MAX_CORPUS_BYTES,
        max_json_body_bytes=MAX_JSON_BODY_BYTES,
    )


@pytest.fixture(scope="session")
def enqueued() -> list:
    """Job ids the API handed to the workers. These tests run no worker, so nothing goes to Redis
    (a stray message would be picked up by the end-to-end test's real worker)."""
    return []


@pytest.fixture(scope="session")
def app(settings: Settings, enqueued: list) -> FastAPI:
    return create_app(settings, enqueue=enqueued.append)


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def db(app: FastAPI) -> sessionmaker[Session]:
    """Sessions on the app's engine, for arranging rows and counting them."""
    factory: sessionmaker[Session] = app.state.sessionmaker
    return factory


@pytest.fixture
def tenant(db: sessionmaker[Session]) -> Tenant:
    return make_tenant(db)


@pytest.fixture
def other_tenant(db: sessionmaker[Session]) -> Tenant:
    return make_tenant(db)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 HTTP server for the artifact-store tests: moto's standalone server in a process of its
    own (no MinIO here), on a free port. Yields its endpoint URL. Its credentials are made up: they are
    put in the environment, where boto3's standard chain finds them, for the session."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    fake = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the moto S3 server did not start (exit code {proc.poll()})")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh bucket on the S3 server."""
    import boto3

    name = f"gatt-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def one_thread():
    """For tests that run a job in this process: one torch thread keeps it from fighting the test
    (and the server it talks to) for the CPUs."""
    from tests.threads import one_torch_thread  # imports torch: only for the tests that ask

    with one_torch_thread():
        yield
