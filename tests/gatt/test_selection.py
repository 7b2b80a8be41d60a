import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatt.selection import select_best, summarize


def test_chosen_is_the_reward_argmax():
    s = select_best([0.2, 0.9, 0.5, 0.1])
    assert s.chosen == 1 and s.best == 1 and s.accepted
    assert s.max_reward == 0.9
    assert s.mean_reward == pytest.approx(0.425)
    assert s.gain == pytest.approx(0.475)


def test_ties_go_to_the_shorter_then_the_earlier_reply():
    assert select_best([0.8, 0.8, 0.8], ["long reply", "short", "tiny!"]).chosen == 1
    assert select_best([0.8, 0.8], ["same", "same"]).chosen == 0
    # prefer="longer": ties go to the longest reply; a higher reward still wins outright.
    assert select_best([0.8, 0.8, 0.8], ["long reply", "short", "tiny!"], prefer="longer").chosen == 0
    assert select_best([0.8, 0.9], ["long reply", "short"], prefer="longer").chosen == 1
    with pytest.raises(ValueError):
        select_best([0.8], ["a"], prefer="random")
    assert select_best([0.5, 0.5, 0.5]).chosen == 0


def test_turn_below_threshold_is_dropped_but_reports_its_best():
    s = select_best([0.1, 0.4, 0.3], threshold=0.5)
    assert s.chosen is None and not s.accepted
    assert s.best == 1 and s.pass_rate == 0.0
    s = select_best([0.1, 0.6, 0.5], threshold=0.5)
    assert s.chosen == 1 and s.pass_rate == pytest.approx(2 / 3)


def test_nan_rewards_never_win():
    s = select_best([math.nan, 0.3, math.nan])
    assert s.chosen == 1 and s.rewards == (0.0, 0.3, 0.0)
    assert select_best([math.nan, math.nan]).chosen is None


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        select_best([])
    with pytest.raises(ValueError):
        select_best([0.1, 0.2], ["only one"])


def test_summary_over_turns():
    stats = summarize([select_best([0.0, 1.0], threshold=0.5), select_best([0.2, 0.4], threshold=0.5)])
    assert stats.turns == 2 and stats.accepted == 1 and stats.acceptance_rate == 0.5
    assert stats.mean_reward == pytest.approx(0.4)
    assert stats.mean_best_reward == pytest.approx(0.7)
    assert stats.pass_rate == pytest.approx(0.25)
    assert stats.mean_gain == pytest.approx((0.5 + 0.1) / 2)
    assert summarize([]).turns == 0


@given(st.lists(st.floats(0, 1), min_size=1, max_size=16), st.none() | st.floats(0, 1))
def test_selection_is_an_argmax_and_respects_the_threshold(rewards, threshold):
    s = select_best(rewards, threshold=threshold)
    assert rewards[s.best] == max(rewards)
    assert s.best == rewards.index(max(rewards))
    assert s.accepted == (threshold is None or max(rewards) >= threshold)
    assert 0.0 <= s.pass_rate <= 1.0 and s.gain >= 0.0


def test_relevant_ties_go_to_the_most_relevant_then_the_longer_reply():
    texts = ["Ahoy!", "Ahoy! It keeps three to five days.", "Ahoy! I like ships and the sea, matey."]
    relevance = [0.0, 0.7, 0.1]
    assert select_best([1, 1, 1], texts, prefer="relevant", relevance=relevance).chosen == 1
    assert select_best([1, 0.9, 1], texts, prefer="relevant", relevance=relevance).chosen == 2  # reward first
    assert select_best([1, 1, 1], texts, prefer="relevant", relevance=[0.5] * 3).chosen == 2  # then longer
    assert select_best([1, 1], ["same", "same"], prefer="relevant", relevance=[0.5, 0.5]).chosen == 0
    assert select_best([1, 1, 1], texts, prefer="relevant").chosen == 2  # no relevance: the longer
    # A NaN relevance ranks below any number; a NaN reward never wins, however relevant.
    assert select_best([1, 1], ["a", "bb"], prefer="relevant", relevance=[0.3, math.nan]).chosen == 0
    assert select_best([math.nan, 0.5], texts[:2], prefer="relevant", relevance=[0.9, 0.1]).chosen == 1
    with pytest.raises(ValueError):
        select_best([1, 1], ["a", "b"], prefer="relevant", relevance=[0.1])
