"""The bound on what a job can generate (workers/engine/cost.py), worked out by hand."""

from __future__ import annotations

from workers.engine.config import parse_options
from workers.engine.cost import estimate


def test_sampling_counts_k_replies_of_max_length_per_sampled_turn() -> None:
    options = parse_options({"data": {"max_turns": 4}, "sampling": {"k": 4, "max_new_tokens": 48}})
    # 208 dialogues with 800 user turns in all: at most 4 turns each (832), but only 800 exist.
    cost = estimate(options, dialogues=208, user_turns=800)
    assert (cost.sampled_turns, cost.sampling_tokens) == (800, 800 * 4 * 48)
    assert cost.evaluation_tokens == cost.values_tokens == 0 and cost.generated_tokens == 153_600
    # "last" samples one turn per dialogue; max_dialogues caps the dialogues.
    last = parse_options({"data": {"max_turns": 4, "sample_turns": "last", "max_dialogues": 100}})
    assert estimate(last, dialogues=208, user_turns=800).sampled_turns == 100


def test_evaluation_and_value_lists_count_too() -> None:
    options = parse_options(
        {
            "data": {"max_turns": 1},
            "sampling": {"k": 2, "max_new_tokens": 10},
            "evaluation": {"enabled": True, "heldout_dialogues": 8, "turns": 8, "max_new_tokens": 64},
            "values": {"enabled": True, "families": ["hobby"], "samples": 3, "max_new_tokens": 100},
        }
    )
    cost = estimate(options, dialogues=20, user_turns=60)
    assert cost.sampled_turns == 12  # 8 of the 20 dialogues are held out
    assert cost.sampling_tokens == 12 * 2 * 10
    assert cost.evaluation_tokens == 2 * 8 * 8 * 2 * 64  # 2 models, 8 dialogues, 8 turns, 2 conditions
    assert cost.values_tokens == 300
    assert cost.to_json()["generated_tokens"] == 240 + 16_384 + 300
