"""Command line for the adherence evaluation: base model against a GAtt checkpoint, no service.

    python -m workers.evaluate --model default --checkpoint out/job/train/checkpoints/step-000040 \\
        --heldout examples/heldout.jsonl --instructions default --out out/eval --turns 8 --dialogues 8 \\
        --attention

Runs every held-out dialogue turn by turn under each condition ("once": the instruction in the
first turn only, as GAtt trains; "every_turn": on every user turn, the ceiling; optionally
"none", the floor; and "once_fixed", "every_turn_fixed", "none_fixed": the same with the corpus's
own earlier replies as context, so that a turn measures memory of the instruction rather than
imitation of the model's earlier replies) for the base model and, if given, the checkpoint (a LoRA
checkpoint loads its base through `load_model`). Writes into --out:

    adherence.json   {"base": report, "gatt": report, "compare": ..., "overlap": ..., "table": ...,
                      "validation_loss": {"base": ..., "gatt": ...}}
    attention.json   {"base": report, "gatt": report}              (with --attention)
    attention.png    share of attention on the instruction per turn  (with --attention)

adherence.json also records the run's `settings` (the held-out and instruction files' hashes,
seeds, every evaluation setting, the torch and transformers versions). `--base-from` takes the
base model's report from an earlier adherence.json instead of evaluating the base model again
(half the evaluation's time), and refuses one whose settings differ: the paired comparison is
only sound over the same runs.

and prints the adherence tables ("adherent", and "adherent and useful": not a copy of an earlier
reply, not an echo of the question), with two models the paired differences and the ceiling ratio
(once after / every_turn before). Evaluation instructions are synthesized from the instruction set
with --instruction-seed, by default the training seed + 1000, so they are not the training draw.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gatt.augment import Placement
from gatt.dialogues import Dialogue
from gatt.errors import ValidationFailed
from gatt.instructions import Instruction, default_instruction_set, parse_instruction_set, synthesize
from gatt.repetition import DEFAULT_MAX_ECHO
from workers.engine.eval_report import compare, format_table
from workers.engine.evaluation import CONDITIONS, EVAL_SEED_OFFSET, MAX_TURNS, EvalConfig, check_overlap
from workers.engine.files import write_json


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m workers.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default", help='base model: "default" or a local model directory')
    p.add_argument("--checkpoint", help="a checkpoint directory written by a job (LoRA or full weights)")
    p.add_argument(
        "--base-from",
        help="an earlier adherence.json: reuse its base-model report (same settings only) instead of "
        "evaluating the base model again",
    )
    p.add_argument("--heldout", default="examples/heldout.jsonl", help="held-out dialogues (JSONL corpus)")
    p.add_argument("--instructions", default="default", help='"default" or an instruction-set JSON file')
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--turns",
        type=int,
        default=8,
        help=f"user turns per dialogue, at most {MAX_TURNS}, as far as the data go (default 8)",
    )
    p.add_argument("--dialogues", type=int, default=8, help="held-out dialogues to use (default 8; 0: all)")
    p.add_argument("--instructions-per-dialogue", type=int, default=1)
    p.add_argument(
        "--conditions", default="once,every_turn", help=f"comma-separated, of {', '.join(CONDITIONS)}"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--threshold", type=float, default=0.5, help="a turn adheres when its score >= this")
    p.add_argument("--batch-prompts", type=int, default=8)
    p.add_argument(
        "--max-repeat-similarity",
        type=float,
        default=0.8,
        help="a reply at least this similar to an earlier reply of its dialogue scores 0 (default 0.8)",
    )
    p.add_argument("--allow-repeats", action="store_true", help="score repeated replies like any other")
    p.add_argument(
        "--max-echo",
        type=_optional_share,
        default=DEFAULT_MAX_ECHO,
        help=f"a reply whose echo share of the question is at least this is not useful "
        f'(default {DEFAULT_MAX_ECHO}; "none": no echo check)',
    )
    p.add_argument(
        "--no-relevance", action="store_true", help="skip the question-reply relevance (embedding model)"
    )
    p.add_argument("--seed", type=int, default=0, help="the training job's seed (default 0)")
    p.add_argument("--instruction-seed", type=int, help=f"default: --seed + {EVAL_SEED_OFFSET}")
    p.add_argument(
        "--attach", choices=("prefix", "suffix"), default="prefix", help="the job's placement.attach"
    )
    p.add_argument(
        "--keep", choices=("first_user", "system"), default="first_user", help="the job's placement.keep"
    )
    p.add_argument("--attention", action="store_true", help="also measure attention on the instruction")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=2048,
        help="longest held-out dialogue the validation loss counts (workers/engine/validation.py)",
    )
    p.add_argument(
        "--train-corpus", help="the job's training corpus, to report overlaps with the held-out set"
    )
    p.add_argument(
        "--train-instructions",
        help="the job's instructions.jsonl (default with --train-corpus: synthesized with --seed)",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def _optional_share(text: str) -> float | None:
    if text.strip().lower() in ("none", "off", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number or "none", got {text!r}') from None


def _instruction_set(spec: str):
    if spec == "default":
        return default_instruction_set()
    with open(spec, encoding="utf-8") as f:
        return parse_instruction_set(json.load(f))


def _read_corpus(path: str):
    from gatt.dialogues import parse_corpus

    with open(path, "rb") as f:
        return parse_corpus(f)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    placement = Placement(attach=args.attach, keep=args.keep)
    instruction_seed = (
        args.seed + EVAL_SEED_OFFSET if args.instruction_seed is None else args.instruction_seed
    )
    try:
        heldout, instructions, overlap = _inputs(args, config, instruction_seed)
    except (ValidationFailed, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    import torch  # only once the arguments are valid

    from gatt.masks import TemplateError
    from workers.engine.models import ModelError

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before the hours of generation, not after
    adherence: dict[str, Any] = {
        "heldout": args.heldout,
        "instructions": args.instructions,
        "instruction_seed": instruction_seed,
        "settings": _settings(args, config, placement, instruction_seed),
    }
    try:
        if args.base_from:
            _reuse_base(Path(args.base_from), adherence)
    except (OSError, ValueError) as exc:
        print(f"error: --base-from: {exc}", file=sys.stderr)
        return 1
    try:
        attention = _evaluate_models(args, config, placement, heldout, instructions, adherence)
    except (ModelError, TemplateError, ValidationFailed, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if "gatt" in adherence:
        adherence["compare"] = compare(adherence["base"], adherence["gatt"])
    if overlap is not None:
        adherence["overlap"] = overlap
    adherence["table"] = format_table(
        adherence["base"], adherence.get("gatt"), comparison=adherence.get("compare")
    )
    _write_and_print(out, adherence, attention, overlap)
    return 0


def _settings(
    args: argparse.Namespace, config: EvalConfig, placement: Placement, instruction_seed: int
) -> dict[str, Any]:
    """Everything the base model's report depends on, as JSON: equal settings, the same runs."""
    import torch
    import transformers

    def digest(path: str) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    settings = {
        "model": args.model,
        "heldout_sha256": digest(args.heldout),
        "instructions_sha256": "default" if args.instructions == "default" else digest(args.instructions),
        "instruction_seed": instruction_seed,
        "eval": asdict(config),
        "placement": {"attach": placement.attach, "keep": placement.keep},
        "max_seq_len": args.max_seq_len,
        "device": args.device,
        "dtype": args.dtype,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    return json.loads(json.dumps(settings))  # tuples as lists, as a reloaded file has them


def _reuse_base(path: Path, adherence: dict[str, Any]) -> None:
    """The base model's report and validation loss from `path`, if it was run with these settings."""
    if path.is_dir():
        path = path / "adherence.json"
    earlier = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(earlier, dict) or "base" not in earlier:
        raise ValueError(f"{path} has no base-model report")
    theirs, ours = earlier.get("settings"), adherence["settings"]
    if theirs != ours:
        differing = sorted(
            key for key in set(ours) | set(theirs or {}) if (theirs or {}).get(key) != ours.get(key)
        )
        raise ValueError(f"{path} was evaluated with other settings ({', '.join(differing)})")
    adherence["base"] = earlier["base"]
    loss = earlier.get("validation_loss", {}).get("base")
    if loss is not None:
        adherence["validation_loss"] = {"base": loss}
    adherence["base_from"] = str(path)


def _config(args: argparse.Namespace) -> EvalConfig:
    if args.base_from and args.attention:
        raise ValueError("--attention needs the base model itself; it cannot come with --base-from")
    return EvalConfig(
        turns=args.turns,
        dialogues=args.dialogues or None,
        instructions_per_dialogue=args.instructions_per_dialogue,
        conditions=tuple(c.strip() for c in args.conditions.split(",") if c.strip()),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        pass_threshold=args.threshold,
        batch_prompts=args.batch_prompts,
        seed=args.seed,
        max_repeat_similarity=None if args.allow_repeats else args.max_repeat_similarity,
        max_echo=args.max_echo,
        relevance=not args.no_relevance,
    )


def _inputs(
    args: argparse.Namespace, config: EvalConfig, instruction_seed: int
) -> tuple[list[Dialogue], list[Instruction], dict[str, Any] | None]:
    """The held-out dialogues, their instructions, and their overlap with the training data."""
    instruction_set = _instruction_set(args.instructions)
    heldout = _read_corpus(args.heldout)
    if config.dialogues:
        heldout = heldout[: config.dialogues]
    instructions = synthesize(
        instruction_set, len(heldout) * config.instructions_per_dialogue, instruction_seed
    )
    if not args.train_corpus:
        return heldout, instructions, None
    train = _read_corpus(args.train_corpus)
    if args.train_instructions:
        with open(args.train_instructions, encoding="utf-8") as f:
            train_instructions = [Instruction.from_json(json.loads(line)) for line in f if line.strip()]
    else:
        train_instructions = synthesize(instruction_set, len(train), args.seed)
    return heldout, instructions, check_overlap(train, train_instructions, heldout, instructions)


def _evaluate_models(
    args: argparse.Namespace,
    config: EvalConfig,
    placement: Placement,
    heldout: list[Dialogue],
    instructions: list[Instruction],
    adherence: dict[str, Any],
) -> dict[str, Any]:
    """Each model's adherence report into `adherence`; their attention reports, if asked for."""
    from workers.engine.attention import attention_report
    from workers.engine.evaluation import evaluate_adherence
    from workers.engine.models import load_model
    from workers.engine.validation import validation_loss
    from workers.run import printing_hooks

    hooks = printing_hooks()
    models = [] if "base" in adherence else [("base", args.model)]
    if "base" in adherence:
        print(f"base: reused from {adherence['base_from']}", flush=True)
    if args.checkpoint:
        models.append(("gatt", args.checkpoint))
    attention: dict[str, Any] = {}
    started = time.monotonic()
    for label, source in models:
        print(f"[{time.monotonic() - started:7.1f}s] {label}: loading {source}", flush=True)
        loaded = load_model(source, device=args.device, dtype=args.dtype)
        report = evaluate_adherence(loaded, heldout, instructions, config, placement=placement, hooks=hooks)
        adherence[label] = report
        adherence.setdefault("validation_loss", {})[label] = validation_loss(
            loaded, heldout, args.max_seq_len
        )
        if args.attention:
            attention[label] = attention_report(
                loaded,
                heldout,
                instructions,
                config,
                placement=placement,
                transcripts=report["transcripts"].get("once"),
                hooks=hooks,
            )
        del loaded  # two models need not be in memory at once
        gc.collect()
    return attention


def _write_and_print(
    out: Path, adherence: dict[str, Any], attention: dict[str, Any], overlap: dict[str, Any] | None
) -> None:
    from workers.engine.attention import plot_attention

    written = [out / "adherence.json"]
    write_json(written[0], adherence)
    if attention:
        written += [out / "attention.json", out / "attention.png"]
        write_json(written[1], attention)
        plot_attention(attention, written[2])
    print()
    print(adherence["table"])
    losses = ", ".join(
        f"{label} {v['loss']:.4f}"
        for label, v in adherence.get("validation_loss", {}).items()
        if v["loss"] is not None
    )
    if losses:
        print(f"validation loss (the held-out dialogues' own replies, no instruction): {losses}")
    if overlap is not None:
        users, texts = overlap["user_messages"], overlap["instruction_texts"]
        print(
            f"held-out overlap with training: {users['overlapping']} of {users['eval']} user messages, "
            f"{texts['overlapping']} of {texts['eval']} instruction texts, "
            f"{overlap['constraints']['overlapping']} of {overlap['constraints']['eval']} (family, value) constraints"
        )
    print(f"written: {', '.join(str(p) for p in written)}")


if __name__ == "__main__":
    sys.exit(main())
