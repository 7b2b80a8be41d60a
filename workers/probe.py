"""Which instructions can GAtt teach this model? A probe of the base model, before any job.

    python -m workers.probe --instructions examples/experiment/probes/opening_natural.json \\
        --dialogues 16 --turns 4 --out var/probe/opening

GAtt distils what the model does when the instruction sits next to every turn into what it does
when the instruction is given once. So the base model's adherence under "every_turn" is the
ceiling a job can reach, and the gap between it and "once" is the room GAtt has. An instruction
the model rarely follows even when repeated (a 10% ceiling) gives rejection sampling little to
keep and the evaluation little to show; one the model already keeps when told once (answer in
French) gives nothing to gain. The probe measures both, per instruction, on the same held-out
dialogues:

- every family value of the set (rendered with the family's first verbose template) and every
  custom instruction runs on every dialogue (`gatt.instructions.each_instruction`), under the
  conditions none (the floor), once and every_turn, turn by turn, as `workers.evaluate` does;
- the table gives, per instruction, the rate by turn under each condition, the rate over turns 2
  and later, and "room": the ceiling (every_turn) minus once over turns 2+ (and the same for the
  fixed-context conditions, `room_fixed`, when they are asked for), sorted by ceiling.

Writes `probe.json` (the table's numbers and the whole adherence report) into --out and prints a
Markdown table for docs/experiment.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gatt.augment import Placement
from gatt.errors import ValidationFailed
from gatt.instructions import CUSTOM_FAMILY, Instruction, each_instruction, parse_instruction_set
from workers.engine.evaluation import EvalConfig

CONDITIONS = ("none", "once", "every_turn")
# (instruction given once, its ceiling): room = ceiling - once, over turns 2 and later.
ROOMS = (("once", "every_turn"), ("once_fixed", "every_turn_fixed"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workers.probe", description=__doc__.split("\n")[0])
    p.add_argument("--instructions", required=True, help="an instruction-set JSON file")
    p.add_argument("--model", default="default", help='"default" or a local model directory')
    p.add_argument("--heldout", default="examples/heldout.jsonl", help="dialogues to probe on (JSONL)")
    p.add_argument("--dialogues", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--batch-prompts", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated (default: all three)")
    p.add_argument("--attach", choices=("prefix", "suffix"), default="prefix")
    p.add_argument("--keep", choices=("first_user", "system"), default="first_user")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", required=True)
    return p


def label(instruction: Instruction) -> str:
    (c,) = instruction.constraints
    if c.family == CUSTOM_FAMILY:
        return c.value or instruction.text
    return f"{c.family}: {c.value}"


def _rate(scores: Sequence[float], threshold: float) -> float | None:
    return round(sum(s >= threshold for s in scores) / len(scores), 3) if scores else None


def summarize(report: dict[str, Any], instructions: Sequence[Instruction]) -> list[dict[str, Any]]:
    """One row per instruction: rates by turn per condition, and over turns 2+ the ceiling
    (every_turn), once, and room = ceiling - once. Copies of an earlier reply score 0, as in
    the evaluation."""
    threshold = report["config"]["pass_threshold"]
    rows = []
    for slot, instruction in enumerate(instructions):
        row: dict[str, Any] = {"instruction": label(instruction), "text": instruction.text}
        for condition, runs in report["transcripts"].items():
            mine = [r for r in runs if r["slot"] == slot]
            turns = max((len(r["scores"]) for r in mine), default=0)
            row[condition] = [
                _rate([r["scores"][t] for r in mine if len(r["scores"]) > t], threshold) for t in range(turns)
            ]
            row[f"{condition}_later"] = _rate([s for r in mine for s in r["scores"][1:]], threshold)
            row[f"{condition}_later_n"] = sum(len(r["scores"][1:]) for r in mine)
        for once, ceiling in ROOMS:
            if row.get(f"{ceiling}_later") is not None and row.get(f"{once}_later") is not None:
                row[_room(once)] = round(row[f"{ceiling}_later"] - row[f"{once}_later"], 3)
        rows.append(row)
    return sorted(rows, key=lambda r: -(r.get("every_turn_later") or r.get("every_turn_fixed_later") or 0.0))


def _room(once: str) -> str:
    return "room" + once.removeprefix("once")


def markdown(rows: Sequence[dict[str, Any]], conditions: Sequence[str]) -> str:
    def cells(values: Sequence[float | None]) -> str:
        return " / ".join("-" if v is None else f"{v:.2f}" for v in values)

    rooms = [(o, c) for o, c in ROOMS if o in conditions and c in conditions]
    head = ["instruction", *(f"{c}, by turn" for c in conditions), *(f"{c} 2+" for c in conditions)]
    head += [_room(o) for o, _ in rooms] + ["n 2+"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        later = [r.get(f"{c}_later") for c in conditions] + [r.get(_room(o)) for o, _ in rooms]
        n = r.get(f"{conditions[0]}_later_n", "-")
        cols = [r["instruction"], *(cells(r.get(c, [])) for c in conditions)]
        cols += ["-" if v is None else f"{v:.2f}" for v in later] + [str(n)]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with open(args.instructions, encoding="utf-8") as f:
            instructions = each_instruction(parse_instruction_set(json.load(f)))
        config = EvalConfig(
            turns=args.turns,
            dialogues=args.dialogues or None,
            instructions_per_dialogue=len(instructions),
            conditions=tuple(c.strip() for c in args.conditions.split(",") if c.strip()),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            batch_prompts=args.batch_prompts,
            seed=args.seed,
            samples_per_turn=0,
        )
        from gatt.dialogues import parse_corpus

        with open(args.heldout, "rb") as f:
            dialogues = parse_corpus(f)[: config.dialogues]
    except (ValidationFailed, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    from gatt.masks import TemplateError
    from workers.engine.evaluation import evaluate_adherence
    from workers.engine.models import ModelError, load_model
    from workers.run import printing_hooks

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_model(args.model)
        # Dialogue i runs instructions[(i * m + j) % m] for j < m: every instruction on every dialogue.
        report = evaluate_adherence(
            loaded,
            dialogues,
            instructions,
            config,
            placement=Placement(attach=args.attach, keep=args.keep),
            hooks=printing_hooks(),
        )
    except (ModelError, TemplateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = summarize(report, instructions)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(
        json.dumps({"rows": rows, "report": report}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(markdown(rows, config.conditions))
    print(f"written: {out / 'probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
