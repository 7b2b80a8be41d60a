"""A tiny random-init Llama with the Llama-3 test tokenizer, as a `LoadedModel`: its replies are
noise, but prompts, scoring and attention bookkeeping can be checked on it in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.gatt.chat_tokenizers import llama3
from workers.engine.models import LoadedModel


def tiny_llama3(max_position_embeddings: int) -> LoadedModel:
    tokenizer = llama3()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    return LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32, "tiny", Path("."))
