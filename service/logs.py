"""Structured logs: one JSON object per line, from the API and the workers alike, searchable by job.

Every record carries `timestamp`, `level`, `logger`, `message` and, where known, the `request_id`
(an API request; accepted from and returned in `X-Request-ID`), the `team_id`, and the `job_id` and
`attempt` a worker is running. They come from context variables that `bind` sets for the duration
of a request or a job run, so a line logged anywhere below (a repository, the engine) has them
without being passed them. The job's own event log (`/v1/jobs/{id}/events`) stays the record a team
reads; these lines are the operator's.

The fields are held in one dict per context: a value bound inside a FastAPI dependency, which runs
in a worker thread with a copy of the request's context, lands in the same dict the request's
middleware logs from.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from typing import Any

from pythonjsonlogger.json import JsonFormatter

FIELDS = ("request_id", "team_id", "job_id", "attempt")
_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("gatt_log", default=None)


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[dict[str, Any]]:
    """Add `fields` to every record logged in this context until the block ends (nested binds add
    to the outer ones); yields the dict, which `annotate` may fill in later."""
    fields = {**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _context.set(fields)
    try:
        yield fields
    finally:
        _context.reset(token)


def annotate(**fields: Any) -> None:
    """Add fields to the innermost `bind` (a request learns its team after the middleware bound it)."""
    current = _context.get()
    if current is not None:
        current.update({k: v for k, v in fields.items() if v is not None})


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (_context.get() or {}).items():
            if not hasattr(record, name):
                setattr(record, name, str(value))
        return True


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    """The root logger to stderr, as JSON lines (or plain text for a terminal), with the context."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "timestamp", "levelname": "level", "name": "logger"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Uvicorn's and Celery's loggers carry their own handlers; sent to the root instead, they come
    # out as JSON too. Uvicorn's access log is replaced by the API's own (app/core/observe.py), which
    # has the request id, the team and the route.
    for name in ("uvicorn", "uvicorn.error", "celery"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
