from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Path, status

from app.auth.dependencies import CurrentTeam, current_team
from app.core.db import SessionDep, SettingsDep
from app.core.errors import AUTH_RESPONSES, ERROR_RESPONSES, error_response
from app.core.pagination import PageParamsDep
from app.instruction_sets import service
from app.instruction_sets.schemas import (
    DefaultInstructionSet,
    InstructionSet,
    InstructionSetCreate,
    InstructionSetList,
)

router = APIRouter(prefix="/instruction-sets", tags=["instruction sets"])

InstructionSetId = Annotated[UUID, Path(description="The instruction set's id.")]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=InstructionSet,
    summary="Create an instruction set",
    responses={
        **AUTH_RESPONSES,
        **error_response(
            422,
            "`invalid_instruction_set`: every problem of the spec in `details`, each with its `field` path "
            "(e.g. `spec.families[0].verbose[1]`); `invalid_request`: a malformed body; `quota_exceeded`: "
            "the team stores as many sets as it may (`details`: `quota`, `limit`, `used`); nothing stored.",
        ),
        **error_response(413, "The body is larger than the JSON body limit (`payload_too_large`)."),
    },
)
def create_instruction_set(
    body: InstructionSetCreate, session: SessionDep, team: CurrentTeam, settings: SettingsDep
) -> InstructionSet:
    """Validate an instruction set and store it for the team. Validation reports every problem at
    once; the stored spec is normalized (defaults filled in)."""
    row = service.create(session, team, body.name, body.spec, settings)
    return InstructionSet.model_validate(row)


@router.get("", response_model=InstructionSetList, summary="List instruction sets", responses=AUTH_RESPONSES)
def list_instruction_sets(session: SessionDep, team: CurrentTeam, page: PageParamsDep) -> InstructionSetList:
    """The team's instruction sets, newest first, a page at a time (`after`, `limit`)."""
    return InstructionSetList.of(service.list_page(session, team, page), InstructionSet.model_validate)


# Declared before "/{instruction_set_id}" so that "default" is never taken for an id.
@router.get(
    "/default",
    response_model=DefaultInstructionSet,
    summary="Get the default instruction set",
    responses={401: AUTH_RESPONSES[401], 429: AUTH_RESPONSES[429]},
    dependencies=[Depends(current_team)],
)
def get_default_instruction_set() -> DefaultInstructionSet:
    """The built-in, paper-style set (hobby, language, public figure) that jobs use when they name no
    instruction set. Readable by every team; a starting point to copy and edit."""
    return DefaultInstructionSet(spec=service.default_spec())


@router.get(
    "/{instruction_set_id}",
    response_model=InstructionSet,
    summary="Get an instruction set",
    responses=ERROR_RESPONSES,
)
def get_instruction_set(
    session: SessionDep, team: CurrentTeam, instruction_set_id: InstructionSetId
) -> InstructionSet:
    """One of the team's instruction sets."""
    return InstructionSet.model_validate(service.get(session, team, instruction_set_id))


@router.delete(
    "/{instruction_set_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete an instruction set",
    responses={
        **ERROR_RESPONSES,
        **error_response(409, "A queued or running job uses the set (`in_use`)."),
    },
)
def delete_instruction_set(
    session: SessionDep, team: CurrentTeam, instruction_set_id: InstructionSetId
) -> None:
    """Delete one of the team's instruction sets. Refused while a queued or running job uses it;
    finished jobs keep their record of it."""
    service.delete(session, team, instruction_set_id)
