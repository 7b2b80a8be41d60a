"""The training set of a round: sampled dialogues turned into loss-masked examples in the GAtt
view (the instruction only where `placement` puts it in training, every reply the job did not
sample masked out), or, for a DPO objective, into preference pairs (`pairs.py`), plus the plain
corpus dialogues `data.replay` mixes in. Written in readable form to `training_set.jsonl`."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatt.augment import corpus_history, training_dialogue
from gatt.dialogues import Dialogue, leading_replies
from gatt.instructions import Instruction
from gatt.masks import TemplateError, TokenizedExample, build_examples, trained_text
from workers.engine.config import JobConfig
from workers.engine.dpo import PreferencePair
from workers.engine.files import write_jsonl
from workers.engine.hooks import Hooks
from workers.engine.pairs import preference_pairs


def build_training_set(
    config: JobConfig,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    path: Path,
    hooks: Hooks,
    *,
    dialogues: Sequence[Dialogue] = (),
) -> list[TokenizedExample] | list[PreferencePair]:
    """Turn sampled dialogues into loss-masked examples (or, for a DPO objective, preference pairs:
    `pairs.py`) and write them in readable form.

    `dialogues` (indexed by each record's `index`) supplies the corpus's replies that
    `data.train_history` "corpus" and "both" put before each sampled reply, and the plain
    dialogues `data.replay` adds."""
    if config.training.objective != "sft":
        pairs, rows = preference_pairs(config, tokenizer, records, dialogues, hooks)
        replayed: list[TokenizedExample] = []
        rows += _replay(config, tokenizer, dialogues, len(rows), hooks, replayed)  # none without pairs
        hooks.fence()
        write_jsonl(path, rows)
        # A replayed dialogue has no rejected reply: under sft+dpo it trains by cross-entropy alone.
        return [*pairs, *(PreferencePair(e, None) for e in replayed)]
    examples: list[TokenizedExample] = []
    rows = []
    history = config.data.train_history
    for record in records:
        if not any(record["trained"]):
            continue
        views: list[tuple[str, list[str], list[bool]]] = []
        if history in ("sampled", "both"):
            views.append(("sampled", record["replies"], record["trained"]))
        if history in ("corpus", "both"):
            corpus_replies = [reply for _, reply in dialogues[record["index"]].turns]
            views.extend(
                ("corpus", replies, trained)
                for replies, trained in corpus_history(
                    record["replies"], record["trained"], corpus_replies, include_first=history == "corpus"
                )
            )
        for view, replies, trained in views:
            row = _training_example(config, tokenizer, record, replies, trained, hooks, examples)
            if row is not None:
                rows.append({"history": view, **row})
    rows += _replay(config, tokenizer, dialogues, len(rows), hooks, examples)
    hooks.fence()
    write_jsonl(path, rows)
    return examples


def _replay(
    config: JobConfig,
    tokenizer: Any,
    dialogues: Sequence[Dialogue],
    n_rows: int,
    hooks: Hooks,
    examples: list[TokenizedExample],
) -> list[dict[str, Any]]:
    """`data.replay` plain corpus dialogues per training row: their examples appended to
    `examples`, their rows returned."""
    rows = []
    for record in _replay_records(config, dialogues, round(config.data.replay * n_rows)):
        row = _training_example(
            config, tokenizer, record, record["replies"], record["trained"], hooks, examples
        )
        if row is not None:
            rows.append({"history": "replay", **row})
    return rows


def _replay_records(config: JobConfig, dialogues: Sequence[Dialogue], n: int) -> list[dict[str, Any]]:
    """`n` corpus dialogues drawn with the job's seed (each at most once), as plain records: no
    instruction, every corpus reply of the first `data.max_turns` turns trained."""
    order = random.Random(config.seed).sample(range(len(dialogues)), k=min(n, len(dialogues)))
    records = []
    for i in order:
        turns = dialogues[i].turns[: config.data.max_turns]
        replies = leading_replies([reply for _, reply in turns])
        if replies:
            users = [user for user, _ in turns[: len(replies)]]
            records.append(
                {
                    "index": i,
                    "dialogue_id": dialogues[i].id,
                    "instruction": None,
                    "system": dialogues[i].system,
                    "users": users,
                    "replies": replies,
                    "trained": [True] * len(replies),
                }
            )
    return records


def _training_example(
    config: JobConfig,
    tokenizer: Any,
    record: dict[str, Any],
    replies: Sequence[str],
    trained: Sequence[bool],
    hooks: Hooks,
    examples: list[TokenizedExample],
) -> dict[str, Any] | None:
    """Append one training dialogue's masked examples to `examples`; its readable row, or None
    when its template refuses it."""
    instruction = record["instruction"]
    dialogue = training_dialogue(
        Instruction.from_json(instruction).text if instruction is not None else None,
        record["users"][: len(replies)],
        replies,
        trained,
        system=record["system"],
        placement=config.placement,
    )
    try:
        masked = build_examples(tokenizer, dialogue, config.loss_scope)
    except TemplateError as exc:
        hooks.event("warning", "template", f"dialogue {record['index']} skipped: {exc}", {})
        return None
    if masked.fallback_reason:
        hooks.event("warning", "loss_scope_fallback", masked.fallback_reason, {"dialogue": record["index"]})
    examples.extend(masked.examples)
    return {
        "index": record["index"],
        "dialogue_id": record["dialogue_id"],
        "scope": masked.scope,
        "fallback_reason": masked.fallback_reason,
        "messages": list(dialogue.messages),
        "trained": list(dialogue.trained),
        "trained_spans": [trained_text(tokenizer, e) for e in masked.examples],
        "tokens": masked.n_tokens,
        "trained_tokens": masked.n_trained,
    }
