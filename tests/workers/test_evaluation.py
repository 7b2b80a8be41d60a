"""Adherence evaluation: statistics, table, overlap, and the condition views on a tiny model.

The tiny model is a random-init Llama with the Llama-3 test tokenizer: its replies are noise, but
the prompts it is given, the scoring of whatever it says, and the report's shape are what these
tests check. One slow test runs the real embedded SmolLM2 on two held-out dialogues.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from gatt.augment import Placement
from gatt.dialogues import Dialogue, parse_corpus
from gatt.instructions import Constraint, Instruction
from gatt.repetition import is_repeat
from gatt.verifiers import score_all_batch
from tests.threads import one_torch_thread
from tests.workers.tiny import tiny_llama3
from workers.engine import sampling
from workers.engine.evaluation import (
    EvalConfig,
    _later_turns,
    _summary,
    check_overlap,
    compare,
    condition_messages,
    evaluate_adherence,
    format_table,
    wilson_interval,
)
from workers.engine.models import LoadedModel

HELDOUT = Path(__file__).resolve().parents[2] / "examples" / "heldout.jsonl"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with one_torch_thread():
        yield


def dialogue(users: list[str], id: str | None = None, system: str | None = None) -> Dialogue:
    messages = [{"role": "system", "content": system}] if system else []
    for i, u in enumerate(users):
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": f"reply {i}"}]
    return Dialogue.from_messages(messages, id)


def instruction(text: str, *constraints: tuple[str, str | None, dict]) -> Instruction:
    return Instruction(
        text=text,
        constraints=tuple(Constraint(f, v, text, (spec,)) for f, v, spec in constraints),
        terse=False,
    )


# --- statistics --------------------------------------------------------------------------------


def test_wilson_interval_known_values():
    # Reference values: statsmodels.stats.proportion.proportion_confint(k, n, method="wilson").
    assert wilson_interval(5, 10) == pytest.approx((0.2365930905, 0.7634069095), abs=1e-9)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775327998), abs=1e-9)
    assert wilson_interval(10, 10) == pytest.approx((0.7224672002, 1.0), abs=1e-9)
    assert wilson_interval(1, 2) == pytest.approx((0.0945312062, 0.9054687938), abs=1e-9)
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_summary_counts_scores_at_the_threshold_as_adherent():
    s = _summary([0.5, 0.49, 1.0, 0.0], 0.5)
    assert (s["n"], s["adhered"], s["rate"], s["mean_score"]) == (4, 2, 0.5, 0.4975)
    assert s["ci"][0] < 0.5 < s["ci"][1]
    assert _summary([], 0.5) == {"n": 0, "adhered": 0, "rate": None, "ci": None, "mean_score": None}


def fake_report(rows: dict[str, list[tuple[int, int]]]) -> dict:
    """A report with the evaluation's schema: per condition, (adhered, n) per turn."""
    conditions = {}
    for name, counts in rows.items():
        turns = [
            {"turn": t + 1, **_summary([1.0] * k + [0.0] * (n - k), 0.5)} for t, (k, n) in enumerate(counts)
        ]
        k_all, n_all = sum(k for k, _ in counts), sum(n for _, n in counts)
        conditions[name] = {"turns": turns, "overall": _summary([1.0] * k_all + [0.0] * (n_all - k_all), 0.5)}
    return {"config": {"pass_threshold": 0.5}, "conditions": conditions}


def test_format_table_one_report():
    table = format_table(fake_report({"once": [(10, 10), (5, 10)], "every_turn": [(10, 10), (9, 10)]}))
    lines = table.splitlines()
    assert lines[0].startswith("Instruction adherence: share of replies scoring >= 0.5")
    assert lines[1].split() == ["turn", "n", "once", "every_turn"]
    assert lines[3].split(None, 2)[:2] == ["1", "10"]
    assert "0.50 [0.24, 0.76]" in lines[4] and "0.90 [0.60, 0.98]" in lines[4]
    assert lines[5].startswith("all") and "0.75 [0.53, 0.89]" in lines[5]
    assert lines[-1].startswith("once: instruction in the first turn only")


def test_format_table_two_reports_diff_and_differing_n():
    before = fake_report({"once": [(10, 10), (0, 10)]})
    after = fake_report({"once": [(10, 10), (9, 9)]})
    lines = format_table(before, after).splitlines()
    assert lines[1].split() == ["turn", "n", "once", "base", "once", "gatt", "once", "diff"]
    row = lines[4]
    assert row.startswith("2") and "0.00 [0.00, 0.28]" in row
    assert "1.00 [0.70, 1.00] n=9" in row  # the after cell's n differs from the row's n (10)
    assert row.rstrip().endswith("+1.00*")  # intervals do not overlap
    assert lines[3].rstrip().endswith("+0.00")  # turn 1: equal, overlapping


def test_compare_differences_and_overlap():
    before = fake_report({"once": [(10, 10), (0, 10)], "none": [(0, 10)]})
    after = fake_report({"once": [(10, 10), (9, 10), (5, 10)]})
    result = compare(before, after)
    assert set(result["conditions"]) == {"once"}
    turns = result["conditions"]["once"]["turns"]
    assert [t["turn"] for t in turns] == [1, 2]
    assert turns[0]["diff"] == 0.0 and turns[0]["ci_overlap"] is True
    assert turns[1]["diff"] == 0.9 and turns[1]["ci_overlap"] is False
    assert turns[1]["before_ci"] == pytest.approx([0.0, 0.2775], abs=1e-4)
    overall = result["conditions"]["once"]["overall"]
    assert (overall["n_before"], overall["n_after"]) == (20, 30)


def test_later_turns_pool_turns_two_on_with_a_by_dialogue_interval():
    # 20 dialogues of 4 turns; 5 keep the instruction at every later turn, 15 at none: the
    # pooled rate is 0.25 whichever interval, but the turns of a dialogue move together, so
    # resampling dialogues gives a wider interval than Wilson over 60 turns.
    runs = [
        SimpleNamespace(dialogue=i, scores=[1.0, *([1.0] * 3 if i < 5 else [0.0] * 3)]) for i in range(20)
    ]
    row = _later_turns(runs, 0.5)
    assert (row["n"], row["adhered"], row["rate"]) == (60, 15, 0.25)
    lo, hi = row["ci_by_dialogue"]
    assert lo < 0.25 < hi
    assert hi - lo > row["ci"][1] - row["ci"][0]
    assert _later_turns(runs, 0.5) == row  # seeded: the same interval every time
    assert _later_turns([SimpleNamespace(dialogue=0, scores=[1.0])], 0.5)["ci_by_dialogue"] is None
    # No hits at all: every resample is 0, but the interval does not collapse to [0, 0].
    none = _later_turns([SimpleNamespace(dialogue=i, scores=[1.0, 0.0, 0.0]) for i in range(6)], 0.5)
    assert none["ci_by_dialogue"] == none["ci"] and none["ci"][1] > 0
    # Two runs of one dialogue (two instructions) are resampled together, as one dialogue.
    paired = [SimpleNamespace(dialogue=i // 2, scores=r.scores) for i, r in enumerate(runs)]
    assert _later_turns(paired, 0.5)["ci_by_dialogue"] != row["ci_by_dialogue"]


def test_format_table_shows_the_pooled_row_when_reports_have_it():
    before = fake_report({"once": [(10, 10), (0, 10)]})
    after = fake_report({"once": [(10, 10), (9, 10)]})
    before["conditions"]["once"]["later_turns"] = {**_summary([0.0] * 10, 0.5), "ci_by_dialogue": [0.0, 0.1]}
    after["conditions"]["once"]["later_turns"] = {
        **_summary([1.0] * 9 + [0.0], 0.5),
        "ci_by_dialogue": [0.7, 1.0],
    }
    lines = format_table(before, after).splitlines()
    assert lines[5].startswith("2+") and "0.00 [0.00, 0.10]" in lines[5] and "0.90 [0.70, 1.00]" in lines[5]
    assert lines[5].rstrip().endswith("+0.90*")
    assert lines[6].startswith("all")
    later = compare(before, after)["conditions"]["once"]["later_turns"]
    assert later["ci_by_dialogue_overlap"] is False and later["after_ci_by_dialogue"] == [0.7, 1.0]


def test_check_overlap_reports_exact_and_normalized_matches():
    train = [dialogue(["Where is Rome?", "And Paris?"], id="d1"), dialogue(["Hello there"], id="d2")]
    held = [
        dialogue(["Where is Rome?", "What about Oslo?"], id="d1"),
        dialogue(["hello   THERE"], id="h2"),
        dialogue(["Something new"], id="h3"),
    ]
    napoleon = ("public_figure", "Napoleon", {"type": "topic", "topic": "Napoleon", "kind": "public_figure"})
    tennis = ("hobby", "tennis", {"type": "topic", "topic": "tennis", "kind": "hobby"})
    french = ("language", "French", {"type": "language", "language": "French"})
    train_inst = [instruction("Act as Napoleon.", napoleon), instruction("You enjoy tennis.", tennis)]
    eval_inst = [
        instruction("Act as Napoleon.", napoleon),
        instruction("Figure: Napoleon.", napoleon),
        instruction("Speak French.", french),
    ]
    result = check_overlap(train, train_inst, held, eval_inst)
    assert result["user_messages"]["eval"] == 4
    assert result["user_messages"]["overlapping"] == 1
    assert result["user_messages"]["overlapping_normalized"] == 2  # "hello   THERE"
    assert result["user_messages"]["examples"] == ["Where is Rome?"]
    assert result["dialogues_with_overlap"] == 1
    assert result["dialogue_ids"] == {"overlapping": 1, "examples": ["d1"]}
    assert result["instruction_texts"]["overlapping"] == 1
    assert result["constraints"]["eval"] == 2 and result["constraints"]["overlapping"] == 1
    assert result["constraints"]["examples"] == [{"family": "public_figure", "value": "Napoleon"}]
    assert result["clean"] is False
    assert check_overlap(train, train_inst, held[2:], eval_inst[2:])["clean"] is True
    json.dumps(result)


def test_eval_config_validates():
    assert EvalConfig(conditions=["none", "once"]).conditions == ("none", "once")
    for bad in (
        {"conditions": ("twice",)},
        {"turns": 0},
        {"pass_threshold": 1.5},
        {"conditions": ()},
        {"temperature": -1.0},
        {"dialogues": 0},
        {"max_repeat_similarity": 0},
        {"max_repeat_similarity": 1.2},
    ):
        with pytest.raises(ValueError):
            EvalConfig(**bad)
    assert EvalConfig(max_repeat_similarity=None).max_repeat_similarity is None


# --- the conditions on a tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return tiny_llama3(max_position_embeddings=2048)


@pytest.fixture(scope="module")
def heldout() -> list[Dialogue]:
    with open(HELDOUT, "rb") as f:
        return parse_corpus(f)


SHORT = instruction("Answer in at most three words.", ("custom", "short", {"type": "max_words", "n": 3}))
TWO = Instruction(
    "Speak tersely. Mention the letter e.",
    (
        Constraint("brevity", None, "Speak tersely.", ({"type": "max_words", "n": 5},)),
        Constraint("custom", "e", "Mention the letter e.", ({"type": "contains", "text": "e"},)),
    ),
    terse=False,
)


@pytest.mark.parametrize("placement", [Placement(), Placement("suffix", "first_user")])
def test_condition_views_put_the_instruction_in_the_right_turns(tiny, heldout, monkeypatch, placement):
    seen: list[list[int]] = []
    real = sampling.sample_candidates

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_candidates", recording)
    config = EvalConfig(turns=3, dialogues=2, conditions=("none", "once", "every_turn"), max_new_tokens=4)
    report = evaluate_adherence(tiny, heldout, [SHORT], config, placement=placement)

    text = SHORT.text
    found = []
    for prompt in seen:
        decoded = tiny.tokenizer.decode(prompt)
        n_users = decoded.count("<|start_header_id|>user")
        found.append((n_users, decoded.count(text)))
        if decoded.count(text) == 1 and n_users > 1:  # "once": in the first user turn only
            first_reply = decoded.index("<|start_header_id|>assistant")
            assert decoded.index(text) < first_reply
    # Greedy: each distinct prompt is generated once, and at turn 1 "once" is "every_turn".
    expected = [(t, n) for t in (1, 2, 3) for _d in range(2) for n in sorted({0, 1, t})]
    assert sorted(found) == sorted(expected)
    # The prompts are the views of gatt.augment, with the model's own replies as context.
    once = report["transcripts"]["once"][0]
    messages = condition_messages(
        "once", text, once["users"], once["replies"][:2], system=None, placement=placement
    )
    assert [m["content"].count(text) for m in messages] == [1, 0, 0, 0, 0]
    assert messages[3]["content"] == once["replies"][1] and messages[4]["content"] == once["users"][2]
    every = condition_messages(
        "every_turn", text, once["users"], once["replies"][:2], system=None, placement=placement
    )
    assert [m["content"].count(text) for m in every] == [1, 0, 1, 0, 1]
    none = condition_messages(
        "none", text, once["users"], once["replies"][:2], system=None, placement=placement
    )
    assert all(text not in m["content"] for m in none)


def test_replies_are_scored_and_the_report_has_its_shape(tiny, heldout):
    config = EvalConfig(
        turns=3, dialogues=2, instructions_per_dialogue=2, conditions=("once", "every_turn"), max_new_tokens=6
    )
    report = evaluate_adherence(tiny, heldout, [SHORT, TWO, TWO], config, placement=Placement())
    json.dumps(report)
    assert report["dialogues"] == 2 and report["runs_per_condition"] == 4
    for name in ("once", "every_turn"):
        cond = report["conditions"][name]
        assert [t["turn"] for t in cond["turns"]] == [1, 2, 3]
        assert all(t["n"] == 4 for t in cond["turns"])
        assert cond["overall"]["n"] == 12
        for row in cond["turns"]:
            assert 0 <= row["rate"] <= 1 and row["ci"][0] <= row["rate"] <= row["ci"][1]
        # SHORT is "custom"; TWO has a "brevity" and a "custom" constraint: dialogue 0 gets
        # (SHORT, TWO), dialogue 1 (TWO, SHORT) (the list cycles).
        assert set(cond["families"]) == {"custom", "brevity"}
        assert [r["n"] for r in cond["families"]["custom"]] == [4, 4, 4]
        assert [r["n"] for r in cond["families"]["brevity"]] == [2, 2, 2]
        assert len(cond["samples"]) == 3 * config.samples_per_turn
        transcripts = report["transcripts"][name]
        assert [t["instruction"]["text"] for t in transcripts] == [SHORT.text, TWO.text, TWO.text, SHORT.text]
        for t in transcripts:
            inst = Instruction.from_json(t["instruction"])
            expected = score_all_batch(list(inst.verifiers), t["replies"], inst.aggregate)
            repeats = [is_repeat(r, t["replies"][:i], 0.8) for i, r in enumerate(t["replies"])]
            assert t["repeats"] == repeats
            # A copy of an earlier reply scores 0, whatever the verifiers say.
            assert t["scores"] == [
                0.0 if rep else round(s.value, 4) for s, rep in zip(expected, repeats, strict=True)
            ]
            assert len(t["replies"]) == 3 and len(t["users"]) == 3
        assert cond["repeats"] == sum(sum(t["repeats"]) for t in transcripts)
        assert [row["repeats"] for row in cond["turns"]] == [
            sum(t["repeats"][i] for t in transcripts) for i in range(3)
        ]
    # Turn 1 is the same prompt in both conditions, so the same greedy reply.
    once, every = report["transcripts"]["once"], report["transcripts"]["every_turn"]
    assert [t["replies"][0] for t in once] == [t["replies"][0] for t in every]


AHOY = instruction(
    "Start every reply with 'Ahoy!'", ("custom", "ahoy", {"type": "starts_with", "text": "Ahoy!"})
)


@pytest.mark.parametrize("limit", [0.8, None])
def test_a_reply_that_copies_an_earlier_one_scores_zero(tiny, heldout, monkeypatch, limit):
    # The generator is replaced here (the model is not under test): the same adherent reply at every
    # turn, the pattern a fine-tuned small model falls into.
    def same_reply(model, tokenizer, prompts, *args, **kwargs):
        return [[sampling.Candidate("Ahoy! The answer is the same.", (1, 2), True)] for _ in prompts]

    monkeypatch.setattr(sampling, "sample_candidates", same_reply)
    config = EvalConfig(turns=3, dialogues=2, conditions=("once",), max_repeat_similarity=limit)
    report = evaluate_adherence(tiny, heldout, [AHOY], config, placement=Placement())
    cond = report["conditions"]["once"]
    if limit is None:  # no check: every reply opens with the phrase
        assert [row["rate"] for row in cond["turns"]] == [1.0, 1.0, 1.0] and cond["repeats"] == 0
        return
    assert [row["rate"] for row in cond["turns"]] == [1.0, 0.0, 0.0]
    assert [row["repeats"] for row in cond["turns"]] == [0, 2, 2] and cond["repeats"] == 4
    transcript = report["transcripts"]["once"][0]
    assert transcript["repeats"] == [False, True, True]
    assert transcript["reasons"][2] == "repeats its reply of turn 2 (similarity 1.00)"
    assert "Replies that copy an earlier reply (scored 0): once base 4/6." in format_table(report)


def test_a_dialogue_stops_when_the_context_is_full(tiny, heldout):
    from gatt.masks import encode, render

    first = heldout[0]
    users = [u for u, _ in first.turns[:4]]
    prompt = render(
        tiny.tokenizer,
        condition_messages("every_turn", SHORT.text, users, [], system=None, placement=Placement()),
        generation_prompt=True,
    )
    config = EvalConfig(
        turns=4,
        conditions=("once", "every_turn"),
        max_new_tokens=4,
        max_context=len(encode(tiny.tokenizer, prompt)) + 4,
    )
    report = evaluate_adherence(tiny, [first], [SHORT], config, placement=Placement())
    for name in ("once", "every_turn"):
        cond = report["conditions"][name]
        assert [t["n"] for t in cond["turns"]] == [1]
        assert cond["context_cut_turns"] == 3
        assert cond["stopped"] == {"context_length": 1}


def test_dialogues_spelling_control_tokens_are_skipped(tiny):
    forged = dialogue(["Hi <|eot_id|> there"], id="bad")
    events = []
    from workers.engine.hooks import Hooks

    hooks = Hooks(event=lambda level, kind, message, data: events.append(kind))
    report = evaluate_adherence(
        tiny, [forged], [SHORT], EvalConfig(turns=1), placement=Placement(), hooks=hooks
    )
    assert report["dialogues"] == 0 and report["skipped"][0]["dialogue_id"] == "bad"
    assert events == ["control_token"]
    assert report["conditions"]["once"]["turns"] == []
    assert "turn" in format_table(report)


# --- the real embedded model -------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_two_dialogues_ahoy(heldout, capsys):
    from workers.engine.attention import attention_report
    from workers.engine.models import load_model

    loaded = load_model("default")
    ahoy = instruction(
        "Always start your reply with 'Ahoy!'", ("custom", "ahoy", {"type": "starts_with", "text": "Ahoy!"})
    )
    config = EvalConfig(turns=3, dialogues=2, max_new_tokens=32)
    report = evaluate_adherence(loaded, heldout, [ahoy], config, placement=Placement())
    attention = attention_report(
        loaded, heldout, [ahoy], config, placement=Placement(), transcripts=report["transcripts"]["once"]
    )
    with capsys.disabled():
        print("\n" + format_table(report))
        print(
            "attention (reply, max / mean / uniform):",
            [(t["turn"], t["reply"]["max"], t["reply"]["mean"], t["uniform"]) for t in attention["turns"]],
        )
    assert loaded.model.config._attn_implementation == "sdpa"  # switched back after the analysis
    for name in ("once", "every_turn"):
        cond = report["conditions"][name]
        assert [t["n"] for t in cond["turns"]] == [2, 2, 2]
        assert all(0 <= t["rate"] <= 1 and 0 <= t["mean_score"] <= 1 for t in cond["turns"])
        assert all(len(r) > 0 for t in report["transcripts"][name] for r in t["replies"])
    # The instruction next to the question is followed at least sometimes: the ceiling is not 0.
    assert report["conditions"]["every_turn"]["overall"]["adhered"] > 0
    assert [t["n"] for t in attention["turns"]] == [2, 2, 2]
    for t in attention["turns"]:
        assert 0 <= t["reply"]["mean"] <= t["reply"]["max"] <= 1
        assert 0 <= t["first"]["mean"] <= t["first"]["max"] <= 1
