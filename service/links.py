"""Links the service hands out: the same in the API's answers and in webhook payloads."""

from __future__ import annotations

import uuid

from service.settings import Settings


def checkpoint_path(job_id: uuid.UUID, step: int) -> str:
    """`GET /v1/jobs/{id}/checkpoints/{step}/archive`, where a team downloads a checkpoint."""
    return f"/v1/jobs/{job_id}/checkpoints/{step}/archive"


def public_url(settings: Settings, path: str) -> str | None:
    """`path` on GATT_PUBLIC_URL, or None when the server has none set."""
    return f"{settings.public_url.rstrip('/')}{path}" if settings.public_url else None
