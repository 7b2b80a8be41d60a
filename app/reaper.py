"""The service API process sweeps for jobs that need a worker again (service/reaper.py says why
here and not only in a worker), and for webhook deliveries whose message was lost (service/webhooks.py):
every `GATT_REAPER_INTERVAL_S`, in a thread, never failing the app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from functools import partial

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.reaper import reap
from service.webhooks import resend_overdue

log = logging.getLogger(__name__)


def reaping(interval_s: float) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan (for `create_app(lifespan=...)`) that sweeps every `interval_s` while the app runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_sweep_every(app, interval_s))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return lifespan


async def _sweep_every(app: FastAPI, interval_s: float) -> None:
    state = app.state
    while True:
        await asyncio.sleep(interval_s)
        try:
            lease = timedelta(seconds=state.settings.lease_s)
            sent = await run_in_threadpool(
                partial(reap, queue=state.settings.job_queue, waiting=state.waiting_jobs),
                state.sessionmaker,
                lease,
                state.enqueue,
            )
            if sent:
                log.info("reaper: sent %d job(s) to the workers again", sent)
            if state.send_webhook is not None:
                resent = await run_in_threadpool(
                    resend_overdue, state.sessionmaker, lease, state.send_webhook
                )
                if resent:
                    log.info("reaper: sent %d webhook deliveries again", resent)
        except Exception:  # Postgres or Redis away: the next sweep tries again
            log.exception("reaper sweep failed")
