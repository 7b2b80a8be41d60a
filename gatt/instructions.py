"""GAtt instructions: the families of constraints, how instructions are synthesized from them, and
how an instruction set is validated.

Llama 2's Ghost Attention trains on instructions that must hold for a whole dialogue. The paper builds
them from three synthetic families (hobby: "You enjoy tennis.", language: "Always answer in French.",
public figure: "Always act as Napoleon from now on."), randomly combines constraints from several
families into one instruction, and half of the time rewrites the instruction tersely ("Figure:
Napoleon."). This module does exactly that, plus two things the service needs:

* every constraint carries verifier specs (see `gatt.verifiers`) so the sampled replies can be scored
  on whether they obey it, and
* users may add free-form custom instructions ("Start every reply with 'Ahoy!'") with their own
  verifiers.

`parse_instruction_set` is the only door for untrusted input (the API's request body and the bundled
default file): it reports *every* problem at once, with field paths such as `families[1].values[3]`.
The dataclasses themselves trust their arguments.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from gatt.errors import Problem, ValidationFailed
from gatt.verifiers import MAX_PATTERN_CHARS, check_spec

__all__ = [
    "AGGREGATES",
    "CUSTOM_FAMILY",
    "LIMITS",
    "PLACEHOLDER",
    "Constraint",
    "CustomInstruction",
    "Instruction",
    "InstructionFamily",
    "InstructionSet",
    "default_instruction_set",
    "each_instruction",
    "instruction_set_to_json",
    "parse_instruction_set",
    "synthesize",
]

Aggregate = Literal["min", "mean", "product"]
AGGREGATES: tuple[str, ...] = ("min", "mean", "product")
PLACEHOLDER = "{value}"
# The family name given to constraints that come from custom instructions; no real family may use it,
# or results could not be told apart per family.
CUSTOM_FAMILY = "custom"

# Upper bounds on what one request may ask for. A request body is untrusted: without these a client
# could make validation (one verifier check per value) or synthesis arbitrarily expensive.
LIMITS: dict[str, int] = {
    "families": 64,
    "values": 10_000,  # per family
    "values_total": 50_000,  # over all families: each value costs one verifier check (~1-40 us)
    "templates": 64,  # per family and style (verbose / terse)
    "custom": 256,
    "verifiers": 16,  # per custom instruction
    "name_chars": 64,
    "text_chars": 500,  # a value or a template
    "custom_text_chars": 2_000,
    "verifier_json_chars": 2_000,
    "max_constraints": 64,
}


# --------------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructionFamily:
    """One kind of constraint, e.g. "public_figure" with values "Napoleon Bonaparte", ...

    Templates contain `{value}`; the verifier is a spec template whose string params may contain
    `{value}` too (e.g. `{"type": "language", "language": "{value}"}`).
    """

    name: str
    verbose: tuple[str, ...]
    terse: tuple[str, ...]
    values: tuple[str, ...]
    verifier: dict[str, Any]


@dataclass(frozen=True)
class CustomInstruction:
    """A free-form instruction supplied by the user, with the verifier specs that check it."""

    text: str
    verifiers: tuple[dict[str, Any], ...]
    name: str | None = None


@dataclass(frozen=True)
class InstructionSet:
    """Everything `synthesize` draws from.

    `custom_probability` left as None resolves to 0 when there are families (the paper's behaviour)
    and to 1 when there are only custom instructions, so the stored value is always a float.
    """

    families: tuple[InstructionFamily, ...] = ()
    min_constraints: int = 1
    max_constraints: int = 2
    terse_probability: float = 0.5
    custom: tuple[CustomInstruction, ...] = ()
    custom_probability: float | None = None
    aggregate: Aggregate = "min"

    def __post_init__(self) -> None:
        if self.custom_probability is None:
            object.__setattr__(self, "custom_probability", 0.0 if self.families else 1.0)


@dataclass(frozen=True)
class Constraint:
    """One rendered constraint of an instruction. `family` is CUSTOM_FAMILY for custom instructions,
    whose `value` is then the custom instruction's name (possibly None)."""

    family: str
    value: str | None
    text: str
    verifiers: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Instruction:
    """A synthesized instruction: the text given to the model once, and what checks obedience.

    Two renderings of the same constraints, as in the paper: `text` is the training view (the
    instruction kept in the first turn, terse half of the time), `sampling_text` the full wording
    attached to every user turn while sampling. The paper shortens the instruction only "when
    constructing the final system message for the training data": the model samples best under
    the explicit wording, and learns to obey the terse one. They are equal when `terse` is False.

    `aggregate` says how the scores of the individual verifiers combine into one ("min", "mean" or
    "product"); the scorer applies it.
    """

    text: str
    constraints: tuple[Constraint, ...]
    terse: bool
    aggregate: Aggregate = "min"
    verbose_text: str | None = None  # None: the same as `text`

    @property
    def sampling_text(self) -> str:
        return self.verbose_text if self.verbose_text is not None else self.text

    @property
    def verifiers(self) -> tuple[dict[str, Any], ...]:
        return tuple(spec for c in self.constraints for spec in c.verifiers)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "sampling_text": self.sampling_text,
            "terse": self.terse,
            "aggregate": self.aggregate,
            "constraints": [
                {
                    "family": c.family,
                    "value": c.value,
                    "text": c.text,
                    "verifiers": copy.deepcopy(list(c.verifiers)),
                }
                for c in self.constraints
            ],
        }

    @classmethod
    def from_json(cls, obj: object) -> Instruction:
        """Inverse of `to_json`; raises ValidationFailed("instruction", problems) on a bad shape.

        Only the shape is checked: an Instruction is our own output read back (e.g. from the
        database), not user input, so the verifier specs are not re-validated here.
        """
        p = _Problems()
        if not isinstance(obj, dict):
            p.add("invalid_type", "expected an object", "")
            raise ValidationFailed("instruction", p.items)
        _check_keys(
            p, obj, "", required=("text", "terse", "constraints"), optional=("aggregate", "sampling_text")
        )
        text = obj.get("text")
        for key in ("text", "sampling_text"):
            if key in obj and not isinstance(obj[key], str):
                p.add("invalid_type", "expected a string", key)
        terse = obj.get("terse")
        if "terse" in obj and not isinstance(terse, bool):
            p.add("invalid_type", "expected a boolean", "terse")
        aggregate = obj.get("aggregate", "min")
        if aggregate not in AGGREGATES:
            p.add("invalid_choice", f"must be one of {', '.join(AGGREGATES)}", "aggregate")
        constraints: list[Constraint] = []
        raw = obj.get("constraints", [])
        if not isinstance(raw, list):
            p.add("invalid_type", "expected a list", "constraints")
            raw = []
        for i, c in enumerate(raw):
            at = f"constraints[{i}]"
            if not isinstance(c, dict):
                p.add("invalid_type", "expected an object", at)
                continue
            before = len(p.items)
            _check_keys(p, c, at, required=("family", "value", "text", "verifiers"))
            for key in ("family", "text"):
                if key in c and not isinstance(c[key], str):
                    p.add("invalid_type", "expected a string", f"{at}.{key}")
            if c.get("value") is not None and not isinstance(c["value"], str):
                p.add("invalid_type", "expected a string or null", f"{at}.value")
            specs = c.get("verifiers", [])
            if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
                p.add("invalid_type", "expected a list of objects", f"{at}.verifiers")
            if len(p.items) == before:
                constraints.append(
                    Constraint(c["family"], c["value"], c["text"], tuple(copy.deepcopy(specs)))
                )
        if p.items:
            raise ValidationFailed("instruction", p.items)
        assert isinstance(text, str) and isinstance(terse, bool)
        # Records written before the two renderings existed sampled with `text` itself.
        sampling_text = obj.get("sampling_text", text)
        return cls(
            text=text,
            constraints=tuple(constraints),
            terse=terse,
            aggregate=aggregate,
            verbose_text=None if sampling_text == text else sampling_text,
        )


# --------------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------------


def synthesize(instruction_set: InstructionSet, n: int, seed: int) -> list[Instruction]:
    """Draw `n` instructions, reproducibly: the same set, n and seed give the same list anywhere.

    Per instruction (the paper's recipe): with probability `custom_probability` pick one custom
    instruction; otherwise pick k (uniform in [min, max], both capped by the number of families)
    distinct families, a random value of each, decide once whether the whole instruction is terse
    (probability `terse_probability`), render each constraint with a random template of that style
    and join the phrases with a space. A terse instruction also gets a verbose rendering of the same
    constraints (`sampling_text`), which sampling attaches to every user turn.
    """
    s = instruction_set
    if n < 0:
        raise ValueError("n must be >= 0")
    if not s.families and not s.custom:
        raise ValueError("the instruction set has neither families nor custom instructions")
    # A private generator: the global one may be reseeded or consumed by anything else in the
    # process. random.Random(int) and the few methods used here (random, randint, choice, sample on
    # a sequence) give the same stream on every platform.
    rng = random.Random(seed)
    out: list[Instruction] = []
    for _ in range(n):
        # Draw the coin only when both kinds exist, so a set without custom instructions consumes
        # the stream exactly like the paper-only recipe.
        use_custom = bool(s.custom) and (not s.families or rng.random() < (s.custom_probability or 0.0))
        if use_custom:
            out.append(_custom_instruction(rng.choice(s.custom), s.aggregate))
        else:
            out.append(_family_instruction(s, rng))
    return out


def each_instruction(instruction_set: InstructionSet) -> list[Instruction]:
    """Every single-constraint instruction of a set, once: each family value rendered with the
    family's first verbose template, then each custom instruction. What a probe of the set runs
    (workers/probe.py), so that every value is measured on the same dialogues."""
    out = []
    for family in instruction_set.families:
        for value in family.values:
            text = family.verbose[0].replace(PLACEHOLDER, value)
            constraint = Constraint(family.name, value, text, (_substitute(family.verifier, value),))
            out.append(Instruction(text, (constraint,), terse=False, aggregate=instruction_set.aggregate))
    out += [_custom_instruction(c, instruction_set.aggregate) for c in instruction_set.custom]
    return out


def _custom_instruction(custom: CustomInstruction, aggregate: Aggregate) -> Instruction:
    constraint = Constraint(CUSTOM_FAMILY, custom.name, custom.text, tuple(copy.deepcopy(custom.verifiers)))
    return Instruction(text=custom.text, constraints=(constraint,), terse=False, aggregate=aggregate)


def _family_instruction(s: InstructionSet, rng: random.Random) -> Instruction:
    available = len(s.families)
    k = rng.randint(min(s.min_constraints, available), min(s.max_constraints, available))
    terse = rng.random() < s.terse_probability
    constraints = []
    verbose = []
    for family in rng.sample(s.families, k):
        value = rng.choice(family.values)
        # A family without terse templates (allowed only when terse_probability is 0) falls back
        # to its verbose ones rather than failing.
        templates = (family.terse if terse else family.verbose) or family.verbose
        text = rng.choice(templates).replace(PLACEHOLDER, value)
        constraints.append(Constraint(family.name, value, text, (_substitute(family.verifier, value),)))
        # The full wording of the same constraint, for sampling (one more draw, only when terse).
        verbose.append(rng.choice(family.verbose).replace(PLACEHOLDER, value) if terse else text)
    text = " ".join(c.text for c in constraints)
    sampling_text = " ".join(verbose)
    return Instruction(
        text=text,
        constraints=tuple(constraints),
        terse=terse,
        aggregate=s.aggregate,
        verbose_text=None if sampling_text == text else sampling_text,
    )


def _substitute(spec: Any, value: str) -> Any:
    """Copy of a verifier spec template with `{value}` replaced in every string inside it.

    str.replace rather than str.format: a regex or a JSON example in a template may contain other
    braces, which format() would choke on. In the `pattern` of a `regex` verifier the value is
    escaped: it stands for its literal text ("Why not?" must not make "t" optional). Validation fills
    templates through this function too, so what is checked is what synthesis produces.
    """
    if isinstance(spec, str):
        return spec.replace(PLACEHOLDER, value)
    if isinstance(spec, dict):
        regex = spec.get("type") == "regex"
        return {
            k: _substitute(v, re.escape(value) if regex and k == "pattern" else value)
            for k, v in spec.items()
        }
    if isinstance(spec, list):
        return [_substitute(v, value) for v in spec]
    return spec


def _mentions_placeholder(spec: Any) -> bool:
    if isinstance(spec, str):
        return PLACEHOLDER in spec
    if isinstance(spec, dict):
        return any(_mentions_placeholder(v) for v in spec.values())
    if isinstance(spec, list):
        return any(_mentions_placeholder(v) for v in spec)
    return False


# --------------------------------------------------------------------------------------------------
# Validation (JSON -> InstructionSet) and the reverse
# --------------------------------------------------------------------------------------------------

_SET_KEYS = (
    "families",
    "custom",
    "min_constraints",
    "max_constraints",
    "terse_probability",
    "custom_probability",
    "aggregate",
)
_FAMILY_KEYS = ("name", "verbose", "terse", "values", "verifier")
_CUSTOM_KEYS = ("text", "verifiers")


class _Problems:
    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, code: str, message: str, field: str) -> None:
        self.items.append(Problem(code=code, message=message, field=field))


def _join(prefix: str, name: str) -> str:
    if not name:
        return prefix
    if not prefix or name.startswith("["):
        return prefix + name
    return f"{prefix}.{name}"


def _check_keys(
    p: _Problems, obj: Mapping[Any, Any], at: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> None:
    for key in required:
        if key not in obj:
            p.add("missing_field", "this field is required", _join(at, key))
    for key in obj:
        if key not in required and key not in optional:
            p.add("unknown_field", "unknown field", _join(at, str(key)))


def _string(p: _Problems, value: object, at: str, max_chars: int) -> str | None:
    """A non-blank string of bounded length, or None after recording why not."""
    if not isinstance(value, str):
        p.add("invalid_type", "expected a string", at)
        return None
    if not value.strip():
        p.add("empty", "must not be empty", at)
        return None
    if len(value) > max_chars:
        p.add("too_large", f"longer than {max_chars} characters", at)
        return None
    return value


def _list(
    p: _Problems, value: object, at: str, max_items: int, allow_empty: bool = False
) -> list[Any] | None:
    """A list of bounded length (elements unchecked), or None after recording why not.

    An oversized list is not walked at all: validating it would cost what the limit protects against.
    """
    if not isinstance(value, list):
        p.add("invalid_type", "expected a list", at)
        return None
    if not value and not allow_empty:
        p.add("empty", "must not be empty", at)
        return None
    if len(value) > max_items:
        p.add("too_large", f"more than {max_items} items", at)
        return None
    return value


def _strings(
    p: _Problems, value: object, at: str, max_items: int, max_chars: int, allow_empty: bool = False
) -> tuple[str, ...] | None:
    items = _list(p, value, at, max_items, allow_empty)
    if items is None:
        return None
    out = [_string(p, item, f"{at}[{i}]", max_chars) for i, item in enumerate(items)]
    return None if any(s is None for s in out) else tuple(s for s in out if s is not None)


def _templates(p: _Problems, value: object, at: str, allow_empty: bool) -> tuple[str, ...] | None:
    templates = _strings(p, value, at, LIMITS["templates"], LIMITS["text_chars"], allow_empty)
    if templates is None:
        return None
    ok = True
    for i, t in enumerate(templates):
        if PLACEHOLDER not in t:
            p.add("missing_placeholder", f"a template must contain {PLACEHOLDER}", f"{at}[{i}]")
            ok = False
    return templates if ok else None


def _verifier_shape(p: _Problems, spec: object, at: str) -> bool:
    """What check_spec leaves to us: the spec is a plain JSON object of bounded size."""
    if not isinstance(spec, dict):
        p.add("invalid_type", "expected a verifier object", at)
        return False
    try:
        size = len(json.dumps(spec))
    except (TypeError, ValueError):
        p.add("invalid_type", "a verifier must be plain JSON", at)
        return False
    if size > LIMITS["verifier_json_chars"]:
        p.add("too_large", f"verifier larger than {LIMITS['verifier_json_chars']} characters of JSON", at)
        return False
    return True


def _verifier(p: _Problems, spec: object, at: str) -> dict[str, Any] | None:
    if not _verifier_shape(p, spec, at):
        return None
    problems = check_spec(spec)
    for prob in problems:
        p.add(prob.code, prob.message, _join(at, prob.field))
    return copy.deepcopy(spec) if not problems else None  # type: ignore[return-value]


def _family_verifier(
    p: _Problems, spec: object, values: tuple[str, ...] | None, at: str, fam_at: str
) -> dict | None:
    """Validate a family's verifier template against every value it will be filled with.

    A problem in a param that does not mention {value} is the template's own fault: reported once,
    at `families[i].verifier.<param>`. A problem in a param that does mention {value} depends on the
    value ("Klingon" is not a supported language): reported at `families[i].values[j]`, so the
    user knows which value to fix.
    """
    if not _verifier_shape(p, spec, at):
        return None
    assert isinstance(spec, dict)
    templated = {k for k, v in spec.items() if _mentions_placeholder(v)}
    own: dict[tuple[str, str], Problem] = {}
    by_value: list[tuple[int, Problem]] = []
    # Without valid values, still check the template itself (its value-dependent params are skipped).
    fills: list[tuple[int, str]] = list(enumerate(values)) if values else [(-1, "")]
    if values and _value_is_a_plain_literal(spec, templated):
        fills = _fills_that_can_differ(spec, values)
    for j, value in fills:
        for prob in check_spec(_substitute(spec, value)):
            if prob.field in templated:
                if j >= 0:
                    by_value.append((j, prob))
            else:
                own.setdefault((prob.code, prob.field), prob)
    for prob in own.values():
        p.add(prob.code, prob.message, _join(at, prob.field))
    for j, prob in by_value:
        p.add(prob.code, f"verifier param {prob.field!r}: {prob.message}", f"{fam_at}.values[{j}]")
    return copy.deepcopy(spec) if not own and not by_value else None


def _value_is_a_plain_literal(spec: dict, templated: set[str]) -> bool:
    """A `regex` verifier whose value goes, escaped, only into its pattern, outside any `[...]` or
    `{...}`: every value then makes the same pattern but for one literal, and compiles alike."""
    pattern = spec.get("pattern")
    return (
        spec.get("type") == "regex"
        and templated == {"pattern"}
        and isinstance(pattern, str)
        and not any(c in pattern.replace(PLACEHOLDER, "") for c in "[]{}")
    )


def _fills_that_can_differ(spec: dict, values: tuple[str, ...]) -> list[tuple[int, str]]:
    """The values worth checking one by one for such a verifier: the longest, and any whose pattern
    is too long. Compiling each of 50,000 values took 3 s of one process's GIL, stalling every
    other request it served; this compiles once."""
    pattern = spec["pattern"]
    longest = max(range(len(values)), key=lambda j: len(values[j]))
    fills = [(longest, values[longest])]
    for j, value in enumerate(values):
        if j != longest and len(pattern.replace(PLACEHOLDER, re.escape(value))) > MAX_PATTERN_CHARS:
            fills.append((j, value))
    return sorted(fills)


def _family(p: _Problems, obj: object, at: str, terse_optional: bool) -> InstructionFamily | None:
    if not isinstance(obj, dict):
        p.add("invalid_type", "expected an object", at)
        return None
    before = len(p.items)
    _check_keys(p, obj, at, required=_FAMILY_KEYS)
    name = _string(p, obj["name"], f"{at}.name", LIMITS["name_chars"]) if "name" in obj else None
    if name is not None and name.strip().lower() == CUSTOM_FAMILY:
        p.add("reserved_name", f"{CUSTOM_FAMILY!r} is reserved for custom instructions", f"{at}.name")
    verbose = _templates(p, obj["verbose"], f"{at}.verbose", False) if "verbose" in obj else None
    terse = _templates(p, obj["terse"], f"{at}.terse", terse_optional) if "terse" in obj else None
    values = None
    if "values" in obj:
        values = _strings(p, obj["values"], f"{at}.values", LIMITS["values"], LIMITS["text_chars"])
        if values is not None:
            seen: dict[str, int] = {}
            for j, v in enumerate(values):
                key = v.strip().casefold()
                if key in seen:
                    p.add("duplicate", f"same value as values[{seen[key]}]", f"{at}.values[{j}]")
                else:
                    seen[key] = j
    verifier = (
        _family_verifier(p, obj["verifier"], values, f"{at}.verifier", at) if "verifier" in obj else None
    )
    if len(p.items) != before:
        return None
    assert name is not None and verbose is not None and terse is not None and values is not None
    assert verifier is not None
    return InstructionFamily(name=name, verbose=verbose, terse=terse, values=values, verifier=verifier)


def _custom(p: _Problems, obj: object, at: str) -> CustomInstruction | None:
    if not isinstance(obj, dict):
        p.add("invalid_type", "expected an object", at)
        return None
    before = len(p.items)
    _check_keys(p, obj, at, required=_CUSTOM_KEYS, optional=("name",))
    text = _string(p, obj["text"], f"{at}.text", LIMITS["custom_text_chars"]) if "text" in obj else None
    name = None
    if obj.get("name") is not None:
        name = _string(p, obj["name"], f"{at}.name", LIMITS["name_chars"])
    specs: list[dict[str, Any] | None] = []
    if "verifiers" in obj:
        # A custom instruction without a verifier could never be scored, so at least one is required.
        raw = _list(p, obj["verifiers"], f"{at}.verifiers", LIMITS["verifiers"])
        for i, spec in enumerate(raw or []):
            specs.append(_verifier(p, spec, f"{at}.verifiers[{i}]"))
    if len(p.items) != before:
        return None
    assert text is not None
    return CustomInstruction(text=text, verifiers=tuple(s for s in specs if s is not None), name=name)


def _number(
    p: _Problems, obj: Mapping[str, Any], key: str, default: Any, kind: Callable[[Any], bool], what: str
) -> Any:
    value = obj.get(key, default)
    # bool is an int in Python but never what a JSON client meant by a number.
    if isinstance(value, bool) or not kind(value):
        p.add("invalid_type", f"expected {what}", key)
        return None
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int)


def _is_probability_type(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _values_to_check(raw_families: list[Any]) -> int:
    """How many values validation would check (lists over the per-family limit are not walked)."""
    lengths = (
        len(f["values"]) for f in raw_families if isinstance(f, dict) and isinstance(f.get("values"), list)
    )
    return sum(n for n in lengths if n <= LIMITS["values"])


def parse_instruction_set(obj: object) -> InstructionSet:
    """Validate a JSON object and build the InstructionSet it describes.

    Raises ValidationFailed("instruction set", problems) listing every problem found; see the module
    docstring and `LIMITS`. Codes: missing_field, unknown_field, invalid_type, empty, too_large,
    missing_placeholder, duplicate, reserved_name, invalid_range, invalid_choice, plus the verifier
    codes of `gatt.verifiers.check_spec` (field prefixed with the verifier's path).
    """
    p = _Problems()
    if not isinstance(obj, dict):
        p.add("invalid_type", "expected an object", "")
        raise ValidationFailed("instruction set", p.items)
    _check_keys(p, obj, "", required=(), optional=_SET_KEYS)

    min_c = _number(p, obj, "min_constraints", 1, _is_int, "an integer")
    max_c = _number(p, obj, "max_constraints", 2, _is_int, "an integer")
    if min_c is not None and min_c < 1:
        p.add("invalid_range", "must be at least 1", "min_constraints")
    if max_c is not None and max_c > LIMITS["max_constraints"]:
        p.add("invalid_range", f"must be at most {LIMITS['max_constraints']}", "max_constraints")
    if min_c is not None and max_c is not None and min_c > max_c:
        p.add("invalid_range", f"must not be less than min_constraints ({min_c})", "max_constraints")

    probabilities: dict[str, float | None] = {}
    for key, default in (("terse_probability", 0.5), ("custom_probability", None)):
        if obj.get(key) is None and default is None:
            probabilities[key] = None
            continue
        value = _number(p, obj, key, default, _is_probability_type, "a number")
        if value is not None and not 0.0 <= value <= 1.0:
            p.add("invalid_range", "must be between 0 and 1", key)
            value = None
        probabilities[key] = None if value is None else float(value)

    aggregate = obj.get("aggregate", "min")
    if aggregate not in AGGREGATES:
        p.add("invalid_choice", f"must be one of {', '.join(AGGREGATES)}", "aggregate")

    families: list[InstructionFamily] = []
    raw_families = _list(p, obj.get("families", []), "families", LIMITS["families"], allow_empty=True)
    if raw_families is not None and _values_to_check(raw_families) > LIMITS["values_total"]:
        p.add("too_large", f"more than {LIMITS['values_total']} values in all families together", "families")
        raw_families = None  # not walked, like any oversized list
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_families or []):
        # Terse templates may be omitted ([]) only when terse phrasing is never drawn.
        family = _family(p, raw, f"families[{i}]", terse_optional=probabilities["terse_probability"] == 0.0)
        if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"].strip():
            key = raw["name"].strip().casefold()
            if key in names:
                p.add("duplicate", f"same name as families[{names[key]}]", f"families[{i}].name")
            else:
                names[key] = i
        if family is not None:
            families.append(family)

    customs: list[CustomInstruction] = []
    raw_custom = _list(p, obj.get("custom", []), "custom", LIMITS["custom"], allow_empty=True)
    custom_names: dict[str, int] = {}
    for i, raw in enumerate(raw_custom or []):
        custom = _custom(p, raw, f"custom[{i}]")
        if isinstance(raw, dict) and isinstance(raw.get("name"), str) and raw["name"].strip():
            key = raw["name"].strip().casefold()
            if key in custom_names:
                p.add("duplicate", f"same name as custom[{custom_names[key]}]", f"custom[{i}].name")
            else:
                custom_names[key] = i
        if custom is not None:
            customs.append(custom)

    has_families = bool(raw_families)
    has_custom = bool(raw_custom)
    if raw_families is not None and raw_custom is not None and not has_families and not has_custom:
        p.add("empty", "give at least one family or one custom instruction", "families")
    custom_p = probabilities["custom_probability"]
    if custom_p is not None:
        # Probabilities that could not be honoured are errors rather than silently ignored.
        if custom_p > 0 and raw_custom is not None and not has_custom:
            p.add("invalid_range", "must be 0 when there are no custom instructions", "custom_probability")
        if custom_p < 1 and raw_families is not None and not has_families and has_custom:
            p.add("invalid_range", "must be 1 when there are no families", "custom_probability")

    if p.items:
        raise ValidationFailed("instruction set", p.items)
    return InstructionSet(
        families=tuple(families),
        min_constraints=min_c,
        max_constraints=max_c,
        terse_probability=probabilities["terse_probability"],  # type: ignore[arg-type]
        custom=tuple(customs),
        custom_probability=custom_p,
        aggregate=aggregate,
    )


def instruction_set_to_json(s: InstructionSet) -> dict[str, Any]:
    """The JSON form of an instruction set; `parse_instruction_set` of it gives back an equal set."""
    return {
        "families": [
            {
                "name": f.name,
                "verbose": list(f.verbose),
                "terse": list(f.terse),
                "values": list(f.values),
                "verifier": copy.deepcopy(f.verifier),
            }
            for f in s.families
        ],
        "custom": [
            {"text": c.text, "verifiers": copy.deepcopy(list(c.verifiers)), "name": c.name} for c in s.custom
        ],
        "min_constraints": s.min_constraints,
        "max_constraints": s.max_constraints,
        "terse_probability": s.terse_probability,
        "custom_probability": s.custom_probability,
        "aggregate": s.aggregate,
    }


def default_instruction_set() -> InstructionSet:
    """The paper's three families (hobby, language, public figure) plus a few custom instructions
    that stay unused by default (custom_probability 0). Validated like any request."""
    text = resources.files("gatt").joinpath("data/default_instruction_set.json").read_text(encoding="utf-8")
    return parse_instruction_set(json.loads(text))
