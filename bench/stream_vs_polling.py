"""Following jobs: server-sent events (`GET /v1/jobs/{id}/stream`) against polling the events list
(`GET /v1/jobs/{id}/events?after_seq=N` every `--interval` s), at 200 clients, on the real app and
real Postgres. The figure is the API process's CPU time per client per minute.

    .venv/bin/python bench/stream_vs_polling.py [--clients 200] [--jobs 20] [--duration 60] [--interval 2]

Seeds `--jobs` running jobs (bench/api_polling.py's database and seed), starts one uvicorn process
(rate limiter off: one key makes every request), and while a writer adds one event per job per
second through the repository (`jobs.add_event`, which NOTIFYs as a worker's event does), runs
each mode for `--duration` s after a 5 s warm-up: every client follows one job (clients spread
over the jobs). Reports the server's CPU seconds per client per minute, requests made, and how
many of the events written each client received (polling sees an event up to `--interval` s
late; the stream as it commits). The clients run in this process (asyncio, httpx), on the same
cores as the server and Postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.api_polling import cpu_seconds, free_port, load_average, prepare_database, seed, start_server  # noqa: E402


def writer(url: str, ids: list[str], stop: threading.Event, written: dict[str, int]) -> None:
    """One event per job per second, each in its own transaction (as the worker writes them)."""
    import uuid

    from service.db import make_engine, make_sessionmaker, session_scope
    from service.repositories import jobs
    from service.settings import Settings

    factory = make_sessionmaker(make_engine(Settings(database_url=url)))
    while not stop.is_set():
        started = time.monotonic()
        for job_id in ids:
            with session_scope(factory) as session:
                jobs.add_event(session, uuid.UUID(job_id), "info", "bench", "a step", None)
            written[job_id] = written.get(job_id, 0) + 1
        stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))


def last_seqs(url: str, ids: list[str]) -> dict[str, int]:
    """Each job's last event seq, read from the database once: clients start after it (paging
    through `/events` from 200 clients to find it loaded the server more than what is measured)."""
    import uuid

    from sqlalchemy import func, select

    from service.db import make_engine, make_sessionmaker, session_scope
    from service.models import JobEvent
    from service.settings import Settings

    factory = make_sessionmaker(make_engine(Settings(database_url=url)))
    with session_scope(factory) as session:
        return {
            job_id: int(
                session.scalar(
                    select(func.coalesce(func.max(JobEvent.seq), 0)).where(
                        JobEvent.job_id == uuid.UUID(job_id)
                    )
                )
            )
            for job_id in ids
        }


async def poll(
    base: str, key: str, job_id: str, after: int, interval: float, until: float, out: dict
) -> None:
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        while time.monotonic() < until:
            r = await client.get(f"/v1/jobs/{job_id}/events", params={"after_seq": after, "limit": 100})
            out["requests"] += 1
            data = r.json()
            out["received"] += len(data["data"])
            after = data["next_after_seq"]
            await asyncio.sleep(interval)


async def stream(base: str, key: str, job_id: str, after: int, until: float, out: dict) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=httpx.Timeout(30, read=60)
    ) as client:
        # Start after the events written so far, as a client resuming with Last-Event-ID does.
        params = {"after_seq": after, "after_step": 10**9}
        out["requests"] += 1
        async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/stream", params=params) as source:
            async for sse in source.aiter_sse():
                if sse.event == "job_event":
                    out["received"] += 1
                if time.monotonic() >= until:
                    return


async def run_mode(
    mode: str, base: str, key: str, ids: list[str], args: argparse.Namespace, pid: int
) -> dict:
    outs = [{"requests": 0, "received": 0} for _ in range(args.clients)]
    start_at = last_seqs(args.url, ids)  # start after the events written so far
    start = time.monotonic()
    until = start + args.warmup + args.duration
    if mode == "poll":
        tasks = [
            poll(base, key, ids[i % len(ids)], start_at[ids[i % len(ids)]], args.interval, until, outs[i])
            for i in range(args.clients)
        ]
    else:
        tasks = [
            stream(base, key, ids[i % len(ids)], start_at[ids[i % len(ids)]], until, outs[i])
            for i in range(args.clients)
        ]

    async def measure() -> float:
        await asyncio.sleep(args.warmup)
        before = cpu_seconds(pid)
        await asyncio.sleep(args.duration)
        return cpu_seconds(pid) - before

    # Spread the clients' first requests over the interval, as independent pollers are.
    async def staggered(i: int, task) -> None:
        await asyncio.sleep(args.interval * i / args.clients)
        await task

    results = await asyncio.gather(
        measure(), *(staggered(i, t) for i, t in enumerate(tasks)), return_exceptions=True
    )
    cpu = results[0]
    errors = [r for r in results[1:] if isinstance(r, Exception)]
    received = [o["received"] for o in outs]
    return {
        "mode": mode,
        "clients": args.clients,
        "server_cpu_s": round(cpu, 2),
        "server_cpu_s_per_client_per_min": round(cpu / args.clients / (args.duration / 60), 4),
        "requests": sum(o["requests"] for o in outs),
        "events_received_per_client_median": statistics.median(received),
        "events_received_per_client_min_max": [min(received), max(received)],
        "errors": len(errors),
        "first_error": repr(errors[0])[:300] if errors else None,
        "load_average": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between a poller's requests")
    parser.add_argument("--modes", default="poll,stream")
    args = parser.parse_args()

    url = args.url = prepare_database()
    key, ids = seed(url, args.jobs)
    port = free_port()
    log = Path(tempfile.mkdtemp()) / "uvicorn.log"
    server = start_server(url, port, rate_limit=False, log=log)
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    written: dict[str, int] = {}
    thread = threading.Thread(target=writer, args=(url, ids, stop, written), daemon=True)
    thread.start()
    try:
        for mode in args.modes.split(","):
            before = sum(written.values())
            result = asyncio.run(run_mode(mode, base, key, ids, args, server.pid))
            result["events_written_per_job"] = round((sum(written.values()) - before) / len(ids), 1)
            print(json.dumps(result), flush=True)
    finally:
        stop.set()
        thread.join(5)
        server.terminate()
        server.wait(10)
        print(log.read_text()[-3000:], file=sys.stderr)


if __name__ == "__main__":
    main()
