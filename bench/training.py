"""Masked fine-tuning throughput: our loop (`workers.engine.training.train`) vs TRL's `SFTTrainer`,
and the cost of `all_turns` examples against per-cut (`last_turn`) ones.

    .venv/bin/python bench/training.py [--steps 12] [--quick] [--part all|trl|scope]

Part 1, ours vs TRL (`--part trl`). Both sides get the same model (SmolLM2-135M-Instruct, the
embedded default, via `workers.engine.models.load_model("default")`), the same LoRA adapter
(`_prepare_model` with the same seed, so identical initial weights), the same examples (GAtt
dialogues from examples/dialogues.jsonl, `all_turns` masks), the same micro-batches in the same
order (ours draws them with `micro_batch_indices`; TRL gets exactly that sequence with
`train_sampling_strategy="sequential"`), batch size, steps, optimiser (fused AdamW, lr 2e-4 cosine,
no warmup, no weight decay, clip 1.0) and precision (fp32 on CPU; no gradient checkpointing on
either side). TRL gets pre-tokenized `input_ids` + `labels` (-100 outside the trained spans,
`skip_prepare_dataset=True`, so it neither re-tokenizes nor truncates). Its loss is the token mean
over the step's trained tokens, ours the token sum divided by that count: the same number, which
the script prints for every step. Each side runs in its own process (so peak RSS is its own), in
the order ours, TRL, TRL, ours; throughput = trained tokens of steps 2..N over their wall time
(step 1 is warm-up), measured by timestamps at the end of each optimiser step; the whole call
(`train()`, with its metrics files and final checkpoint; `SFTTrainer(...)` + `.train()`) is
reported as well.

Part 2, scopes (`--part scope`). For 2- to 8-turn dialogues (user turns and corpus replies from
examples/dialogues.jsonl, consecutive dialogues chained for more than 4 turns, the instruction of
`gatt.instructions.synthesize` in the first user turn, every reply trained), the examples of
`build_examples(..., "all_turns")` and `build_examples(..., "last_turn")` each go through one epoch
of what a training step does per micro-batch (collate, `summed_loss`, backward) on the same LoRA
model, without an optimiser step so that both scopes see the same weights: the summed losses must
then agree, and the script prints them with the tokens processed and the wall time. Per turn count
the epochs run all_turns, last_turn, last_turn, all_turns; each scope reports its faster epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS = ROOT / "examples" / "dialogues.jsonl"
MICRO_BATCH = 4  # TrainConfig's default micro_batch_size
TRL_TURNS = 3  # DataConfig's default max_turns


# --------------------------------------------------------------------------------------------
# Data: GAtt-shaped training dialogues.
# --------------------------------------------------------------------------------------------


def corpus_turns() -> list[list[tuple[str, str]]]:
    out = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        out.append(list(zip(users, replies, strict=True)))
    return out


def gatt_examples(tokenizer: Any, n_turns: int, n_dialogues: int, scope: str) -> list[Any]:
    """Examples of `n_dialogues` training dialogues of `n_turns` turns, every reply trained."""
    from gatt.augment import training_dialogue
    from gatt.instructions import default_instruction_set, synthesize
    from gatt.masks import build_examples

    dialogues = corpus_turns()
    instructions = synthesize(default_instruction_set(), n_dialogues, seed=0)
    examples = []
    for i in range(n_dialogues):
        turns: list[tuple[str, str]] = []
        j = i
        while len(turns) < n_turns:  # chain the following dialogues for long ones
            turns += dialogues[j % len(dialogues)]
            j += 1
        turns = turns[:n_turns]
        dialogue = training_dialogue(
            instructions[i].text, [u for u, _ in turns], [r for _, r in turns], [True] * n_turns
        )
        masked = build_examples(tokenizer, dialogue, scope)  # type: ignore[arg-type]
        if masked.scope != scope:
            raise RuntimeError(f"dialogue {i} fell back to {masked.scope}: {masked.fallback_reason}")
        examples += masked.examples
    return examples


# --------------------------------------------------------------------------------------------
# Measuring: peak RSS while training, machine and versions.
# --------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process's RSS every 5 ms between start() and stop()."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def start(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    parts = [
        f"nproc={os.cpu_count()}",
        f"cpu={cpu}",
        f"torch threads={torch.get_num_threads()}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
    ]
    for name in ("peft", "trl", "datasets", "accelerate"):
        with contextlib.suppress(ImportError):
            parts.append(f"{name} {__import__(name).__version__}")
    if torch.cuda.is_available():
        parts.append(f"gpu={torch.cuda.get_device_name()}")
    return ", ".join(parts)


def _setup_torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(os.cpu_count() or 1)
    return torch


def _device_peak(torch: Any) -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


# --------------------------------------------------------------------------------------------
# Part 1: one side per process.
# --------------------------------------------------------------------------------------------


def train_config(steps: int) -> Any:
    from workers.engine.config import TrainConfig

    return TrainConfig(max_steps=steps, micro_batch_size=MICRO_BATCH, seed=0)


def step_batches(examples: list[Any], config: Any) -> list[list[Any]]:
    """The examples of every optimiser step, in the order `train` visits them."""
    from workers.engine.schedule import micro_batch_indices
    from workers.engine.training import _prepare

    data, *_ = _prepare(examples, config.max_seq_len)
    assert len(data) == len(examples), "the benchmark's examples all fit max_seq_len"
    out = []
    for step in range(config.max_steps):
        mbs = range(step * config.grad_accum, (step + 1) * config.grad_accum)
        out.append([data[i] for mb in mbs for i in micro_batch_indices(len(data), config, mb)])
    return out


def run_side(side: str, steps: int, n_dialogues: int) -> dict[str, Any]:
    torch = _setup_torch()
    from workers.engine.models import load_model
    from workers.engine.objectives import collate

    loaded = load_model("default")
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = gatt_examples(tokenizer, TRL_TURNS, n_dialogues, "all_turns")
    config = train_config(steps)
    batches = step_batches(examples, config)
    if any(len(b) != MICRO_BATCH * config.grad_accum for b in batches):
        raise SystemExit("every step must have full micro-batches (TRL's sequential loader would shift)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trained = [collate(b, pad_id).n_trained for b in batches]
    tokens = [collate(b, pad_id).n_tokens for b in batches]
    padded = [collate(b, pad_id).input_ids.numel() for b in batches]

    ends: list[float] = []
    losses: list[float] = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    load_start = load_average()
    rss_before = rss_bytes()
    sampler = PeakRSS().start()
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as out_dir:
        start = time.perf_counter()
        if side == "ours":
            from workers.engine.hooks import Hooks
            from workers.engine.training import train

            def on_metrics(step: int, values: dict[str, float]) -> None:
                ends.append(time.perf_counter())
                losses.append(values["loss"])

            train(model, tokenizer, examples, config, Path(out_dir), hooks=Hooks(metrics=on_metrics))
        else:
            run_trl(model, tokenizer, batches, config, out_dir, ends, losses)
        total = time.perf_counter() - start
    peak = sampler.stop()
    if len(ends) != steps:
        raise RuntimeError(f"{side}: {len(ends)} step timestamps for {steps} steps")
    timed = sum(trained[1:])
    return {
        "side": side,
        "steps": steps,
        "losses": losses,
        "trained_tokens": trained,
        "tokens": tokens,
        "padded": padded,
        "timed_s": ends[-1] - ends[0],
        "timed_trained_tokens": timed,
        "timed_tokens": sum(tokens[1:]),
        "step_s": [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)],
        "total_s": total,
        "rss_before": rss_before,
        "rss_peak": peak,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_peak": _device_peak(torch),
        "load": f"{load_start} -> {load_average()}",
    }


def run_trl(
    model: Any,
    tokenizer: Any,
    batches: list[list[Any]],
    config: Any,
    out_dir: str,
    ends: list[float],
    losses: list[float],
) -> None:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from workers.engine.objectives import trained_labels
    from workers.engine.training import _prepare_model

    # The same adapter, initialised from the same seeds as train() does it.
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    peft_model = _prepare_model(model, config, "default")

    rows = [{"input_ids": list(e.input_ids), "labels": trained_labels(e)} for b in batches for e in b]
    dataset = Dataset.from_list(rows)

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            ends.append(time.perf_counter())

    class Recording(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    args = SFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.grad_accum,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.schedule,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        adam_beta1=config.betas[0],
        adam_beta2=config.betas[1],
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch_fused",
        bf16=torch.cuda.is_available() and next(model.parameters()).dtype == torch.bfloat16,
        fp16=False,
        gradient_checkpointing=False,
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Recording(
        model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepEnd()]
    )
    trainer.train()


# --------------------------------------------------------------------------------------------
# Part 2: all_turns vs last_turn.
# --------------------------------------------------------------------------------------------


def epoch_cost(model: Any, examples: list[Any], pad_id: int, device: Any) -> dict[str, float]:
    """One epoch of forward + backward in train()'s micro-batches; no optimiser step."""
    from workers.engine.objectives import collate, summed_loss
    from workers.engine.schedule import epoch_permutation

    torch = sys.modules["torch"]
    order = epoch_permutation(len(examples), 0, 0)
    loss_sum = 0.0
    tokens = padded = trained = 0
    start = time.perf_counter()
    for i in range(0, len(order), MICRO_BATCH):
        batch = collate([examples[j] for j in order[i : i + MICRO_BATCH]], pad_id)
        tokens += batch.n_tokens
        padded += batch.input_ids.numel()
        trained += batch.n_trained
        ce = summed_loss(model, batch.to(device))
        ce.backward()
        loss_sum += float(ce.detach())
    for p in model.parameters():
        p.grad = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return {
        "seconds": time.perf_counter() - start,
        "tokens": tokens,
        "padded": padded,
        "trained": trained,
        "loss_sum": loss_sum,
        "sequences": len(examples),
    }


def run_scope(turns: list[int], n_dialogues: int) -> dict[str, Any]:
    torch = _setup_torch()
    from workers.engine.models import load_model
    from workers.engine.training import _prepare_model

    loaded = load_model("default")
    torch.manual_seed(0)
    model = _prepare_model(loaded.model, train_config(1), "default")
    model.train()
    tokenizer = loaded.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    # warm-up: one epoch of the smallest case, not reported
    epoch_cost(model, gatt_examples(tokenizer, turns[0], 2, "all_turns"), pad_id, loaded.device)
    for n in turns:
        per = {s: gatt_examples(tokenizer, n, n_dialogues, s) for s in ("all_turns", "last_turn")}
        row: dict[str, Any] = {"turns": n, "dialogues": n_dialogues, "load": load_average()}
        runs: dict[str, list[dict[str, float]]] = {"all_turns": [], "last_turn": []}
        for scope in ("all_turns", "last_turn", "last_turn", "all_turns"):
            runs[scope].append(epoch_cost(model, per[scope], pad_id, loaded.device))
        for scope, results in runs.items():  # the faster epoch of the two; losses and tokens are equal
            row[scope] = min(results, key=lambda r: r["seconds"])
            row[scope]["all_seconds"] = [r["seconds"] for r in results]
        row["load"] += f" -> {load_average()}"
        rows.append(row)
        a, b = row["all_turns"], row["last_turn"]
        print(
            f"  {n} turns: tokens {a['tokens']} vs {b['tokens']} ({b['tokens'] / a['tokens']:.2f}x), "
            f"time {a['seconds']:.1f} s vs {b['seconds']:.1f} s ({b['seconds'] / a['seconds']:.2f}x), "
            f"summed loss {a['loss_sum']:.3f} vs {b['loss_sum']:.3f}, load {row['load']}",
            file=sys.stderr,
            flush=True,
        )
    return {"rows": rows}


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def child(args: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *args]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def report_trl(runs: list[dict[str, Any]]) -> None:
    ours = [r for r in runs if r["side"] == "ours"]
    trl = [r for r in runs if r["side"] == "trl"]
    print("\nPer-step loss (first run of each side; the same tokens, so the same numbers up to fp32 noise):")
    print("step | trained tokens | ours loss | TRL loss | |diff|")
    for i, (a, b) in enumerate(zip(ours[0]["losses"], trl[0]["losses"], strict=True)):
        print(f"{i + 1:4d} | {ours[0]['trained_tokens'][i]:14d} | {a:.6f} | {b:.6f} | {abs(a - b):.2e}")

    print(
        "\nrun | side | load (start -> end) | steps 2..N s | trained tok/s | tok/s (all tokens) | whole call s | RSS before MiB | peak RSS MiB | peak - before MiB | CUDA peak MiB"
    )
    for i, r in enumerate(runs):
        print(
            f"{i + 1} | {r['side']} | {r['load']} | {r['timed_s']:.2f} | "
            f"{r['timed_trained_tokens'] / r['timed_s']:.1f} | {r['timed_tokens'] / r['timed_s']:.1f} | "
            f"{r['total_s']:.2f} | {mib(r['rss_before'])} | {mib(r['rss_peak'])} | "
            f"{mib(r['rss_peak'] - r['rss_before'])} | {mib(r['device_peak'])}"
        )
    r0 = runs[0]
    print(
        f"\nper run: {r0['steps']} steps, {sum(r0['trained_tokens'])} trained tokens, {sum(r0['tokens'])} "
        f"tokens, {sum(r0['padded'])} padded positions ({1 - sum(r0['tokens']) / sum(r0['padded']):.0%} padding)"
    )
    best = {s: min(rs, key=lambda r: r["timed_s"]) for s, rs in (("ours", ours), ("trl", trl))}
    o, t = best["ours"], best["trl"]
    print(
        f"\nfastest run each: ours {o['timed_trained_tokens'] / o['timed_s']:.1f} trained tok/s, TRL "
        f"{t['timed_trained_tokens'] / t['timed_s']:.1f}: ours / TRL = {t['timed_s'] / o['timed_s']:.2f}x "
        f"(target >= 1.5x); whole call {t['total_s'] / o['total_s']:.2f}x; peak RSS increase "
        f"ours {mib(o['rss_peak'] - o['rss_before'])} MiB, TRL {mib(t['rss_peak'] - t['rss_before'])} MiB"
    )


def report_scope(result: dict[str, Any]) -> None:
    print(
        "\nturns | dialogues | all_turns seqs / tokens / padded | last_turn seqs / tokens / padded | "
        "token ratio | padded ratio | n/2 | (n+1)/2 | all_turns s | last_turn s | time ratio | "
        "summed loss all_turns | summed loss last_turn | rel diff | load (start -> end)"
    )
    for r in result["rows"]:
        a, b, n = r["all_turns"], r["last_turn"], r["turns"]
        print(
            f"{n} | {r['dialogues']} | {a['sequences']} / {a['tokens']} / {a['padded']} | "
            f"{b['sequences']} / {b['tokens']} / {b['padded']} | {b['tokens'] / a['tokens']:.2f} | "
            f"{b['padded'] / a['padded']:.2f} | {n / 2:.1f} | {(n + 1) / 2:.1f} | "
            f"{a['seconds']:.2f} | {b['seconds']:.2f} | {b['seconds'] / a['seconds']:.2f} | "
            f"{a['loss_sum']:.4f} | {b['loss_sum']:.4f} | "
            f"{abs(a['loss_sum'] - b['loss_sum']) / abs(b['loss_sum']):.1e} | {r['load']}"
        )
    a_s = sum(r["all_turns"]["seconds"] for r in result["rows"])
    b_s = sum(r["last_turn"]["seconds"] for r in result["rows"])
    print(f"all rows: all_turns {a_s:.1f} s, last_turn {b_s:.1f} s ({b_s / a_s:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "trl", "scope"), default="all")
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per side (part 1)")
    parser.add_argument("--dialogues", type=int, default=48, help="dialogues for part 1 (a multiple of 4)")
    parser.add_argument("--scope-dialogues", type=int, default=4, help="dialogues per turn count (part 2)")
    parser.add_argument("--turns", default="2,3,4,5,6,7,8", help="turn counts for part 2")
    parser.add_argument(
        "--quick", action="store_true", help="4 steps, 16 dialogues; turns 2,4,8 with 2 dialogues"
    )
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--scope-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.dialogues, args.scope_dialogues, args.turns = 4, 16, 2, "2,4,8"
    turns = [int(t) for t in args.turns.split(",")]

    if args.side:
        print(json.dumps(run_side(args.side, args.steps, args.dialogues)))
        return
    if args.scope_child:
        print(json.dumps(run_scope(turns, args.scope_dialogues)))
        return

    print(f"machine: {machine()}")
    print(f"load average at start: {load_average()}")
    if args.part in ("all", "trl"):
        if args.steps * MICRO_BATCH > args.dialogues:
            print(
                f"note: {args.steps} steps x {MICRO_BATCH} > {args.dialogues} examples: more than one epoch"
            )
        common = ["--steps", str(args.steps), "--dialogues", str(args.dialogues)]
        runs = []
        for side in ("ours", "trl", "trl", "ours"):
            print(f"running {side} (load {load_average()}) ...", flush=True)
            runs.append(child(["--side", side, *common]))
        report_trl(runs)
    if args.part in ("all", "scope"):
        print(f"\nscopes (load {load_average()}) ...", flush=True)
        result = child(
            [
                "--scope-child",
                "--turns",
                ",".join(map(str, turns)),
                "--scope-dialogues",
                str(args.scope_dialogues),
            ]
        )
        report_scope(result)
    print(f"\nload average at end: {load_average()}")


if __name__ == "__main__":
    main()
