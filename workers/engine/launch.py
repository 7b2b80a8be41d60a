"""A job's training stage over several processes: `torchrun` children, one per GPU.

The worker (`GATT_TRAIN_PROCESSES` > 1) hands `train()` to `torchrun --standalone
--nproc_per_node=N`, started as a process group of its own; each rank loads the round's starting
model itself and trains its share of every step (`distributed.py`: NCCL on GPUs, gloo on CPUs).
The worker stays the job's owner: it keeps its lease and heartbeat, and forwards rank 0's hook
calls, which rank 0 writes one JSON line each to `ranks-hooks.jsonl`, to the job's own hooks, a
poll's worth at a time (every second): first one `fence` if rank 0 fenced (a job another worker
took over stops here), then events, metrics, checkpoints and progress in order, then one
`should_stop` if rank 0 asked. Liveness is the ranks' progress, as in the worker's own process: a
rank stuck where it asks nothing leaves the job's hooks silent, and the heartbeat's stall limit
ends the job. A fence or a stop ends the process group (SIGTERM, then SIGKILL); so does the
worker's death, which each rank watches for. The fence is late by up to a poll: rank 0 has already
written what it fenced, so a worker that lost its lease stops its ranks within a second of
learning it, not before their next write.

Sharding (`GATT_TRAIN_SHARDING`): `replicate` keeps a whole copy of the model on each rank, `fsdp`
shards it with FSDP2 (`distributed.py`), `auto` shards on GPUs when the training state (the
weights; for full fine-tuning also their gradients and AdamW's two moments) would take more than
half of one GPU's memory, the other half left to activations.

A crashed attempt resumes as any other: the ranks continue from the newest checkpoint. The worker
moves its own copy of the model off the GPU while the ranks train, and afterwards loads the final
checkpoint's weights into it: the next round and the evaluation sample the trained model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gatt.masks import TokenizedExample
from workers.engine.config import JobConfig
from workers.engine.dpo import PreferencePair
from workers.engine.hooks import Hooks, Stopped
from workers.engine.models import LoadedModel, load_model
from workers.engine.training import TrainResult, train, trained_model

SPEC = "ranks.json"  # what each rank needs to start
EXAMPLES = "ranks-examples.jsonl"
HOOKS = "ranks-hooks.jsonl"  # rank 0's hook calls, for the worker to forward
RESULT = "ranks-result.json"
LOG = "ranks.log"
POLL_S = 1.0
SHARDINGS = ("auto", "replicate", "fsdp")
FORWARDED = ("event", "metrics", "checkpoint", "progress")  # in order; fence and should_stop: once a poll
OWNER_POLL_S = 2.0


class RanksFailed(RuntimeError):
    """The training processes exited with an error; the message ends with their log's tail."""


def train_ranks(
    config: JobConfig,
    loaded: LoadedModel,
    examples: Sequence[TokenizedExample | PreferencePair],
    out_dir: Path,
    *,
    processes: int,
    sharding: str = "auto",
    start: str,
    hooks: Hooks,
    base_model: str,
    lineage: dict[str, Any] | None,
    allowed_roots: list[Path] | None,
) -> TrainResult:
    """`train()` in `processes` ranks; `start` is the model the round starts from (the job's model,
    or the round before's final checkpoint), loaded by each rank as `load_model` would."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hooks.fence()
    # A later round starts from the round before's checkpoint, in the job's own folder.
    roots = None if allowed_roots is None else [*allowed_roots, Path(start)]
    spec = {
        "start": start,
        # An adapter's base: a parent's full checkpoint (the job's model) or the job's base model.
        "base": config.model if (config.lineage or {}).get("adapter_base") else config.base_model,
        "method": config.training.method,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "allowed_roots": None if roots is None else [str(p) for p in roots],
        "training": config.training.to_json(),
        "base_model": base_model,
        "lineage": lineage,
        "shard": shards(sharding, loaded, config.training.method),
    }
    _write(out_dir / SPEC, json.dumps(spec))
    _write(out_dir / EXAMPLES, "".join(json.dumps(_example_json(e)) + "\n" for e in examples))
    (out_dir / HOOKS).write_text("")
    (out_dir / RESULT).unlink(missing_ok=True)

    on_gpu = loaded.device.type == "cuda"
    if on_gpu:  # the ranks need the GPU's memory; this copy waits on the CPU
        loaded.model.to("cpu")
        torch.cuda.empty_cache()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
        "-m", "workers.engine.launch", str(out_dir),
    ]  # fmt: skip
    env = {
        **os.environ,
        "GATT_RANKS_BACKEND": "nccl" if on_gpu else "gloo",
        "GATT_RANKS_OWNER": str(os.getpid()),
    }
    if not on_gpu:  # the worker's cores shared out, not each rank's torch taking them all
        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // processes))
    with open(out_dir / LOG, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    forwarded = 0
    try:
        while True:
            code = process.poll()
            forwarded = _forward(out_dir / HOOKS, forwarded, hooks)
            if code is not None:
                break
            time.sleep(POLL_S)
    finally:
        _stop(process)
    if code != 0:
        tail = (out_dir / LOG).read_text(errors="replace")[-3000:]
        if "OutOfMemoryError" in tail or "out of memory" in tail:
            raise torch.OutOfMemoryError(f"a training process ran out of memory:\n{tail}")
        raise RanksFailed(f"the training processes exited with {code}:\n{tail}")

    result = json.loads((out_dir / RESULT).read_text())
    checkpoint = Path(result["checkpoint"])
    model = trained_model(loaded.model, config.training, checkpoint, base_model)
    if on_gpu:
        model.to(loaded.device)
    return TrainResult(
        steps=result["steps"],
        checkpoint=checkpoint,
        metrics=result["metrics"],
        trained_tokens=result["trained_tokens"],
        dropped_examples=result["dropped_examples"],
        resumed_from=result["resumed_from"],
        model=model,
    )


def shards(sharding: str, loaded: LoadedModel, method: str) -> bool:
    """Whether the ranks shard the model (see the module's docstring)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding {sharding!r} is not one of {', '.join(SHARDINGS)}")
    if sharding != "auto":
        return sharding == "fsdp"
    if loaded.device.type != "cuda":
        return False
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    state = weights * (4 if method == "full" else 1)  # + gradients and two moments, in the weights' dtype
    return state > torch.cuda.get_device_properties(loaded.device).total_memory / 2


def _forward(path: Path, done: int, hooks: Hooks) -> int:
    """Forward the hook calls after the first `done` complete lines; returns how many are done.
    Raises `Stopped` where the job's fence or should_stop says so."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # a line still being written waits
    calls = [json.loads(line) for line in lines[done:]]
    asked = {call["hook"] for call in calls}
    if "fence" in asked:
        hooks.fence()
    for call in calls:
        if call["hook"] in FORWARDED:
            getattr(hooks, call["hook"])(*call["args"])
    if "should_stop" in asked and hooks.should_stop():
        raise Stopped("stopped while the training processes ran; last checkpoint kept")
    return len(lines)


def _stop(process: subprocess.Popen) -> None:
    """End the process group if it still runs: SIGTERM, then SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _example_json(example: TokenizedExample | PreferencePair) -> dict[str, Any]:
    if isinstance(example, PreferencePair):
        return {
            "chosen": _example_json(example.chosen),
            "rejected": None if example.rejected is None else _example_json(example.rejected),
        }
    return {"input_ids": example.input_ids, "labels": example.labels, "spans": example.spans}


def _example(row: dict[str, Any]) -> TokenizedExample | PreferencePair:
    if "chosen" in row:
        chosen, rejected = _example(row["chosen"]), row["rejected"] and _example(row["rejected"])
        assert isinstance(chosen, TokenizedExample) and not isinstance(rejected, PreferencePair)
        return PreferencePair(chosen, rejected or None)
    return TokenizedExample(
        tuple(row["input_ids"]), tuple(row["labels"]), tuple(tuple(span) for span in row["spans"])
    )


# --- one rank ----------------------------------------------------------------------------------


def _rank_hooks(path: Path) -> Hooks:
    """Rank 0's hooks: each call one JSON line, flushed, for the worker to forward."""
    file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the process's life)

    def record(hook: str):
        def call(*args: Any) -> None:
            file.write(json.dumps({"hook": hook, "args": args}) + "\n")
            file.flush()

        return call

    # should_stop answers no (None): the worker answers, and ends the ranks if it is yes.
    return Hooks(**{hook: record(hook) for hook in (*FORWARDED, "fence", "should_stop")})


def _die_with(owner: int) -> None:
    """Exit when the worker process `owner` is gone: ranks never outlive the job's owner."""

    def watch() -> None:
        while True:
            time.sleep(OWNER_POLL_S)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass  # a process of another user: alive

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()


def _rank_main(out_dir: Path) -> None:
    import torch.distributed as dist

    from workers.engine.config import TrainConfig

    if "GATT_RANKS_OWNER" in os.environ:
        _die_with(int(os.environ["GATT_RANKS_OWNER"]))
    spec = json.loads((out_dir / SPEC).read_text())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = os.environ.get("GATT_RANKS_BACKEND", "gloo")
    # Sharded, rank 0 loads the weights into host memory, the other ranks build the model on the
    # meta device, and sharding hands each rank its part of them on its GPU (`Ranks.shard`).
    device = f"cuda:{local}" if backend == "nccl" and not spec["shard"] else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"  # tensors still in host memory (before sharding) go by gloo
    dist.init_process_group(backend)
    try:
        roots = None if spec["allowed_roots"] is None else [Path(p) for p in spec["allowed_roots"]]
        loaded = load_model(
            spec["start"],
            device=device,
            dtype=spec["dtype"],
            allowed_roots=roots,
            base=spec["base"],
            weights=not spec["shard"] or dist.get_rank() == 0,
        )
        model = loaded.model
        if hasattr(model, "peft_config") and spec["method"] == "full":
            model = model.merge_and_unload()  # as the job's own model is (pipeline._job_model)
        with open(out_dir / EXAMPLES, encoding="utf-8") as f:
            examples = [_example(json.loads(line)) for line in f]
        main = dist.get_rank() == 0
        result = train(
            model,
            loaded.tokenizer,
            examples,
            TrainConfig.model_validate(spec["training"]),
            out_dir,
            hooks=_rank_hooks(out_dir / HOOKS) if main else Hooks(),
            base_model=spec["base_model"],
            lineage=spec["lineage"],
            shard=spec["shard"],
        )
        if main:
            fields = ("steps", "metrics", "trained_tokens", "dropped_examples", "resumed_from")
            _write(
                out_dir / RESULT,
                json.dumps({"checkpoint": str(result.checkpoint), **{k: getattr(result, k) for k in fields}}),
            )
        # Every rank done with every collective before any tears its connections down (a gloo rank
        # once aborted at the end of a test run in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
