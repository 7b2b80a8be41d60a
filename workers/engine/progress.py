"""One progress figure and one ETA for a whole job, from the progress its stages report.

Each stage reports progress in its own units: dialogues sampled, turns of evaluation chunks,
optimiser steps. To add them up, the job is planned as phases (synthesize, sample, evaluate the base model,
train, evaluate the trained one) weighed in one unit: a generated token at its longest, as
`workers/engine/cost.py` bounds them before the job is queued, at sampling's cost per token.
Sampling weighs its bound; each evaluation half of the evaluation's, times what an evaluation token
costs against a sampling one (`EVAL_TOKEN_COST`: one reply per prompt, not K sharing a prefill);
training its examples times what one example costs to train (`TRAIN_EXAMPLE_TOKENS`). Both are
measured on the embedded model (docs/benchmarks.md, "Whole-job progress"). Training's weight is
refined when it starts and its steps are known.

The ETA is measured, not guessed: the current phase's remaining units at the rate that phase has
shown, plus the later phases' units at the rate the whole attempt has shown (time since its first
report over the units it did). None until some work has been timed. Work a resumed attempt skips
(a phase whose first report is already part-way done) counts as done but not as timed.

Torch-free and clock-injected: the worker's hooks call it, tests drive it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from workers.engine.config import JobOptions, TrainConfig

# Training one example for one epoch (forward and backward over a dialogue of a few hundred tokens)
# costs about as much time as sampling this many tokens at their bound; an evaluation token about
# this many sampling tokens. Measured on the embedded model on 2 CPU cores (docs/benchmarks.md,
# "Whole-job progress": 175-260 and 4-6 on two job sizes); a GPU's ratios differ, which moves the
# bar's split between phases but not the measured rate of the phase in hand.
TRAIN_EXAMPLE_TOKENS = 200.0
DPO_PAIR_EXAMPLES = 2.5  # examples' worth of training per DPO pair (`_item_cost`)
EXAMPLE_LENGTH = 400  # tokens of a GAtt example, to count the examples of `micro_batch_tokens`
EVAL_TOKEN_COST = 5.0
# A phase that bounds no generated tokens (synthesis without the model's own value lists) still
# takes some time; this keeps it on the bar.
MIN_PHASE_TOKENS = 1.0


@dataclass
class Phase:
    stage: str
    units: float


def plan(options: JobOptions, estimate: Mapping[str, Any] | None) -> list[Phase]:
    """The phases of a job with `options`, weighed from its `estimate` (`Cost.to_json()`; None
    for a job stored before estimates: the phases then weigh the same)."""
    e = estimate or {}
    evaluation = e.get("evaluation_tokens", 0) / 2 * EVAL_TOKEN_COST
    rounds = options.rounds.count
    phases = [Phase("synthesize", e.get("values_tokens", 0))]
    # The estimate counts every round's sampling; each round trains on what it sampled.
    train_units = _train_examples(options, e.get("sampled_turns", 0)) * _item_cost(options.training.objective)
    for r in range(rounds):
        phases.append(Phase("sample", e.get("sampling_tokens", 0) / rounds))
        if r == 0 and options.evaluation.enabled:
            phases.append(Phase("evaluate", evaluation))  # the base model, before the first training
        phases.append(Phase("train", train_units / rounds))
    if options.evaluation.enabled:
        phases.append(Phase("evaluate", evaluation))
    if not estimate:
        for p in phases:
            p.units = 1.0
    for p in phases:
        p.units = max(p.units, MIN_PHASE_TOKENS)
    return phases


def _train_examples(options: JobOptions, sampled_turns: int) -> float:
    """Example-epochs training will do over all rounds, bounded as the estimate bounds tokens: every
    sampled turn kept, as often as `data.train_history` and `data.replay` repeat it."""
    views = 2 if options.data.train_history == "both" else 1
    examples = sampled_turns * views * (1 + options.data.replay)
    training = options.training
    if training.max_steps is not None:
        return (
            training.max_steps * _micro_batch_examples(training) * training.grad_accum * options.rounds.count
        )
    return examples * training.epochs


def _micro_batch_examples(training: TrainConfig) -> float:
    if training.micro_batch_tokens is None:
        return training.micro_batch_size
    return max(1.0, training.micro_batch_tokens / EXAMPLE_LENGTH)


def _item_cost(objective: str) -> float:
    """What one training item (an example, or a DPO pair) costs, in sampling tokens."""
    # A DPO pair trains two replies, after one forward pass of both for the reference: about 2.5
    # examples by the count of passes (not measured).
    return TRAIN_EXAMPLE_TOKENS * (1.0 if objective == "sft" else DPO_PAIR_EXAMPLES)


class JobProgress:
    """Feed it the stage changes and the stage progress of one attempt; read `fraction` and `eta_s`."""

    def __init__(self, options: JobOptions, phases: list[Phase], clock: Callable[[], float] = time.monotonic):
        self.options = options
        self.phases = phases
        self.clock = clock
        self.index = -1  # the phase in progress; -1 before the first, len(phases) once done
        self.done = 0.0  # of the phase in progress, 0 to 1
        self.shown = 0.0  # the fraction never goes back within an attempt
        self._started: float | None = None  # the attempt's first report
        self._timed = 0.0  # units done since then, skipped work excluded
        self._phase_start: tuple[float, float] | None = None  # (time, done) of the phase's first report

    @property
    def total(self) -> float:
        return sum(p.units for p in self.phases)

    def stage(self, name: str) -> None:
        """A stage starts: the next phase of that name (`evaluate` comes twice); any other name
        (`done`) ends the plan."""
        later = (i for i in range(self.index + 1, len(self.phases)) if self.phases[i].stage == name)
        self.index = next(later, len(self.phases))
        self.done, self._phase_start = 0.0, None

    def report(self, stage: str, done: int, total: int) -> None:
        """`done` of `total` units of `stage`; reports of another stage than the phase in progress
        (the evaluation's attention pass) do not move the bar."""
        if not 0 <= self.index < len(self.phases) or self.phases[self.index].stage != stage or total <= 0:
            return
        phase = self.phases[self.index]
        now, fraction = self.clock(), min(done / total, 1.0)
        if self._phase_start is None:
            if stage == "train":  # its steps are known now
                phase.units = max(self._steps_units(total), MIN_PHASE_TOKENS)
            self._phase_start = (now, fraction)
            if self._started is None:
                self._started = now
        else:
            self._timed += max(fraction - self.done, 0.0) * phase.units
        self.done = fraction

    def _steps_units(self, steps: int) -> float:
        training = self.options.training
        return steps * _micro_batch_examples(training) * training.grad_accum * _item_cost(training.objective)

    @property
    def fraction(self) -> float:
        """The whole job's progress, 0 to 1."""
        if self.index >= len(self.phases):
            return 1.0
        before = sum(p.units for p in self.phases[: max(self.index, 0)])
        current = self.phases[self.index].units * self.done if self.index >= 0 else 0.0
        self.shown = max(self.shown, min((before + current) / self.total, 1.0))
        return self.shown

    @property
    def eta_s(self) -> float | None:
        """Seconds left for the whole job, from the rates measured so far; None before any."""
        if self.index >= len(self.phases):
            return 0.0
        if self._started is None or self._timed <= 0 or self.index < 0:
            return None
        now = self.clock()
        overall = (now - self._started) / self._timed  # seconds per unit, over the whole attempt
        phase = self.phases[self.index]
        rate = overall
        if self._phase_start is not None:
            t0, d0 = self._phase_start
            if self.done > d0:
                rate = (now - t0) / ((self.done - d0) * phase.units)
        left = (1.0 - self.done) * phase.units * rate
        left += sum(p.units for p in self.phases[self.index + 1 :]) * overall
        return left if math.isfinite(left) else None
