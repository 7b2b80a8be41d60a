"""Model directories as an operator drops them under a model root: a tiny random Llama with a real
chat template (tests/gatt/chat_tokenizers.py), saved the way `save_pretrained` saves a Hub model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.gatt import chat_tokenizers

TEMPLATES = {
    "chatml": chat_tokenizers.chatml_smollm2,
    "llama2": chat_tokenizers.llama2,
    "llama3": chat_tokenizers.llama3,
}


def write_model(directory: Path, template: str = "chatml", context: int = 256) -> LlamaForCausalLM:
    tokenizer = TEMPLATES[template]()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return model
