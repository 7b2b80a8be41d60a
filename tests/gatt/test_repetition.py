from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatt.repetition import DEFAULT_MAX_ECHO, Repeat, closest_earlier, echo_share, is_repeat, similarity

ROOT = Path(__file__).resolve().parents[2]


def test_similarity_of_copies_and_of_replies_that_only_share_an_opening():
    assert similarity("Ahoy! Rome is lovely.", "ahoy rome is LOVELY") == 1.0
    shared_opening = similarity(
        "Ahoy! Start with the Pantheon and the Forum.", "Ahoy! Book the Colosseum tickets online."
    )
    assert 0.0 < shared_opening < 0.5
    assert similarity("", "") == 1.0 and similarity("", "words") == 0.0


def test_closest_earlier_reply_and_the_threshold():
    earlier = ["Pasta with garlic.", "Ahoy! Add chili flakes.", "Ahoy! Add chili flakes."]
    assert closest_earlier("Ahoy! Add chili flakes!", earlier) == Repeat(1.0, 2)  # the latest tie
    assert closest_earlier("anything", []) == Repeat(0.0, None)
    near = "Ahoy! Add some chili flakes."  # one word more: 2 * 4 / 9
    assert similarity(near, earlier[1]) == pytest.approx(8 / 9)
    assert is_repeat(near, earlier, 0.8) and not is_repeat(near, earlier, 0.9)
    assert not is_repeat(near, earlier, None) and not is_repeat(near, [], 0.8)
    assert Repeat(0.123456, 1).to_json() == {"similarity": 0.1235, "turn": 1}


def test_emoji_are_tokens_so_different_emoji_replies_are_not_copies():
    # An emoji instruction ("start with 😊") must be keepable past the first turn.
    assert similarity("😊", "🎉") == 0.0
    assert similarity("😊", "🎉 Sure thing") == 0.0
    assert similarity("😊 Sure", "🎉 sure!") == 0.5
    assert similarity("😊😊", "😊😊") == 1.0  # the same emoji-only reply is still a copy
    assert not is_repeat("🎉", ["😊"], 0.8) and is_repeat("😊", ["😊"], 0.8)
    # Punctuation is still no token.
    assert similarity("?!", "...") == 1.0 and similarity("Rome!", "rome?") == 1.0


QUESTION = "How long can cooked pasta keep in the fridge?"
HELLO = "Always start your reply with 'Hello there, my friend.'"


def test_echo_share_of_echoes_and_of_answers():
    echoes = [
        "Hello there, my friend. How long can cooked pasta keep in the fridge? I'd love to know.",
        "Hello there, my friend. How long can cooked pasta stay in the fridge? Let me think.",
        "How long can cooked pasta keep in the fridge?",
    ]
    shares = [echo_share(reply, QUESTION, ignore=HELLO) for reply in echoes]
    assert shares == [1.0, pytest.approx(8 / 9), 1.0]
    assert min(shares) >= DEFAULT_MAX_ECHO
    # The instruction's phrase plus a few words hid this echo from the whole-reply similarity.
    assert similarity(echoes[0], QUESTION) < 0.8
    # A correct answer reuses the question's nouns ("cooked pasta", "in the fridge"): 5 of 9 words.
    answer = "Cooked pasta keeps for three to five days in the fridge."
    share = echo_share(answer, "How long does cooked pasta keep in the fridge?")
    assert share == pytest.approx(5 / 9) and share < DEFAULT_MAX_ECHO
    assert echo_share("Hello there, my friend. " + answer, QUESTION, ignore=HELLO) < DEFAULT_MAX_ECHO


def test_echo_share_counts_runs_not_single_words():
    assert echo_share("Pasta is fine in a fridge for days.", QUESTION) == 0.0  # single words only
    assert echo_share("Paris.", "Paris?") == 1.0  # a one-word question counts a one-word match
    assert echo_share("Sure, Paris.", "Paris?", ignore="Paris") == 0.0  # nothing left to echo
    assert echo_share("", QUESTION) == 0.0 and echo_share("Anything", "") == 0.0
    # Words of the instruction are removed first, so the required phrase makes no echo by itself.
    assert echo_share("Hello there, my friend. Fine.", "Hello there, my friend!", ignore=HELLO) == 0.0


def _corpus_pairs(name: str) -> list[tuple[str, str]]:
    pairs = []
    for line in (ROOT / "examples" / name).read_text().splitlines():
        messages = json.loads(line)["messages"]
        pairs += [
            (a["content"], b["content"])
            for a, b in zip(messages, messages[1:], strict=False)
            if a["role"] == "user" and b["role"] == "assistant"
        ]
    return pairs


def test_real_answers_of_the_corpora_are_well_below_the_echo_threshold():
    for name, expected_max in (("dialogues.jsonl", 5 / 9), ("heldout.jsonl", 5 / 8)):
        shares = sorted(echo_share(reply, question) for question, reply in _corpus_pairs(name))
        assert shares[-1] == pytest.approx(expected_max)  # the comment at DEFAULT_MAX_ECHO says so
        assert shares[-1] <= DEFAULT_MAX_ECHO - 0.1
        assert shares[int(0.95 * len(shares))] < 0.3
