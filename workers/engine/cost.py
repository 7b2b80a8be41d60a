"""What a job will cost, bounded before it runs: the tokens it can generate, from its options and
its corpus's counts. The service refuses a job whose bound passes its limit before queueing it
(`GATT_MAX_JOB_GENERATED_TOKENS`) and keeps the figure on the job.

Generation dominates a GAtt job: K candidates of up to `sampling.max_new_tokens` for every sampled
turn of every round (drawn again up to `sampling.retries` times), the evaluation's replies for
both models, and the model's own lists of values when asked for.
Every reply is counted at its longest, so real jobs generate less. Training is bounded by what
sampling keeps, and its time by the job time limit. Torch-free: the API imports it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from workers.engine.config import JobOptions


@dataclass(frozen=True)
class Cost:
    sampled_turns: int  # at most this many turns are sampled
    sampling_tokens: int
    evaluation_tokens: int
    values_tokens: int

    @property
    def generated_tokens(self) -> int:
        return self.sampling_tokens + self.evaluation_tokens + self.values_tokens

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "generated_tokens": self.generated_tokens}


def estimate(
    options: JobOptions, dialogues: int, user_turns: int, validation_dialogues: int | None = None
) -> Cost:
    """The bound for a job with `options` on a corpus of `dialogues` with `user_turns` in all, the
    evaluation holding out the corpus's tail or, given, dialogues of a validation corpus."""
    evaluation = options.evaluation
    held_from = dialogues if validation_dialogues is None else validation_dialogues
    heldout = min(held_from, evaluation.heldout_dialogues) if evaluation.enabled else 0
    sampled = dialogues - (heldout if validation_dialogues is None else 0)
    if options.data.max_dialogues is not None:
        sampled = min(sampled, options.data.max_dialogues)
    # "all" samples every user turn of the first max_turns; "last" one turn per dialogue.
    per_dialogue = options.data.max_turns if options.data.sample_turns == "all" else 1
    # Each round samples them all again.
    turns = min(sampled * per_dialogue, user_turns) * options.rounds.count
    # At most: every turn drawn again as often as sampling.retries allows.
    draws = 1 + options.sampling.retries
    sampling = turns * draws * options.sampling.k * options.sampling.max_new_tokens
    # Both models, each held-out dialogue, turn and condition: one reply each.
    replies = 2 * heldout * evaluation.turns * len(evaluation.conditions) if evaluation.enabled else 0
    values = options.values
    lists = len(values.families) * values.samples * values.max_new_tokens if values.enabled else 0
    return Cost(turns, sampling, replies * evaluation.max_new_tokens, lists)
