"""A worker's Prometheus metrics, served by the worker itself (`GATT_WORKER_METRICS_PORT`).

An exporter per worker process, not a push to the API: the API does not see workers, and several
workers on several hosts are scraped like any other targets (docker-compose.yml, `prometheus.yml`
in docs/operations.md). With Celery's prefork pool the tasks run in child processes: set
`PROMETHEUS_MULTIPROC_DIR` (an empty directory per worker) and the exporter adds up the children's
files (prometheus-client's multiprocess mode); the documented `--pool solo` needs nothing.

What jobs do (tokens sampled and trained, stage and job durations, last heartbeat, GPU memory) is
recorded here by the job's hooks (workers/job_run.py); what jobs are (by status, stage and queue) is
the API's `/metrics`, read from Postgres.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_DURATIONS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 12 * 3600, 24 * 3600)

SAMPLED_TOKENS = Counter("gatt_worker_sampled_tokens", "Tokens generated while sampling candidates")
TRAINED_TOKENS = Counter("gatt_worker_trained_tokens", "Tokens that carried loss in training steps")
TRAINING_STEPS = Counter("gatt_worker_training_steps", "Optimiser steps taken")
JOB_RUNS = Counter("gatt_worker_job_runs", "Job runs (attempts) this worker ended, by outcome", ["outcome"])
JOB_DURATION = Histogram(
    "gatt_worker_job_run_duration_seconds", "Wall time of one run (attempt) of a job", buckets=_DURATIONS
)
STAGE_DURATION = Histogram(
    "gatt_worker_stage_duration_seconds", "Wall time of a job's stage", ["stage"], buckets=_DURATIONS
)
HEARTBEAT = Gauge(
    "gatt_worker_last_heartbeat_timestamp_seconds",
    "When this worker last renewed a job's lease (Unix time)",
    multiprocess_mode="max",
)
GPU_MEMORY = Gauge(
    "gatt_worker_gpu_max_memory_allocated_bytes",
    "Peak GPU memory torch allocated in the current job run",
    multiprocess_mode="max",
)


def serve(port: int) -> None:
    """Serve /metrics on `port` (all interfaces); in multiprocess mode, the children's metrics."""
    if port <= 0:
        return
    registry = None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(port, registry=registry) if registry is not None else start_http_server(port)
    except OSError as exc:  # the port is taken (another worker on this host): run on, unscraped
        log.error("cannot serve worker metrics on :%d: %s", port, exc)
        return
    log.info("worker metrics on :%d/metrics", port)


def record_gpu_memory() -> None:
    """The run's peak GPU memory, if torch has a GPU (torch is loaded by then: a job ran)."""
    import torch

    if torch.cuda.is_available():
        GPU_MEMORY.set(torch.cuda.max_memory_allocated())
