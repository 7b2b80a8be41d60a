"""The training stage: an explicit loop over loss-masked GAtt examples, LoRA or full fine-tuning.

No HF Trainer: ours because GAtt's loss is exact per token and resume is exact per step, and both
are easier to keep true in a loop that is read top to bottom (`train`) than inside a framework's
callbacks. Its parts live beside it: the schedule and data order (`schedule.py`), what a step
minimises (`objectives.py`) and the checkpoints (`checkpoints.py`).

- Data: examples longer than `max_seq_len` are cut by `gatt.masks.fit_to_length` (never inside a
  reply) or dropped. Each epoch visits them in a seeded permutation (`seed + epoch`) in
  micro-batches of `micro_batch_size` examples or of `micro_batch_tokens` (`schedule.py`); an
  optimiser step takes the next `grad_accum` micro-batches of that endless stream, so resume needs
  no sampler state: only the step number.
- Loss: for each optimiser step, the objective's summed loss over all its micro-batches divided by
  the step's units (trained tokens for GAtt's masked SFT, pairs for DPO: `dpo.py`), counted before
  any forward pass. Each micro-batch backpropagates `summed / step_units`, so the accumulated
  gradient is exactly the gradient of that loss: long replies weigh per token, not per example.
- Layout: on a GPU a micro-batch's examples are packed end to end into rows (no padding), attend
  through flex attention's block mask, and each decoder layer runs compiled; the CPU pads
  (`config.packing`, `config.compile`). `micro_batch_tokens` gives every micro-batch the same rows,
  so the compiled layers keep one shape: 45.9% MFU on an H200, against 41.9% with micro-batches
  of `micro_batch_size` examples and 11.5% padded (docs/benchmarks.md, "GPU training").
- Resume: `train` on an out_dir with checkpoints continues from the newest valid one: weights,
  optimiser, step (hence data position and learning rate), RNG states, metrics history.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gatt.masks import IGNORE_INDEX, TokenizedExample, fit_to_length
from workers.engine.checkpoints import (
    CHECKPOINTS,
    STATE_VERSION,
    CheckpointStore,
    load_optimizer,
    load_weights,
    optimizer_state,
    restore,
    rng_state,
    set_rng_state,
)
from workers.engine.config import TrainConfig
from workers.engine.distributed import Ranks
from workers.engine.dpo import DPO, PreferencePair
from workers.engine.hooks import Hooks, Stopped
from workers.engine.models import unwrap
from workers.engine.objectives import MaskedSFT, Objective, add_tallies, decoder_and_head, trained_labels
from workers.engine.schedule import Batches, TokenBatches, lr_at, total_steps_for

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
METRIC_FIELDS = (
    "step",
    "loss",
    "learning_rate",
    "grad_norm",
    "trained_tokens",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
    "eta_s",
    "epoch",
)
# Packed rows of micro_batch_tokens are at least this long. On an H200 (docs/benchmarks.md, "GPU
# training"), GAtt-shaped examples of 256-2,048 tokens filled rows of 4,096 to 95% (45.6% MFU) and
# rows of 2,048 to 86% (42.8%); one row of 16,384 did not finish its first steps in 150 s.
ROW_TOKENS = 4096
# Written by the DPO objectives only (`dpo.py`); blank in an SFT run's metrics.csv.
PREFERENCE_FIELDS = ("preference_accuracy", "preference_margin")


@dataclass
class TrainResult:
    steps: int
    checkpoint: Path
    metrics: list[dict[str, float]]
    trained_tokens: int
    dropped_examples: int
    # The step this call resumed from (None: started fresh).
    resumed_from: int | None = None
    # The trained model (for LoRA, the PeftModel wrapping the model passed in).
    model: Any = field(default=None, repr=False)


@dataclass
class _Run:
    """Where the run stands: what a checkpoint restores, and what the metrics rows need."""

    total_steps: int
    batches: Batches
    start_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    prior_elapsed: float = 0.0  # seconds trained before this call (earlier attempts)
    trained_total: int = 0
    session_start: float = 0.0


def train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TokenizedExample | PreferencePair],
    config: TrainConfig,
    out_dir: Path,
    *,
    hooks: Hooks = Hooks(),  # noqa: B008 (Hooks is never mutated here)
    base_model: str = "default",
    lineage: dict[str, Any] | None = None,
    objective: Objective | None = None,
    shard: bool = False,
) -> TrainResult:
    """Train `model` on `examples`, or continue the run already in `out_dir`.

    For LoRA the model passed in is wrapped by peft (its modules get adapter layers), or, if it is
    a peft model already (a LoRA checkpoint continued), its own adapter trains further; the trained
    model is `TrainResult.model`. `base_model` names the base weights in every checkpoint and
    `lineage` is recorded in each manifest as given. `objective` defaults to `config.objective`'s:
    GAtt's masked SFT on TokenizedExamples, or DPO on PreferencePairs (`dpo.py`). `shard` shards
    the model over torchrun's ranks with FSDP2 (`distributed.py`); alone it does nothing.
    Seeds python, numpy and torch's global RNGs with `config.seed`. Raises `Stopped` when
    `hooks.should_stop()` says so (checkpoints already written stay), and ValueError when `out_dir`
    holds a run this call cannot continue (other data, base model, or a config field that fixes data
    order or parameter shapes).
    """
    out_dir = Path(out_dir)
    ranks = Ranks.current(shard=shard)
    store = CheckpointStore(out_dir / CHECKPOINTS, hooks)
    data, dropped = _trainable(examples, config.max_seq_len, hooks)
    on_gpu = ranks.device(model).type == "cuda"
    # Packing lays out GAtt's single examples; DPO's pairs are padded, one reply per row.
    packed = config.objective == "sft" and (
        config.packing == "packed"
        or config.micro_batch_tokens is not None
        or (config.packing == "auto" and on_gpu)
    )
    batches = _batches(data, config)
    run = _Run(total_steps=total_steps_for(batches.for_epochs(config.epochs), config), batches=batches)
    fingerprint = _fingerprint(data)
    objective = objective or _objective(config, tokenizer, data, packed)

    # Seed first: LoRA's initialisation draws from the global RNG.
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = _prepare_model(model, config, base_model)
    model.train()
    ranks.same_start(_trainable_params(model))

    with ranks.main_first():
        latest = store.latest()
    # Sharded, only rank 0 reads the checkpoint's weights: sharding hands them out.
    weights = ranks.main or not ranks.sharded
    state = (
        None
        if latest is None
        else restore(latest, model, config, base_model, fingerprint, hooks, weights=weights)
    )
    ranks.shard(model)  # the optimiser holds the parameters as sharded
    # DPO's reference is the model as training starts: computed only when no checkpoint was loaded
    # (a resumed run reads the values its start stored), over the ranks as they train.
    data = objective.begin(model, data, out_dir, resuming=latest is not None, ranks=ranks)
    trainable = _trainable_params(model)
    optimizer = _optimizer(trainable, config)
    if latest is not None and state is not None:
        # Sharded, into host memory: each whole tensor goes to the GPU only to be cut to a shard.
        saved = optimizer_state(latest, torch.device("cpu") if ranks.sharded else ranks.device(model))
        load_optimizer(optimizer, ranks.shard_optimizer_state(saved, optimizer), config)
        set_rng_state(state["rng"])
        run.start_step, run.history = state["step"], state["metrics"]
        run.prior_elapsed, run.trained_total = state["elapsed_s"], state["trained_tokens"]
        hooks.event(
            "info",
            "resumed",
            f"resuming from {latest.name} (step {run.start_step} of {run.total_steps})",
            {"step": run.start_step, "path": str(latest), "total_steps": run.total_steps},
        )
    if ranks.main:
        # The metrics files hold exactly the steps before start_step; the loop appends the rest.
        _rewrite_metrics(out_dir, run.history)
        _announce(hooks, config, run, len(data), trainable)

    final = latest if latest is not None and run.start_step >= run.total_steps else None
    run.session_start = time.perf_counter()
    with contextlib.ExitStack() as files:
        files.enter_context(_fast_kernels(model, config, packed=packed, on_gpu=on_gpu))
        metrics = files.enter_context(_MetricsFiles(out_dir)) if ranks.main else None

        for step in range(run.start_step, run.total_steps):
            row = _step(step, model, objective, data, optimizer, trainable, config, run, hooks, ranks)
            run.history.append(row)
            done = step + 1
            saved = None  # whole tensors to write; sharded, every rank takes part in gathering them
            if (ranks.main or ranks.sharded) and (
                done == run.total_steps or (config.checkpoint_every and done % config.checkpoint_every == 0)
            ):
                saved = ranks.full_state(model), ranks.full_optimizer_state(optimizer)
            if metrics is None:  # another rank: rank 0 writes, its copy of the weights is this one's
                continue
            hooks.fence()  # before the metrics files, a checkpoint and the rotation of older ones
            metrics.write(row)
            hooks.metrics(done, {k: v for k, v in row.items() if k != "step"})
            if saved is not None:
                state = _trainer_state(done, row, run, config, base_model, fingerprint, len(data), dropped)
                final, manifest = store.save(
                    done, model, tokenizer, *saved, config, state, base_model, lineage
                )
                store.rotate(config.keep_checkpoints)
                hooks.checkpoint(done, str(final), manifest)
            hooks.progress("train", done, run.total_steps)

    final = ranks.from_main(final)
    if final is None:  # only when start_step > total_steps with no checkpoint at all: impossible
        raise RuntimeError("training ended without a checkpoint")
    return TrainResult(
        steps=max(run.total_steps, run.start_step),
        checkpoint=final,
        metrics=run.history,
        trained_tokens=run.trained_total,
        dropped_examples=dropped,
        resumed_from=run.start_step if latest is not None else None,
        model=model,
    )


def trained_model(model: Any, config: TrainConfig, checkpoint: Path, base_model: str = "default") -> Any:
    """The model `train()` would have returned, from `model` as it was passed in and the final
    checkpoint a run trained elsewhere wrote (`launch.py`: the ranks' run)."""
    model = _prepare_model(model, config, base_model)
    load_weights(model, checkpoint, config)
    return model


def _step(
    step: int,
    model: Any,
    objective: Objective,
    data: Sequence[TokenizedExample],
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    config: TrainConfig,
    run: _Run,
    hooks: Hooks,
    ranks: Ranks,
) -> dict[str, float]:
    """One optimiser step (0-based `step`): its micro-batches, forward and backward (this rank's
    share of them: `distributed.py`), clip, update; its metrics row."""
    step_start = time.perf_counter()
    device = next(model.parameters()).device
    first_mb = step * config.grad_accum
    batches = [
        objective.collate([data[i] for i in run.batches.indices(mb)])
        for mb in range(first_mb, first_mb + config.grad_accum)
    ]
    # The normaliser of this step, known before any forward pass.
    step_units = sum(objective.units(b) for b in batches)
    lr = lr_at(step, config, run.total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr

    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    tallies: dict[str, tuple[float, int]] = {}
    # Passes a rank does not keep are zero-weighted: they keep sharded ranks in step.
    for i, kept in ranks.passes(len(batches)):
        if hooks.should_stop():
            optimizer.zero_grad(set_to_none=True)
            raise Stopped(f"stopped during step {step + 1}; last checkpoint kept")
        out = objective.loss(model, batches[i].to(device))
        (out.summed * (1.0 if kept else 0.0) / step_units).backward()
        if kept:
            loss_sum += out.summed.detach()
            add_tallies(tallies, out.tallies)
    ranks.sum_gradients(trainable)
    ranks.reduce_sum(loss_sum)
    tallies = ranks.sum_tallies(tallies)

    clip_to = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    grad_norm = ranks.grad_norm(trainable, clip_to)
    loss = float(loss_sum) / step_units
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise FloatingPointError(
            f"step {step + 1}: loss {loss}, gradient norm {grad_norm}; stopping before the "
            "optimiser applies it (try a lower learning_rate)"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    done = step + 1
    step_trained = sum(b.n_trained for b in batches)
    run.trained_total += step_trained
    now = time.perf_counter()
    step_tokens = sum(b.n_tokens for b in batches)
    return {
        "step": done,
        "loss": loss,
        "learning_rate": lr,
        "grad_norm": grad_norm,
        "trained_tokens": step_trained,
        "tokens": step_tokens,
        "tokens_per_s": step_tokens / max(now - step_start, 1e-9),
        "elapsed_s": run.prior_elapsed + (now - run.session_start),
        "eta_s": (now - run.session_start) / (done - run.start_step) * (run.total_steps - done),
        "epoch": run.batches.epochs_done(first_mb + config.grad_accum),
        **{name: value / count for name, (value, count) in tallies.items() if count},
    }


def _trainer_state(
    done: int,
    row: dict[str, float],
    run: _Run,
    config: TrainConfig,
    base_model: str,
    fingerprint: str,
    n_examples: int,
    dropped: int,
) -> dict[str, Any]:
    """What a checkpoint after step `done` records for a resume (`trainer_state.json`)."""
    consumed = done * config.grad_accum
    return {
        "format_version": STATE_VERSION,
        "step": done,
        "total_steps": run.total_steps,
        "epoch": row["epoch"],
        "data": {
            "micro_batches_consumed": consumed,
            "micro_batches_per_epoch": run.batches.per_epoch(0),
            "next_epoch_index": list(run.batches.position(consumed)),
            "examples": n_examples,
            "fingerprint": fingerprint,
        },
        "rng": rng_state(),
        "config": config.to_json(),
        "base_model": base_model,
        "elapsed_s": row["elapsed_s"],
        "trained_tokens": run.trained_total,
        "dropped_examples": dropped,
        "metrics": run.history,
    }


def _announce(
    hooks: Hooks, config: TrainConfig, run: _Run, n_examples: int, trainable: list[torch.nn.Parameter]
) -> None:
    hooks.event(
        "info",
        "train_started",
        f"training {config.method}: {n_examples} examples, {run.total_steps} steps",
        {
            "method": config.method,
            "examples": n_examples,
            "micro_batches_per_epoch": run.batches.per_epoch(0),
            "total_steps": run.total_steps,
            "start_step": run.start_step,
            "trainable_parameters": sum(p.numel() for p in trainable),
        },
    )
    hooks.progress("train", run.start_step, run.total_steps)
    if run.start_step > run.total_steps:
        hooks.event(
            "warning",
            "already_trained",
            f"the checkpoint is at step {run.start_step}, past this config's {run.total_steps} steps; "
            "nothing to do",
            {"step": run.start_step, "total_steps": run.total_steps},
        )


# --- setup ------------------------------------------------------------------------------------


def _batches(data: Sequence[Any], config: TrainConfig) -> Batches:
    if config.micro_batch_tokens is None:
        return Batches(len(data), config)
    return TokenBatches([len(e.input_ids) for e in data], config, *_token_rows(data, config))


def _token_rows(data: Sequence[TokenizedExample], config: TrainConfig) -> tuple[int, int]:
    """(rows, row length) of a micro-batch of `micro_batch_tokens`: rows of at least ROW_TOKENS
    (within the budget), so that short examples fill the room a long one leaves."""
    budget = config.micro_batch_tokens or 0
    row_len = max(_row_len(data), min(ROW_TOKENS, budget // 128 * 128))
    return max(1, budget // row_len), row_len


def _objective(config: TrainConfig, tokenizer: Any, data: Sequence[Any], packed: bool) -> Objective:
    if config.objective == "sft":
        if not packed:
            return MaskedSFT(_pad_id(tokenizer))
        if config.micro_batch_tokens is None:
            return MaskedSFT(_pad_id(tokenizer), _row_len(data))
        rows, row_len = _token_rows(data, config)
        return MaskedSFT(_pad_id(tokenizer), row_len, rows)
    sft_weight = config.dpo.sft_weight if config.objective == "sft+dpo" else 0.0
    return DPO(_pad_id(tokenizer), config.dpo.beta, sft_weight, batch_size=config.micro_batch_size)


def _trainable(
    examples: Sequence[TokenizedExample | PreferencePair], max_seq_len: int, hooks: Hooks
) -> tuple[list[Any], int]:
    """The examples fitted to `max_seq_len`, and how many were dropped (reported as an event)."""
    data, too_long, shortened, untrained = _prepare(examples, max_seq_len)
    if too_long or shortened or untrained:
        hooks.event(
            "warning",
            "examples_dropped",
            f"{too_long + untrained} of {len(examples)} examples dropped ({too_long} longer than "
            f"max_seq_len={max_seq_len} even when cut after their first reply, {untrained} with no "
            f"trained token); {shortened} shortened to their last reply that fits",
            {"too_long": too_long, "untrained": untrained, "shortened": shortened, "total": len(examples)},
        )
    if not data:
        raise ValueError("no trainable examples: every example was dropped")
    return data, too_long + untrained


def _prepare(
    examples: Sequence[TokenizedExample | PreferencePair], max_seq_len: int
) -> tuple[list[Any], int, int, int]:
    """Each example cut to fit (`fit_to_length`); a preference pair is kept only whole: its two
    replies must stand after the same context."""
    data: list[Any] = []
    too_long = shortened = untrained = 0
    for i, item in enumerate(examples):
        if isinstance(item, PreferencePair):
            parts = item.examples
        elif isinstance(item, TokenizedExample):
            parts = (item,)
        else:
            raise TypeError(f"examples[{i}] is a {type(item).__name__}, not a TokenizedExample")
        fitted = []
        for example in parts:
            n = len(example.input_ids)
            for start, end in example.spans:
                if not 0 <= start < end <= n:
                    raise ValueError(f"examples[{i}] has span ({start}, {end}) outside its {n} tokens")
            fitted.append(fit_to_length(example, max_seq_len))
        if any(f is None for f in fitted) or (len(parts) > 1 and fitted != list(parts)):
            too_long += 1
            continue
        if not all(any(label != IGNORE_INDEX for label in trained_labels(f)[1:]) for f in fitted):
            untrained += 1
            continue
        if len(fitted[0].input_ids) < len(parts[0].input_ids):  # never a pair's: kept whole above
            shortened += 1
        # A replayed dialogue under sft+dpo is a "pair" without a rejected reply, cut like an example.
        data.append(
            dataclasses.replace(item, chosen=fitted[0]) if isinstance(item, PreferencePair) else fitted[0]
        )
    return data, too_long, shortened, untrained


def _row_len(data: Sequence[TokenizedExample]) -> int:
    """The packed rows' length: the longest example rounded up to flex attention's 128-token
    blocks. One width for the whole run, so that compiled layers see few shapes."""
    return -(-max(len(e.input_ids) for e in data) // 128) * 128


@contextlib.contextmanager
def _fast_kernels(model: Any, config: TrainConfig, *, packed: bool, on_gpu: bool) -> Iterator[None]:
    """Flex attention for packed rows on a GPU (its block mask skips the blocks between examples,
    where sdpa computes them), and each decoder layer compiled (the layers share one graph; the
    mask stays outside it). Undone on the way out: sampling and evaluation get the model as loaded."""
    base = unwrap(model)
    parts = decoder_and_head(model)
    flex = packed and on_gpu
    compiled = config.compile == "on" or (config.compile == "auto" and flex)
    layers = list(getattr(parts[0], "layers", [])) if compiled and parts is not None else []
    attention = base.config._attn_implementation
    if flex:
        base.set_attn_implementation("flex_attention")
    for layer in layers:
        layer.forward = torch.compile(layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again
        if flex:
            base.set_attn_implementation(attention)


def _fingerprint(data: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for item in data:
        for example in item.examples if isinstance(item, PreferencePair) else (item,):
            digest.update(json.dumps([example.input_ids, trained_labels(example)]).encode())
    return digest.hexdigest()


def _pad_id(tokenizer: Any) -> int:
    # Padding sits right of every real token, behind an attention mask of 0 and label
    # IGNORE_INDEX, so which token it is does not change anything trained.
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _prepare_model(model: Any, config: TrainConfig, base_model: str) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        return _continued_adapter(model, config, base_model)
    if config.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    targets = config.lora_targets if isinstance(config.lora_targets, str) else list(config.lora_targets)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    # Written into adapter_config.json: the loader reads it to find the base weights.
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    return peft_model


def _continued_adapter(model: Any, config: TrainConfig, base_model: str) -> Any:
    """A loaded LoRA checkpoint whose adapter trains further: the result still applies to the
    original base weights (stock `PeftModel.from_pretrained(base, checkpoint)` loads it), which a new
    adapter on merged weights would not. The adapter's shape is the checkpoint's, so the job's must
    agree (the API fills it in from the parent job)."""
    if config.method != "lora":
        raise ValueError("full fine-tuning takes the merged weights of a LoRA checkpoint, not the adapter")
    adapter = model.peft_config["default"]
    # Targets are not compared: peft stores "all-linear" as the module names it matched.
    if (adapter.r, adapter.lora_alpha) != (config.lora_r, config.lora_alpha):
        raise ValueError(
            f"the checkpoint's adapter has r={adapter.r} and lora_alpha={adapter.lora_alpha}; continue it "
            "with the same training.lora_r and lora_alpha"
        )
    adapter.inference_mode = False
    adapter.base_model_name_or_path = base_model
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def _trainable_params(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    if not params:
        raise ValueError("the model has no trainable parameters")
    # No weight decay on vectors (norm scales, biases), as usual.
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": group, "weight_decay": wd, "name": name}
        for name, group, wd in (("decay", decay, config.weight_decay), ("no_decay", no_decay, 0.0))
        if group
    ]
    try:
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, fused=True)
    except RuntimeError:  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, foreach=True)


class _MetricsFiles(contextlib.AbstractContextManager):
    """metrics.jsonl and metrics.csv, a row appended to each per step."""

    def __init__(self, out_dir: Path) -> None:
        self.jsonl = open(out_dir / METRICS_JSONL, "a", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        self.csv_file = open(out_dir / METRICS_CSV, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self.csv = csv.DictWriter(self.csv_file, fieldnames=METRIC_FIELDS + PREFERENCE_FIELDS)

    def write(self, row: dict[str, float]) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        self.csv.writerow(row)
        self.csv_file.flush()

    def __exit__(self, *exc: object) -> None:
        self.jsonl.close()
        self.csv_file.close()


def _rewrite_metrics(out_dir: Path, history: list[dict[str, float]]) -> None:
    """Both metrics files, holding exactly `history` (the steps up to the resumed checkpoint)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (METRICS_JSONL + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")
    os.replace(tmp, out_dir / METRICS_JSONL)
    tmp = out_dir / (METRICS_CSV + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS + PREFERENCE_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out_dir / METRICS_CSV)
