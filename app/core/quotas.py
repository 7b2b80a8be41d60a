"""Per-team quotas: how much one team may hold, or have waiting for a worker, at once.

Rate limits (app/core/ratelimit.py) bound how fast a key may ask; these bound what a team keeps:
without them one tenant can fill the queue with thousands of jobs or the database with corpora, and
every other team pays for it. The limits are the server's (`GATT_TEAM_MAX_*`, service/settings.py).

A request over a quota stores nothing and is answered with code `quota_exceeded` and a detail
`{"quota", "limit", "used"}`: 429 for active jobs, which free themselves as jobs end (retry later),
422 for stored corpora and instruction sets, which only a delete frees (retrying changes nothing).

Each check locks the team's row first, so that two concurrent creates of one team are counted one
after the other and cannot both take the last unit (SQLite, the embedded mode, has one writer anyway).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.errors import AppError
from service.models import Team
from service.repositories import auth, corpora, instruction_sets, jobs, webhooks
from service.settings import Settings


class QuotaExceeded(AppError):
    status_code, code, message = 422, "quota_exceeded", "The team's quota is used up."

    def __init__(self, quota: str, limit: int, used: int, message: str, *, status_code: int = 422) -> None:
        super().__init__(
            message, details=[{"quota": quota, "limit": limit, "used": used}], status_code=status_code
        )


def check_job(session: Session, team: Team, settings: Settings) -> None:
    """Room for one more queued job: queued and running jobs stay under `team_max_active_jobs`, and
    the artifacts the team keeps under `team_max_artifact_bytes` (a job adds to them as it runs)."""
    auth.lock_team(session, team.id)
    used, limit = jobs.count_active(session, team.id), settings.team_max_active_jobs
    if used >= limit:
        raise QuotaExceeded(
            "active_jobs",
            limit,
            used,
            f"The team has {used} queued or running jobs, its limit; retry when one has ended, or cancel one.",
            status_code=429,
        )
    stored, limit = jobs.artifact_bytes(session, team.id), settings.team_max_artifact_bytes
    if stored >= limit:
        raise QuotaExceeded(
            "artifact_bytes",
            limit,
            stored,
            f"The team's job artifacts take {stored} bytes, its limit of {limit}; delete finished jobs "
            "(DELETE /v1/jobs/{job_id}) first.",
        )


def check_corpus(session: Session, team: Team, settings: Settings, size_bytes: int) -> None:
    """Room for one more corpus of `size_bytes` (stored, normalized): a count and a byte budget."""
    auth.lock_team(session, team.id)
    count, stored = corpora.usage(session, team.id)
    if count >= settings.team_max_corpora:
        raise QuotaExceeded(
            "corpora",
            settings.team_max_corpora,
            count,
            f"The team stores {count} corpora, its limit; delete one first.",
        )
    if stored + size_bytes > settings.team_max_corpus_bytes:
        raise QuotaExceeded(
            "corpus_bytes",
            settings.team_max_corpus_bytes,
            stored,
            f"The team's corpora take {stored} bytes; this one ({size_bytes} bytes) would pass its limit of "
            f"{settings.team_max_corpus_bytes}; delete some first.",
        )


def check_instruction_set(session: Session, team: Team, settings: Settings) -> None:
    auth.lock_team(session, team.id)
    used, limit = instruction_sets.count(session, team.id), settings.team_max_instruction_sets
    if used >= limit:
        raise QuotaExceeded(
            "instruction_sets",
            limit,
            used,
            f"The team stores {used} instruction sets, its limit; delete one first.",
        )


def check_webhook(session: Session, team: Team, settings: Settings) -> None:
    auth.lock_team(session, team.id)
    used, limit = webhooks.count(session, team.id), settings.team_max_webhooks
    if used >= limit:
        raise QuotaExceeded(
            "webhooks", limit, used, f"The team has {used} webhook endpoints, its limit; delete one first."
        )


def check_api_key(session: Session, team: Team, settings: Settings) -> None:
    auth.lock_team(session, team.id)
    used, limit = auth.count_active_keys(session, team.id), settings.team_max_api_keys
    if used >= limit:
        raise QuotaExceeded(
            "api_keys", limit, used, f"The team has {used} API keys, its limit; revoke one first."
        )
