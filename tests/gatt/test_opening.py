"""The `opening` verifier: the reply opens with the phrase's words, whatever the punctuation, and
goes on to say something."""

from __future__ import annotations

import pytest

from gatt.verifiers import check_spec, score

SPEC = {"type": "opening", "text": "Hello there, my friend."}


@pytest.mark.parametrize(
    ("reply", "value", "reason"),
    [
        ("Hello there, my friend. The museum opens at nine.", 1.0, "opens with"),
        ("hello there my friend! The museum opens at nine.", 1.0, "opens with"),
        ("**Hello there, my friend**: the museum opens at nine.", 1.0, "opens with"),
        ("Hello there, my friend.", 0.0, "then 0 word(s)"),
        ("Hello there, my friend. Nine.", 0.0, "then 1 word(s)"),
        ("Hello there, my friend. Hello there, my friend. Hi.", 0.0, "twice"),
        ("Hello there! The museum opens at nine.", 0.0, "does not open"),
        ("The museum opens at nine. Hello there, my friend.", 0.0, "does not open"),
    ],
)
def test_opening_compares_words_and_wants_more_than_the_phrase(reply, value, reason):
    got = score(SPEC, reply)
    assert got.value == value and reason in got.reason


def test_opening_words_after_can_be_set():
    assert score({**SPEC, "min_words_after": 0}, "Hello there, my friend.").value == 1.0
    assert score({**SPEC, "min_words_after": 5}, "Hello there, my friend. It opens at nine.").value == 0.0


def test_opening_spec_problems():
    assert check_spec(SPEC) == []
    assert [p.field for p in check_spec({"type": "opening", "text": "?!"})] == ["text"]
    assert check_spec({"type": "opening", "text": "🎯"}) == []
    assert [p.field for p in check_spec({**SPEC, "min_words_after": -1})] == ["min_words_after"]
    assert [p.field for p in check_spec({**SPEC, "min_words_after": 51})] == ["min_words_after"]


@pytest.mark.parametrize(
    ("reply", "value"),
    [
        ("🎯 Book the Colosseum online.", 1.0),
        ("🎯Book the Colosseum online.", 1.0),
        ("🎯🎯🎯🎯", 0.0),  # the emoji alone, repeated: what run H's regex let the model learn
        ("🎯 🎯 Book it.", 0.0),
        ("👍🏱⚕ Risotto is a type of rice dish.", 0.0),  # symbols between the emoji and the words
        ("💡 Book the Colosseum online.", 0.0),
        ("Book the Colosseum online. 🎯", 0.0),
    ],
)
def test_opening_with_an_emoji_wants_words_right_after_it(reply, value):
    spec = {"type": "opening", "text": "🎯" if "👍" not in reply else "👍"}
    assert score(spec, reply).value == value
