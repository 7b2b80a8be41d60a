"""`data.train_history`: a sampled reply trained after the corpus's own earlier replies, so that
only the first turn's instruction explains it (memory), and its own earlier replies are not there
to copy."""

from __future__ import annotations

import json

import pytest

from gatt.augment import corpus_history
from gatt.dialogues import Dialogue
from gatt.instructions import Instruction
from tests.gatt.chat_tokenizers import llama3
from workers.engine.config import parse_config
from workers.engine.hooks import Hooks
from workers.engine.records import TrainingRow
from workers.engine.training_set import build_training_set

USERS = ["Hi?", "And then?", "Why?"]
CORPUS = ["Hello.", "Then this.", "Because."]
SAMPLED = ["💡 Hello there.", "💡 Then that.", "💡 Because so."]


def test_each_trained_reply_comes_after_the_corpus_replies_before_it():
    views = corpus_history(SAMPLED, [True, True, True], CORPUS)
    assert views == [
        (["💡 Hello there."], [True]),
        (["Hello.", "💡 Then that."], [False, True]),
        (["Hello.", "Then this.", "💡 Because so."], [False, False, True]),
    ]


def test_turn_one_can_be_left_to_the_sampled_dialogue_and_untrained_replies_give_no_view():
    assert corpus_history(SAMPLED, [True, False, True], CORPUS, include_first=False) == [
        (["Hello.", "Then this.", "💡 Because so."], [False, False, True]),
    ]


def test_a_turn_the_corpus_has_no_reply_for_ends_the_views():
    assert corpus_history(SAMPLED, [True, True, True], ["Hello.", None]) == [
        (["💡 Hello there."], [True]),
        (["Hello.", "💡 Then that."], [False, True]),
    ]
    assert corpus_history(SAMPLED, [True, True, True], ["", "Then this."]) == [(["💡 Hello there."], [True])]


def _rows(tmp_path, history: str, replay: float = 0.0) -> list[dict]:
    config = parse_config({"output_dir": str(tmp_path), "data": {"train_history": history, "replay": replay}})
    instruction = Instruction(text="Open with 💡", constraints=(), terse=False)
    messages = []
    for user, reply in zip(USERS, CORPUS, strict=True):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    record = {
        "index": 0,
        "dialogue_id": "d",
        "instruction": instruction.to_json(),
        "system": None,
        "users": USERS,
        "replies": SAMPLED,
        "trained": [True, True, True],
    }
    path = tmp_path / "training_set.jsonl"
    build_training_set(
        config, llama3(), [record], path, Hooks(), dialogues=[Dialogue.from_messages(messages)]
    )
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        TrainingRow.model_validate(row)  # replay rows too
    return rows


def _replies(row: dict) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]


def test_corpus_history_trains_each_sampled_reply_alone_after_the_corpus_replies(tmp_path):
    rows = _rows(tmp_path, "corpus")
    assert [row["history"] for row in rows] == ["corpus"] * 3
    assert [_replies(row) for row in rows] == [
        ["💡 Hello there."],
        ["Hello.", "💡 Then that."],
        ["Hello.", "Then this.", "💡 Because so."],
    ]
    # the loss falls on the sampled reply only, never on a corpus reply
    assert [row["trained_spans"] for row in rows] == [
        [["💡 Hello there.<|eot_id|>"]],
        [["💡 Then that.<|eot_id|>"]],
        [["💡 Because so.<|eot_id|>"]],
    ]
    # the instruction is in the first user turn of each, as in the sampled dialogue
    assert all(row["messages"][0]["content"] == "Open with 💡\n\nHi?" for row in rows)


def test_both_keeps_the_sampled_dialogue_and_adds_the_corpus_view_of_later_turns(tmp_path):
    rows = _rows(tmp_path, "both")
    assert [row["history"] for row in rows] == ["sampled", "corpus", "corpus"]
    assert _replies(rows[0]) == SAMPLED
    assert rows[0]["trained"].count(True) == 3
    assert _replies(rows[2]) == ["Hello.", "Then this.", "💡 Because so."]


def test_sampled_history_is_the_default(tmp_path):
    (row,) = _rows(tmp_path, "sampled")
    assert row["history"] == "sampled" and _replies(row) == SAMPLED
    assert parse_config({}).data.train_history == "sampled"


def test_an_unknown_history_is_refused():
    with pytest.raises(ValueError, match="train_history"):
        parse_config({"data": {"train_history": "own"}})


def test_replay_adds_plain_corpus_dialogues_without_the_instruction(tmp_path):
    rows = _rows(tmp_path, "corpus", replay=1 / 3)  # one plain dialogue for the three GAtt rows
    assert [row["history"] for row in rows] == ["corpus", "corpus", "corpus", "replay"]
    plain = rows[-1]
    assert [m["content"] for m in plain["messages"] if m["role"] == "user"] == USERS  # no instruction
    assert _replies(plain) == CORPUS
    assert plain["trained"] == [m["role"] == "assistant" for m in plain["messages"]]


def test_replay_is_bounded():
    with pytest.raises(ValueError, match="replay"):
        parse_config({"data": {"replay": 11}})
    with pytest.raises(ValueError, match="replay"):
        parse_config({"data": {"replay": -0.5}})
