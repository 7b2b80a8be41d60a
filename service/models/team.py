from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, Timestamps, UUIDPrimaryKey


class Team(UUIDPrimaryKey, Timestamps, Base):
    """The tenant: every resource belongs to one team, and API keys act for their team."""

    __tablename__ = "teams"

    name: Mapped[str] = mapped_column(String(100), unique=True)
