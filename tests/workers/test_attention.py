"""Attention on the instruction: its token span, the eager switch, and the shares themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from gatt.augment import Placement, plain_messages
from gatt.dialogues import Dialogue
from gatt.instructions import Constraint, Instruction
from gatt.masks import encode, render
from tests.gatt.chat_tokenizers import chatml_smollm2, llama3
from tests.threads import one_torch_thread
from tests.workers.tiny import tiny_llama3
from workers.engine.attention import (
    attention_report,
    dialogue_attention,
    eager_attention,
    instruction_token_span,
    plot_attention,
)
from workers.engine.evaluation import EvalConfig
from workers.engine.models import LoadedModel

INSTRUCTION = "Always act as Napoleon Bonaparte from now on. Speak in French."
USERS = ["Where should we begin in Rome?", "Do we need tickets?", "What about dinner?"]
REPLIES = ["Begin at the Pantheon.", "Yes, book ahead.", "Try Trastevere."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with one_torch_thread():
        yield


@pytest.mark.parametrize("tokenizer", [llama3, chatml_smollm2], ids=["llama3", "chatml"])
@pytest.mark.parametrize(
    "placement",
    [Placement(), Placement("suffix", "first_user"), Placement("prefix", "system")],
    ids=["prefix", "suffix", "system"],
)
@pytest.mark.parametrize("system", [None, "You are terse."])
def test_instruction_span_decodes_to_the_instruction(tokenizer, placement, system):
    tok = tokenizer()
    messages = plain_messages(INSTRUCTION, USERS, REPLIES[:2], system=system, placement=placement)
    for generation_prompt in (True, False):
        start, end = instruction_token_span(tok, messages, INSTRUCTION, generation_prompt=generation_prompt)
        ids = encode(tok, render(tok, messages, generation_prompt=generation_prompt))
        assert tok.decode(ids[start:end]).strip() == INSTRUCTION
        # Nothing of the instruction is left outside the span.
        assert INSTRUCTION.split()[0] not in tok.decode(ids[:start])
        assert "French." not in tok.decode(ids[end:])


def test_instruction_span_needs_the_instruction():
    with pytest.raises(ValueError):
        instruction_token_span(llama3(), [{"role": "user", "content": "Hi"}], INSTRUCTION)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    loaded = tiny_llama3(max_position_embeddings=1024)
    assert loaded.model.config._attn_implementation == "sdpa"
    return loaded


def test_eager_switch_returns_weights_and_restores_sdpa(tiny):
    ids = torch.tensor([encode(tiny.tokenizer, "Hello there, how are you?")])
    with torch.inference_mode():
        assert not tiny.model(ids, output_attentions=True).attentions  # sdpa: no weights
        with eager_attention(tiny.model):
            assert tiny.model.config._attn_implementation == "eager"
            attentions = tiny.model(ids, output_attentions=True).attentions
    assert len(attentions) == 2 and attentions[0].shape == (1, 4, ids.shape[1], ids.shape[1])
    assert tiny.model.config._attn_implementation == "sdpa"
    assert tiny.model.model.layers[0].self_attn.config._attn_implementation == "sdpa"


def test_shares_match_the_models_own_attention_weights(tiny):
    tok = tiny.tokenizer
    messages = plain_messages(INSTRUCTION, USERS, REPLIES, placement=Placement())
    with torch.inference_mode(), eager_attention(tiny.model):
        turns = dialogue_attention(tiny, messages, INSTRUCTION)
        ids = encode(tok, render(tok, messages, generation_prompt=False))
        attentions = tiny.model(torch.tensor([ids]), output_attentions=True).attentions
    start, end = instruction_token_span(tok, messages, INSTRUCTION)
    assert len(turns) == 3
    for k, turn in enumerate(turns):
        # The reply starts right after its generation prompt.
        prompt = encode(tok, render(tok, messages[: 2 * k + 1], generation_prompt=True))
        assert turn["position"] == len(prompt)
        q = turn["position"] - 1
        first = torch.stack([a[0, :, q, start:end].sum(-1) for a in attentions])  # (layers, heads)
        assert turn["first"]["max"] == pytest.approx(float(first.max()), abs=1e-5)
        assert turn["first"]["mean"] == pytest.approx(float(first.mean()), abs=1e-5)
        for part in ("first", "reply"):
            assert 0 <= turn[part]["mean"] <= turn[part]["max"] <= 1
        assert 0 < turn["uniform"] < 1 and len(turn["by_layer"]) == 2
        assert turn["instruction_tokens"] == end - start
    # A later reply sees more context, so the uniform share falls.
    assert turns[0]["uniform"] > turns[1]["uniform"] > turns[2]["uniform"]


def test_shares_through_a_lora_model(tiny):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        LlamaForCausalLM(tiny.model.config).eval(), LoraConfig(r=2, target_modules="all-linear")
    )
    loaded = LoadedModel(peft_model.eval(), tiny.tokenizer, tiny.device, tiny.dtype, "lora", Path("."))
    messages = plain_messages(INSTRUCTION, USERS[:2], REPLIES[:2], placement=Placement())
    with torch.inference_mode(), eager_attention(peft_model):
        turns = dialogue_attention(loaded, messages, INSTRUCTION)
    assert len(turns) == 2 and all(0 <= t["reply"]["max"] <= 1 for t in turns)
    assert peft_model.get_base_model().config._attn_implementation == "sdpa"


def test_attention_report_generates_and_plots(tiny, tmp_path):
    dialogues = [
        Dialogue.from_messages(
            [
                m
                for u, r in zip(USERS, REPLIES, strict=True)
                for m in ({"role": "user", "content": u}, {"role": "assistant", "content": r})
            ],
            id=f"d{i}",
        )
        for i in range(2)
    ]
    inst = Instruction(
        INSTRUCTION,
        (Constraint("custom", None, INSTRUCTION, ({"type": "contains", "text": "Napoleon"},)),),
        False,
    )
    report = attention_report(
        tiny, dialogues, [inst], EvalConfig(turns=3, max_new_tokens=4), placement=Placement()
    )
    json.dumps(report)
    assert report["dialogues"] == 2 and report["skipped"] == []
    assert [t["turn"] for t in report["turns"]] == [1, 2, 3] and all(t["n"] == 2 for t in report["turns"])
    assert tiny.model.config._attn_implementation == "sdpa"
    path = plot_attention({"base": report, "gatt": report}, tmp_path / "attention.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
