"""Best-of-K selection (rejection sampling): keep the reply the reward ranks highest.

For every turn the engine samples K candidate replies under the instruction-augmented context
and scores them. The best one becomes that assistant turn and is trained on; if even the best is
below the minimum reward, no candidate follows the instruction well enough and the turn is
dropped: training on it would teach the model to ignore the instruction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Selection:
    """The outcome for one turn: which candidate (if any) was chosen and how the K compared."""

    chosen: int | None  # index into the candidates; None when the turn is dropped
    best: int  # the argmax, reported even when it is below the threshold
    rewards: tuple[float, ...]
    threshold: float | None

    @property
    def accepted(self) -> bool:
        return self.chosen is not None

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    @property
    def max_reward(self) -> float:
        return self.rewards[self.best]

    @property
    def pass_rate(self) -> float:
        """Share of candidates at or above the threshold (all pass when there is none)."""
        if self.threshold is None:
            return 1.0
        return sum(r >= self.threshold for r in self.rewards) / len(self.rewards)

    @property
    def gain(self) -> float:
        """How much better the kept reply is than an average sample: what ranking buys."""
        # max >= mean always; rounding in the mean can make equal rewards look like a tiny loss.
        return max(0.0, self.max_reward - self.mean_reward)


Prefer = Literal["relevant", "shorter", "longer"]
PREFER: tuple[str, ...] = ("relevant", "shorter", "longer")


def select_best(
    rewards: Sequence[float],
    texts: Sequence[str] | None = None,
    *,
    threshold: float | None = None,
    prefer: Prefer = "shorter",
    relevance: Sequence[float] | None = None,
) -> Selection:
    """Argmax of reward with deterministic tie-breaks and an optional minimum reward.

    Among equal rewards (every passing reply ties under a 0/1 verifier with no reward model):

    - `"relevant"`: the reply most relevant to the question (`relevance`, gatt/relevance.py), then
      the longer one. The shortest passing reply of a small model is often the asked-for phrase and
      nothing else, and a longer one may be long with something off the point; relevance tells an
      answer from both. Without `relevance` this is `"longer"`.
    - `"shorter"`: the shorter reply (fewer characters that no verifier looked at).
    - `"longer"`: the longer one.

    Then the earlier candidate, so the same inputs always give the same choice. A NaN reward (a
    refused candidate or a failed scorer) never wins and counts as 0 in the statistics.
    """
    if prefer not in PREFER:
        raise ValueError(f"prefer must be one of {', '.join(map(repr, PREFER))}, not {prefer!r}")
    if not rewards:
        raise ValueError("no candidates to select from")
    if texts is not None and len(texts) != len(rewards):
        raise ValueError(f"{len(texts)} texts for {len(rewards)} rewards")
    if relevance is not None and len(relevance) != len(rewards):
        raise ValueError(f"{len(relevance)} relevance scores for {len(rewards)} rewards")
    clean = tuple(0.0 if math.isnan(r) else float(r) for r in rewards)
    valid = [i for i, r in enumerate(rewards) if not math.isnan(r)]
    order = valid or list(range(len(rewards)))
    sign = 1 if prefer == "shorter" else -1
    length = (lambda i: sign * len(texts[i])) if texts is not None else (lambda i: 0)
    if prefer == "relevant" and relevance is not None:
        # A NaN relevance (nothing to compare) ranks below every number.
        rel = [math.inf if math.isnan(r) else -float(r) for r in relevance]
        best = min(order, key=lambda i: (-clean[i], rel[i], length(i), i))
    else:
        best = min(order, key=lambda i: (-clean[i], length(i), i))
    accepted = bool(valid) and (threshold is None or clean[best] >= threshold)
    return Selection(chosen=best if accepted else None, best=best, rewards=clean, threshold=threshold)


@dataclass(frozen=True)
class SelectionStats:
    turns: int
    accepted: int
    mean_reward: float  # over all candidates of all turns
    mean_best_reward: float  # over turns: the reward of the argmax
    pass_rate: float  # over all candidates
    mean_gain: float  # over turns: best minus mean

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.turns if self.turns else 0.0

    def to_json(self) -> dict[str, float | int]:
        return {
            "turns": self.turns,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_reward": self.mean_reward,
            "mean_best_reward": self.mean_best_reward,
            "pass_rate": self.pass_rate,
            "mean_gain": self.mean_gain,
        }


def summarize(selections: Sequence[Selection]) -> SelectionStats:
    """Statistics over many turns, for job metrics and reports."""
    if not selections:
        return SelectionStats(0, 0, 0.0, 0.0, 0.0, 0.0)
    n = len(selections)
    candidates = sum(len(s.rewards) for s in selections)
    return SelectionStats(
        turns=n,
        accepted=sum(s.accepted for s in selections),
        mean_reward=sum(sum(s.rewards) for s in selections) / candidates,
        mean_best_reward=sum(s.max_reward for s in selections) / n,
        pass_rate=sum(s.pass_rate * len(s.rewards) for s in selections) / candidates,
        mean_gain=sum(s.gain for s in selections) / n,
    )
