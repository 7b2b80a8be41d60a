"""Verifiers: does a model reply follow an instruction constraint?

GAtt attaches an instruction ("Always answer in French", "Act as Napoleon") to a dialogue and trains
the model to keep following it. Verifiers turn such a constraint into a number: they rank the K
replies sampled for one prompt (the reward) and measure adherence during evaluation. Each returns a
`Score` in [0, 1] with a short human reason.

A verifier is described by a plain JSON-able *spec*, `{"type": <name>, **params}`, so that specs can
be stored with datasets and sent over the API unchanged:

    language       {"language": "French" | "fr"}            lingua's confidence for that language
    starts_with    {"text": str, "case_sensitive": false}   0/1
    ends_with      {"text": str, "case_sensitive": false}   0/1
    contains       {"text": str, "case_sensitive": false}   0/1
    regex          {"pattern": str, "ignore_case": false}   0/1, RE2 search (linear time; see tenant_regex)
    opening        {"text": str, "min_words_after": 2}      0/1, opens with the text's words/emoji, then words
    max_words      {"n": int >= 1}                          1 if within n, else n / count
    max_sentences  {"n": int >= 1}                          1 if within n, else n / count
    all_uppercase  {}                                       share of cased letters that are uppercase
    emoji_only     {}                                       share of visible characters that are emoji
    valid_json     {}                                       0/1, optionally inside a ```json fence
    topic          {"topic": str, "kind": "hobby" | "public_figure"}  keyword hit or embedding similarity

Every verifier scores an empty (or whitespace-only) reply 0.0, "empty reply". `check_spec` lists every
problem of a spec without raising; the scoring functions raise `ValidationFailed` (a ValueError) for
an invalid spec. Combined instructions are scored with `score_all`, aggregating the parts.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import re2
from lingua import Language, LanguageDetector, LanguageDetectorBuilder

from gatt.errors import Problem, ValidationFailed
from gatt.repetition import tokens


@dataclass(frozen=True)
class Score:
    value: float
    reason: str


# ---------------------------------------------------------------------------------------------------
# Spec schema

# For each verifier type: param name -> (expected type, required).
_PARAMS: dict[str, dict[str, tuple[type, bool]]] = {
    "language": {"language": (str, True)},
    "starts_with": {"text": (str, True), "case_sensitive": (bool, False)},
    "ends_with": {"text": (str, True), "case_sensitive": (bool, False)},
    "contains": {"text": (str, True), "case_sensitive": (bool, False)},
    "regex": {"pattern": (str, True), "ignore_case": (bool, False)},
    "opening": {"text": (str, True), "min_words_after": (int, False)},
    "max_words": {"n": (int, True)},
    "max_sentences": {"n": (int, True)},
    "all_uppercase": {},
    "emoji_only": {},
    "valid_json": {},
    "topic": {"topic": (str, True), "kind": (str, True)},
}

VERIFIER_TYPES: tuple[str, ...] = tuple(_PARAMS)

TOPIC_KINDS = ("hobby", "public_figure")

# Long patterns are where catastrophic backtracking hides; `re` has no timeout, so keep them short.
MAX_PATTERN_CHARS = 500
MAX_TOPIC_CHARS = 200
MAX_WORDS_AFTER = 50

_TYPE_NAMES = {str: "a string", bool: "a boolean", int: "an integer"}


def check_spec(spec: Any) -> list[Problem]:
    """Every problem with `spec`, each with a stable code and the param name as `field`; never raises."""
    if not isinstance(spec, dict):
        return [Problem("invalid_spec", f"a verifier spec must be an object, got {type(spec).__name__}")]
    if "type" not in spec:
        return [Problem("missing_param", "missing verifier type", "type")]
    kind = spec["type"]
    if not isinstance(kind, str):
        return [Problem("invalid_param", f"type must be a string, got {type(kind).__name__}", "type")]
    if kind not in _PARAMS:
        known = ", ".join(VERIFIER_TYPES)
        return [Problem("unknown_verifier", f"unknown verifier type {kind!r} (known: {known})", "type")]

    params = _PARAMS[kind]
    problems = [
        Problem("unknown_param", f"unknown parameter {name!r} for verifier {kind!r}", str(name))
        for name in spec
        if name != "type" and name not in params
    ]
    for name, (expected, required) in params.items():
        if name not in spec:
            if required:
                problems.append(Problem("missing_param", f"verifier {kind!r} needs {name!r}", name))
            continue
        value = spec[name]
        # bool is an int subclass, and `"n": true` is certainly a mistake.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            wrong_type = f"must be {_TYPE_NAMES[expected]}, got {type(value).__name__}"
            problems.append(Problem("invalid_param", wrong_type, name))
            continue
        unusable = _check_value(name, value, kind)
        if unusable:
            problems.append(Problem("invalid_param", unusable, name))
    return problems


def _check_value(name: str, value: Any, kind: str) -> str | None:
    """Why a well-typed param value is unusable, or None."""
    if name == "text" and not value.strip():
        return "must not be empty"
    if name == "text" and kind == "opening" and not tokens(value):
        return "must contain a word or a symbol such as an emoji"
    if name == "n" and value < 1:
        return f"must be at least 1, got {value}"
    if name == "min_words_after" and not 0 <= value <= MAX_WORDS_AFTER:
        return f"must be between 0 and {MAX_WORDS_AFTER}, got {value}"
    if name == "language" and _resolve_language(value) is None:
        return (
            f"unknown language {value!r} (use an English name like 'French' or an ISO 639-1 code like 'fr')"
        )
    if name == "kind" and value not in TOPIC_KINDS:
        return f"must be one of {', '.join(TOPIC_KINDS)}, got {value!r}"
    if name == "topic":
        if not value.strip():
            return "must not be empty"
        if len(value) > MAX_TOPIC_CHARS:
            return f"must be at most {MAX_TOPIC_CHARS} characters"
    if name == "pattern":
        if not value:
            return "must not be empty"
        if len(value) > MAX_PATTERN_CHARS:
            return f"must be at most {MAX_PATTERN_CHARS} characters, got {len(value)}"
        try:
            tenant_regex(value, ignore_case=False)
        except re2.error as exc:
            detail = exc.args[0].decode(errors="replace") if isinstance(exc.args[0], bytes) else str(exc)
            return (
                f"does not compile as an RE2 pattern (linear time: no backreferences or lookaround): {detail}"
            )
    return None


def _require_valid(spec: Any) -> None:
    problems = check_spec(spec)
    if problems:
        raise ValidationFailed("verifier spec", problems)


# ---------------------------------------------------------------------------------------------------
# Public scoring API


def score(spec: dict, reply: str) -> Score:
    """Score one reply against one constraint."""
    return score_batch(spec, [reply])[0]


def score_batch(spec: dict, replies: list[str]) -> list[Score]:
    """Score several replies (typically the K samples of one prompt) against one constraint.

    Same as `[score(spec, r) for r in replies]` (up to float noise from batched embedding), but
    embeds all replies in one batch for `topic`.
    """
    _require_valid(spec)
    return _score_valid(spec, replies)


def score_all(specs: list[dict], reply: str, aggregate: str = "min") -> Score:
    """Score one reply against several constraints at once; see `score_all_batch`."""
    return score_all_batch(specs, [reply], aggregate)[0]


def score_all_batch(specs: list[dict], replies: list[str], aggregate: str = "min") -> list[Score]:
    """Score replies against combined constraints, aggregating the parts' values.

    "min" (default) rewards a reply only as much as its worst-kept constraint, so a model cannot
    trade one instruction for another; "mean" and "product" are softer and stricter alternatives.
    """
    if aggregate not in _AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(_AGGREGATES)}, got {aggregate!r}")
    if not specs:
        raise ValueError("score_all needs at least one verifier spec")
    problems = [
        Problem(p.code, p.message, f"[{i}].{p.field}" if p.field else f"[{i}]")
        for i, spec in enumerate(specs)
        for p in check_spec(spec)
    ]
    if problems:
        raise ValidationFailed("verifier specs", problems)

    per_spec = [_score_valid(spec, replies) for spec in specs]
    combine = _AGGREGATES[aggregate]
    combined = []
    for parts in zip(*per_spec, strict=True):
        value = _clamp(combine([p.value for p in parts]))
        reason = "; ".join(f"{spec['type']}: {p.reason}" for spec, p in zip(specs, parts, strict=True))
        combined.append(Score(value, reason))
    return combined


_AGGREGATES: dict[str, Callable[[list[float]], float]] = {
    "min": min,
    "mean": statistics.fmean,
    "product": math.prod,
}


def _score_valid(spec: dict, replies: list[str]) -> list[Score]:
    results: list[Score | None] = [
        Score(0.0, "empty reply") if not reply.strip() else None for reply in replies
    ]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        scored = _BATCH_SCORERS[spec["type"]](spec, [replies[i] for i in todo])
        for i, s in zip(todo, scored, strict=True):
            results[i] = Score(_clamp(s.value), s.reason)
    return results  # type: ignore[return-value]  # every slot is filled above


def _clamp(value: float) -> float:
    # lingua and float arithmetic can land a hair outside [0, 1].
    return min(1.0, max(0.0, float(value)))


def _quote(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


# ---------------------------------------------------------------------------------------------------
# Shared text helpers

# Contractions and hyphenated compounds count as one word. Scripts written without spaces (Chinese,
# Japanese, Thai) come out as one "word" per run; word limits are not meaningful there anyway.
_WORD = re.compile(r"\w+(?:['’-]\w+)*")

# A sentence ends at . ! ? … (possibly followed by closing quotes/brackets) before whitespace or the
# end, at CJK full stops, and at line breaks, so that list items count as sentences. "3.14" is safe;
# abbreviations such as "e.g. this" over-count, which is acceptable for a length limit.
_SENTENCE_BREAK = re.compile(r"[.!?…]+[\"'”’»)\]]*(?:\s+|$)|[。！？]+|\n+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if re.search(r"\w", s)]


# ---------------------------------------------------------------------------------------------------
# language

# Names people use that lingua spells differently.
_LANGUAGE_ALIASES = {
    "norwegian": Language.BOKMAL,
    "no": Language.BOKMAL,
    "slovenian": Language.SLOVENE,
    "farsi": Language.PERSIAN,
    "mandarin": Language.CHINESE,
}

_SHORT_REPLY_WORDS = 3


@cache
def _language_names() -> dict[str, Language]:
    names = dict(_LANGUAGE_ALIASES)
    for lang in Language.all():
        names[lang.name.lower()] = lang
        names[lang.iso_code_639_1.name.lower()] = lang
    return names


def _resolve_language(name: str) -> Language | None:
    return _language_names().get(name.strip().lower())


def _language_label(lang: Language) -> str:
    return lang.name.title()


# Measured on this project's CPU machine (first detection, which is when lingua loads its models):
#   all 75 languages, high accuracy:   5.4 s, ~920 MB RSS
#   30 common languages, high accuracy: 2.2 s, ~510 MB RSS
#   all 75 languages, low accuracy:    0.25 s,  ~90 MB RSS
# On 29 one- or two-sentence replies in 25 languages (including the close pairs es/pt/it/ca and
# da/nb/sv) every mode ranked the right language first, and low accuracy gave the target the higher
# confidence (mean 0.96 against 0.76/0.85): on short inputs high accuracy spreads probability over
# related languages, which makes a worse reward. Low accuracy over all languages is thus the cheapest
# option and can verify any language lingua knows.
_detector: LanguageDetector | None = None
_detector_lock = threading.Lock()


def _language_detector() -> LanguageDetector:
    global _detector
    if _detector is None:
        with _detector_lock:
            if _detector is None:
                _detector = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode().build()
    return _detector


def _score_language(spec: dict, reply: str) -> Score:
    target = _resolve_language(spec["language"])
    assert target is not None  # check_spec guarantees it
    confidences = _language_detector().compute_language_confidence_values(reply)
    if not confidences or confidences[0].value <= 0:
        return Score(0.0, "no language detected")
    top = confidences[0]
    value = next((c.value for c in confidences if c.language == target), 0.0)
    if top.language == target:
        reason = f"detected {_language_label(target)} ({value:.2f})"
    else:
        reason = (
            f"detected {_language_label(top.language)} ({top.value:.2f}), "
            f"{_language_label(target)} {value:.2f}"
        )
    if len(_words(reply)) < _SHORT_REPLY_WORDS:
        reason += "; short reply, unreliable"
    return Score(value, reason)


# ---------------------------------------------------------------------------------------------------
# starts_with / ends_with / contains
#
# Plain substring tests after stripping surrounding whitespace; use `regex` for word boundaries.
# Models decorate openings and endings ("**Bonjour**", "¡Hola!", "Goodbye!"), so when the exact test
# fails we retry with punctuation and markdown marks stripped from that end of both the reply and the
# text: "Goodbye." is satisfied by "... goodbye!" but "Goodbye" is not satisfied by "Goodbye, Bob".

_MARKDOWN_MARKS = frozenset("*_`~>#")


def _is_decoration(char: str) -> bool:
    return char.isspace() or char in _MARKDOWN_MARKS or unicodedata.category(char).startswith("P")


def _strip_start(text: str) -> str:
    i = 0
    while i < len(text) and _is_decoration(text[i]):
        i += 1
    return text[i:]


def _strip_end(text: str) -> str:
    i = len(text)
    while i > 0 and _is_decoration(text[i - 1]):
        i -= 1
    return text[:i]


def _fold(spec: dict, text: str) -> str:
    return text if spec.get("case_sensitive", False) else text.casefold()


def _score_starts_with(spec: dict, reply: str) -> Score:
    text, body = _fold(spec, spec["text"].strip()), _fold(spec, reply.strip())
    core = _strip_start(text)
    ok = body.startswith(text) or (bool(core) and _strip_start(body).startswith(core))
    return Score(float(ok), f"{'starts' if ok else 'does not start'} with {_quote(spec['text'].strip())}")


def _score_ends_with(spec: dict, reply: str) -> Score:
    text, body = _fold(spec, spec["text"].strip()), _fold(spec, reply.strip())
    core = _strip_end(text)
    ok = body.endswith(text) or (bool(core) and _strip_end(body).endswith(core))
    return Score(float(ok), f"{'ends' if ok else 'does not end'} with {_quote(spec['text'].strip())}")


def _score_contains(spec: dict, reply: str) -> Score:
    ok = _fold(spec, spec["text"].strip()) in _fold(spec, reply)
    return Score(float(ok), f"{'contains' if ok else 'does not contain'} {_quote(spec['text'].strip())}")


@functools.lru_cache(maxsize=1024)
def tenant_regex(pattern: str, *, ignore_case: bool) -> Any:
    """A tenant's pattern compiled by RE2, whose matching time is linear in the text: a pattern
    such as `(.|.)*Q` cannot stall the process (Python's `re` backtracks, holding the GIL). RE2
    has no backreferences or lookaround, and its `\\w`, `\\d`, `\\s` and `\\b` are ASCII
    (`\\pL` is a letter of any script)."""
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = not ignore_case
    return re2.compile(pattern, options)


def _score_regex(spec: dict, reply: str) -> Score:
    ok = (
        tenant_regex(spec["pattern"], ignore_case=bool(spec.get("ignore_case", False))).search(reply)
        is not None
    )
    return Score(float(ok), f"{'matches' if ok else 'does not match'} /{spec['pattern'][:40]}/")


# ---------------------------------------------------------------------------------------------------
# opening
#
# "Always start your reply with 'Hello there, my friend.'" is kept by "Hello there my friend! The
# museum ..." too: models vary the punctuation of a phrase, and a regex built from the phrase must
# spell out every variant (and escape it). So this compares tokens: words (case-folded) and symbol
# characters such as emoji, punctuation ignored. The phrase alone, or the phrase said twice, keeps
# the letter of the instruction while answering nothing; a small model trained on such replies
# learnt to answer every question with the phrase alone (docs/experiment.md, run B), or with the
# emoji it was asked for, repeated (run H, whose regex let symbols sit between the emoji and the
# words). Hence `min_words_after` (default 2): that many *words* must follow the phrase at once.

DEFAULT_WORDS_AFTER = 2


def _score_opening(spec: dict, reply: str) -> Score:
    phrase = tokens(spec["text"])
    said = tokens(reply)
    after = spec.get("min_words_after", DEFAULT_WORDS_AFTER)
    quoted = _quote(spec["text"].strip())
    if said[: len(phrase)] != phrase:
        return Score(0.0, f"does not open with {quoted}")
    rest = said[len(phrase) :]
    if rest[: len(phrase)] == phrase:
        return Score(0.0, f"opens with {quoted} twice")
    words = 0
    while words < len(rest) and _WORD.fullmatch(rest[words]):
        words += 1
    if words < after:
        return Score(0.0, f"opens with {quoted}, then {words} word(s) (at least {after})")
    return Score(1.0, f"opens with {quoted}")


# ---------------------------------------------------------------------------------------------------
# Length and form


def _limit_score(count: int, n: int, unit: str) -> Score:
    # Proportional rather than 0/1, so that among K over-long samples the shortest still ranks first.
    value = 1.0 if count <= n else n / count
    return Score(value, f"{count} {unit}{'' if count == 1 else 's'} (max {n})")


def _score_max_words(spec: dict, reply: str) -> Score:
    return _limit_score(len(_words(reply)), spec["n"], "word")


def _score_max_sentences(spec: dict, reply: str) -> Score:
    return _limit_score(len(_sentences(reply)), spec["n"], "sentence")


def _score_all_uppercase(spec: dict, reply: str) -> Score:
    cased = [c for c in reply if c.isupper() or c.islower()]
    if not cased:
        return Score(0.0, "no cased letters")
    upper = sum(c.isupper() for c in cased)
    return Score(upper / len(cased), f"{upper} of {len(cased)} letters uppercase")


# Extended_Pictographic, approximately: Python's unicodedata has no emoji property, and adding a
# dependency for it is not worth it. ©, ® and ™ are left out on purpose: they are ordinary text far
# more often than emoji.
_EMOJI_RANGES = (
    (0x203C, 0x203C), (0x2049, 0x2049), (0x2139, 0x2139), (0x2194, 0x2199), (0x21A9, 0x21AA),
    (0x231A, 0x231B), (0x2328, 0x2328), (0x23CF, 0x23CF), (0x23E9, 0x23F3), (0x23F8, 0x23FA),
    (0x24C2, 0x24C2), (0x25AA, 0x25AB), (0x25B6, 0x25B6), (0x25C0, 0x25C0), (0x25FB, 0x25FE),
    (0x2600, 0x27BF), (0x2934, 0x2935), (0x2B05, 0x2B07), (0x2B1B, 0x2B1C), (0x2B50, 0x2B50),
    (0x2B55, 0x2B55), (0x3030, 0x3030), (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299),
    (0x1F000, 0x1FAFF),
)  # fmt: skip
_ZWJ = "\u200d"
_KEYCAP = "\u20e3"
# Code points that only modify the emoji before them: variation selectors, skin tones (also inside
# 0x1F000-0x1FAFF, but they must not start a new unit here), keycap, and the tag characters of
# subdivision flags such as England's.
_MODIFIERS = frozenset(
    ["\ufe0e", "\ufe0f", _KEYCAP]
    + [chr(c) for c in range(0x1F3FB, 0x1F400)]
    + [chr(c) for c in range(0xE0020, 0xE0080)]
)


def _is_pictograph(char: str) -> bool:
    cp = ord(char)
    return cp >= 0x203C and any(lo <= cp <= hi for lo, hi in _EMOJI_RANGES)


def _is_regional_indicator(char: str) -> bool:
    return 0x1F1E6 <= ord(char) <= 0x1F1FF


def _emoji_units(text: str) -> tuple[int, int]:
    """(emoji, total) counted in visible units: a ZWJ family, a flag or a toned thumb counts once."""
    emoji = total = 0
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char.isspace() or char in _MODIFIERS or char == _ZWJ:
            # Stray joiners/selectors carry no glyph of their own.
            i += 1
            continue
        keycap = char in "#*0123456789" and (
            text[i + 1 : i + 2] == _KEYCAP or text[i + 1 : i + 3] == "\ufe0f" + _KEYCAP
        )
        if not (keycap or _is_pictograph(char)):
            total += 1
            i += 1
            continue
        i += 1
        if _is_regional_indicator(char) and i < n and _is_regional_indicator(text[i]):
            i += 1  # the second half of a flag
        while i < n:
            if text[i] in _MODIFIERS:
                i += 1
            elif text[i] == _ZWJ and i + 1 < n and _is_pictograph(text[i + 1]):
                i += 2
            else:
                break
        emoji += 1
        total += 1
    return emoji, total


def _score_emoji_only(spec: dict, reply: str) -> Score:
    emoji, total = _emoji_units(reply)
    if total == 0:
        return Score(0.0, "no visible characters")
    return Score(emoji / total, f"{emoji} of {total} characters are emoji")


_JSON_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL | re.IGNORECASE)


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and break strict consumers.
    raise ValueError(f"{name} is not valid JSON")


def _score_valid_json(spec: dict, reply: str) -> Score:
    text = reply.strip()
    fenced = _JSON_FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        return Score(0.0, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    except ValueError as exc:
        return Score(0.0, f"invalid JSON: {exc}")
    kind = {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")
    if value is None:
        kind = "null"
    return Score(1.0, f"valid JSON {kind}{' (fenced)' if fenced else ''}")


# ---------------------------------------------------------------------------------------------------
# topic
#
# A mention of the topic is the clearest evidence, so it scores 1.0 outright. Without one, the reply
# is compared with the topic through sentence embeddings. Persona replies often answer the question
# and add the topic in a single sentence, which mean pooling over the whole reply dilutes, so the
# similarity is the best of the whole reply and each of its sentences.
#
# The reply is compared with the bare topic ("tennis", "Napoleon Bonaparte"), not with a sentence
# such as "I enjoy tennis." / "I am Napoleon Bonaparte.": the shared "I enjoy ..." / "I am ..." frame
# made any first-person reply look on-topic ("I like watching movies." scored 0.50 against "I enjoy
# tennis.", as high as real tennis talk). Measured with the packaged all-MiniLM-L6-v2 for 6 hobbies
# and 5 public figures (tennis, gardening, chess, cooking, photography, hiking; Napoleon Bonaparte,
# Albert Einstein, Marie Curie, William Shakespeare, Cleopatra): 33 on-topic replies that never name
# the topic, 16 neutral assistant replies, the other topics' replies, and 10 off-topic first-person
# persona replies ("I enjoy football.", "I am a helpful assistant.", ...):
#                          on-topic          off-topic (neutral+other)   off-topic persona
#   sentence template      p10 0.29 med 0.42  med 0.10 p95 0.28           med 0.26 p95 0.50
#   bare topic             p10 0.32 med 0.41  med 0.06 p95 0.25           med 0.13 p95 0.27
# (on-topic vs persona ranking, AUC: 0.79 with the template, 0.99 with the bare topic.) With the bare
# topic, answers with one topical sentence among neutral ones reach 0.32-0.42 against 0.06-0.09 for
# the same answers without it. Hence 0.15 (above typical off-topic replies, so those score 0) maps to
# 0 and 0.40 (about the on-topic median) maps to 1. `kind` selects no different text for now; it is
# kept in the spec because the instruction and the evaluation reports depend on it.
TOPIC_COSINE_LOW = 0.15
TOPIC_COSINE_HIGH = 0.40
# Bounds the embedding work per reply when ranking K long samples.
_MAX_TOPIC_SENTENCES = 16

# Words of a topic name too generic to count as a mention ("playing the guitar" -> "guitar").
_GENERIC_TOPIC_WORDS = frozenset(
    {
        "about", "after", "doing", "from", "going", "have", "into", "like", "love", "making", "more",
        "other", "over", "playing", "some", "that", "their", "them", "then", "they", "this", "very",
        "watching", "what", "when", "with",
    }
)  # fmt: skip


@cache
def _topic_patterns(topic: str) -> list[tuple[str, re.Pattern[str]]]:
    """(label, pattern) for the full name and each distinctive word, as whole words with a plural s."""
    terms = [topic]
    words = [w for w in re.findall(r"\w+", topic) if len(w) >= 4 and w.isalpha()]
    terms += [w for w in words if w.lower() not in _GENERIC_TOPIC_WORDS and w.lower() != topic.lower()]
    patterns = []
    for term in terms:
        body = r"\s+".join(re.escape(part) for part in term.split())
        patterns.append((term, re.compile(rf"(?<!\w){body}s?(?!\w)", re.IGNORECASE)))
    return patterns


def _topic_mention(topic: str, reply: str) -> str | None:
    return next((label for label, pattern in _topic_patterns(topic) if pattern.search(reply)), None)


def _topic_similarities(topic: str, replies: list[str]) -> list[float]:
    from gatt.embeddings import embed  # torch and transformers load only when a topic needs them

    texts = [topic]
    owners: list[int] = []
    for i, reply in enumerate(replies):
        sentences = _sentences(reply)
        pieces = [reply] + (sentences[:_MAX_TOPIC_SENTENCES] if len(sentences) > 1 else [])
        texts += pieces
        owners += [i] * len(pieces)
    vectors = embed(texts)
    cosines = (vectors[1:] @ vectors[0]).tolist()
    best = [-1.0] * len(replies)
    for owner, cosine in zip(owners, cosines, strict=True):
        best[owner] = max(best[owner], cosine)
    return best


def _score_topic_batch(spec: dict, replies: list[str]) -> list[Score]:
    from gatt.embeddings import EmbedderUnavailable

    topic = spec["topic"].strip()
    results: list[Score | None] = []
    for reply in replies:
        mention = _topic_mention(topic, reply)
        results.append(Score(1.0, f"mentions {_quote(mention)}") if mention else None)
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return results  # type: ignore[return-value]  # no slot is None
    try:
        similarities = _topic_similarities(topic, [replies[i] for i in todo])
    except EmbedderUnavailable as exc:
        for i in todo:
            results[i] = Score(0.0, f"no mention of {_quote(topic)}; keyword-only scoring ({exc})")
        return results  # type: ignore[return-value]
    for i, cosine in zip(todo, similarities, strict=True):
        value = (cosine - TOPIC_COSINE_LOW) / (TOPIC_COSINE_HIGH - TOPIC_COSINE_LOW)
        reason = f"no mention of {_quote(topic)}; similarity {cosine:.2f}"
        results[i] = Score(value, reason)
    return results  # type: ignore[return-value]  # every slot is filled above


# ---------------------------------------------------------------------------------------------------
# Dispatch


def _one_by_one(scorer: Callable[[dict, str], Score]) -> Callable[[dict, list[str]], list[Score]]:
    return lambda spec, replies: [scorer(spec, reply) for reply in replies]


_BATCH_SCORERS: dict[str, Callable[[dict, list[str]], list[Score]]] = {
    "language": _one_by_one(_score_language),
    "starts_with": _one_by_one(_score_starts_with),
    "ends_with": _one_by_one(_score_ends_with),
    "contains": _one_by_one(_score_contains),
    "regex": _one_by_one(_score_regex),
    "opening": _one_by_one(_score_opening),
    "max_words": _one_by_one(_score_max_words),
    "max_sentences": _one_by_one(_score_max_sentences),
    "all_uppercase": _one_by_one(_score_all_uppercase),
    "emoji_only": _one_by_one(_score_emoji_only),
    "valid_json": _one_by_one(_score_valid_json),
    "topic": _score_topic_batch,
}
assert set(_BATCH_SCORERS) == set(VERIFIER_TYPES)
