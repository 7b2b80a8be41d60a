"""How many threads torch may use in a worker process: the cores it is given, shared by its job slots.

torch sizes its intra-op pool from the machine's cores. A worker that runs two jobs at once (two
prefork children, or two threads), or shares the box with other processes, then has every job
spin as many threads as there are cores, and they fight: one sampling chunk took 400 s beside one
other busy process, against 61 s with one thread each. So a worker gives each job slot
`cores // slots` threads, where `cores` are the CPUs this process may run on (its affinity, which
containers and `taskset` narrow) and `slots` the jobs it runs at once (1 for the solo pool).

An operator's own choice wins: `GATT_TORCH_THREADS` sets the number, and an `OMP_NUM_THREADS` already
in the environment is left as it is. The number is put in `OMP_NUM_THREADS` before torch is imported
(the worker imports it with its first job), so prefork children inherit it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping


def job_slots(concurrency: object, pool: str, cores: int) -> int:
    """Jobs a worker runs at once: its concurrency, except that the solo pool runs one (and an
    autoscaled one, "auto", may run one per core)."""
    if "solo" in pool.lower():
        return 1
    return max(1, concurrency) if isinstance(concurrency, int) else cores


def threads_per_job(cores: int, slots: int) -> int:
    return max(1, cores // max(1, slots))


def size_torch_threads(
    concurrency: object, pool: str, environ: MutableMapping[str, str] | None = None
) -> str:
    """Set `OMP_NUM_THREADS` (and torch's pool, if torch is loaded) for this worker; says what it did."""
    env = os.environ if environ is None else environ
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    slots = job_slots(concurrency, pool, cores)
    if env.get("GATT_TORCH_THREADS"):
        threads, why = int(env["GATT_TORCH_THREADS"]), "GATT_TORCH_THREADS"
    elif env.get("OMP_NUM_THREADS"):
        return f"torch threads: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} as set ({slots} job slots)"
    else:
        threads, why = threads_per_job(cores, slots), f"{cores} cores / {slots} job slots"
    env["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return f"torch threads: {threads} per job ({why})"
