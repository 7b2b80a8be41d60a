"""Preference pairs from a job's ranked candidates (training.objective "dpo" or "sft+dpo").

Every sampled turn that kept a reply also holds the candidates it beat, sampled from the same
context: the kept reply is the chosen one, and one candidate that ranked lower by more than
`dpo.min_margin` is the rejected one (`rejected_candidate`). Both are put in the training view
that SFT would train the kept reply in (`data.train_history`: the instruction only in the first
turn, after the dialogue's own sampled replies or the corpus's), loss on the reply only.

"repeats" prefers, as the rejected reply, a candidate refused for copying an earlier reply of its
dialogue or echoing the question: what a GAtt model does when it "keeps" the instruction by
repeating itself, which ranking can refuse while sampling but SFT on the kept replies never
teaches against. "degenerate" prefers one that says nothing past the instruction (emoji spam):
on the embedded model nearly all the copies told once are such replies, and they are mostly cut
at `max_new_tokens` before any sentence ends, so their trimmed text is empty and the other modes
never pair them; this one pairs them by their raw text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from gatt.augment import training_dialogue
from gatt.dialogues import Dialogue, leading_replies
from gatt.instructions import Instruction
from gatt.masks import TemplateError, TokenizedExample, build_examples, trained_text
from gatt.repetition import Repeat
from workers.engine.config import JobConfig
from workers.engine.dpo import PreferencePair
from workers.engine.hooks import Hooks

_WORD = re.compile(r"[^\W\d_]{2,}")  # two letters or more: emoji, digits and "a" are not words
MIN_WORDS = 2


def rejected_candidate(turn: dict[str, Any], config: JobConfig) -> tuple[int, str] | None:
    """The candidate of a `samples.jsonl` turn to pair against its chosen one, and why ("copy",
    "echo", "says nothing" or "ranked lower"); None when the turn kept nothing or no candidate
    qualifies.

    A candidate qualifies when it has a text to pair (`paired_text`), differs from the chosen
    text, and ranked more than `dpo.min_margin` below it (refused candidates rank 0). Among those,
    the lowest-ranked, then the lowest raw reward, then the least relevant, then the first; with
    `dpo.rejected` "repeats", among the copies and echoes first; with "degenerate", among those
    that say nothing first."""
    chosen = turn["chosen"]
    if chosen is None:
        return None
    candidates, ranked = turn["candidates"], turn["ranked"]
    margin, mode = config.training.dpo.min_margin, config.training.dpo.rejected
    texts = [paired_text(c, mode) for c in candidates]
    options = [
        i
        for i, text in enumerate(texts)
        if text and text != candidates[chosen]["text"] and ranked[chosen] - ranked[i] > margin
    ]
    if not options:
        return None
    reasons = {i: _repeat_reason(candidates[i], config) for i in options}
    if mode == "repeats" and any(reasons.values()):
        options = [i for i in options if reasons[i]]
    if mode == "degenerate" and any(says_nothing(texts[i]) for i in options):
        options = [i for i in options if says_nothing(texts[i])]
        reasons = {i: "says nothing" for i in options}

    def worst_first(i: int) -> tuple[float, float, float, int]:
        reward = candidates[i]["reward"]
        relevance = reward.get("relevance")
        return (ranked[i], reward["total"], relevance if relevance is not None else 0.0, i)

    best = min(options, key=worst_first)
    return best, reasons[best] or "ranked lower"


def says_nothing(text: str) -> bool:
    return len(_WORD.findall(text)) < MIN_WORDS


def paired_text(candidate: dict[str, Any], mode: str) -> str:
    """The text a candidate is paired as: its trimmed text; under "degenerate", a candidate cut
    before its first sentence ended that says nothing is paired by its raw text (without the
    half of a character a cut can leave)."""
    if candidate["text"] or mode != "degenerate":
        return candidate["text"]
    raw = candidate.get("raw", "").rstrip("\ufffd").strip()
    return raw if says_nothing(raw) else ""


def _repeat_reason(candidate: dict[str, Any], config: JobConfig) -> str | None:
    if Repeat(**candidate["repeat"]).is_copy(config.reward.max_repeat_similarity):
        return "copy"
    return "echo" if candidate["echo"]["is_echo"] else None


def preference_pairs(
    config: JobConfig,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    dialogues: Sequence[Dialogue],
    hooks: Hooks,
) -> tuple[list[PreferencePair], list[dict[str, Any]]]:
    """The pairs of every sampled turn in each training view, and their `training_set.jsonl` rows."""
    pairs: list[PreferencePair] = []
    rows: list[dict[str, Any]] = []
    history = config.data.train_history
    for record in records:
        corpus = leading_replies([reply for _, reply in dialogues[record["index"]].turns])
        for turn in record["turns"]:
            rejected = rejected_candidate(turn, config)
            if rejected is None:
                continue
            k = turn["turn"]
            views = []
            if history in ("sampled", "both"):
                views.append(("sampled", record["replies"][:k]))
            if (history == "corpus" or (history == "both" and k > 0)) and k <= len(corpus):
                views.append(("corpus", corpus[:k]))
            for view, earlier in views:
                made = _pair(config, tokenizer, record, turn, rejected, earlier, hooks)
                if made is not None:
                    pairs.append(made[0])
                    rows.append({"history": view, **made[1]})
    return pairs, rows


def _pair(
    config: JobConfig,
    tokenizer: Any,
    record: dict[str, Any],
    turn: dict[str, Any],
    rejected: tuple[int, str],
    earlier: Sequence[str],
    hooks: Hooks,
) -> tuple[PreferencePair, dict[str, Any]] | None:
    candidates = turn["candidates"]
    chosen_text = candidates[turn["chosen"]]["text"]
    rejected_text = paired_text(candidates[rejected[0]], config.training.dpo.rejected)
    try:
        chosen, dialogue = _reply_example(config, tokenizer, record, earlier, chosen_text)
        other, _ = _reply_example(config, tokenizer, record, earlier, rejected_text)
    except TemplateError as exc:
        hooks.event("warning", "template", f"dialogue {record['index']} pair skipped: {exc}", {})
        return None
    ranked = turn["ranked"]
    row = {
        "index": record["index"],
        "dialogue_id": record["dialogue_id"],
        "scope": "last_turn",
        "fallback_reason": None,
        "messages": list(dialogue.messages),
        "trained": list(dialogue.trained),
        "trained_spans": [trained_text(tokenizer, chosen)],
        "tokens": len(chosen.input_ids) + len(other.input_ids),
        "trained_tokens": chosen.n_trained + other.n_trained,
        "rejected": {
            "candidate": rejected[0],
            "text": rejected_text,
            "reason": rejected[1],
            "margin": ranked[turn["chosen"]] - ranked[rejected[0]],
        },
    }
    return PreferencePair(chosen, other), row


def _reply_example(
    config: JobConfig, tokenizer: Any, record: dict[str, Any], earlier: Sequence[str], reply: str
) -> tuple[TokenizedExample, Any]:
    """`reply` after the `earlier` replies, the instruction (its training wording) in the first turn
    only; loss on `reply` alone."""
    dialogue = training_dialogue(
        Instruction.from_json(record["instruction"]).text,
        record["users"][: len(earlier) + 1],
        [*earlier, reply],
        [False] * len(earlier) + [True],
        system=record["system"],
        placement=config.placement,
    )
    (example,) = build_examples(tokenizer, dialogue, "last_turn").examples
    return example, dialogue
