"""Multi-turn adherence: does an instruction given once still hold at turn t?

The measurement behind the paper's Table 30 (share of turns where the attribute is respected,
baseline against GAtt) and the later multi-turn benchmarks (Multi-IF, SysBench): run held-out
dialogues turn by turn with the model's *own* replies as context, and score every reply with the
instruction's verifiers. Three conditions differ only in where the instruction is:

- `"once"`: only in the first user turn (or the system message), exactly as GAtt trains
  (`gatt.augment.plain_messages`). This is what GAtt should improve.
- `"every_turn"`: attached to every user turn (`sampling_messages`), the view GAtt samples from:
  the ceiling the "once" condition is compared with.
- `"none"`: no instruction at all (optional): the floor, how often a reply satisfies the verifier
  by chance (a topic mention, a language the model speaks anyway).

A turn *adheres* when its score (`score_all_batch(instruction.verifiers, ...)`, aggregated with the
instruction's `aggregate`) is >= `pass_threshold`. Rates carry a 95% Wilson interval: with 8-16
dialogues per turn a normal-approximation interval would be badly off near 0 and 1. The turns of
one dialogue are not independent, so the pooled "overall" interval is optimistic; the per-turn
intervals are the ones to read.

Choices the paper leaves open, and ours:

- Replies are greedy by default (`temperature` 0), so two evaluations of the same model on the
  same dialogues and instructions give the same replies, and before/after differences are the
  model's, not the sampler's.
- A reply is scored as generated (stripped). A reply cut by `max_new_tokens` is kept whole in the
  context and scored as is (`truncated` counts them per turn): trimming it to its last sentence,
  as the training stage does, would score an empty reply for a long first sentence.
- A dialogue stops when its next prompt plus `max_new_tokens` would not fit the model's context
  (or `max_context`); the turns not run are reported as `context_cut_turns` and are simply absent
  from the later turns' `n`.
- Per family: every constraint of an instruction is scored on its own (its verifiers, the
  instruction's aggregate), so "Speak in French. You enjoy chess." counts once for `language`
  and once for `hobby` at each turn.
- A reply that copies an earlier reply of its dialogue (`max_repeat_similarity`, default 0.8 on
  gatt/repetition.py's word-sequence similarity) scores 0 and is counted in `repeats`: a model
  that repeats its last answer whatever the user asks has not kept the instruction, even when the
  copy opens with the asked-for phrase.

Everything returned is JSON-serialisable. This module imports torch only inside
`evaluate_adherence`, so `EvalConfig` and the statistics can be imported anywhere.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gatt.augment import Placement, plain_messages, sampling_messages
from gatt.instructions import Instruction, InstructionSet, synthesize
from gatt.repetition import DEFAULT_MAX_SIMILARITY, closest_earlier
from gatt.verifiers import score_all_batch

__all__ = [
    "CONDITIONS",
    "EVAL_SEED_OFFSET",
    "EvalConfig",
    "check_overlap",
    "compare",
    "condition_messages",
    "evaluate_adherence",
    "eval_instructions",
    "format_table",
    "wilson_interval",
]

CONDITIONS: tuple[str, ...] = ("none", "once", "every_turn")
# Evaluation instructions are drawn with the training seed plus this, so that with the default
# instruction set they are (mostly) other combinations than the ones trained on.
EVAL_SEED_OFFSET = 1000
# Two-sided 95%: the 0.975 quantile of the standard normal.
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class EvalConfig:
    turns: int = 8  # user turns per dialogue, at most
    dialogues: int | None = None  # held-out dialogues to use (the first n); None: all
    # Instructions per dialogue: dialogue i is run with instructions[i * m + j], j < m (cycling
    # through the list when it is shorter, so one custom instruction serves every dialogue).
    instructions_per_dialogue: int = 1
    conditions: tuple[str, ...] = ("once", "every_turn")
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy (deterministic)
    top_p: float = 1.0  # only used when temperature > 0
    pass_threshold: float = 0.5  # a turn adheres when its score >= this
    batch_prompts: int = 8  # prompts per generation batch
    seed: int = 0  # seeds the sampler when temperature > 0
    max_context: int | None = None  # cap on prompt + reply tokens; None: the model's max positions
    samples_per_turn: int = 2  # replies quoted in the report per condition and turn
    # A reply at least this similar to an earlier reply of its dialogue scores 0: repeating the last
    # answer is not keeping the instruction (gatt/repetition.py). None: no check.
    max_repeat_similarity: float | None = DEFAULT_MAX_SIMILARITY

    def __post_init__(self) -> None:
        if isinstance(self.conditions, str | list):
            object.__setattr__(
                self,
                "conditions",
                (self.conditions,) if isinstance(self.conditions, str) else tuple(self.conditions),
            )
        problems = []
        for name in ("turns", "instructions_per_dialogue", "max_new_tokens", "batch_prompts"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("dialogues", "max_context"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                problems.append(f"{name} must be an integer >= 1 or null, got {value!r}")
        if not isinstance(self.samples_per_turn, int) or self.samples_per_turn < 0:
            problems.append(f"samples_per_turn must be an integer >= 0, got {self.samples_per_turn!r}")
        if not self.conditions or any(c not in CONDITIONS for c in self.conditions):
            problems.append(f"conditions must be a non-empty subset of {CONDITIONS}, got {self.conditions!r}")
        elif len(set(self.conditions)) != len(self.conditions):
            problems.append(f"conditions must not repeat, got {self.conditions!r}")
        if not (
            isinstance(self.temperature, int | float)
            and math.isfinite(self.temperature)
            and self.temperature >= 0
        ):
            problems.append(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.pass_threshold, int | float) and 0 <= self.pass_threshold <= 1):
            problems.append(f"pass_threshold must be in [0, 1], got {self.pass_threshold!r}")
        if not isinstance(self.seed, int):
            problems.append(f"seed must be an integer, got {self.seed!r}")
        if self.max_repeat_similarity is not None and not (
            isinstance(self.max_repeat_similarity, int | float) and 0 < self.max_repeat_similarity <= 1
        ):
            problems.append(
                f"max_repeat_similarity must be in (0, 1] or null, got {self.max_repeat_similarity!r}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["conditions"] = list(self.conditions)
        return out


def eval_instructions(
    instruction_set: InstructionSet, n_dialogues: int, config: EvalConfig, *, train_seed: int
) -> list[Instruction]:
    """The evaluation instructions: `instructions_per_dialogue` per dialogue, synthesized with
    `train_seed + EVAL_SEED_OFFSET` so that they are not the training draw."""
    return synthesize(
        instruction_set, n_dialogues * config.instructions_per_dialogue, train_seed + EVAL_SEED_OFFSET
    )


# --------------------------------------------------------------------------------------------------
# Statistics


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


def _summary(scores: Sequence[float], threshold: float) -> dict[str, Any]:
    n = len(scores)
    adhered = sum(1 for s in scores if s >= threshold)
    ci = wilson_interval(adhered, n)
    return {
        "n": n,
        "adhered": adhered,
        "rate": _round(adhered / n) if n else None,
        "ci": [_round(ci[0]), _round(ci[1])] if ci else None,
        "mean_score": _round(sum(scores) / n) if n else None,
    }


def _round(x: float) -> float:
    return round(float(x), 4)


def _later_turns(runs: Sequence[_Run], threshold: float) -> dict[str, Any]:
    """Turns 2 and later pooled: GAtt's claim (keeping the instruction after the turn that gives
    it) in one number, with about five times the turns of a single turn's row.

    The turns of one dialogue are not independent (a model that drops the instruction at turn 3
    tends to drop it at turn 4 too), so the Wilson interval over pooled turns is too narrow.
    `ci_by_dialogue` resamples whole dialogues instead (percentile bootstrap, 2,000 resamples,
    fixed seed), widened to the Wilson interval where that is wider: the interval to trust.
    """
    summary = _summary([s for r in runs for s in r.scores[1:]], threshold)
    per_dialogue: dict[int, tuple[int, int]] = {}  # a dialogue's runs under other instructions too
    for r in runs:
        hits, n = per_dialogue.get(r.dialogue, (0, 0))
        later = r.scores[1:]
        per_dialogue[r.dialogue] = (hits + sum(1 for s in later if s >= threshold), n + len(later))
    boot = _bootstrap_rate([g for g in per_dialogue.values() if g[1]])
    # Never narrower than Wilson: with no (or only) hits every resample gives the same rate, and
    # the bootstrap interval collapses to a point ([0, 0] for 0 of 12).
    if boot is not None and summary["ci"] is not None:
        boot = [min(boot[0], summary["ci"][0]), max(boot[1], summary["ci"][1])]
    summary["ci_by_dialogue"] = boot
    return summary


def _bootstrap_rate(groups: Sequence[tuple[int, int]], resamples: int = 2000) -> list[float] | None:
    """95% percentile interval of sum(hits) / sum(n) over groups resampled with replacement."""
    if not groups:
        return None
    rng = random.Random(0)
    rates = []
    for _ in range(resamples):
        picked = [groups[rng.randrange(len(groups))] for _ in groups]
        total = sum(n for _, n in picked)
        rates.append(sum(h for h, _ in picked) / total if total else 0.0)
    rates.sort()
    return [_round(rates[int(0.025 * resamples)]), _round(rates[int(0.975 * resamples) - 1])]


# --------------------------------------------------------------------------------------------------
# The conditions


def condition_messages(
    condition: str,
    instruction: str,
    users: Sequence[str],
    replies: Sequence[str],
    *,
    system: str | None,
    placement: Placement,
) -> list[dict[str, str]]:
    """The context for answering `users[len(replies)]` under `condition`, ending on that user turn."""
    turn = len(replies)
    if turn >= len(users):
        raise ValueError(f"no user turn left to answer: {len(users)} user turns, {turn} replies")
    if condition == "every_turn":
        return sampling_messages(instruction, users[: turn + 1], replies, system=system, placement=placement)
    if condition == "once":
        return plain_messages(instruction, users[: turn + 1], replies, system=system, placement=placement)
    if condition == "none":
        return plain_messages(None, users[: turn + 1], replies, system=system, placement=placement)
    raise ValueError(f"unknown condition {condition!r}; use one of {CONDITIONS}")


@dataclass
class _Run:
    """One dialogue under one instruction and one condition, as it unfolds."""

    condition: str
    dialogue: int
    dialogue_id: str | None
    slot: int
    instruction: Instruction
    system: str | None
    users: list[str]
    replies: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    constraint_scores: list[list[float]] = field(default_factory=list)  # per turn, per constraint
    finished: list[bool] = field(default_factory=list)
    repeats: list[bool] = field(default_factory=list)  # the reply copies an earlier one (scored 0)
    stopped: str | None = None
    cut_turns: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "dialogue": self.dialogue,
            "dialogue_id": self.dialogue_id,
            "slot": self.slot,
            "instruction": self.instruction.to_json(),
            "system": self.system,
            "users": self.users[: len(self.replies)],
            "replies": self.replies,
            "scores": [_round(s) for s in self.scores],
            "reasons": self.reasons,
            "finished": self.finished,
            "repeats": self.repeats,
            "stopped": self.stopped,
            "context_cut_turns": self.cut_turns,
        }


def _score_key(specs: Iterable[Mapping[str, Any]], aggregate: str) -> str:
    return json.dumps([list(specs), aggregate], sort_keys=True)


def _score_turn(runs: Sequence[_Run], replies: Sequence[str]) -> list[tuple[float, str, list[float]]]:
    """(instruction score, reason, per-constraint scores) for each run's reply, batched by verifiers.

    Identical verifier lists are scored together (one embedding batch for a topic), and a
    constraint that is the whole instruction is not scored twice.
    """
    jobs: dict[str, tuple[list[Mapping[str, Any]], str, list[int]]] = {}

    def want(specs: Sequence[Mapping[str, Any]], aggregate: str, row: int) -> str:
        key = _score_key(specs, aggregate)
        jobs.setdefault(key, (list(specs), aggregate, []))[2].append(row)
        return key

    wanted = []
    for row, run in enumerate(runs):
        inst = run.instruction
        whole = want(inst.verifiers, inst.aggregate, row)
        parts = [want(c.verifiers, inst.aggregate, row) for c in inst.constraints]
        wanted.append((whole, parts))
    results: dict[tuple[str, int], Any] = {}
    for key, (specs, aggregate, rows) in jobs.items():
        unique_rows = sorted(set(rows))
        scores = score_all_batch([dict(s) for s in specs], [replies[r] for r in unique_rows], aggregate)
        for r, s in zip(unique_rows, scores, strict=True):
            results[(key, r)] = s
    out = []
    for row, (whole, parts) in enumerate(wanted):
        score = results[(whole, row)]
        out.append((score.value, score.reason, [results[(p, row)].value for p in parts]))
    return out


# --------------------------------------------------------------------------------------------------
# The evaluation


def evaluate_adherence(
    loaded: Any,
    dialogues: Sequence[Any],
    instructions: Sequence[Instruction],
    config: EvalConfig,
    *,
    placement: Placement,
    hooks: Any = None,
) -> dict[str, Any]:
    """Run every held-out dialogue under every condition of `config`, turn by turn, and report
    adherence per condition and turn (see the module docstring; `loaded` is a
    `workers.engine.models.LoadedModel`, `dialogues` are `gatt.dialogues.Dialogue`s).

    `placement` must be the training job's, so that "once" is exactly the GAtt training view.
    The report's `transcripts` hold every reply; `attention.attention_report` can reuse the "once"
    ones. `hooks.progress("evaluate", turn, turns)` is called per turn, `hooks.should_stop()` is
    honoured between batches, and skipped dialogues / context cuts are reported as warning events.
    """
    import torch

    from gatt.masks import TemplateError, check_contents, encode, render
    from workers.engine import sampling
    from workers.engine.config import SamplingConfig
    from workers.engine.hooks import Hooks, Stopped
    from workers.engine.models import end_of_turn_ids

    if not instructions:
        raise ValueError("no instructions to evaluate")
    hooks = hooks or Hooks()
    started = time.monotonic()
    model, tokenizer = loaded.model, loaded.tokenizer
    stop_ids = end_of_turn_ids(tokenizer)
    limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    if config.max_context is not None:
        limit = min(limit, config.max_context)
    sampling_config = SamplingConfig(
        k=1,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        batch_prompts=config.batch_prompts,
        seed=config.seed,
    )
    generator = torch.Generator(device=loaded.device).manual_seed(config.seed)

    selected = list(dialogues[: config.dialogues] if config.dialogues else dialogues)
    per = config.instructions_per_dialogue
    runs: list[_Run] = []
    skipped: list[dict[str, Any]] = []
    for i, dialogue in enumerate(selected):
        users = [user for user, _ in dialogue.turns[: config.turns]]
        slots = [instructions[(i * per + j) % len(instructions)] for j in range(per)]
        try:  # text that spells a control token would forge turn boundaries in every prompt
            texts = [*users, dialogue.system or "", *(inst.text for inst in slots)]
            check_contents(tokenizer, [{"content": t} for t in texts])
        except TemplateError as exc:
            skipped.append({"dialogue": i, "dialogue_id": dialogue.id, "reason": str(exc)})
            hooks.event("warning", "control_token", f"held-out dialogue {i} skipped: {exc}", {"dialogue": i})
            continue
        for condition in config.conditions:
            for j, inst in enumerate(slots):
                runs.append(_Run(condition, i, dialogue.id, j, inst, dialogue.system, users))

    max_turns = max((len(r.users) for r in runs), default=0)
    for t in range(max_turns):
        hooks.progress("evaluate", t, max_turns)
        active = [r for r in runs if r.stopped is None and t < len(r.users)]
        if not active:
            break
        if hooks.should_stop():
            raise Stopped("cancelled during evaluation")
        prompts = []
        for r in active:
            messages = condition_messages(
                r.condition, r.instruction.text, r.users, r.replies, system=r.system, placement=placement
            )
            prompts.append(encode(tokenizer, render(tokenizer, messages, generation_prompt=True)))
        cut = 0
        for r, prompt in zip(active, prompts, strict=True):
            if len(prompt) + config.max_new_tokens > limit:
                r.stopped = "context_length"
                r.cut_turns = len(r.users) - t
                cut += r.cut_turns
        keep = [k for k, r in enumerate(active) if r.stopped is None]
        if cut:
            hooks.event(
                "warning",
                "context_length",
                f"evaluation: {cut} turn(s) not run, the context would exceed {limit} tokens",
                {"turn": t + 1, "turns_cut": cut},
            )
        if not keep:
            continue
        # Greedy replies to the same prompt are the same: generate each distinct prompt once (at
        # turn 1, "once" and "every_turn" are the same prompt). Similar lengths in one batch waste
        # less on left padding.
        distinct = list(dict.fromkeys(tuple(prompts[k]) for k in keep)) if sampling_config.greedy else None
        batch = (
            sorted(distinct, key=len) if distinct is not None else sorted((prompts[k] for k in keep), key=len)
        )
        generated = sampling.sample_candidates(
            model,
            tokenizer,
            [list(p) for p in batch],
            sampling_config,
            stop_ids=stop_ids,
            generator=generator,
            should_stop=hooks.should_stop,
        )
        if distinct is not None:
            by_prompt = {p: c for p, c in zip(batch, generated, strict=True)}
            candidates = [by_prompt[tuple(prompts[k])] for k in keep]
        else:
            keep.sort(key=lambda k: len(prompts[k]))  # the order `batch` was sorted into (stable)
            candidates = generated
        turn_runs = [active[k] for k in keep]
        replies = [c[0].text.strip() for c in candidates]
        scored = _score_turn(turn_runs, replies)
        for r, c, reply, (value, reason, parts) in zip(turn_runs, candidates, replies, scored, strict=True):
            earlier = closest_earlier(reply, r.replies)
            repeat = earlier.is_copy(config.max_repeat_similarity)
            if repeat:
                value, parts = 0.0, [0.0] * len(parts)
                reason = f"repeats its reply of turn {earlier.turn + 1} (similarity {earlier.similarity:.2f})"
            r.repeats.append(repeat)
            r.replies.append(reply)
            r.finished.append(c[0].finished)
            r.scores.append(value)
            r.reasons.append(reason)
            r.constraint_scores.append(parts)
            try:  # a reply that spells a control token would forge the next turn's context
                check_contents(tokenizer, [{"content": reply}])
            except TemplateError:
                r.stopped = "control_token_in_reply"
    hooks.progress("evaluate", max_turns, max_turns)

    conditions = {
        c: _condition_report([r for r in runs if r.condition == c], config) for c in config.conditions
    }
    return {
        "model": getattr(loaded, "source", None),
        "config": config.to_json(),
        "placement": {"attach": placement.attach, "keep": placement.keep},
        "dialogues": len(selected) - len(skipped),
        "runs_per_condition": len(runs) // max(1, len(config.conditions)),
        "context_limit": limit,
        "skipped": skipped,
        "conditions": conditions,
        "transcripts": {c: [r.to_json() for r in runs if r.condition == c] for c in config.conditions},
        "wall_s": round(time.monotonic() - started, 2),
    }


def _condition_report(runs: Sequence[_Run], config: EvalConfig) -> dict[str, Any]:
    threshold = config.pass_threshold
    n_turns = max((len(r.replies) for r in runs), default=0)
    turns = []
    families: dict[str, list[list[float]]] = {}
    samples = []
    for t in range(n_turns):
        at = [r for r in runs if len(r.replies) > t]
        row = {"turn": t + 1, **_summary([r.scores[t] for r in at], threshold)}
        row["truncated"] = sum(1 for r in at if not r.finished[t])
        row["empty"] = sum(1 for r in at if not r.replies[t])
        row["repeats"] = sum(1 for r in at if r.repeats[t])
        turns.append(row)
        for r in at:
            for constraint, value in zip(r.instruction.constraints, r.constraint_scores[t], strict=True):
                per_turn = families.setdefault(constraint.family, [[] for _ in range(n_turns)])
                per_turn[t].append(value)
        for r in at[: config.samples_per_turn]:
            samples.append(
                {
                    "turn": t + 1,
                    "dialogue_id": r.dialogue_id,
                    "instruction": r.instruction.text,
                    "user": r.users[t],
                    "reply": r.replies[t],
                    "score": _round(r.scores[t]),
                    "reason": r.reasons[t],
                }
            )
    all_scores = [s for r in runs for s in r.scores]
    return {
        "turns": turns,
        "families": {
            name: [
                {"turn": t + 1, **_summary(values, threshold)} for t, values in enumerate(per_turn) if values
            ]
            for name, per_turn in sorted(families.items())
        },
        "overall": _summary(all_scores, threshold),
        "later_turns": _later_turns(runs, threshold),
        "context_cut_turns": sum(r.cut_turns for r in runs),
        "stopped": {
            reason: sum(1 for r in runs if r.stopped == reason)
            for reason in sorted({r.stopped for r in runs if r.stopped})
        },
        "truncated": sum(1 for r in runs for f in r.finished if not f),
        "repeats": sum(1 for r in runs for x in r.repeats if x),
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------------
# Comparing and printing


def _ci_overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool | None:
    if a is None or b is None:
        return None
    return not (a[1] < b[0] or b[1] < a[0])


def _compare_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    diff = None
    if before["rate"] is not None and after["rate"] is not None:
        diff = _round(after["rate"] - before["rate"])
    return {
        "n_before": before["n"],
        "n_after": after["n"],
        "before": before["rate"],
        "after": after["rate"],
        "before_ci": before["ci"],
        "after_ci": after["ci"],
        "diff": diff,
        "ci_overlap": _ci_overlap(before["ci"], after["ci"]),
    }


def compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Per condition and turn (and overall): the two rates, after - before, and whether the 95%
    intervals overlap. Non-overlapping intervals are a conservative sign of a real difference;
    overlapping ones do not prove there is none."""
    out: dict[str, Any] = {}
    for condition, b in before["conditions"].items():
        a = after["conditions"].get(condition)
        if a is None:
            continue
        after_turns = {row["turn"]: row for row in a["turns"]}
        out[condition] = {
            "turns": [
                {"turn": row["turn"], **_compare_rows(row, after_turns[row["turn"]])}
                for row in b["turns"]
                if row["turn"] in after_turns
            ],
            "overall": _compare_rows(b["overall"], a["overall"]),
        }
        if "later_turns" in b and "later_turns" in a:
            later = _compare_rows(b["later_turns"], a["later_turns"])
            later["before_ci_by_dialogue"] = b["later_turns"]["ci_by_dialogue"]
            later["after_ci_by_dialogue"] = a["later_turns"]["ci_by_dialogue"]
            later["ci_by_dialogue_overlap"] = _ci_overlap(
                b["later_turns"]["ci_by_dialogue"], a["later_turns"]["ci_by_dialogue"]
            )
            out[condition]["later_turns"] = later
    return {"conditions": out}


def _cell(row: Mapping[str, Any] | None, shown_n: int | None) -> str:
    if row is None or row["rate"] is None:
        return "-"
    lo, hi = row["ci"]
    text = f"{row['rate']:.2f} [{lo:.2f}, {hi:.2f}]"
    return text if row["n"] == shown_n else f"{text} n={row['n']}"


def _by_dialogue(row: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The pooled later-turns row with its by-dialogue interval in place of the Wilson one."""
    if row is None:
        return None
    return {**row, "ci": row.get("ci_by_dialogue") or row["ci"]}


def format_table(
    report_before: Mapping[str, Any],
    report_after: Mapping[str, Any] | None = None,
    *,
    labels: tuple[str, str] = ("base", "gatt"),
) -> str:
    """A plain-text table, turn x condition, each cell "rate [lo, hi]" (95% Wilson interval).

    With two reports every condition gets a column per model and a "diff" column (after - before;
    `*` when the intervals do not overlap). The `n` column is the first cell's n; a cell with a
    different n says so.
    """
    reports = [report_before] if report_after is None else [report_before, report_after]
    names = [labels[0]] if report_after is None else list(labels)
    conditions = list(report_before["conditions"])
    if report_after is not None:
        conditions = [c for c in conditions if c in report_after["conditions"]]
    header = ["turn", "n"]
    for c in conditions:
        header += [f"{c} {name}" if len(reports) > 1 else c for name in names]
        if len(reports) > 1:
            header.append(f"{c} diff")

    def rows_for(key: Any) -> list[str]:
        cells: list[str] = []
        found = []
        for c in conditions:
            for report in reports:
                cond = report["conditions"][c]
                if key == "all":
                    found.append(cond["overall"])
                elif key == "2+":
                    found.append(_by_dialogue(cond.get("later_turns")))
                else:
                    found.append(next((r for r in cond["turns"] if r["turn"] == key), None))
        shown_n = next((r["n"] for r in found if r is not None), None)
        for ci, _c in enumerate(conditions):
            group = found[ci * len(reports) : (ci + 1) * len(reports)]
            cells += [_cell(r, shown_n) for r in group]
            if len(reports) > 1:
                b, a = group
                if b is None or a is None or b["rate"] is None or a["rate"] is None:
                    cells.append("-")
                else:
                    star = "*" if _ci_overlap(b["ci"], a["ci"]) is False else ""
                    cells.append(f"{a['rate'] - b['rate']:+.2f}{star}")
        return [str(key), "-" if shown_n is None else str(shown_n), *cells]

    all_turns = sorted(
        {row["turn"] for r in reports for c in conditions for row in r["conditions"][c]["turns"]}
    )
    # Reports written before the pooled row existed have no "later_turns".
    pooled = all("later_turns" in r["conditions"][c] for r in reports for c in conditions)
    table = [header] + [rows_for(t) for t in all_turns] + [rows_for("2+")] * pooled + [rows_for("all")]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    threshold = report_before["config"]["pass_threshold"]
    title = (
        f"Instruction adherence: share of replies scoring >= {threshold} per turn, "
        "95% Wilson interval in brackets"
    )
    notes = (
        "once: instruction in the first turn only (the GAtt view); every_turn: on every user turn "
        "(the ceiling); none: no instruction (the floor)."
    )
    if len(reports) > 1:
        notes += " diff: after - before, * when the intervals do not overlap."
    if pooled:
        notes += (
            "\n2+: turns 2 and later pooled, with an interval from resampling whole dialogues (their"
            " turns are not independent)."
        )
    repeats = [
        f"{c} {name} {report['conditions'][c].get('repeats', 0)}/{report['conditions'][c]['overall']['n']}"
        for c in conditions
        for name, report in zip(names, reports, strict=True)
    ]
    if report_before["config"].get("max_repeat_similarity") is not None:
        notes += "\nReplies that copy an earlier reply (scored 0): " + ", ".join(repeats) + "."
    return "\n".join([title, *lines, notes])


# --------------------------------------------------------------------------------------------------
# Held-out hygiene


def _normalized(text: str) -> str:
    return " ".join(text.casefold().split())


def _overlap(train: Iterable[str], evaluated: Iterable[str], examples: int = 5) -> dict[str, Any]:
    train_exact = {t.strip() for t in train}
    train_norm = {_normalized(t) for t in train_exact}
    unique = list(dict.fromkeys(t.strip() for t in evaluated))
    exact = [t for t in unique if t in train_exact]
    normalized = [t for t in unique if _normalized(t) in train_norm]
    return {
        "eval": len(unique),
        "overlapping": len(exact),
        "overlapping_normalized": len(normalized),
        "examples": exact[:examples] or normalized[:examples],
    }


def check_overlap(
    train_dialogues: Sequence[Any],
    train_instructions: Sequence[Instruction],
    eval_dialogues: Sequence[Any],
    eval_instructions: Sequence[Instruction],
) -> dict[str, Any]:
    """Exact overlaps between what a job trained on and what it is evaluated on.

    Reported: user messages (exact after stripping, and after case-folding and collapsing
    whitespace), held-out dialogues that share any user message with training, dialogue ids,
    instruction texts, and (family, value) constraints. `clean` is True when no user message and
    no instruction text is shared. Constraints are reported apart and not counted against
    `clean`: with the default set's 30 hobbies, 30 figures and 5 languages, evaluation
    constraints are expected to have been trained on in other combinations and wordings.
    """
    train_users = {user.strip() for d in train_dialogues for user, _ in d.turns}
    users = _overlap(train_users, (user for d in eval_dialogues for user, _ in d.turns))
    dialogues_with_overlap = sum(
        1 for d in eval_dialogues if any(u.strip() in train_users for u, _ in d.turns)
    )
    train_ids = {d.id for d in train_dialogues if d.id is not None}
    shared_ids = sorted({d.id for d in eval_dialogues if d.id is not None and d.id in train_ids})
    texts = _overlap((i.text for i in train_instructions), (i.text for i in eval_instructions))
    train_constraints = {(c.family, c.value) for i in train_instructions for c in i.constraints}
    eval_constraints = list(
        dict.fromkeys((c.family, c.value) for i in eval_instructions for c in i.constraints)
    )
    shared_constraints = [fv for fv in eval_constraints if fv in train_constraints]
    return {
        "user_messages": users,
        "dialogues_with_overlap": dialogues_with_overlap,
        "eval_dialogues": len(eval_dialogues),
        "dialogue_ids": {"overlapping": len(shared_ids), "examples": shared_ids[:5]},
        "instruction_texts": texts,
        "constraints": {
            "eval": len(eval_constraints),
            "overlapping": len(shared_constraints),
            "examples": [{"family": f, "value": v} for f, v in shared_constraints[:5]],
        },
        "clean": users["overlapping"] == 0 and texts["overlapping"] == 0,
    }
