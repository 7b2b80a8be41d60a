"""Prefix reuse: a later turn prefills only what the store does not hold, and samples what a full
prefill samples. Greedy candidates are the sharp check (a wrong position id, a misaligned cached
row or an unmasked gap changes them); the next-token logits are compared too."""

from __future__ import annotations

import pytest
import torch

from tests.workers.test_sampling import (
    BOS,
    EOS,
    PAD,
    VOCAB,
    TinyTokenizer,
    tiny_model,
    tiny_sliding_window_model,
)
from tests.workers.test_sampling import smollm2 as smollm2  # the real model, a fixture
from workers.engine.prefix_cache import BLOCK, PrefixStore
from workers.engine.sampling import SamplingConfig, _prefill, sample_candidates

GREEDY = SamplingConfig(k=2, temperature=0, max_new_tokens=10, batch_prompts=3)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def random_tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def first_turns() -> list[list[int]]:
    # Lengths off the block size, so matches end inside a block; four prompts with batch_prompts=3
    # make batches with and without a stored prefix.
    return [[BOS, *random_tokens(n, seed)] for seed, n in enumerate((20, 41, 33, 57))]


def next_turns(turns: list[list[int]], sampled) -> list[list[int]]:
    """Each dialogue's next prompt: the prompt, its first candidate, an end token and a new message."""
    return [
        [*p, *c[0].token_ids, EOS, *random_tokens(7 + i, 100 + i)]
        for i, (p, c) in enumerate(zip(turns, sampled, strict=True))
    ]


def sample(model, prompts, store=None, config=GREEDY):
    return sample_candidates(model, TinyTokenizer(), prompts, config, stop_ids=[EOS], prefixes=store)


def test_later_turns_reuse_the_earlier_prompts_and_sample_the_same(tiny):
    model, _ = tiny
    store = PrefixStore()
    turns = first_turns()
    for _ in range(3):
        previous = turns
        assert sample(model, previous, store) == sample(model, previous)
        turns = next_turns(previous, sample(model, previous))
    reused_before = store.reused
    assert sample(model, turns, store) == sample(model, turns)
    # Each prompt began with the dialogue's previous one, all of it taken from the store; and the
    # entries it extended were dropped, so each dialogue holds one.
    assert store.reused - reused_before == sum(len(p) for p in previous)
    assert sorted(store._entries) == sorted(tuple(p) for p in turns)


def test_reused_prefix_gives_the_logits_of_a_full_prefill(tiny):
    model, _ = tiny
    store = PrefixStore()
    turns = first_turns()
    sample(model, turns, store)
    turns = next_turns(turns, sample(model, turns))
    with torch.inference_mode():
        full = _prefill(model, turns, GREEDY, PAD, torch.device("cpu"))
        reused = _prefill(model, turns, GREEDY, PAD, torch.device("cpu"), store)
    assert store.reused > 0
    torch.testing.assert_close(reused.logits, full.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(reused.positions, full.positions)


def test_a_changed_earlier_token_ends_the_match_there(tiny):
    model, _ = tiny
    store = PrefixStore()
    turns = first_turns()
    sample(model, turns, store)
    changed = [list(p) for p in turns]
    changed[3][BLOCK + 5] = 3 if changed[3][BLOCK + 5] != 3 else 4
    reused_before = store.reused
    assert sample(model, changed, store) == sample(model, changed)
    # Rows 0-2 are their stored prompts again (all but the last token); row 3 matches up to the change.
    expected = sum(len(p) - 1 for p in turns[:3]) + BLOCK + 5
    assert store.reused - reused_before == expected


def test_a_new_dialogue_beside_stored_ones(tiny):
    model, _ = tiny
    store = PrefixStore()
    turns = first_turns()
    sample(model, turns[:2], store)
    mixed = next_turns(turns[:2], sample(model, turns[:2])) + [[BOS, *random_tokens(30, 7)]]
    assert sample(model, mixed, store) == sample(model, mixed)


def test_the_budget_keeps_the_most_recent_entries(tiny):
    model, _ = tiny
    turns = first_turns()
    probe = PrefixStore()
    sample(model, turns[:1], probe)
    one = probe._bytes
    store = PrefixStore(budget_bytes=3 * one)  # the later prompts are longer: two of them fit
    sample(model, turns, store)
    assert 0 < store._bytes <= store.budget_bytes
    assert turns[0] not in [list(t) for t in store._entries]
    assert tuple(turns[-1]) in store._entries


def test_prompts_shorter_than_a_block_are_not_kept(tiny):
    model, _ = tiny
    store = PrefixStore()
    sample(model, [[BOS, *random_tokens(BLOCK - 3, 1)]], store)
    assert len(store) == 0


def test_sliding_window_models_keep_no_prefixes(tiny):
    model, _ = tiny
    assert PrefixStore.supports(model)
    assert not PrefixStore.supports(tiny_sliding_window_model())


@pytest.mark.slow
def test_real_model_chat_turns_reuse_the_rendered_history(smollm2):
    """On SmolLM2's chat template a turn's prompt renders the previous prompt unchanged, so all of
    it comes from the store, and greedy replies are those of a full prefill."""
    model, tokenizer = smollm2
    stop = {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    config = SamplingConfig(k=1, temperature=0, max_new_tokens=24)
    dialogues = [
        [{"role": "user", "content": "Always answer in French. What is the capital of Italy?"}],
        [{"role": "system", "content": "You enjoy tennis."}, {"role": "user", "content": "Suggest a hobby."}],
    ]
    store = PrefixStore()
    follow_ups = ["And of Spain?", "Why that one?"]
    previous: list[list[int]] = []
    for _ in range(2):
        prompts = [
            tokenizer.apply_chat_template(d, add_generation_prompt=True, return_dict=False) for d in dialogues
        ]
        before = store.reused
        reused = sample_candidates(model, tokenizer, prompts, config, stop_ids=stop, prefixes=store)
        assert reused == sample_candidates(model, tokenizer, prompts, config, stop_ids=stop)
        if previous:
            assert store.reused - before == sum(len(p) for p in previous)
        previous = prompts
        for d, c, follow_up in zip(dialogues, reused, follow_ups, strict=True):
            d += [{"role": "assistant", "content": c[0].text}, {"role": "user", "content": follow_up}]


def test_a_cleared_store_prefills_everything_again(tiny):
    model, _ = tiny
    store = PrefixStore()
    turns = first_turns()
    sample(model, turns, store)
    store.clear()
    reused, prefilled = store.reused, store.prefilled
    sample(model, turns, store)
    assert store.reused == reused and store.prefilled == prefilled + sum(len(p) for p in turns)
