"""The training stage: an explicit loop over loss-masked GAtt examples, LoRA or full fine-tuning.

No HF Trainer: everything a step does is written out below, top to bottom.

- Data: examples longer than `max_seq_len` are cut by `gatt.masks.fit_to_length` (never inside a
  reply) or dropped. Each epoch visits them in a seeded permutation (`seed + epoch`) in
  micro-batches of `micro_batch_size`; an optimiser step takes the next `grad_accum`
  micro-batches of that endless stream, so the data position of step s is micro-batch
  `s * grad_accum`, i.e. (epoch, index) = divmod(s * grad_accum, n_batches). Resume needs no
  sampler state: only the step number.
- Loss: for each optimiser step, the sum of token cross-entropies over every trained token of all
  its micro-batches, divided by the number of trained tokens of the step, counted before any
  forward pass. Each micro-batch backpropagates `sum_ce / step_tokens`, so the accumulated
  gradient is exactly the gradient of that loss: long replies weigh per token, not per example.
- Checkpoints: `out_dir/checkpoints/step-{step:06d}/`, written into `step-XXXXXX.tmp` and renamed
  into place, `manifest.json` (sha256 of every file) written last. A directory is a checkpoint
  only if its manifest is there and every hash matches; anything else is skipped on resume.
- Resume: `train` on an out_dir with checkpoints continues from the newest valid one: weights,
  optimiser, step (hence data position and learning rate), RNG states, metrics history.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gatt.masks import IGNORE_INDEX, TokenizedExample, fit_to_length
from workers.engine.config import TrainConfig
from workers.engine.hooks import Hooks, Stopped
from workers.engine.models import unwrap

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
MERGED = "merged"
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
STATE_VERSION = 1
_CKPT_NAME = re.compile(r"^step-(\d{6,})$")

# Config fields that fix the data order or the shape of what is trained: a resume must not change
# them, or the checkpoint's step would point at different data / different parameters.
_RESUME_FIXED = (
    "method",
    "lora_r",
    "lora_alpha",
    "lora_targets",
    "micro_batch_size",
    "grad_accum",
    "max_seq_len",
    "seed",
)


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


# --------------------------------------------------------------------------------------------
# Pure pieces: schedule, data order, batches, loss.
# --------------------------------------------------------------------------------------------


def total_steps_for(n_batches: int, config: TrainConfig) -> int:
    """Optimiser steps of a run over `n_batches` micro-batches per epoch."""
    if config.max_steps is not None:
        return config.max_steps
    # round() first: 0.3 * 10 is 3.0000000000000004 in floating point, which must not cost a step.
    return max(1, math.ceil(round(config.epochs * n_batches / config.grad_accum, 9)))


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate of the optimiser update that follows `step` completed updates (0-based).

    Linear warmup over `warmup_steps` updates (reaching the peak on the last of them), then
    cosine or linear decay towards 0 over the remaining ones, or constant.
    """
    peak = config.learning_rate
    warmup = config.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if config.schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if config.schedule == "linear":
        return peak * (1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_permutation(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits the examples."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def micro_batch_indices(n_examples: int, config: TrainConfig, micro_batch: int) -> list[int]:
    """Example indices of global micro-batch number `micro_batch` (0-based, across epochs)."""
    n_batches = math.ceil(n_examples / config.micro_batch_size)
    epoch, index = divmod(micro_batch, n_batches)
    order = epoch_permutation(n_examples, config.seed, epoch)
    return order[index * config.micro_batch_size : (index + 1) * config.micro_batch_size]


def trained_labels(example: TokenizedExample) -> list[int]:
    """The labels that train: inside a span and not IGNORE_INDEX; everything else ignored."""
    labels = [IGNORE_INDEX] * len(example.input_ids)
    for start, end in example.spans:
        labels[start:end] = example.labels[start:end]
    return labels


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T), 0 on padding
    labels: torch.Tensor  # (B, T), IGNORE_INDEX outside trained spans and on padding

    @property
    def n_trained(self) -> int:
        """Tokens that carry loss: position 0 predicts nothing, so its label never counts."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(trained_labels(example), dtype=torch.long)
    return Batch(input_ids, attention_mask, labels)


# Architectures whose logits are exactly `lm_head(decoder(...).last_hidden_state)`: no softcapping
# (Gemma 2), logit scaling (Cohere, Granite) or other post-processing in their CausalLM forward.
_PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The decoder stack and output head of a plain causal LM (through a peft wrapper), else None."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def summed_loss(model: Any, batch: Batch, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over the batch's trained tokens, in fp32.

    Logits at position t predict the token at t+1. Most positions of a GAtt example train nothing
    (the instruction, the user turns, the earlier context), and the vocabulary projection, its fp32
    copy and the softmax are the costliest per-position work of a small model's step; so logits are
    computed only where a token trains. For plain causal LMs the output head runs on exactly those
    hidden states; for others the model is asked for logits at the columns that train in some row
    (`logits_to_keep` with indices: the model's own head, softcapping or scaling included).

    `position_ids` (restarting at 0 for each example) marks a packed batch: several examples end to
    end in a row, no attention mask; transformers then keeps attention within each example.
    """
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    inputs: dict[str, Any] = {"input_ids": batch.input_ids, "use_cache": False}
    if position_ids is None:
        inputs["attention_mask"] = batch.attention_mask
    else:
        inputs["position_ids"] = position_ids
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state
        logits = head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    columns = keep.any(dim=0).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=columns).logits
    targets = targets[:, columns]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


def train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TokenizedExample],
    config: TrainConfig,
    out_dir: Path,
    *,
    hooks: Hooks = Hooks(),  # noqa: B008 (Hooks is never mutated here)
    base_model: str = "default",
) -> TrainResult:
    """Train `model` on `examples`, or continue the run already in `out_dir`.

    For LoRA the model passed in is wrapped by peft (its modules get adapter layers); the trained
    model is `TrainResult.model`. Seeds python, numpy and torch's global RNGs with `config.seed`.
    Raises `Stopped` when `hooks.should_stop()` says so (checkpoints already written stay), and
    ValueError when `out_dir` holds a run this call cannot continue (other data, base model, or a
    config field that fixes data order or parameter shapes).
    """
    out_dir = Path(out_dir)
    ckpt_root = out_dir / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)

    # 1. Data: fit to length, drop what cannot be trained.
    data, too_long, shortened, untrained = _prepare(examples, config.max_seq_len)
    if too_long or shortened or untrained:
        hooks.event(
            "warning",
            "examples_dropped",
            f"{too_long + untrained} of {len(examples)} examples dropped ({too_long} longer than "
            f"max_seq_len={config.max_seq_len} even when cut after their first reply, {untrained} with no "
            f"trained token); {shortened} shortened to their last reply that fits",
            {"too_long": too_long, "untrained": untrained, "shortened": shortened, "total": len(examples)},
        )
    if not data:
        raise ValueError("no trainable examples: every example was dropped")
    dropped = too_long + untrained
    n_batches = math.ceil(len(data) / config.micro_batch_size)
    total_steps = total_steps_for(n_batches, config)
    fingerprint = _fingerprint(data)
    pad_id = _pad_id(tokenizer)

    # 2. Model and optimiser. Seed first: LoRA's initialisation draws from the global RNG.
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    model = _prepare_model(model, config, base_model)
    model.train()
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(trainable, config)

    # 3. Resume from the newest complete checkpoint, if any.
    _remove_temp_dirs(ckpt_root, hooks)
    latest = _latest_valid_checkpoint(ckpt_root, hooks)
    start_step, history, prior_elapsed, trained_total = 0, [], 0.0, 0
    if latest is not None:
        state = json.loads((latest / TRAINER_STATE).read_text())
        _check_resumable(state, config, base_model, fingerprint, hooks)
        _load_weights(model, latest, config)
        # weights_only=True: torch.load refuses anything but tensors and plain containers, so a
        # tampered optimizer.pt cannot run code on load (a full pickle could).
        optimizer.load_state_dict(torch.load(latest / OPTIMIZER, map_location=device, weights_only=True))
        for group in optimizer.param_groups:  # hyperparameters come from this config
            group["betas"] = config.betas
            group["weight_decay"] = config.weight_decay if group["name"] == "decay" else 0.0
        _set_rng_state(state["rng"])
        start_step = state["step"]
        history = state["metrics"]
        prior_elapsed = state["elapsed_s"]
        trained_total = state["trained_tokens"]
        hooks.event(
            "info",
            "resumed",
            f"resuming from {latest.name} (step {start_step} of {total_steps})",
            {"step": start_step, "path": str(latest), "total_steps": total_steps},
        )
    # The metrics files hold exactly the steps before start_step; the loop appends the rest.
    _rewrite_metrics(out_dir, history)

    hooks.event(
        "info",
        "train_started",
        f"training {config.method}: {len(data)} examples, {total_steps} steps",
        {
            "method": config.method,
            "examples": len(data),
            "micro_batches_per_epoch": n_batches,
            "total_steps": total_steps,
            "start_step": start_step,
            "trainable_parameters": sum(p.numel() for p in trainable),
        },
    )
    hooks.progress("train", start_step, total_steps)

    final: Path | None = latest if latest is not None and start_step >= total_steps else None
    if start_step > total_steps:
        hooks.event(
            "warning",
            "already_trained",
            f"the checkpoint is at step {start_step}, past this config's {total_steps} steps; nothing to do",
            {"step": start_step, "total_steps": total_steps},
        )

    session_start = time.perf_counter()
    with contextlib.ExitStack() as files:
        jsonl = files.enter_context(open(out_dir / METRICS_JSONL, "a", encoding="utf-8"))
        csv_file = files.enter_context(open(out_dir / METRICS_CSV, "a", encoding="utf-8", newline=""))
        csv_writer = csv.DictWriter(csv_file, fieldnames=METRIC_FIELDS)

        for step in range(start_step, total_steps):
            step_start = time.perf_counter()
            first_mb = step * config.grad_accum
            batches = [
                collate([data[i] for i in micro_batch_indices(len(data), config, mb)], pad_id)
                for mb in range(first_mb, first_mb + config.grad_accum)
            ]
            # The normaliser of this step, known before any forward pass.
            step_trained = sum(b.n_trained for b in batches)
            lr = lr_at(step, config, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            for batch in batches:
                if hooks.should_stop():
                    optimizer.zero_grad(set_to_none=True)
                    raise Stopped(f"stopped during step {step + 1}; last checkpoint kept")
                ce = summed_loss(model, batch.to(device))
                (ce / step_trained).backward()
                loss_sum += ce.detach()

            clip_to = config.max_grad_norm if config.max_grad_norm is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, clip_to))
            loss = float(loss_sum) / step_trained
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"step {step + 1}: loss {loss}, gradient norm {grad_norm}; stopping before the "
                    "optimiser applies it (try a lower learning_rate)"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            trained_total += step_trained
            now = time.perf_counter()
            step_tokens = sum(b.n_tokens for b in batches)
            session_steps = done - start_step
            row: dict[str, float] = {
                "step": done,
                "loss": loss,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "trained_tokens": step_trained,
                "tokens": step_tokens,
                "tokens_per_s": step_tokens / max(now - step_start, 1e-9),
                "elapsed_s": prior_elapsed + (now - session_start),
                "eta_s": (now - session_start) / session_steps * (total_steps - done),
                "epoch": (first_mb + config.grad_accum) / n_batches,
            }
            history.append(row)
            jsonl.write(json.dumps(row) + "\n")
            jsonl.flush()
            csv_writer.writerow(row)
            csv_file.flush()
            hooks.metrics(done, {k: v for k, v in row.items() if k != "step"})

            if done == total_steps or (config.checkpoint_every and done % config.checkpoint_every == 0):
                ckpt_state = {
                    "format_version": STATE_VERSION,
                    "step": done,
                    "total_steps": total_steps,
                    "epoch": row["epoch"],
                    "data": {
                        "micro_batches_consumed": first_mb + config.grad_accum,
                        "micro_batches_per_epoch": n_batches,
                        "next_epoch_index": list(divmod(first_mb + config.grad_accum, n_batches)),
                        "examples": len(data),
                        "fingerprint": fingerprint,
                    },
                    "rng": _rng_state(),
                    "config": config.to_json(),
                    "base_model": base_model,
                    "elapsed_s": row["elapsed_s"],
                    "trained_tokens": trained_total,
                    "dropped_examples": dropped,
                    "metrics": history,
                }
                final, manifest = _save_checkpoint(
                    ckpt_root, done, model, tokenizer, optimizer, config, ckpt_state, base_model
                )
                _rotate(ckpt_root, config.keep_checkpoints)
                hooks.checkpoint(done, str(final), manifest)
            hooks.progress("train", done, total_steps)

    if final is None:  # only when start_step > total_steps with no checkpoint at all: impossible
        raise RuntimeError("training ended without a checkpoint")
    return TrainResult(
        steps=max(total_steps, start_step),
        checkpoint=final,
        metrics=history,
        trained_tokens=trained_total,
        dropped_examples=dropped,
        resumed_from=start_step if latest is not None else None,
        model=model,
    )


# --------------------------------------------------------------------------------------------
# Setup helpers.
# --------------------------------------------------------------------------------------------


def _prepare(
    examples: Sequence[TokenizedExample], max_seq_len: int
) -> tuple[list[TokenizedExample], int, int, int]:
    data: list[TokenizedExample] = []
    too_long = shortened = untrained = 0
    for i, example in enumerate(examples):
        if not isinstance(example, TokenizedExample):
            raise TypeError(f"examples[{i}] is a {type(example).__name__}, not a TokenizedExample")
        n = len(example.input_ids)
        for start, end in example.spans:
            if not 0 <= start < end <= n:
                raise ValueError(f"examples[{i}] has span ({start}, {end}) outside its {n} tokens")
        fitted = fit_to_length(example, max_seq_len)
        if fitted is None:
            too_long += 1
            continue
        if len(fitted.input_ids) < n:
            shortened += 1
        if not any(label != IGNORE_INDEX for label in trained_labels(fitted)[1:]):
            untrained += 1
            continue
        data.append(fitted)
    return data, too_long, shortened, untrained


def _fingerprint(data: Sequence[TokenizedExample]) -> str:
    digest = hashlib.sha256()
    for example in data:
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
        raise ValueError("pass the base model; train() adds the LoRA adapter itself")
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


# --------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------


def _save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    state: dict[str, Any],
    base_model: str,
) -> tuple[Path, dict[str, Any]]:
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f"step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    if final.exists():  # left by an earlier run and found corrupt, or a rerun past a resume
        shutil.rmtree(final)
    tmp.mkdir()
    rng = _rng_state()  # saving must not move the RNG: an uninterrupted run and a resumed one agree
    if config.method == "lora":
        # save_embedding_layers=False: the vocabulary is never resized here, and "auto" would look
        # the base model up on the Hub.
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        if config.merge_on_save:
            _save_merged(model, tmp / MERGED)
    else:
        model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        if (tmp / MERGED).is_dir():  # merged weights are a complete model: loadable, trainable further
            tokenizer.save_pretrained(tmp / MERGED)
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    _set_rng_state(rng)

    manifest = {
        "step": step,
        "files": _hash_files(tmp),
        "metrics": state["metrics"][-1] if state["metrics"] else {},
        "base_model": base_model,
        "method": config.method,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1))
    os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    return final, manifest


def _save_merged(peft_model: Any, directory: Path) -> None:
    """Full weights with the adapter folded in, without touching the training model.

    `merge_and_unload` would rewrite the base weights in place (and merge/unmerge leaves rounding
    in them); a deepcopy doubles the model's memory. Instead the merged tensors are computed into a
    fresh state dict, under the base model's own key names, and saved with its save_pretrained.
    """
    from peft.tuners.lora import LoraLayer

    inner = peft_model.get_base_model()
    deltas = {}
    with torch.no_grad():
        for name, module in inner.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                deltas[f"{name}.weight"] = module.get_delta_weight("default")  # type: ignore[attr-defined]
        merged = {}
        for key, value in inner.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            merged[key] = (value + deltas[key].to(value.dtype)) if key in deltas else value
    missing = set(deltas) - set(merged)
    if missing:
        raise RuntimeError(f"could not merge LoRA weights into {sorted(missing)[:3]}")
    inner.save_pretrained(directory, state_dict=merged)


def _hash_files(directory: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
            os.fsync(f.fileno())
        files[rel] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return files


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _checkpoint_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories by name (complete or not), newest first."""
    found = []
    for path in ckpt_root.iterdir():
        match = _CKPT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def verify_checkpoint(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (interrupted while writing)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        step = manifest["step"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    match = _CKPT_NAME.match(path.name)
    if match and int(match.group(1)) != step:
        return f"manifest.json says step {step}"
    for rel in (TRAINER_STATE, OPTIMIZER):
        if rel not in files:
            return f"manifest.json does not list {rel}"
    for rel, info in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != info["bytes"]:
            return f"{rel} has {file.stat().st_size} bytes, manifest.json says {info['bytes']}"
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != info["sha256"]:
            return f"{rel} does not match its sha256 in manifest.json"
    return None


def _remove_temp_dirs(ckpt_root: Path, hooks: Hooks) -> None:
    for path in ckpt_root.glob("*.tmp"):
        hooks.event(
            "warning",
            "checkpoint_ignored",
            f"removing {path.name}: a checkpoint interrupted while being written",
            {"path": str(path)},
        )
        shutil.rmtree(path, ignore_errors=True)


def _latest_valid_checkpoint(ckpt_root: Path, hooks: Hooks) -> Path | None:
    """The newest complete checkpoint. Broken ones newer than it are reported and removed (the
    run will write those steps again); older ones are left alone."""
    for _step, path in _checkpoint_dirs(ckpt_root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        hooks.event(
            "warning",
            "checkpoint_ignored",
            f"ignoring checkpoint {path.name}: {problem}",
            {"path": str(path), "reason": problem},
        )
        shutil.rmtree(path, ignore_errors=True)
    return None


def _rotate(ckpt_root: Path, keep: int) -> None:
    for _step, path in _checkpoint_dirs(ckpt_root)[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def _check_resumable(
    state: dict[str, Any], config: TrainConfig, base_model: str, fingerprint: str, hooks: Hooks
) -> None:
    if state.get("format_version") != STATE_VERSION:
        raise ValueError(f"checkpoint format {state.get('format_version')!r} is not {STATE_VERSION}")
    saved, now = state["config"], config.to_json()
    fixed = [k for k in _RESUME_FIXED if saved.get(k) != now[k]]
    if fixed:
        raise ValueError(
            "cannot resume: the checkpoint was trained with different "
            + ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in fixed)
        )
    if state["base_model"] != base_model:
        raise ValueError(f"cannot resume: the checkpoint is of {state['base_model']!r}, not {base_model!r}")
    if state["data"]["fingerprint"] != fingerprint:
        raise ValueError("cannot resume: the examples differ from those the checkpoint was trained on")
    changed = {k: (saved.get(k), now[k]) for k in now if saved.get(k) != now[k]}
    if changed:
        hooks.event(
            "info",
            "config_changed",
            "resuming with changed " + ", ".join(sorted(changed)),
            {k: {"was": a, "now": b} for k, (a, b) in changed.items()},
        )


def _load_weights(model: Any, ckpt: Path, config: TrainConfig) -> None:
    from safetensors.torch import load_file

    if config.method == "lora":
        from peft import set_peft_model_state_dict

        weights = load_file(ckpt / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, weights)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise ValueError(f"checkpoint adapter does not fit the model: {unexpected[:3]}")
        return
    weights = {}
    for file in sorted(ckpt.glob("*.safetensors")):  # one file or shards
        weights.update(load_file(file))
    result = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint weights do not fit the model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )


# --------------------------------------------------------------------------------------------
# RNG state and metrics files.
# --------------------------------------------------------------------------------------------


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, np.asarray(np_keys).tolist(), np_pos, np_has_gauss, np_gauss],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_from_b64(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in cuda])


def _rewrite_metrics(out_dir: Path, history: list[dict[str, float]]) -> None:
    """Both metrics files, holding exactly `history` (the steps up to the resumed checkpoint)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (METRICS_JSONL + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history), encoding="utf-8")
    os.replace(tmp, out_dir / METRICS_JSONL)
    tmp = out_dir / (METRICS_CSV + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out_dir / METRICS_CSV)
