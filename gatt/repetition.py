"""Does a reply copy an earlier reply of its dialogue, or echo the question it answers?

A small chat model that has learnt to open every reply with a phrase can "keep" the instruction by
repeating its previous reply word for word, whatever the user asked. A verifier that looks only at
the opening counts that as adherence, and rejection sampling would even select it for training.
So ranking (workers/engine/pipeline.py) refuses candidates that copy an earlier reply, and the
evaluation (workers/engine/evaluation.py) scores such a turn as not adherent, and counts them.

Similarity is difflib's ratio over lower-cased tokens (2 * matched tokens / all tokens): 1.0 for a
verbatim copy, about 0.5 for two replies that share only a two-word opening in ten words. A token
is a word or one symbol character such as an emoji; punctuation is not a token. Symbols count so
that an emoji-only reply ("😊") is not a copy of a different one ("🎉"), which would make an emoji
instruction impossible to keep past the first turn.

A reply can also echo the question it answers ("Ahoy! How long can cooked pasta keep?"), which
passes an opening-phrase verifier without answering anything. `echo_share` measures that: the
share of the question's words that the reply repeats in runs of two or more words, after removing
the instruction's own words from both texts, so that a required phrase neither hides an echo nor
makes one. A whole-reply similarity cannot do this: a correct answer reuses the question's nouns,
and an echo wrapped in the instruction's phrase plus a few words looks dissimilar.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

DEFAULT_MAX_SIMILARITY = 0.8
# An echo refused by ranking has an echo_share at least this high. Measured (tests/gatt/
# test_repetition.py): the question behind an opening phrase scores 1.0, and 0.89 with one word of
# it changed; a correct answer that reuses the question's nouns ("Cooked pasta keeps for three to
# five days in the fridge." to "How long does cooked pasta keep in the fridge?") 0.56. The real
# answers of the bundled corpora: examples/dialogues.jsonl, 192 pairs, median 0, p95 0.27, max 0.56;
# examples/heldout.jsonl, 512 pairs, median 0, p95 0.27, max 0.62 ("When should we put the pedals
# back on?" answered "... Then put the pedals back on ..."). 0.75 lies between the two groups.
DEFAULT_MAX_ECHO = 0.75

# A word, or any other visible character; `tokens` keeps the latter only when it is a symbol.
_TOKEN = re.compile(r"(\w+)|[^\w\s]")


@dataclass(frozen=True)
class Repeat:
    similarity: float  # the highest similarity to an earlier reply, in [0, 1]
    turn: int | None  # which earlier reply (0-based), None when there is none

    def is_copy(self, max_similarity: float | None) -> bool:
        """At least `max_similarity` similar to an earlier reply (None: nothing is a copy)."""
        return max_similarity is not None and self.turn is not None and self.similarity >= max_similarity

    def to_json(self) -> dict[str, float | int | None]:
        return {"similarity": round(self.similarity, 4), "turn": self.turn}


def tokens(text: str) -> list[str]:
    """Lower-cased words and symbol characters (emoji, ...), in order; punctuation is dropped."""
    return [
        m.group()
        for m in _TOKEN.finditer(text.lower())
        if m.group(1) or unicodedata.category(m.group()).startswith("S")
    ]


def similarity(a: str, b: str) -> float:
    """Token-sequence similarity in [0, 1]; two texts without tokens are equal (1.0)."""
    wa, wb = tokens(a), tokens(b)
    if not wa and not wb:
        return 1.0
    # autojunk off: with short texts, frequent words ("the") must still count as matches.
    return SequenceMatcher(None, wa, wb, autojunk=False).ratio()


def closest_earlier(reply: str, earlier: Sequence[str]) -> Repeat:
    """The earlier reply `reply` is most similar to (the latest on ties)."""
    best = Repeat(0.0, None)
    for turn, text in enumerate(earlier):
        value = similarity(reply, text)
        if value >= best.similarity:
            best = Repeat(value, turn)
    return best


def is_repeat(reply: str, earlier: Sequence[str], max_similarity: float | None) -> bool:
    """True when `reply` is at least `max_similarity` similar to an earlier reply (None: never)."""
    if max_similarity is None:
        return False
    return closest_earlier(reply, earlier).is_copy(max_similarity)


def echo_share(reply: str, question: str, *, ignore: str = "") -> float:
    """How much of `question` the reply repeats, in [0, 1].

    The share of the question's words covered by runs of at least two consecutive words that the
    reply repeats in order (difflib's matching blocks; one word when the question has only one).
    Words of `ignore` (the instruction) are removed from both texts first. 0.0 when the question has
    no words left.
    """
    skip = set(tokens(ignore))
    wq = [w for w in tokens(question) if w not in skip]
    wr = [w for w in tokens(reply) if w not in skip]
    if not wq or not wr:
        return 0.0
    least = 1 if len(wq) == 1 else 2
    blocks = SequenceMatcher(None, wq, wr, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks if b.size >= least) / len(wq)
