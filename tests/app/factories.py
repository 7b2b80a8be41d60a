"""Test data made through the same services the app uses: a fresh team (and key) per test keeps tests
independent without truncating tables."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.auth import service as auth_service
from service.db import session_scope
from service.models import Corpus, InstructionSet, Job, JobStatus, Team


@dataclass(frozen=True)
class Tenant:
    team: Team
    key: str
    prefix: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_tenant(factory: sessionmaker[Session], name: str | None = None) -> Tenant:
    with session_scope(factory) as session:
        team = auth_service.create_team(session, name or f"team-{uuid.uuid4().hex[:12]}")
        api_key, key = auth_service.create_key(session, team.name, "test")
        return Tenant(team=team, key=key, prefix=api_key.prefix)


def dialogue(i: int = 0, *, turns: int = 1, system: str | None = "Be brief.") -> dict[str, Any]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for t in range(turns):
        messages += [
            {"role": "user", "content": f"question {i}.{t}"},
            {"role": "assistant", "content": f"answer {i}.{t}"},
        ]
    return {"id": f"d{i}", "messages": messages}


def jsonl(*objs: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def make_job(
    factory: sessionmaker[Session],
    team_id: uuid.UUID,
    corpus_id: uuid.UUID,
    *,
    instruction_set_id: uuid.UUID | None = None,
    status: JobStatus = JobStatus.QUEUED,
) -> uuid.UUID:
    with session_scope(factory) as session:
        job = Job(
            team_id=team_id,
            corpus_id=corpus_id,
            instruction_set_id=instruction_set_id,
            status=status,
            config={},
            model="default",
        )
        session.add(job)
        session.flush()
        return job.id


def set_job_status(factory: sessionmaker[Session], job_id: uuid.UUID, status: JobStatus) -> None:
    with session_scope(factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.status = status


def count_rows(
    factory: sessionmaker[Session], model: type[Corpus] | type[InstructionSet], team_id: uuid.UUID
) -> int:
    from sqlalchemy import func, select

    with factory() as session:
        return int(
            session.scalar(select(func.count()).select_from(model).where(model.team_id == team_id)) or 0
        )
