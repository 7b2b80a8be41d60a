"""GAtt with DPO: which candidate is rejected, the pairs' training view, the loss against a
computation from the model's full logits, and the training loop's use of the stored reference."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from gatt.dialogues import Dialogue
from gatt.errors import ValidationFailed
from gatt.instructions import Instruction
from gatt.masks import IGNORE_INDEX
from tests.gatt.chat_tokenizers import llama3
from tests.threads import one_torch_thread
from tests.workers.test_training import Recorder, tiny_llama
from workers.engine.config import TrainConfig, parse_config, parse_options
from workers.engine.dpo import DPO, REFERENCE_FILE, PreferencePair, collate_pairs
from workers.engine.hooks import Hooks, Stopped
from workers.engine.pairs import paired_text, rejected_candidate
from workers.engine.records import TrainingRow
from workers.engine.training import train
from workers.engine.training_set import build_training_set

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def _candidate(text: str, total: float, *, copy_of: float = 0.0, echo: bool = False, relevance=0.5) -> dict:
    return {
        "text": text,
        "reward": {"total": total, "relevance": relevance},
        "repeat": {"similarity": copy_of, "turn": 0 if copy_of else None},
        "echo": {"share": 0.9 if echo else 0.0, "is_echo": echo},
    }


def _turn(candidates: list[dict], ranked: list[float], chosen: int | None, turn: int = 1) -> dict:
    return {"turn": turn, "candidates": candidates, "ranked": ranked, "chosen": chosen}


def _config(**dpo) -> object:
    return parse_config({"training": {"objective": "dpo", "dpo": dpo}})


TURN = _turn(
    [
        _candidate("💡 Kept.", 1.0),
        _candidate("💡 A copy of before.", 1.0, copy_of=0.95),  # refused: ranked 0
        _candidate("Plain, no emoji.", 0.0, relevance=0.1),
        _candidate("Plain, more relevant.", 0.0, relevance=0.6),
        _candidate("", 0.0),  # cut before its first sentence ended
        _candidate("💡 Also fine.", 1.0),  # ties the kept one: never rejected
    ],
    ranked=[1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    chosen=0,
)


def test_the_rejected_reply_is_the_lowest_ranked_then_lowest_reward_then_least_relevant():
    assert rejected_candidate(TURN, _config()) == (2, "ranked lower")


def test_repeats_prefers_a_copy_or_an_echo_of_the_turn():
    assert rejected_candidate(TURN, _config(rejected="repeats")) == (1, "copy")
    echo = copy.deepcopy(TURN)
    echo["candidates"][1] = _candidate("💡 You asked: kept?", 1.0, echo=True)
    assert rejected_candidate(echo, _config(rejected="repeats")) == (1, "echo")
    # No repeat among the candidates: the lowest-ranked, as with "worst".
    plain = copy.deepcopy(TURN)
    plain["candidates"][1] = _candidate("💡 Different.", 1.0)
    assert rejected_candidate(plain, _config(rejected="repeats")) == (2, "ranked lower")


def test_degenerate_prefers_a_candidate_that_says_nothing_even_when_it_was_cut():
    spam = copy.deepcopy(TURN)
    spam["candidates"][4]["raw"] = "💡💡💡\n\n💡💡\ufffd"  # cut at max_new_tokens mid-emoji
    assert rejected_candidate(spam, _config(rejected="degenerate")) == (4, "says nothing")
    assert paired_text(spam["candidates"][4], "degenerate") == "💡💡💡\n\n💡💡"
    # The other modes never pair a cut candidate, whatever it says.
    assert rejected_candidate(spam, _config()) == (2, "ranked lower")
    assert paired_text(spam["candidates"][4], "worst") == ""
    # A cut reply that says something is not paired, and a finished one with too few words is.
    prose = copy.deepcopy(TURN)
    prose["candidates"][4]["raw"] = "Well, the long answer goes on and on without"
    assert rejected_candidate(prose, _config(rejected="degenerate")) == (2, "ranked lower")
    prose["candidates"][3] = _candidate("💡 Ok 💡", 0.0, relevance=0.9)
    assert rejected_candidate(prose, _config(rejected="degenerate")) == (3, "says nothing")


def test_no_pair_without_a_kept_reply_a_margin_or_a_distinct_text():
    assert rejected_candidate({**TURN, "chosen": None}, _config()) is None
    assert rejected_candidate(TURN, _config(min_margin=1.0)) is None  # margins are 1.0 at most
    same = _turn([_candidate("💡 Kept.", 1.0), _candidate("💡 Kept.", 0.0)], [1.0, 0.0], chosen=0)
    assert rejected_candidate(same, _config()) is None
    ties = _turn([_candidate("💡 Kept.", 1.0), _candidate("💡 Too.", 1.0)], [1.0, 1.0], chosen=0)
    assert rejected_candidate(ties, _config()) is None


def test_replay_is_refused_under_pure_dpo_with_the_field_named():
    with pytest.raises(ValidationFailed) as raised:
        parse_options({"training": {"objective": "dpo"}, "data": {"replay": 1}})
    assert [p.field for p in raised.value.problems] == ["training.objective"]
    assert parse_options({"training": {"objective": "sft+dpo"}, "data": {"replay": 1}})


# --- the pairs' training view ------------------------------------------------------------------

USERS = ["Hi?", "And then?"]
CORPUS = ["Hello.", "Then this."]


def _record() -> dict:
    instruction = Instruction(text="Open with 💡", constraints=(), terse=False)
    first = _turn([_candidate("💡 Hi there.", 1.0), _candidate("Hi there.", 0.0)], [1.0, 0.0], 0, turn=0)
    second = _turn(
        [_candidate("💡 Hi there.", 1.0, copy_of=1.0), _candidate("💡 Then that.", 1.0)], [0.0, 1.0], 1
    )
    return {
        "index": 0,
        "dialogue_id": "d",
        "instruction": instruction.to_json(),
        "system": None,
        "users": USERS,
        "replies": ["💡 Hi there.", "💡 Then that."],
        "trained": [True, True],
        "turns": [first, second],
    }


def _pairs(
    tmp_path, history: str, objective: str = "dpo", replay: float = 0.0, record=None, rejected="repeats"
):
    config = parse_config(
        {
            "output_dir": str(tmp_path),
            "data": {"train_history": history, "replay": replay},
            "training": {"objective": objective, "dpo": {"rejected": rejected}},
        }
    )
    messages = []
    for user, reply in zip(USERS, CORPUS, strict=True):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    path = tmp_path / "training_set.jsonl"
    tok = llama3()
    pairs = build_training_set(
        config, tok, [record or _record()], path, Hooks(), dialogues=[Dialogue.from_messages(messages)]
    )
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        TrainingRow.model_validate(row)
    return tok, pairs, rows


def _decode(tok, example) -> tuple[str, str]:
    """(the prompt before the trained span, the trained text)."""
    ((start, end),) = example.spans
    return tok.decode(example.input_ids[:start]), tok.decode(example.input_ids[start:end])


def test_a_pair_is_the_kept_and_the_rejected_reply_after_one_context(tmp_path):
    tok, pairs, rows = _pairs(tmp_path, "sampled")
    assert [(r["history"], r["rejected"]["text"], r["rejected"]["reason"]) for r in rows] == [
        ("sampled", "Hi there.", "ranked lower"),
        ("sampled", "💡 Hi there.", "copy"),
    ]
    second = pairs[1]
    (prompt, chosen), (other_prompt, rejected) = _decode(tok, second.chosen), _decode(tok, second.rejected)
    assert prompt == other_prompt
    # The model's own first reply is the history; the instruction is in the first turn only.
    assert prompt.count("Open with 💡") == 1 and "💡 Hi there." in prompt
    assert chosen.startswith("💡 Then that.") and rejected.startswith("💡 Hi there.")
    assert rows[1]["trained_spans"] == [[chosen]]


def test_a_cut_reply_that_says_nothing_is_paired_by_its_raw_text(tmp_path):
    record = _record()
    record["turns"] = record["turns"][:1]
    record["turns"][0]["candidates"][1] = {**_candidate("", 0.0), "raw": "💡💡💡💡💡"}
    tok, pairs, rows = _pairs(tmp_path, "sampled", record=record, rejected="degenerate")
    assert [(r["rejected"]["text"], r["rejected"]["reason"]) for r in rows] == [
        ("💡💡💡💡💡", "says nothing")
    ]
    (_, chosen), (_, rejected) = _decode(tok, pairs[0].chosen), _decode(tok, pairs[0].rejected)
    assert chosen.startswith("💡 Hi there.") and rejected.startswith("💡💡💡💡💡")


def test_corpus_history_puts_both_replies_after_the_corpus_replies(tmp_path):
    tok, pairs, rows = _pairs(tmp_path, "corpus")
    assert [r["history"] for r in rows] == ["corpus", "corpus"]
    prompt, _ = _decode(tok, pairs[1].chosen)
    assert "Hello." in prompt and "💡 Hi there." not in prompt


def test_sft_dpo_replays_corpus_dialogues_without_a_rejected_reply(tmp_path):
    _, pairs, rows = _pairs(tmp_path, "corpus", "sft+dpo", replay=0.5)
    assert [r["history"] for r in rows] == ["corpus", "corpus", "replay"]
    assert "rejected" not in rows[2]
    assert [p.rejected is None for p in pairs] == [False, False, True]


# --- the loss -----------------------------------------------------------------------------------


def _logps_by_hand(model, example) -> float:
    """Summed log-probability of the trained tokens, from the model's full logits, unpadded."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0, :-1].float()
    targets = torch.tensor(example.labels[1:])
    keep = targets != IGNORE_INDEX
    return float(F.log_softmax(logits, -1)[keep].gather(1, targets[keep, None]).sum())


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    _, made, _ = _pairs(tmp_path_factory.mktemp("pairs"), "sampled")
    return made


def test_loss_is_the_sigmoid_dpo_loss_of_reply_log_probabilities(pairs):
    tok = llama3()
    policy, reference = tiny_llama(len(tok), seed=1), tiny_llama(len(tok), seed=2)
    beta, weight = 0.3, 0.7
    ref = [(_logps_by_hand(reference, p.chosen), _logps_by_hand(reference, p.rejected)) for p in pairs]
    data = [PreferencePair(p.chosen, p.rejected, r) for p, r in zip(pairs, ref, strict=True)]
    expected_dpo = expected_sft = 0.0
    margins = []
    for p, (ref_c, ref_r) in zip(pairs, ref, strict=True):
        c, r = _logps_by_hand(policy, p.chosen), _logps_by_hand(policy, p.rejected)
        margins.append(beta * ((c - ref_c) - (r - ref_r)))
        expected_dpo += math.log1p(math.exp(-margins[-1]))
        expected_sft += -c / p.chosen.n_trained
    batch = collate_pairs(data, pad_id=0)
    assert DPO(0, beta).units(batch) == 2
    with torch.no_grad():
        out = DPO(0, beta).loss(policy, batch)
        mixed = DPO(0, beta, sft_weight=weight).loss(policy, batch).summed.item()
    assert out.summed.item() == pytest.approx(expected_dpo, abs=1e-5)
    assert mixed == pytest.approx(expected_dpo + weight * expected_sft, abs=1e-4)
    # What the metrics row reports: how often, and by how much, the policy prefers the chosen reply.
    accuracy, margin = out.tallies["preference_accuracy"], out.tallies["preference_margin"]
    assert accuracy == (sum(m > 0 for m in margins), 2)
    assert margin[1] == 2 and margin[0] == pytest.approx(sum(margins), abs=1e-5)


def test_a_replayed_dialogue_trains_by_cross_entropy_alone(pairs):
    tok = llama3()
    model = tiny_llama(len(tok))
    replay = PreferencePair(pairs[0].chosen, None, (0.0, None))
    with torch.no_grad():
        alone = DPO(0, 0.1, sft_weight=2.0).loss(model, collate_pairs([replay], 0)).summed.item()
        only_dpo = DPO(0, 0.1).loss(model, collate_pairs([replay], 0))
    assert only_dpo.summed.item() == 0.0 and only_dpo.tallies == {}
    assert alone == pytest.approx(
        -2.0 * _logps_by_hand(model, pairs[0].chosen) / pairs[0].chosen.n_trained, abs=1e-5
    )


DPO_RUN = TrainConfig(
    objective="dpo",
    method="lora",
    lora_r=4,
    lora_alpha=8,
    learning_rate=5e-3,
    micro_batch_size=1,
    max_steps=4,
    checkpoint_every=2,
    keep_checkpoints=5,
)


def test_training_starts_at_log_2_and_moves_the_margin(tmp_path, pairs):
    tok = llama3()
    result = train(tiny_llama(len(tok)), tok, pairs, DPO_RUN, tmp_path, base_model="tiny")
    # The reference is the model as training starts: a new adapter is the base, so every pair's
    # margin is 0 at step 1 and its loss log 2.
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.metrics[-1]["loss"] < math.log(2) - 0.01
    assert result.metrics[0]["preference_margin"] == pytest.approx(0.0, abs=1e-5)
    assert result.metrics[-1]["preference_accuracy"] == 1.0 and result.metrics[-1]["preference_margin"] > 0
    assert result.metrics[0]["trained_tokens"] in {p.n_trained for p in pairs}
    stored = json.loads((tmp_path / REFERENCE_FILE).read_text())
    assert stored["logps"][1] == pytest.approx(
        [
            _logps_by_hand(tiny_llama(len(tok)), pairs[1].chosen),
            _logps_by_hand(tiny_llama(len(tok)), pairs[1].rejected),
        ],
        abs=1e-5,
    )


def test_a_resumed_run_uses_the_stored_reference_and_needs_it(tmp_path, pairs):
    tok = llama3()
    whole = train(tiny_llama(len(tok)), tok, pairs, DPO_RUN, tmp_path / "whole", base_model="tiny")
    first = Recorder(stop_after_calls=2)  # one micro-batch per step: stops inside step 3
    with pytest.raises(Stopped):
        train(
            tiny_llama(len(tok)),
            tok,
            pairs,
            DPO_RUN,
            tmp_path / "cut",
            hooks=first.hooks(),
            base_model="tiny",
        )
    resumed = train(tiny_llama(len(tok)), tok, pairs, DPO_RUN, tmp_path / "cut", base_model="tiny")
    assert resumed.resumed_from == 2
    assert [r["loss"] for r in resumed.metrics] == pytest.approx([r["loss"] for r in whole.metrics], abs=1e-5)

    (tmp_path / "cut" / REFERENCE_FILE).unlink()
    with pytest.raises(ValueError, match="reference log-probabilities"):
        train(
            tiny_llama(len(tok)),
            tok,
            pairs,
            DPO_RUN.model_copy(update={"max_steps": 6}),
            tmp_path / "cut",
            base_model="tiny",
        )


def test_max_seq_len_drops_a_pair_that_does_not_fit_and_cuts_a_replay(tmp_path, pairs):
    from tests.workers.test_training import handmade

    tok = llama3()
    replay = handmade(60, [(10, 20), (40, 55)], seed=3)  # cut after its first reply at max_seq_len 30
    longest = max(len(e.input_ids) for p in pairs for e in p.examples)
    config = DPO_RUN.model_copy(update={"objective": "sft+dpo", "max_seq_len": 30, "max_steps": 1})
    recorder = Recorder()
    result = train(
        tiny_llama(len(tok)),
        tok,
        [*pairs, PreferencePair(replay, None)],
        config,
        tmp_path,
        hooks=recorder.hooks(),
        base_model="tiny",
    )
    assert longest > 30  # so both pairs are too long
    (dropped,) = [e[3] for e in recorder.events if e[1] == "examples_dropped"]
    assert (dropped["too_long"], dropped["shortened"]) == (2, 1)
    assert result.metrics[0]["trained_tokens"] == 10  # the replay's first reply only


def test_a_fresh_run_recomputes_a_reference_stored_for_other_pairs(tmp_path, pairs):
    tok = llama3()
    (tmp_path / REFERENCE_FILE).write_text(json.dumps({"pairs": "other", "logps": [[0.0, 0.0]] * len(pairs)}))
    result = train(tiny_llama(len(tok)), tok, pairs, DPO_RUN.model_copy(update={"max_steps": 1}), tmp_path)
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert json.loads((tmp_path / REFERENCE_FILE).read_text())["pairs"] != "other"
