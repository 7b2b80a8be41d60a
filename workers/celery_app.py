"""The worker's Celery application: `celery -A workers.celery_app worker`. Its settings, and why,
are in `service/queue.py`; the tasks it runs are in `workers/tasks.py`."""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from service.logs import configure_logging
from service.queue import JOB_TASK, REAP_TASK, WEBHOOK_TASK, make_celery
from service.settings import get_settings
from workers import metrics
from workers.threads import size_torch_threads

__all__ = ["JOB_TASK", "REAP_TASK", "WEBHOOK_TASK", "celery"]

celery = make_celery()


_threads_note: list[str] = []


@signals.worker_init.connect
def _size_torch_threads(sender: Any, **_: Any) -> None:
    # Before the pool starts (and before torch loads): each job slot gets its share of the cores.
    pool = getattr(sender.pool_cls, "__module__", str(sender.pool_cls))
    _threads_note.append(size_torch_threads(sender.concurrency, pool))


@signals.setup_logging.connect
def _logging(**_: Any) -> None:
    # Connected, this replaces Celery's own set-up: the worker logs JSON lines like the API.
    settings = get_settings()
    configure_logging(settings.log_format, settings.log_level)


@signals.worker_ready.connect
def _say_torch_threads(**_: Any) -> None:
    for note in _threads_note:  # logging is set up by now; it was not at worker_init
        logging.getLogger(__name__).info(note)
    metrics.serve(get_settings().worker_metrics_port)
