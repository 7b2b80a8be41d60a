from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import keys, service
from app.core.db import SessionDep
from app.core.errors import RateLimited
from service import logs
from service.models import Team

# Declared for the OpenAPI security scheme only (auto_error=False); the header is checked below so that
# a missing key and a malformed one get different codes and the envelope.
bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key, `Authorization: Bearer gatt_<prefix>_<secret>`; create one with "
    "`python -m app.admin create-key TEAM`.",
)


def current_team(
    request: Request,
    session: SessionDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Team:
    authorization = request.headers.get("authorization")
    team = service.authenticate(session, authorization)
    logs.annotate(team_id=team.id)  # the request's log lines name the team from here on
    # After authentication: only a valid key has a bucket (see app.core.ratelimit).
    limiter = getattr(request.app.state, "rate_limiter", None)
    prefix = keys.parse_prefix((authorization or "").strip().partition(" ")[2].strip())
    if limiter is not None and prefix is not None:
        decision = limiter.check(prefix)
        if not decision.allowed:
            raise RateLimited(
                f"Too many requests with this API key; retry in {decision.retry_after_s} s.",
                retry_after_s=decision.retry_after_s,
            )
    return team


CurrentTeam = Annotated[Team, Depends(current_team)]
"""The team the request's API key belongs to; every resource query is scoped to it."""
