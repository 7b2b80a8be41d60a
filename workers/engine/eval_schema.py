"""The schema of an evaluation report (`evaluation/adherence.json`, `GET /v1/jobs/{id}/evaluation`).

Like the sample rows (workers/engine/records.py), the report is written as plain dicts
(workers/engine/evaluation.py, eval_report.py, eval_stats.py); these models say what it must be.
The tests check the reports real evaluations write against them (a field on one side only fails
the suite), and the API publishes them. The statistics of the paired comparison (`compare`) are
typed down to their per-condition rows; the bootstrap's own bookkeeping stays an object. Rates are
shares in [0, 1], null where nothing was counted (n = 0); `ci` is a 95% interval [low, high].
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Interval = tuple[float, float]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class AdherenceRate(_Part):
    """Adherence of some replies: how many scored at or above the pass threshold."""

    n: int
    """Replies counted."""
    adhered: int
    """Replies that adhere."""
    rate: float | None
    """adhered / n."""
    ci: Interval | None
    """Wilson interval of the rate."""
    mean_score: float | None
    """Mean verifier score."""
    ci_by_dialogue: Interval | None = None
    """Pooled rows only: the interval from resampling whole dialogues (their turns are not independent)."""


class UsefulRate(_Part):
    """Replies that are "adherent and useful": adhere, copy no earlier reply, do not echo the question."""

    n: int
    """Replies counted."""
    hits: int
    """Replies that are adherent and useful."""
    rate: float | None
    """hits / n."""
    ci: Interval | None
    """Wilson interval of the rate."""
    ci_by_dialogue: Interval | None = None
    """Pooled rows only: the interval from resampling whole dialogues."""


class Relevance(_Part):
    """Question-reply relevance: the cosine of their sentence embeddings."""

    n: int
    """Replies with a relevance."""
    mean: float
    """Mean cosine."""
    relevant: int
    """Replies at or above the floor (`relevance_floor`)."""
    share: float
    """relevant / n."""


class ConditionTurn(AdherenceRate):
    """One turn of one condition."""

    turn: int
    """From 1."""
    truncated: int
    """Replies cut by max_new_tokens."""
    empty: int
    """Empty replies."""
    repeats: int
    """Replies that copy an earlier reply of their context (scored 0)."""
    echoes: int
    """Replies that echo the question."""
    useful: UsefulRate
    """Adherent and useful replies of the turn."""
    relevance: Relevance | None
    """Relevance of the turn's replies; null: not measured."""


class FamilyTurn(AdherenceRate):
    """One family's constraint, at one turn."""

    turn: int
    """From 1."""


class InstructionRate(_Part):
    """Turns 2 and later of the runs of one instruction (its constraints, or a custom text)."""

    instruction: str
    """The (family: value) constraints, or the custom instruction's text."""
    texts: int
    """Distinct wordings of it that were run."""
    runs: int
    """Dialogues run with it."""
    n: int
    """Replies counted."""
    adhered: int
    """Replies that adhere."""
    rate: float | None
    """adhered / n."""
    ci: Interval | None
    """Wilson interval (optimistic: the turns of a dialogue are not independent)."""
    useful: int
    """Replies that are adherent and useful."""
    useful_rate: float | None
    """useful / n."""


class SampleReply(_Part):
    """A reply quoted in the report."""

    turn: int
    """From 1."""
    dialogue_id: str | None
    """The held-out dialogue."""
    instruction: str
    """The instruction's text."""
    user: str
    """The user turn."""
    reply: str
    """The model's reply."""
    score: float
    """Verifier score."""
    reason: str
    """Why the verifiers scored it so."""
    useful: bool
    """Adherent and useful."""


class ConditionReport(_Part):
    """Every held-out dialogue run under one condition."""

    context: Literal["own", "corpus"]
    """The history before each turn: the model's own replies, or the corpus's (the *_fixed conditions)."""
    turns: list[ConditionTurn]
    """Adherence by turn."""
    families: dict[str, list[FamilyTurn]]
    """Adherence by turn of each family's constraints."""
    instructions: list[InstructionRate]
    """Turns 2 and later, per instruction."""
    overall: AdherenceRate
    """All turns pooled."""
    later_turns: AdherenceRate | None
    """Turns 2 and later pooled (GAtt's claim); null with a single turn."""
    useful_overall: UsefulRate
    """Adherent and useful, all turns."""
    later_useful: UsefulRate | None
    """Adherent and useful, turns 2 and later; null with a single turn."""
    relevance: Relevance | None
    """Relevance of all replies; null: not measured."""
    context_cut_turns: int
    """Turns not run because the context would exceed the model's."""
    missing_reply_turns: int
    """Fixed conditions: turns not run because the corpus has no reply to stand on."""
    stopped: dict[str, int]
    """Runs stopped early, by reason."""
    truncated: int
    """Replies cut by max_new_tokens."""
    repeats: int
    """Replies that copy an earlier reply."""
    echoes: int
    """Replies that echo the question."""
    samples: list[SampleReply]
    """A few replies per turn, quoted."""


class AdherenceReport(_Part):
    """One model's evaluation on the held-out dialogues."""

    model: str | None
    """The model evaluated."""
    config: dict[str, Any]
    """The evaluation's settings (workers/engine/evaluation.py, EvalConfig)."""
    placement: dict[str, str]
    """Where the instruction was placed (`attach`, `keep`), as in the job."""
    dialogues: int
    """Held-out dialogues run."""
    runs_per_condition: int
    """Runs (dialogue and instruction) per condition."""
    context_limit: int
    """Tokens of context the model allows."""
    skipped: list[dict[str, Any]]
    """Dialogues skipped, with why."""
    missing_replies: list[dict[str, Any]]
    """Fixed conditions: dialogues whose corpus lacks a reply, with where."""
    relevance_floor: float | None
    """The relevance a reply needs to count as relevant; null: not measured."""
    conditions: dict[str, ConditionReport]
    """Each condition run."""
    transcripts: dict[str, list[dict[str, Any]]] | None = None
    """Every run in full, per condition (left out of the API's answer)."""
    wall_s: float
    """Seconds it took."""


class PairedDiff(_Part):
    n: int
    """Pairs of replies."""
    diff: float | None = None
    """after - before."""
    ci: Interval | None
    """Paired cluster-bootstrap interval of the difference; null when it cannot be computed."""
    significant: bool
    """Whether that interval excludes 0."""


class CompareRate(_Part):
    """Before and after, for one turn or a pooled row of one condition."""

    turn: int | None = None
    """From 1; absent on pooled rows."""
    n_before: int
    """Replies of the model before."""
    n_after: int
    """Replies of the model after."""
    before: float | None
    """Rate before."""
    after: float | None
    """Rate after."""
    before_ci: Interval | None
    """Wilson interval before."""
    after_ci: Interval | None
    """Wilson interval after."""
    diff: float | None
    """after - before."""
    ci_overlap: bool | None
    """Whether the two Wilson intervals overlap; null where one has none."""
    paired: PairedDiff | None = None
    """The paired difference, where the runs pair up."""
    before_ci_by_dialogue: Interval | None = None
    """Pooled rows: the by-dialogue interval before."""
    after_ci_by_dialogue: Interval | None = None
    """Pooled rows: the by-dialogue interval after."""
    ci_by_dialogue_overlap: bool | None = None
    """Pooled rows: whether the by-dialogue intervals overlap."""


class CompareCondition(_Part):
    turns: list[CompareRate]
    """By turn."""
    overall: CompareRate
    """All turns pooled."""
    later_turns: CompareRate | None = None
    """Turns 2 and later pooled."""


class Comparison(_Part):
    """The model after training against the model before, run by run."""

    conditions: dict[str, CompareCondition]
    """Each condition both reports have."""
    paired: dict[str, Any]
    """The paired cluster bootstrap: its method, and per outcome and condition its turns and pools."""


class ValidationLoss(_Part):
    """The held-out dialogues' own replies, predicted with no instruction (workers/engine/validation.py)."""

    loss: float | None
    """Mean negative log-likelihood per reply token (and end-of-turn token); null when none counted."""
    tokens: int
    """Tokens counted."""
    dialogues: int
    """Dialogues counted."""


class JobEvaluation(_Part):
    """A job's evaluation: the model before and after training on the same held-out runs."""

    base: AdherenceReport
    """The base model."""
    gatt: AdherenceReport
    """The fine-tuned model."""
    compare: Comparison
    """After against before."""
    overlap: dict[str, Any] | None
    """How much of the held-out set the training data shares (user turns, instruction texts)."""
    table: str
    """The tables, as printed."""
    validation_loss: dict[str, ValidationLoss | None] | None = None
    """`base` and `gatt`: how well each model predicts the held-out dialogues' own replies; null for
    jobs evaluated before it was measured."""
    attention: dict[str, Any] | None = None
    """The API's answer only: attention on the instruction by turn (`attention.json`), if measured."""
