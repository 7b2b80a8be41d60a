"""The README's main job, as an API client would run it, on the Python client (`gatt_client`):
upload the bundled corpus, create a GAtt job with the default instruction set, follow it to the
end, print its metrics and checkpoint.

    python scripts/main_job.py --url http://127.0.0.1:8000 --key gatt_... [--config examples/job-request.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gatt_client import ApiError, Client
from gatt_client.errors import NotFound
from gatt_client.progress import follow

ROOT = Path(__file__).resolve().parents[1]
# Below this many runs per turn, a 95% interval is wider than any effect the demo could show.
MIN_RUNS_PER_TURN = 32
# The headline of docs/experiment.md, printed where the demo is too small to show anything itself.
EXPERIMENT_RESULT = """\
  - held-out emoji instructions given once, turns 2-8: kept in 0.08 of the turns before GAtt and
    0.73-0.80 after (the experiment's recipe, DPO against the model's own spam on dialogues 6
    turns long, three seeds; every turn significant), about 9-17 times the base model's rate
    with the instruction repeated every turn;
  - with the corpus's replies as history (memory, not imitation): 0.00 before, 0.60-0.77 after,
    every turn significant;
  - usefulness: told once, it copies earlier replies in 2-9% and echoes the question in 1-5% of
    its replies (the base model with no instruction: 9% and 3%), and 0.79-0.89 of them are
    relevant (0.79) (docs/experiment.md)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True)
    parser.add_argument("--corpus", default=str(ROOT / "examples" / "dialogues.jsonl"))
    parser.add_argument("--config", default=str(ROOT / "examples" / "job-request.json"))
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()

    client = Client(args.url, args.key)
    corpus = client.corpora.upload(args.corpus)
    print(f"corpus {corpus.id}: {corpus.stats.dialogues} dialogues, {corpus.stats.user_turns} user turns")

    body = json.loads(Path(args.config).read_text())
    try:
        job = client.jobs.create(
            corpus.id,
            instruction_set_id=body.get("instruction_set_id"),
            config=body.get("config"),
            model=body.get("model"),
            idempotency_key=f"main-{corpus.id}",
        )
    except ApiError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"job {job.id} {job.status.value} (default instruction set, model {job.model})")

    started = time.monotonic()
    job = follow(client, str(job.id), results=False, timeout=args.timeout)  # events and stage progress
    print(f"\njob {job.id} {job.status.value} after {time.monotonic() - started:.0f}s")
    if job.status.value != "succeeded":
        print(json.dumps(job.error.model_dump(mode="json") if job.error else None, indent=2))
        return 1
    print("\nstep  loss     lr        grad_norm  trained_tokens")
    for metric in client.jobs.metrics(job.id):
        v = metric.values
        print(
            f"{metric.step:>4}  {v['loss']:.4f}  {v['learning_rate']:.2e}  {v['grad_norm']:9.3f}  {int(v['trained_tokens']):>14}"
        )
    turns = [t for s in client.jobs.samples(job.id) for t in s.turns]
    accepted = sum(t.chosen is not None for t in turns)
    print(f"\nsampled turns: {len(turns)}, accepted (best of K reached min_reward): {accepted}")
    try:
        report = client.jobs.evaluation(job.id)
    except NotFound:
        report = None
    if report is not None:
        runs = min((row.n for cond in report.base.conditions.values() for row in cond.turns), default=0)
        print("\nadherence on held-out dialogues, by turn (rate [95% CI]); base model vs after GAtt:")
        print(report.table)
        if runs < MIN_RUNS_PER_TURN:
            print(
                f"\nThis demo evaluates {runs} runs per turn: too few to measure GAtt's effect (at least "
                f"{MIN_RUNS_PER_TURN} are needed), and its 8 training steps are too few to have one. Read "
                "the table as a check that the stage runs, not as a result. docs/experiment.md is the "
                "experiment sized to measure it. What it found:\n" + EXPERIMENT_RESULT
            )
        print(f"attention plot: {args.url}/v1/jobs/{job.id}/evaluation/attention.png")
    checkpoints = client.jobs.checkpoints(job.id)
    if checkpoints:
        last = checkpoints[-1]
        print(f"final checkpoint: step {last.step}, download {last.download_url}")
        print(f"  or: gatt checkpoints download {job.id}  (checks every file's sha256)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
