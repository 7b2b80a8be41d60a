from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy.orm import Session

from app.core import quotas
from app.core.errors import Conflict, NotFound, Unprocessable
from gatt.errors import ValidationFailed
from gatt.instructions import default_instruction_set, instruction_set_to_json, parse_instruction_set
from service.models import InstructionSet, Team
from service.pagination import PageParams, PageResult
from service.repositories import instruction_sets as repository
from service.settings import Settings


def validate_spec(spec: Any, *, field_prefix: str = "spec") -> dict[str, Any]:
    """The normalized JSON of a valid instruction set, or a 422 `invalid_instruction_set` listing every
    problem with its path in the request body (`spec.families[0].verbose[1]`)."""
    try:
        parsed = parse_instruction_set(spec)
    except ValidationFailed as e:
        n = len(e.problems)
        raise Unprocessable.from_problems(
            e.problems,
            code="invalid_instruction_set",
            message=f"The instruction set has {n} problem{'s' if n != 1 else ''}; see details.",
            field_prefix=field_prefix,
        ) from e
    return instruction_set_to_json(parsed)


def create(session: Session, team: Team, name: str, spec: Any, settings: Settings) -> InstructionSet:
    normalized = validate_spec(spec)
    quotas.check_instruction_set(session, team, settings)
    return repository.add(session, team.id, name, normalized)


def get(session: Session, team: Team, id: uuid.UUID) -> InstructionSet:
    row = repository.get(session, team.id, id)
    if row is None:
        raise NotFound("No such instruction set.", param="instruction_set_id")
    return row


def list_page(session: Session, team: Team, params: PageParams) -> PageResult[InstructionSet]:
    return repository.page(session, team.id, params)


def delete(session: Session, team: Team, id: uuid.UUID) -> None:
    row = repository.get(session, team.id, id, for_update=True)
    if row is None:
        raise NotFound("No such instruction set.", param="instruction_set_id")
    if repository.used_by_active_job(session, row.id):
        raise Conflict(
            "A queued or running job uses this instruction set; cancel it or wait for it to finish.",
            code="in_use",
            param="instruction_set_id",
        )
    repository.mark_deleted(session, row, datetime.now(UTC))


@cache
def _default_spec() -> dict[str, Any]:
    return instruction_set_to_json(default_instruction_set())


def default_spec() -> dict[str, Any]:
    """The default set's JSON (a fresh copy: callers may mutate it)."""
    return copy.deepcopy(_default_spec())
