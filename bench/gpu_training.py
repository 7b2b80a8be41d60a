"""GPU fine-tuning throughput and MFU on GAtt-shaped batches (issue: performance, item 3).

    python bench/gpu_training.py [--size 1b] [--steps 12] [--tokens-per-step 16384] [--compile]
        [--attn sdpa|flex_attention|eager] [--losses summed,liger] [--engine]

On an H200: 46% MFU packed with `--attn flex_attention --compile`, 12% padded (docs/benchmarks.md).

A Llama-architecture model of about 1.1B parameters (TinyLlama's shape: 22 layers, hidden 2048,
32 heads with 4 KV heads, vocab 32000; random init, as no hub is reachable) is fully fine-tuned in
bf16 (bf16 weights, fused AdamW, sdpa attention unless `--attn`) on GAtt-shaped examples: dialogues of 2-8 turns,
lengths spread over 256-2048 tokens, about a quarter of the positions trained (the sampled
replies), the rest masked. Two ways of batching the same examples, each with our loss
(`workers.engine.training.summed_loss`: logits only at trained positions, summed fp32 CE):

- `padded`: `workers.engine.training.collate`, rows padded to the longest of the micro-batch (what
  `train()` does today);
- `packed`: examples packed end to end into rows of `--row-len` tokens without padding, with
  `position_ids` restarting at each example (`summed_loss(..., position_ids=...)`), so that
  transformers builds a block-diagonal causal mask (padding-free packing).

Reported per mode: real (non-padding) tokens/s, trained tokens/s, peak memory, and MFU =
6 * N * real tokens/s / peak bf16 dense FLOP/s of the card (`--peak-tflops`, default 989 for
H100/H200 SXM), N = all parameters (embeddings included). The formula counts the output head at
every position; `summed_loss` computes it only at trained ones, so MFU by this formula credits that
saving as speed, as the issue's definition does. Steps 1..`--warmup` are not timed.

`--losses summed,liger` runs each mode once per loss: ours, and Liger's fused linear
cross-entropy (`liger-kernel`, the output head and the loss in chunks without the logits tensor)
on the same hidden states.

`--engine` runs the same examples through the job's training stage instead of this loop:
`workers.engine.training.train` (full fine-tuning, `micro_batch_size` examples of about
`--tokens-per-step` real tokens, constant learning rate), `--modes` naming its `packing` (or
`tokens`: packed with `micro_batch_tokens` = `--tokens-per-step`, so every micro-batch has the
same rows), and `--compile` its `compile` ("on", else "off"); what a GPU job gets by default is
`packed` with `--compile`. `--row-tokens` sets the least row length of `tokens` micro-batches
(`workers.engine.training.ROW_TOKENS`, 4,096): an experiment, no config field. Throughput comes from the metrics rows it writes; its final checkpoint is written
to a temporary folder and deleted.

`--size tiny` runs a 2-layer model on the CPU in seconds: a smoke test of the script, not a figure.
Needs torch and transformers only (the device image has both; the web stack is not imported).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gatt.masks import IGNORE_INDEX, TokenizedExample  # noqa: E402
from workers.engine.objectives import Batch, collate, summed_loss  # noqa: E402

_LIGER = None


def liger_loss(model, batch: Batch, position_ids: torch.Tensor | None) -> torch.Tensor:
    """`summed_loss`'s value through Liger's fused linear cross-entropy (sum over trained tokens)."""
    global _LIGER
    if _LIGER is None:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        _LIGER = LigerFusedLinearCrossEntropyFunction
    inputs = {"input_ids": batch.input_ids, "use_cache": False}
    if position_ids is None:
        inputs["attention_mask"] = batch.attention_mask
    else:
        inputs["position_ids"] = position_ids
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    hidden = model.model(**inputs).last_hidden_state[:, :-1][keep]
    return _LIGER.apply(
        hidden, model.lm_head.weight, targets[keep], None, None, IGNORE_INDEX, 0.0, 0.0, "sum"
    )[0]


SIZES = {
    # TinyLlama-1.1B's shape.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
}  # fmt: skip


def gatt_examples(n: int, vocab: int, min_len: int, max_len: int, seed: int) -> list[TokenizedExample]:
    """Dialogues of 2-8 turns: each turn a masked user part (instruction and question) and a
    trained reply of 15-35% of the turn, like the `all_turns` examples of a GAtt job."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        turns = rng.randint(2, 8)
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        labels = [IGNORE_INDEX] * length
        spans = []
        edges = [round(length * t / turns) for t in range(turns + 1)]
        for start, end in zip(edges, edges[1:], strict=False):
            reply = max(1, round((end - start) * rng.uniform(0.15, 0.35)))
            spans.append((end - reply, end))
            labels[end - reply : end] = ids[end - reply : end]
        out.append(TokenizedExample(tuple(ids), tuple(labels), tuple(spans)))
    return out


def padded_batches(examples, tokens_per_step: int, pad_id: int):
    """Micro-batches in corpus order, as many rows as fit `tokens_per_step` padded positions."""
    batch, width = [], 0
    for e in examples:
        new_width = max(width, len(e.input_ids))
        if batch and new_width * (len(batch) + 1) > tokens_per_step:
            padded = collate(batch, pad_id)
            yield padded, None, padded.n_tokens
            batch, new_width = [], len(e.input_ids)
        batch.append(e)
        width = new_width
    if batch:
        padded = collate(batch, pad_id)
        yield padded, None, padded.n_tokens


def packed_batches(examples, tokens_per_step: int, row_len: int):
    """Rows of `row_len` tokens filled end to end, first fit: each example goes into the first row
    with room for it (the order within a step does not matter to the loss)."""
    rows: list[list[TokenizedExample]] = []
    free: list[int] = []
    for e in examples:
        n = len(e.input_ids)
        r = next((i for i, room in enumerate(free) if room >= n), None)
        if r is None:
            rows.append([])
            free.append(row_len)
            r = len(rows) - 1
        rows[r].append(e)
        free[r] -= n
    per_step = max(1, tokens_per_step // row_len)
    for i in range(0, len(rows), per_step):
        group = rows[i : i + per_step]
        input_ids = torch.zeros((len(group), row_len), dtype=torch.long)
        labels = torch.full((len(group), row_len), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(group), row_len), dtype=torch.long)
        for r, row in enumerate(group):
            offset = 0
            for e in row:
                n = len(e.input_ids)
                input_ids[r, offset : offset + n] = torch.tensor(e.input_ids)
                # The first token of an example predicts nothing from the previous example.
                example_labels = [IGNORE_INDEX, *e.labels[1:]]
                labels[r, offset : offset + n] = torch.tensor(example_labels)
                positions[r, offset : offset + n] = torch.arange(n)
                offset += n
            # The row's unused tail: one more "example" of pad tokens that trains nothing.
            positions[r, offset:] = torch.arange(row_len - offset)
        real = sum(len(e.input_ids) for row in group for e in row)
        yield Batch(input_ids, torch.ones_like(input_ids), labels), positions, real


def build_model(args: argparse.Namespace):
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[args.size], max_position_embeddings=4096, attn_implementation=args.attn)
    with device:  # initialised where it runs: a 1B model's init on the host takes seconds
        model = LlamaForCausalLM(config)
    return model.to(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).train()


def run_engine(args: argparse.Namespace, mode: str) -> dict:
    """The examples through `train()`, the job's training stage, with `packing=mode`."""
    import shutil
    import tempfile

    from workers.engine import training
    from workers.engine.config import TrainConfig
    from workers.engine.training import train

    if args.row_tokens:  # an experiment: another least row length for micro_batch_tokens
        training.ROW_TOKENS = args.row_tokens
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    examples = gatt_examples(args.examples, model.config.vocab_size, args.min_len, args.max_len, seed=0)
    mean_len = sum(len(e.input_ids) for e in examples) / len(examples)
    config = TrainConfig(
        method="full",
        packing="packed" if mode == "tokens" else mode,
        micro_batch_tokens=args.tokens_per_step if mode == "tokens" else None,
        compile="on" if args.compile else "off",
        micro_batch_size=max(1, round(args.tokens_per_step / mean_len)),
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        schedule="constant",
        max_seq_len=args.max_len,
    )
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    scratch = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        started = time.perf_counter()
        result = train(model, None, examples, config, scratch / "run")
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    timed = result.metrics[args.warmup :]
    seconds = sum(row["tokens"] / row["tokens_per_s"] for row in timed)
    tokens_per_s = sum(row["tokens"] for row in timed) / seconds
    return {
        "mode": f"train(packing={config.packing}, micro_batch_tokens={config.micro_batch_tokens}, "
        f"compile={config.compile})",
        "params": n_params,
        "micro_batch_size": None if mode == "tokens" else config.micro_batch_size,
        "real_tokens_per_s": round(tokens_per_s),
        "trained_tokens_per_s": round(sum(row["trained_tokens"] for row in timed) / seconds),
        "mfu": round(6 * n_params * tokens_per_s / (args.peak_tflops * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if args.device.startswith("cuda")
        else None,
        "step_s": round(seconds / len(timed), 4),
        # Of a tokens run's fixed rows (the longest example rounded up to 128, as train() does).
        "real_share_of_positions": round(
            sum(row["tokens"] for row in timed) / len(timed) / _token_positions(examples, config), 3
        )
        if mode == "tokens"
        else None,
        "first_steps_s": [
            round(row["tokens"] / row["tokens_per_s"], 2) for row in result.metrics[: args.warmup]
        ],
        "wall_s_with_checkpoint": round(wall, 1),
        "loss_first_last": [round(result.metrics[0]["loss"], 4), round(result.metrics[-1]["loss"], 4)],
    }


def _token_positions(examples: list[TokenizedExample], config) -> int:
    from workers.engine import training

    rows, row_len = training._token_rows(examples, config)
    return rows * row_len


def run(args: argparse.Namespace, mode: str, loss: str = "summed") -> dict:
    device = torch.device(args.device)
    model = build_model(args)
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    if args.compile:
        # Each decoder layer on its own: the layers share one compiled graph, and the mask built
        # from position_ids (data-dependent) stays outside it. Compiling the whole decoder
        # (`model.model = torch.compile(model.model)`) measured no faster on an H200.
        for layer in model.model.layers:
            layer.compile()
    examples = gatt_examples(args.examples, config.vocab_size, args.min_len, args.max_len, seed=0)
    if mode == "padded":
        batches = list(padded_batches(examples, args.tokens_per_step, pad_id=0))
    else:
        batches = list(packed_batches(examples, args.tokens_per_step, args.row_len))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    real = trained = positions_total = 0
    losses = []
    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            real = trained = positions_total = 0
        batch, positions, n_real = batches[step % len(batches)]
        batch = batch.to(device)
        positions = None if positions is None else positions.to(device)
        if loss == "liger":
            ce = liger_loss(model, batch, positions)
        elif positions is None:
            ce = summed_loss(model, batch)
        else:
            ce = summed_loss(model, batch, position_ids=positions)
        real += n_real
        n = batch.n_trained
        trained += n
        positions_total += batch.input_ids.numel()
        (ce / max(n, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(ce.detach()) / max(n, 1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = real / seconds
    peak_flops = args.peak_tflops * 1e12
    return {
        "mode": mode,
        "loss": loss,
        "params": n_params,
        "batches": len(batches),
        "real_tokens_per_s": round(tokens_per_s),
        "trained_tokens_per_s": round(trained / seconds),
        "real_share_of_positions": round(real / positions_total, 3),
        "mfu": round(6 * n_params * tokens_per_s / peak_flops, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda"
        else None,
        "step_s": round(seconds / args.steps, 4),
        "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--row-len", type=int, default=4096)
    p.add_argument("--modes", default="padded,packed")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--attn", choices=("sdpa", "flex_attention", "eager"), default="sdpa")
    p.add_argument("--losses", default="summed", help="summed (ours) and/or liger, comma-separated")
    p.add_argument("--engine", action="store_true", help="through train(); --modes names its packing")
    p.add_argument("--row-tokens", type=int, default=0, help="with --engine: training.ROW_TOKENS")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    args = p.parse_args()
    if args.size == "tiny":
        args.min_len, args.max_len, args.row_len, args.tokens_per_step = 16, 96, 128, 256
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, size {args.size}, compile {args.compile}, attn {args.attn}"
    )
    for mode in args.modes.split(","):
        if args.engine:
            print(json.dumps(run_engine(args, mode)), flush=True)
            continue
        for loss in args.losses.split(","):
            print(json.dumps(run(args, mode, loss)), flush=True)


if __name__ == "__main__":
    main()
