"""`/v1/keys`: a team's API keys, managed with one of its own keys.

Every key of a team has the same rights, so a key that makes another grants nothing new; it lets a
team rotate keys (create the new one, deploy it, revoke the old) without an operator. The key
itself is shown once, in the answer that creates it; afterwards only its prefix exists. Another
team's prefix is a 404. Operators still create a team's first key (`python -m app.admin`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, status

from app.auth import service
from app.auth.dependencies import CurrentTeam
from app.core import quotas
from app.core.db import SessionDep, SettingsDep
from app.core.errors import AUTH_RESPONSES, ERROR_RESPONSES, NotFound, error_response
from app.keys.schemas import Key, KeyCreate, KeyList, NewKey
from service.repositories import auth as repository

router = APIRouter(prefix="/keys", tags=["keys"])

Prefix = Annotated[
    str, Path(min_length=8, max_length=8, pattern=r"^[a-z0-9]{8}$", description="The key's prefix.")
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=NewKey,
    summary="Create an API key",
    responses={
        **AUTH_RESPONSES,
        **error_response(
            422,
            "`invalid_request`: a name over 100 characters. `quota_exceeded`: the team has its limit of "
            "unrevoked keys (`GATT_TEAM_MAX_API_KEYS`; `details`: `quota` `api_keys`). Nothing is stored.",
        ),
    },
)
def create_key(session: SessionDep, team: CurrentTeam, settings: SettingsDep, body: KeyCreate) -> NewKey:
    """A new key for the caller's team. The answer holds the key; it is stored only as a hash, so it
    cannot be shown again."""
    quotas.check_api_key(session, team, settings)
    row, key = service.create_key(session, team.name, body.name)
    return NewKey(**Key.from_row(row).model_dump(), key=key)


@router.get("", response_model=KeyList, summary="List API keys", responses=AUTH_RESPONSES)
def list_keys(session: SessionDep, team: CurrentTeam) -> KeyList:
    """The team's keys by prefix (never the keys), oldest first, at most the quota of unrevoked ones
    plus those revoked."""
    return KeyList(data=[Key.from_row(k) for k in repository.list_keys(session, team.id)])


@router.delete(
    "/{prefix}",
    response_model=Key,
    summary="Revoke an API key",
    responses={**ERROR_RESPONSES, **error_response(404, "`not_found`: no key of this team has this prefix.")},
)
def revoke_key(session: SessionDep, team: CurrentTeam, prefix: Prefix) -> Key:
    """Revoke a key of the team (the one making the request too): it stops authenticating at once.
    Revoking a revoked key changes nothing."""
    row = repository.get_key_by_prefix(session, prefix)
    if row is None or row.team_id != team.id:
        raise NotFound("No key of this team has this prefix.", param="prefix")
    if row.revoked_at is None:
        repository.mark_revoked(session, row, datetime.now(UTC))
    return Key.from_row(row)
