"""The whole job's progress and ETA (workers/engine/progress.py), on a clock the test moves.

The expected figures are worked out by hand from the plan's rules: phases weigh the generated
tokens the estimate bounds them to, training TRAIN_EXAMPLE_TOKENS per example-epoch.
"""

from __future__ import annotations

import pytest

from workers.engine.config import parse_options
from workers.engine.progress import EVAL_TOKEN_COST, TRAIN_EXAMPLE_TOKENS, JobProgress, plan

# 10 sampled turns, K=4 x 48 tokens each; the evaluation's 800 tokens are both models'.
ESTIMATE = {"sampled_turns": 10, "sampling_tokens": 1920, "evaluation_tokens": 800, "values_tokens": 0}
OPTIONS = parse_options(
    {
        "sampling": {"k": 4, "max_new_tokens": 48},
        "evaluation": {"enabled": True},
        "training": {"epochs": 2, "micro_batch_size": 4},
    }
)
TRAIN = 10 * 2 * TRAIN_EXAMPLE_TOKENS  # 10 examples, 2 epochs
EVAL = 400 * EVAL_TOKEN_COST  # half of the 800 evaluation tokens each time
TOTAL = 1 + 1920 + EVAL + TRAIN + EVAL  # synthesis bounds nothing and weighs one token


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def progress(estimate=ESTIMATE, options=OPTIONS) -> tuple[JobProgress, Clock]:
    clock = Clock()
    return JobProgress(options, plan(options, estimate), clock=clock), clock


def test_the_plan_weighs_each_stage_by_its_bound():
    phases = plan(OPTIONS, ESTIMATE)
    assert [(p.stage, p.units) for p in phases] == [
        ("synthesize", 1),
        ("sample", 1920),
        ("evaluate", EVAL),
        ("train", TRAIN),
        ("evaluate", EVAL),
    ]
    # Replay and both histories train more examples; no evaluation, no evaluate phases.
    more = parse_options(
        {
            "data": {"train_history": "both", "replay": 0.5},
            "evaluation": {"enabled": False},
            "training": {"epochs": 1},
        }
    )
    assert [(p.stage, p.units) for p in plan(more, ESTIMATE)] == [
        ("synthesize", 1),
        ("sample", 1920),
        ("train", 10 * 2 * 1.5 * TRAIN_EXAMPLE_TOKENS),
    ]
    # max_steps fixes the examples: steps x micro-batch x accumulation.
    steps = parse_options({"training": {"max_steps": 3, "micro_batch_size": 2, "grad_accum": 2}})
    assert [p.units for p in plan(steps, ESTIMATE) if p.stage == "train"] == [
        3 * 2 * 2 * TRAIN_EXAMPLE_TOKENS
    ]
    # A job stored before estimates: every phase weighs the same.
    assert {p.units for p in plan(OPTIONS, None)} == {1.0}


def test_each_round_samples_and_trains_its_share_and_the_base_is_evaluated_once():
    # The estimate counts both rounds' sampled turns (cost.py): 10 per round here.
    rounds = parse_options({**OPTIONS.to_json(), "rounds": {"count": 2}})
    estimate = {**ESTIMATE, "sampled_turns": 20, "sampling_tokens": 3840}
    assert [(p.stage, p.units) for p in plan(rounds, estimate)] == [
        ("synthesize", 1),
        ("sample", 1920),
        ("evaluate", EVAL),
        ("train", TRAIN),
        ("sample", 1920),
        ("train", TRAIN),
        ("evaluate", EVAL),
    ]
    # max_steps is per round: each round trains them.
    steps = parse_options({"training": {"max_steps": 3, "micro_batch_size": 2}, "rounds": {"count": 2}})
    assert [p.units for p in plan(steps, estimate) if p.stage == "train"] == [
        3 * 2 * TRAIN_EXAMPLE_TOKENS
    ] * 2
    # Tokens instead of examples: micro_batch_tokens over a GAtt example's assumed length.
    tokens = parse_options({"training": {"max_steps": 3, "micro_batch_tokens": 4000}})
    assert [p.units for p in plan(tokens, estimate) if p.stage == "train"] == [3 * 10 * TRAIN_EXAMPLE_TOKENS]


def test_fraction_and_eta_follow_the_measured_rates():
    p, clock = progress()
    assert (p.fraction, p.eta_s) == (0.0, None)
    p.stage("synthesize")
    p.stage("sample")
    assert p.fraction == pytest.approx(1 / TOTAL)
    p.report("sample", 0, 10)
    assert p.eta_s is None  # nothing timed yet
    clock.t += 10
    p.report("sample", 5, 10)
    assert p.fraction == pytest.approx((1 + 960) / TOTAL)
    # 960 units in 10 s: the other half of sampling takes 10 s, the phases after it at that rate.
    assert p.eta_s == pytest.approx(10 + (EVAL + TRAIN + EVAL) * 10 / 960)

    p.report("sample", 10, 10)
    p.stage("evaluate")
    clock.t += 5  # loading and ranking between stages count in the attempt's rate, not the phase's
    p.report("evaluate", 0, 4)
    clock.t += 2
    p.report("evaluate", 2, 4)  # half the phase in 2 s: this phase's rate
    attempt_rate = 17 / (1920 + EVAL / 2)
    assert p.eta_s == pytest.approx(2 + (TRAIN + EVAL) * attempt_rate)
    p.report("attention", 1, 8)  # another stage's units: the bar does not move
    assert p.fraction == pytest.approx((1 + 1920 + EVAL / 2) / TOTAL)


def test_training_is_reweighed_from_its_steps_and_the_bar_never_goes_back():
    p, clock = progress()
    for stage in ("synthesize", "sample", "evaluate"):
        p.stage(stage)
    before = p.fraction
    p.stage("train")
    p.report("train", 0, 20)  # 20 steps x 4 examples: 80 example-epochs, four times the bound's
    assert p.phases[3].units == 20 * 4 * TRAIN_EXAMPLE_TOKENS
    assert p.fraction >= before  # the heavier phase lowers the computed figure; the shown one holds
    clock.t += 30
    p.report("train", 10, 20)
    assert p.eta_s == pytest.approx(30 + EVAL * 30 / (10 * 4 * TRAIN_EXAMPLE_TOKENS))
    p.stage("evaluate")  # the second evaluation, after training
    assert p.index == 4
    p.stage("done")
    assert (p.fraction, p.eta_s) == (1.0, 0.0)


def test_a_resumed_attempt_counts_skipped_work_as_done_but_not_as_timed():
    p, clock = progress()
    p.stage("synthesize")
    p.stage("sample")
    p.report("sample", 8, 10)  # eight dialogues were sampled by the attempt before
    assert p.fraction == pytest.approx((1 + 1536) / TOTAL)
    assert p.eta_s is None
    clock.t += 4
    p.report("sample", 9, 10)  # 192 units in 4 s
    assert p.eta_s == pytest.approx(4 + (EVAL + TRAIN + EVAL) * 4 / 192)
