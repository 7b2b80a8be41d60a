"""Validation loss (workers/engine/validation.py) on a tiny Llama with Llama-3's real chat template,
checked against transformers' own loss for the same masked sequence (`model(..., labels=...)`)."""

from __future__ import annotations

import torch

from gatt.augment import training_dialogue
from gatt.dialogues import Dialogue
from gatt.masks import build_examples
from tests.threads import one_torch_thread
from tests.workers.tiny import tiny_llama3
from workers.engine.validation import validation_loss

ONE = Dialogue.from_messages(
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ],
    id="one",
)
# It ends on a user turn: only the reply before it counts.
GAP = Dialogue.from_messages(
    [
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time a dragon learned to paint."},
        {"role": "user", "content": "And then?"},
    ],
    id="gap",
)


def _reference(loaded, users, replies, system=None) -> tuple[float, int]:
    """transformers' own mean loss over the masked tokens, and how many there are."""
    view = training_dialogue(None, users, replies, [True] * len(replies), system=system)
    (example,) = build_examples(loaded.tokenizer, view, "all_turns").examples
    ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
    with torch.inference_mode():
        loss = loaded.model(input_ids=ids, labels=labels).loss.item()
    return loss, example.n_trained


def test_the_loss_is_transformers_loss_over_the_replies_token_weighted() -> None:
    with one_torch_thread():
        loaded = tiny_llama3(512)
        first, n1 = _reference(
            loaded, ["What is the capital of France?", "And of Italy?"], ["Paris.", "Rome."], "Be brief."
        )
        second, n2 = _reference(loaded, ["Tell me a story."], ["Once upon a time a dragon learned to paint."])
        got = validation_loss(loaded, [ONE, GAP], max_seq_len=512)
    assert got["dialogues"] == 2 and got["tokens"] == n1 + n2
    assert abs(got["loss"] - (first * n1 + second * n2) / (n1 + n2)) < 1e-3


def test_sequences_longer_than_training_takes_are_left_out() -> None:
    with one_torch_thread():
        loaded = tiny_llama3(512)
        assert validation_loss(loaded, [ONE], max_seq_len=8) == {"loss": None, "tokens": 0, "dialogues": 0}
