"""Statistics of the adherence evaluation (workers/engine/evaluation.py), torch-free.

- `wilson_interval`: a 95% interval for one proportion (one turn of one condition).
- `pooled_rate`: turns 2 and later pooled, with an interval from resampling whole dialogues.
- `paired_difference` / `paired_ratio`: two reports of the same evaluation (before and after
  training) compared run by run, with a two-way cluster bootstrap.
- `compare_paired`: those, for every condition and outcome of two reports, plus the ceiling ratio
  (instruction given once after training, against every turn before it).

The paired bootstrap. The evaluation is deterministic in which instruction goes with which held-out
dialogue, so a run (a dialogue under one instruction slot, in one condition) of the "before" report
has a twin in the "after" report: the same dialogue index, slot and condition. Its outcome at turn t
(adherent, or adherent and useful) is 0/1 in each report. Runs are not independent twice over: the
runs of one dialogue share its questions, and the runs of one instruction (one custom instruction
serves every dialogue) share how easy it is to keep. So each resample draws the dialogues with
replacement and, independently, the distinct instruction texts with replacement, and takes every
run with multiplicity (its dialogue's draw count) x (its instruction's draw count), the "pigeonhole"
two-way bootstrap, conservative when either factor barely matters. The after-minus-before
difference of the rates over the cells present in both reports is recomputed per resample; the 95%
percentile interval of the 2,000 resamples (fixed seed) is the paired interval, and a difference
is called significant only when it excludes 0. Everything is vectorised (one resamples x runs weight
matrix times a runs x turns outcome matrix), so comparing two full reports takes well under a second.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "CEILING_BAR",
    "CEILING_PAIRS",
    "OUTCOMES",
    "Z_95",
    "bootstrap_interval",
    "bootstrap_rate",
    "cluster_weights",
    "compare_paired",
    "outcome_runs",
    "paired_difference",
    "paired_ratio",
    "pooled_rate",
    "rate_summary",
    "round4",
    "wilson_interval",
]

# Two-sided 95%: the 0.975 quantile of the standard normal.
Z_95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# The outcomes compared: "adherent" (the verifier passes; a copy of an earlier reply scores 0) and
# "useful" (adherent, not a copy, not an echo of the question).
OUTCOMES: tuple[str, ...] = ("adherent", "useful")
# (numerator condition after training, denominator condition before it): the instruction given once
# after GAtt against the base model's ceiling, the instruction on every turn.
CEILING_PAIRS: tuple[tuple[str, str], ...] = (("once", "every_turn"), ("once_fixed", "every_turn_fixed"))
# The target: once-given adherence after GAtt at least 90% of the base model's every-turn rate, the
# ceiling that GAtt distils (the every-turn view is what sampling sees).
CEILING_BAR = 0.9


def round4(x: float) -> float:
    return round(float(x), 4)


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion (None when n is 0).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0/n or n/n,
    which matter here: a baseline at turn 6 is often 0 of 8.
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return None
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_summary(hits: int, n: int) -> dict[str, Any]:
    """{"n", "hits", "rate", "ci"} of a count of successes (the Wilson interval)."""
    ci = wilson_interval(hits, n)
    return {
        "n": n,
        "hits": hits,
        "rate": round4(hits / n) if n else None,
        "ci": [round4(ci[0]), round4(ci[1])] if ci else None,
    }


def bootstrap_interval(
    groups: Sequence[T], statistic: Callable[[list[T]], float], resamples: int = BOOTSTRAP_RESAMPLES
) -> list[float]:
    """95% percentile interval of `statistic` over `groups` resampled with replacement (seed
    `BOOTSTRAP_SEED`): groups are whatever must be drawn whole, dialogues with all their turns."""
    rng = random.Random(BOOTSTRAP_SEED)
    values = sorted(statistic([groups[rng.randrange(len(groups))] for _ in groups]) for _ in range(resamples))
    return [values[int(0.025 * resamples)], values[int(0.975 * resamples) - 1]]


def bootstrap_rate(
    groups: Sequence[tuple[int, int]], resamples: int = BOOTSTRAP_RESAMPLES
) -> list[float] | None:
    """95% percentile interval of sum(hits) / sum(n) over (hits, n) groups resampled with
    replacement (the interval reports written since the "2+" row existed used this)."""
    if not groups:
        return None

    def rate(picked: list[tuple[int, int]]) -> float:
        total = sum(n for _, n in picked)
        return sum(h for h, _ in picked) / total if total else 0.0

    return [round4(x) for x in bootstrap_interval(groups, rate, resamples)]


def pooled_rate(
    runs: Sequence[tuple[Hashable, Sequence[bool]]], summary: dict[str, Any], *, from_turn: int = 2
) -> dict[str, Any]:
    """`summary` (a Wilson row of turns `from_turn`.. pooled) with `ci_by_dialogue` added.

    `runs` are (dialogue, outcome per turn). The turns of one dialogue are not independent (a
    model that drops the instruction at turn 3 tends to drop it at turn 4 too), so the Wilson
    interval over pooled turns is too narrow: `ci_by_dialogue` resamples whole dialogues (all
    their runs together), widened to the Wilson interval where that is wider: with no (or only)
    hits every resample gives the same rate, and the bootstrap interval would collapse to a point.
    """
    per_dialogue: dict[Hashable, tuple[int, int]] = {}
    for dialogue, outcomes in runs:
        later = list(outcomes[from_turn - 1 :])
        hits, n = per_dialogue.get(dialogue, (0, 0))
        per_dialogue[dialogue] = (hits + sum(1 for x in later if x), n + len(later))
    boot = bootstrap_rate([g for g in per_dialogue.values() if g[1]])
    if boot is not None and summary.get("ci") is not None:
        boot = [min(boot[0], summary["ci"][0]), max(boot[1], summary["ci"][1])]
    return {**summary, "ci_by_dialogue": boot}


# --------------------------------------------------------------------------------------------------
# The paired two-way cluster bootstrap


def cluster_weights(
    dialogues: Sequence[Hashable],
    instructions: Sequence[Hashable],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> np.ndarray:
    """(resamples, runs) multiplicities: dialogues and instructions drawn with replacement,
    independently; a run counts (its dialogue's draws) x (its instruction's draws) times."""
    if len(dialogues) != len(instructions):
        raise ValueError(f"{len(dialogues)} dialogue labels for {len(instructions)} instruction labels")
    rng = np.random.default_rng(seed)

    def draws(labels: Sequence[Hashable]) -> np.ndarray:
        index: dict[Hashable, int] = {}
        codes = np.array([index.setdefault(label, len(index)) for label in labels], dtype=np.int64)
        k = len(index)
        if k == 0:
            return np.zeros((resamples, 0), dtype=np.float64)
        counts = rng.multinomial(k, np.full(k, 1.0 / k), size=resamples).astype(np.float64)
        return counts[:, codes]

    return draws(dialogues) * draws(instructions)


def _rates(weights: np.ndarray, outcomes: np.ndarray, present: np.ndarray, from_turn: int) -> np.ndarray:
    """(resamples, turns + 2) rates: one per turn, then turns `from_turn`.. pooled, then all turns
    pooled; nan where a resample has no cell."""
    hits = weights @ np.where(present, outcomes, 0.0)
    n = weights @ present.astype(np.float64)

    def pooled(x: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [x, x[:, from_turn - 1 :].sum(axis=1, keepdims=True), x.sum(axis=1, keepdims=True)], axis=1
        )

    hits, n = pooled(hits), pooled(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, hits / np.where(n > 0, n, 1.0), np.nan)


def _as_matrix(rows: Sequence[Sequence[float | None]], turns: int) -> np.ndarray:
    out = np.full((len(rows), turns), np.nan)
    for i, row in enumerate(rows):
        for t, value in enumerate(row[:turns]):
            if value is not None:
                out[i, t] = float(value)
    return out


def _paired(
    before: Sequence[Sequence[float | None]],
    after: Sequence[Sequence[float | None]],
    dialogues: Sequence[Hashable],
    instructions: Sequence[Hashable],
    *,
    resamples: int,
    seed: int,
    from_turn: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not len(before) == len(after) == len(dialogues) == len(instructions):
        raise ValueError("before, after, dialogues and instructions must have one entry per run")
    turns = max((len(r) for r in [*before, *after]), default=0)
    b, a = _as_matrix(before, turns), _as_matrix(after, turns)
    present = ~np.isnan(b) & ~np.isnan(a)  # paired: only the cells both reports have
    n = present.sum(axis=0)
    n = np.append(n, [n[from_turn - 1 :].sum(), n.sum()])
    ones = np.ones((1, len(dialogues)))
    point_b = _rates(ones, b, present, from_turn)[0]
    point_a = _rates(ones, a, present, from_turn)[0]
    weights = cluster_weights(dialogues, instructions, resamples=resamples, seed=seed)
    return n, point_b, point_a, _rates(weights, b, present, from_turn), _rates(weights, a, present, from_turn)


def _interval(values: np.ndarray, level: float) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return [round4(lo), round4(hi)]


def _maybe(x: float) -> float | None:
    return None if not math.isfinite(x) else round4(x)


def _rows(n: np.ndarray, columns: list[dict[str, Any]], from_turn: int) -> dict[str, Any]:
    turns = [{"turn": t + 1, "n": int(n[t]), **columns[t]} for t in range(len(n) - 2)]
    later = {"from_turn": from_turn, "n": int(n[-2]), **columns[-2]}
    return {"turns": turns, "later_turns": later, "overall": {"n": int(n[-1]), **columns[-1]}}


def paired_difference(
    before: Sequence[Sequence[float | None]],
    after: Sequence[Sequence[float | None]],
    dialogues: Sequence[Hashable],
    instructions: Sequence[Hashable],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
    from_turn: int = 2,
) -> dict[str, Any]:
    """After - before rate per turn, over turns `from_turn`.. pooled and over all turns, with the two-way cluster
    bootstrap's percentile interval (see the module docstring).

    `before[r][t]` / `after[r][t]` are run r's outcome (0/1, None or missing: not run) at turn
    t + 1 in the two reports; only the cells present in both count (`n`). `significant` is True when
    the interval excludes 0.
    """
    n, pb, pa, rb, ra = _paired(
        before, after, dialogues, instructions, resamples=resamples, seed=seed, from_turn=from_turn
    )
    diffs = ra - rb
    columns = []
    for t in range(len(n)):
        ci = _interval(diffs[:, t], level)
        columns.append(
            {
                "before": _maybe(pb[t]),
                "after": _maybe(pa[t]),
                "diff": _maybe(pa[t] - pb[t]),
                "ci": ci,
                "significant": ci is not None and (ci[0] > 0 or ci[1] < 0),
            }
        )
    return _rows(n, columns, from_turn)


def paired_ratio(
    denominator: Sequence[Sequence[float | None]],
    numerator: Sequence[Sequence[float | None]],
    dialogues: Sequence[Hashable],
    instructions: Sequence[Hashable],
    *,
    bar: float = CEILING_BAR,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
    from_turn: int = 2,
) -> dict[str, Any]:
    """numerator rate / denominator rate per turn (and pooled), paired and resampled like
    `paired_difference`. `meets_bar`: the ratio is >= `bar`; `ci_above_bar`: its interval's lower
    end is (meets_bar compares numerator >= bar x denominator, so it is decided even where the
    denominator rate is 0). Resamples with a denominator rate of 0 have no ratio and are left out (`undefined`)."""
    n, pd, pn, rd, rn = _paired(
        denominator, numerator, dialogues, instructions, resamples=resamples, seed=seed, from_turn=from_turn
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.where(rd > 0, rn / np.where(rd > 0, rd, 1.0), np.nan)
    columns = []
    for t in range(len(n)):
        point = pn[t] / pd[t] if math.isfinite(pd[t]) and pd[t] > 0 else math.nan
        # numerator >= bar x denominator: also decided when the denominator rate is 0.
        meets = bool(math.isfinite(pn[t]) and math.isfinite(pd[t]) and pn[t] >= bar * pd[t])
        ci = _interval(ratios[:, t], level)
        columns.append(
            {
                "numerator": _maybe(pn[t]),
                "denominator": _maybe(pd[t]),
                "ratio": _maybe(point),
                "ci": ci,
                "meets_bar": meets,
                "ci_above_bar": ci is not None and ci[0] >= bar,
                "undefined": int(np.count_nonzero(~np.isfinite(ratios[:, t]))),
            }
        )
    return _rows(n, columns, from_turn)


# --------------------------------------------------------------------------------------------------
# Two reports


def outcome_runs(
    report: Mapping[str, Any], condition: str, outcome: str
) -> dict[tuple[int, int], Any] | None:
    """{(dialogue, slot): (instruction text, [0/1 per turn])} from a report's transcripts, or None
    when the report lacks them (reports written before the outcome existed)."""
    transcripts = (report.get("transcripts") or {}).get(condition)
    if transcripts is None:
        return None
    threshold = report["config"]["pass_threshold"]
    out = {}
    for t in transcripts:
        if outcome == "adherent":
            values = [1.0 if s >= threshold else 0.0 for s in t["scores"]]
        elif outcome == "useful":
            if "useful" not in t:
                return None
            values = [1.0 if u else 0.0 for u in t["useful"]]
        else:
            raise ValueError(f"unknown outcome {outcome!r}; use one of {OUTCOMES}")
        out[(t["dialogue"], t.get("slot", 0))] = (t["instruction"]["text"], values)
    return out


def _pair(
    before: Mapping[tuple[int, int], Any], after: Mapping[tuple[int, int], Any]
) -> tuple[list[Any], list[Any], list[int], list[str], int]:
    keys = sorted(set(before) & set(after))
    mismatched = sum(1 for k in keys if before[k][0] != after[k][0])
    return (
        [before[k][1] for k in keys],
        [after[k][1] for k in keys],
        [k[0] for k in keys],
        [before[k][0] for k in keys],
        mismatched,
    )


def compare_paired(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    bar: float = CEILING_BAR,
) -> dict[str, Any]:
    """The paired comparison of two reports (see the module docstring).

    Returns {"method", "resamples", "seed", "level", "outcomes": {outcome: {condition: {"runs",
    "dialogues", "instructions", "mismatched_instructions", "turns": [...], "later_turns": {...}}}},
    "ceiling": {"once/every_turn": {outcome: {... "turns": [{"ratio", "ci", "meets_bar", ...}],
    "done"}}}}. A condition or outcome missing from either report (older reports) is left out.
    `done` is the issue's bar: the ratio is >= `bar` at every turn from 2 on (`done_ci`: its
    interval's lower end is, at every such turn).
    """
    conditions = [c for c in before.get("conditions", {}) if c in after.get("conditions", {})]
    outcomes: dict[str, Any] = {}
    for outcome in OUTCOMES:
        for condition in conditions:
            b, a = outcome_runs(before, condition, outcome), outcome_runs(after, condition, outcome)
            if b is None or a is None:
                continue
            rows_b, rows_a, dialogues, instructions, mismatched = _pair(b, a)
            if not dialogues:
                continue
            result = paired_difference(
                rows_b, rows_a, dialogues, instructions, resamples=resamples, seed=seed
            )
            outcomes.setdefault(outcome, {})[condition] = {
                "runs": len(dialogues),
                "dialogues": len(set(dialogues)),
                "instructions": len(set(instructions)),
                "mismatched_instructions": mismatched,
                **result,
            }
    ceiling: dict[str, Any] = {}
    for numerator, denominator in CEILING_PAIRS:
        for outcome in OUTCOMES:
            b = outcome_runs(before, denominator, outcome)
            a = outcome_runs(after, numerator, outcome)
            if b is None or a is None:
                continue
            rows_b, rows_a, dialogues, instructions, mismatched = _pair(b, a)
            if not dialogues:
                continue
            result = paired_ratio(
                rows_b, rows_a, dialogues, instructions, bar=bar, resamples=resamples, seed=seed
            )
            later = [row for row in result["turns"] if row["turn"] >= 2]
            ceiling.setdefault(f"{numerator}/{denominator}", {})[outcome] = {
                "numerator": f"{numerator}, after",
                "denominator": f"{denominator}, before",
                "runs": len(dialogues),
                "mismatched_instructions": mismatched,
                **result,
                "done": bool(later) and all(row["meets_bar"] for row in later),
                "done_ci": bool(later) and all(row["ci_above_bar"] for row in later),
            }
    return {
        "method": (
            "paired two-way cluster bootstrap: dialogues and instruction texts resampled with "
            "replacement, independently; 95% percentile interval"
        ),
        "resamples": resamples,
        "seed": seed,
        "level": 0.95,
        "bar": bar,
        "outcomes": outcomes,
        "ceiling": ceiling,
    }
