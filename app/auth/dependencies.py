from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.auth import service
from app.core.db import SessionDep
from app.models import Team

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
    return service.authenticate(session, request.headers.get("authorization"))


CurrentTeam = Annotated[Team, Depends(current_team)]
"""The team the request's API key belongs to; every resource query is scoped to it."""
