"""Wall time of the README's main job (`scripts/main.sh`), split into set-up and job.

    .venv/bin/python bench/main_job.py [--log var/log/bench-main-job.log]

Runs `scripts/main.sh` unchanged (on a free port instead of 8000, so that it does not collide with
another server on the machine), stamps every line it prints with the seconds since the start, and
samples the load average every 5 s. The phases come from the lines main.sh and
scripts/main_job.py print:

- set-up: from the start to "API on http://..." (scripts/setup.sh with everything already installed,
  scripts/services.sh, migrations, team and key, API and worker started and /readyz answering);
  "setup ok" splits off setup.sh itself;
- job: from there to the end (corpus upload, job creation, the job's stages, reading its metrics,
  samples and checkpoints); the stages are split at the "[info] stage: ..." events, which
  main_job.py polls every second, so each stage boundary is known to within about a second.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 300.0


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", default=str(ROOT / "var" / "log" / "bench-main-job.log"))
    args = parser.parse_args()

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"machine: nproc={os.cpu_count()}, cpu={cpu}; load average at start {load_average():.2f}")

    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            loads.append(load_average())

    threading.Thread(target=sample, daemon=True).start()
    env = dict(os.environ, PORT=str(free_port()))
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    with open(args.log, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "main.sh")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.perf_counter() - start
            lines.append((t, line.rstrip("\n")))
            stamped = f"{t:7.1f}s {line.rstrip()}"
            print(stamped, flush=True)
            log.write(stamped + "\n")
        rc = proc.wait()
    total = time.perf_counter() - start
    done.set()

    def first(pattern: str) -> float | None:
        return next((t for t, line in lines if re.search(pattern, line)), None)

    setup_ok = first(r"^setup ok")
    api_up = first(r"^API on http")
    corpus = first(r"^corpus ")
    finished = first(r"^job \S+ (succeeded|failed|cancelled) after")
    stages = [(t, m.group(1)) for t, line in lines if (m := re.search(r"\[info\] stage: (\w+)", line))]

    print(
        f"\nscripts/main.sh exit status {rc}; wall time {total:.1f} s (target < {TARGET_S:.0f} s: "
        + (
            f"met, {TARGET_S - total:.0f} s to spare)"
            if total < TARGET_S
            else f"missed by {total - TARGET_S:.0f} s)"
        )
    )
    if api_up is not None:
        print(
            f"  set-up: {api_up:.1f} s"
            + (
                f" (setup.sh {setup_ok:.1f} s, services/migrations/API/worker {api_up - setup_ok:.1f} s)"
                if setup_ok is not None
                else ""
            )
        )
        print(f"  job:    {total - api_up:.1f} s")
        if corpus is not None:
            print(f"    corpus upload (after API up): {corpus - api_up:.1f} s")
        marks = stages + ([(finished, "end (job finished, as polled)")] if finished is not None else [])
        for (t, name), nxt in zip(marks, [*marks[1:], (None, None)], strict=True):
            if nxt[0] is not None:
                print(f"    {name}: {nxt[0] - t:.1f} s (+/- 2 s polling)")
        if finished is not None:
            print(f"    after the job: reading metrics, samples, checkpoints: {total - finished:.1f} s")
    if loads:
        print(
            f"  load average during the run: min {min(loads):.2f}, mean {sum(loads) / len(loads):.2f}, "
            f"max {max(loads):.2f} ({len(loads)} samples)"
        )
    print(f"  log: {args.log}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
