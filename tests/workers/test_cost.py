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
    # Every round samples them all again: a tenant's quota sees three rounds' tokens.
    rounds = parse_options(
        {"data": {"max_turns": 4}, "sampling": {"k": 4, "max_new_tokens": 48}, "rounds": {"count": 3}}
    )
    cost = estimate(rounds, dialogues=208, user_turns=800)
    assert (cost.sampled_turns, cost.sampling_tokens) == (2400, 3 * 800 * 4 * 48)
    # Retries can draw every turn's K candidates again, each as often as they allow.
    retries = parse_options(
        {"data": {"max_turns": 4}, "sampling": {"k": 4, "max_new_tokens": 48, "retries": 2}}
    )
    assert estimate(retries, dialogues=208, user_turns=800).sampling_tokens == 800 * 3 * 4 * 48


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


def test_a_validation_corpus_leaves_the_training_corpus_whole() -> None:
    options = parse_options(
        {
            "data": {"max_turns": 1},
            "sampling": {"k": 2, "max_new_tokens": 10},
            "evaluation": {"enabled": True, "heldout_dialogues": 8, "turns": 2, "max_new_tokens": 5},
        }
    )
    cost = estimate(options, dialogues=20, user_turns=60, validation_dialogues=3)
    assert cost.sampled_turns == 20  # nothing held out of the training corpus
    assert cost.evaluation_tokens == 2 * 3 * 2 * 2 * 5  # only 3 validation dialogues to hold out


def test_split_takes_the_held_out_dialogues_from_the_validation_corpus(tmp_path) -> None:
    from gatt.dialogues import parse_corpus
    from tests.app.factories import dialogue, jsonl
    from workers.engine.config import parse_config
    from workers.engine.pipeline import split_heldout

    (tmp_path / "train.jsonl").write_bytes(jsonl(*(dialogue(i) for i in range(5))))
    (tmp_path / "held.jsonl").write_bytes(jsonl(*(dialogue(i) for i in range(10, 13))))
    with open(tmp_path / "train.jsonl", "rb") as f:
        dialogues = parse_corpus(f)
    evaluation = {"enabled": True, "heldout_dialogues": 2}
    config = parse_config({"evaluation": evaluation, "data": {"validation": str(tmp_path / "held.jsonl")}})
    train, held = split_heldout(config, dialogues)
    assert len(train) == 5 and [d.id for d in held] == ["d10", "d11"]
    tail = parse_config({"evaluation": evaluation})
    train, held = split_heldout(tail, dialogues)
    assert len(train) == 3 and [d.id for d in held] == ["d3", "d4"]
