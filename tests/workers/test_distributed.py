"""Data-parallel training (`workers/engine/distributed.py`): two ranks over gloo, started by
torchrun as a GPU host would start them over NCCL, follow the one-process loss curve at the same
global batch, whole copies of the model or sharded by FSDP2, and only rank 0 writes. A sharded
run's checkpoints are an unsharded run's: either resumes the other's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.threads import one_torch_thread
from tests.workers import ranks_train
from workers.engine.dpo import REFERENCE_FILE

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]


def ranks(out: Path, method: str, shard: bool) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "tests" / "workers" / "ranks_train.py"), str(out), method, *(["fsdp"] if shard else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(rows: list[dict], want: list[dict]) -> None:
    assert [row["step"] for row in rows] == [row["step"] for row in want]  # one writer
    for got, expected in zip(rows, want, strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
        assert (got["trained_tokens"], got["tokens"]) == (expected["trained_tokens"], expected["tokens"])


def assert_same_weights(theirs: Path, ours: Path, method: str) -> None:
    names = (
        ["model.safetensors"]
        if method == "full"
        else ["adapter_model.safetensors", "merged/model.safetensors"]
    )
    for name in names:
        got, want = load_file(theirs / name), load_file(ours / name)
        assert got.keys() == want.keys()
        for key, tensor in want.items():
            assert got[key].allclose(tensor, rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize(
    ("method", "shard"),
    [("lora", False), ("full", False), ("dpo", False), ("lora", True), ("full", True), ("dpo", True)],
)
def test_two_ranks_over_gloo_follow_the_one_process_curve(tmp_path, method, shard):
    with one_torch_thread():
        alone = ranks_train.run(tmp_path / "alone", method, tie=shard)
    ranks(tmp_path / "ranks", method, shard)

    rows = metrics(tmp_path / "ranks")
    assert len(rows) >= 3
    assert_same_curve(rows, alone.metrics)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trains: equal curves of a frozen model prove little
    held = [json.loads((tmp_path / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    total = sum(p.numel() for p in alone.model.parameters())
    assert [h["sharded"] for h in held] == [shard, shard]
    keys = len(alone.model.state_dict())
    if shard:  # each holds a part, together the whole model once; only rank 0 gathers it whole
        assert sum(h["parameters"] for h in held) == total and max(h["parameters"] for h in held) < total
        assert [h["gathered"] for h in held] == [keys, 0]
    else:
        assert [h["parameters"] for h in held] == [total, total]
        assert [h["gathered"] for h in held] == [keys, keys]
    # The last checkpoint holds the same weights.
    assert_same_weights(tmp_path / "ranks" / "checkpoints" / alone.checkpoint.name, alone.checkpoint, method)
    if method == "dpo":  # the reference pass, shared out over the ranks, stored every pair's values
        assert_same_reference(tmp_path / "ranks", tmp_path / "alone")


def assert_same_reference(theirs: Path, ours: Path) -> None:
    got, want = (json.loads((out / REFERENCE_FILE).read_text()) for out in (theirs, ours))
    assert got["pairs"] == want["pairs"] and len(got["logps"]) == len(ranks_train.PAIRS)
    for (chosen, rejected), (want_chosen, want_rejected) in zip(got["logps"], want["logps"], strict=True):
        assert chosen == pytest.approx(want_chosen, rel=1e-5)
        assert rejected == (None if want_rejected is None else pytest.approx(want_rejected, rel=1e-5))


def keep_until(src: Path, dst: Path, step: int) -> None:
    """A copy of run `src` as a crash after checkpoint `step` leaves it."""
    shutil.copytree(src, dst)
    for checkpoint in (dst / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix("step-")) > step:
            shutil.rmtree(checkpoint)


def test_a_sharded_run_resumes_a_one_process_checkpoint_and_the_other_way(tmp_path):
    # Full fine-tuning: every weight has optimiser state, the tied head included.
    with one_torch_thread():
        alone = ranks_train.run(tmp_path / "alone", "full", tie=True)
    keep_until(tmp_path / "alone", tmp_path / "sharded-from-alone", 2)
    ranks(tmp_path / "sharded-from-alone", "full", shard=True)
    ranks(tmp_path / "sharded", "full", shard=True)
    keep_until(tmp_path / "sharded", tmp_path / "alone-from-sharded", 2)
    with one_torch_thread():
        resumed = ranks_train.run(tmp_path / "alone-from-sharded", "full", tie=True)
    assert resumed.resumed_from == 2

    final = alone.checkpoint.name
    for out in ("sharded-from-alone", "alone-from-sharded"):
        assert_same_curve(metrics(tmp_path / out), alone.metrics)
        assert_same_weights(tmp_path / out / "checkpoints" / final, alone.checkpoint, "full")


def test_a_sharded_dpo_run_resumes_with_the_reference_its_start_stored(tmp_path):
    ranks(tmp_path / "whole", "dpo", shard=True)
    keep_until(tmp_path / "whole", tmp_path / "resumed", 2)
    kept = tmp_path / "resumed" / "checkpoints" / "step-000002" / "manifest.json"
    written = kept.stat().st_mtime_ns
    ranks(tmp_path / "resumed", "dpo", shard=True)

    assert kept.stat().st_mtime_ns == written  # resumed from it: a fresh start would write it again

    assert_same_curve(metrics(tmp_path / "resumed"), metrics(tmp_path / "whole"))
    final = max((tmp_path / "whole" / "checkpoints").iterdir()).name
    assert_same_weights(
        tmp_path / "resumed" / "checkpoints" / final, tmp_path / "whole" / "checkpoints" / final, "dpo"
    )
