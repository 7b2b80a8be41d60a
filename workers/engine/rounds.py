"""Multi-round GAtt (`rounds.count`): round r samples with the model that round r-1 trained,
ranks, and trains that model further. The paper's appendix shows the reward model's score falling
as GAtt went on; a job's `rounds.json` holds each round's reward statistics (per batch of
sampled dialogues too) to show whether it does here, and `rounds.instructions` tells apart what
changes with the model (`fixed`: the same instruction per dialogue every round) from what changes
with the data (`fresh`: each round synthesises its own).

Round 1 is a plain job and keeps its layout; round r > 1 writes its own samples, training set and
training run under `rounds/<r>/`. Each round's `train()` numbers its steps from 1 in its own
folder; what the service sees (metrics, checkpoints) is numbered across rounds (`offset_hooks`),
so a job's (step) stays unique. A resumed job redoes nothing a round finished: its samples are on
disk, and `train()` on a finished run only loads its final weights, the model the next round
samples with.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from gatt.selection import Selection, summarize
from workers.engine.files import write_json
from workers.engine.hooks import Hooks

ROUNDS_FILE = "rounds.json"


def round_dir(out: Path, r: int) -> Path:
    return out if r == 1 else out / "rounds" / str(r)


def round_seed(seed: int, r: int) -> int:
    """Instruction synthesis of round r under `rounds.instructions: fresh`; round 1's is the job's."""
    return (seed + (r - 1) * 1_000_003) % 2**32


def offset_hooks(hooks: Hooks, offset: int) -> Hooks:
    """`hooks` with training steps moved by `offset`: the steps of the rounds before."""
    if offset == 0:
        return hooks
    return replace(
        hooks,
        metrics=lambda step, row: hooks.metrics(step + offset, row),
        checkpoint=lambda step, path, manifest: hooks.checkpoint(step + offset, path, manifest),
    )


def round_report(
    r: int,
    records: Sequence[dict[str, Any]],
    selections: Sequence[Selection],
    batch_prompts: int,
    *,
    examples: int,
    trained_tokens: int,
    first_step: int,
    steps: int,
    final_loss: float | None,
) -> dict[str, Any]:
    """What `rounds.json` keeps of round r: the selection over all its sampled turns, the kept
    reward by batch of `batch_prompts` dialogues (the chunks sampled together), and its training
    (its steps numbered across rounds; the last one's checkpoint is the model the round made)."""
    return {
        "round": r,
        "selection": summarize(selections).to_json(),
        "batches": batch_rewards(records, batch_prompts),
        "examples": examples,
        "trained_tokens": trained_tokens,
        "steps": {"first": first_step, "last": first_step + steps - 1},
        "final_loss": final_loss,
    }


def batch_rewards(records: Sequence[dict[str, Any]], batch_prompts: int) -> list[dict[str, Any]]:
    """The kept reward by batch of `batch_prompts` dialogues (the chunks sampled together)."""
    batches: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        batches.setdefault(record["index"] // batch_prompts, []).extend(record["turns"])
    return [_batch(number, turns) for number, turns in sorted(batches.items())]


def _batch(number: int, turns: list[dict[str, Any]]) -> dict[str, Any]:
    """Reward statistics of one batch's turns: the best candidate's reward per turn (max and
    median over turns) and the share of candidates that passed the threshold."""
    best = [t["stats"]["max_reward"] for t in turns]
    candidates = sum(len(t["ranked"]) for t in turns)
    passed = sum(t["stats"]["pass_rate"] * len(t["ranked"]) for t in turns)
    return {
        "batch": number,
        "turns": len(turns),
        "max_reward": max(best) if best else None,
        "median_reward": statistics.median(best) if best else None,
        "pass_rate": passed / candidates if candidates else None,
    }


def write_rounds(out: Path, reports: list[dict[str, Any]], hooks: Hooks) -> None:
    hooks.fence()
    write_json(out / ROUNDS_FILE, reports)
