"""One rank of the data-parallel training test (tests/workers/test_distributed.py), as torchrun
starts it: `python -m torch.distributed.run --standalone --nproc_per_node=N tests/workers/ranks_train.py
OUT_DIR METHOD [fsdp]`, METHOD lora, full or dpo (LoRA under sft+dpo, on preference pairs and a
replayed example). The same setup in one process is `run(OUT_DIR, METHOD)`; `fsdp` shards the
model over the ranks, and is run on a model whose head is tied to its embedding (as SmolLM2's is),
which sharding must keep tied."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from gatt.masks import TokenizedExample
from tests.workers.test_training import handmade, tiny_llama
from workers.engine.config import TrainConfig
from workers.engine.distributed import Ranks
from workers.engine.dpo import PreferencePair
from workers.engine.training import TrainResult, train

EXAMPLES = [handmade(14 + 5 * i, [(4, 9 + i)], seed=i) for i in range(9)]


def _rejected(chosen: TokenizedExample, seed: int) -> TokenizedExample:
    """Another reply in the chosen one's place, after the same context."""
    other = handmade(len(chosen.input_ids), list(chosen.spans), seed)
    ((start, end),) = chosen.spans
    ids = chosen.input_ids[:start] + other.input_ids[start:end] + chosen.input_ids[end:]
    labels = chosen.labels[:start] + other.labels[start:end] + chosen.labels[end:]
    return TokenizedExample(ids, labels, chosen.spans)


PAIRS = [PreferencePair(e, _rejected(e, 100 + i)) for i, e in enumerate(EXAMPLES[:8])]
PAIRS.append(PreferencePair(EXAMPLES[8], None))  # a replayed dialogue: cross-entropy only


def config(method: str) -> TrainConfig:
    # Three micro-batches per step over two ranks: rank 0 takes two, rank 1 one; the examples'
    # lengths differ, so micro-batches pad and the step's trained tokens are uneven too.
    return TrainConfig(
        method="lora" if method == "dpo" else method,
        objective="sft+dpo" if method == "dpo" else "sft",
        micro_batch_size=2,
        grad_accum=3,
        epochs=2,
        learning_rate=1e-2,
        checkpoint_every=2,
        keep_checkpoints=10,
        merge_on_save=method != "full",  # merged from a sharded run's gathered weights too
        seed=3,
    )


def run(out: Path, method: str, *, tie: bool = False, shard: bool = False) -> TrainResult:
    examples = PAIRS if method == "dpo" else EXAMPLES
    return train(tiny_llama(tie=tie), None, examples, config(method), out, shard=shard)


def run_rank(out: Path, method: str, *, shard: bool) -> TrainResult:
    """`run` as one rank: sharded, the ranks other than 0 build the model on the meta device, as
    `launch.py` does, so their weights can only come from rank 0."""
    if not shard or dist.get_rank() == 0:
        return run(out, method, tie=shard, shard=shard)
    with torch.device("meta"):
        model = tiny_llama(tie=True)
    examples = PAIRS if method == "dpo" else EXAMPLES
    return train(model, None, examples, config(method), out, shard=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        shard = sys.argv[3:] == ["fsdp"]
        result = run_rank(Path(sys.argv[1]), sys.argv[2], shard=shard)
        # What this rank holds: the test checks that sharding shared the weights out.
        local = sum(
            p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in result.model.parameters()
        )
        # And what a checkpoint's gathering leaves it: sharded, only rank 0 keeps the whole tensors.
        gathered = Ranks.current(shard=shard).full_state(result.model)
        held = {
            "sharded": isinstance(result.model, FSDPModule),
            "parameters": local,
            "gathered": len(gathered),
        }
        (Path(sys.argv[1]) / f"rank-{dist.get_rank()}.json").write_text(json.dumps(held))
        dist.barrier()  # as launch.py's ranks: none leaves while another is still in a collective
    finally:
        dist.destroy_process_group()
