"""Token-level loss masks, derived from the model's own chat template.

Step 2 of the loss mask (step 1 is `gatt.augment.training_dialogue`, which marks the messages
that train). Labels are `IGNORE_INDEX` everywhere except the tokens of each trained reply and the
end-of-turn token that closes it; nothing of the next turn's header is trained.

Spans come from *incremental rendering*, never from guessed token strings: for the reply at
message k, the template renders `messages[:k]` with the generation prompt (G) and
`messages[:k+1]` (F). The reply's tokens are those of F after those of G, up to and including the
first special token: the template's own end-of-turn marker (`<|im_end|>`, `</s>`, `<|eot_id|>`).
That only works if G's tokens are a prefix of F's tokens; otherwise the template cannot be masked
reliably and we refuse (`TemplateError`) rather than train on the wrong tokens.

Two loss scopes:

- `last_turn` (the paper): one example per trained reply, the dialogue cut after that reply, loss
  on it alone. O(n^2) tokens for n turns.
- `all_turns`: one sequence, loss on every trained reply. For a causal LM a token's logits depend
  only on the tokens before it, so this is the same summed loss at O(n) tokens *if* every cut
  renders to a token prefix of the whole dialogue. We check that for each dialogue; where a
  template breaks it (for instance one that rewrites earlier assistant turns), we fall back to
  per-cut examples and say why in `MaskedDialogue.fallback_reason`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gatt.augment import TrainingDialogue
from gatt.errors import GattError

IGNORE_INDEX = -100
Scope = Literal["last_turn", "all_turns"]
SCOPES: tuple[Scope, ...] = ("last_turn", "all_turns")


class TemplateError(GattError, ValueError):
    """The chat template (or a message) does not allow exact masking of a reply."""

    job_code = "chat_template"


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence. `spans` are the [start, end) token ranges that carry loss."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise AssertionError("labels must be as long as input_ids")

    @property
    def n_trained(self) -> int:
        return sum(end - start for start, end in self.spans)


@dataclass(frozen=True)
class MaskedDialogue:
    """The examples one training dialogue yields, and the scope actually used."""

    examples: tuple[TokenizedExample, ...]
    scope: Scope
    fallback_reason: str | None = None

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def n_trained(self) -> int:
        return sum(e.n_trained for e in self.examples)


def control_tokens(tokenizer: Any) -> dict[int, str]:
    """The tokenizer's special (control) tokens: id -> text."""
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def render(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def encode(tokenizer: Any, text: str) -> list[int]:
    # The rendered template already holds BOS and every marker; adding special tokens again
    # would double them.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_contents(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> None:
    """Refuse message text that spells a control token.

    Such text would tokenize to the control token itself, letting a user forge turn boundaries,
    and would end a reply span early.
    """
    controls = sorted(set(control_tokens(tokenizer).values()))
    for i, msg in enumerate(messages):
        for token in controls:
            if token in msg["content"]:
                raise TemplateError(f"messages[{i}].content contains the control token {token!r}")


def end_of_turn_token(tokenizer: Any) -> int:
    """The control token the template closes an assistant turn with, found by rendering a probe.

    Looking for "the first control token" inside real replies would stop early at an `<unk>`, so
    the marker is learnt once from a reply that holds nothing unusual.
    """
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    prompt = encode(tokenizer, render(tokenizer, probe[:1], generation_prompt=True))
    cut = encode(tokenizer, render(tokenizer, probe, generation_prompt=False))
    skip = {tokenizer.unk_token_id}
    for token in cut[len(prompt) :]:
        if token in control_tokens(tokenizer) and token not in skip:
            return token
    raise TemplateError(
        "the template closes assistant turns with no special end-of-turn token; "
        "generation could not stop where training says a reply ends"
    )


def reply_tokens(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], k: int, end_of_turn: int | None = None
) -> tuple[list[int], int, int]:
    """Tokens of the dialogue cut after message k, and the [start, end) span of reply k in them.

    The span covers the reply and the end-of-turn token that closes it, nothing after.
    """
    if messages[k]["role"] != "assistant":
        raise ValueError(f"message {k} is a {messages[k]['role']} message, not a reply")
    if end_of_turn is None:
        end_of_turn = end_of_turn_token(tokenizer)
    prompt = encode(tokenizer, render(tokenizer, messages[:k], generation_prompt=True))
    cut = encode(tokenizer, render(tokenizer, messages[: k + 1], generation_prompt=False))
    if cut[: len(prompt)] != prompt:
        raise TemplateError(
            f"the template's generation prompt for message {k} does not tokenize to a prefix of the "
            "rendered reply; replies cannot be masked exactly with this template"
        )
    # check_contents keeps the marker's text out of every message, so its first occurrence after
    # the prompt is the one that closes this reply.
    try:
        end = cut.index(end_of_turn, len(prompt))
    except ValueError:
        raise TemplateError(f"reply {k} is not closed by the template's end-of-turn token") from None
    return cut, len(prompt), end + 1


def _example(ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> TokenizedExample:
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return TokenizedExample(tuple(ids), tuple(labels), tuple(spans))


def build_examples(tokenizer: Any, dialogue: TrainingDialogue, scope: Scope = "all_turns") -> MaskedDialogue:
    """Tokenize a training dialogue into loss-masked examples under `scope`."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
    messages = dialogue.messages
    check_contents(tokenizer, messages)
    trained = [k for k, flag in enumerate(dialogue.trained) if flag]
    end_of_turn = end_of_turn_token(tokenizer)
    cuts = {k: reply_tokens(tokenizer, messages, k, end_of_turn) for k in trained}
    per_cut = tuple(_example(ids[:end], [(start, end)]) for ids, start, end in cuts.values())
    if scope == "last_turn" or not trained:
        return MaskedDialogue(per_cut, "last_turn" if scope == "last_turn" else scope)

    # all_turns: one sequence up to the last trained reply; valid only if every cut is a prefix.
    full = encode(tokenizer, render(tokenizer, messages[: trained[-1] + 1], generation_prompt=False))
    for k, (ids, _start, end) in cuts.items():
        if full[:end] != ids[:end]:
            reason = (
                f"the dialogue cut after message {k} does not tokenize to a prefix of the whole "
                "dialogue under this chat template, so one sequence would train on a different "
                "context than the reply was cut from; used per-cut examples instead"
            )
            return MaskedDialogue(per_cut, "last_turn", fallback_reason=reason)
    last_end = cuts[trained[-1]][2]
    spans = [(start, end) for _ids, start, end in cuts.values()]
    return MaskedDialogue((_example(full[:last_end], spans),), "all_turns")


def trained_text(tokenizer: Any, example: TokenizedExample) -> list[str]:
    """Each trained span decoded, special tokens kept: the readable form of what a step trains on."""
    return [
        tokenizer.decode(list(example.input_ids[start:end]), skip_special_tokens=False)
        for start, end in example.spans
    ]


def fit_to_length(example: TokenizedExample, max_len: int) -> TokenizedExample | None:
    """Cut an example to at most `max_len` tokens without ever cutting a reply in half.

    The rule: keep the longest prefix that ends on a trained span's end (its end-of-turn token);
    later replies are dropped whole. If not even the first trained reply fits, the example is
    dropped (None): a reply without its ending would teach the model to stop mid-sentence, and
    cutting from the left would drop the instruction the reply depends on.
    """
    if len(example.input_ids) <= max_len:
        return example
    kept = [(start, end) for start, end in example.spans if end <= max_len]
    if not kept:
        return None
    end = kept[-1][1]
    return _example(example.input_ids[:end], kept)
