"""The held-out evaluation with and without prefix reuse (workers/engine/prefix_cache.py).

    OMP_NUM_THREADS=2 .venv/bin/python bench/prefix_reuse.py [--dialogues 16] [--conditions none,once]

Runs `evaluate_adherence` twice on the embedded base model with the experiment's protocol
(examples/experiment/run.sh: held-out dialogues of examples/heldout.jsonl, 8 turns, the emoji
family's held-out instructions, 24 new tokens at temperature 0.7, 32 prompts per batch): once with
the loop's prefix store, as a job's evaluation runs, once with a sampler that has none, so every
turn prefills its whole dialogue. Both go chunk by chunk in the same order with the same seed.

Prints each run's wall time, the seconds each turn took (summed over chunks, from the progress
the evaluation reports), the prompt tokens prefilled and taken from the store, each run's share
of "once" turns that adhere, and the share of replies the two runs have in common (float rounding
can change a sampled token; the adherence figures should agree within noise). Relevance scoring
is off: it loads a second model and costs the same in both runs. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gatt.augment import Placement  # noqa: E402
from gatt.instructions import synthesize  # noqa: E402
from workers.engine.evaluation import EVAL_SEED_OFFSET, EvalConfig, evaluate_adherence  # noqa: E402
from workers.engine.hooks import Hooks  # noqa: E402


class TurnClock:
    """Seconds per turn, summed over chunks, from the evaluation's progress: step c * turns + t
    starts turn t of chunk c, and lasts until the next report."""

    def __init__(self, turns: int):
        self.turns = turns
        self.seconds = [0.0] * turns
        self._last: tuple[float, int] | None = None

    def progress(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self._last is not None:
            started, step = self._last
            self.seconds[step % self.turns] += now - started
        self._last = (now, done)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dialogues", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--conditions", default="none,once")
    parser.add_argument("--family", default="emoji")
    args = parser.parse_args()

    import torch

    from workers.engine.models import end_of_turn_ids, load_model
    from workers.engine.prefix_cache import PrefixStore
    from workers.engine.sampling import SharedPrefillSampler
    from workers.evaluate import _instruction_set, _read_corpus

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    heldout = _read_corpus(str(ROOT / "examples" / "heldout.jsonl"))[: args.dialogues]
    path = ROOT / "examples" / "experiment" / f"{args.family}_heldout.json"
    instructions = synthesize(_instruction_set(str(path)), len(heldout), EVAL_SEED_OFFSET)
    config = EvalConfig(
        turns=args.turns,
        dialogues=args.dialogues,
        conditions=tuple(args.conditions.split(",")),
        max_new_tokens=24,
        temperature=0.7,
        batch_prompts=32,
        relevance=False,
    )
    loaded = load_model("default")
    stops = end_of_turn_ids(loaded.tokenizer)
    plain = SharedPrefillSampler(loaded.model, loaded.tokenizer, stops)
    store = PrefixStore()  # what `Rollout.of` gives a job's evaluation, kept here for its counters
    reusing = SharedPrefillSampler(loaded.model, loaded.tokenizer, stops, store)
    print(
        f"torch threads {threads}; {len(heldout)} dialogues x {len(config.conditions)} conditions, {args.turns} turns"
    )

    reports = {}
    for label, sampler in (("full prefill", plain), ("prefix reuse", reusing)):
        clock = TurnClock(args.turns)
        started = time.monotonic()
        report = evaluate_adherence(
            loaded,
            heldout,
            instructions,
            config,
            placement=Placement(),
            hooks=Hooks(progress=clock.progress),
            sampler=sampler,
        )
        wall = time.monotonic() - started
        reports[label] = report
        print(f"\n{label}: {wall:.1f} s")
        print("  seconds per turn: " + " ".join(f"{s:.1f}" for s in clock.seconds))
        for condition, row in report["conditions"].items():
            overall = row["overall"]
            print(f"  {condition}: adhered {overall['adhered']} of {overall['n']} turns")
    print(f"\nprompt tokens with reuse: {store.prefilled} prefilled, {store.reused} from the store")
    ours = [r["replies"] for r in reports["prefix reuse"]["transcripts"]["once"]]
    theirs = [r["replies"] for r in reports["full prefill"]["transcripts"]["once"]]
    same = sum(a == b for x, y in zip(ours, theirs, strict=True) for a, b in zip(x, y, strict=False))
    total = sum(min(len(x), len(y)) for x, y in zip(ours, theirs, strict=True))
    print(f"\nonce replies identical in both runs: {same} of {total}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
