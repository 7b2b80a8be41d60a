"""Data-parallel training (`workers/engine/distributed.py`): two ranks over gloo, started by
torchrun as a GPU host would start them over NCCL, follow the one-process loss curve at the same
global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.threads import one_torch_thread
from tests.workers import ranks_train

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_ranks_over_gloo_follow_the_one_process_curve(tmp_path, method):
    with one_torch_thread():
        alone = ranks_train.run(tmp_path / "alone", method)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "tests" / "workers" / "ranks_train.py"), str(tmp_path / "ranks"), method,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    rows = [json.loads(line) for line in (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [row["step"] for row in alone.metrics]  # one writer
    assert len(rows) >= 3
    for got, want in zip(rows, alone.metrics, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert (got["trained_tokens"], got["tokens"]) == (want["trained_tokens"], want["tokens"])
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trains: equal curves of a frozen model prove little

    # The last checkpoint holds the same weights.
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    final = alone.checkpoint.name
    theirs = load_file(tmp_path / "ranks" / "checkpoints" / final / name)
    ours = load_file(alone.checkpoint / name)
    assert theirs.keys() == ours.keys()
    for key, tensor in ours.items():
        assert theirs[key].allclose(tensor, rtol=1e-4, atol=1e-6), key
