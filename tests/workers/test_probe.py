"""The probe's per-instruction table: each instruction of a set runs on every dialogue, and the
ceiling (every_turn), once and room are counted over turns 2 and later."""

from __future__ import annotations

from gatt.instructions import each_instruction, parse_instruction_set
from workers.probe import markdown, summarize

SET = {
    "families": [
        {
            "name": "opening",
            "verbose": ["Always start your reply with '{value}'", "Begin with '{value}'"],
            "terse": ["Opening: {value}"],
            "values": ["Ahoy!", "Sure!"],
            "verifier": {"type": "starts_with", "text": "{value}"},
        }
    ],
    "custom": [{"name": "caps", "text": "Write in capitals.", "verifiers": [{"type": "all_uppercase"}]}],
}


def test_each_instruction_renders_every_value_once_and_every_custom_instruction():
    out = each_instruction(parse_instruction_set(SET))
    assert [i.text for i in out] == [
        "Always start your reply with 'Ahoy!'",
        "Always start your reply with 'Sure!'",
        "Write in capitals.",
    ]
    assert out[1].verifiers == ({"type": "starts_with", "text": "Sure!"},)
    assert not any(i.terse for i in out)


def _run(slot: int, scores: list[float]) -> dict:
    return {"slot": slot, "scores": scores}


def test_summary_counts_later_turns_per_instruction_and_sorts_by_ceiling():
    instructions = each_instruction(parse_instruction_set(SET))
    report = {
        "config": {"pass_threshold": 0.5},
        "transcripts": {
            "once": [_run(0, [1, 0, 0]), _run(1, [1, 1, 0]), _run(2, [0, 0, 0]), _run(0, [1, 1, 0])],
            "every_turn": [
                _run(0, [1, 1, 1]),
                _run(1, [1, 0, 0]),
                _run(2, [0, 0.4, 0.6]),
                _run(0, [1, 1, 0]),
            ],
        },
    }
    rows = summarize(report, instructions)
    assert [r["instruction"] for r in rows] == ["opening: Ahoy!", "caps", "opening: Sure!"]
    ahoy = rows[0]
    assert ahoy["once"] == [1.0, 0.5, 0.0] and ahoy["every_turn"] == [1.0, 1.0, 0.5]
    assert (ahoy["every_turn_later"], ahoy["once_later"], ahoy["room"]) == (0.75, 0.25, 0.5)
    assert ahoy["once_later_n"] == 4
    assert rows[1]["every_turn_later"] == 0.5  # 0.4 fails the 0.5 threshold, 0.6 passes
    table = markdown(rows, ("once", "every_turn"))
    assert "| opening: Ahoy! | 1.00 / 0.50 / 0.00 | 1.00 / 1.00 / 0.50 | 0.25 | 0.75 | 0.50 | 4 |" in table


def test_fixed_context_conditions_get_a_room_of_their_own():
    instructions = each_instruction(parse_instruction_set(SET))[:1]
    report = {
        "config": {"pass_threshold": 0.5},
        "transcripts": {"once_fixed": [_run(0, [1, 0, 0, 0])], "every_turn_fixed": [_run(0, [1, 1, 0, 1])]},
    }
    (row,) = summarize(report, instructions)
    assert row["room_fixed"] == round(2 / 3, 3) and "room" not in row
    table = markdown([row], ("once_fixed", "every_turn_fixed"))
    assert table.splitlines()[0].endswith("| room_fixed | n 2+ |")
