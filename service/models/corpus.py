from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, LargeBinary, String
from sqlalchemy.orm import Mapped, deferred, mapped_column

from service.models.base import Base, Timestamps, UUIDPrimaryKey


class Corpus(UUIDPrimaryKey, Timestamps, Base):
    """An uploaded, fully validated dialogue corpus. Immutable once created.

    Deletion is soft: the row stays so that finished jobs keep their reference (and its stats and
    hash), but `content` is set to NULL so the data itself is gone.
    """

    __tablename__ = "corpora"
    __table_args__ = (Index(None, "team_id", "created_at", "id"),)

    team_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("teams.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    # The JSONL normalized by gatt.dialogues.dump_corpus. Deferred: only the content endpoint and the
    # workers need it, never a listing.
    content: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # gatt.dialogues.corpus_stats of the corpus.
    stats: Mapped[dict[str, Any]]
    sha256: Mapped[str] = mapped_column(String(64))
    deleted_at: Mapped[datetime | None]
