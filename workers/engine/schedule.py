"""The training schedule: how many optimiser steps, the learning rate of each, and which examples
each micro-batch holds.

The data position of step s is micro-batch `s * grad_accum` of an endless stream of seeded
per-epoch permutations, i.e. (epoch, index) = divmod(s * grad_accum, n_batches): a resumed run
needs only the step number.
"""

from __future__ import annotations

import math

import torch

from workers.engine.config import TrainConfig


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
