from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import ApiKey, Team


def get_team_by_name(session: Session, name: str) -> Team | None:
    return session.scalars(select(Team).where(Team.name == name)).one_or_none()


def get_team(session: Session, team_id: uuid.UUID) -> Team | None:
    return session.get(Team, team_id)


def lock_team(session: Session, team_id: uuid.UUID) -> None:
    """Lock the team's row until the transaction ends: serialises a team's quota checks."""
    session.execute(select(Team.id).where(Team.id == team_id).with_for_update())


def add_team(session: Session, name: str) -> Team:
    team = Team(name=name)
    session.add(team)
    session.flush()
    return team


def get_key_by_prefix(session: Session, prefix: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).one_or_none()


def add_key(session: Session, team_id: uuid.UUID, prefix: str, key_hash: str, name: str | None) -> ApiKey:
    api_key = ApiKey(team_id=team_id, prefix=prefix, key_hash=key_hash, name=name)
    session.add(api_key)
    session.flush()
    return api_key


def list_keys(session: Session, team_id: uuid.UUID) -> list[ApiKey]:
    stmt = select(ApiKey).where(ApiKey.team_id == team_id).order_by(ApiKey.created_at, ApiKey.id)
    return list(session.scalars(stmt).all())


def mark_revoked(session: Session, api_key: ApiKey, when: datetime) -> None:
    api_key.revoked_at = when
    session.flush()


def count_active_keys(session: Session, team_id: uuid.UUID) -> int:
    stmt = (
        select(func.count()).select_from(ApiKey).where(ApiKey.team_id == team_id, ApiKey.revoked_at.is_(None))
    )
    return int(session.scalar(stmt) or 0)
