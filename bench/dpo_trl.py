"""GAtt's DPO objective (`workers/engine/dpo.py`) against TRL's `DPOTrainer` on the same pairs.

    .venv/bin/python bench/dpo_trl.py JOB_DIR [--pairs 32] [--steps 8] [--micro-batch 4]

JOB_DIR is a finished job's output directory (its `config.json`, `samples.jsonl`, corpus, and a
LoRA checkpoint in `train/checkpoints/`). The pairs are the ones that job's config makes of its
samples (`workers.engine.pairs.preference_pairs`): the same token ids go to both sides (TRL's own
tokenization is replaced by ours, and the script reports whether TRL's would have given the same
ids). Needs `trl` (the `bench` extra).

1. Loss at step 0. The policy is the job's final LoRA checkpoint, the reference the base
   model (the same model with its adapter disabled), so the margins
   are not all 0 and the loss is not just log 2. Ours: `DPO.loss` over the pairs divided by their
   number, the reference log-probabilities from `reference_logps` under `disable_adapter()`. TRL:
   `DPOTrainer.compute_loss` on the same pairs, the base model given as `ref_model` (for a peft
   model with an adapter TRL would copy that adapter as the reference), in batches of
   `--micro-batch` whose means are weighed by their sizes. Sigmoid loss, beta from the job's
   config, fp32.
2. Throughput. From the base model with a new adapter (same LoRA config and seed on both sides),
   `--steps` optimiser steps of `--micro-batch` pairs each, the same optimiser and schedule: ours
   (`workers.engine.training.train`, which computes the reference log-probabilities once before
   step 1) and TRL's (a reference forward pass per step, its default). Pairs per second over
   steps 2..N (step 1 warms up), and the whole call's wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job_dir", type=Path)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()

    import torch

    from workers.engine.config import parse_config

    config = parse_config(json.loads((args.job_dir / "config.json").read_text()))
    beta = config.training.dpo.beta
    checkpoint = json.loads((args.job_dir / "summary.json").read_text())["final_checkpoint"]
    print(f"torch threads {torch.get_num_threads()}, beta {beta}, checkpoint {checkpoint}")

    tokenizer, pairs = load_pairs(config, args.job_dir, args.pairs)
    print(
        f"pairs: {len(pairs)} (tokens per pair {statistics.mean(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs):.0f})"
    )
    check_tokenization(tokenizer, args.job_dir, pairs)

    ours, theirs = loss_at_step_0(checkpoint, pairs, config, args.micro_batch)
    print(f"loss at step 0: ours {ours:.8f}, TRL {theirs:.8f}, difference {abs(ours - theirs):.2e}")

    timed = {side: run(side, pairs, config, args.steps, args.micro_batch) for side in ("ours", "trl")}
    for side, (rate, wall) in timed.items():
        print(f"{side}: {rate:.2f} pairs/s over steps 2-{args.steps}, whole call {wall:.1f} s")
    print(f"throughput ours / TRL: {timed['ours'][0] / timed['trl'][0]:.2f}")


def load_pairs(config: Any, job_dir: Path, n: int) -> tuple[Any, list[Any]]:
    from workers.engine.hooks import Hooks
    from workers.engine.models import load_model
    from workers.engine.pairs import preference_pairs
    from workers.engine.pipeline import load_dialogues, split_heldout

    tokenizer = load_model("default").tokenizer
    records = [json.loads(line) for line in (job_dir / "samples.jsonl").read_text().splitlines() if line]
    dialogues, _ = split_heldout(config, load_dialogues(config))
    made, _ = preference_pairs(config, tokenizer, records, dialogues, Hooks())
    if len(made) < n:
        raise SystemExit(f"{job_dir} makes {len(made)} pairs, fewer than --pairs {n}")
    return tokenizer, made[:n]


def check_tokenization(tokenizer: Any, job_dir: Path, pairs: list[Any]) -> None:
    """Whether TRL's own tokenization of the pairs' texts (conversational: the prompt with the
    generation prompt, the prompt with the reply) gives our token ids; reported, not required."""
    rows = [json.loads(line) for line in (job_dir / "training_set.jsonl").read_text().splitlines()]
    same = 0
    differences: set[str] = set()
    for row, pair in zip(rows, pairs, strict=False):
        prompt, chosen = row["messages"][:-1], row["messages"][-1]
        rejected = {"role": "assistant", "content": row["rejected"]["text"]}
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)
        agree = True
        for reply, ours in ((chosen, pair.chosen), (rejected, pair.rejected)):
            theirs = tokenizer.apply_chat_template([*prompt, reply], return_dict=False)
            if theirs[: len(prompt_ids)] != prompt_ids or theirs[: len(ours.input_ids)] != list(
                ours.input_ids
            ):
                agree = False
            elif len(theirs) > len(ours.input_ids):
                differences.add(repr(tokenizer.decode(theirs[len(ours.input_ids) :])))
        same += agree
    tail = f"; TRL's sequences also train on what the template adds after the turn: {', '.join(sorted(differences))}"
    print(
        f"TRL's tokenization agrees with ours up to our end of turn in {same}/{len(pairs)} pairs"
        + (tail if differences else "")
    )


def _trl_dataset(pairs: list[Any]) -> Any:
    from datasets import Dataset

    rows = []
    for p in pairs:
        ((start, end),) = p.chosen.spans
        ((r_start, r_end),) = p.rejected.spans
        assert p.chosen.input_ids[:start] == p.rejected.input_ids[:r_start]
        rows.append(
            {
                "prompt_ids": list(p.chosen.input_ids[:start]),
                "chosen_ids": list(p.chosen.input_ids[start:end]),
                "rejected_ids": list(p.rejected.input_ids[r_start:r_end]),
            }
        )
    return Dataset.from_list(rows)


def _trainer(
    model: Any, tokenizer: Any, pairs: list[Any], args: Any, callbacks: list[Any] = (), ref_model: Any = None
) -> Any:
    from trl import DPOTrainer

    class OurTokens(DPOTrainer):
        """TRL's trainer on our token ids: `_prepare_dataset` would tokenize text."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: ANN001
            return dataset

    return OurTokens(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=_trl_dataset(pairs),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def _dpo_args(out_dir: str, beta: float, micro_batch: int, steps: int, config: Any) -> Any:
    from trl import DPOConfig

    training = config.training
    return DPOConfig(
        output_dir=out_dir,
        beta=beta,
        loss_type=["sigmoid"],
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.schedule,
        warmup_steps=training.warmup_steps,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim="adamw_torch_fused",
        max_length=None,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=training.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=False,
        fp16=False,
    )


def loss_at_step_0(checkpoint: str, pairs: list[Any], config: Any, micro_batch: int) -> tuple[float, float]:
    import torch

    from workers.engine.dpo import DPO, PreferencePair, collate_pairs, reference_logps
    from workers.engine.models import load_model

    loaded = load_model(checkpoint)
    model, tokenizer = loaded.model, loaded.tokenizer
    pad, beta = tokenizer.pad_token_id, config.training.dpo.beta
    with model.disable_adapter():
        reference = reference_logps(model, pairs, pad, micro_batch)
    with_ref = [PreferencePair(p.chosen, p.rejected, r) for p, r in zip(pairs, reference, strict=True)]
    model.eval()
    with torch.no_grad():
        ours = float(DPO(pad, beta).loss(model, collate_pairs(with_ref, pad)).summed) / len(pairs)

    with tempfile.TemporaryDirectory() as out:
        args = _dpo_args(out, beta, micro_batch, 1, config)
        # TRL takes a peft model's trained adapter, copied, as its reference; the base is given here.
        trainer = _trainer(model, tokenizer, pairs, args, ref_model=load_model("default").model)
        trainer.model.eval()
        losses = []
        collator = trainer.data_collator
        dataset = trainer.train_dataset
        with torch.no_grad():
            for start in range(0, len(pairs), micro_batch):
                batch = collator([dataset[i] for i in range(start, min(start + micro_batch, len(pairs)))])
                losses.append(float(trainer.compute_loss(trainer.model, batch)) * len(batch["input_ids"]) / 2)
    return ours, sum(losses) / len(pairs)


def run(side: str, pairs: list[Any], config: Any, steps: int, micro_batch: int) -> tuple[float, float]:
    """(pairs per second over steps 2..steps, the whole call's wall time)."""
    import numpy as np
    import torch
    from transformers import TrainerCallback

    from workers.engine.models import load_model
    from workers.engine.training import _prepare_model, train

    training = config.training.model_copy(
        update={
            "objective": "dpo",
            "max_steps": steps,
            "micro_batch_size": micro_batch,
            "grad_accum": 1,
            "checkpoint_every": 0,
        }
    )
    loaded = load_model("default")
    ends: list[float] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        if side == "ours":
            result = train(loaded.model, loaded.tokenizer, pairs, training, Path(out), base_model="default")
            wall = time.perf_counter() - start
            elapsed = [row["elapsed_s"] for row in result.metrics]
            return micro_batch * (steps - 1) / (elapsed[-1] - elapsed[0]), wall

        random.seed(training.seed)
        np.random.seed(training.seed)
        torch.manual_seed(training.seed)
        model = _prepare_model(loaded.model, training, "default")

        class StepEnd(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                ends.append(time.perf_counter())

        trainer = _trainer(
            model,
            loaded.tokenizer,
            pairs,
            _dpo_args(out, config.training.dpo.beta, micro_batch, steps, config),
            [StepEnd()],
        )
        trainer.train()
        wall = time.perf_counter() - start
    return micro_batch * (steps - 1) / (ends[-1] - ends[0]), wall


if __name__ == "__main__":
    main()
