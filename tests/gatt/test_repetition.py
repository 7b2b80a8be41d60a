from __future__ import annotations

import pytest

from gatt.repetition import Repeat, closest_earlier, is_repeat, similarity


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
