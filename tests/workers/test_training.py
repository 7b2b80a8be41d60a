"""The training loop on a tiny random-init Llama: loss normalisation, masking, resume, checkpoints."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from gatt.augment import training_dialogue
from gatt.masks import IGNORE_INDEX, TokenizedExample, build_examples, fit_to_length
from tests.gatt import chat_tokenizers
from tests.threads import one_torch_thread
from workers.engine import objectives
from workers.engine.checkpoints import MANIFEST, verify_checkpoint
from workers.engine.config import TrainConfig
from workers.engine.hooks import Hooks, Stopped
from workers.engine.objectives import Batch, collate, pack, summed_loss
from workers.engine.schedule import LOOKAHEAD, TokenBatches, epoch_permutation, first_fit, lr_at
from workers.engine.training import METRIC_FIELDS, train

VOCAB = 300

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def tiny_llama(vocab: int = VOCAB, *, tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.1,  # wider than the default 0.02, so a frozen random head still lets LoRA fit
    )
    return LlamaForCausalLM(config).eval()


def handmade(n_tokens: int, spans: list[tuple[int, int]], seed: int) -> TokenizedExample:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n_tokens,), generator=generator).tolist()
    labels = [IGNORE_INDEX] * n_tokens
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return TokenizedExample(tuple(ids), tuple(labels), tuple(spans))


class Recorder:
    """Hooks that remember what they were told."""

    def __init__(self, stop_after_calls: int | None = None, raise_at_step: int | None = None) -> None:
        self.events: list[tuple[str, str, str, dict]] = []
        self.metrics: list[tuple[int, dict]] = []
        self.progress: list[tuple[str, int, int]] = []
        self.checkpoints: list[tuple[int, str, dict]] = []
        self.stop_calls = 0
        self.stop_after_calls = stop_after_calls
        self.raise_at_step = raise_at_step

    def _metrics(self, step: int, row: dict) -> None:
        self.metrics.append((step, row))
        if step == self.raise_at_step:
            raise RuntimeError("simulated crash")

    def _should_stop(self) -> bool:
        self.stop_calls += 1
        return self.stop_after_calls is not None and self.stop_calls > self.stop_after_calls

    def hooks(self) -> Hooks:
        return Hooks(
            progress=lambda *a: self.progress.append(a),
            event=lambda *a: self.events.append(a),
            metrics=self._metrics,
            checkpoint=lambda *a: self.checkpoints.append(a),
            should_stop=self._should_stop,
        )

    def kinds(self) -> list[str]:
        return [e[1] for e in self.events]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizers.llama3()


@pytest.fixture(scope="module")
def dialogue_examples(tok) -> list[TokenizedExample]:
    users = ["Hello! How are you today?", "What is the capital of France?", "Tell me a story about a dragon."]
    replies = ["I am fine, thank you.", "Paris is the capital of France.", "The dragon learned to paint."]
    out: list[TokenizedExample] = []
    for i in range(3):
        dialogue = training_dialogue(
            "Always answer in French.", users[i:] + users[:i], replies[i:] + replies[:i], [False, True, True]
        )
        out += build_examples(tok, dialogue, "last_turn").examples
    return out


def losses(result) -> list[float]:
    return [row["loss"] for row in result.metrics]


def jsonl_steps(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Config and schedule.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"method": "qlora"},
        {"lora_r": 0},
        {"lora_dropout": 1.0},
        {"lora_targets": ()},
        {"learning_rate": 0.0},
        {"learning_rate": math.nan},
        {"weight_decay": -0.1},
        {"betas": (0.9, 1.0)},
        {"schedule": "step"},
        {"warmup_steps": -1},
        {"max_steps": 0},
        {"epochs": 0.0},
        {"micro_batch_size": 0},
        {"grad_accum": 1.5},
        {"max_grad_norm": 0.0},
        {"max_seq_len": 1},
        {"checkpoint_every": -1},
        {"keep_checkpoints": 0},
        {"merge_on_save": "yes"},
        {"seed": True},
        {"micro_batch_tokens": 0},
        {"micro_batch_tokens": 2**21},
        {"micro_batch_tokens": 4096, "packing": "padded"},
        {"micro_batch_tokens": 4096, "objective": "dpo"},
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_lr_schedule():
    config = TrainConfig(learning_rate=1.0, warmup_steps=4, schedule="cosine")
    assert [lr_at(s, config, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, config, 14) == 1.0
    assert lr_at(9, config, 14) == pytest.approx(0.5)
    assert 0 < lr_at(13, config, 14) < 0.03
    linear = TrainConfig(learning_rate=1.0, schedule="linear")
    assert [lr_at(s, linear, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    constant = TrainConfig(learning_rate=0.5, schedule="constant", warmup_steps=1)
    assert [lr_at(s, constant, 3) for s in range(3)] == [0.5, 0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# Loss: normalisation and masking.
# ---------------------------------------------------------------------------------------------


def test_step_loss_is_summed_ce_over_all_trained_tokens(tmp_path):
    # Four examples with very different numbers of trained tokens; one step of 2 micro-batches of 2.
    examples = [
        handmade(40, [(5, 35)], seed=1),  # 30 trained
        handmade(12, [(8, 10)], seed=2),  # 2
        handmade(20, [(3, 6), (10, 12)], seed=3),  # 5
        handmade(9, [(7, 8)], seed=4),  # 1
    ]
    model = tiny_llama()
    reference = copy.deepcopy(model)
    config = TrainConfig(method="full", micro_batch_size=2, grad_accum=2, max_steps=1)
    result = train(model, None, examples, config, tmp_path)

    # By hand: each example alone, unpadded; sum CE over trained tokens, divide by their count.
    total, count, per_example_means = 0.0, 0, []
    with torch.no_grad():
        for example in examples:
            logits = reference(input_ids=torch.tensor([example.input_ids])).logits[0, :-1]
            targets = torch.tensor(example.labels[1:])
            ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            n = int((targets != IGNORE_INDEX).sum())
            total, count = total + ce, count + n
            per_example_means.append(ce / n)
    step = result.metrics[0]
    assert step["trained_tokens"] == count == 38
    assert step["tokens"] == sum(len(e.input_ids) for e in examples)
    assert step["loss"] == pytest.approx(total / count, abs=1e-5)

    # Not a mean of per-example means, nor of per-micro-batch means (order from the seeded permutation).
    assert abs(step["loss"] - sum(per_example_means) / 4) > 1e-3
    order = epoch_permutation(4, config.seed, 0)
    micro_means = []
    for pair in (order[:2], order[2:]):
        ce = sum(per_example_means[i] * examples[i].n_trained for i in pair)
        micro_means.append(ce / sum(examples[i].n_trained for i in pair))
    assert abs(step["loss"] - sum(micro_means) / 2) > 1e-3


@pytest.mark.parametrize("head", ["trained positions", "trained columns"])
@pytest.mark.parametrize("tie", [False, True])
def test_summed_loss_matches_full_logits_loss_and_gradients(tie, head, monkeypatch):
    # summed_loss computes logits only where tokens train: for a plain causal LM the head runs on
    # exactly those positions; for other architectures the model is asked for the trained columns.
    if head == "trained columns":
        monkeypatch.setattr(objectives, "_PLAIN_HEAD_TYPES", frozenset())
    examples = [handmade(30, [(4, 9), (20, 25)], seed=11), handmade(17, [(12, 16)], seed=12)]
    batch = collate(examples, pad_id=0)
    model, reference = tiny_llama(tie=tie), tiny_llama(tie=tie)
    ce = summed_loss(model, batch)
    ce.backward()
    logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    expected = F.cross_entropy(
        logits.reshape(-1, VOCAB), batch.labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    expected.backward()
    assert ce.item() == pytest.approx(expected.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    # A micro-batch that trains nothing (a reply cut by max_seq_len) costs a zero loss, not an error.
    nothing = TokenizedExample((1, 2, 3), (IGNORE_INDEX,) * 3, ())
    assert summed_loss(tiny_llama(), collate([nothing], pad_id=0)).item() == 0.0


def test_summed_loss_of_a_packed_row_equals_the_examples_one_by_one():
    # Two examples end to end in one row, positions restarting: attention must not cross them.
    a, b = handmade(20, [(5, 12)], seed=21), handmade(15, [(9, 15)], seed=22)
    model = tiny_llama()
    with torch.no_grad():
        alone = sum(summed_loss(model, collate([e], pad_id=0)).item() for e in (a, b))
        ids = torch.tensor([a.input_ids + b.input_ids])
        labels = torch.tensor([list(a.labels) + [IGNORE_INDEX, *b.labels[1:]]])
        positions = torch.tensor([list(range(20)) + list(range(15))])
        packed = summed_loss(model, Batch(ids, torch.ones_like(ids), labels), position_ids=positions).item()
    assert packed == pytest.approx(alone, rel=1e-5)


def _uneven_examples() -> list[TokenizedExample]:
    return [
        handmade(n, [(n // 3, n // 2), (n - 6, n)], seed=30 + i) for i, n in enumerate((30, 17, 44, 12, 25))
    ]


def test_pack_lays_examples_end_to_end_longest_first():
    examples = _uneven_examples()
    batch = pack(examples, pad_id=0, row_len=64)
    # First fit, longest first: 44+17 | 30+25 | 12, each row padded only at its end.
    assert batch.lengths == ((44, 17), (30, 25), (12,))
    assert batch.input_ids.shape == (3, 64)
    assert batch.input_ids[0, :61].tolist() == [*examples[2].input_ids, *examples[1].input_ids]
    assert batch.attention_mask.sum(dim=1).tolist() == [61, 55, 12]
    padded = collate(examples, pad_id=0)
    assert (batch.n_trained, batch.n_tokens) == (padded.n_trained, padded.n_tokens)
    # The first token of an example is never a target: it would be predicted from the one before.
    assert batch.labels[0, 44].item() == IGNORE_INDEX
    document, position = batch.documents()
    assert document[0].tolist() == [0] * 44 + [1] * 17 + [2] * 3
    assert position[0].tolist() == list(range(44)) + list(range(17)) + list(range(3))
    assert pack(list(reversed(examples)), pad_id=0, row_len=64).lengths == batch.lengths
    with pytest.raises(ValueError, match="does not fit"):
        pack(examples, pad_id=0, row_len=40)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_carry_the_padded_loss_and_gradients(attention):
    # Attention that crossed from one example into the next would change both.
    examples = _uneven_examples()

    def loss_and_grads(batch: Batch) -> tuple[float, dict[str, torch.Tensor]]:
        model = tiny_llama()
        model.set_attn_implementation(attention)
        ce = summed_loss(model, batch)
        ce.backward()
        return ce.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded_loss, padded_grads = loss_and_grads(collate(examples, pad_id=0))
    packed_loss, packed_grads = loss_and_grads(pack(examples, pad_id=0, row_len=64))
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packed_rows_under_flex_attention_keep_to_each_example():
    # The block mask built from the examples' lengths. Flex attention has no backward on a CPU
    # (the GPU trains through it), so this compares the forward loss alone.
    examples = _uneven_examples()
    model = tiny_llama()
    with torch.no_grad():
        padded = summed_loss(model, collate(examples, pad_id=0)).item()
        model.set_attn_implementation("flex_attention")
        packed = summed_loss(model, pack(examples, pad_id=0, row_len=64)).item()
    assert packed == pytest.approx(padded, rel=1e-5)


def test_training_packed_or_compiled_follows_the_padded_curve(tmp_path):
    examples = [*_uneven_examples(), handmade(60, [(40, 52)], seed=40), handmade(21, [(3, 9)], seed=41)]
    curves = {}
    for name, layout in {
        "padded": {"packing": "padded"},
        "packed": {"packing": "packed"},
        "compiled": {"packing": "packed", "compile": "on"},
    }.items():
        config = TrainConfig(method="full", micro_batch_size=3, max_steps=4, learning_rate=1e-2, **layout)
        model = tiny_llama()
        result = train(model, None, examples, config, tmp_path / name)
        curves[name] = [(row["loss"], row["grad_norm"], row["trained_tokens"]) for row in result.metrics]
        # The layout is undone: sampling after training sees the model as loaded.
        assert model.config._attn_implementation == "sdpa"
        assert not any("forward" in vars(layer) for layer in model.model.layers)
    for name in ("packed", "compiled"):
        for got, want in zip(curves[name], curves["padded"], strict=True):
            assert got[0] == pytest.approx(want[0], rel=1e-5), name
            assert got[1] == pytest.approx(want[1], rel=1e-4), name
            assert got[2] == want[2]


def test_token_micro_batches_fill_their_rows_from_each_epochs_order():
    lengths = [30, 17, 44, 12, 25, 60, 21, 9, 33, 50, 5, 40] * 3
    config = TrainConfig(micro_batch_tokens=128, seed=3)
    batches = TokenBatches(lengths, config, rows=2, row_len=64)
    for epoch in range(3):
        count = batches.per_epoch(epoch)
        start = sum(batches.per_epoch(e) for e in range(epoch))
        cut = [batches.indices(start + i) for i in range(count)]
        line = epoch_permutation(len(lengths), 3, epoch)
        assert sorted(i for piece in cut for i in piece) == sorted(line)
        for piece in cut:
            # Packs into two rows in the order taken (what pack(rows=2) does with it) ...
            assert first_fit([lengths[i] for i in piece], 64, rows=2) is not None
            # ... and takes from the front of the line: its first example is the first in line,
            # and none of the next LOOKAHEAD examples left in line would have fitted too.
            assert piece[0] == line[0]
            line = [i for i in line if i not in piece]
            for waiting in line[:LOOKAHEAD]:
                assert first_fit([lengths[i] for i in [*piece, waiting]], 64, rows=2) is None
        assert batches.position(start + count - 1) == (epoch, count - 1)
        assert batches.epochs_done(start + count) == epoch + 1
    assert batches.for_epochs(2.0) == batches.per_epoch(0) + batches.per_epoch(1)
    assert batches.for_epochs(0.5) == math.ceil(batches.per_epoch(0) / 2)
    with pytest.raises(ValueError, match="does not fit"):
        TokenBatches([65], config, rows=2, row_len=64)


def test_pack_into_fixed_rows_keeps_the_order_and_adds_empty_rows():
    examples = _uneven_examples()  # 30, 17, 44, 12, 25 tokens
    batch = pack(examples, pad_id=0, row_len=64, rows=4)
    # First fit in the order given: 30+17+12 | 44 | 25, then an empty row.
    assert batch.lengths == ((30, 17, 12), (44,), (25,), ())
    assert batch.input_ids.shape == (4, 64)
    assert batch.attention_mask[3].sum().item() == 0
    assert (batch.labels[3] == IGNORE_INDEX).all()
    padded = collate(examples, pad_id=0)
    assert (batch.n_trained, batch.n_tokens) == (padded.n_trained, padded.n_tokens)
    with pytest.raises(ValueError, match="do not fit 2 rows"):
        pack(examples, pad_id=0, row_len=64, rows=2)


def test_token_micro_batches_packed_follow_the_same_micro_batches_padded(tmp_path):
    # micro_batch_tokens always packs; the objective given here pads the very same micro-batches.
    examples = [*_uneven_examples(), handmade(60, [(40, 52)], seed=40), handmade(21, [(3, 9)], seed=41)]
    config = TrainConfig(
        method="full", micro_batch_tokens=128, micro_batch_size=1, max_steps=4, learning_rate=1e-2
    )
    curves = {}
    for name, objective in {"packed": None, "padded": objectives.MaskedSFT(pad_id=0)}.items():
        result = train(tiny_llama(), None, examples, config, tmp_path / name, objective=objective)
        curves[name] = [(row["loss"], row["grad_norm"], row["trained_tokens"]) for row in result.metrics]
    for got, want in zip(curves["packed"], curves["padded"], strict=True):
        assert got[0] == pytest.approx(want[0], rel=1e-5)
        assert got[1] == pytest.approx(want[1], rel=1e-4)
        assert got[2] == want[2]
    # Cut by tokens, not by micro_batch_size (1 here): one row of 128, several examples in some.
    tokens = [row["tokens"] for row in result.metrics]
    assert max(tokens) <= 128 and max(tokens) > max(len(e.input_ids) for e in examples)


def test_token_micro_batches_resume_on_the_same_curve(tmp_path):
    examples = [*_uneven_examples(), handmade(60, [(40, 52)], seed=40), handmade(21, [(3, 9)], seed=41)]
    config = TrainConfig(
        method="full", micro_batch_tokens=64, epochs=3, learning_rate=1e-2, checkpoint_every=2, seed=1
    )
    reference = train(tiny_llama(), None, examples, config, tmp_path / "whole")
    first = Recorder(stop_after_calls=5)
    with pytest.raises(Stopped):
        train(tiny_llama(), None, examples, config, tmp_path / "split", hooks=first.hooks())
    resumed = train(tiny_llama(), None, examples, config, tmp_path / "split")
    assert resumed.resumed_from == 4
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-5)
    # Three epochs of unequal micro-batch counts: the metrics' epoch ends at exactly 3.
    assert reference.metrics[-1]["epoch"] == 3.0
    assert len(reference.metrics) == sum(
        TokenBatches([len(e.input_ids) for e in examples], config, 1, 128).per_epoch(e) for e in range(3)
    )


def _perturbed(example: TokenizedExample, seed: int) -> TokenizedExample:
    """Different tokens after the last trained span, and non-ignored labels outside every span."""
    last_end = example.spans[-1][1]
    generator = torch.Generator().manual_seed(seed)
    tail = torch.randint(10, VOCAB, (len(example.input_ids) - last_end,), generator=generator).tolist()
    ids = list(example.input_ids[:last_end]) + tail
    assert ids != list(example.input_ids)
    inside = {i for start, end in example.spans for i in range(start, end)}
    labels = [example.labels[i] if i in inside else ids[i] for i in range(len(ids))]
    return TokenizedExample(tuple(ids), tuple(labels), example.spans)


def test_untrained_positions_get_no_gradient(tmp_path):
    examples = [handmade(30, [(4, 9), (12, 18)], seed=5), handmade(25, [(10, 14)], seed=6)]
    perturbed = [_perturbed(e, seed=7 + i) for i, e in enumerate(examples)]

    def loss_and_grads(batch_examples):
        model = tiny_llama()
        ce = summed_loss(model, collate(batch_examples, pad_id=0))
        ce.backward()
        return ce.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, grads_a = loss_and_grads(examples)
    loss_b, grads_b = loss_and_grads(perturbed)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], atol=1e-7, rtol=1e-6, msg=name)

    # Through the whole loop: the same curve, gradient norms and trained-token counts.
    config = TrainConfig(method="full", micro_batch_size=2, max_steps=3, learning_rate=1e-2)
    a = train(tiny_llama(), None, examples, config, tmp_path / "a")
    b = train(tiny_llama(), None, perturbed, config, tmp_path / "b")
    for row_a, row_b in zip(a.metrics, b.metrics, strict=True):
        assert row_a["trained_tokens"] == row_b["trained_tokens"] == 5 + 6 + 4
        assert row_a["loss"] == pytest.approx(row_b["loss"], abs=1e-6)
        assert row_a["grad_norm"] == pytest.approx(row_b["grad_norm"], rel=1e-5)


@pytest.mark.parametrize(("method", "lr"), [("lora", 1e-2), ("full", 1e-2)])
def test_overfits_small_set(tmp_path, tok, dialogue_examples, method, lr):
    recorder = Recorder()
    config = TrainConfig(
        method=method, learning_rate=lr, schedule="constant", max_steps=20, micro_batch_size=6, lora_r=8
    )
    result = train(
        tiny_llama(len(tok)),
        tok,
        dialogue_examples,
        config,
        tmp_path,
        hooks=recorder.hooks(),
        base_model="tiny",
    )
    curve = losses(result)
    assert curve[-1] < 0.6 * curve[0], curve
    assert result.steps == 20
    assert result.trained_tokens == sum(row["trained_tokens"] for row in result.metrics)
    assert [s for s, _ in recorder.metrics] == list(range(1, 21))
    assert set(recorder.metrics[0][1]) == set(METRIC_FIELDS) - {"step"}
    assert recorder.progress[-1] == ("train", 20, 20)
    assert [c[0] for c in recorder.checkpoints] == [20]
    assert recorder.checkpoints[0][1] == str(result.checkpoint)
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert float(rows[-1]["loss"]) == pytest.approx(curve[-1])
    assert rows[-1]["epoch"] == "20.0"


# ---------------------------------------------------------------------------------------------
# Resume.
# ---------------------------------------------------------------------------------------------

# 6 examples in micro-batches of 2: 3 per epoch, 2 per step, so steps straddle epochs. Dropout,
# weight decay and warmup make every piece of restored state matter.
RESUME = TrainConfig(
    method="lora",
    lora_r=4,
    lora_dropout=0.1,
    learning_rate=2e-2,
    weight_decay=0.01,
    warmup_steps=2,
    micro_batch_size=2,
    grad_accum=2,
    max_steps=8,
    checkpoint_every=2,
    keep_checkpoints=2,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tok, dialogue_examples):
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, train(tiny_llama(len(tok)), tok, dialogue_examples, RESUME, out, base_model="tiny")


@pytest.mark.parametrize("kill", ["stop", "exception"])
def test_resume_continues_the_same_curve(tmp_path, tok, dialogue_examples, uninterrupted, kill):
    _, reference = uninterrupted
    if kill == "stop":
        # should_stop is asked before every micro-batch: 4 steps x 2, then once more inside step 5.
        first = Recorder(stop_after_calls=9)
        with pytest.raises(Stopped):
            train(
                tiny_llama(len(tok)),
                tok,
                dialogue_examples,
                RESUME,
                tmp_path,
                hooks=first.hooks(),
                base_model="tiny",
            )
        assert jsonl_steps(tmp_path) == [1, 2, 3, 4]
    else:
        # A crash after step 5's metrics line was written but before its checkpoint.
        first = Recorder(raise_at_step=5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(
                tiny_llama(len(tok)),
                tok,
                dialogue_examples,
                RESUME,
                tmp_path,
                hooks=first.hooks(),
                base_model="tiny",
            )
        assert jsonl_steps(tmp_path) == [1, 2, 3, 4, 5]
    # Nothing new was saved after step 4's checkpoint.
    assert [c[0] for c in first.checkpoints] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

    second = Recorder()
    resumed = train(
        tiny_llama(len(tok)),
        tok,
        dialogue_examples,
        RESUME,
        tmp_path,
        hooks=second.hooks(),
        base_model="tiny",
    )
    assert resumed.resumed_from == 4
    assert [s for s, _ in second.metrics] == [5, 6, 7, 8]
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-5)
    assert [r["grad_norm"] for r in resumed.metrics] == pytest.approx(
        [r["grad_norm"] for r in reference.metrics], rel=1e-4
    )
    assert resumed.trained_tokens == reference.trained_tokens
    assert jsonl_steps(tmp_path) == list(range(1, 9))
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 9))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000006", "step-000008"]


def test_corrupt_and_half_written_checkpoints_are_skipped(tmp_path, tok, dialogue_examples, uninterrupted):
    source, reference = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(source, out)
    ckpts = out / "checkpoints"
    # step 8: a weight file whose bytes no longer match the manifest (same size).
    weights = ckpts / "step-000008" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    # step 9: a directory without manifest; step 10: a temp dir left by a crash mid-write.
    shutil.copytree(ckpts / "step-000006", ckpts / "step-000009")
    (ckpts / "step-000009" / MANIFEST).unlink()
    (ckpts / "step-000010.tmp").mkdir()
    (ckpts / "step-000010.tmp" / "adapter_model.safetensors").write_bytes(b"junk")
    assert "sha256" in verify_checkpoint(ckpts / "step-000008")
    assert "manifest" in verify_checkpoint(ckpts / "step-000009")

    recorder = Recorder()
    resumed = train(
        tiny_llama(len(tok)), tok, dialogue_examples, RESUME, out, hooks=recorder.hooks(), base_model="tiny"
    )
    assert resumed.resumed_from == 6
    ignored = [e for e in recorder.events if e[1] == "checkpoint_ignored"]
    assert len(ignored) == 3
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-5)
    assert jsonl_steps(out) == list(range(1, 9))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000006", "step-000008"]
    assert verify_checkpoint(ckpts / "step-000008") is None

    # A finished run resumed again trains nothing and returns its final checkpoint.
    again = train(tiny_llama(len(tok)), tok, dialogue_examples, RESUME, out, base_model="tiny")
    assert again.resumed_from == 8 and again.checkpoint == ckpts / "step-000008"
    assert jsonl_steps(out) == list(range(1, 9))


def test_resume_refuses_a_different_setup(tmp_path, tok, dialogue_examples, uninterrupted):
    source, _ = uninterrupted
    shutil.copytree(source, tmp_path / "run")
    with pytest.raises(ValueError, match="micro_batch_size"):
        train(
            tiny_llama(len(tok)),
            tok,
            dialogue_examples,
            RESUME.model_copy(update={"micro_batch_size": 3}),
            tmp_path / "run",
            base_model="tiny",
        )
    with pytest.raises(ValueError, match="examples differ"):
        train(tiny_llama(len(tok)), tok, dialogue_examples[:-1], RESUME, tmp_path / "run", base_model="tiny")


def test_full_resume_with_tied_embeddings(tmp_path):
    examples = [handmade(20 + i, [(5, 10 + i)], seed=20 + i) for i in range(4)]
    config = TrainConfig(
        method="full", micro_batch_size=2, max_steps=4, checkpoint_every=2, learning_rate=1e-2
    )
    reference = train(tiny_llama(tie=True), None, examples, config, tmp_path / "a")
    with pytest.raises(Stopped):
        train(tiny_llama(tie=True), None, examples, config, tmp_path / "b", hooks=Recorder(2).hooks())
    resumed = train(tiny_llama(tie=True), None, examples, config, tmp_path / "b")
    assert resumed.resumed_from == 2
    assert losses(resumed) == pytest.approx(losses(reference), abs=1e-5)

    def tied(model) -> bool:
        return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # Loading the checkpoint (which stores the tied matrix once) leaves the tie as it was.
    assert tied(resumed.model) == tied(reference.model)


# ---------------------------------------------------------------------------------------------
# Checkpoints load with stock loaders.
# ---------------------------------------------------------------------------------------------


def _check_manifest(ckpt: Path, step: int) -> dict:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["step"] == step
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    for rel, info in manifest["files"].items():
        data = (ckpt / rel).read_bytes()
        assert info == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return manifest


def test_lora_checkpoint_loads_with_peft_and_merged_with_transformers(tmp_path, tok, dialogue_examples):
    from peft import PeftModel

    config = TrainConfig(
        method="lora", lora_r=4, learning_rate=3e-2, micro_batch_size=3, max_steps=3, merge_on_save=True
    )
    result = train(tiny_llama(len(tok)), tok, dialogue_examples, config, tmp_path, base_model="tiny-llama")
    ckpt = result.checkpoint
    assert ckpt == tmp_path / "checkpoints" / "step-000003"
    manifest = _check_manifest(ckpt, 3)
    assert manifest["method"] == "lora" and manifest["base_model"] == "tiny-llama"
    assert manifest["metrics"]["loss"] == result.metrics[-1]["loss"]
    assert {"adapter_model.safetensors", "adapter_config.json", "merged/model.safetensors"} <= set(
        manifest["files"]
    )
    adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny-llama"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and len(state["metrics"]) == 3
    assert AutoTokenizer.from_pretrained(ckpt).chat_template == tok.chat_template

    ids = torch.tensor([dialogue_examples[0].input_ids])
    trained = result.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = PeftModel.from_pretrained(tiny_llama(len(tok)), ckpt).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
        merged = AutoModelForCausalLM.from_pretrained(ckpt / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    # The adapter really moved away from the base.
    with torch.no_grad():
        base_logits = tiny_llama(len(tok))(input_ids=ids).logits
    assert (base_logits - expected).abs().max() > 1e-3


def test_full_checkpoint_loads_with_transformers(tmp_path, tok, dialogue_examples):
    config = TrainConfig(method="full", learning_rate=1e-2, micro_batch_size=3, max_steps=2)
    result = train(tiny_llama(len(tok), tie=True), tok, dialogue_examples, config, tmp_path)
    manifest = _check_manifest(result.checkpoint, 2)
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    ids = torch.tensor([dialogue_examples[1].input_ids])
    with torch.no_grad():
        expected = result.model.eval()(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(result.checkpoint).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)


def test_periodic_checkpoints_rotate(tmp_path):
    examples = [handmade(16, [(4, 12)], seed=30 + i) for i in range(2)]
    recorder = Recorder()
    config = TrainConfig(
        method="full", micro_batch_size=2, max_steps=7, checkpoint_every=2, keep_checkpoints=2
    )
    result = train(tiny_llama(), None, examples, config, tmp_path, hooks=recorder.hooks())
    assert [c[0] for c in recorder.checkpoints] == [2, 4, 6, 7]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000006", "step-000007"]
    assert result.checkpoint.name == "step-000007"


def test_a_run_fenced_off_writes_no_more_steps_or_checkpoints(tmp_path):
    """Once `fence` says the run no longer owns the job, training writes nothing more: not the
    step's metrics, not its checkpoint, and it does not rotate (delete) older checkpoints."""
    examples = [handmade(16, [(4, 12)], seed=30 + i) for i in range(2)]
    fenced = {"after": 2, "calls": 0}

    def fence() -> None:
        fenced["calls"] += 1
        if fenced["calls"] > fenced["after"]:
            raise Stopped("lease lost")

    config = TrainConfig(
        method="full", micro_batch_size=2, max_steps=4, checkpoint_every=1, keep_checkpoints=1
    )
    with pytest.raises(Stopped):
        train(tiny_llama(), None, examples, config, tmp_path, hooks=Hooks(fence=fence))
    assert jsonl_steps(tmp_path) == [1, 2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002"]


# ---------------------------------------------------------------------------------------------
# Length limit.
# ---------------------------------------------------------------------------------------------


def test_max_seq_len_cuts_and_drops_whole_replies(tmp_path):
    examples = [
        handmade(30, [(5, 10), (14, 22)], seed=40),  # cut after its first reply (10 tokens)
        handmade(30, [(12, 20)], seed=41),  # first reply ends past 16: dropped
        handmade(12, [(6, 11)], seed=42),  # fits
        handmade(40, [(2, 4), (6, 8), (20, 30)], seed=43),  # cut after its second reply
    ]
    expected = [fit_to_length(e, 16) for e in examples]
    assert expected[1] is None
    recorder = Recorder()
    config = TrainConfig(method="full", max_seq_len=16, micro_batch_size=8, max_steps=1)
    result = train(tiny_llama(), None, examples, config, tmp_path, hooks=recorder.hooks())
    assert result.dropped_examples == 1
    (event,) = [e for e in recorder.events if e[1] == "examples_dropped"]
    assert event[0] == "warning"
    assert event[3] == {"too_long": 1, "untrained": 0, "shortened": 2, "total": 4}
    kept = [e for e in expected if e is not None]
    assert result.metrics[0]["trained_tokens"] == sum(e.n_trained for e in kept) == 5 + 5 + 4
    assert result.metrics[0]["tokens"] == 10 + 12 + 8

    with pytest.raises(ValueError, match="no trainable examples"):
        train(tiny_llama(), None, examples[1:2], config, tmp_path / "none")
