"""Keys and values of prompts already run, so that a dialogue's next turn prefills only what is new.

A rollout renders the whole dialogue again at every turn: turn t's prompt is turn t-1's prompt, the
reply and the next user message. Without reuse, turn 8 of an evaluation prefills eight turns to
sample one reply, and the prefill grows to most of the cost (docs/benchmarks.md, "Prefix reuse").
The store keeps each prompt row's keys and values after its prefill; a later prompt takes the
entry sharing its longest prefix and only the rest is run through the model.

What makes reuse exact: the keys and values of a token depend only on the tokens before it and on
its position, and position ids count real tokens (sampling.py), so a row's cached part means the
same whatever batch, padding or turn computed it. The match is by content, not by dialogue, so it
holds whatever the chat template re-renders: where a template writes an earlier turn differently
(a reply re-tokenized after it was trimmed), the match ends there and the rest is prefilled.
Sampled tokens can still differ from a full prefill in the last bits of float rounding, as they do
between batches of different padding.

Entries are found through chained hashes of 16-token blocks, so a lookup costs one pass over the
prompt. An entry whose tokens are a prefix of a new one's is dropped (the new entry serves every
prompt the old one did), so a dialogue holds one entry; beyond the budget the least recently used
go. The store lives in one stage's rollout (weights that change, in training, must not meet old
entries), and the stages empty it before each chunk of dialogues: a chunk then computes the same
whatever ran before it, so a resumed job samples what an uninterrupted one would.

Ours, like the sampling loop it serves: prefix caching is what vLLM does on a GPU (its
"automatic prefix caching"); transformers has no cross-call cache for batched, left-padded rows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

BLOCK = 16  # tokens per hashed block: a match is found to the block, then extended token by token
DEFAULT_BUDGET_BYTES = 2 << 30


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer (heads, len(tokens), head_dim)
    values: list[torch.Tensor]
    hashes: list[int]  # the chained hash after each full block

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class Cached(NamedTuple):
    """What the store holds for a batch of prompts: the cache to prefill from (None where no row
    has a match), its attention mask (1 on a row's matched tokens, right-aligned) and each row's
    matched length."""

    cache: DynamicCache | None
    mask: torch.Tensor
    matched: list[int]

    @classmethod
    def nothing(cls, rows: int, device: torch.device) -> Cached:
        return cls(None, torch.zeros((rows, 0), dtype=torch.long, device=device), [0] * rows)


class PrefixStore:
    """Per-row keys and values of prompts, looked up by longest common prefix."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()  # least recent first
        self._by_hash: dict[int, _Entry] = {}
        self._bytes = 0
        self.reused = 0  # prompt tokens served from the store
        self.prefilled = 0  # prompt tokens run through the model

    @staticmethod
    def supports(model) -> bool:
        """Only plain full-attention layers hold every earlier token's keys and values; a sliding
        window or a recurrent state cannot be cut at an arbitrary prefix."""
        layers = DynamicCache(config=model.config).layers
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def lookup(self, prompts: Sequence[Sequence[int]], model, device: torch.device) -> Cached:
        """The longest stored prefix of each prompt, as a left-padded cache. At least a prompt's last
        token is left to prefill: the next token's logits are not stored."""
        found = [self._match(p) for p in prompts]
        matched = [n for _, n in found]
        self.reused += sum(matched)
        self.prefilled += sum(len(p) for p in prompts) - sum(matched)
        width = max(matched, default=0)
        if width == 0:
            return Cached.nothing(len(prompts), device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        entry = next(e for e, n in found if n)
        layers = len(entry.keys)
        cache = DynamicCache(config=model.config)
        for layer in range(layers):
            shape = (len(prompts), *entry.keys[layer].shape[:1], width, entry.keys[layer].shape[-1])
            keys = entry.keys[layer].new_zeros(shape)
            values = entry.values[layer].new_zeros(shape)
            for row, (e, n) in enumerate(found):
                if n:
                    keys[row, :, width - n :] = e.keys[layer][:, :n]
                    values[row, :, width - n :] = e.values[layer][:, :n]
            cache.update(keys, values, layer)
        for row, n in enumerate(matched):
            mask[row, width - n :] = 1
        return Cached(cache, mask, matched)

    def store(self, prompts: Sequence[Sequence[int]], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Keep each prompt's keys and values from a prefilled batch `cache` whose attention `mask`
        marks the prompt's tokens (in order, possibly with gaps of padding between them)."""
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for row, prompt in enumerate(prompts):
            tokens = tuple(prompt)
            if len(tokens) < BLOCK or tokens in self._entries:  # never matched, or kept already
                continue
            columns = mask[row].nonzero().squeeze(1)
            if len(columns) != len(tokens):
                raise ValueError(
                    f"row {row}: the mask marks {len(columns)} tokens, the prompt has {len(tokens)}"
                )
            keys = [k[row].index_select(1, columns) for k, _ in layers]
            values = [v[row].index_select(1, columns) for _, v in layers]
            self._add(tokens, keys, values)

    def _match(self, prompt: Sequence[int]) -> tuple[_Entry | None, int]:
        best: _Entry | None = None
        blocks = 0
        for i, h in enumerate(_chain(prompt)):
            entry = self._by_hash.get(h)
            if entry is None:
                break
            best, blocks = entry, i + 1
        if best is None or tuple(prompt[: blocks * BLOCK]) != best.tokens[: blocks * BLOCK]:
            return None, 0  # no block in common (or a hash collision)
        n = blocks * BLOCK
        limit = min(len(best.tokens), len(prompt) - 1)
        while n < limit and best.tokens[n] == prompt[n]:
            n += 1
        n = min(n, len(prompt) - 1)
        if n <= 0:
            return None, 0
        self._entries.move_to_end(best.tokens)
        return best, n

    def _add(self, tokens: tuple[int, ...], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        entry = _Entry(tokens, keys, values, list(_chain(tokens)))
        if entry.nbytes > self.budget_bytes:
            return
        # An entry this one extends serves nothing this one does not.
        for h in reversed(entry.hashes):
            older = self._by_hash.get(h)
            if older is not None and tokens[: len(older.tokens)] == older.tokens:
                self._drop(older)
        self._entries[tokens] = entry
        self._bytes += entry.nbytes
        for h in entry.hashes:
            self._by_hash[h] = entry
        while self._bytes > self.budget_bytes:
            self._drop(next(iter(self._entries.values())))

    def _drop(self, entry: _Entry) -> None:
        if self._entries.pop(entry.tokens, None) is None:
            return
        self._bytes -= entry.nbytes
        for h in entry.hashes:
            if self._by_hash.get(h) is entry:
                del self._by_hash[h]

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._entries.clear()
        self._by_hash.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def _chain(tokens: Sequence[int]):
    """The chained hash after each full block of `tokens`."""
    h = 0
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        h = hash((h, tuple(tokens[start : start + BLOCK])))
        yield h
