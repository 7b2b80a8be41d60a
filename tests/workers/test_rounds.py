"""Multi-round GAtt on the embedded SmolLM2: round 2 samples with the model round 1 trained, the
service sees steps numbered across rounds, and a crash inside round 2 resumes there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatt.instructions import Instruction
from workers.engine.config import parse_config
from workers.engine.hooks import Hooks
from workers.engine.models import load_model
from workers.engine.pipeline import load_dialogues, run_job, split_heldout
from workers.engine.rounds import ROUNDS_FILE
from workers.engine.sample_stage import sample_dialogues

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _config(out: Path, **rounds):
    return parse_config(
        {
            "output_dir": str(out),
            "seed": 5,
            "data": {
                "corpus": str(ROOT / "examples" / "dialogues.jsonl"),
                "max_dialogues": 3,
                "max_turns": 2,
            },
            "sampling": {"k": 3, "max_new_tokens": 24, "batch_prompts": 2},
            "reward": {"min_reward": 0.0},
            "training": {"max_steps": 2, "micro_batch_size": 2, "checkpoint_every": 1, "learning_rate": 5e-3},
            "rounds": {"count": 2, **rounds},
        }
    )


class Seen:
    def __init__(self, crash_at: int | None = None) -> None:
        self.metrics: list[int] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.crash_at = crash_at

    def _metrics(self, step: int, row: dict) -> None:
        self.metrics.append(step)
        if step == self.crash_at:
            raise RuntimeError("simulated crash")

    def hooks(self) -> Hooks:
        return Hooks(
            metrics=self._metrics,
            checkpoint=lambda step, path, manifest: self.checkpoints.append((step, path)),
        )


def _candidates(path: Path) -> list[list[str]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [[c["text"] for c in turn["candidates"]] for r in records for turn in r["turns"]]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("rounds") / "job"
    seen = Seen()
    result = run_job(_config(out, instructions="fresh"), seen.hooks(), loaded=load_model("default"))
    return out, result, seen


def test_steps_and_checkpoints_are_numbered_across_rounds(job):
    out, result, seen = job
    assert result.rounds == 2
    assert seen.metrics == [1, 2, 3, 4]
    assert [step for step, _ in seen.checkpoints] == [1, 2, 3, 4]
    # Round 2's run lives in its own folder, its own steps 1 and 2.
    assert Path(seen.checkpoints[2][1]) == out / "rounds" / "2" / "train" / "checkpoints" / "step-000001"
    assert result.final_checkpoint == out / "rounds" / "2" / "train" / "checkpoints" / "step-000002"
    manifest = json.loads((result.final_checkpoint / "manifest.json").read_text())
    assert manifest["lineage"]["round"] == {"round": 2, "first_step": 3}
    reports = json.loads((out / ROUNDS_FILE).read_text())
    assert [(r["round"], r["steps"]) for r in reports] == [
        (1, {"first": 1, "last": 2}),
        (2, {"first": 3, "last": 4}),
    ]
    for report, where in zip(reports, (out, out / "rounds" / "2"), strict=True):
        records = [json.loads(line) for line in (where / "samples.jsonl").read_text().splitlines()]
        # Batches of batch_prompts (2) dialogues: 0 and 1, then 2.
        assert [b["batch"] for b in report["batches"]] == [0, 1]
        first_two = [t["stats"]["max_reward"] for r in records if r["index"] < 2 for t in r["turns"]]
        assert report["batches"][0]["max_reward"] == max(first_two)
        assert report["batches"][0]["turns"] == len(first_two)
        assert report["selection"]["turns"] == sum(len(r["turns"]) for r in records)


def test_round_two_samples_with_the_model_round_one_trained(job, tmp_path):
    out, result, seen = job
    config = _config(out, instructions="fresh")
    dialogues, _ = split_heldout(config, load_dialogues(config))
    own = (out / "rounds" / "2" / "instructions.jsonl").read_text()
    assert own != (out / "instructions.jsonl").read_text()  # "fresh": drawn again for round 2
    instructions = [Instruction.from_json(json.loads(line)) for line in own.splitlines()]
    recorded = _candidates(out / "rounds" / "2" / "samples.jsonl")

    def replay(model: str, name: str) -> list[list[str]]:
        path = tmp_path / name
        sample_dialogues(config, load_model(model), dialogues, instructions, path, Hooks(), round_=2)
        return _candidates(path)

    round_one = seen.checkpoints[1][1]  # the checkpoint of step 2: round 1's last
    assert replay(round_one, "after_round_one.jsonl") == recorded
    # The base model with the same random numbers samples something else: the check can fail.
    assert replay("default", "base.jsonl") != recorded


def test_a_crash_in_round_two_resumes_there(job, tmp_path):
    _, reference, _ = job
    out = tmp_path / "job"
    first = Seen(crash_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_job(_config(out, instructions="fresh"), first.hooks(), loaded=load_model("default"))
    samples = (out / "rounds" / "2" / "samples.jsonl").read_bytes()
    again = Seen()
    result = run_job(_config(out, instructions="fresh"), again.hooks(), loaded=load_model("default"))
    # Round 1 and round 2's first step were kept; only step 4 ran again.
    assert again.metrics == [4]
    assert [step for step, _ in again.checkpoints] == [4]
    assert (out / "rounds" / "2" / "samples.jsonl").read_bytes() == samples
    assert result.final_metrics["loss"] == pytest.approx(reference.final_metrics["loss"], abs=1e-5)


@pytest.mark.parametrize("count", [0, 11])
def test_rounds_are_bounded(tmp_path, count):
    with pytest.raises(ValueError, match="rounds.count"):
        _config(tmp_path, count=count)
