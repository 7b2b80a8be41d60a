from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from app.core.pagination import Page
from app.core.safe_json import JSONObject, check_text

Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), AfterValidator(check_text)
]

_SPEC_DESCRIPTION = (
    "The instruction set, in the format `GET /v1/instruction-sets/default` returns: `families` of "
    "constraints (name, `verbose` and `terse` templates with `{value}`, `values`, a `verifier` spec), "
    "optional free-form `custom` instructions with their `verifiers`, and `min_constraints`, "
    "`max_constraints`, `terse_probability`, `custom_probability`, `aggregate` (min|mean|product). "
    "Unknown fields are errors."
)


class InstructionSetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="A label for the set (1 to 100 characters).")
    spec: JSONObject = Field(description=_SPEC_DESCRIPTION)


class InstructionSet(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID = Field(description="The instruction set's id.")
    name: str = Field(description="The label given at creation.")
    spec: dict[str, Any] = Field(
        description="The validated set, normalized: every optional field present with its value."
    )
    created_at: datetime = Field(description="When the set was created.")


class DefaultInstructionSet(BaseModel):
    id: Literal["default"] = Field(default="default", description='Always "default".')
    name: str = Field(default="default", description='Always "default".')
    spec: dict[str, Any] = Field(
        description="The paper-style default set: hobby, language and public-figure families. A job "
        "without an instruction_set_id uses it."
    )


class InstructionSetList(Page[InstructionSet]):
    """One page of the team's instruction sets, newest first."""
