"""The worker's Celery application: `celery -A workers.celery_app worker`. Its settings, and why,
are in `service/queue.py`; the tasks it runs are in `workers/tasks.py`."""

from __future__ import annotations

from service.queue import JOB_TASK, REAP_TASK, make_celery

__all__ = ["JOB_TASK", "REAP_TASK", "celery"]

celery = make_celery()
