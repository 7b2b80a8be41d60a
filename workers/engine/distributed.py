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
of DDP's work; for LoRA's adapters that is small.

Sharded (`Ranks.sharded`, for a model whose training state does not fit one GPU): FSDP2's
`fully_shard` on each decoder layer and on the whole model, so each rank holds 1/N of every weight,
gradient and optimiser state, and gathers a layer's weights only while it runs. Its reduce-scatter
sums the gradients (divide factor 1) in every backward pass, which is a collective: a rank with
fewer micro-batches in a step runs zero-weighted passes until every rank has run as many
(`fillers`). Checkpoints stay the format of an unsharded run (full tensors, the optimiser's state by
parameter index), gathered on every rank and written by rank 0, so a sharded run resumes in one
process and the other way round. Each rank loads the whole weights before they are sharded, and
gathers them again for the moment of a save: the weights must fit one GPU, their training state
(gradients and AdamW's moments, 3 times as much again) need not. DPO's reference log-probabilities
are computed by rank 0 before sharding, with the whole model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from workers.engine.objectives import add_tallies, decoder_and_head


@dataclass(frozen=True)
class Ranks:
    """This process's place in the training group: rank 0 of 1 without torchrun."""

    rank: int = 0
    world: int = 1
    sharded: bool = False  # FSDP2 (see the module's docstring); never with one rank

    @classmethod
    def current(cls, *, shard: bool = False) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            return cls(dist.get_rank(), world, shard and world > 1)
        return cls()

    @property
    def main(self) -> bool:
        """Rank 0: it writes metrics and checkpoints and reports through the hooks."""
        return self.rank == 0

    def share(self, micro_batches: range) -> list[int]:
        """This rank's micro-batches of one step."""
        return [mb for i, mb in enumerate(micro_batches) if i % self.world == self.rank]

    def fillers(self, micro_batches: int) -> int:
        """How many zero-weighted passes this rank adds to its share of a step's `micro_batches`
        so that it runs as many as the busiest rank: sharded, every pass holds collectives."""
        if not self.sharded:
            return 0
        return -(-micro_batches // self.world) - len(self.share(range(micro_batches)))

    def shard(self, model: torch.nn.Module) -> None:
        """FSDP2 over the ranks, in place: each decoder layer a unit of its own, the rest (embeddings,
        head) the root's. Gradients are summed over the ranks, not averaged: the step's normaliser
        is already global."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        parts = decoder_and_head(model)
        layers = list(getattr(parts[0], "layers", [])) if parts is not None else []
        if not layers:
            raise ValueError("sharded training needs a decoder with its layers in `.layers`")
        for unit in (*layers, model):
            fully_shard(unit)
            unit.set_gradient_divide_factor(1.0)  # type: ignore[operator]
            unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]  (gloo has no PREMUL_SUM)

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with whole tensors; sharded, every rank must call it (it gathers).
        A tensor under two names (a head tied to the embedding) stays one tensor: save_pretrained
        writes it once, as it does for an unsharded model."""
        state = model.state_dict()
        if not self.sharded:
            return state
        param = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
        whole: dict[int, torch.Tensor] = {}
        out = {}
        for key, value in state.items():
            ident = param.get(key, id(value))
            if ident not in whole:
                whole[ident] = _whole(value)
            out[key] = whole[ident]
        return out

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimiser's state dict as an unsharded run's; sharded, every rank must call it."""
        state = optimizer.state_dict()
        if not self.sharded:
            return state
        whole = {i: {k: _whole(v) for k, v in entry.items()} for i, entry in state["state"].items()}
        return {**state, "state": whole}

    def shard_optimizer_state(
        self, state: dict[str, Any], optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """An unsharded run's optimiser state dict cut to this rank's shards of the parameters
        (each rank read the same file: no communication)."""
        if not self.sharded:
            return state
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        cut = {}
        for i, entry in state["state"].items():
            param = params[int(i)]
            cut[i] = {
                k: distribute_tensor(v, param.device_mesh, param.placements, src_data_rank=None)
                if isinstance(param, DTensor) and isinstance(v, torch.Tensor) and v.shape == param.shape
                else v
                for k, v in entry.items()
            }
        return {**state, "state": cut}

    def grad_norm(self, params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
        """Clip the gradients to `max_norm` (their norm over all ranks' shards); the norm before."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(_whole(norm))

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Each parameter's gradient summed over the ranks; a rank without micro-batches in the
        step contributes zeros. Sharded, FSDP's reduce-scatter has done it."""
        if self.world == 1 or self.sharded:
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


def _whole(value: Any) -> Any:
    """A DTensor gathered into one plain tensor (a collective); anything else as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value
