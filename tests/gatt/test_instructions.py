"""Tests for gatt.instructions: synthesis as in the paper, validation of instruction sets, round trips."""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatt.errors import ValidationFailed
from gatt.instructions import (
    CUSTOM_FAMILY,
    LIMITS,
    CustomInstruction,
    Instruction,
    InstructionFamily,
    InstructionSet,
    default_instruction_set,
    instruction_set_to_json,
    parse_instruction_set,
    synthesize,
)
from gatt.verifiers import check_spec, score

# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


def _base() -> dict:
    """A small valid instruction set as the API would receive it."""
    return {
        "families": [
            {
                "name": "hobby",
                "verbose": ["You enjoy {value}."],
                "terse": ["Hobby: {value}."],
                "values": ["tennis", "chess", "gardening"],
                "verifier": {"type": "topic", "topic": "{value}", "kind": "hobby"},
            },
            {
                "name": "language",
                "verbose": ["Always answer in {value}."],
                "terse": ["Language: {value}."],
                "values": ["French", "Spanish"],
                "verifier": {"type": "language", "language": "{value}"},
            },
            {
                "name": "public_figure",
                "verbose": ["Always act as {value} from now on."],
                "terse": ["Figure: {value}."],
                "values": ["Napoleon", "Albert Einstein"],
                "verifier": {"type": "topic", "topic": "{value}", "kind": "public_figure"},
            },
        ],
        "custom": [
            {
                "name": "ahoy",
                "text": "Start every reply with 'Ahoy!'",
                "verifiers": [{"type": "starts_with", "text": "Ahoy!", "case_sensitive": True}],
            }
        ],
        "min_constraints": 1,
        "max_constraints": 2,
        "terse_probability": 0.5,
        "custom_probability": 0.0,
        "aggregate": "min",
    }


def _problems(obj: object) -> list[tuple[str, str]]:
    with pytest.raises(ValidationFailed) as info:
        parse_instruction_set(obj)
    assert info.value.what == "instruction set"
    return [(p.field, p.code) for p in info.value.problems]


def _within_binomial(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# --------------------------------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_list_other_seed_other_list():
    s = parse_instruction_set(_base())
    a = synthesize(s, 200, seed=7)
    assert a == synthesize(s, 200, seed=7)
    assert a != synthesize(s, 200, seed=8)
    # A prefix of a longer draw is the shorter draw: n does not change the stream.
    assert synthesize(s, 50, seed=7) == a[:50]


def test_synthesis_ignores_the_global_rng():
    import random

    s = parse_instruction_set(_base())
    random.seed(1)
    a = synthesize(s, 20, seed=3)
    random.seed(2)
    assert synthesize(s, 20, seed=3) == a


@pytest.mark.parametrize(("lo", "hi"), [(1, 1), (1, 2), (2, 3), (3, 3)])
def test_constraints_come_from_distinct_families_and_count_is_within_bounds(lo, hi):
    obj = _base() | {"min_constraints": lo, "max_constraints": hi}
    out = synthesize(parse_instruction_set(obj), 300, seed=1)
    counts = Counter(len(i.constraints) for i in out)
    assert set(counts) == set(range(lo, hi + 1))  # every k in range occurs, nothing else
    for ins in out:
        families = [c.family for c in ins.constraints]
        assert len(set(families)) == len(families)
        assert ins.text == " ".join(c.text for c in ins.constraints)


def test_constraint_count_is_capped_by_the_number_of_families():
    obj = _base() | {"min_constraints": 4, "max_constraints": 6}
    out = synthesize(parse_instruction_set(obj), 50, seed=2)
    assert {len(i.constraints) for i in out} == {3}


@pytest.mark.parametrize("p", [0.5, 0.2, 0.0, 1.0])
def test_terse_share_matches_terse_probability(p):
    s = parse_instruction_set(_base() | {"terse_probability": p})
    out = synthesize(s, 2000, seed=11)
    hits = sum(i.terse for i in out)
    if p in (0.0, 1.0):
        assert hits == 2000 * p
    else:
        assert _within_binomial(hits, 2000, p)


def test_terse_rewrite_as_in_the_paper():
    s = parse_instruction_set(_base() | {"max_constraints": 1})
    out = synthesize(s, 400, seed=5)
    texts = {i.text for i in out}
    assert "Always act as Napoleon from now on." in texts
    assert "Figure: Napoleon." in texts
    for ins in out:
        (c,) = ins.constraints
        family = next(f for f in s.families if f.name == c.family)
        templates = family.terse if ins.terse else family.verbose
        assert c.text in {t.replace("{value}", c.value) for t in templates}


def test_every_template_and_value_is_used():
    s = parse_instruction_set(_base())
    out = synthesize(s, 500, seed=3)
    used = {(c.family, c.value) for i in out for c in i.constraints}
    assert used == {(f.name, v) for f in s.families for v in f.values}


def test_verifier_specs_are_substituted_and_valid():
    s = default_instruction_set()
    for ins in synthesize(s, 300, seed=4):
        assert ins.aggregate == "min"
        assert ins.verifiers == tuple(spec for c in ins.constraints for spec in c.verifiers)
        for c in ins.constraints:
            (spec,) = c.verifiers
            assert "{value}" not in json.dumps(spec)
            assert check_spec(spec) == []
            assert c.value in spec.values()


def test_substitution_does_not_touch_the_family_template():
    s = parse_instruction_set(_base())
    before = copy.deepcopy(s.families[0].verifier)
    ins = synthesize(s, 20, seed=1)
    for i in ins:
        for c in i.constraints:
            c.verifiers[0]["mutated"] = True  # callers mutating their copies must not leak back
    assert s.families[0].verifier == before


def test_custom_instructions_drawn_with_custom_probability():
    s = parse_instruction_set(_base() | {"custom_probability": 0.3})
    out = synthesize(s, 2000, seed=9)
    custom = [i for i in out if i.constraints[0].family == CUSTOM_FAMILY]
    assert _within_binomial(len(custom), 2000, 0.3)
    for i in custom:
        assert i.text == "Start every reply with 'Ahoy!'"
        assert not i.terse
        assert i.constraints[0].value == "ahoy"
        assert i.verifiers == ({"type": "starts_with", "text": "Ahoy!", "case_sensitive": True},)


def test_only_custom_instructions_defaults_to_custom_probability_one():
    obj = _base()
    del obj["families"], obj["custom_probability"]
    s = parse_instruction_set(obj)
    assert s.custom_probability == 1.0
    assert all(i.constraints[0].family == CUSTOM_FAMILY for i in synthesize(s, 20, seed=0))


def test_default_custom_probability_is_zero_with_families():
    obj = _base()
    del obj["custom_probability"]
    s = parse_instruction_set(obj)
    assert s.custom_probability == 0.0
    assert not any(c.family == CUSTOM_FAMILY for i in synthesize(s, 200, seed=0) for c in i.constraints)


def test_aggregate_is_carried_to_instructions():
    s = parse_instruction_set(_base() | {"aggregate": "product", "custom_probability": 0.5})
    assert {i.aggregate for i in synthesize(s, 50, seed=0)} == {"product"}


def test_synthesize_rejects_bad_arguments():
    with pytest.raises(ValueError):
        synthesize(parse_instruction_set(_base()), -1, seed=0)
    with pytest.raises(ValueError):
        synthesize(InstructionSet(), 1, seed=0)
    assert synthesize(parse_instruction_set(_base()), 0, seed=0) == []


def test_instruction_json_round_trip():
    s = parse_instruction_set(_base() | {"custom_probability": 0.5})
    for ins in synthesize(s, 50, seed=1):
        data = json.loads(json.dumps(ins.to_json()))
        assert Instruction.from_json(data) == ins


def test_instruction_from_json_reports_every_problem():
    bad = {
        "text": 3,
        "terse": "no",
        "aggregate": "max",
        "constraints": [{"family": "x", "value": 1, "text": "t"}, 5],
        "extra": 1,
    }
    with pytest.raises(ValidationFailed) as info:
        Instruction.from_json(bad)
    got = {(p.field, p.code) for p in info.value.problems}
    assert got == {
        ("text", "invalid_type"),
        ("terse", "invalid_type"),
        ("aggregate", "invalid_choice"),
        ("extra", "unknown_field"),
        ("constraints[0].verifiers", "missing_field"),
        ("constraints[0].value", "invalid_type"),
        ("constraints[1]", "invalid_type"),
    }


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _set(path: str, value: object):
    """A mutation of _base(): set (or, with value=DELETE, delete) the item at a dotted/indexed path."""

    def apply(obj: dict) -> None:
        parts = path.replace("[", ".").replace("]", "").split(".")
        target = obj
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value

    return apply


def _all(*mutations):
    def apply(obj: dict) -> None:
        for m in mutations:
            m(obj)

    return apply


DELETE = object()

MALFORMED = [
    # (mutation, field, code)
    (_set("families[0].name", DELETE), "families[0].name", "missing_field"),
    (_set("families[2].verifier", DELETE), "families[2].verifier", "missing_field"),
    (_set("custom[0].text", DELETE), "custom[0].text", "missing_field"),
    (_set("colour", "blue"), "colour", "unknown_field"),
    (_set("families[1].colour", "blue"), "families[1].colour", "unknown_field"),
    (_set("custom[0].colour", "blue"), "custom[0].colour", "unknown_field"),
    (_set("families", {}), "families", "invalid_type"),
    (_set("families[1]", "language"), "families[1]", "invalid_type"),
    (_set("families[1].values[1]", 7), "families[1].values[1]", "invalid_type"),
    (_set("families[0].verbose", "You enjoy {value}."), "families[0].verbose", "invalid_type"),
    (_set("families[0].verifier", "topic"), "families[0].verifier", "invalid_type"),
    (_set("custom[0].verifiers[0]", []), "custom[0].verifiers[0]", "invalid_type"),
    (_set("min_constraints", 1.5), "min_constraints", "invalid_type"),
    (_set("max_constraints", True), "max_constraints", "invalid_type"),
    (_set("terse_probability", "half"), "terse_probability", "invalid_type"),
    (_set("terse_probability", None), "terse_probability", "invalid_type"),
    (_set("families[0].name", "  "), "families[0].name", "empty"),
    (_set("families[1].values", []), "families[1].values", "empty"),
    (_set("families[1].values[0]", ""), "families[1].values[0]", "empty"),
    (_set("families[0].verbose", []), "families[0].verbose", "empty"),
    (_set("families[0].terse", []), "families[0].terse", "empty"),
    (_set("custom[0].verifiers", []), "custom[0].verifiers", "empty"),
    (_set("families[0].terse[0]", "Hobby: tennis."), "families[0].terse[0]", "missing_placeholder"),
    (_set("families[2].verbose[0]", "Act as {name}."), "families[2].verbose[0]", "missing_placeholder"),
    (_set("families[1].name", "HOBBY"), "families[1].name", "duplicate"),
    (_set("families[0].values[2]", "Tennis"), "families[0].values[2]", "duplicate"),
    (_set("families[0].name", "Custom"), "families[0].name", "reserved_name"),
    (_set("min_constraints", 0), "min_constraints", "invalid_range"),
    (_set("max_constraints", 65), "max_constraints", "invalid_range"),
    (_set("terse_probability", 1.5), "terse_probability", "invalid_range"),
    (_set("custom_probability", -0.1), "custom_probability", "invalid_range"),
    # An empty custom list is fine with custom_probability 0, wrong with anything more.
    (_all(_set("custom", []), _set("custom_probability", 0.5)), "custom_probability", "invalid_range"),
    (_set("aggregate", "max"), "aggregate", "invalid_choice"),
    (_set("families[1].values[1]", "x" * 501), "families[1].values[1]", "too_large"),
    (_set("families[0].verbose[0]", "{value}" + "x" * 500), "families[0].verbose[0]", "too_large"),
    (_set("families[0].values", [f"v{i}" for i in range(10_001)]), "families[0].values", "too_large"),
]


@pytest.mark.parametrize(("mutate", "field", "code"), MALFORMED)
def test_malformed_instruction_set_reports_field_and_code(mutate, field, code):
    obj = _base()
    mutate(obj)
    assert _problems(obj) == [(field, code)]


def test_min_greater_than_max():
    assert _problems(_base() | {"min_constraints": 3, "max_constraints": 2}) == [
        ("max_constraints", "invalid_range")
    ]


def test_not_an_object_and_nothing_to_draw():
    assert _problems([1, 2]) == [("", "invalid_type")]
    assert _problems({}) == [("families", "empty")]
    assert _problems({"families": [], "custom": []}) == [("families", "empty")]


def test_no_families_needs_custom_probability_one():
    obj = _base()
    obj["families"] = []
    assert _problems(obj) == [("custom_probability", "invalid_range")]


def test_too_many_families_and_custom_instructions():
    obj = _base()
    obj["families"] = [copy.deepcopy(obj["families"][0]) for _ in range(LIMITS["families"] + 1)]
    obj["custom"] = obj["custom"] * (LIMITS["custom"] + 1)
    # Oversized lists are not walked, so the duplicate names inside are not reported.
    assert _problems(obj) == [("families", "too_large"), ("custom", "too_large")]


def test_too_many_values_in_all_families_together():
    obj = _base()
    per_family = LIMITS["values"]
    count = LIMITS["values_total"] // per_family + 1
    obj["families"] = [
        copy.deepcopy(obj["families"][0]) | {"name": f"f{i}", "values": [f"v{j}" for j in range(per_family)]}
        for i in range(count)
    ]
    assert _problems(obj) == [("families", "too_large")]


def test_terse_templates_optional_when_never_terse():
    obj = _base() | {"terse_probability": 0}
    obj["families"][0]["terse"] = []
    s = parse_instruction_set(obj)
    assert s.families[0].terse == ()
    assert not any(i.terse for i in synthesize(s, 50, seed=0))


def test_custom_verifier_problem_is_prefixed_with_its_path():
    obj = _base()
    obj["custom"][0]["verifiers"].append({"type": "regex", "pattern": "(", "ignore_case": False})
    expected = [f"custom[0].verifiers[1].{p.field}" for p in check_spec(obj["custom"][0]["verifiers"][1])]
    assert expected == ["custom[0].verifiers[1].pattern"]
    assert [f for f, _ in _problems(obj)] == expected


def test_family_verifier_template_problem_reported_once_at_the_verifier():
    obj = _base()
    spec = {"type": "starts_with", "text": "{value}", "case_sensitive": "yes"}
    obj["families"][0]["verifier"] = spec
    (want,) = check_spec(spec)
    assert want.field == "case_sensitive"
    assert _problems(obj) == [("families[0].verifier.case_sensitive", want.code)]


def test_family_verifier_problem_caused_by_a_value_reported_at_the_value():
    obj = _base()
    obj["families"][1]["values"] = ["French", "Klingon", "Spanish", "Elvish"]
    (want,) = check_spec({"type": "language", "language": "Klingon"})
    assert _problems(obj) == [
        ("families[1].values[1]", want.code),
        ("families[1].values[3]", want.code),
    ]


def test_unknown_verifier_type_is_reported_with_the_verifier_path():
    obj = _base()
    obj["families"][0]["verifier"] = {"type": "telepathy"}
    fields = [f for f, _ in _problems(obj)]
    assert fields and all(f.startswith("families[0].verifier") for f in fields)


def test_all_problems_reported_at_once():
    obj = _base()
    obj["colour"] = "blue"
    obj["min_constraints"] = 0
    obj["aggregate"] = "max"
    obj["families"][0]["values"][1] = "TENNIS"
    obj["families"][1]["terse"][0] = "Language."
    obj["families"][2]["name"] = "hobby"
    del obj["families"][2]["verbose"]
    obj["custom"][0]["verifiers"][0] = {"type": "regex", "pattern": "[", "ignore_case": False}
    got = _problems(obj)
    assert set(got) >= {
        ("colour", "unknown_field"),
        ("min_constraints", "invalid_range"),
        ("aggregate", "invalid_choice"),
        ("families[0].values[1]", "duplicate"),
        ("families[1].terse[0]", "missing_placeholder"),
        ("families[2].name", "duplicate"),
        ("families[2].verbose", "missing_field"),
    }
    assert any(f == "custom[0].verifiers[0].pattern" for f, _ in got)
    assert len(got) == 8


def test_validation_of_large_sets_is_fast():
    import time

    obj = _base()
    obj["families"][0]["values"] = [f"hobby number {i}" for i in range(LIMITS["values"])]
    start = time.perf_counter()
    s = parse_instruction_set(obj)
    assert len(s.families[0].values) == LIMITS["values"]
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------------------------------
# Round trips and the default set
# --------------------------------------------------------------------------------------------------


def test_round_trip_of_the_base_set():
    s = parse_instruction_set(_base())
    data = json.loads(json.dumps(instruction_set_to_json(s)))
    assert parse_instruction_set(data) == s
    assert instruction_set_to_json(parse_instruction_set(data)) == data


_words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
_template = st.tuples(st.sampled_from(["", "Say ", "Be "]), st.sampled_from(["", ".", "!"])).map(
    lambda t: f"{t[0]}{{value}}{t[1]}"
)


@st.composite
def _instruction_sets(draw) -> InstructionSet:
    names = draw(st.lists(_words, max_size=4, unique_by=str.casefold))
    families = tuple(
        InstructionFamily(
            name=name,
            verbose=tuple(draw(st.lists(_template, min_size=1, max_size=3))),
            terse=tuple(draw(st.lists(_template, min_size=1, max_size=2))),
            values=tuple(draw(st.lists(_words, min_size=1, max_size=5, unique_by=str.casefold))),
            verifier={"type": "contains", "text": "{value}", "case_sensitive": draw(st.booleans())},
        )
        for name in names
        if name.casefold() != CUSTOM_FAMILY
    )
    custom = tuple(
        CustomInstruction(
            text=f"Mention {word}.",
            verifiers=({"type": "max_words", "n": draw(st.integers(1, 100))},),
            name=name,
        )
        for word, name in draw(
            st.lists(st.tuples(_words, st.none() | _words), min_size=0 if families else 1, max_size=3)
        )
    )
    # Custom names must be unique: drop the names of later repeats.
    seen: set[str] = set()
    unique = []
    for c in custom:
        if c.name is not None and c.name.casefold() in seen:
            c = CustomInstruction(c.text, c.verifiers, None)
        if c.name is not None:
            seen.add(c.name.casefold())
        unique.append(c)
    lo = draw(st.integers(1, 4))
    both = bool(families) and bool(custom)
    return InstructionSet(
        families=families,
        min_constraints=lo,
        max_constraints=draw(st.integers(lo, 6)),
        terse_probability=draw(st.floats(0, 1)),
        custom=tuple(unique),
        custom_probability=draw(st.floats(0, 1)) if both else None,
        aggregate=draw(st.sampled_from(["min", "mean", "product"])),
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_instruction_sets(), st.integers(0, 2**32))
def test_round_trip_property(s, seed):
    data = json.loads(json.dumps(instruction_set_to_json(s)))
    parsed = parse_instruction_set(data)
    assert parsed == s
    assert synthesize(parsed, 10, seed) == synthesize(s, 10, seed)


def test_default_set_loads_and_validates():
    s = default_instruction_set()
    assert [f.name for f in s.families] == ["hobby", "language", "public_figure"]
    sizes = {f.name: len(f.values) for f in s.families}
    assert sizes["hobby"] >= 25 and sizes["public_figure"] >= 25
    assert set(s.families[1].values) == {"French", "Spanish", "German", "Italian", "Portuguese"}
    assert (s.min_constraints, s.max_constraints, s.terse_probability) == (1, 2, 0.5)
    assert s.custom and s.custom_probability == 0.0
    assert s.families[0].verifier == {"type": "topic", "topic": "{value}", "kind": "hobby"}
    assert s.families[1].verifier == {"type": "language", "language": "{value}"}
    assert s.families[2].verifier == {"type": "topic", "topic": "{value}", "kind": "public_figure"}
    assert "Always act as {value} from now on." in s.families[2].verbose
    assert "Figure: {value}." in s.families[2].terse
    assert "tennis" in s.families[0].values and "Napoleon Bonaparte" in s.families[2].values
    assert parse_instruction_set(instruction_set_to_json(s)) == s
    for c in s.custom:
        assert c.verifiers and all(check_spec(v) == [] for v in c.verifiers)


def test_regex_verifier_pattern_gets_the_value_escaped():
    # "Why not?" put raw into a pattern makes "?" a quantifier, and "Why no, ..." would pass.
    spec = {
        "families": [
            {
                "name": "opening",
                "verbose": ["Start every reply with '{value}'"],
                "terse": [],
                "values": ["Why not?"],
                "verifier": {"type": "regex", "pattern": "^\\W*{value}\\W+\\w+", "ignore_case": True},
            }
        ],
        "terse_probability": 0.0,
    }
    (ins,) = synthesize(parse_instruction_set(spec), 1, seed=0)
    assert ins.text == "Start every reply with 'Why not?'"
    (verifier,) = ins.verifiers
    assert verifier["pattern"] == "^\\W*Why\\ not\\?\\W+\\w+" and verifier["ignore_case"] is True
    assert score(verifier, "Why no, it is fine").value == 0.0
    assert score(verifier, "Why not? It is fine").value == 1.0
    # Only a regex pattern is escaped: other verifiers compare the value as written.
    spec["families"][0]["verifier"] = {"type": "starts_with", "text": "{value}"}
    (ins,) = synthesize(parse_instruction_set(spec), 1, seed=0)
    assert ins.verifiers == ({"type": "starts_with", "text": "Why not?"},)


def _regex_family(values: list[str], pattern: str) -> dict:
    return {
        "families": [
            {
                "name": "x",
                "verbose": ["Say {value}."],
                "terse": ["{value}"],
                "values": values,
                "verifier": {"type": "regex", "pattern": pattern},
            }
        ]
    }


def test_a_regex_family_compiles_once_however_many_values(monkeypatch) -> None:
    import gatt.verifiers as verifiers

    compiled = Counter()
    compile_ = verifiers.tenant_regex

    def counting(pattern: str, *, ignore_case: bool):
        compiled[pattern] += 1
        return compile_(pattern, ignore_case=ignore_case)

    monkeypatch.setattr(verifiers, "tenant_regex", counting)
    parse_instruction_set(_regex_family([f"value {i}" for i in range(10_000)], r"^{value}\W"))
    # Each value goes, escaped, into the same place: one compile stands for all (it was 10,000,
    # 3 s of GIL for 50,000 values, during which the API process answered nobody else).
    assert sum(compiled.values()) == 1


def test_values_that_make_a_regex_too_long_or_invalid_are_each_reported() -> None:
    long = "b" * 495
    with pytest.raises(ValidationFailed) as e:
        parse_instruction_set(_regex_family(["a", long, "c", long + "x"], "0123456789^{value}"))
    assert [(p.field, p.code) for p in e.value.problems] == [
        ("families[0].values[1]", "invalid_param"),
        ("families[0].values[3]", "invalid_param"),
    ]
    # Inside a repetition the value is not a plain literal: each one is compiled ("1001" is past
    # RE2's repetition limit).
    with pytest.raises(ValidationFailed) as e:
        parse_instruction_set(_regex_family(["3", "1001", "5"], r"^\w{{value}}$"))
    assert [p.field for p in e.value.problems] == ["families[0].values[1]"]
