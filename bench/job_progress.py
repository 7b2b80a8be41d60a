"""How well the whole-job progress and ETA (workers/engine/progress.py) tell a job's end, and what
one trained example costs against one generated token (its `TRAIN_EXAMPLE_TOKENS`).

    OMP_NUM_THREADS=2 .venv/bin/python bench/job_progress.py [CONFIG] [--set key=value ...]

Runs CONFIG (default examples/job.yaml, the README's main job) in-process on the embedded model,
into a fresh temporary output_dir, with hooks that feed `JobProgress` as the worker does, planned
from the same bound the API stores on the job (`workers.engine.cost.estimate` on the corpus's
counts). It prints:

- each phase's wall time, its weight in the plan, and the measured cost of its units: seconds
  per bound generated token for sampling and the evaluations, seconds per example-epoch for
  training, and their ratios to sampling's (the measured `TRAIN_EXAMPLE_TOKENS` and
  `EVAL_TOKEN_COST`; an evaluation's time includes its attention pass and validation loss);
- the ETA's error at 10, 25, 50 and 75% of the job's wall time: (predicted - actual time left) /
  actual time left, from the last ETA reported by then;
- the shown progress at the same moments, against the share of the wall time gone.
Run it alone on the machine: timings of two torch processes on 2 cores mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.engine.config import load_config, parse_config  # noqa: E402
from workers.engine.cost import estimate  # noqa: E402
from workers.engine.hooks import Hooks  # noqa: E402
from workers.engine.progress import EVAL_TOKEN_COST, TRAIN_EXAMPLE_TOKENS, JobProgress, plan  # noqa: E402
from workers.run import _apply_override  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "examples" / "job.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from workers.engine.pipeline import load_dialogues, run_job

    with tempfile.TemporaryDirectory() as tmp:
        raw = load_config(args.config).to_json()
        for assignment in [*args.set, f"output_dir={tmp}/job"]:
            _apply_override(raw, assignment)
        config = parse_config(raw)
        dialogues = load_dialogues(config)
        cost = estimate(config, len(dialogues), sum(len(d.turns) for d in dialogues)).to_json()
        tracker = JobProgress(config, plan(config, cost))
        started = time.monotonic()
        trace: list[tuple[float, float, float | None]] = []  # (seconds, fraction, eta)
        stages: list[tuple[str, float]] = []
        steps = {"total": 0}

        def stage(s: Any) -> None:
            stages.append((s.value, time.monotonic() - started))
            tracker.stage(s.value)

        def progress(name: str, done: int, total: int) -> None:
            tracker.report(name, done, total)
            if name == "train":
                steps["total"] = total
            trace.append((time.monotonic() - started, tracker.fraction, tracker.eta_s))

        result = run_job(config, Hooks(stage=stage, progress=progress))
        wall = time.monotonic() - started

    durations = {}
    for (name, t0), (_, t1) in zip(stages, stages[1:], strict=False):
        key = name if name not in durations else f"{name} (after training)"
        durations[key] = t1 - t0
    t = config.training
    example_epochs = steps["total"] * t.micro_batch_size * t.grad_accum
    per_token = durations["sample"] / cost["sampling_tokens"]
    per_example = durations["train"] / example_epochs
    evaluations = [v for k, v in durations.items() if k.startswith("evaluate")]
    per_eval_token = sum(evaluations) / cost["evaluation_tokens"] if evaluations else None
    report = {
        "config": args.config,
        "overrides": args.set,
        "wall_s": round(wall, 1),
        "estimate": cost,
        "stages_s": {k: round(v, 1) for k, v in durations.items()},
        "plan": [(p.stage, round(p.units)) for p in tracker.phases],
        "sample_s_per_bound_token": per_token,
        "train_s_per_example_epoch": per_example,
        "train_example_tokens_measured": per_example / per_token,
        "train_example_tokens_used": TRAIN_EXAMPLE_TOKENS,
        "eval_token_cost_measured": per_eval_token / per_token if per_eval_token else None,
        "eval_token_cost_used": EVAL_TOKEN_COST,
        "examples": result.examples,
        "steps": steps["total"],
        "at": {},
    }
    for share in (0.10, 0.25, 0.50, 0.75):
        moment = share * wall
        seen = [row for row in trace if row[0] <= moment]
        if not seen:
            continue
        _, fraction, _ = seen[-1]
        etas = [(s, e) for s, _, e in seen if e is not None]
        error = None
        if etas:
            s, eta = etas[-1]
            error = round((eta - (wall - s)) / (wall - s), 3)
        report["at"][f"{share:.0%}"] = {"shown_progress": round(fraction, 3), "eta_error": error}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
