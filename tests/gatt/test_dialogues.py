"""Tests for gatt.dialogues: dialogue types, corpus validation and the JSONL round trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatt.dialogues import (
    DEFAULT_LIMITS,
    CorpusLimits,
    Dialogue,
    Message,
    corpus_stats,
    dump_corpus,
    iter_corpus,
    parse_corpus,
    validate_line,
)
from gatt.errors import Problem, ValidationFailed

U = {"role": "user", "content": "hello"}
A = {"role": "assistant", "content": "hi there"}
S = {"role": "system", "content": "Always answer in French."}


def line(obj: object) -> bytes:
    return json.dumps(obj).encode()


def found(raw: bytes, number: int = 7, limits: CorpusLimits = DEFAULT_LIMITS) -> list[tuple]:
    """(line, field, code) of every problem in one line, which must then yield no dialogue."""
    dialogue, problems = validate_line(raw, number, limits)
    assert (dialogue is None) == bool(problems)
    return [(p.line, p.field, p.code) for p in problems]


def corpus_problems(data, limits: CorpusLimits = DEFAULT_LIMITS) -> list[Problem]:
    with pytest.raises(ValidationFailed) as info:
        parse_corpus(data, limits)
    assert info.value.what == "corpus"
    return info.value.problems


# --- Dialogue -----------------------------------------------------------------------------------


def test_dialogue_helpers():
    d = Dialogue.from_messages([S, U, A, {"role": "user", "content": "again"}], id="d1")
    assert d.id == "d1"
    assert d.system == "Always answer in French."
    assert d.turns == [("hello", "hi there"), ("again", None)]
    assert d.n_turns == 2
    assert d.to_json() == {"id": "d1", "messages": [S, U, A, {"role": "user", "content": "again"}]}

    plain = Dialogue((Message("user", "q"), Message("assistant", "a")))
    assert plain.system is None
    assert plain.turns == [("q", "a")]
    assert plain.to_json() == {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    }


def test_dialogue_stores_a_tuple_so_equality_does_not_depend_on_the_sequence_type():
    msgs = [Message("user", "q")]
    assert Dialogue(msgs) == Dialogue(tuple(msgs))  # type: ignore[arg-type]
    assert isinstance(Dialogue(msgs).messages, tuple)  # type: ignore[arg-type]


def test_dialogue_constructor_enforces_the_rules():
    with pytest.raises(ValidationFailed) as info:
        Dialogue((Message("assistant", "a"), Message("user", " ")), id="")
    assert {(p.field, p.code) for p in info.value.problems} == {
        ("id", "invalid_type"),
        ("messages[0].role", "role_order"),
        ("messages[1].content", "empty_content"),
    }
    assert all(p.line is None for p in info.value.problems)
    with pytest.raises(TypeError):
        Dialogue(({"role": "user", "content": "x"},))  # type: ignore[arg-type]


def test_from_messages_reports_every_problem():
    with pytest.raises(ValidationFailed) as info:
        Dialogue.from_messages([{"role": "user", "text": "x"}, {"role": "user", "content": "y"}])
    assert [(p.field, p.code) for p in info.value.problems] == [
        ("messages[0].text", "unknown_field"),
        ("messages[0].content", "missing_field"),
        ("messages[1].role", "role_order"),
    ]


def test_dialogue_limits_are_not_part_of_the_type():
    # Limits protect uploads; a dialogue built in code can be any size.
    d = Dialogue.from_messages([{"role": "user", "content": "x" * 30_000}])
    assert d.n_turns == 1


# --- one line at a time -------------------------------------------------------------------------


def test_valid_line_with_and_without_line_endings():
    raw = line({"id": "x", "messages": [S, U, A]})
    for ending in (b"", b"\n", b"\r\n"):
        dialogue, problems = validate_line(raw + ending, 1)
        assert problems == []
        assert dialogue == Dialogue.from_messages([S, U, A], id="x")


def test_dialogue_may_end_on_either_role_and_system_is_optional():
    for messages in ([U], [U, A], [S, U], [U, A, U], [U, A, U, A]):
        assert found(line({"messages": messages})) == []


def test_invalid_utf8_reports_the_byte():
    raw = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    dialogue, problems = validate_line(raw, 3)
    assert dialogue is None
    assert [(p.line, p.field, p.code) for p in problems] == [(3, "", "invalid_utf8")]
    assert "0xe9" in problems[0].message
    assert f"byte {raw.index(0xE9) + 1}" in problems[0].message


def test_line_too_long_is_reported_without_parsing():
    limits = CorpusLimits(max_line_bytes=20)
    # Also invalid UTF-8 and invalid JSON, but only the length is reported: it is never parsed.
    assert found(b"\xff" + b"{" * 30, 4, limits) == [(4, "", "line_too_long")]
    _, problems = validate_line(b"x" * 21 + b"\r\n", 4, limits)
    assert "expected at most 20 bytes" in problems[0].message and "found 21" in problems[0].message
    # The line ending does not count towards the limit.
    assert found(b'{"messages": 1234}' + b"\r\n", 4, CorpusLimits(max_line_bytes=18)) == [
        (4, "messages", "invalid_type")
    ]


def test_invalid_json_gives_the_column():
    _, problems = validate_line(b'{"messages": [}', 2)
    assert [(p.line, p.field, p.code) for p in problems] == [(2, "", "invalid_json")]
    assert "column 15" in problems[0].message


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"{'messages': []}", b'{"messages": [] } trailing', b"[" * 50_000, b"1" * 5000],
    ids=["empty", "unclosed", "single-quotes", "extra-data", "deep-nesting", "huge-integer"],
)
def test_invalid_json_variants(raw):
    assert found(raw) == [(7, "", "invalid_json")]


@pytest.mark.parametrize("value", [[], "text", 3, None, True])
def test_not_an_object(value):
    assert found(line(value)) == [(7, "", "not_an_object")]


def test_missing_messages():
    assert found(line({"id": "a"})) == [(7, "messages", "missing_field")]


def test_unknown_fields_are_errors_with_a_hint():
    raw = line({"mesages": [U], "messages": [{"role": "user", "content": "x", "name": "bob"}]})
    assert found(raw) == [(7, "mesages", "unknown_field"), (7, "messages[0].name", "unknown_field")]
    _, problems = validate_line(raw, 7)
    assert "did you mean 'messages'?" in problems[0].message


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"messages": {"role": "user"}}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [U, "hi"]}, "messages[1]"),
        ({"messages": [U, None]}, "messages[1]"),
        ({"id": 5, "messages": [U]}, "id"),
        ({"id": "", "messages": [U]}, "id"),
        ({"id": "  ", "messages": [U]}, "id"),
        ({"id": None, "messages": [U]}, "id"),
    ],
)
def test_invalid_type(obj, field):
    assert found(line(obj)) == [(7, field, "invalid_type")]


def test_message_that_is_not_an_object_does_not_cascade_into_order_errors():
    assert found(line({"messages": [U, 42, U]})) == [(7, "messages[1]", "invalid_type")]


def test_missing_role():
    assert found(line({"messages": [U, {"content": "x"}]})) == [(7, "messages[1].role", "missing_role")]


@pytest.mark.parametrize("role", ["usr", "User", "", None, 1, ["user"]])
def test_unknown_role(role):
    assert found(line({"messages": [U, A, {"role": role, "content": "x"}]})) == [
        (7, "messages[2].role", "unknown_role")
    ]


def test_unknown_role_is_taken_as_the_expected_one_to_avoid_cascades():
    # "asistant" is reported once; the following user message is not also out of order.
    assert found(line({"messages": [U, {"role": "asistant", "content": "x"}, U]})) == [
        (7, "messages[1].role", "unknown_role")
    ]


@pytest.mark.parametrize(
    ("messages", "field", "text"),
    [
        ([A, U], "messages[0].role", "expected role 'user' first, found 'assistant'"),
        (
            [S, A, U],
            "messages[1].role",
            "expected role 'user' first after the system message, found 'assistant'",
        ),
        ([U, U], "messages[1].role", "expected role 'assistant' after 'user', found 'user'"),
        ([U, A, A], "messages[2].role", "expected role 'user' after 'assistant', found 'assistant'"),
        ([U, S, A], "messages[1].role", "expected role 'assistant' after 'user', found 'system'"),
        ([S, S, U], "messages[1].role", "found 'system' (a system message may only be messages[0])"),
    ],
)
def test_role_order(messages, field, text):
    _, problems = validate_line(line({"messages": messages}), 7)
    assert [(p.line, p.field, p.code) for p in problems] == [(7, field, "role_order")]
    assert text in problems[0].message


def test_role_order_reports_each_misplaced_message_once():
    # Checking continues from what was found, so two separate slips give two problems, not a cascade.
    messages = [U, U, A, U, A, A, U]
    assert found(line({"messages": messages})) == [
        (7, "messages[1].role", "role_order"),
        (7, "messages[5].role", "role_order"),
    ]


@pytest.mark.parametrize("content", ["", "   ", "\n\t"])
def test_empty_content(content):
    assert found(line({"messages": [U, {"role": "assistant", "content": content}]})) == [
        (7, "messages[1].content", "empty_content")
    ]


def test_missing_content():
    assert found(line({"messages": [{"role": "user"}]})) == [(7, "messages[0].content", "missing_field")]


@pytest.mark.parametrize("content", [None, 3, ["a"], {"text": "a"}, True])
def test_content_not_string(content):
    assert found(line({"messages": [{"role": "user", "content": content}]})) == [
        (7, "messages[0].content", "content_not_string")
    ]


def test_content_too_long_counts_characters_not_bytes():
    limits = CorpusLimits(max_content_chars=5)
    assert found(line({"messages": [{"role": "user", "content": "ééééé"}]}), 1, limits) == []
    raw = line({"messages": [{"role": "system", "content": "x" * 6}, U]})
    assert found(raw, 1, limits) == [(1, "messages[0].content", "content_too_long")]
    _, problems = validate_line(raw, 1, limits)
    assert "expected at most 5 characters, found 6" in problems[0].message


def test_unpaired_surrogate_escape_is_rejected():
    # Valid JSON, but the string cannot be encoded as UTF-8 (or tokenized).
    raw = b'{"id": "\\udc80", "messages": [{"role": "user", "content": "x \\ud800 y"}]}'
    assert found(raw) == [(7, "id", "invalid_utf8"), (7, "messages[0].content", "invalid_utf8")]


def test_too_many_turns_counts_user_turns():
    limits = CorpusLimits(max_turns=2)
    assert found(line({"messages": [S, U, A, U, A]}), 1, limits) == []
    _, problems = validate_line(line({"messages": [U, A, U, A, U]}), 1, limits)
    assert [(p.field, p.code) for p in problems] == [("messages", "too_many_turns")]
    assert "expected at most 2 user turns, found 3" in problems[0].message


def test_a_line_of_too_many_messages_is_one_problem_not_one_per_message():
    # About 1 MB of `{}`: 300,000 empty messages, each with two problems if checked one by one
    # (the server grew by 200 MiB building them before the corpus-wide cap of 1,000 applied).
    raw = b'{"messages": [' + b",".join([b"{}"] * 300_000) + b"]}"
    assert len(raw) <= DEFAULT_LIMITS.max_line_bytes
    _, problems = validate_line(raw, 1)
    assert [(p.field, p.code) for p in problems] == [("messages", "too_many_messages")]
    assert "expected at most 129 messages (64 user turns), found 300000" in problems[0].message
    limits = CorpusLimits(max_turns=2)
    assert found(line({"messages": [S, U, A, U, A]}), 1, limits) == []
    assert found(line({"messages": [S, U, A, U, A, U]}), 1, limits) == [(1, "messages", "too_many_messages")]


@pytest.mark.parametrize(
    ("messages", "codes"),
    [
        ([], ["no_user_turn"]),
        ([S], ["no_user_turn"]),
        ([A], ["role_order", "no_user_turn"]),
    ],
)
def test_no_user_turn(messages, codes):
    _, problems = validate_line(line({"messages": messages}), 7)
    assert [p.code for p in problems] == codes
    assert problems[-1].field == "messages" and problems[-1].line == 7


def test_every_problem_in_a_line_is_reported():
    raw = line(
        {
            "id": 3,
            "extra": True,
            "messages": [
                {"role": "assistant", "content": ""},
                {"rol": "user", "content": 3},
                {"role": "system", "content": "x" * 11},
                {"role": "assistant", "content": "fine"},
            ],
        }
    )
    assert found(raw, 5, CorpusLimits(max_content_chars=10)) == [
        (5, "extra", "unknown_field"),
        (5, "id", "invalid_type"),
        (5, "messages[0].content", "empty_content"),
        (5, "messages[1].rol", "unknown_field"),
        (5, "messages[1].role", "missing_role"),
        (5, "messages[1].content", "content_not_string"),
        (5, "messages[2].content", "content_too_long"),
        (5, "messages[0].role", "role_order"),
        (5, "messages[2].role", "role_order"),
    ]


def test_lines_must_be_bytes():
    with pytest.raises(TypeError, match="binary mode"):
        validate_line('{"messages": []}', 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="binary mode"):
        parse_corpus('{"messages": []}')  # type: ignore[arg-type]


# --- whole corpora ------------------------------------------------------------------------------


def test_corpus_reports_problems_on_every_line():
    data = b"\n".join(
        [
            line({"id": "a", "messages": [U, A]}),  # 1 fine
            b"{not json",  # 2
            line({"id": "b", "messages": [A, A]}),  # 3: two order problems and no user turn
            b"",  # 4 blank
            b"\xff\xfe",  # 5
            line({"id": "a", "messages": [U]}),  # 6 duplicate of line 1
            line({"messages": [U, {"role": "bot", "content": ""}]}),  # 7 two problems
        ]
    )
    problems = corpus_problems(data)
    assert [(p.line, p.field, p.code) for p in problems] == [
        (2, "", "invalid_json"),
        (3, "messages[0].role", "role_order"),
        (3, "messages[1].role", "role_order"),
        (3, "messages", "no_user_turn"),
        (5, "", "invalid_utf8"),
        (6, "id", "duplicate_id"),
        (7, "messages[1].role", "unknown_role"),
        (7, "messages[1].content", "empty_content"),
    ]
    assert "first on line 1" in problems[5].message


def test_valid_corpus_round_trips():
    dialogues = [
        Dialogue.from_messages([S, U, A], id="one"),
        Dialogue.from_messages([U, A, {"role": "user", "content": "Ünïcødé ✓ 日本語\nnew line"}]),
        Dialogue.from_messages([{"role": "user", "content": 'quotes " and \\ backslash'}], id="three"),
    ]
    data = dump_corpus(dialogues)
    assert data.count(b"\n") == 3 and data.endswith(b"\n")
    assert "日本語".encode() in data  # ensure_ascii=False
    assert parse_corpus(data) == dialogues


def test_crlf_blank_lines_and_bom():
    body = [line({"messages": [U]}), b"  \t", line({"messages": [U, A]}), b"", b""]
    data = b"\xef\xbb\xbf" + b"\r\n".join(body)
    assert len(parse_corpus(data)) == 2
    # Line numbers still count blank lines, as an editor would.
    bad = b"\r\n".join([line({"messages": [U]}), b"", b"\r", line({"messages": [A]})])
    assert [(p.line, p.code) for p in corpus_problems(bad)] == [(4, "role_order"), (4, "no_user_turn")]


def test_iter_corpus_streams_lines_with_or_without_newlines():
    def stream():
        yield line({"id": "1", "messages": [U]}) + b"\r\n"
        yield b"\n"
        yield line({"id": "2", "messages": [U, A]})  # no line ending
        yield b"oops\n"

    results = list(iter_corpus(stream()))
    assert [(n, d is not None, [p.code for p in ps]) for n, d, ps in results] == [
        (1, True, []),
        (3, True, []),
        (4, False, ["invalid_json"]),
    ]
    assert results[1][1] == Dialogue.from_messages([U, A], id="2")


def test_parse_corpus_reads_a_binary_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    dialogues = [Dialogue.from_messages([U, A], id=str(i)) for i in range(5)]
    path.write_bytes(dump_corpus(dialogues))
    with path.open("rb") as f:
        assert parse_corpus(f) == dialogues


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n", []])
def test_empty_corpus(data):
    problems = corpus_problems(data)
    assert [(p.line, p.field, p.code) for p in problems] == [(None, "", "empty_corpus")]


def test_too_many_dialogues_stops_reading():
    data = dump_corpus([Dialogue.from_messages([U])] * 3) + b"not json\n"
    problems = corpus_problems(data, CorpusLimits(max_dialogues=2))
    assert [(p.line, p.code) for p in problems] == [(3, "too_many_dialogues")]
    assert parse_corpus(data.replace(b"not json\n", b""), CorpusLimits(max_dialogues=3))


def test_problem_cap():
    limits = CorpusLimits(max_problems=5)
    # Three problems per line, ten lines: the first five are kept, then one final marker.
    bad = line({"messages": [A, {"role": "x", "content": ""}]})
    problems = corpus_problems([bad] * 10, limits)
    assert len(problems) == 6
    assert [(p.line, p.code) for p in problems[:5]] == [
        (1, "unknown_role"),
        (1, "empty_content"),
        (1, "role_order"),
        (2, "unknown_role"),
        (2, "empty_content"),
    ]
    assert (problems[5].code, problems[5].line) == ("too_many_problems", None)
    # Exactly at the cap: everything is reported and no marker is added.
    exact = corpus_problems([b"x"] * 5, limits)
    assert [p.code for p in exact] == ["invalid_json"] * 5


def test_problem_cap_stops_consuming_the_stream():
    consumed = []

    def stream():
        for i in range(1000):
            consumed.append(i)
            yield b"x"

    corpus_problems(stream(), CorpusLimits(max_problems=3))
    assert len(consumed) == 4


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="max_turns"):
        CorpusLimits(max_turns=0)


def test_corpus_stats():
    dialogues = [
        Dialogue.from_messages([{"role": "system", "content": "sys"}, {"role": "user", "content": "abcd"}]),
        Dialogue.from_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}]),
    ]
    assert corpus_stats(dialogues) == {
        "dialogues": 2,
        "system_prompts": 1,
        "user_turns": 2,
        "assistant_turns": 1,
        "characters": 10,
        "estimated_tokens": 3,
    }
    assert corpus_stats([])["estimated_tokens"] == 0


# --- property: dump then parse gives the same dialogues -----------------------------------------

# Any text with something visible in it: whitespace-only content is rejected by design.
_content = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())


@st.composite
def _dialogues(draw, id: str | None) -> Dialogue:
    n_messages = draw(st.integers(min_value=1, max_value=7))
    messages = [Message("system", draw(_content))] if draw(st.booleans()) else []
    messages += [Message(("user", "assistant")[i % 2], draw(_content)) for i in range(n_messages)]
    return Dialogue(tuple(messages), id)


@st.composite
def _corpora(draw) -> list[Dialogue]:
    n = draw(st.integers(min_value=1, max_value=5))
    ids = draw(st.lists(st.one_of(st.none(), _content), min_size=n, max_size=n))
    seen: set[str] = set()
    unique = []
    for i in ids:  # ids must be unique; repeats become None
        unique.append(None if i in seen else i)
        if i is not None:
            seen.add(i)
    return [draw(_dialogues(i)) for i in unique]


@settings(max_examples=150, deadline=None)
@given(_corpora())
def test_dump_then_parse_round_trips(dialogues):
    data = dump_corpus(dialogues)
    assert parse_corpus(data) == dialogues
    assert parse_corpus(data.replace(b"\n", b"\r\n")) == dialogues
    assert parse_corpus(data.splitlines(keepends=True)) == dialogues
