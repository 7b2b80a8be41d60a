"""Engine paths the other tests leave out: the optional reward model of `workers/engine/rewards.py`,
and the pipeline's `data.sample_turns: "last"` mode.

The reward model is a tiny random-init `LlamaForSequenceClassification` with the Llama-3 chat
template (tests/gatt/chat_tokenizers.py), saved as safetensors: its scores mean nothing, but they
must be what a direct forward pass gives, combined with the verifier score as documented:
reward = (w_v * verifier + w_rm * sigmoid(logit)) / (w_v + w_rm).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from transformers import LlamaConfig, LlamaForSequenceClassification

from gatt.errors import ValidationFailed
from gatt.instructions import Constraint, Instruction
from gatt.masks import IGNORE_INDEX
from gatt.relevance import relevance
from tests.gatt.chat_tokenizers import llama3
from tests.threads import one_torch_thread
from workers.engine.config import RewardConfig, parse_config
from workers.engine.hooks import Hooks
from workers.engine.models import ModelError
from workers.engine.rewards import RewardScorer

ROOT = Path(__file__).resolve().parents[2]

AHOY = Instruction(
    text="Always start your reply with 'Ahoy!'",
    constraints=(
        Constraint(
            "custom",
            "ahoy",
            "Always start your reply with 'Ahoy!'",
            ({"type": "starts_with", "text": "Ahoy!"},),
        ),
        Constraint("custom", "brief", "Answer in at most 6 words.", ({"type": "max_words", "n": 6},)),
    ),
    terse=False,
    aggregate="mean",
)
CONTEXTS = [
    [{"role": "user", "content": "Always start your reply with 'Ahoy!'\n\nHello there!"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Always start your reply with 'Ahoy!'\n\nWhat is the capital of France?"},
        {"role": "assistant", "content": "Ahoy! Paris."},
        {
            "role": "user",
            "content": "Always start your reply with 'Ahoy!'\n\nAnd of Spain, and why is it there?",
        },
    ],
]
CANDIDATES = [
    ["Ahoy! Hello.", "Hi there, how can I help you today with anything?", ""],
    [
        "Ahoy! Madrid, in the middle.",
        "Madrid.",
        "Ahoy! It is Madrid, chosen by a king long ago for its central spot.",
    ],
]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def save_reward_model(directory: Path, *, num_labels: int = 1, tokenizer=None, seed: int = 0) -> Path:
    tokenizer = tokenizer if tokenizer is not None else copy.deepcopy(llama3())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=num_labels,
    )
    # No pad_token_id in the model config, as in many Llama checkpoints: the scorer must take it
    # from the tokenizer, or a batch of more than one fails.
    assert config.pad_token_id is None
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # logits of order 1: scores spread over (0, 1), far from saturating
        model.score.weight.normal_(0, 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def direct_scores(
    directory: Path, contexts, candidates, *, max_tokens: int | None = None
) -> list[list[float]]:
    """One unbatched forward per candidate of the saved model: the chat template's text, encoded
    without extra special tokens, through the model; the sigmoid of the logit (one label) or the
    probability of the last class."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    out = []
    for context, group in zip(contexts, candidates, strict=True):
        row = []
        for reply in group:
            text = tokenizer.apply_chat_template(
                [*context, {"role": "assistant", "content": reply}], tokenize=False
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if max_tokens is not None:
                ids = ids[-max_tokens:]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            row.append(
                torch.sigmoid(logits[0]).item() if logits.numel() == 1 else logits.softmax(-1)[-1].item()
            )
        out.append(row)
    return out


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    return save_reward_model(tmp_path_factory.mktemp("rm") / "model")


def scorer(directory: Path, **config) -> RewardScorer:
    settings = {"reward_model": str(directory), "reward_model_weight": 1.0, "verifier_weight": 1.0} | config
    return RewardScorer(RewardConfig(**settings), allowed_roots=[directory.parent])


# ---------------------------------------------------------------------------------------------
# The reward model


def test_total_is_the_documented_weighted_combination(rm_dir):
    expected_rm = direct_scores(rm_dir, CONTEXTS, CANDIDATES)
    assert len({round(s, 4) for row in expected_rm for s in row}) > 1  # the scores do differ
    verifier_only = RewardScorer(RewardConfig()).score(AHOY, CONTEXTS, CANDIDATES)
    for w_v, w_rm in ((1.0, 1.0), (2.0, 0.5), (0.0, 1.0)):
        rewards = scorer(rm_dir, verifier_weight=w_v, reward_model_weight=w_rm).score(
            AHOY, CONTEXTS, CANDIDATES
        )
        assert [len(g) for g in rewards] == [len(g) for g in CANDIDATES]
        for group, plain, rms in zip(rewards, verifier_only, expected_rm, strict=True):
            for reward, alone, rm in zip(group, plain, rms, strict=True):
                assert reward.reward_model == pytest.approx(rm, abs=1e-5)
                assert reward.verifier == alone.verifier and reward.reason == alone.reason
                assert reward.total == pytest.approx(
                    (w_v * reward.verifier + w_rm * rm) / (w_v + w_rm), abs=1e-6
                )
                assert reward.to_json()["reward_model"] == reward.reward_model
    # The verifiers themselves: "Ahoy! Hello." starts right and is short; "" scores 0.
    first = verifier_only[0]
    assert first[0].verifier == 1.0 and first[2].verifier == 0.0 and first[2].total == 0.0
    assert 0.0 < first[1].verifier < 1.0  # too long, no "Ahoy!": mean of 0 and 6/10


def test_batched_scores_equal_unbatched(rm_dir):
    one = scorer(rm_dir, batch_size=1).score(AHOY, CONTEXTS, CANDIDATES)
    many = scorer(rm_dir, batch_size=16).score(AHOY, CONTEXTS, CANDIDATES)
    odd = scorer(rm_dir, batch_size=4).score(AHOY, CONTEXTS, CANDIDATES)  # batches straddle contexts
    for a, b, c in zip(one, many, odd, strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            assert y.reward_model == pytest.approx(x.reward_model, abs=1e-5)
            assert z.reward_model == pytest.approx(x.reward_model, abs=1e-5)
            assert y.total == pytest.approx(x.total, abs=1e-5)


def test_batches_are_right_padded_whatever_the_tokenizer_says(tmp_path):
    # Left padding shifts every real token's position in a padded row: harmless for rotary
    # embeddings up to rounding, but not for learned absolute positions.
    from transformers import AutoTokenizer

    directory = save_reward_model(tmp_path / "left")
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(settings | {"padding_side": "left"}))
    assert AutoTokenizer.from_pretrained(directory).padding_side == "left"
    rm = scorer(directory)._rm
    assert rm is not None and rm[1].padding_side == "right" and rm[1].truncation_side == "left"
    one = scorer(directory, batch_size=1).score(AHOY, CONTEXTS, CANDIDATES)
    many = scorer(directory, batch_size=16).score(AHOY, CONTEXTS, CANDIDATES)
    for a, b in zip(one, many, strict=True):
        assert [r.reward_model for r in b] == pytest.approx([r.reward_model for r in a], abs=1e-5)


def test_a_tokenizer_that_adds_bos_does_not_double_it(tmp_path):
    # Real Llama-3 tokenizers add BOS when encoding, and the chat template writes it too.
    tokenizer = copy.deepcopy(llama3())
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id
    directory = save_reward_model(tmp_path / "bos", tokenizer=tokenizer)
    rewards = scorer(directory).score(AHOY, CONTEXTS, CANDIDATES)
    expected = direct_scores(directory, CONTEXTS, CANDIDATES)  # the template's single BOS
    assert [[r.reward_model for r in g] for g in rewards] == [pytest.approx(e, abs=1e-5) for e in expected]


def test_an_over_long_text_keeps_the_reply(tmp_path):
    tokenizer = copy.deepcopy(llama3())
    tokenizer.model_max_length = 48
    directory = save_reward_model(tmp_path / "short", tokenizer=tokenizer)
    long_context = [[{"role": "user", "content": "Tell me about the sea. " * 20}]]
    replies = [["Ahoy! Blue.", "Ahoy! It is deep and wide."]]
    rewards = scorer(directory).score(AHOY, long_context, replies)
    expected = direct_scores(directory, long_context, replies, max_tokens=48)
    assert [r.reward_model for r in rewards[0]] == pytest.approx(expected[0], abs=1e-5)
    assert rewards[0][0].reward_model != pytest.approx(rewards[0][1].reward_model, abs=1e-6)


def test_several_classes_score_the_probability_of_the_last(tmp_path):
    directory = save_reward_model(tmp_path / "three", num_labels=3)
    rewards = scorer(directory, batch_size=2).score(AHOY, CONTEXTS, CANDIDATES)
    expected = direct_scores(directory, CONTEXTS, CANDIDATES)
    assert [[r.reward_model for r in g] for g in rewards] == [pytest.approx(e, abs=1e-5) for e in expected]
    assert all(0.0 < r.reward_model < 1.0 for g in rewards for r in g)


def test_pickle_weights_are_refused(tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_labels": 1}))
    (directory / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ModelError) as exc:
        scorer(directory)
    assert exc.value.code == "unsafe_weights" and "pytorch_model.bin" in exc.value.message


def test_a_path_outside_the_allowed_roots_is_refused(rm_dir, tmp_path):
    config = RewardConfig(reward_model=str(rm_dir), reward_model_weight=1.0)
    with pytest.raises(ModelError) as exc:
        RewardScorer(config, allowed_roots=[tmp_path / "elsewhere"])
    assert exc.value.code == "path_not_allowed"
    # A symlink inside the roots that points outside them is refused too.
    (tmp_path / "roots").mkdir()
    (tmp_path / "roots" / "link").symlink_to(rm_dir, target_is_directory=True)
    with pytest.raises(ModelError) as exc:
        RewardScorer(
            RewardConfig(reward_model=str(tmp_path / "roots" / "link"), reward_model_weight=1.0),
            allowed_roots=[tmp_path / "roots"],
        )
    assert exc.value.code == "path_not_allowed"


def test_reward_model_weight_needs_a_path():
    with pytest.raises(ValueError, match="needs reward_model"):
        RewardConfig(reward_model_weight=1.0)
    with pytest.raises(ValidationFailed) as exc:
        parse_config({"reward": {"reward_model_weight": 0.5}})
    assert [p.field for p in exc.value.problems] == ["reward.reward_model_weight"]
    with pytest.raises(ValueError, match="at least one reward weight"):
        RewardConfig(verifier_weight=0.0)


def test_a_reward_model_with_weight_zero_is_never_loaded(tmp_path):
    config = RewardConfig(reward_model=str(tmp_path / "missing"), reward_model_weight=0.0)
    (group,) = RewardScorer(config, allowed_roots=[tmp_path]).score(AHOY, CONTEXTS[:1], CANDIDATES[:1])
    assert all(r.reward_model is None and r.total == r.verifier for r in group)


# ---------------------------------------------------------------------------------------------
# Relevance (gatt/relevance.py, the packaged sentence-embedding model)


def test_relevance_is_computed_when_ranking_needs_it_and_weighted_as_documented():
    assert RewardConfig().prefer == "relevant" and RewardConfig().relevance_weight == 0.0
    shorter = RewardScorer(RewardConfig(prefer="shorter")).score(AHOY, CONTEXTS, CANDIDATES)
    assert all(r.relevance is None and r.to_json()["relevance"] is None for g in shorter for r in g)
    # By default the question is the context's last user message without the instruction.
    questions = ["Hello there!", "And of Spain, and why is it there?"]
    expected = [
        relevance([q] * len(group), group, ignore=[AHOY.sampling_text] * len(group))
        for q, group in zip(questions, CANDIDATES, strict=True)
    ]
    for rewards in (
        RewardScorer(RewardConfig()).score(AHOY, CONTEXTS, CANDIDATES),
        RewardScorer(RewardConfig()).score(AHOY, CONTEXTS, CANDIDATES, questions=questions),
    ):
        for group, plain, rel in zip(rewards, shorter, expected, strict=True):
            assert [r.relevance for r in group] == pytest.approx(rel, abs=1e-5)
            assert [r.total for r in group] == [r.total for r in plain]  # weight 0: a tie-break only
    assert expected[0][2] == 0.0  # the empty candidate
    asked = ["What is the capital of Spain, and why is it there?"]
    for w_rel in (1.0, 0.5):
        (group,) = RewardScorer(RewardConfig(relevance_weight=w_rel)).score(
            AHOY, CONTEXTS[1:], CANDIDATES[1:], questions=asked
        )
        for r in group:
            assert r.relevance is not None and r.to_json()["relevance"] == r.relevance
            assert r.total == pytest.approx((r.verifier + w_rel * max(0.0, r.relevance)) / (1 + w_rel))
    with pytest.raises(ValueError, match="questions"):
        RewardScorer(RewardConfig()).score(AHOY, CONTEXTS, CANDIDATES, questions=asked)


def test_ranking_settings_are_checked():
    config = parse_config(
        {"reward": {"relevance_weight": 0.5, "min_relevance": 0.28, "max_echo": None, "prefer": "longer"}}
    ).reward
    assert (config.relevance_weight, config.min_relevance, config.max_echo) == (0.5, 0.28, None)
    assert RewardConfig(verifier_weight=0.0, relevance_weight=1.0).needs_relevance
    assert not RewardConfig(prefer="shorter").needs_relevance
    assert RewardConfig(prefer="shorter", min_relevance=0.1).needs_relevance
    for bad in ({"max_echo": 0}, {"max_echo": 1.5}, {"min_relevance": 2}, {"relevance_weight": -1}):
        with pytest.raises(ValueError):
            RewardConfig(**bad)
    with pytest.raises(ValidationFailed) as exc:
        parse_config({"reward": {"prefer": "random", "max_echo": 0}})
    assert sorted(p.field for p in exc.value.problems) == [
        "reward.max_echo",
        "reward.prefer",
    ]  # every problem at once


# ---------------------------------------------------------------------------------------------
# sample_turns: "last" on the real model


@pytest.mark.slow
def test_sample_turns_last_keeps_corpus_replies_as_untrained_context(tmp_path):
    from workers.engine.models import load_model
    from workers.engine.pipeline import load_dialogues, run_job
    from workers.engine.training_set import build_training_set

    spec = {
        "custom": [
            {
                "name": "brief",
                "text": "Answer in at most 12 words.",
                "verifiers": [{"type": "max_words", "n": 12}],
            }
        ]
    }
    (tmp_path / "instructions.json").write_text(json.dumps(spec))
    config = parse_config(
        {
            "output_dir": str(tmp_path / "job"),
            "seed": 1,
            "data": {
                "corpus": str(ROOT / "examples" / "dialogues.jsonl"),
                "instructions": str(tmp_path / "instructions.json"),
                "max_dialogues": 2,
                "max_turns": 3,
                "sample_turns": "last",
            },
            "sampling": {"k": 2, "max_new_tokens": 24, "batch_prompts": 2},
            "reward": {"min_reward": 0.0},
            "training": {"max_steps": 1, "micro_batch_size": 2},
        }
    )
    loaded = load_model("default")
    result = run_job(config, Hooks(), loaded=loaded)
    out = Path(config.output_dir)
    corpus = load_dialogues(config)
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and result.sampled_dialogues == 2

    trained_records = []
    for record in records:
        turns = corpus[record["index"]].turns[:3]
        assert record["users"] == [user for user, _ in turns]
        # The corpus's own first two replies, untouched and untrained; only the last turn sampled.
        assert record["replies"][:2] == [reply for _, reply in turns[:2]]
        assert [t["turn"] for t in record["turns"]] == [2]
        chosen = record["turns"][0]["chosen"]
        if chosen is None:
            assert record["trained"] == [False, False] and len(record["replies"]) == 2
            continue
        assert record["trained"] == [False, False, True]
        assert record["replies"][2] == record["turns"][0]["candidates"][chosen]["text"]
        trained_records.append(record)
    assert trained_records and result.examples == len(trained_records)

    rows = {r["index"]: r for r in map(json.loads, (out / "training_set.jsonl").read_text().splitlines())}
    assert set(rows) == {r["index"] for r in trained_records}
    for record in trained_records:
        row = rows[record["index"]]
        assert row["trained"] == [False, False, False, False, False, True]  # u a u a u a
        assistants = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert assistants[:2] == [reply.strip() for reply in record["replies"][:2]]
        spans = [span for example in row["trained_spans"] for span in example]
        assert spans == [f"{record['replies'][2]}<|im_end|>"]
        # Token level: the labels the trainer gets are the sampled reply and nothing else.
        (example,) = build_training_set(config, loaded.tokenizer, [record], out / "one.jsonl", Hooks())
        trained = [
            t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX
        ]
        assert loaded.tokenizer.decode(trained) == f"{record['replies'][2]}<|im_end|>"
        assert example.n_trained == len(trained) < len(example.input_ids) / 4
    assert math.isfinite(result.final_metrics["loss"])
