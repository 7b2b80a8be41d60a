"""Slow request bodies must not take the service's admission slots (issue: slowloris on POST).

Before app/core/body_first.py, connections that sent `POST /v1/jobs` headers with a large
Content-Length and then a byte now and then each held an admission slot while their body
trickled in, with or without a valid key: every other request waited until those sockets
closed. Here a real uvicorn server with two slots gets twenty such connections, half without a
key, and must keep answering another team's requests meanwhile; the keyless ones are refused at
once, the slow ones with a key are cut off once they fall behind the minimum rate.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from service.settings import Settings
from tests.app.factories import make_tenant
from tests.servers import serving

ROOT = Path(__file__).resolve().parents[2]
SLOW = 20
GRACE_S = 8.0


@pytest.fixture
def server(database_url: str):
    settings = Settings(
        database_url=database_url,
        db_pool_size=2,
        db_max_overflow=1,
        db_pool_timeout_s=3,
        max_requests_in_flight=2,
        rate_limit_per_s=0,
        body_grace_s=GRACE_S,
    )
    app = create_app(settings, enqueue=lambda _: None)
    with serving(app) as port:
        yield app, port


def _open_slow_post(port: int, key: str | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=GRACE_S + 10)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n{"
    )
    sock.sendall(head.encode())
    return sock


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]) if data else 0


def test_slow_bodies_hold_no_slot_and_are_cut_off(server) -> None:
    app, port = server
    attacker = make_tenant(app.state.sessionmaker)
    other = make_tenant(app.state.sessionmaker)
    slow = [_open_slow_post(port, attacker.key if i % 2 else None) for i in range(SLOW)]
    stop = threading.Event()

    def trickle() -> None:  # a byte every half second on every connection, far below the minimum rate
        while not stop.wait(0.5):
            for sock in slow:
                with contextlib.suppress(OSError):  # the server has already answered it
                    sock.send(b" ")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        started = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=other.headers, timeout=3) as client:
            codes = [client.get("/v1/jobs").status_code for _ in range(10)]
        # Everything above ran while the slow bodies were still within their grace period.
        assert time.monotonic() - started < GRACE_S
        assert codes == [200] * 10
        statuses = [_status(sock) for sock in slow]
    finally:
        stop.set()
        trickler.join(5)
        for sock in slow:
            sock.close()
    keyless, keyed = statuses[0::2], statuses[1::2]
    assert keyless == [401] * (SLOW // 2)  # refused before any of the body was read
    assert keyed == [408] * (SLOW // 2)  # request_timeout once behind the minimum rate


def test_a_slow_upload_does_not_lock_out_other_teams_in_embedded_mode(tmp_path) -> None:
    # SQLite has one writer, and every request's transaction begins with BEGIN IMMEDIATE: when the
    # corpus upload streamed from the socket inside its transaction, another team's request waited
    # for the whole upload (500 after SQLite's 30 s busy timeout).
    from app.embedded import create_embedded_app, create_key

    data_dir = tmp_path / "embedded"
    uploader = {"Authorization": f"Bearer {create_key(data_dir, 'team-a')}"}
    reader = {"Authorization": f"Bearer {create_key(data_dir, 'team-b')}"}
    with serving(create_embedded_app(data_dir)) as port:
        _upload_slowly_while_another_team_reads(f"http://127.0.0.1:{port}", uploader, reader)


def _upload_slowly_while_another_team_reads(base: str, uploader: dict, reader: dict) -> None:
    corpus = (ROOT / "examples" / "train_large.jsonl").read_bytes()
    boundary = "slowupload"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + corpus
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def slowly():  # about 50 KB a second: above the minimum rate, five seconds in all
        for start in range(0, len(body), 16 * 1024):
            time.sleep(0.3)
            yield body[start : start + 16 * 1024]

    uploaded: list[int] = []

    def upload() -> None:
        headers = {**uploader, "Content-Type": f"multipart/form-data; boundary={boundary}"}
        uploaded.append(
            httpx.post(f"{base}/v1/corpora", content=slowly(), headers=headers, timeout=60).status_code
        )

    started = time.monotonic()
    sender = threading.Thread(target=upload)
    sender.start()
    time.sleep(1)
    with httpx.Client(base_url=base, headers=reader, timeout=3) as client:
        codes = [client.get("/v1/corpora").status_code for _ in range(5)]
    still_uploading = sender.is_alive()
    sender.join(60)
    assert codes == [200] * 5 and still_uploading, (codes, time.monotonic() - started)
    assert uploaded == [201]
