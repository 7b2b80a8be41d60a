"""What a training step minimises. An objective turns examples into batches and a batch into a
loss summed over its units; the loop divides by the step's units, counted before any forward
pass, so that every unit weighs the same however the micro-batches fall.

`MaskedSFT` is GAtt's objective: cross-entropy on the tokens of the trained replies only (the
loss mask of `gatt.masks`), its unit one trained token. `workers.engine.dpo.DPO` is the
preference objective: its batches hold pairs of replies and its unit is a pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from gatt.masks import IGNORE_INDEX, TokenizedExample
from workers.engine.models import unwrap
from workers.engine.schedule import first_fit

if TYPE_CHECKING:  # distributed.py builds on this module
    from workers.engine.distributed import Ranks


class Objective(Protocol):
    def begin(
        self, model: Any, data: Sequence[Any], out_dir: Path, *, resuming: bool, ranks: Ranks
    ) -> Sequence[Any]:
        """Before the first step of this call, with the model ready to train (sharded where the run
        shards): the data the steps take their micro-batches from (DPO attaches the reference
        model's log-probabilities). Every rank calls it."""
        ...

    def collate(self, examples: Sequence[Any]) -> Any:
        """One micro-batch of examples, on the CPU."""
        ...

    def units(self, batch: Any) -> int:
        """What the step's loss is averaged over (trained tokens, pairs, ...)."""
        ...

    def loss(self, model: Any, batch: Any) -> Loss:
        """The loss summed (not averaged) over the batch's units, and the objective's own tallies."""
        ...


@dataclass(frozen=True)
class Loss:
    summed: torch.Tensor  # 0-d fp32: the batch's loss summed over its units
    # Metric name -> (sum, count) over the batch: the step's metrics row gets sum / count of each.
    tallies: dict[str, tuple[float, int]] = field(default_factory=dict)


def add_tallies(total: dict[str, tuple[float, int]], more: dict[str, tuple[float, int]]) -> None:
    """Add `more`'s (sum, count) tallies into `total`, metric by metric."""
    for name, (value, count) in more.items():
        before = total.get(name, (0.0, 0))
        total[name] = (before[0] + value, before[1] + count)


@dataclass(frozen=True)
class MaskedSFT:
    """Cross-entropy on trained tokens only: GAtt's loss mask. With `row_len`, each micro-batch's
    examples are packed end to end into rows of that many tokens instead of padded (`pack`); with
    `rows` too, into exactly that many rows."""

    pad_id: int
    row_len: int | None = None
    rows: int | None = None

    def begin(
        self, model: Any, data: Sequence[Any], out_dir: Path, *, resuming: bool, ranks: Ranks
    ) -> Sequence[Any]:
        return data

    def collate(self, examples: Sequence[TokenizedExample]) -> Batch:
        if self.row_len is not None:
            return pack(examples, self.pad_id, self.row_len, self.rows)
        return collate(examples, self.pad_id)

    def units(self, batch: Batch) -> int:
        return batch.n_trained

    def loss(self, model: Any, batch: Batch) -> Loss:
        return Loss(summed_loss(model, batch))


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
    # A packed batch: the lengths of the examples laid end to end in each row, from its start (the
    # row's padded tail is not listed). None: one example per row.
    lengths: tuple[tuple[int, ...], ...] | None = None

    @property
    def n_trained(self) -> int:
        """Tokens that carry loss: position 0 predicts nothing, so its label never counts."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), self.lengths
        )

    def documents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Of a packed batch: each position's example number within its row (the padded tail is one
        more) and its position within that example, both (B, T) on the batch's device."""
        if self.lengths is None:
            raise ValueError("not a packed batch")
        rows, width = self.input_ids.shape
        document = torch.empty((rows, width), dtype=torch.long)
        position = torch.empty((rows, width), dtype=torch.long)
        for row, lengths in enumerate(self.lengths):
            offset = 0
            for number, n in enumerate((*lengths, width - sum(lengths))):
                document[row, offset : offset + n] = number
                position[row, offset : offset + n] = torch.arange(n)
                offset += n
        device = self.input_ids.device
        return document.to(device), position.to(device)


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


def pack(examples: Sequence[TokenizedExample], pad_id: int, row_len: int, rows: int | None = None) -> Batch:
    """The examples end to end in rows of `row_len` tokens, padded only at each row's end.

    First fit, longest first (ties by position), so the rows are a function of the examples alone:
    a resumed run packs its micro-batches as before. With `rows`: first fit in the order given
    (how `schedule.TokenBatches` cut them, so they fit), and empty rows up to `rows`, so that every
    micro-batch has one shape. The first token of each example trains nothing, as in a padded row,
    so a packed micro-batch carries exactly the loss of the padded one; attention must stay within
    each example (`summed_loss` sees to it).
    """
    lengths = [len(e.input_ids) for e in examples]
    if rows is None:
        order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
        placed = first_fit([lengths[i] for i in order], row_len)
        assert placed is not None  # no row limit
        layout = [[order[p] for p in row] for row in placed]
    else:
        fitted = first_fit(lengths, row_len, rows)
        if fitted is None:
            raise ValueError(f"{len(examples)} examples of {sum(lengths)} tokens do not fit {rows} rows")
        layout = fitted + [[] for _ in range(rows - len(fitted))]
    input_ids = torch.full((len(layout), row_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(layout), row_len), dtype=torch.long)
    labels = torch.full((len(layout), row_len), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(layout):
        offset = 0
        for i in row:
            example = examples[i]
            n = len(example.input_ids)
            example_labels = trained_labels(example)
            example_labels[0] = IGNORE_INDEX  # would be predicted from the example before it
            input_ids[r, offset : offset + n] = torch.tensor(example.input_ids, dtype=torch.long)
            attention_mask[r, offset : offset + n] = 1
            labels[r, offset : offset + n] = torch.tensor(example_labels, dtype=torch.long)
            offset += n
    return Batch(input_ids, attention_mask, labels, tuple(tuple(lengths[i] for i in row) for row in layout))


def _document_mask(document: torch.Tensor) -> Any:
    """Flex attention's block mask for packed rows: causal, within each example."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_example(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return (document[b, q] == document[b, kv]) & (q >= kv)

    rows, width = document.shape
    # Compiled on a GPU, as transformers does: evaluated eagerly, the mask function runs over every
    # (query, key) pair of every row, each step.
    return create_block_mask(
        same_example,
        B=rows,
        H=None,
        Q_LEN=width,
        KV_LEN=width,
        device=document.device,
        _compile=document.device.type == "cuda",
    )


# Architectures whose logits are exactly `lm_head(decoder(...).last_hidden_state)`: no softcapping
# (Gemma 2), logit scaling (Cohere, Granite) or other post-processing in their CausalLM forward.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def decoder_and_head(model: Any) -> tuple[Any, Any] | None:
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
    computed only where a token trains (`trained_logits`).
    """
    logits, targets, _rows = trained_logits(model, batch, position_ids)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def sequence_logps(model: Any, batch: Batch) -> torch.Tensor:
    """Each row's summed log-probability of its trained tokens, fp32, shape (rows,): what DPO
    compares. Rows with no trained token get 0."""
    logits, targets, rows = trained_logits(model, batch)
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    summed = torch.zeros(batch.input_ids.shape[0], dtype=torch.float32, device=token_logps.device)
    return summed.index_add(0, rows, token_logps)


def trained_logits(
    model: Any, batch: Batch, position_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits at the positions whose next token trains, those tokens, and each one's row.

    For plain causal LMs the output head runs on exactly those hidden states; for others the model
    is asked for logits at the columns that train in some row (`logits_to_keep` with indices: the
    model's own head, softcapping or scaling included).

    A packed batch (`pack`, or `position_ids` restarting at 0 for each example) has several
    examples end to end in a row and attends within each: under flex attention through a block
    mask built here from the examples' lengths, outside any compiled layer; otherwise transformers
    derives the same mask from `position_ids`.
    """
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
    if batch.lengths is not None:
        document, inputs["position_ids"] = batch.documents()
        if getattr(unwrap(model).config, "_attn_implementation", None) == "flex_attention":
            inputs["attention_mask"] = _document_mask(document)
    elif position_ids is None:
        inputs["attention_mask"] = batch.attention_mask
    else:
        inputs["position_ids"] = position_ids
    # Sharded (FSDP2), weights are gathered by the model's own forward: the decoder and the head
    # called apart would meet the root's shards (and a tied head is the embedding's weight).
    parts = None if isinstance(model, FSDPModule) else decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state
        return head(hidden[:, :-1][keep]), targets[keep], keep.nonzero()[:, 0]
    columns = keep.any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=columns).logits
    targets = targets[:, columns]
    keep = targets != IGNORE_INDEX
    return logits[keep], targets[keep], keep.nonzero()[:, 0]
