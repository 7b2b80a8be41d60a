from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from app.core.openapi import REF
from app.core.pagination import Page
from app.core.safe_json import JSONObject, check_text

Name = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), AfterValidator(check_text)
]

# A spec is checked by gatt's own validator (422 `invalid_instruction_set`, every problem with its
# path); OpenAPI shows its format (app/instruction_sets/spec_schema.py).
SPEC_SCHEMA = WithJsonSchema({"allOf": [{"$ref": REF.format(model="InstructionSetSpec")}]})


class InstructionSetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="A label for the set (1 to 100 characters).")
    spec: Annotated[JSONObject, SPEC_SCHEMA] = Field(
        description="The instruction set, in the format `GET /v1/instruction-sets/default` returns. "
        "Unknown fields are errors."
    )


class InstructionSet(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID = Field(description="The instruction set's id.")
    name: str = Field(description="The label given at creation.")
    spec: Annotated[dict[str, Any], SPEC_SCHEMA] = Field(
        description="The validated set, normalized: every optional field present with its value."
    )
    created_at: datetime = Field(description="When the set was created.")


class DefaultInstructionSet(BaseModel):
    id: Literal["default"] = Field(default="default", description='Always "default".')
    name: str = Field(default="default", description='Always "default".')
    spec: Annotated[dict[str, Any], SPEC_SCHEMA] = Field(
        description="The paper-style default set: hobby, language and public-figure families. A job "
        "without an instruction_set_id uses it."
    )


class InstructionSetList(Page[InstructionSet]):
    """One page of the team's instruction sets, newest first."""
