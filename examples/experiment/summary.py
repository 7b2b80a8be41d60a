"""The rows docs/experiment.md tabulates, from finished evaluations (workers/evaluate's
adherence.json), as a Markdown table: one column for the base model (the first run's), one per run.

    .venv/bin/python examples/experiment/summary.py var/experiment/<run>/eval [<other run>/eval ...]

Turns 2 and later pooled. Adherence rows give the rate after training, the paired difference and
its interval (dialogues and instruction texts resampled); `*` marks every turn 2-8 significant.
The ceiling row is the lowest and highest ratio over turns 2-8 of "told once" after training to
the base model told on every turn, and whether each turn reaches the bar (eval_stats.CEILING_BAR).
Copies and echoes are counts of the condition's replies (64 runs x 8 turns = 512); relevance is
the mean question-reply cosine / the share above the floor measured on base replies. "Spam at
turn 1" counts replies of fewer than two words at turn 1, told once: the emoji-only replies
that most copies are. "Open with a symbol, untold" counts replies under no instruction whose first
character is a symbol (Unicode category S: the emoji the instructions ask for, and others): the
habit leaking where no instruction asked for it.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

WORD = re.compile(r"\w+")


def _pooled(evaluation: dict[str, Any], outcome: str, condition: str) -> str:
    paired = evaluation["compare"]["paired"]["outcomes"].get(outcome, {}).get(condition)
    if paired is None:
        return "–"
    later = paired["later_turns"]
    every = all(row["significant"] for row in paired["turns"] if row["turn"] >= 2)
    lo, hi = later["ci"]
    return f"{later['after']:.2f}, {later['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]{' *' if every else ''}"


def _base_rate(evaluation: dict[str, Any], outcome: str, condition: str) -> str:
    paired = evaluation["compare"]["paired"]["outcomes"].get(outcome, {}).get(condition)
    return "–" if paired is None else f"{paired['later_turns']['before']:.2f}"


def _ceiling(evaluation: dict[str, Any], outcome: str) -> str:
    result = evaluation["compare"]["paired"].get("ceiling", {}).get("once/every_turn", {}).get(outcome)
    ratios = [row["ratio"] for row in (result or {}).get("turns", []) if row["turn"] >= 2]
    if not ratios or None in ratios:
        return "–"
    met = "interval above the bar" if result["done_ci"] else "met" if result["done"] else "not met"
    return f"{min(ratios):.1f}-{max(ratios):.1f}x ({met})"


def _counts(report: dict[str, Any], condition: str) -> str:
    c = report["conditions"].get(condition)
    return "–" if c is None else f"{c['repeats']} / {c['echoes']}"


def _relevance(report: dict[str, Any], condition: str) -> str:
    c = report["conditions"].get(condition)
    r = c and c.get("relevance")
    return "–" if not r else f"{r['mean']:.2f} / {r['share']:.2f}"


def _spam(report: dict[str, Any]) -> str:
    runs = (report.get("transcripts") or {}).get("once")
    if not runs:
        return "–"
    first = [run["replies"][0] for run in runs if run.get("replies")]
    return f"{sum(1 for reply in first if len(WORD.findall(reply or '')) < 2)} of {len(first)}"


def _symbol_openings(report: dict[str, Any]) -> str:
    runs = (report.get("transcripts") or {}).get("none")
    if not runs:
        return "–"
    replies = [(reply or "").lstrip() for run in runs for reply in run.get("replies", [])]
    opened = sum(1 for reply in replies if reply and unicodedata.category(reply[0]).startswith("S"))
    return f"{opened} of {len(replies)}"


def _loss(evaluation: dict[str, Any], label: str) -> str:
    value = (evaluation.get("validation_loss") or {}).get(label) or {}
    return "–" if value.get("loss") is None else f"{value['loss']:.2f}"


def main(paths: list[str]) -> None:
    runs = [json.loads((Path(p) / "adherence.json").read_text()) for p in paths]
    base = runs[0]
    rows = [
        ("(a) told once, own history: adherent", "adherent", "once"),
        ("(a) told once, the corpus's history: adherent", "adherent", "once_fixed"),
        ("adherent and useful, told once", "useful", "once"),
        ("adherent and useful, told once, the corpus's history", "useful", "once_fixed"),
    ]
    print("| measure (turns 2-8 pooled) | base | " + " | ".join(Path(p).parent.name for p in paths) + " |")
    print("|---" * (2 + len(runs)) + "|")
    for name, outcome, condition in rows:
        cells = [_pooled(run, outcome, condition) for run in runs]
        print(f"| {name} | {_base_rate(base, outcome, condition)} | " + " | ".join(cells) + " |")
    print(
        "| (a) told once, own history / the base model told every turn (the ceiling), turns 2-8 | – | "
        + " | ".join(_ceiling(run, "adherent") for run in runs)
        + " |"
    )
    for name, cell in (
        ("(b) no instruction: copies / echoes of 512", lambda r: _counts(r, "none")),
        ("(b) no instruction: relevance", lambda r: _relevance(r, "none")),
        ("(b) told once: copies / echoes of 512", lambda r: _counts(r, "once")),
        ("(b) told once: relevance", lambda r: _relevance(r, "once")),
        ("(b) told once, the corpus's history: copies / echoes", lambda r: _counts(r, "once_fixed")),
        ("(b) told once, the corpus's history: relevance", lambda r: _relevance(r, "once_fixed")),
        ("no instruction: replies that open with a symbol (an emoji), untold", _symbol_openings),
        ("spam at turn 1, told once", _spam),
    ):
        print(f"| {name} | {cell(base['base'])} | " + " | ".join(cell(run["gatt"]) for run in runs) + " |")
    print(
        f"| validation loss | {_loss(base, 'base')} | "
        + " | ".join(_loss(run, "gatt") for run in runs)
        + " |"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
