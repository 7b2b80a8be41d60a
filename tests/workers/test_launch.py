"""A job's training stage in torchrun ranks (`workers/engine/launch.py`), on the CPU over gloo as
a GPU worker runs it over NCCL: the same curve, hooks and trained model as in the worker's own
process, and a stop ends the process group."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.threads import one_torch_thread
from tests.workers.test_training import Recorder
from workers.engine.config import parse_config
from workers.engine.hooks import Hooks, Stopped
from workers.engine.launch import shards
from workers.engine.pipeline import run_job

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]


def _config(out: Path, **training) -> dict:
    return {
        "model": "default",
        "output_dir": str(out),
        "device": "cpu",
        "seed": 0,
        "data": {"corpus": str(ROOT / "examples" / "dialogues.jsonl"), "max_dialogues": 4, "max_turns": 2},
        "sampling": {"k": 2, "max_new_tokens": 12, "batch_prompts": 4},
        "reward": {"min_reward": 0.0},
        "training": {
            "micro_batch_size": 1,
            "grad_accum": 3,
            "max_steps": 2,
            "learning_rate": 1e-2,
            **training,
        },
        "rounds": {"count": 2},
        "evaluation": {"enabled": False},
    }


def _candidates(out: Path) -> list[list[str]]:
    """Every candidate round 2 sampled, per turn."""
    rows = [json.loads(line) for line in (out / "rounds" / "2" / "samples.jsonl").read_text().splitlines()]
    return [[c["raw"] for c in turn["candidates"]] for row in rows for turn in row["turns"]]


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> tuple[Path, Recorder]:
    """The 2-round job trained in the worker's own process."""
    out, recorder = tmp_path_factory.mktemp("alone"), Recorder()
    # One thread, as each rank has on two cores: sums over two threads' partial results come out
    # in another order, and four steps of Adam at this learning rate grow that past the tolerance.
    with one_torch_thread():
        run_job(parse_config(_config(out)), recorder.hooks())
    return out, recorder


# fsdp: SmolLM2's head is tied to its embedding; sharded, both stay one weight.
@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_two_ranks_train_each_round_as_the_worker_would_and_the_next_round_samples_their_model(
    tmp_path, alone, sharding
):
    (alone_out, alone), ranks = alone, Recorder()
    run_job(
        parse_config(_config(tmp_path / "ranks")), ranks.hooks(), train_processes=2, train_sharding=sharding
    )

    # Every metrics row and checkpoint reached the job's hooks, steps numbered across rounds.
    assert [step for step, _ in ranks.metrics] == [step for step, _ in alone.metrics] == [1, 2, 3, 4]
    for (_, got), (_, want) in zip(ranks.metrics, alone.metrics, strict=True):
        # Sums in another order differ in the last bits; Adam's update, divided by the root of
        # each gradient's square, lets four steps at this learning rate grow that to about 1e-5.
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["trained_tokens"] == want["trained_tokens"]
    assert [c[0] for c in ranks.checkpoints] == [c[0] for c in alone.checkpoints]
    assert all(Path(path).is_dir() for _, path, _ in ranks.checkpoints)
    assert "resumed" not in ranks.kinds()
    # Round 2 sampled with the model the ranks trained, loaded back into the worker's copy: its
    # replies are those of the model trained in the worker's own process.
    assert _candidates(tmp_path / "ranks") == _candidates(alone_out)
    assert json.loads((tmp_path / "ranks" / "train" / "ranks.json").read_text())["shard"] == (
        sharding == "fsdp"
    )


def test_sharding_is_chosen_by_the_setting_and_auto_never_shards_on_the_cpu():
    loaded = SimpleNamespace(device=torch.device("cpu"), model=torch.nn.Linear(4, 4))
    assert [shards(s, loaded, "full") for s in ("auto", "replicate", "fsdp")] == [False, False, True]
    with pytest.raises(ValueError, match="not one of auto, replicate, fsdp"):
        shards("zero3", loaded, "full")


def test_a_stop_ends_the_ranks_and_a_rerun_resumes_from_their_checkpoint(tmp_path):
    raw = _config(tmp_path / "job", max_steps=6, checkpoint_every=1)
    raw["rounds"] = {"count": 1}
    seen: list[int] = []

    def stop_after_two_steps() -> bool:
        return len(seen) >= 2

    hooks = Hooks(metrics=lambda step, row: seen.append(step), should_stop=stop_after_two_steps)
    with pytest.raises(Stopped):
        run_job(parse_config(raw), hooks, train_processes=2)
    log = (tmp_path / "job" / "train" / "ranks.log").read_text()
    assert not (tmp_path / "job" / "train" / "ranks-result.json").exists(), log[-2000:]

    resumed = Recorder()
    result = run_job(parse_config(raw), resumed.hooks(), train_processes=2)
    assert "resumed" in resumed.kinds()
    assert [step for step, _ in resumed.metrics][-1] == 6 and resumed.metrics[0][0] > 1
    assert result.final_checkpoint and result.final_checkpoint.name == "step-000006"


def test_a_rank_exits_when_the_worker_that_started_it_is_gone(tmp_path):
    """The worker dies (the intermediate process here exits at once): its rank follows."""
    import os
    import subprocess
    import sys
    import time

    rank = (
        "import os, time; from workers.engine.launch import _die_with; "
        "_die_with(int(os.environ['OWNER'])); time.sleep(120)"
    )
    worker = (
        "import os, subprocess, sys; "
        f"p = subprocess.Popen([sys.executable, '-c', {rank!r}], env={{**os.environ, 'OWNER': str(os.getpid())}}, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
        "print(p.pid, flush=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", worker], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    pytest.fail("the rank outlived its worker by 30 s")
