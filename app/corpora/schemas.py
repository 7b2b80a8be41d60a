from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, Field

from app.core.pagination import Page
from service.models import Corpus as CorpusRow


class CorpusStats(BaseModel):
    dialogues: int = Field(description="Number of dialogues (lines).")
    system_prompts: int = Field(description="Dialogues that start with a system message.")
    user_turns: int = Field(description="User messages over all dialogues: the number of turns.")
    assistant_turns: int = Field(description="Assistant messages over all dialogues.")
    characters: int = Field(description="Characters of all message contents.")
    estimated_tokens: int = Field(
        description="characters / 4, rounded up: a rough size for planning, not a tokenizer's count."
    )


class Corpus(BaseModel):
    id: UUID = Field(description="The corpus id; jobs refer to it as corpus_id.")
    name: str = Field(description="The label given at upload (by default the file name).")
    bytes: int = Field(description="Size of the stored, normalized JSONL in bytes.")
    sha256: str = Field(description="SHA-256 (hex) of the stored, normalized JSONL.")
    stats: CorpusStats = Field(description="Counts computed at upload.")
    created_at: datetime = Field(description="When the corpus was uploaded.")

    @classmethod
    def from_row(cls, row: CorpusRow) -> Corpus:
        return cls(
            id=row.id,
            name=row.name,
            bytes=row.size_bytes,
            sha256=row.sha256,
            stats=CorpusStats.model_validate(row.stats),
            created_at=row.created_at,
        )


class CorpusList(Page[Corpus]):
    """One page of the team's corpora, newest first."""
