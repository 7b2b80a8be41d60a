"""DPO on GAtt's preference pairs: a training objective for the loop in `training.py`.

Rejection sampling already ranks K candidates per turn under one context, so every kept reply
comes with candidates it beat: pairs for Direct Preference Optimization at no extra sampling
cost (`pairs.py` picks them and builds their training view). Per pair, with log-probabilities
summed over the reply's tokens only (the same masks as GAtt's SFT):

    loss = -log sigmoid(beta * ((chosen - chosen_ref) - (rejected - rejected_ref)))

the sigmoid loss of Rafailov et al. (2023), as TRL's `DPOTrainer` computes it
(`bench/dpo_trl.py` checks the two agree). "sft+dpo" adds `sft_weight` times the chosen reply's
mean token cross-entropy (TRL's `rpo_alpha`); a replayed corpus dialogue, which has no rejected
reply, then trains by that term alone. The unit of the step's average is one pair (or replay).

The reference is the model as this training run starts, its log-probabilities computed once,
before the first step, and kept in `reference_logps.json` beside the checkpoints: no second copy
of the weights, half the forward passes per step, and a resumed run uses the same values. For a
new LoRA adapter (its B matrices start at zero) the starting model is exactly the base model with
LoRA disabled; for a continued adapter it is the parent checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gatt.masks import IGNORE_INDEX, TokenizedExample
from workers.engine.distributed import Ranks
from workers.engine.objectives import Batch, Loss, collate, sequence_logps

REFERENCE_FILE = "reference_logps.json"


@dataclass(frozen=True)
class PreferencePair:
    """A turn's kept reply and a rejected candidate of the same turn, each after the same context.
    `rejected` None: a replayed corpus dialogue (sft+dpo), trained by cross-entropy only.
    `reference`: the reference model's log-probabilities of (chosen, rejected), set by `DPO.begin`."""

    chosen: TokenizedExample
    rejected: TokenizedExample | None
    reference: tuple[float, float | None] | None = None

    @property
    def examples(self) -> tuple[TokenizedExample, ...]:
        return (self.chosen,) if self.rejected is None else (self.chosen, self.rejected)

    @property
    def n_trained(self) -> int:
        return sum(e.n_trained for e in self.examples)


@dataclass(frozen=True)
class PairBatch:
    """A micro-batch of pairs: rows [chosen of each pair..., rejected of each pair that has one...]."""

    rows: Batch
    n_pairs: int
    paired: torch.Tensor  # (R,) the pair of each rejected row
    reference: torch.Tensor  # (n_pairs, 2) fp32; column 1 is 0 where there is no rejected reply
    chosen_tokens: torch.Tensor  # (n_pairs,) trained tokens of each chosen reply

    @property
    def n_tokens(self) -> int:
        return self.rows.n_tokens

    @property
    def n_trained(self) -> int:
        return self.rows.n_trained

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.rows.to(device),
            self.n_pairs,
            self.paired.to(device),
            self.reference.to(device),
            self.chosen_tokens.to(device),
        )


@dataclass(frozen=True)
class DPO:
    """The DPO objective; `sft_weight` > 0 is "sft+dpo"."""

    pad_id: int
    beta: float
    sft_weight: float = 0.0
    batch_size: int = 4  # pairs per forward pass of the reference pass

    def begin(
        self, model: Any, data: Sequence[Any], out_dir: Path, *, resuming: bool, ranks: Ranks
    ) -> list[PreferencePair]:
        pairs = _pairs(data)
        path = Path(out_dir) / REFERENCE_FILE
        key = _fingerprint(pairs)
        # Rank 0 reads, so that every rank takes the same branch (the passes below are collectives).
        values = ranks.from_main(_stored(path, key) if ranks.main else None)
        if values is None and resuming:
            raise ValueError(
                f"{path} is missing or was written for other pairs: the reference log-probabilities of "
                "a resumed DPO run cannot be computed again from the trained model"
            )
        if values is None:
            values = reference_logps(model, pairs, self.pad_id, self.batch_size, ranks)
            if ranks.main:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps({"pairs": key, "logps": values}), encoding="utf-8")
                os.replace(tmp, path)
        return [replace(p, reference=(c, r)) for p, (c, r) in zip(pairs, values, strict=True)]

    def collate(self, pairs: Sequence[PreferencePair]) -> PairBatch:
        return collate_pairs(pairs, self.pad_id)

    def units(self, batch: PairBatch) -> int:
        return batch.n_pairs

    def loss(self, model: Any, batch: PairBatch) -> Loss:
        """Also tallies, over the pairs with a rejected reply, how often the policy prefers the
        chosen reply more than the reference does (`preference_accuracy`) and by how much
        (`preference_margin`: beta times the log-ratio margin; TRL's rewards/accuracies and margins)."""
        logps = sequence_logps(model, batch.rows)
        chosen, rejected = logps[: batch.n_pairs], logps[batch.n_pairs :]
        ref = batch.reference
        total = torch.zeros((), dtype=torch.float32, device=logps.device)
        tallies = {}
        if len(rejected):
            margin = self.beta * (
                (chosen[batch.paired] - ref[batch.paired, 0]) - (rejected - ref[batch.paired, 1])
            )
            total = total - F.logsigmoid(margin).sum()
            n = len(rejected)
            tallies = {
                "preference_accuracy": (float((margin > 0).sum()), n),
                "preference_margin": (float(margin.detach().sum()), n),
            }
        if self.sft_weight > 0:
            total = total + self.sft_weight * (-chosen / batch.chosen_tokens).sum()
        return Loss(total, tallies)


def collate_pairs(pairs: Sequence[PreferencePair], pad_id: int) -> PairBatch:
    with_rejected = [i for i, p in enumerate(pairs) if p.rejected is not None]
    examples = [p.chosen for p in pairs] + [pairs[i].rejected for i in with_rejected]
    rows = collate(examples, pad_id)  # type: ignore[arg-type]
    reference = torch.tensor(
        [[c, r or 0.0] for c, r in (p.reference or (0.0, 0.0) for p in pairs)], dtype=torch.float32
    )
    trained = rows.labels[: len(pairs), 1:] != IGNORE_INDEX
    return PairBatch(
        rows,
        len(pairs),
        torch.tensor(with_rejected, dtype=torch.long),
        reference,
        trained.sum(dim=1).clamp(min=1).to(torch.float32),
    )


@torch.no_grad()
def reference_logps(
    model: Any, pairs: Sequence[PreferencePair], pad_id: int, batch_size: int, ranks: Ranks | None = None
) -> list[tuple[float, float | None]]:
    """The model's summed log-probabilities of each pair's (chosen, rejected) reply, in eval mode
    (no dropout), on its device; over `ranks`, each runs its share of the chunks of `batch_size`
    pairs and every rank gets all the values."""
    ranks = ranks or Ranks()
    device = ranks.device(model)
    chunks = [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]
    was_training = model.training
    model.eval()
    try:
        mine: dict[int, list[tuple[float, float | None]]] = {}
        for i, kept in ranks.passes(len(chunks)):
            batch = collate_pairs(chunks[i], pad_id)
            logps = sequence_logps(model, batch.rows.to(device)).tolist()
            rejected = dict(zip(batch.paired.tolist(), logps[len(chunks[i]) :], strict=True))
            if kept:
                mine[i] = [(logps[j], rejected.get(j)) for j in range(len(chunks[i]))]
        by_chunk = {i: values for part in ranks.gather(mine) for i, values in part.items()}
        return [value for i in range(len(chunks)) for value in by_chunk[i]]
    finally:
        model.train(was_training)


def _stored(path: Path, key: str) -> list[tuple[float, float | None]] | None:
    """The reference values stored for the pairs `key` fingerprints, or None."""
    stored = json.loads(path.read_text()) if path.exists() else None
    return stored["logps"] if stored is not None and stored["pairs"] == key else None


def _fingerprint(pairs: Sequence[PreferencePair]) -> str:
    """What the stored reference values were computed for: every pair's tokens and trained spans."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([[e.input_ids, e.spans] for e in pair.examples]).encode())
    return digest.hexdigest()


def _pairs(data: Sequence[Any]) -> list[PreferencePair]:
    for i, item in enumerate(data):
        if not isinstance(item, PreferencePair):
            raise TypeError(
                f"the DPO objective trains on PreferencePairs; item {i} is a {type(item).__name__}"
            )
    return list(data)
