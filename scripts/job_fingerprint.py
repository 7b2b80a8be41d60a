"""Is a refactoring behaviour-preserving? Run the same job before and after it and compare.

    .venv/bin/python scripts/job_fingerprint.py run var/fp/before.json      # on the old commit
    .venv/bin/python scripts/job_fingerprint.py run var/fp/after.json       # on the new one
    .venv/bin/python scripts/job_fingerprint.py compare var/fp/before.json var/fp/after.json

`run` runs examples/job.yaml (seed 0; `--set key=value` as in `python -m workers.run`) in a
fresh directory (`--keep DIR` keeps it; `of DIR` fingerprints a kept one) and writes a
fingerprint: the sha256 of every artifact that must not change (instructions, samples, training
set, evaluation reports, checkpoint weights) and each optimiser step's loss, gradient norm,
learning rate and trained tokens. JSON artifacts are hashed with their numbers rounded to 9
decimals: the language verifier's confidences differ in the 15th digit from one run of the same
code to the next. `compare` wants the same hashes and the same step values within 1e-6, and
prints every difference.

Run both on the same machine with the same OMP_NUM_THREADS: float reductions depend on threads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEP_FIELDS = ("loss", "grad_norm", "learning_rate", "trained_tokens")
TOLERANCE = 1e-6
# JSONL artifacts that must not change. Evaluation reports hold wall times, compared without them.
EXACT = ("instructions.jsonl", "samples.jsonl", "training_set.jsonl")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return round(obj, 9)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def _json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_rounded(obj), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _jsonl_sha256(path: Path) -> str:
    return _json_sha256([json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()])


def _without_times(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_times(v) for k, v in obj.items() if not k.endswith(("wall_s", "_s_per_turn"))}
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def fingerprint(out: Path) -> dict[str, Any]:
    files = {name: _jsonl_sha256(out / name) for name in EXACT}
    for report in sorted((out / "evaluation").glob("*.json")):
        files[f"evaluation/{report.name}"] = _json_sha256(
            _without_times(json.loads(report.read_text("utf-8")))
        )
    for weights in sorted((out / "train" / "checkpoints").glob("step-*/*.safetensors")):
        files[weights.relative_to(out).as_posix()] = _sha256(weights)
    rows = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": r["step"], **{f: r[f] for f in STEP_FIELDS}} for r in rows]
    return {"files": files, "steps": steps}


def run(target: Path, overrides: list[str], keep: Path | None = None) -> None:
    from workers.engine.config import load_config, parse_config
    from workers.engine.pipeline import run_job
    from workers.run import _apply_override, printing_hooks

    raw = load_config(ROOT / "examples" / "job.yaml").to_json()
    work = keep or Path(tempfile.mkdtemp(prefix="gatt-fingerprint-"))
    try:
        raw["output_dir"] = str(work / "job")
        for assignment in overrides:
            _apply_override(raw, assignment)
        run_job(parse_config(raw), printing_hooks())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(fingerprint(work / "job"), indent=1) + "\n", encoding="utf-8")
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"fingerprint written to {target}")


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    problems = []
    for name in sorted(set(a["files"]) | set(b["files"])):
        if a["files"].get(name) != b["files"].get(name):
            problems.append(f"{name}: {a['files'].get(name)} != {b['files'].get(name)}")
    if len(a["steps"]) != len(b["steps"]):
        problems.append(f"steps: {len(a['steps'])} != {len(b['steps'])}")
    for x, y in zip(a["steps"], b["steps"], strict=False):
        for field in STEP_FIELDS:
            if abs(x[field] - y[field]) > TOLERANCE:
                problems.append(f"step {x['step']} {field}: {x[field]} != {y[field]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="run examples/job.yaml and write its fingerprint")
    p.add_argument("out", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR", help="run in DIR and keep it")
    p = commands.add_parser("of", help="the fingerprint of a job directory already run")
    p.add_argument("job_dir", type=Path)
    p.add_argument("out", type=Path)
    p = commands.add_parser("compare", help="exit 1 unless two fingerprints match")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.out, args.set, args.keep)
        return 0
    if args.command == "of":
        args.out.write_text(json.dumps(fingerprint(args.job_dir), indent=1) + "\n", encoding="utf-8")
        return 0
    a, b = (json.loads(path.read_text(encoding="utf-8")) for path in (args.a, args.b))
    problems = compare(a, b)
    for problem in problems:
        print(problem)
    print(f"{len(a['files'])} files, {len(a['steps'])} steps: " + ("MATCH" if not problems else "DIFFERENT"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
