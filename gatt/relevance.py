"""Does a reply answer the question it follows, or only keep the instruction?

A verifier checks the instruction ("start with 'Hello there, my friend.'") and nothing else, so
among K candidates that all pass, the one that is the phrase and nothing else, or the phrase and
something off the point, ties with a real answer. Relevance tells them apart: the cosine
similarity of the sentence embeddings (gatt/embeddings.py, all-MiniLM-L6-v2) of the question and
of the reply, with the instruction's words removed from the reply first, so that the phrase the
instruction demands neither adds to nor hides what the reply says. A reply with no word left
scores 0.0.

RELEVANCE_FLOOR was measured on the bundled corpora (examples/dialogues.jsonl, 192 pairs, and
examples/heldout.jsonl, 512 pairs): each user turn against the corpus's own reply to it (real), and
against the reply at the same turn of the next dialogue of the same file (mismatched: fluent, but
an answer to something else).

    pairs        n     p5      median  p95
    real         704   0.28    0.53    0.75
    mismatched   704  -0.09    0.05    0.26

At 0.28, 95.3% of real pairs pass and 96.3% of mismatched pairs fail (0.25: 96.6% and 94.2%).
Prefixing every real reply with "Hello there, my friend." and removing the words of "Always start
your reply with 'Hello there, my friend.'" moves the real pairs' figures by at most 0.01; that
phrase alone scores 0.0. The lowest real pairs are short answers that share few words with their
question ("Could humans ever visit Venus?" / "Landing is extremely hard because of the heat...",
0.11), so the floor guards against off-topic replies; it does not grade answers. An echo of the
question scores high (0.97): echoes are refused separately (gatt/repetition.py, echo_share).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

RELEVANCE_FLOOR = 0.28

_WORD = re.compile(r"\w+")


def without_instruction(reply: str, instruction: str) -> str:
    """`reply` without the words of `instruction` (whole words, case-insensitive)."""
    words = {w.lower() for w in _WORD.findall(instruction)}
    if not words:
        return reply.strip()
    kept = _WORD.sub(lambda m: "" if m.group().lower() in words else m.group(), reply)
    return " ".join(kept.split())


def relevance(
    questions: Sequence[str], replies: Sequence[str], *, ignore: Sequence[str] | None = None
) -> list[float]:
    """Cosine similarity of each question and its reply (its `ignore[i]` words removed), in [-1, 1].

    A reply with no word left scores 0.0. All texts are embedded in one batched call.
    """
    if len(questions) != len(replies):
        raise ValueError(f"{len(questions)} questions for {len(replies)} replies")
    if ignore is not None and len(ignore) != len(replies):
        raise ValueError(f"{len(ignore)} instructions to ignore for {len(replies)} replies")
    cleaned = [
        without_instruction(reply, ignore[i]) if ignore is not None else reply.strip()
        for i, reply in enumerate(replies)
    ]
    todo = [i for i, text in enumerate(cleaned) if _WORD.search(text)]
    out = [0.0] * len(replies)
    if not todo:
        return out
    from gatt.embeddings import embed  # torch is imported only when something is embedded

    vectors = embed([questions[i] for i in todo] + [cleaned[i] for i in todo])
    n = len(todo)
    cosines = (vectors[:n] * vectors[n:]).sum(dim=1).clamp(-1.0, 1.0).tolist()
    for i, cosine in zip(todo, cosines, strict=True):
        out[i] = float(cosine)
    return out
