"""The JSON schema of an instruction-set spec, as OpenAPI shows it.

`gatt.instructions.parse_instruction_set` is the one validator of a spec (every problem at once,
with stable codes such as `missing_placeholder` and `duplicate`, which a schema cannot express);
these models describe the same format for clients, and tests/app/test_instruction_sets.py checks
them against that validator: the same field names, required fields and limits, and the default set
and every normalized spec valid here too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gatt.instructions import LIMITS

Template = Annotated[str, Field(min_length=1, max_length=LIMITS["text_chars"])]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class FamilySpec(_Spec):
    """A family of constraints: values, phrased by templates, checked by one verifier."""

    name: str = Field(min_length=1, max_length=LIMITS["name_chars"])
    """Unique in the set (case-insensitive); not "custom"."""
    verbose: list[Template] = Field(min_length=1, max_length=LIMITS["templates"])
    """Full wordings, each with `{value}`: what sampling attaches to every user turn."""
    terse: list[Template] = Field(max_length=LIMITS["templates"])
    """Short wordings with `{value}` ("Figure: {value}."), drawn with terse_probability for the
    training view; may be empty only when terse_probability is 0."""
    values: list[Template] = Field(min_length=1, max_length=LIMITS["values"])
    """The values drawn (at most 50,000 over all families)."""
    verifier: dict[str, Any]
    """How a reply is checked (`gatt/verifiers.py`: regex, opening, language, topic, ...), with
    `{value}` where the drawn value goes."""


class CustomSpec(_Spec):
    """A free-form instruction with its own verifiers."""

    text: str = Field(min_length=1, max_length=LIMITS["custom_text_chars"])
    """The instruction as given to the model."""
    verifiers: list[dict[str, Any]] = Field(min_length=1, max_length=LIMITS["verifiers"])
    """How a reply is checked; all must pass (combined with the set's `aggregate`)."""
    name: str | None = Field(None, min_length=1, max_length=LIMITS["name_chars"])
    """A label, unique among the custom instructions."""


class InstructionSetSpec(_Spec):
    """An instruction set: families whose constraints combine into instructions, and custom ones."""

    families: list[FamilySpec] = Field([], max_length=LIMITS["families"])
    """The families; at least one family or one custom instruction."""
    custom: list[CustomSpec] = Field([], max_length=LIMITS["custom"])
    """Custom instructions."""
    min_constraints: int = Field(1, ge=1)
    """Fewest constraints combined into one instruction."""
    max_constraints: int = Field(2, ge=1, le=LIMITS["max_constraints"])
    """Most constraints combined into one instruction (at least min_constraints)."""
    terse_probability: float = Field(0.5, ge=0.0, le=1.0)
    """How often the training view uses a terse wording."""
    custom_probability: float | None = Field(None, ge=0.0, le=1.0)
    """How often an instruction is a custom one; null: 0 when there are families, else 1."""
    aggregate: Literal["min", "mean", "product"] = "min"
    """How the verifier scores of an instruction's constraints combine."""
