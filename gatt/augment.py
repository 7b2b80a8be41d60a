"""Where the instruction goes: every user turn while sampling, the first turn only for training.

GAtt's whole trick lives in the difference between two views of one dialogue:

- the *sampling* view attaches the instruction to every user turn, so that the current model,
  seeing it right next to each question, follows it far more often than when told once;
- the *training* view keeps the instruction only in the first user turn (or in the system
  message), and trains on the replies sampled under the first view. The model learns to act as
  if the instruction were still next to the turn.

Both views are plain chat messages (`[{"role", "content"}]`) that any chat template renders.
Which messages carry loss is decided here too (`TrainingDialogue.trained`), as a separate step
from turning messages into tokens (`gatt.masks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gatt.dialogues import leading_replies

Attach = Literal["prefix", "suffix"]
Keep = Literal["first_user", "system"]
History = Literal["sampled", "corpus", "both"]

# A blank line keeps the instruction visibly apart from the user's own words in every template.
SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Placement:
    """How the instruction is placed.

    `attach`: on which side of each user message the instruction goes while sampling.
    `keep`: where it stays in the training dialogue: prefixed/suffixed to the first user turn
    (the paper's `[inst+u1, a1, u2, ...]`), or as (the start of) the system message, for templates
    that have one. With `keep="system"` the sampling view carries it in the system message too,
    so that the two views differ only by the per-turn copies.
    """

    attach: Attach = "prefix"
    """Where the instruction goes on each user turn while sampling: before it or after it."""
    keep: Keep = "first_user"
    """Where it stays in the training dialogue: on the first user turn, or in the system message."""

    def __post_init__(self) -> None:
        if self.attach not in ("prefix", "suffix"):
            raise ValueError(f"attach must be 'prefix' or 'suffix', not {self.attach!r}")
        if self.keep not in ("first_user", "system"):
            raise ValueError(f"keep must be 'first_user' or 'system', not {self.keep!r}")


def attach(instruction: str, user_text: str, where: Attach = "prefix") -> str:
    """The user message with the instruction attached on one side."""
    if where == "prefix":
        return f"{instruction}{SEPARATOR}{user_text}"
    return f"{user_text}{SEPARATOR}{instruction}"


def _system_with(instruction: str | None, system: str | None) -> str | None:
    if instruction is None:
        return system
    return instruction if not system else f"{instruction}{SEPARATOR}{system}"


def _messages(system: str | None, users: Sequence[str], replies: Sequence[str]) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system is not None else []
    for i, user in enumerate(users):
        out.append({"role": "user", "content": user})
        if i < len(replies):
            out.append({"role": "assistant", "content": replies[i]})
    return out


def sampling_messages(
    instruction: str,
    users: Sequence[str],
    replies: Sequence[str],
    *,
    system: str | None = None,
    placement: Placement = Placement(),
) -> list[dict[str, str]]:
    """Context for sampling the reply to `users[len(replies)]`: the instruction on every user turn.

    `replies` are the replies chosen so far (one per earlier user turn); the returned messages end
    with the user turn to answer, ready for `add_generation_prompt=True`.
    """
    turn = len(replies)
    if turn >= len(users):
        raise ValueError(f"no user turn left to answer: {len(users)} user turns, {turn} replies")
    augmented = [attach(instruction, u, placement.attach) for u in users[: turn + 1]]
    sys = _system_with(instruction, system) if placement.keep == "system" else system
    return _messages(sys, augmented, replies)


def plain_messages(
    instruction: str | None,
    users: Sequence[str],
    replies: Sequence[str],
    *,
    system: str | None = None,
    placement: Placement = Placement(),
) -> list[dict[str, str]]:
    """The dialogue with the instruction given once: first user turn, or system message.

    This is the training view, and also the "instruction given once" condition of evaluation.
    With `instruction=None` it is the bare dialogue.
    """
    users = list(users)
    if instruction is not None and placement.keep == "first_user" and users:
        users[0] = attach(instruction, users[0], placement.attach)
    sys = _system_with(instruction, system) if placement.keep == "system" else system
    return _messages(sys, users, replies)


@dataclass(frozen=True)
class TrainingDialogue:
    """A GAtt training dialogue: messages plus which assistant messages carry loss.

    `trained[i]` is True only for assistant messages that are accepted samples. Earlier turns that
    came from a corpus, and samples that no candidate passed the reward threshold for, stay as
    context with zero loss.
    """

    messages: tuple[dict[str, str], ...]
    trained: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.messages) != len(self.trained):
            raise ValueError("one trained flag per message")
        for msg, flag in zip(self.messages, self.trained, strict=True):
            if flag and msg["role"] != "assistant":
                raise ValueError(f"only assistant messages can be trained, not {msg['role']!r}")

    @property
    def n_trained(self) -> int:
        return sum(self.trained)


def training_dialogue(
    instruction: str | None,
    users: Sequence[str],
    replies: Sequence[str],
    trained: Sequence[bool],
    *,
    system: str | None = None,
    placement: Placement = Placement(),
) -> TrainingDialogue:
    """Step 1 of the loss mask: the training view and which of its replies train.

    `trained[i]` says whether `replies[i]` was sampled and accepted (True) or is context only
    (False: a corpus reply kept as is). Replies after the last user turn are not allowed.
    `instruction=None` is a plain dialogue (replay of the corpus, with no instruction).
    """
    if len(replies) > len(users):
        raise ValueError(f"{len(replies)} replies for {len(users)} user turns")
    if len(trained) != len(replies):
        raise ValueError("one trained flag per reply")
    # Surrounding whitespace is dropped: Llama templates strip it anyway, and whitespace at the
    # start of a reply can merge with the generation prompt's last token, which would leave the
    # reply without an exact token span.
    replies = [r.strip() for r in replies]
    messages = plain_messages(instruction, users, replies, system=system, placement=placement)
    flags = []
    reply_index = 0
    for msg in messages:
        if msg["role"] == "assistant":
            flags.append(bool(trained[reply_index]))
            reply_index += 1
        else:
            flags.append(False)
    return TrainingDialogue(tuple(messages), tuple(flags))


def corpus_history(
    replies: Sequence[str],
    trained: Sequence[bool],
    corpus_replies: Sequence[str | None],
    *,
    include_first: bool = True,
) -> list[tuple[list[str], list[bool]]]:
    """Each trained sampled reply on the corpus's own earlier replies: `(replies, trained)` pairs.

    A reply sampled on the model's own adherent history can be learnt as "go on like the replies
    above" instead of "do what the first turn asked". Put after the corpus's replies, which were
    not written under the instruction, the same reply can only be explained by the instruction:
    that is memory, and it gives nothing to copy. Loss is on the sampled reply alone. Stops at the
    first earlier turn the corpus has no reply for. `include_first=False` leaves out turn 1, whose
    history is empty (the sampled dialogue already trains it).
    """
    earlier = leading_replies(corpus_replies)
    views = []
    for k, flag in enumerate(trained[: len(earlier) + 1]):
        if flag and (k > 0 or include_first):
            views.append(([*earlier[:k], replies[k]], [False] * k + [True]))
    return views
