"""Reward by round, the question of the paper's appendix figure (docs/experiment.md, "Rounds"), as
a Markdown table from a rounds job's folder: every round that has samples, finished or not.

    .venv/bin/python examples/experiment/rounds_summary.py var/experiment/rounds-sft+dpo-0/job

From each round's samples.jsonl (round 1 in the job's folder, round r in rounds/<r>/): how far
the dialogues went, the share of sampled turns that kept a reply (the mean best reward: the
verifier is 0 or 1), the share of all candidates that passed, at turn 1 and at later turns
apart (turn 1 is where the instruction is hardest to take up), the mean relevance of the kept
replies, and the pass rate per sampling batch (lowest, median, highest; the appendix plots it by
batch). From rounds.json, where the round has trained: its examples and steps.

    .venv/bin/python examples/experiment/rounds_summary.py <job> --against <other job>

compares two runs over the same dialogues round by round: the share of candidates passing in
each, their difference and its 95% interval, dialogues resampled (paired: a dialogue is drawn
with its candidates of both runs; the turns of one dialogue are not independent).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from gatt.selection import summarize
from workers.engine.eval_stats import bootstrap_interval
from workers.engine.rounds import ROUNDS_FILE, batch_rewards, round_dir
from workers.engine.sample_stage import turn_selection

SAMPLES = "samples.jsonl"


def _records(path: Path) -> list[dict[str, Any]]:
    """The round's finished dialogues; a last line still being written (no newline yet) is left out."""
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def _share(turns: list[dict[str, Any]]) -> str:
    if not turns:
        return "–"
    stats = summarize([turn_selection(t) for t in turns])
    return f"{stats.acceptance_rate:.2f} ({stats.accepted}/{stats.turns}), pass {stats.pass_rate:.2f}"


def _round(job: Path, r: int, batch_prompts: int, trained: dict[int, dict[str, Any]]) -> list[str]:
    records = _records(round_dir(job, r) / SAMPLES)
    turns = [t for record in records for t in record["turns"]]
    stats = summarize([turn_selection(t) for t in turns])
    kept = [t["candidates"][t["chosen"]]["reward"].get("relevance") for t in turns if t["chosen"] is not None]
    kept = [k for k in kept if k is not None]
    rates = [b["pass_rate"] for b in batch_rewards(records, batch_prompts) if b["pass_rate"] is not None]
    report = trained.get(r)
    return [
        f"{r}",
        f"{len(records)} / {stats.turns} ({stats.turns / max(len(records), 1):.2f})",
        f"{stats.mean_best_reward:.2f}",
        f"{stats.pass_rate:.2f}",
        _share([t for t in turns if t["turn"] == 0]),
        _share([t for t in turns if t["turn"] > 0]),
        f"{statistics.mean(kept):.2f}" if kept else "–",
        f"{min(rates):.2f} / {statistics.median(rates):.2f} / {max(rates):.2f}" if rates else "–",
        f"{report['examples']} / {report['steps']['last'] - report['steps']['first'] + 1}"
        if report
        else "not trained",
    ]


def _passing_by_dialogue(job: Path, r: int) -> dict[str, tuple[int, int]]:
    """Round r's candidates passing and candidates sampled, per dialogue."""
    counts: dict[str, tuple[int, int]] = {}
    for record in _records(round_dir(job, r) / SAMPLES):
        selections = [turn_selection(t) for t in record["turns"]]
        passing = sum(round(s.pass_rate * len(s.rewards)) for s in selections)
        counts[record["dialogue_id"]] = (passing, sum(len(s.rewards) for s in selections))
    return counts


def _rate(counts: dict[str, tuple[int, int]], ids: list[str]) -> float:
    return sum(counts[i][0] for i in ids) / max(sum(counts[i][1] for i in ids), 1)


def paired_pass_difference(
    ours: dict[str, tuple[int, int]], theirs: dict[str, tuple[int, int]]
) -> tuple[float, float, list[float]]:
    """Pass rates of the dialogues both runs sampled, ours and theirs, and the 95% percentile
    interval of ours - theirs with dialogues resampled (the evaluation's resamples and seed)."""
    shared = sorted(set(ours) & set(theirs))
    ci = bootstrap_interval(shared, lambda picked: _rate(ours, picked) - _rate(theirs, picked))
    return _rate(ours, shared), _rate(theirs, shared), ci


def _name(path: Path) -> str:
    """A run's folder, not its job/ subfolder."""
    return path.parent.name if path.name == "job" else path.name


def compare(job: Path, other: Path) -> None:
    print(
        f"| round | dialogues in both | passing, {_name(job)} | passing, {_name(other)} | difference [95%] |"
    )
    print("|---|---|---|---|---|")
    for r in itertools.count(1):
        if not ((round_dir(job, r) / SAMPLES).exists() and (round_dir(other, r) / SAMPLES).exists()):
            break
        ours, theirs = _passing_by_dialogue(job, r), _passing_by_dialogue(other, r)
        a, b, (lo, hi) = paired_pass_difference(ours, theirs)
        both = len(set(ours) & set(theirs))
        print(f"| {r} | {both} | {a:.2f} | {b:.2f} | {a - b:+.2f} [{lo:+.2f}, {hi:+.2f}] |")


def main(job: Path) -> None:
    config = json.loads((job / "config.json").read_text(encoding="utf-8"))
    rounds_file = job / ROUNDS_FILE
    trained = {}
    if rounds_file.exists():
        trained = {row["round"]: row for row in json.loads(rounds_file.read_text(encoding="utf-8"))}
    header = [
        "round",
        "dialogues / turns sampled (per dialogue)",
        "turns kept (mean best reward)",
        "candidates passing",
        "turn 1: kept (n), candidates passing",
        "turns 2+: kept (n), candidates passing",
        "relevance of kept replies",
        "pass rate by batch (min / median / max)",
        "examples / steps",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in range(1, config["rounds"]["count"] + 1):
        if (round_dir(job, r) / SAMPLES).exists():
            print("| " + " | ".join(_round(job, r, config["sampling"]["batch_prompts"], trained)) + " |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("job", type=Path, help="a rounds job's folder")
    parser.add_argument("--against", type=Path, help="another run's job folder, over the same dialogues")
    args = parser.parse_args()
    if args.against:
        compare(args.job, args.against)
    else:
        main(args.job)
