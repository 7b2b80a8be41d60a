"""Teams and keys: creation, revocation, and authentication of a presented key."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session

from app.auth import keys
from app.core.errors import Conflict, NotFound, Unauthorized, Unprocessable
from service.models import ApiKey, Team
from service.repositories import auth as repository


def create_team(session: Session, name: str) -> Team:
    name = name.strip()
    if not name:
        raise Unprocessable("A team name must not be empty.", code="invalid_name", param="name")
    if repository.get_team_by_name(session, name) is not None:
        raise Conflict(f"A team named {name!r} already exists.", code="team_exists", param="name")
    return repository.add_team(session, name)


def create_key(session: Session, team_name: str, name: str | None = None) -> tuple[ApiKey, str]:
    """A new key for the team: the row, and the key itself, which exists nowhere else afterwards."""
    team = repository.get_team_by_name(session, team_name)
    if team is None:
        raise NotFound(f"No team named {team_name!r}.", param="team")
    new = keys.generate_key()
    # 36**8 prefixes: a collision is astronomically rare, and the unique index would catch it anyway.
    while repository.get_key_by_prefix(session, new.prefix) is not None:
        new = keys.generate_key()
    return repository.add_key(session, team.id, new.prefix, new.key_hash, name), new.key


def revoke_key(session: Session, prefix: str) -> ApiKey:
    api_key = repository.get_key_by_prefix(session, prefix)
    if api_key is None:
        raise NotFound(f"No key with prefix {prefix!r}.", param="prefix")
    if api_key.revoked_at is None:
        repository.mark_revoked(session, api_key, datetime.now(UTC))
    return api_key


def authenticate(session: Session, authorization: str | None) -> Team:
    """The team of the key in an `Authorization` header value, or `Unauthorized`."""
    if not authorization or not authorization.strip():
        raise Unauthorized("No API key: send it as 'Authorization: Bearer <key>'.", code="missing_api_key")
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Expected 'Authorization: Bearer <key>'.")
    key = key.strip()
    prefix = keys.parse_prefix(key)
    api_key = repository.get_key_by_prefix(session, prefix) if prefix is not None else None
    if api_key is None or not keys.key_matches(key, api_key.key_hash):
        raise Unauthorized("The API key is not valid.")
    if api_key.revoked_at is not None:
        raise Unauthorized("The API key was revoked.")
    team = repository.get_team(session, api_key.team_id)
    if team is None:  # pragma: no cover - the foreign key cascades deletes
        raise Unauthorized("The API key is not valid.")
    return team
