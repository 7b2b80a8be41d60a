"""The rows of a job's `samples.jsonl` and `training_set.jsonl`: their one schema.

The pipeline writes these rows as plain dicts (appended as each chunk of dialogues is sampled, so
that a crashed job resumes where it stopped); these models are what the rows must be. The API
publishes them in OpenAPI (`GET /v1/jobs/{id}/samples` and `/training-set`), and the tests check
every row a real job writes against them, so a field added on one side only fails the suite.
Importable without torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ConstraintRow(Row):
    family: str
    """The family the value was drawn from ("language", "hobby", ...), or "custom"."""
    value: str
    """The value the constraint was written with."""
    text: str
    """The constraint in words."""
    verifiers: list[dict[str, Any]]
    """How a reply is checked against it (the instruction set's verifier objects)."""


class InstructionRow(Row):
    text: str
    """The wording trained on (in the first user turn): terse or verbose."""
    sampling_text: str
    """The full wording attached to every user turn while sampling."""
    terse: bool
    """Whether `text` is the terse rewrite."""
    aggregate: str
    """How the constraints' scores combine into the verifier score ("mean" or "min")."""
    constraints: list[ConstraintRow]
    """The constraints the instruction combines."""


class RewardRow(Row):
    total: float
    """The weighted reward the candidate was ranked on."""
    verifier: float
    """The instruction's verifier score, 0 to 1."""
    relevance: float | None
    """Cosine of the question and the reply without the instruction's words; null: not computed."""
    reward_model: float | None
    """The reward model's score; null: no reward model."""
    reason: str
    """Why the verifiers scored it so."""


class RepeatRow(Row):
    similarity: float
    """Similarity to the closest earlier reply of the dialogue, 0 to 1."""
    turn: int | None
    """That reply's turn; null: no earlier reply."""


class EchoRow(Row):
    share: float
    """How much of the question the reply repeats, 0 to 1."""
    is_echo: bool
    """Whether that refused it (reward.max_echo)."""


class CandidateRow(Row):
    text: str
    """What was scored and may be trained on: the reply cut back to its last whole sentence."""
    raw: str
    """What the model generated."""
    finished: bool
    """Whether the model ended the reply itself (not cut by max_new_tokens)."""
    tokens: int
    """Tokens generated."""
    reward: RewardRow
    """Its reward and the parts of it."""
    repeat: RepeatRow
    """The closest earlier reply of the dialogue."""
    echo: EchoRow
    """How much of the question it repeats."""
    eligible: bool
    """Ranked on its reward; false: never chosen (empty, a copy, an echo, or not relevant enough)."""


class TurnStatsRow(Row):
    mean_reward: float
    """Mean reward of the K candidates (ineligible ones count 0)."""
    max_reward: float
    """Best reward of the K candidates."""
    pass_rate: float
    """Share of candidates at or above the threshold."""
    gain: float
    """What choosing gained over a random candidate: max_reward - mean_reward."""


class TurnRow(Row):
    turn: int
    """The assistant turn sampled, from 0."""
    candidates: list[CandidateRow]
    """The K candidates, in sampling order."""
    chosen: int | None
    """Index of the kept candidate; null: none reached the threshold, and the dialogue stops here."""
    best: int | None
    """Index of the best-rewarded candidate (chosen unless it fell short)."""
    ranked: list[float]
    """The rewards the choice was made on (NaN where a candidate was not eligible)."""
    stats: TurnStatsRow
    """Statistics of the turn's candidates."""
    threshold: float | None
    """reward.min_reward, as applied."""


class SampleRow(Row):
    """One sampled dialogue of `samples.jsonl`: every candidate of every turn with its reward, and
    the choice."""

    index: int
    """Position of the dialogue in the corpus (as sampled)."""
    dialogue_id: str | None
    """The corpus dialogue's `id`, if it has one."""
    instruction: InstructionRow
    """The instruction it was sampled with."""
    system: str | None
    """The corpus dialogue's system message."""
    users: list[str]
    """The user turns sampled (at most data.max_turns)."""
    replies: list[str]
    """The assistant replies so far: corpus replies kept as context, then the chosen samples."""
    trained: list[bool]
    """Per reply: whether it carries loss (a chosen sample) or is context (a corpus reply)."""
    turns: list[TurnRow]
    """Each sampled turn: candidates, rewards, choice."""
    stopped: Literal["control_token", "context_length", "no_acceptable_candidate"] | None
    """Why the dialogue stopped before its last user turn; null: it did not."""


class MessageRow(Row):
    role: Literal["system", "user", "assistant"]
    """Who speaks."""
    content: str
    """What is said."""


class RejectedRow(Row):
    candidate: int
    """Its position among the turn's candidates in `samples.jsonl`."""
    text: str
    """The rejected reply (for one that says nothing and was cut, its raw text)."""
    reason: Literal["copy", "echo", "says nothing", "ranked lower"]
    """Why it was picked: it copies an earlier reply, echoes the question, says nothing past the
    instruction (fewer than two words, `training.dpo.rejected` "degenerate"), or ranked lowest."""
    margin: float
    """The kept reply's ranked reward minus this one's."""


class TrainingRow(Row):
    """One training dialogue of `training_set.jsonl`, as the model sees it."""

    history: Literal["sampled", "corpus", "replay"]
    """What the trained replies stand on: the dialogue as sampled, the corpus's own earlier replies
    (data.train_history), or a plain corpus dialogue (data.replay)."""
    index: int
    """The corpus dialogue it comes from."""
    dialogue_id: str | None
    """That dialogue's `id`, if it has one."""
    scope: str
    """The loss scope applied: "all_turns" or "last_turn"."""
    fallback_reason: str | None
    """Why all_turns fell back to one example per reply; null: it did not."""
    messages: list[MessageRow]
    """The training dialogue: the instruction only in the first user turn (or the system message)."""
    trained: list[bool]
    """Per message: whether it carries loss."""
    trained_spans: list[list[str]]
    """Per example, the exact texts it carries loss on, decoded from its masked tokens."""
    tokens: int
    """Tokens of the dialogue's examples."""
    trained_tokens: int
    """Tokens that carry loss."""
    rejected: RejectedRow | None = None
    """A preference pair (training.objective "dpo" or "sft+dpo"): the candidate of the same turn
    trained against the kept reply, in the same context; null: an SFT row."""
