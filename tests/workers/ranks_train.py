"""One rank of the data-parallel training test (tests/workers/test_distributed.py), as torchrun
starts it: `python -m torch.distributed.run --standalone --nproc_per_node=N tests/workers/ranks_train.py
OUT_DIR METHOD [fsdp]`. The same setup in one process is `run(OUT_DIR, METHOD)`; `fsdp` shards the
model over the ranks, and is run on a model whose head is tied to its embedding (as SmolLM2's is),
which sharding must keep tied."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.workers.test_training import handmade, tiny_llama
from workers.engine.config import TrainConfig
from workers.engine.training import TrainResult, train

EXAMPLES = [handmade(14 + 5 * i, [(4, 9 + i)], seed=i) for i in range(9)]


def config(method: str) -> TrainConfig:
    # Three micro-batches per step over two ranks: rank 0 takes two, rank 1 one; the examples'
    # lengths differ, so micro-batches pad and the step's trained tokens are uneven too.
    return TrainConfig(
        method=method,
        micro_batch_size=2,
        grad_accum=3,
        epochs=2,
        learning_rate=1e-2,
        checkpoint_every=2,
        keep_checkpoints=10,
        merge_on_save=method == "lora",  # merged from a sharded run's gathered weights too
        seed=3,
    )


def run(out: Path, method: str, *, tie: bool = False, shard: bool = False) -> TrainResult:
    return train(tiny_llama(tie=tie), None, EXAMPLES, config(method), out, shard=shard)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        shard = sys.argv[3:] == ["fsdp"]
        run(Path(sys.argv[1]), sys.argv[2], tie=shard, shard=shard)
    finally:
        dist.destroy_process_group()
