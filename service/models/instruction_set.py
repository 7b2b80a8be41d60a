from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from service.models.base import Base, Timestamps, UUIDPrimaryKey


class InstructionSet(UUIDPrimaryKey, Timestamps, Base):
    """A team's validated instruction set. Immutable once created.

    Deletion is soft (`deleted_at`): finished jobs keep pointing at the set they used, and a null
    `jobs.instruction_set_id` already means "the default set", so the reference cannot be nulled.
    """

    __tablename__ = "instruction_sets"
    __table_args__ = (Index(None, "team_id", "created_at", "id"),)

    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    # gatt.instructions.instruction_set_to_json of the parsed set: normalized, parses back equal.
    spec: Mapped[dict[str, Any]]
    deleted_at: Mapped[datetime | None]
