"""Data-parallel training: `train()` over the process group that `torchrun` starts.

When torch.distributed is initialised, each rank of `train()` takes its share of every optimiser
step's micro-batches (the i-th of the step goes to rank i mod world), and the gradients are summed
across ranks before clipping and the update. The step's normaliser (its trained tokens, or pairs)
is counted over all the step's micro-batches on every rank before any forward pass, so the summed
gradient is the one-process gradient of the same step: the loss curve is the one-process curve at
the same global batch (`grad_accum` micro-batches), up to the order of float sums. Rank 0 writes
the metrics and checkpoints; the others read what it wrote where a run resumes.

Ours rather than DistributedDataParallel: a step's micro-batches split unevenly across ranks
when `grad_accum` is not a multiple of the world size, while DDP's gradient hooks expect every
rank to run the same number of backward passes, and the loop's exact per-step normaliser would
have to be undone from DDP's mean. One all-reduce per trainable tensor per step is what is left
of DDP's work; for LoRA's adapters that is small. A model too large for one GPU needs FSDP2
(`fully_shard` per layer), which this does not do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from workers.engine.objectives import add_tallies


@dataclass(frozen=True)
class Ranks:
    """This process's place in the training group: rank 0 of 1 without torchrun."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def main(self) -> bool:
        """Rank 0: it writes metrics and checkpoints and reports through the hooks."""
        return self.rank == 0

    def share(self, micro_batches: range) -> list[int]:
        """This rank's micro-batches of one step."""
        return [mb for i, mb in enumerate(micro_batches) if i % self.world == self.rank]

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Each parameter's gradient summed over the ranks; a rank without micro-batches in the
        step contributes zeros."""
        if self.world == 1:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)

    def sum_tallies(self, tallies: dict[str, tuple[float, int]]) -> dict[str, tuple[float, int]]:
        """The objective's (value, count) tallies of a step, summed over the ranks."""
        if self.world == 1:
            return tallies
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, tallies)
        total: dict[str, tuple[float, int]] = {}
        for part in gathered:
            add_tallies(total, part)
        return total

    def same_start(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's initial trainable weights on every rank (LoRA's initialisation is seeded
        alike on every rank; this makes it so whatever the RNG did)."""
        if self.world > 1:
            for param in params:
                dist.broadcast(param.data, src=0)

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a checkpoint's path, say)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block before the others start it: it cleans up and writes files
        (interrupted checkpoints, DPO's reference log-probabilities) that they then only read."""
        if self.world > 1 and not self.main:
            dist.barrier()
        yield
        if self.world > 1 and self.main:
            dist.barrier()
