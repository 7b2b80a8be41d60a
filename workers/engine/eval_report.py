"""The adherence evaluation's report: what the runs of workers/engine/evaluation.py add up to.

`_condition_report` turns the runs of one condition (every reply scored, copies and echoes marked)
into its numbers: per turn the adherence rate, "adherent and useful", truncated, empty, copied and
echoed replies and relevance; turns 2+ pooled; per family and per instruction; and quoted samples.
`compare` sets two reports of the same evaluation (before and after training) side by side, and
`format_table` prints one or two reports as plain-text tables. Torch-free, like the statistics it
uses (workers/engine/eval_stats.py).

Rates carry a 95% Wilson interval: with 8-16 dialogues per turn a normal-approximation interval
would be badly off near 0 and 1. The turns of one dialogue are not independent, so the pooled
"overall" interval is optimistic; turns 2+ pooled (`later_turns`, `later_useful`) also carry an
interval from resampling whole dialogues. Before/after comparisons (`compare`) are paired run by
run with a two-way (dialogue x instruction) cluster bootstrap: workers/engine/eval_stats.py.

Choices the paper leaves open, and ours:

- Per family: every constraint of an instruction is scored on its own (its verifiers, the
  instruction's aggregate), so "Speak in French. You enjoy chess." counts once for `language`
  and once for `hobby` at each turn. Per instruction (`instructions`): turns 2+ pooled per
  constraint set (family: value), or per text for custom instructions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gatt.instructions import CUSTOM_FAMILY, Instruction
from workers.engine.eval_stats import compare_paired, pooled_rate, rate_summary, round4
from workers.engine.evaluation import FIXED_CONDITIONS, EvalConfig, _Run

__all__ = ["compare", "format_table"]

_round = round4

# --------------------------------------------------------------------------------------------------
# The report of one condition


def _summary(scores: Sequence[float], threshold: float) -> dict[str, Any]:
    n = len(scores)
    row = rate_summary(sum(1 for s in scores if s >= threshold), n)
    return {
        "n": n,
        "adhered": row["hits"],
        "rate": row["rate"],
        "ci": row["ci"],
        "mean_score": _round(sum(scores) / n) if n else None,
    }


def _later_turns(runs: Sequence[Any], threshold: float) -> dict[str, Any]:
    """Turns 2 and later pooled: GAtt's claim (keeping the instruction after the turn that gives
    it) in one number, with about five times the turns of a single turn's row.

    The turns of one dialogue are not independent (a model that drops the instruction at turn 3
    tends to drop it at turn 4 too), so the Wilson interval over pooled turns is too narrow.
    `ci_by_dialogue` resamples whole dialogues instead (percentile bootstrap, 2,000 resamples,
    fixed seed), widened to the Wilson interval where that is wider: the interval to trust.
    """
    summary = _summary([s for r in runs for s in r.scores[1:]], threshold)
    return pooled_rate([(r.dialogue, [s >= threshold for s in r.scores]) for r in runs], summary)


def _useful_rows(runs: Sequence[_Run]) -> tuple[dict[str, Any], dict[str, Any]]:
    """("adherent and useful" over all turns, over turns 2+ with its by-dialogue interval)."""
    every = [u for r in runs for u in r.useful]
    later = [u for r in runs for u in r.useful[1:]]
    overall = rate_summary(sum(every), len(every))
    pooled = pooled_rate([(r.dialogue, r.useful) for r in runs], rate_summary(sum(later), len(later)))
    return overall, pooled


def _instruction_key(instruction: Instruction) -> str:
    """What the per-instruction breakdown groups by: the (family, value) constraints, or the text of
    a custom instruction (its name says little about what it asks)."""
    if not instruction.constraints or any(c.family == CUSTOM_FAMILY for c in instruction.constraints):
        return instruction.text
    return " + ".join(
        c.family if c.value is None else f"{c.family}: {c.value}" for c in instruction.constraints
    )


def _per_instruction(runs: Sequence[_Run], threshold: float) -> list[dict[str, Any]]:
    """Turns 2+ pooled per instruction (Wilson intervals: optimistic, the turns are not independent)."""
    groups: dict[str, list[_Run]] = {}
    for r in runs:
        groups.setdefault(_instruction_key(r.instruction), []).append(r)
    rows = []
    for key, group in sorted(groups.items()):
        scores = [s for r in group for s in r.scores[1:]]
        useful = [u for r in group for u in r.useful[1:]]
        adherent = rate_summary(sum(1 for s in scores if s >= threshold), len(scores))
        rows.append(
            {
                "instruction": key,
                "texts": len({r.instruction.text for r in group}),
                "runs": len(group),
                "n": adherent["n"],
                "adhered": adherent["hits"],
                "rate": adherent["rate"],
                "ci": adherent["ci"],
                "useful": sum(useful),
                "useful_rate": _round(sum(useful) / len(useful)) if useful else None,
            }
        )
    return rows


def _relevance_row(values: Sequence[float | None], floor: float | None) -> dict[str, Any] | None:
    known = [v for v in values if v is not None]
    if not known or floor is None:
        return None
    relevant = sum(1 for v in known if v >= floor)
    return {
        "n": len(known),
        "mean": _round(sum(known) / len(known)),
        "relevant": relevant,
        "share": _round(relevant / len(known)),
    }


def _condition_report(
    runs: Sequence[_Run], config: EvalConfig, relevance_floor: float | None
) -> dict[str, Any]:
    threshold = config.pass_threshold
    n_turns = max((len(r.replies) for r in runs), default=0)
    turns = []
    families: dict[str, list[list[float]]] = {}
    samples = []
    for t in range(n_turns):
        at = [r for r in runs if len(r.replies) > t]
        row = {"turn": t + 1, **_summary([r.scores[t] for r in at], threshold)}
        row["truncated"] = sum(1 for r in at if not r.finished[t])
        row["empty"] = sum(1 for r in at if not r.replies[t])
        row["repeats"] = sum(1 for r in at if r.repeats[t])
        row["echoes"] = sum(1 for r in at if r.echoes[t])
        row["useful"] = rate_summary(sum(1 for r in at if r.useful[t]), len(at))
        row["relevance"] = _relevance_row([r.relevance[t] for r in at], relevance_floor)
        turns.append(row)
        for r in at:
            for constraint, value in zip(r.instruction.constraints, r.constraint_scores[t], strict=True):
                per_turn = families.setdefault(constraint.family, [[] for _ in range(n_turns)])
                per_turn[t].append(value)
        for r in at[: config.samples_per_turn]:
            samples.append(
                {
                    "turn": t + 1,
                    "dialogue_id": r.dialogue_id,
                    "instruction": r.instruction.text,
                    "user": r.users[t],
                    "reply": r.replies[t],
                    "score": _round(r.scores[t]),
                    "reason": r.reasons[t],
                    "useful": r.useful[t],
                }
            )
    all_scores = [s for r in runs for s in r.scores]
    useful_overall, later_useful = _useful_rows(runs)
    return {
        "context": "corpus" if runs and runs[0].fixed else "own",
        "turns": turns,
        "families": {
            name: [
                {"turn": t + 1, **_summary(values, threshold)} for t, values in enumerate(per_turn) if values
            ]
            for name, per_turn in sorted(families.items())
        },
        "instructions": _per_instruction(runs, threshold),
        "overall": _summary(all_scores, threshold),
        "later_turns": _later_turns(runs, threshold),
        "useful_overall": useful_overall,
        "later_useful": later_useful,
        "relevance": _relevance_row([x for r in runs for x in r.relevance], relevance_floor),
        "context_cut_turns": sum(r.cut_turns for r in runs),
        "missing_reply_turns": sum(r.missing_turns for r in runs),
        "stopped": {
            reason: sum(1 for r in runs if r.stopped == reason)
            for reason in sorted({r.stopped for r in runs if r.stopped})
        },
        "truncated": sum(1 for r in runs for f in r.finished if not f),
        "repeats": sum(1 for r in runs for x in r.repeats if x),
        "echoes": sum(1 for r in runs for x in r.echoes if x),
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------------
# Comparing and printing


def _ci_overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool | None:
    if a is None or b is None:
        return None
    return not (a[1] < b[0] or b[1] < a[0])


def _compare_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    diff = None
    if before["rate"] is not None and after["rate"] is not None:
        diff = _round(after["rate"] - before["rate"])
    return {
        "n_before": before["n"],
        "n_after": after["n"],
        "before": before["rate"],
        "after": after["rate"],
        "before_ci": before["ci"],
        "after_ci": after["ci"],
        "diff": diff,
        "ci_overlap": _ci_overlap(before["ci"], after["ci"]),
    }


def _paired_cell(result: Mapping[str, Any] | None, key: Any) -> Mapping[str, Any] | None:
    """The paired row of one table row (a turn, "2+" or "all") of one condition's result."""
    if result is None:
        return None
    if key == "all":
        return result.get("overall")
    if key == "2+":
        return result.get("later_turns")
    return next((r for r in result["turns"] if r["turn"] == key), None)


def _paired_summary(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: row[k] for k in ("n", "diff", "ci", "significant")}


def compare(
    before: Mapping[str, Any], after: Mapping[str, Any], *, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Two reports of the same evaluation (before and after training), condition by condition.

    `conditions`: per turn, turns 2+ and overall, the two rates, after - before, whether the 95%
    Wilson intervals overlap (a conservative sign), and `paired`: the after - before difference of
    the paired runs with the two-way cluster bootstrap's interval, `significant` when it excludes 0.
    `paired` (top level): that bootstrap for both outcomes ("adherent", "useful") and every
    condition, and `ceiling`: "once" after / "every_turn" before per turn with its interval and the
    target (>= 0.9 at every turn 2+), also for the fixed conditions (workers/engine/eval_stats.py).
    Reports without transcripts (or, for "useful", written before it existed) get no paired rows.
    """
    paired = compare_paired(before, after, resamples=resamples, seed=seed)
    out: dict[str, Any] = {}
    for condition, b in before["conditions"].items():
        a = after["conditions"].get(condition)
        if a is None:
            continue
        result = paired["outcomes"].get("adherent", {}).get(condition)
        after_turns = {row["turn"]: row for row in a["turns"]}
        out[condition] = {
            "turns": [
                {
                    "turn": row["turn"],
                    **_compare_rows(row, after_turns[row["turn"]]),
                    "paired": _paired_summary(_paired_cell(result, row["turn"])),
                }
                for row in b["turns"]
                if row["turn"] in after_turns
            ],
            "overall": {
                **_compare_rows(b["overall"], a["overall"]),
                "paired": _paired_summary(_paired_cell(result, "all")),
            },
        }
        if "later_turns" in b and "later_turns" in a:
            later = _compare_rows(b["later_turns"], a["later_turns"])
            later["before_ci_by_dialogue"] = b["later_turns"]["ci_by_dialogue"]
            later["after_ci_by_dialogue"] = a["later_turns"]["ci_by_dialogue"]
            later["ci_by_dialogue_overlap"] = _ci_overlap(
                b["later_turns"]["ci_by_dialogue"], a["later_turns"]["ci_by_dialogue"]
            )
            later["paired"] = _paired_summary(_paired_cell(result, "2+"))
            out[condition]["later_turns"] = later
    return {"conditions": out, "paired": paired}


def _cell(row: Mapping[str, Any] | None, shown_n: int | None) -> str:
    if row is None or row["rate"] is None:
        return "-"
    lo, hi = row["ci"]
    text = f"{row['rate']:.2f} [{lo:.2f}, {hi:.2f}]"
    return text if row["n"] == shown_n else f"{text} n={row['n']}"


def _by_dialogue(row: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """The pooled later-turns row with its by-dialogue interval in place of the Wilson one."""
    if row is None:
        return None
    return {**row, "ci": row.get("ci_by_dialogue") or row["ci"]}


def _row_of(cond: Mapping[str, Any], key: Any, outcome: str) -> Mapping[str, Any] | None:
    """One cell's row: turn `key` (or "2+", "all") of a condition report, for `outcome`."""
    if outcome == "adherent":
        if key == "all":
            return cond["overall"]
        if key == "2+":
            return _by_dialogue(cond.get("later_turns"))
        return next((r for r in cond["turns"] if r["turn"] == key), None)
    if key == "all":
        return cond.get("useful_overall")
    if key == "2+":
        return _by_dialogue(cond.get("later_useful"))
    row = next((r for r in cond["turns"] if r["turn"] == key), None)
    return None if row is None else row.get("useful")


def _table(
    reports: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    conditions: Sequence[str],
    outcome: str,
    paired: Mapping[str, Any] | None,
) -> tuple[list[str], bool]:
    """The table's lines, and whether some `*` fell back to non-overlapping Wilson intervals."""
    header = ["turn", "n"]
    for c in conditions:
        header += [f"{c} {name}" if len(reports) > 1 else c for name in names]
        if len(reports) > 1:
            header.append(f"{c} diff")
    fallback = False

    def rows_for(key: Any) -> list[str]:
        nonlocal fallback
        cells: list[str] = []
        found = [_row_of(report["conditions"][c], key, outcome) for c in conditions for report in reports]
        shown_n = next((r["n"] for r in found if r is not None), None)
        for ci, c in enumerate(conditions):
            group = found[ci * len(reports) : (ci + 1) * len(reports)]
            cells += [_cell(r, shown_n) for r in group]
            if len(reports) > 1:
                b, a = group
                if b is None or a is None or b["rate"] is None or a["rate"] is None:
                    cells.append("-")
                    continue
                result = (paired or {}).get("outcomes", {}).get(outcome, {}).get(c)
                row = _paired_cell(result, key)
                if row is not None:
                    star = "*" if row["significant"] else ""
                else:
                    fallback = True
                    star = "*" if _ci_overlap(b["ci"], a["ci"]) is False else ""
                cells.append(f"{a['rate'] - b['rate']:+.2f}{star}")
        return [str(key), "-" if shown_n is None else str(shown_n), *cells]

    all_turns = sorted(
        {row["turn"] for r in reports for c in conditions for row in r["conditions"][c]["turns"]}
    )
    # Reports written before the pooled row existed have no "later_turns".
    pooled_key = "later_turns" if outcome == "adherent" else "later_useful"
    pooled = all(pooled_key in r["conditions"][c] for r in reports for c in conditions)
    table = [header] + [rows_for(t) for t in all_turns] + [rows_for("2+")] * pooled + [rows_for("all")]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines, fallback


def _ceiling_lines(paired: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    lines = []
    for pair, outcomes in paired.get("ceiling", {}).items():
        numerator, denominator = pair.split("/")
        for outcome, result in outcomes.items():
            cells = [
                f"{row['turn']}: "
                + ("-" if row["ratio"] is None else f"{row['ratio']:.2f}")
                + ("" if row["ci"] is None else f" [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}]")
                for row in result["turns"]
                if row["turn"] >= 2
            ]
            if not cells:
                continue
            lines.append(
                f"{numerator} {names[1]} / {denominator} {names[0]} ({outcome}), by turn: {'; '.join(cells)}. "
                f">= {paired['bar']:.0%} of the ceiling at every turn 2+: {'yes' if result['done'] else 'no'}"
                f" (interval above it: {'yes' if result['done_ci'] else 'no'})."
            )
    return lines


def _counts(
    reports: Sequence[Mapping[str, Any]], names: Sequence[str], conditions: Sequence[str], key: str
) -> str:
    """ "once base 3/64, once gatt 5/64, ...": how many replies of each condition and model are `key`."""
    return ", ".join(
        f"{c} {name} {report['conditions'][c].get(key, 0)}/{report['conditions'][c]['overall']['n']}"
        for c in conditions
        for name, report in zip(names, reports, strict=True)
    )


def _notes(
    reports: Sequence[Mapping[str, Any]], names: Sequence[str], conditions: Sequence[str], fallback: bool
) -> str:
    """What the adherence table's conditions, columns and marks mean."""
    notes = (
        "once: instruction in the first turn only (the GAtt view); every_turn: on every user turn "
        "(the ceiling); none: no instruction (the floor)."
    )
    if any(c in FIXED_CONDITIONS for c in conditions):
        notes += (
            " *_fixed: the same, with the corpus's own earlier replies as context (only the reply to"
            " the turn is generated): memory of the instruction, not imitation of earlier replies."
        )
    if len(reports) > 1:
        notes += (
            " diff: after - before, * when the paired interval (runs paired by dialogue and instruction,"
            " dialogues and instructions resampled) excludes 0."
        )
        if fallback:
            notes += " Where a report has no transcripts: * when the Wilson intervals do not overlap."
    if any("later_turns" in r["conditions"][c] for r in reports for c in conditions):
        notes += (
            "\n2+: turns 2 and later pooled, with an interval from resampling whole dialogues (their"
            " turns are not independent)."
        )
    if reports[0]["config"].get("max_repeat_similarity") is not None:
        notes += (
            "\nReplies that copy an earlier reply (scored 0): "
            + _counts(reports, names, conditions, "repeats")
            + "."
        )
    return notes


def _usefulness_lines(
    reports: Sequence[Mapping[str, Any]], names: Sequence[str], conditions: Sequence[str]
) -> list[str]:
    """Echo counts and relevance under the "adherent and useful" table."""
    out = []
    config = reports[0]["config"]
    if config.get("max_echo") is not None:
        out.append(
            f"Replies that echo the question (echo share >= {config['max_echo']}): "
            + _counts(reports, names, conditions, "echoes")
            + "."
        )
    relevance = [
        f"{c} {name} {row['mean']:.2f} / {row['share']:.2f}"
        for c in conditions
        for name, report in zip(names, reports, strict=True)
        if (row := report["conditions"][c].get("relevance")) is not None
    ]
    if relevance:
        floor = reports[0].get("relevance_floor")
        out.append(
            f"Relevance to the question (mean cosine / share >= {floor}): " + ", ".join(relevance) + "."
        )
    return out


def format_table(
    report_before: Mapping[str, Any],
    report_after: Mapping[str, Any] | None = None,
    *,
    labels: tuple[str, str] = ("base", "gatt"),
    comparison: Mapping[str, Any] | None = None,
) -> str:
    """Plain-text tables, turn x condition, each cell "rate [lo, hi]" (95% Wilson interval): the
    adherence table, then (for reports that have it) the same for "adherent and useful".

    With two reports every condition gets a column per model and a "diff" column (after - before;
    `*` when the paired cluster-bootstrap interval of the difference excludes 0; for reports
    without transcripts, when the Wilson intervals do not overlap). `comparison` is
    `compare(report_before, report_after)` when already computed. The `n` column is the first
    cell's n; a cell with a different n says so.
    """
    reports = [report_before] if report_after is None else [report_before, report_after]
    names = [labels[0]] if report_after is None else list(labels)
    conditions = list(report_before["conditions"])
    if report_after is not None:
        conditions = [c for c in conditions if c in report_after["conditions"]]
    paired = None
    if report_after is not None:
        paired = (comparison or compare(report_before, report_after))["paired"]
    config = report_before["config"]
    threshold = config["pass_threshold"]

    lines, fallback = _table(reports, names, conditions, "adherent", paired)
    out = [
        f"Instruction adherence: share of replies scoring >= {threshold} per turn, "
        "95% Wilson interval in brackets",
        *lines,
    ]
    out.append(_notes(reports, names, conditions, fallback))
    useful = conditions and all("useful_overall" in r["conditions"][c] for r in reports for c in conditions)
    if useful:
        lines, _ = _table(reports, names, conditions, "useful", paired)
        out += [
            "",
            "Adherent and useful: adheres, copies no earlier reply and does not echo the question,"
            " 95% Wilson interval in brackets",
            *lines,
            *_usefulness_lines(reports, names, conditions),
        ]
    if paired is not None:
        out += _ceiling_lines(paired, names)
    return "\n".join(out)
