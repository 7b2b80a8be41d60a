"""Multi-turn adherence: does an instruction given once still hold at turn t?

The measurement behind the paper's Table 30 (share of turns where the attribute is respected,
baseline against GAtt) and the later multi-turn benchmarks (Multi-IF, SysBench): run held-out
dialogues turn by turn and score every reply with the instruction's verifiers. This module runs the
evaluation: its settings (`EvalConfig`), the conditions and the messages each gives the model, the
evaluation instructions, the loop (`evaluate_adherence`) with the scoring of every reply, and the
check that the held-out data were not trained on (`check_overlap`). What the runs add up to, per
condition (rates with intervals per turn, family and instruction), and two reports compared and
printed, is workers/engine/eval_report.py; the statistics are workers/engine/eval_stats.py.

The conditions differ in where the instruction is, and in whose earlier replies form the context:

- `"once"`: only in the first user turn (or the system message), exactly as GAtt trains
  (`gatt.augment.plain_messages`). This is what GAtt should improve.
- `"every_turn"`: attached to every user turn (`sampling_messages`), the view GAtt samples from:
  the ceiling the "once" condition is compared with. It carries the instruction's full wording
  (`Instruction.sampling_text`) as sampling does; "once" carries `text`, terse when the training
  view is.
- `"none"`: no instruction at all (optional): the floor, how often a reply satisfies the verifier
  by chance (a topic mention, a language the model speaks anyway).

These three run with the model's *own* earlier replies as context. A model that opened its first
reply with the asked-for phrase can then keep it by imitating itself, without remembering the
instruction. `"once_fixed"`, `"every_turn_fixed"` and `"none_fixed"` put the instruction in the
same places but take the earlier assistant turns from the held-out corpus (teacher forcing): only
the reply to turn k is generated and scored, its context holds the corpus's replies to turns 1..k-1
(written without the instruction), so adherence at turn k measures memory of the instruction, not
imitation. A fixed run stops before a turn whose earlier corpus reply is missing or empty
(`missing_reply_turns`, and the report's `missing_replies`).

A turn *adheres* when its score (`score_all_batch(instruction.verifiers, ...)`, aggregated with the
instruction's `aggregate`) is >= `pass_threshold`. It is *adherent and useful* (`useful`) when it
adheres, does not copy an earlier reply of its context and does not echo the question: a reply
that opens with the phrase and then repeats the user's question has kept nothing useful.

- Copies: a reply at least `max_repeat_similarity` (0.8, gatt/repetition.py) similar to an earlier
  reply of its context (the model's own replies, or the corpus's in a fixed condition) scores 0
  and is counted in `repeats`: a model that repeats its last answer whatever the user asks has not
  kept the instruction, even when the copy opens with the asked-for phrase.
- Echoes: `echo_share(reply, question, ignore=instruction)` >= `max_echo` (0.75) is an echo,
  counted in `echoes`; it keeps its adherence score but is not useful.
- Relevance (`relevance: true`): the cosine of sentence embeddings of question and reply, the
  instruction's words ignored (gatt/relevance.py); reported per turn as a mean and as the share at or
  above `RELEVANCE_FLOOR`. It does not enter `useful`.

Choices the paper leaves open, and ours (the report's are in workers/engine/eval_report.py):

- Replies are greedy by default (`temperature` 0), so two evaluations of the same model on the
  same dialogues and instructions give the same replies, and before/after differences are the
  model's, not the sampler's. Which instruction goes with which dialogue is deterministic too, so
  the runs of two reports pair up.
- A reply is scored as generated (stripped). A reply cut by `max_new_tokens` is kept whole in the
  context and scored as is (`truncated` counts them per turn): trimming it to its last sentence,
  as the training stage does, would score an empty reply for a long first sentence.
- A dialogue runs for at most `turns` user turns (up to 64), as far as its data go, and stops when
  its next prompt plus `max_new_tokens` would not fit the model's context (or `max_context`); the
  turns not run are reported as `context_cut_turns` and are simply absent from the later turns' `n`.

Everything returned is JSON-serialisable. This module imports torch (and the embedding model) only
inside `evaluate_adherence`, so `EvalConfig` and the report can be imported anywhere.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gatt.augment import Placement, plain_messages, sampling_messages
from gatt.dialogues import leading_replies
from gatt.instructions import Instruction, InstructionSet, synthesize
from gatt.repetition import DEFAULT_MAX_ECHO, DEFAULT_MAX_SIMILARITY, closest_earlier, echo_share
from gatt.verifiers import score_all_batch
from workers.engine.config import CONDITIONS, EVAL_LIMITS, MAX_TURNS
from workers.engine.eval_stats import round4, wilson_interval

__all__ = [
    "CONDITIONS",
    "EVAL_SEED_OFFSET",
    "FIXED_CONDITIONS",
    "MAX_TURNS",
    "EvalConfig",
    "check_overlap",
    "condition_messages",
    "evaluate_adherence",
    "eval_instructions",
    "wilson_interval",
]

FIXED_CONDITIONS: tuple[str, ...] = tuple(c for c in CONDITIONS if c.endswith("_fixed"))
# Evaluation instructions are drawn with the training seed plus this, so that with the default
# instruction set they are (mostly) other combinations than the ones trained on.
EVAL_SEED_OFFSET = 1000
_round = round4


def _base(condition: str) -> str:
    """The instruction placement of a condition: "once_fixed" -> "once"."""
    return condition.removesuffix("_fixed")


@dataclass(frozen=True)
class EvalConfig:
    turns: int = 8  # user turns per dialogue, at most (as far as the data and the context allow)
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
    # A reply at least this similar to an earlier reply of its context scores 0: repeating the last
    # answer is not keeping the instruction (gatt/repetition.py). None: no check.
    max_repeat_similarity: float | None = DEFAULT_MAX_SIMILARITY
    # A reply whose echo_share of the question is at least this is an echo: not useful. None: no check.
    max_echo: float | None = DEFAULT_MAX_ECHO
    # Question-reply relevance by sentence embeddings (gatt/relevance.py; loads its model).
    relevance: bool = True

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
            if not (
                isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= EVAL_LIMITS[name]
            ):
                problems.append(f"{name} must be an integer in [1, {EVAL_LIMITS[name]}], got {value!r}")
        if self.dialogues is not None and not (
            isinstance(self.dialogues, int)
            and not isinstance(self.dialogues, bool)
            and 1 <= self.dialogues <= EVAL_LIMITS["dialogues"]
        ):
            problems.append(
                f"dialogues must be an integer in [1, {EVAL_LIMITS['dialogues']}] or null, got {self.dialogues!r}"
            )
        if self.max_context is not None and not (
            isinstance(self.max_context, int)
            and not isinstance(self.max_context, bool)
            and self.max_context >= 1
        ):
            problems.append(f"max_context must be an integer >= 1 or null, got {self.max_context!r}")
        if not (
            isinstance(self.samples_per_turn, int)
            and not isinstance(self.samples_per_turn, bool)
            and 0 <= self.samples_per_turn <= EVAL_LIMITS["samples_per_turn"]
        ):
            problems.append(
                f"samples_per_turn must be an integer in [0, {EVAL_LIMITS['samples_per_turn']}], "
                f"got {self.samples_per_turn!r}"
            )
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
        for name in ("max_repeat_similarity", "max_echo"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1
            ):
                problems.append(f"{name} must be in (0, 1] or null, got {value!r}")
        if not isinstance(self.relevance, bool):
            problems.append(f"relevance must be true or false, got {self.relevance!r}")
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
    """The context for answering `users[len(replies)]` under `condition`, ending on that user turn.

    `replies` are the earlier assistant turns: the model's own in "none", "once" and "every_turn",
    the corpus's in the fixed conditions (`_Run.context` picks them); the instruction goes where
    the condition without "_fixed" puts it."""
    turn = len(replies)
    if turn >= len(users):
        raise ValueError(f"no user turn left to answer: {len(users)} user turns, {turn} replies")
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; use one of {CONDITIONS}")
    base = _base(condition)
    if base == "every_turn":
        return sampling_messages(instruction, users[: turn + 1], replies, system=system, placement=placement)
    if base == "once":
        return plain_messages(instruction, users[: turn + 1], replies, system=system, placement=placement)
    return plain_messages(None, users[: turn + 1], replies, system=system, placement=placement)


def _usable_corpus_turns(corpus: Sequence[str | None], turns: int) -> int:
    """How many of the first `turns` user turns a fixed condition can run: turn k needs the
    corpus's replies to turns 1..k-1, none missing or blank."""
    return min(turns, len(leading_replies(corpus)) + 1)


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
    corpus: list[str | None] = field(default_factory=list)  # the corpus's replies (fixed context)
    replies: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    constraint_scores: list[list[float]] = field(default_factory=list)  # per turn, per constraint
    finished: list[bool] = field(default_factory=list)
    repeats: list[bool] = field(default_factory=list)  # the reply copies an earlier one (scored 0)
    echo_shares: list[float] = field(default_factory=list)
    echoes: list[bool] = field(default_factory=list)  # the reply echoes the question
    relevance: list[float | None] = field(default_factory=list)
    useful: list[bool] = field(default_factory=list)  # adherent, not a copy, not an echo
    stopped: str | None = None
    cut_turns: int = 0
    missing_turns: int = 0  # fixed: turns not run for want of an earlier corpus reply

    @property
    def fixed(self) -> bool:
        return self.condition in FIXED_CONDITIONS

    def context(self) -> list[str]:
        """The earlier assistant turns the next reply is generated after (and checked for copies)."""
        if self.fixed:
            return [r or "" for r in self.corpus[: len(self.replies)]]
        return self.replies

    def to_json(self) -> dict[str, Any]:
        return {
            "dialogue": self.dialogue,
            "dialogue_id": self.dialogue_id,
            "slot": self.slot,
            "instruction": self.instruction.to_json(),
            "system": self.system,
            "context": "corpus" if self.fixed else "own",
            "users": self.users[: len(self.replies)],
            "replies": self.replies,
            "scores": [_round(s) for s in self.scores],
            "reasons": self.reasons,
            "finished": self.finished,
            "repeats": self.repeats,
            "echo_shares": [_round(s) for s in self.echo_shares],
            "echoes": self.echoes,
            "relevance": [None if x is None else _round(x) for x in self.relevance],
            "useful": self.useful,
            "stopped": self.stopped,
            "context_cut_turns": self.cut_turns,
            "missing_reply_turns": self.missing_turns,
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


def _plan(
    selected: Sequence[Any],
    instructions: Sequence[Instruction],
    config: EvalConfig,
    tokenizer: Any,
    hooks: Any,
) -> tuple[list[_Run], list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs to evaluate (each dialogue under each condition with each of its instructions), the
    dialogues skipped for control tokens, and those whose fixed runs stop early (a missing corpus
    reply); both reported as warning events."""
    from gatt.masks import TemplateError, check_contents

    per = config.instructions_per_dialogue
    fixed = any(c in FIXED_CONDITIONS for c in config.conditions)
    runs: list[_Run] = []
    skipped: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    for i, dialogue in enumerate(selected):
        turns = dialogue.turns[: config.turns]
        users = [user for user, _ in turns]
        corpus = [reply for _, reply in turns]
        slots = [instructions[(i * per + j) % len(instructions)] for j in range(per)]
        usable = _usable_corpus_turns(corpus, len(users)) if fixed else len(users)
        try:  # text that spells a control token would forge turn boundaries in every prompt
            texts = [*users, dialogue.system or "", *(inst.text for inst in slots)]
            texts += [r or "" for r in corpus[: max(0, usable - 1)]] if fixed else []
            check_contents(tokenizer, [{"content": t} for t in texts])
        except TemplateError as exc:
            skipped.append({"dialogue": i, "dialogue_id": dialogue.id, "reason": str(exc)})
            hooks.event("warning", "control_token", f"held-out dialogue {i} skipped: {exc}", {"dialogue": i})
            continue
        if usable < len(users):
            missing.append({"dialogue": i, "dialogue_id": dialogue.id, "from_turn": usable + 1})
            hooks.event(
                "warning",
                "missing_reply",
                f"held-out dialogue {i}: fixed conditions stop before turn {usable + 1}, "
                "an earlier corpus reply is missing",
                {"dialogue": i, "from_turn": usable + 1},
            )
        for condition in config.conditions:
            for j, inst in enumerate(slots):
                run = _Run(condition, i, dialogue.id, j, inst, dialogue.system, list(users), list(corpus))
                if run.fixed and usable < len(users):
                    run.users, run.missing_turns = run.users[:usable], len(users) - usable
                runs.append(run)
    return runs, skipped, missing


def _record_turn(
    turn_runs: Sequence[_Run],
    candidates: Sequence[Sequence[Any]],
    t: int,
    config: EvalConfig,
    relevance_fn: Any,
    tokenizer: Any,
) -> None:
    """Score turn `t`'s reply of each run (adherence, copy, echo, relevance) and append it to the run;
    a reply that spells a control token ends its run."""
    from gatt.masks import TemplateError, check_contents

    replies = [c[0].text.strip() for c in candidates]
    scored = _score_turn(turn_runs, replies)
    if relevance_fn is not None:
        relevances: list[float | None] = list(
            relevance_fn(
                [r.users[t] for r in turn_runs], replies, ignore=[r.instruction.text for r in turn_runs]
            )
        )
    else:
        relevances = [None] * len(turn_runs)
    for r, c, reply, (value, reason, parts), rel in zip(
        turn_runs, candidates, replies, scored, relevances, strict=True
    ):
        earlier = closest_earlier(reply, r.context())
        repeat = earlier.is_copy(config.max_repeat_similarity)
        if repeat and earlier.turn is not None:  # is_copy implies an earlier turn
            value, parts = 0.0, [0.0] * len(parts)
            whose = "the corpus reply" if r.fixed else "its reply"
            reason = f"repeats {whose} of turn {earlier.turn + 1} (similarity {earlier.similarity:.2f})"
        share = echo_share(reply, r.users[t], ignore=r.instruction.text)
        echo = config.max_echo is not None and share >= config.max_echo
        r.repeats.append(repeat)
        r.echo_shares.append(share)
        r.echoes.append(echo)
        r.relevance.append(None if rel is None else float(rel))
        r.useful.append(value >= config.pass_threshold and not repeat and not echo)
        r.replies.append(reply)
        r.finished.append(c[0].finished)
        r.scores.append(value)
        r.reasons.append(reason)
        r.constraint_scores.append(parts)
        if not r.fixed:
            try:  # a reply that spells a control token would forge the next turn's context
                check_contents(tokenizer, [{"content": reply}])
            except TemplateError:
                r.stopped = "control_token_in_reply"


def evaluate_adherence(
    loaded: Any,
    dialogues: Sequence[Any],
    instructions: Sequence[Instruction],
    config: EvalConfig,
    *,
    placement: Placement,
    hooks: Any = None,
    sampler: Any = None,
) -> dict[str, Any]:
    """Run every held-out dialogue under every condition of `config`, turn by turn, and report
    adherence per condition and turn (see the module docstring; `loaded` is a
    `workers.engine.models.LoadedModel`, `dialogues` are `gatt.dialogues.Dialogue`s). `sampler`
    (a `workers.engine.sampling.Sampler`, say a vLLM server's) replies instead of the loop on
    `loaded`'s model; it must sample that model.

    `placement` must be the training job's, so that "once" is exactly the GAtt training view.
    The report's `transcripts` hold every reply; `attention.attention_report` can reuse the "once"
    ones. The runs go chunk by chunk (`batch_prompts` of them), each through all of its turns;
    `hooks.progress("evaluate", step, steps)` is called per chunk and turn, `hooks.should_stop()`
    is honoured between them, and skipped dialogues, missing corpus replies and context cuts are
    reported as warning events.
    """
    import torch

    from workers.engine.config import SamplingConfig
    from workers.engine.eval_report import _condition_report
    from workers.engine.hooks import Hooks, Stopped
    from workers.engine.rollout import Rollout

    if not instructions:
        raise ValueError("no instructions to evaluate")
    relevance_fn, relevance_floor = None, None
    if config.relevance:
        from gatt.relevance import RELEVANCE_FLOOR, relevance

        relevance_fn, relevance_floor = relevance, RELEVANCE_FLOOR
    hooks = hooks or Hooks()
    started = time.monotonic()
    rollout = Rollout.of(loaded, max_context=config.max_context, sampler=sampler)
    tokenizer = loaded.tokenizer
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
    runs, skipped, missing = _plan(selected, instructions, config, tokenizer, hooks)

    max_turns = max((len(r.users) for r in runs), default=0)
    # A chunk of runs goes through all of its turns before the next chunk starts, so the prefix
    # store holds one chunk's dialogues and every later turn prefills just its new messages
    # (`prefix_cache.py`). A streaming sampler (a vLLM server) batches what it is sent and caches
    # prefixes itself: it gets every run at once.
    size = len(runs) if rollout.sampler.streams else config.batch_prompts
    chunks = [runs[i : i + size] for i in range(0, len(runs), size)]
    steps = len(chunks) * max_turns
    cut = [0] * max_turns  # turns not run for the context window, by the turn where runs stopped
    for c, chunk in enumerate(chunks):
        rollout.forget()  # the store holds one chunk's dialogues, not every earlier one's
        for t in range(max_turns):
            hooks.progress("evaluate", c * max_turns + t, steps)
            active = [r for r in chunk if r.stopped is None and t < len(r.users)]
            if not active:
                break
            if hooks.should_stop():
                raise Stopped("cancelled during evaluation")
            cut[t] += _run_turn(
                rollout, active, t, sampling_config, generator, placement, config, relevance_fn, hooks
            )
    hooks.progress("evaluate", steps, steps)
    for t, turns_cut in enumerate(cut):
        if turns_cut:
            hooks.event(
                "warning",
                "context_length",
                f"evaluation: {turns_cut} turn(s) not run, the context would exceed {rollout.limit} tokens",
                {"turn": t + 1, "turns_cut": turns_cut},
            )

    conditions = {
        c: _condition_report([r for r in runs if r.condition == c], config, relevance_floor)
        for c in config.conditions
    }
    return {
        "model": getattr(loaded, "source", None),
        "config": config.to_json(),
        "placement": {"attach": placement.attach, "keep": placement.keep},
        "dialogues": len(selected) - len(skipped),
        "runs_per_condition": len(runs) // max(1, len(config.conditions)),
        "context_limit": rollout.limit,
        "skipped": skipped,
        "missing_replies": missing,
        "relevance_floor": relevance_floor,
        "conditions": conditions,
        "transcripts": {c: [r.to_json() for r in runs if r.condition == c] for c in config.conditions},
        "wall_s": round(time.monotonic() - started, 2),
    }


def _run_turn(
    rollout: Any,
    active: list[_Run],
    t: int,
    sampling_config: Any,
    generator: Any,
    placement: Placement,
    config: EvalConfig,
    relevance_fn: Any,
    hooks: Any,
) -> int:
    """Generate turn `t` of every active run and score it; a run whose context is full stops.
    Returns the turns that will not run for it."""
    contexts = []
    for r in active:
        # Every turn carries the full wording, as when a job samples; once, the training view's
        # text (terse for a terse instruction), as GAtt trains.
        text = r.instruction.sampling_text if _base(r.condition) == "every_turn" else r.instruction.text
        contexts.append(
            condition_messages(r.condition, text, r.users, r.context(), system=r.system, placement=placement)
        )
    # Similar lengths in one batch waste less on left padding; greedy replies to the same
    # prompt are the same, so each distinct prompt is generated once (at turn 1, "once",
    # "every_turn" and their fixed variants are the same prompt).
    results = rollout.turn(
        contexts, sampling_config, generator=generator, should_stop=hooks.should_stop, by_length=True
    )
    cut = 0
    for r, result in zip(active, results, strict=True):
        if result is None:
            r.stopped = "context_length"
            r.cut_turns = len(r.users) - t
            cut += r.cut_turns
    turn_runs = [r for r, result in zip(active, results, strict=True) if result is not None]
    candidates = [result for result in results if result is not None]
    if candidates:
        _record_turn(turn_runs, candidates, t, config, relevance_fn, rollout.tokenizer)
    return cut


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
