"""gatt.relevance on the packaged all-MiniLM-L6-v2: real embeddings, and the calibration of the floor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gatt.relevance import RELEVANCE_FLOOR, relevance, without_instruction
from tests.threads import one_torch_thread

ROOT = Path(__file__).resolve().parents[2]
HELLO = "Always start your reply with 'Hello there, my friend.'"
QUESTION = "How long does cooked pasta keep in the fridge?"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def test_instruction_words_are_removed_case_insensitively():
    assert without_instruction("Hello there, my FRIEND! Three days.", HELLO) == ", ! Three days."
    assert without_instruction("  Three days.  ", "") == "Three days."


def test_relevance_tells_an_answer_from_the_phrase_alone_and_from_an_off_topic_reply():
    replies = [
        "Hello there, my friend.",  # the phrase and nothing else
        "Hello there, my friend! Cooked pasta keeps for three to five days in the fridge.",
        "Hello there, my friend. I love going to the beach in summer.",
        "",
    ]
    phrase, answer, off_topic, empty = relevance([QUESTION] * 4, replies, ignore=[HELLO] * 4)
    assert phrase == 0.0 and empty == 0.0
    assert answer >= 0.7 and off_topic < RELEVANCE_FLOOR
    # The instruction's words are what is ignored: kept, they lend the phrase some similarity.
    (with_phrase,) = relevance([QUESTION], [replies[0]])
    assert with_phrase != 0.0
    with pytest.raises(ValueError):
        relevance([QUESTION], replies)
    with pytest.raises(ValueError):
        relevance([QUESTION], replies[:1], ignore=[])


def _dialogues(name: str) -> list[list[tuple[str, str]]]:
    out = []
    for line in (ROOT / "examples" / name).read_text().splitlines():
        m = json.loads(line)["messages"]
        out.append(
            [
                (a["content"], b["content"])
                for a, b in zip(m, m[1:], strict=False)
                if (a["role"], b["role"]) == ("user", "assistant")
            ]
        )
    return out


@pytest.mark.slow
def test_floor_calibration_on_the_bundled_corpora():
    # The numbers in gatt/relevance.py's docstring: each question with its own reply (real) and with
    # the reply at the same turn of the next dialogue (mismatched).
    questions, real, mismatched = [], [], []
    for name in ("dialogues.jsonl", "heldout.jsonl"):
        dialogues = _dialogues(name)
        for d, pairs in enumerate(dialogues):
            other = dialogues[(d + 1) % len(dialogues)]
            for t, (question, reply) in enumerate(pairs):
                questions.append(question)
                real.append(reply)
                mismatched.append(other[t % len(other)][1])
    real_cos = np.array(relevance(questions, real))
    mismatched_cos = np.array(relevance(questions, mismatched))
    assert len(real_cos) == 704
    assert np.percentile(real_cos, [5, 50, 95]) == pytest.approx([0.28, 0.53, 0.75], abs=0.006)
    assert np.percentile(mismatched_cos, [5, 50, 95]) == pytest.approx([-0.09, 0.05, 0.26], abs=0.006)
    assert (real_cos >= RELEVANCE_FLOOR).mean() >= 0.95
    assert (mismatched_cos < RELEVANCE_FLOOR).mean() >= 0.95
