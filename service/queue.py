"""The job queue: a Celery application on Redis, only ids in messages, at-least-once delivery.

The API sends tasks by name through `client()`; the worker process builds its own app with
`make_celery()` (`workers/celery_app.py`) and registers the tasks on it. Neither imports the other.

Why these settings:
- `task_acks_late` + `task_reject_on_worker_lost`: a task is acknowledged only when it returns, so
  a worker killed mid-job leaves its message to be delivered again instead of losing the job.
- `worker_prefetch_multiplier=1`: a worker holds one job at a time; a long GPU job must not sit on
  messages other workers could run.
- Redis redelivers an unacknowledged message after `visibility_timeout`. A job can run for hours,
  longer than any sensible timeout, so a redelivery can reach a job that is still running. That is
  harmless: a run starts only by taking the job's lease in Postgres (`service.repositories.jobs.claim`),
  which succeeds only for a queued job or one whose lease expired. Postgres, not the broker, decides.
- The playground's `chat.reply` is the one task that carries content (the conversation, bounded
  by the API, never stored) and the one a client waits on: it expires when the API stops waiting,
  and is acknowledged on receipt, so a lost worker means a 504, not a reply nobody reads.
"""

from __future__ import annotations

from functools import lru_cache
from uuid import UUID

from celery import Celery
from kombu.exceptions import ChannelError

from service.settings import get_settings

JOB_TASK = "jobs.run"
REAP_TASK = "jobs.reap"
# Its own queue (`GATT_WEBHOOK_QUEUE`): a delivery must not wait behind a job on a busy GPU worker.
WEBHOOK_TASK = "webhooks.deliver"
# The playground (app/jobs/chat.py, workers/chat.py): its own queue, `GATT_CHAT_QUEUE`.
CHAT_TASK = "chat.reply"


def make_celery(broker_url: str | None = None) -> Celery:
    settings = get_settings()
    app = Celery("gatt", broker=broker_url or settings.redis_url, include=["workers.tasks", "workers.chat"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="default",
        task_routes={
            JOB_TASK: {"queue": settings.job_queue},
            REAP_TASK: {"queue": "default"},
            WEBHOOK_TASK: {"queue": settings.webhook_queue},
            CHAT_TASK: {"queue": settings.chat_queue},
        },
        broker_transport_options={"visibility_timeout": 6 * 3600},
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        beat_schedule={"reap": {"task": REAP_TASK, "schedule": max(5.0, settings.lease_s / 2)}},
    )
    return app


@lru_cache
def client() -> Celery:
    """The Celery app the API sends with (created on first use; it connects on first send)."""
    return make_celery()


def waiting_jobs() -> int:
    """Messages waiting in the API's job queue (see `waiting_messages`)."""
    return waiting_messages(client(), get_settings().job_queue)


def send_job(job_id: UUID) -> None:
    """Hand a committed job to the workers: a `jobs.run` message holding its id."""
    client().send_task(JOB_TASK, args=[str(job_id)])


def send_chat(request: dict) -> None:
    """Ask a chat worker for a reply (`workers.chat.reply_task`); it pushes the answer to
    `request["reply_to"]` in Redis. Dropped unread once the API has stopped waiting."""
    client().send_task(CHAT_TASK, args=[request], expires=get_settings().chat_timeout_s)


def send_webhook(delivery_id: UUID) -> None:
    """Hand a committed webhook delivery to the workers: a `webhooks.deliver` message holding its id."""
    client().send_task(WEBHOOK_TASK, args=[str(delivery_id)])


def waiting_messages(app: Celery, queue: str) -> int:
    """Messages waiting in `queue` on the broker (taken but unacknowledged ones not counted): what
    the reaper compares with the queued jobs to find the ones whose message was lost."""
    with app.connection_for_read() as connection:
        try:
            return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError:  # Redis has no key for an empty queue: no messages
            return 0
