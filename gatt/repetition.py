"""Does a reply copy an earlier reply of the same dialogue?

A small chat model that has learnt to open every reply with a phrase can "keep" the instruction by
repeating its previous reply word for word, whatever the user asked. A verifier that looks only at
the opening counts that as adherence, and rejection sampling would even select it for training.
So ranking (workers/engine/pipeline.py) refuses candidates that copy an earlier reply, and the
evaluation (workers/engine/evaluation.py) scores such a turn as not adherent, and counts them.

Similarity is difflib's ratio over lower-cased words (2 * matched words / all words): 1.0 for a
verbatim copy, about 0.5 for two replies that share only a two-word opening in ten words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

DEFAULT_MAX_SIMILARITY = 0.8

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Repeat:
    similarity: float  # the highest similarity to an earlier reply, in [0, 1]
    turn: int | None  # which earlier reply (0-based), None when there is none

    def is_copy(self, max_similarity: float | None) -> bool:
        """At least `max_similarity` similar to an earlier reply (None: nothing is a copy)."""
        return max_similarity is not None and self.turn is not None and self.similarity >= max_similarity

    def to_json(self) -> dict[str, float | int | None]:
        return {"similarity": round(self.similarity, 4), "turn": self.turn}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def similarity(a: str, b: str) -> float:
    """Word-sequence similarity in [0, 1]; two texts without words are equal (1.0)."""
    wa, wb = _words(a), _words(b)
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
