"""What a training step minimises. An objective turns examples into batches and a batch into a
loss summed over its units; the loop divides by the step's units, counted before any forward
pass, so that every unit weighs the same however the micro-batches fall.

`MaskedSFT` is GAtt's objective: cross-entropy on the tokens of the trained replies only (the
loss mask of `gatt.masks`), its unit one trained token. A preference objective (DPO) is the next
one: its batches hold pairs of replies and its unit is a pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from gatt.masks import IGNORE_INDEX, TokenizedExample
from workers.engine.models import unwrap


class Objective(Protocol):
    def collate(self, examples: Sequence[TokenizedExample]) -> Batch:
        """One micro-batch of examples, on the CPU."""
        ...

    def units(self, batch: Batch) -> int:
        """What the step's loss is averaged over (trained tokens, pairs, ...)."""
        ...

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        """The loss summed (not averaged) over the batch's units, as a 0-d fp32 tensor."""
        ...


@dataclass(frozen=True)
class MaskedSFT:
    """Cross-entropy on trained tokens only: GAtt's loss mask."""

    pad_id: int

    def collate(self, examples: Sequence[TokenizedExample]) -> Batch:
        return collate(examples, self.pad_id)

    def units(self, batch: Batch) -> int:
        return batch.n_trained

    def loss(self, model: Any, batch: Batch) -> torch.Tensor:
        return summed_loss(model, batch)


def trained_labels(example: TokenizedExample) -> list[int]:
    """The labels that train: inside a span and not IGNORE_INDEX; everything else ignored."""
    labels = [IGNORE_INDEX] * len(example.input_ids)
    for start, end in example.spans:
        labels[start:end] = example.labels[start:end]
    return labels


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T), 0 on padding
    labels: torch.Tensor  # (B, T), IGNORE_INDEX outside trained spans and on padding

    @property
    def n_trained(self) -> int:
        """Tokens that carry loss: position 0 predicts nothing, so its label never counts."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(trained_labels(example), dtype=torch.long)
    return Batch(input_ids, attention_mask, labels)


# Architectures whose logits are exactly `lm_head(decoder(...).last_hidden_state)`: no softcapping
# (Gemma 2), logit scaling (Cohere, Granite) or other post-processing in their CausalLM forward.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and output head of a plain causal LM (through a peft wrapper), else None."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def summed_loss(model: Any, batch: Batch, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over the batch's trained tokens, in fp32.

    Logits at position t predict the token at t+1. Most positions of a GAtt example train nothing
    (the instruction, the user turns, the earlier context), and the vocabulary projection, its fp32
    copy and the softmax are the costliest per-position work of a small model's step; so logits are
    computed only where a token trains. For plain causal LMs the output head runs on exactly those
    hidden states; for others the model is asked for logits at the columns that train in some row
    (`logits_to_keep` with indices: the model's own head, softcapping or scaling included).

    `position_ids` (restarting at 0 for each example) marks a packed batch: several examples end to
    end in a row, no attention mask; transformers then keeps attention within each example.
    """
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
    if position_ids is None:
        inputs["attention_mask"] = batch.attention_mask
    else:
        inputs["position_ids"] = position_ids
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state
        logits = head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    columns = keep.any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=columns).logits
    targets = targets[:, columns]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
