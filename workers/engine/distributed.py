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
(`passes`). The weights never sit whole on a GPU: rank 0 loads them into host memory (and a resumed
run's checkpoint into them there), the other ranks build the model on the meta device, and sharding
moves one layer at a time to rank 0's GPU and broadcasts each tensor, every rank keeping its shard.
Checkpoints stay the format of an unsharded run (full tensors, the optimiser's state by parameter
index), gathered a tensor at a time into rank 0's host memory and written by it, so a sharded run
resumes in one process and the other way round. A GPU holds its shards plus the layers being
gathered whole while they run.

DPO's reference pass is shared out as a step's micro-batches are (`passes`, `gather`): each rank
runs its share of the pairs' chunks, with the model as training starts, and every rank gets all
the values.
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
    device_type: str = "cpu"  # where sharded weights live: "cuda" when the group runs NCCL

    @classmethod
    def current(cls, *, shard: bool = False) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            device_type = "cuda" if "nccl" in str(dist.get_backend()) else "cpu"
            return cls(dist.get_rank(), world, shard and world > 1, device_type)
        return cls()

    @property
    def main(self) -> bool:
        """Rank 0: it writes metrics and checkpoints and reports through the hooks."""
        return self.rank == 0

    def share(self, micro_batches: range) -> list[int]:
        """This rank's micro-batches of one step."""
        return [mb for i, mb in enumerate(micro_batches) if i % self.world == self.rank]

    def passes(self, batches: int) -> list[tuple[int, bool]]:
        """This rank's forward passes over `batches` (a step's micro-batches, the reference pass's
        chunks): (index, kept) for its share, then, sharded, passes over batch 0 whose results it
        drops (kept False) until it runs as many as the busiest rank: every pass holds collectives."""
        mine = [(i, True) for i in self.share(range(batches))]
        if self.sharded:
            mine += [(0, False)] * (-(-batches // self.world) - len(mine))
        return mine

    def device(self, model: torch.nn.Module) -> torch.device:
        """Where `model` trains: sharded, the device sharding moves it to (it may sit in host memory
        until then); else where it is."""
        if self.sharded and self.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu") if self.sharded else next(model.parameters()).device

    def shard(self, model: torch.nn.Module) -> None:
        """FSDP2 over the ranks, in place: each decoder layer a unit of its own, the rest (embeddings,
        head) the root's. Gradients are summed over the ranks, not averaged: the step's normaliser
        is already global. Rank 0's weights and buffers become every rank's: the other ranks may
        hold their model on the meta device (`launch.py` builds it so, to keep one copy of the
        weights in host memory) and get their shards from rank 0, a tensor at a time."""
        if not self.sharded:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        whole = model.state_dict() if self.main else {}  # keeps rank 0's copy while its units move
        mesh = init_device_mesh(self.device_type, (self.world,))
        parts = decoder_and_head(model)
        layers = list(getattr(parts[0], "layers", [])) if parts is not None else []
        if not layers:
            raise ValueError("sharded training needs a decoder with its layers in `.layers`")
        for unit in (*layers, model):
            fully_shard(unit, mesh=mesh)  # moves a weight in host memory to the mesh's device
            unit.set_gradient_divide_factor(1.0)  # type: ignore[operator]
            unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]  (gloo has no PREMUL_SUM)
        if not self.main:
            model.to_empty(device=self.device(model))
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, whole, options=options)
        for buffer in model.buffers():  # non-persistent ones (rotary frequencies) are in no state dict
            dist.broadcast(buffer, src=0)

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with whole tensors. Sharded, every rank must call it (it gathers),
        and only rank 0 gets them, in host memory; the others get an empty dict. A tensor under two
        names (a head tied to the embedding) stays one tensor: save_pretrained writes it once, as it
        does for an unsharded model."""
        state = model.state_dict()
        if not self.sharded:
            return state
        param = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
        whole: dict[int, torch.Tensor] = {}
        out = {}
        for key, value in state.items():
            ident = param.get(key, id(value))
            if ident not in whole:
                whole[ident] = self._to_main(value)
            out[key] = whole[ident]
        return out if self.main else {}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimiser's state dict as an unsharded run's; sharded, as `full_state`: every rank
        calls it, rank 0 gets it in host memory, the others an empty dict."""
        state = optimizer.state_dict()
        if not self.sharded:
            return state
        whole = {i: {k: self._to_main(v) for k, v in entry.items()} for i, entry in state["state"].items()}
        return {**state, "state": whole} if self.main else {}

    def _to_main(self, value: Any) -> Any:
        """A DTensor gathered whole (a collective) and copied to rank 0's host memory, one tensor at
        a time, so that no GPU holds the whole state; None on the other ranks."""
        value = _whole(value)
        if not self.main:
            return None
        return value.detach().cpu() if isinstance(value, torch.Tensor) else value

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
        total: dict[str, tuple[float, int]] = {}
        for part in self.gather(tallies):
            add_tallies(total, part)
        return total

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, by rank, on every rank."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def same_start(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's initial trainable weights on every rank (LoRA's initialisation is seeded
        alike on every rank; this makes it so whatever the RNG did). Sharded, `shard` does it."""
        if self.world > 1 and not self.sharded:
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
