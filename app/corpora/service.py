from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from app.core import quotas
from app.core.errors import Conflict, NotFound, Unprocessable
from gatt.dialogues import corpus_stats, dump_corpus, parse_corpus
from gatt.errors import ValidationFailed
from service.models import Corpus, Team
from service.pagination import PageParams, PageResult
from service.repositories import corpora as repository
from service.settings import Settings

CONTENT_CHUNK_BYTES = 1024 * 1024


def create(session: Session, team: Team, name: str, lines: Iterable[bytes], settings: Settings) -> Corpus:
    """Validate a whole corpus and store it normalized, or raise a 422 `invalid_corpus` listing every
    problem (`line`, `field`, `code`, `message`). Nothing is written unless all of it is valid and
    fits the team's quotas."""
    try:
        dialogues = parse_corpus(lines, settings.corpus_limits())
    except ValidationFailed as e:
        n = len(e.problems)
        raise Unprocessable.from_problems(
            e.problems,
            code="invalid_corpus",
            message=f"The corpus has {n} problem{'s' if n != 1 else ''}; see details.",
        ) from e
    content = dump_corpus(dialogues)
    quotas.check_corpus(session, team, settings, len(content))
    stats = corpus_stats(dialogues)
    return repository.add(session, team.id, name, content, stats, hashlib.sha256(content).hexdigest())


def get(session: Session, team: Team, id: uuid.UUID) -> Corpus:
    row = repository.get(session, team.id, id)
    if row is None:
        raise NotFound("No such corpus.", param="corpus_id")
    return row


def list_page(session: Session, team: Team, params: PageParams) -> PageResult[Corpus]:
    return repository.page(session, team.id, params)


def iter_content(factory: sessionmaker[Session], corpus: Corpus) -> Iterator[bytes]:
    """The stored JSONL in chunks, each read in its own short session so that a slow download holds
    no connection. Stops early if the corpus is deleted meanwhile (the client sees a short body)."""
    offset = 0
    while offset < corpus.size_bytes:
        with factory() as session:
            chunk = repository.read_content_chunk(session, corpus.id, offset, CONTENT_CHUNK_BYTES)
        if not chunk:
            return
        yield chunk
        offset += len(chunk)


def delete(session: Session, team: Team, id: uuid.UUID) -> None:
    row = repository.get(session, team.id, id, for_update=True)
    if row is None:
        raise NotFound("No such corpus.", param="corpus_id")
    if repository.used_by_active_job(session, row.id):
        raise Conflict(
            "A queued or running job uses this corpus; cancel it or wait for it to finish.",
            code="in_use",
            param="corpus_id",
        )
    repository.mark_deleted(session, row, datetime.now(UTC))
