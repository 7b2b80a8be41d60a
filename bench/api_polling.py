"""Job-status polling: `GET /v1/jobs/{id}` under 50 and 200 concurrent clients, plain and with
`If-None-Match` (answered 304), against the real app on real Postgres.

    .venv/bin/python bench/api_polling.py [--clients 50,200] [--duration 15] [--paced 1] [--admission 15]

What it does:

1. Creates the database `gatt_bench` on the test Postgres server (GATT_TEST_PG_URL, default
   postgresql+psycopg://postgres@127.0.0.1:5432; the same helpers as tests/conftest.py) if missing,
   and migrates it to head.
2. Writes a fresh team, API key, corpus and `--jobs` running jobs straight into it: each job has the
   full default config and a latest-metrics row, as a job in training has.
3. Per server configuration and client count, starts a fresh `uvicorn app.main:app` (one worker,
   access log off) as a subprocess on a free port, with the rate limiter off
   (GATT_RATE_LIMIT_PER_S=0: one key makes every request here, and the point is the endpoint, not
   the limiter; `--rate-limit` keeps it on with a limit nothing reaches, to measure the cost of its
   Redis round trip).
4. Polls with plain GETs and with conditional GETs (each job's current ETag in `If-None-Match`), in
   the order plain, etag, etag, plain, each for `--duration` seconds after a 2-second warm-up that
   is not counted, cycling over the jobs:
   - paced (as-shipped server only, `--paced S`, httpx): every client polls once every S seconds,
     the clients spread evenly over the interval: the load real pollers make;
   - closed loop (`--generator`, wrk by default): every client sends its next request as soon as
     the last is answered: the server's capacity, and its latency when saturated.
   Reports requests/s, p50/p90/p99/max latency, the status codes seen, errors (timeouts after 10 s)
   and the CPU time the server process used per request.
5. `--admission N` adds a second server configuration: the same app with its admission limit
   (app/core/admission.py: requests worked on at once until their response starts, the rest wait
   in the event loop) set to N instead of the shipped 20, and the pool grown to cover it.

The load generator runs on the same machine: `wrk` (one thread, C) or Python httpx (one asyncio
process). It takes CPU from the same cores as the server and Postgres; the script prints its CPU
time too.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE = "gatt_bench"

WRK_SCRIPT = r"""
local paths = {%(paths)s}
local etags = {%(etags)s}
local auth = "%(auth)s"
local conditional = %(conditional)s
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  counts = {}
  i = 0
end

function request()
  i = i %% #paths + 1
  local headers = {["Authorization"] = auth}
  if conditional then
    headers["If-None-Match"] = etags[i]
  end
  return wrk.format("GET", paths[i], headers)
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("counts")) do
      total[status] = (total[status] or 0) + n
    end
  end
  local statuses = {}
  for status, n in pairs(total) do
    table.insert(statuses, string.format('"%%d": %%d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_s": %%f, "p50_ms": %%f, "p90_ms": %%f, "p99_ms": %%f, ' ..
    '"max_ms": %%f, "mean_ms": %%f, "errors": %%d, "statuses": {%%s}}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, latency.mean / 1e3,
    e.connect + e.read + e.write + e.timeout, table.concat(statuses, ", ")))
end
"""


# --------------------------------------------------------------------------------------------
# Database, data, server.
# --------------------------------------------------------------------------------------------


def prepare_database() -> str:
    from tests.app import db

    db.create_database(DATABASE)
    db.migrate(DATABASE)
    return db.url_for(DATABASE)


def seed(url: str, n_jobs: int) -> tuple[str, list[str]]:
    """A fresh team with a key and `n_jobs` running jobs; returns the key and the job ids."""
    from app.auth import service as auth_service
    from app.jobs.service import job_config
    from service.db import make_engine, make_sessionmaker, session_scope
    from service.models import Corpus, Job, JobStage, JobStatus
    from service.settings import Settings

    settings = Settings(database_url=url)
    engine = make_engine(settings)
    config = job_config({}, settings)
    metrics = {
        "step": 40,
        "loss": 1.234,
        "learning_rate": 1.6e-4,
        "grad_norm": 0.81,
        "trained_tokens": 1650,
        "tokens": 3400,
        "tokens_per_s": 180.5,
        "elapsed_s": 182.0,
        "eta_s": 91.0,
        "epoch": 0.83,
    }
    with session_scope(make_sessionmaker(engine)) as session:
        team = auth_service.create_team(session, f"bench-{uuid.uuid4().hex[:12]}")
        _, key = auth_service.create_key(session, team.name, "bench")
        corpus = Corpus(team_id=team.id, name="bench", content=b"", size_bytes=0, stats={}, sha256="0" * 64)
        session.add(corpus)
        session.flush()
        jobs = [
            Job(
                team_id=team.id,
                corpus_id=corpus.id,
                status=JobStatus.RUNNING,
                stage=JobStage.TRAIN,
                progress=0.66,
                progress_done=40,
                progress_total=60,
                eta_s=91.0,
                config=config,
                model="default",
                trained_tokens=66000,
                latest_metrics=metrics,
                attempts=1,
            )
            for _ in range(n_jobs)
        ]
        session.add_all(jobs)
        session.flush()
        ids = [str(j.id) for j in jobs]
    engine.dispose()
    return key, ids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    url: str, port: int, rate_limit: bool, log: Path, admission: int | None = None
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, GATT_DATABASE_URL=url)
    env["GATT_RATE_LIMIT_PER_S"] = "1000000" if rate_limit else "0"
    if admission:
        env["GATT_MAX_REQUESTS_IN_FLIGHT"] = str(admission)
        env["GATT_DB_MAX_OVERFLOW"] = str(max(20, admission + 1 - 10))  # the pool must cover the limit
    target = ["app.main:app"]
    cmd = [
        str(ROOT / ".venv" / "bin" / "uvicorn"),
        *target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    import httpx

    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"uvicorn exited: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("uvicorn did not answer /healthz within 20 s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --------------------------------------------------------------------------------------------
# Load generators.
# --------------------------------------------------------------------------------------------


def run_wrk(
    base: str, key: str, ids: list[str], etags: list[str], conditional: bool, clients: int, duration: float
) -> dict[str, Any]:
    script = WRK_SCRIPT % {
        "paths": ", ".join(f'"/v1/jobs/{i}"' for i in ids),
        "etags": ", ".join(json.dumps(e) for e in etags),
        "auth": f"Bearer {key}",
        "conditional": "true" if conditional else "false",
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        cmd = ["wrk", "-t1", f"-c{clients}", f"-d{duration:g}s", "--timeout", "10s", "-s", f.name, base]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = proc.stdout.read() if proc.stdout else ""
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        os.unlink(f.name)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk failed:\n{out}")
    result = json.loads(line[len("RESULT ") :])
    if os.environ.get("BENCH_DEBUG"):
        print(out, script, file=sys.stderr)
    result["generator_cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def breakdown(url: str, key: str, ids: list[str], etags_of: Any, duration: float) -> None:
    """Server CPU per request of simpler requests, for where the time goes (wrk, 4 clients)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        server = start_server(url, port, False, Path(tmp) / "uvicorn.log")
        try:
            etags = etags_of(base)
            cases = [
                ("GET /healthz (no auth, no database)", ["/healthz"], {}),
                (
                    "GET /v1/jobs/{id} without a key (401: dependencies, no database)",
                    [f"/v1/jobs/{ids[0]}"],
                    {},
                ),
                ("GET /v1/jobs/{id} (200)", [f"/v1/jobs/{i}" for i in ids], auth),
                (
                    "GET /v1/jobs/{id} + If-None-Match (304)",
                    [f"/v1/jobs/{ids[0]}"],
                    {**auth, "If-None-Match": etags[0]},
                ),
            ]
            print("\nwhere the time goes (as shipped, wrk, 4 clients, closed loop):")
            print("request | load before | req/s | p50 ms | server CPU ms/req")
            for label, paths, headers in cases:
                lua = (
                    "local p = {{{}}}\nlocal i = 0\nfunction request()\n  i = i % #p + 1\n"
                    "  return wrk.format('GET', p[i], {{{}}})\nend\n"
                ).format(
                    ", ".join(json.dumps(x) for x in paths),
                    ", ".join(f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()),
                )
                with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
                    f.write(lua)
                try:
                    load = load_average()
                    cpu0 = cpu_seconds(server.pid)
                    cmd = ["wrk", "-t1", "-c4", f"-d{duration:g}s", "--latency", "-s", f.name, base]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                    cpu = cpu_seconds(server.pid) - cpu0
                finally:
                    os.unlink(f.name)
                n = int(next(x for x in out.splitlines() if "requests in" in x).split()[0])
                rps = float(next(x for x in out.splitlines() if x.startswith("Requests/sec")).split()[1])
                p50 = next(x for x in out.splitlines() if x.strip().startswith("50%")).split()[1]
                print(f"{label} | {load} | {rps:.0f} | {p50} | {cpu * 1e3 / max(n, 1):.2f}")
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(10)


async def _httpx_load(
    base: str,
    key: str,
    ids: list[str],
    etags: list[str],
    conditional: bool,
    clients: int,
    duration: float,
    interval: float = 0.0,
) -> dict[str, Any]:
    """`clients` clients, each on its own connection. interval 0: each sends its next request as soon
    as the last is answered (closed loop); interval > 0: each polls once every `interval` seconds,
    the clients staggered evenly over the interval (paced, like real pollers)."""
    import httpx

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
        stop = time.perf_counter() + duration

        async def one(worker: int) -> None:
            nonlocal errors
            i = worker
            due = time.perf_counter() + interval * worker / clients
            while time.perf_counter() < stop:
                if interval:
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                    due += interval
                    if time.perf_counter() >= stop:
                        break
                i = (i + 1) % len(ids)
                headers = {"Authorization": f"Bearer {key}"}
                if conditional:
                    headers["If-None-Match"] = etags[i]
                t = time.perf_counter()
                try:
                    r = await client.get(f"/v1/jobs/{ids[i]}", headers=headers)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(one(w) for w in range(clients)))
        elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "p50_ms": q[49] * 1e3,
        "p90_ms": q[89] * 1e3,
        "p99_ms": q[98] * 1e3,
        "max_ms": max(latencies, default=0.0) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else 0.0,
        "errors": errors,
        "statuses": statuses,
    }


def run_httpx(
    base: str,
    key: str,
    ids: list[str],
    etags: list[str],
    conditional: bool,
    clients: int,
    duration: float,
    interval: float = 0.0,
) -> dict[str, Any]:
    """In a child process, so that its CPU time is its own and the server's stays apart."""
    payload = json.dumps([base, key, ids, etags, conditional, clients, duration, interval])
    proc = subprocess.Popen(
        [sys.executable, __file__, "--httpx-child", payload], stdout=subprocess.PIPE, text=True
    )
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("httpx load generator failed")
    result = json.loads(out.strip().splitlines()[-1])
    result["generator_cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="50,200", help="concurrent clients, comma-separated")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measured run")
    parser.add_argument("--jobs", type=int, default=8, help="jobs to poll (cycled over)")
    parser.add_argument("--generator", choices=("wrk", "httpx"), default=None)
    parser.add_argument("--rate-limit", action="store_true", help="keep the Redis rate limiter on")
    parser.add_argument(
        "--admission",
        type=int,
        default=None,
        help="also run the app with GATT_MAX_REQUESTS_IN_FLIGHT=N (default 20) and a pool to match",
    )
    parser.add_argument("--only-admission", action="store_true", help="skip the as-shipped server")
    parser.add_argument(
        "--paced",
        type=float,
        default=1.0,
        help="as-shipped server: also poll paced, each client once every PACED seconds (httpx); 0: off",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also measure /healthz, a 401, a 200 and a 304 at 4 clients (server CPU per request)",
    )
    parser.add_argument("--httpx-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.httpx_child:
        print(json.dumps(asyncio.run(_httpx_load(*json.loads(args.httpx_child)))))
        return
    generator = args.generator or ("wrk" if shutil.which("wrk") else "httpx")
    run = run_wrk if generator == "wrk" else run_httpx
    clients = [int(c) for c in args.clients.split(",")]

    import httpx

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    print(f"machine: nproc={os.cpu_count()}, cpu={cpu}, python {sys.version.split()[0]}")
    if generator == "wrk":
        version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    else:
        version = f"httpx {httpx.__version__}"
    print(f"generator: {version}")
    print(f"load average at start: {load_average()}")

    url = prepare_database()
    key, ids = seed(url, args.jobs)
    configs: list[int | None] = [] if args.only_admission else [None]
    if args.admission:
        configs.append(args.admission)
    rows = []
    for admission in configs:
        server_name = "as shipped" if admission is None else f"in-flight limit {admission}"
        for c in clients:
            # A fresh server per case: a stalled run must not leave blocked threads to the next case.
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
                server = start_server(url, port, args.rate_limit, Path(tmp) / "uvicorn.log", admission)
                try:
                    headers = {"Authorization": f"Bearer {key}"}
                    first = [httpx.get(f"{base}/v1/jobs/{i}", headers=headers) for i in ids]
                    bad = [r.text for r in first if r.status_code != 200]
                    assert not bad, bad
                    etags = [r.headers.get("ETag", '"none"') for r in first]
                    print(
                        f"server {server_name}: uvicorn, 1 worker, pid {server.pid}; body {len(first[0].content)} "
                        f"bytes; ETag: {'ETag' in first[0].headers}; rate limiter {'on' if args.rate_limit else 'off'}",
                        flush=True,
                    )
                    # Paced first: a closed-loop run that stalls the server must not spoil it.
                    plans = [(run, "", 0.0)]
                    if admission is None and args.paced:
                        plans.insert(0, (run_httpx, f", paced {args.paced:g} s", args.paced))
                    for (fn, suffix, interval), conditional in itertools.product(
                        plans, (False, True, True, False)
                    ):
                        pace = {"interval": interval} if interval else {}
                        fn(base, key, ids, etags, conditional, c, 2.0, **pace)  # warm-up, not counted
                        load = load_average()
                        cpu0 = cpu_seconds(server.pid)
                        result = fn(base, key, ids, etags, conditional, c, args.duration, **pace)
                        result["server_cpu_s"] = cpu_seconds(server.pid) - cpu0
                        mode = ("If-None-Match" if conditional else "plain") + suffix
                        result.update(server=server_name, clients=c, mode=mode, load=load)
                        rows.append(result)
                        print(
                            f"  {c} clients, {mode}: {result['requests'] / result['duration_s']:.0f} req/s, "
                            f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                            f"statuses {result['statuses']}, errors {result['errors']}, load {load}",
                            flush=True,
                        )
                finally:
                    server.send_signal(signal.SIGINT)
                    try:
                        server.wait(10)
                    except subprocess.TimeoutExpired:
                        server.kill()
                        server.wait()

    print(
        "\nserver | clients | mode | load before | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | "
        "statuses | errors | server CPU ms/req | generator CPU ms/req"
    )
    for r in rows:
        n = max(r["requests"], 1)
        print(
            f"{r['server']} | {r['clients']} | {r['mode']} | {r['load']} | {r['requests']} | "
            f"{r['requests'] / r['duration_s']:.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['max_ms']:.0f} | "
            f"{' '.join(f'{k}:{v}' for k, v in sorted(r['statuses'].items()))} | {r['errors']} | "
            f"{r['server_cpu_s'] * 1e3 / n:.2f} | {r['generator_cpu_s'] * 1e3 / n:.2f}"
        )
    print("\nper case, the run with the lower p99 of the two, and If-None-Match / plain:")
    for server_name, c in dict.fromkeys((r["server"], r["clients"]) for r in rows):
        best = {}
        for m in dict.fromkeys(r["mode"] for r in rows if (r["server"], r["clients"]) == (server_name, c)):
            mine = [r for r in rows if (r["server"], r["clients"], r["mode"]) == (server_name, c, m)]
            ok = [
                r for r in mine if r["requests"] and set(r["statuses"]) <= {"200", "304"} and not r["errors"]
            ]
            best[m] = min(ok, key=lambda r: r["p99_ms"]) if ok else None
        line = f"  {server_name}, {c} clients:"
        for m, r in best.items():
            line += f" {m} " + (
                "no clean run (stalled or errors)"
                if r is None
                else f"{r['requests'] / r['duration_s']:.0f} req/s p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms;"
            )
        p, e = best.get("plain"), best.get("If-None-Match")
        if p and e:
            line += " closed loop If-None-Match / plain:"
            line += (
                f" req/s {e['requests'] / e['duration_s'] / (p['requests'] / p['duration_s']):.2f}x, "
                f"p99 {e['p99_ms'] / p['p99_ms']:.2f}x"
            )
        if c == 50:
            line += (
                " (target p99 < 50 ms: "
                + ", ".join(f"{m} {'met' if r and r['p99_ms'] < 50 else 'missed'}" for m, r in best.items())
                + ")"
            )
        print(line)
    if args.breakdown and shutil.which("wrk"):

        def etags_of(base: str) -> list[str]:
            auth = {"Authorization": f"Bearer {key}"}
            return [httpx.get(f"{base}/v1/jobs/{i}", headers=auth).headers["ETag"] for i in ids]

        breakdown(url, key, ids, etags_of, min(args.duration, 10.0))
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()
