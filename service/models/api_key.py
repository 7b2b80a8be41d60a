from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, Timestamps, UUIDPrimaryKey


class ApiKey(UUIDPrimaryKey, Timestamps, Base):
    """An API key of a team. The key itself is never stored (see `app.auth.keys`)."""

    __tablename__ = "api_keys"

    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"), index=True)
    # The random 8-character lookup id inside the key ("gatt_<prefix>_<secret>"): safe to show and log.
    prefix: Mapped[str] = mapped_column(String(8), unique=True)
    # SHA-256 (hex) of the whole key. A fast hash is right here, unlike for passwords: keys carry 256
    # random bits, so a leaked hash cannot be brute-forced however fast the hash, and a slow KDF
    # (bcrypt, argon2) would only add its cost to every request.
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(100))
    revoked_at: Mapped[datetime | None]
