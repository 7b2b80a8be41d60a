"""The two renderings of one instruction (Llama 2 §3.3): the full wording while sampling, the terse
one (drawn half of the time) only in the training view."""

from __future__ import annotations

import json

from gatt.augment import Placement
from gatt.instructions import Instruction, parse_instruction_set, synthesize
from tests.gatt.chat_tokenizers import llama3
from workers.engine.config import parse_config
from workers.engine.hooks import Hooks
from workers.engine.sample_stage import sampling_context
from workers.engine.training_set import build_training_set

SET = {
    "families": [
        {
            "name": "opening",
            "verbose": ["Always start your reply with '{value}'"],
            "terse": ["Opening: {value}"],
            "values": ["Ahoy!"],
            "verifier": {"type": "starts_with", "text": "{value}"},
        }
    ],
    "terse_probability": 1.0,
}


def _terse() -> Instruction:
    (instruction,) = synthesize(parse_instruction_set(SET), 1, seed=0)
    return instruction


def test_a_terse_instruction_keeps_its_full_wording_for_sampling():
    instruction = _terse()
    assert instruction.terse
    assert instruction.text == "Opening: Ahoy!"
    assert instruction.sampling_text == "Always start your reply with 'Ahoy!'"
    assert instruction.to_json()["sampling_text"] == instruction.sampling_text
    assert Instruction.from_json(instruction.to_json()) == instruction


def test_a_verbose_instruction_has_one_rendering():
    (instruction,) = synthesize(parse_instruction_set(SET | {"terse_probability": 0.0}), 1, seed=0)
    assert instruction.sampling_text == instruction.text == "Always start your reply with 'Ahoy!'"


def test_records_without_a_sampling_text_sampled_with_their_text():
    data = _terse().to_json()
    del data["sampling_text"]
    assert Instruction.from_json(data).sampling_text == "Opening: Ahoy!"


def test_sampling_attaches_the_full_wording_and_training_keeps_the_terse_one_once(tmp_path):
    instruction = _terse()
    users, replies = ["Hi?", "And then?", "Why?"], ["Ahoy! Hello.", "Ahoy! Then this."]
    messages = sampling_context(instruction, users, replies, None, Placement())
    asked = [m["content"] for m in messages if m["role"] == "user"]
    assert asked == [f"Always start your reply with 'Ahoy!'\n\n{u}" for u in users]

    config = parse_config({"output_dir": str(tmp_path)})
    record = {
        "index": 0,
        "dialogue_id": "d",
        "instruction": instruction.to_json(),
        "system": None,
        "users": users,
        "replies": [*replies, "Ahoy! Because."],
        "trained": [True, True, True],
    }
    build_training_set(config, llama3(), [record], tmp_path / "training_set.jsonl", Hooks())
    (row,) = [json.loads(line) for line in (tmp_path / "training_set.jsonl").read_text().splitlines()]
    trained_users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    assert trained_users == ["Opening: Ahoy!\n\nHi?", "And then?", "Why?"]
