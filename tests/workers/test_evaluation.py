"""Adherence evaluation: statistics, table, overlap, and the condition views on a tiny model.

The tiny model is a random-init Llama with the Llama-3 test tokenizer: its replies are noise, but
the prompts it is given, the scoring of whatever it says, and the report's shape are what these
tests check. One slow test runs the real embedded SmolLM2 on two held-out dialogues.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from gatt.augment import Placement
from gatt.dialogues import Dialogue, parse_corpus
from gatt.instructions import Constraint, Instruction
from gatt.repetition import is_repeat
from gatt.verifiers import score_all_batch
from tests.threads import one_torch_thread
from tests.workers.tiny import tiny_llama3
from workers.engine import sampling
from workers.engine.eval_report import _later_turns, _summary, compare, format_table
from workers.engine.eval_schema import AdherenceReport
from workers.engine.eval_stats import cluster_weights, compare_paired, paired_difference, paired_ratio
from workers.engine.evaluation import (
    EvalConfig,
    check_overlap,
    condition_messages,
    evaluate_adherence,
    wilson_interval,
)
from workers.engine.models import LoadedModel, end_of_turn_ids
from workers.engine.prefix_cache import PrefixStore
from workers.engine.sampling import SharedPrefillSampler

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


def test_later_turns_reuse_earlier_prompts_and_reply_as_a_full_prefill_does(tiny, heldout):
    # A chunk of runs goes through its turns together, so each turn's prompt finds the previous
    # one in the store; greedy replies show that the reused keys and values are the right ones.
    config = EvalConfig(turns=3, dialogues=2, conditions=("none", "once"), max_new_tokens=6, batch_prompts=2)
    stops = end_of_turn_ids(tiny.tokenizer)
    store = PrefixStore()
    reusing = SharedPrefillSampler(tiny.model, tiny.tokenizer, stops, store)
    plain = SharedPrefillSampler(tiny.model, tiny.tokenizer, stops)
    reused = evaluate_adherence(tiny, heldout, [SHORT], config, placement=Placement(), sampler=reusing)
    full = evaluate_adherence(tiny, heldout, [SHORT], config, placement=Placement(), sampler=plain)
    assert reused["transcripts"] == full["transcripts"]
    assert store.reused > store.prefilled


def test_replies_are_scored_and_the_report_has_its_shape(tiny, heldout):
    config = EvalConfig(
        turns=3, dialogues=2, instructions_per_dialogue=2, conditions=("once", "every_turn"), max_new_tokens=6
    )
    report = evaluate_adherence(tiny, heldout, [SHORT, TWO, TWO], config, placement=Placement())
    json.dumps(report)
    AdherenceReport.model_validate(report)  # the published schema holds
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


# --- the paired two-way cluster bootstrap (workers/engine/eval_stats.py) -------------------------


def random_outcomes(runs: int, turns: int, rate: float, seed: int) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    return (rng.random((runs, turns)) < rate).astype(float).tolist()


def test_paired_difference_of_identical_reports_is_zero():
    before = random_outcomes(40, 4, 0.4, 1)
    dialogues, instructions = [r // 2 for r in range(40)], [f"inst {r % 5}" for r in range(40)]
    result = paired_difference(before, before, dialogues, instructions)
    for row in [*result["turns"], result["later_turns"], result["overall"]]:
        assert row["diff"] == 0.0 and row["ci"][0] <= 0 <= row["ci"][1] and not row["significant"]
    assert [row["n"] for row in result["turns"]] == [40] * 4
    assert (result["later_turns"]["n"], result["overall"]["n"]) == (120, 160)


def test_paired_difference_detects_a_shift_of_every_run():
    before = random_outcomes(64, 6, 0.2, 2)
    after = [[1.0 if t >= 1 else x for t, x in enumerate(row)] for row in before]  # every later turn kept
    dialogues, instructions = list(range(64)), [f"inst {r % 8}" for r in range(64)]
    result = paired_difference(before, after, dialogues, instructions)
    later = result["later_turns"]
    assert later["after"] == 1.0 and later["diff"] > 0.5
    assert later["significant"] and later["ci"][0] > 0
    assert all(row["significant"] for row in result["turns"][1:])
    assert result["turns"][0]["diff"] == 0.0 and not result["turns"][0]["significant"]  # turn 1 unchanged


def test_clustering_widens_the_interval_when_a_dialogues_runs_move_together():
    # 16 dialogues x 4 instruction slots; after training a dialogue's runs either all gain at every
    # turn or none does: 64 runs, but only 16 independent outcomes.
    dialogues = [r // 4 for r in range(64)]
    instructions = [f"inst {r % 4}" for r in range(64)]
    before = [[0.0] * 4 for _ in range(64)]
    after = [[1.0 if dialogues[r] % 2 else 0.0] * 4 for r in range(64)]
    clustered = paired_difference(before, after, dialogues, instructions)["later_turns"]
    naive = paired_difference(before, after, list(range(64)), ["one"] * 64)["later_turns"]
    assert clustered["diff"] == naive["diff"] == 0.5
    width = clustered["ci"][1] - clustered["ci"][0]
    assert width > 1.5 * (naive["ci"][1] - naive["ci"][0])


def test_the_paired_bootstrap_is_seeded():
    before, after = random_outcomes(30, 3, 0.3, 3), random_outcomes(30, 3, 0.5, 4)
    args = (before, after, [r // 3 for r in range(30)], [f"i{r % 3}" for r in range(30)])
    assert paired_difference(*args) == paired_difference(*args)
    weights = cluster_weights([0, 0, 1, 2], ["a", "b", "a", "a"], resamples=5, seed=0)
    assert weights.shape == (5, 4)
    # A run's weight is its dialogue's draws times its instruction's draws.
    again = cluster_weights([0, 0, 1, 2], ["a", "b", "a", "a"], resamples=5, seed=0)
    assert (weights == again).all()
    assert not (cluster_weights([0, 0, 1, 2], ["a", "b", "a", "a"], resamples=5, seed=1) == weights).all()
    # One instruction: the weights are the dialogues' draw counts, which add up to the dialogues.
    alone = cluster_weights([0, 1, 2, 3], ["a"] * 4, resamples=50, seed=0)
    assert (alone.sum(axis=1) == 4).all()


def test_paired_difference_pairs_only_cells_both_reports_have():
    before = [[1.0, 0.0, 0.0], [1.0, 0.0]]  # run 1 was cut after turn 2 before training
    after = [[1.0, 1.0, 1.0], [1.0, 1.0, None]]
    result = paired_difference(before, after, [0, 1], ["a", "a"])
    assert [row["n"] for row in result["turns"]] == [2, 2, 1]
    assert result["turns"][2]["diff"] == 1.0 and result["later_turns"]["n"] == 3


def test_paired_ratio_and_the_bar():
    ceiling = [[1.0, 1.0, 1.0, 0.0]] * 10 + [[1.0, 0.0, 1.0, 0.0]] * 10
    once = [[1.0, 1.0, 0.0, 0.0]] * 20
    result = paired_ratio(ceiling, once, list(range(20)), ["a"] * 20)
    by_turn = {row["turn"]: row for row in result["turns"]}
    assert by_turn[2]["ratio"] == 2.0 and by_turn[2]["meets_bar"]
    assert by_turn[3]["ratio"] == 0.0 and not by_turn[3]["meets_bar"]
    # 0 of 20 against a ceiling of 0: no ratio, but not below 90% of the ceiling either.
    assert by_turn[4]["ratio"] is None and by_turn[4]["meets_bar"] and by_turn[4]["undefined"] == 2000
    lo, hi = by_turn[2]["ci"]
    assert lo <= 2.0 <= hi


def transcript_report(condition_outcomes: dict[str, list[list[float]]], *, useful: bool = True) -> dict:
    """A report with transcripts only (what the paired comparison reads)."""
    transcripts = {}
    for condition, rows in condition_outcomes.items():
        transcripts[condition] = [
            {
                "dialogue": r // 2,
                "slot": r % 2,
                "instruction": {"text": f"inst {r % 2}"},
                "scores": row,
                **({"useful": [x >= 0.5 for x in row]} if useful else {}),
            }
            for r, row in enumerate(rows)
        ]
    return {
        "config": {"pass_threshold": 0.5},
        "conditions": {c: {} for c in condition_outcomes},
        "transcripts": transcripts,
    }


def test_compare_paired_gives_differences_and_the_ceiling():
    base = transcript_report({"once": [[1.0, 0.0, 0.0]] * 20, "every_turn": [[1.0, 1.0, 0.0]] * 20})
    gatt = transcript_report({"once": [[1.0, 1.0, 1.0]] * 20, "every_turn": [[1.0, 1.0, 1.0]] * 20})
    started = time.monotonic()
    result = compare_paired(base, gatt)
    assert time.monotonic() - started < 5
    once = result["outcomes"]["adherent"]["once"]
    assert (once["runs"], once["dialogues"], once["instructions"]) == (20, 10, 2)
    assert once["later_turns"]["diff"] == 1.0 and once["later_turns"]["significant"]
    assert set(result["outcomes"]) == {"adherent", "useful"}
    ceiling = result["ceiling"]["once/every_turn"]["adherent"]
    assert [row["ratio"] for row in ceiling["turns"]] == [1.0, 1.0, None]
    assert ceiling["done"] and result["bar"] == 0.9
    assert "once_fixed/every_turn_fixed" not in result["ceiling"]
    # Reports written before "useful" existed: only the adherence outcome is paired.
    old = compare_paired(
        transcript_report({"once": [[1.0]] * 4}, useful=False), transcript_report({"once": [[0.0]] * 4})
    )
    assert set(old["outcomes"]) == {"adherent"}
    json.dumps(result)


def test_format_table_stars_come_from_the_paired_interval():
    # The Wilson intervals of 6/20 and 12/20 overlap, but every run that kept the instruction
    # before keeps it after: the paired interval excludes 0.
    before_rows = [[1.0, 1.0 if r < 6 else 0.0] for r in range(20)]
    after_rows = [[1.0, 1.0 if r < 12 else 0.0] for r in range(20)]
    before = fake_report({"once": [(20, 20), (6, 20)]})
    after = fake_report({"once": [(20, 20), (12, 20)]})
    for report, rows in ((before, before_rows), (after, after_rows)):
        report["transcripts"] = transcript_report({"once": rows})["transcripts"]
        report["transcripts"]["once"] = [
            {**t, "dialogue": i, "slot": 0, "instruction": {"text": "same"}}
            for i, t in enumerate(report["transcripts"]["once"])
        ]
    assert compare(before, after)["conditions"]["once"]["turns"][1]["ci_overlap"] is True
    lines = format_table(before, after).splitlines()
    assert lines[4].startswith("2") and lines[4].rstrip().endswith("+0.30*")
    assert "* when the paired interval" in format_table(before, after)
    assert "Wilson intervals do not overlap" not in format_table(before, after)


# --- fixed context, usefulness, per instruction ----------------------------------------------------


def test_eval_config_bounds_and_new_fields():
    assert EvalConfig(turns=20, conditions=("once_fixed", "every_turn_fixed", "none_fixed")).turns == 20
    assert EvalConfig(turns=64).turns == 64
    for bad in (
        {"turns": 65},
        {"dialogues": 5000},
        {"instructions_per_dialogue": 2000},
        {"max_new_tokens": 4096},
        {"batch_prompts": 1000},
        {"max_echo": 0},
        {"max_echo": 1.5},
        {"relevance": "yes"},
        {"conditions": ("once_fixed", "once_fixed")},
    ):
        with pytest.raises(ValueError):
            EvalConfig(**bad)
    config = EvalConfig(max_echo=None, relevance=False)
    assert EvalConfig(**config.to_json()) == config  # attention.py rebuilds it from to_json


def test_fixed_condition_messages_hold_the_corpus_replies():
    users = ["Where is Rome?", "And Paris?", "Which is older?"]
    corpus = ["In Italy.", "In France.", "Rome."]
    text = SHORT.text
    once = condition_messages("once_fixed", text, users, corpus[:2], system=None, placement=Placement())
    assert [m["role"] for m in once] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in once if m["role"] == "assistant"] == corpus[:2]
    assert [m["content"].count(text) for m in once] == [1, 0, 0, 0, 0]
    every = condition_messages(
        "every_turn_fixed", text, users, corpus[:2], system=None, placement=Placement()
    )
    assert [m["content"].count(text) for m in every] == [1, 0, 1, 0, 1]
    none = condition_messages("none_fixed", text, users, corpus[:2], system=None, placement=Placement())
    assert all(text not in m["content"] for m in none)
    # The same views as the own-context conditions, given the same replies.
    assert once == condition_messages("once", text, users, corpus[:2], system=None, placement=Placement())
    with pytest.raises(ValueError):
        condition_messages("twice_fixed", text, users, [], system=None, placement=Placement())


def test_fixed_conditions_generate_after_the_corpus_replies(tiny, heldout, monkeypatch):
    seen: list[str] = []
    real = sampling.sample_candidates

    def recording(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(tiny.tokenizer.decode(p) for p in prompts)
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_candidates", recording)
    config = EvalConfig(
        turns=3, dialogues=2, conditions=("once_fixed", "every_turn_fixed"), max_new_tokens=4, relevance=False
    )
    report = evaluate_adherence(tiny, heldout, [SHORT], config, placement=Placement())
    for d in range(2):
        corpus = [reply for _, reply in heldout[d].turns[:2]]
        last = [p for p in seen if heldout[d].turns[2][0] in p]
        assert len(last) == 2  # turn 3 of each fixed condition: a distinct prompt each
        for prompt in last:
            assert all(reply in prompt for reply in corpus)
        # "once_fixed": the instruction before the first reply only; "every_turn_fixed": on all 3 turns.
        assert sorted(p.count(SHORT.text) for p in last) == [1, 3]
    for name in ("once_fixed", "every_turn_fixed"):
        cond = report["conditions"][name]
        assert cond["context"] == "corpus" and cond["missing_reply_turns"] == 0
        assert [t["n"] for t in cond["turns"]] == [2, 2, 2]
        for t in report["transcripts"][name]:
            assert t["context"] == "corpus" and len(t["replies"]) == 3
            assert t["relevance"] == [None, None, None] and cond["relevance"] is None
    # Turn 1 has no earlier reply: the fixed conditions' first prompts are the own-context ones.
    assert len({p for p in seen if heldout[0].turns[1][0] not in p and heldout[0].turns[0][0] in p}) == 1


def test_fixed_runs_stop_where_a_corpus_reply_is_missing(tiny):
    partial = SimpleNamespace(
        id="p", system=None, turns=[("Hi there.", "Hello."), ("How are you?", None), ("Bye.", None)]
    )
    config = EvalConfig(turns=3, conditions=("once", "once_fixed"), max_new_tokens=2, relevance=False)
    report = evaluate_adherence(tiny, [partial], [SHORT], config, placement=Placement())
    assert [t["n"] for t in report["conditions"]["once"]["turns"]] == [1, 1, 1]
    fixed = report["conditions"]["once_fixed"]
    assert [t["n"] for t in fixed["turns"]] == [1, 1] and fixed["missing_reply_turns"] == 1
    assert report["missing_replies"] == [{"dialogue": 0, "dialogue_id": "p", "from_turn": 3}]


FRENCH = instruction("Speak French.", ("language", "French", {"type": "language", "language": "French"}))


def test_echoes_and_copies_are_not_useful(tiny, heldout, monkeypatch):
    # The generator is replaced (the model is not under test): turn 1 adheres, turn 2 echoes the
    # question behind the phrase, turn 3 copies the corpus's reply to turn 1 behind the phrase.
    first = heldout[0]
    (q1, a1), (q2, _), _ = first.turns[:3]

    def scripted(model, tokenizer, prompts, *args, **kwargs):
        out = []
        for p in prompts:
            text = tokenizer.decode(p)
            turn = text.count("<|start_header_id|>user")
            reply = {1: "Ahoy! Here is a real answer.", 2: f"Ahoy! {q2}", 3: f"Ahoy! {a1}"}[turn]
            out.append([sampling.Candidate(reply, (1, 2), True)])
        return out

    monkeypatch.setattr(sampling, "sample_candidates", scripted)
    config = EvalConfig(turns=3, conditions=("once_fixed",), relevance=False)
    report = evaluate_adherence(tiny, [first], [AHOY], config, placement=Placement())
    t = report["transcripts"]["once_fixed"][0]
    assert t["echoes"] == [False, True, False] and t["echo_shares"][1] == 1.0
    assert t["repeats"] == [False, False, True]
    assert t["reasons"][2].startswith("repeats the corpus reply of turn 1")
    assert t["scores"][:2] == [1.0, 1.0] and t["scores"][2] == 0.0  # an echo keeps its score
    assert t["useful"] == [True, False, False]
    cond = report["conditions"]["once_fixed"]
    assert [r["rate"] for r in cond["turns"]] == [1.0, 1.0, 0.0]
    assert [r["useful"]["rate"] for r in cond["turns"]] == [1.0, 0.0, 0.0]
    assert [r["echoes"] for r in cond["turns"]] == [0, 1, 0] and cond["echoes"] == 1
    assert (cond["later_useful"]["n"], cond["later_useful"]["hits"]) == (2, 0)
    table = format_table(report)
    assert "Adherent and useful" in table and "once_fixed base 1/3" in table
    # Without the echo check the echo is useful.
    report = evaluate_adherence(
        tiny,
        [first],
        [AHOY],
        EvalConfig(turns=2, conditions=("once_fixed",), max_echo=None, relevance=False),
        placement=Placement(),
    )
    assert report["transcripts"]["once_fixed"][0]["useful"] == [True, True]


def test_report_with_relevance_instructions_and_a_comparison(tiny, heldout):
    config = EvalConfig(
        turns=2,
        dialogues=2,
        instructions_per_dialogue=2,
        conditions=("once", "every_turn", "once_fixed", "every_turn_fixed"),
        max_new_tokens=4,
    )
    report = evaluate_adherence(tiny, heldout, [SHORT, FRENCH, TWO], config, placement=Placement())
    json.dumps(report)
    from gatt.relevance import RELEVANCE_FLOOR

    assert report["relevance_floor"] == RELEVANCE_FLOOR and report["missing_replies"] == []
    for name in config.conditions:
        cond = report["conditions"][name]
        for row in cond["turns"]:
            assert row["useful"]["n"] == row["n"] == 4 and row["useful"]["hits"] <= row["adhered"]
            assert row["relevance"]["n"] == 4 and -1 <= row["relevance"]["mean"] <= 1
            assert 0 <= row["relevance"]["share"] <= 1
        # Dialogue 0 gets (SHORT, FRENCH), dialogue 1 (TWO, SHORT): per constraint set, or text.
        rows = {r["instruction"]: r for r in cond["instructions"]}
        assert set(rows) == {SHORT.text, "language: French", TWO.text}
        assert rows[SHORT.text]["runs"] == 2 and rows[SHORT.text]["n"] == 2
        assert sum(r["n"] for r in rows.values()) == cond["later_turns"]["n"] == 4
        assert {"useful_overall", "later_useful", "relevance", "echoes"} <= set(cond)
    # The same report twice: every paired difference is 0, and nothing is significant.
    comparison = compare(report, report)
    for outcome in ("adherent", "useful"):
        for result in comparison["paired"]["outcomes"][outcome].values():
            assert all(row["diff"] in (0.0, None) and not row["significant"] for row in result["turns"])
    assert set(comparison["paired"]["ceiling"]) == {"once/every_turn", "once_fixed/every_turn_fixed"}
    assert comparison["conditions"]["once"]["later_turns"]["paired"]["significant"] is False
    table = format_table(report, report, comparison=comparison)
    assert "Adherent and useful" in table and "once_fixed gatt / every_turn_fixed base (useful)" in table
    assert "once gatt / every_turn base (adherent), by turn: 2:" in table
    assert table.count("once_fixed diff") == 2  # both tables


@pytest.mark.slow
def test_real_model_fixed_context_two_dialogues_two_turns(heldout, capsys):
    from workers.engine.models import load_model

    loaded = load_model("default")
    config = EvalConfig(
        turns=2, dialogues=2, max_new_tokens=8, conditions=("once", "once_fixed", "every_turn_fixed")
    )
    report = evaluate_adherence(loaded, heldout, [AHOY], config, placement=Placement())
    with capsys.disabled():
        print("\n" + format_table(report))
    for name in config.conditions:
        cond = report["conditions"][name]
        assert [t["n"] for t in cond["turns"]] == [2, 2]
        for row in cond["turns"]:
            assert row["useful"]["hits"] <= row["adhered"]
            assert row["relevance"]["n"] == 2 and -1 <= row["relevance"]["mean"] <= 1
        for t in report["transcripts"][name]:
            assert all(len(r) > 0 for r in t["replies"]) and all(x is not None for x in t["relevance"])
    # Turn 1 is one prompt in every condition (greedy): the same reply.
    firsts = {name: [t["replies"][0] for t in report["transcripts"][name]] for name in config.conditions}
    assert firsts["once"] == firsts["once_fixed"] == firsts["every_turn_fixed"]
    assert all(t["context"] == "corpus" for t in report["transcripts"]["once_fixed"])
    comparison = compare(report, report)
    assert not comparison["paired"]["outcomes"]["adherent"]["once_fixed"]["later_turns"]["significant"]
