from __future__ import annotations

import re
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Path, status
from fastapi.responses import StreamingResponse

from app.auth.dependencies import CurrentTeam
from app.core.db import SessionDep, SessionFactoryDep, SettingsDep
from app.core.errors import AUTH_RESPONSES, ERROR_RESPONSES, error_response
from app.core.pagination import PageParamsDep
from app.corpora import service
from app.corpora.schemas import Corpus, CorpusList
from app.corpora.upload import OPENAPI_REQUEST_BODY, CorpusUpload, read_corpus_upload

router = APIRouter(prefix="/corpora", tags=["corpora"])

CorpusId = Annotated[UUID, Path(description="The corpus id.")]
JSONL = "application/jsonl"


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=Corpus,
    summary="Upload a corpus",
    openapi_extra={"requestBody": OPENAPI_REQUEST_BODY},
    responses={
        **AUTH_RESPONSES,
        **error_response(400, "A malformed multipart body (`invalid_request`)."),
        **error_response(
            413, "The file is larger than the corpus limit (`payload_too_large`); nothing stored."
        ),
        **error_response(415, "Not multipart/form-data (`unsupported_media_type`)."),
        **error_response(
            422,
            "`invalid_corpus`: every problem in `details`, each with its `line`, `field` (e.g. "
            "`messages[2].role`), `code` and `message`; nothing stored. `invalid_request`: no `file`, or "
            "a bad `name`. `quota_exceeded`: the team's corpora would pass their count or byte limit "
            "(`details`: `quota` `corpora` or `corpus_bytes`, `limit`, `used`).",
        ),
    },
)
def create_corpus(
    session: SessionDep,
    team: CurrentTeam,
    settings: SettingsDep,
    # After `team`: the body is only read once the key checked out.
    upload: Annotated[CorpusUpload, Depends(read_corpus_upload)],
) -> Corpus:
    """Upload a JSONL corpus of dialogues as multipart/form-data (`file`, optional `name`). The whole
    file is validated before anything is stored; a rejected upload lists every problem with its line
    number. The stored corpus is normalized JSONL (one compact line per dialogue)."""
    row = service.create(session, team, upload.name, upload.file, settings)
    return Corpus.from_row(row)


@router.get("", response_model=CorpusList, summary="List corpora", responses=AUTH_RESPONSES)
def list_corpora(session: SessionDep, team: CurrentTeam, page: PageParamsDep) -> CorpusList:
    """The team's corpora, newest first, a page at a time (`after`, `limit`). Contents not included."""
    return CorpusList.of(service.list_page(session, team, page), Corpus.from_row)


@router.get("/{corpus_id}", response_model=Corpus, summary="Get a corpus", responses=ERROR_RESPONSES)
def get_corpus(session: SessionDep, team: CurrentTeam, corpus_id: CorpusId) -> Corpus:
    """A corpus's name, size, hash and stats (not its content; see `/content`)."""
    return Corpus.from_row(service.get(session, team, corpus_id))


@router.get(
    "/{corpus_id}/content",
    response_class=StreamingResponse,
    summary="Download a corpus",
    responses={
        200: {"content": {JSONL: {"schema": {"type": "string"}}}, "description": "The stored JSONL."},
        **ERROR_RESPONSES,
    },
)
def get_corpus_content(
    session: SessionDep, team: CurrentTeam, factory: SessionFactoryDep, corpus_id: CorpusId
) -> StreamingResponse:
    """The stored (normalized) JSONL, streamed."""
    corpus = service.get(session, team, corpus_id)
    filename = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus.name).strip("._") or "corpus"
    if not filename.endswith(".jsonl"):
        filename += ".jsonl"
    return StreamingResponse(
        service.iter_content(factory, corpus),
        media_type=JSONL,
        headers={
            "Content-Length": str(corpus.size_bytes),
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )


@router.delete(
    "/{corpus_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a corpus",
    responses={
        **ERROR_RESPONSES,
        **error_response(409, "A queued or running job uses the corpus (`in_use`)."),
    },
)
def delete_corpus(session: SessionDep, team: CurrentTeam, corpus_id: CorpusId) -> None:
    """Delete a corpus and its content. Refused while a queued or running job uses it; finished jobs
    keep its id, name and stats."""
    service.delete(session, team, corpus_id)
