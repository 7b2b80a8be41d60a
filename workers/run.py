"""Command line for the engine: run one GAtt job from a config file, no database, no Celery.

    python -m workers.run examples/job.yaml [--set training.max_steps=4 --set data.max_dialogues=8]

Prints stage changes, progress and per-step metrics; a second run with the same output_dir
resumes where the first stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import yaml

from gatt.errors import ValidationFailed
from workers.engine.config import load_config, parse_config
from workers.engine.hooks import Hooks


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep:
        raise SystemExit(f"--set expects key=value, got {assignment!r}")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)


def printing_hooks() -> Hooks:
    started = time.monotonic()
    last = {"progress": 0.0}

    def progress(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last["progress"] > 2:  # a line every 2 s at most
            last["progress"] = now
            print(f"[{now - started:7.1f}s] {stage}: {done}/{total}", flush=True)

    def event(level: str, kind: str, message: str, data: dict[str, Any]) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {level} {kind}: {message}", flush=True)

    def metrics(step: int, m: dict[str, float]) -> None:
        preference = ""
        if "preference_accuracy" in m:  # a DPO objective
            preference = f" pref_acc {m['preference_accuracy']:.2f} pref_margin {m['preference_margin']:.3f}"
        print(
            f"[{time.monotonic() - started:7.1f}s] step {step}: loss {m['loss']:.4f} lr {m['learning_rate']:.2e} "
            f"grad_norm {m['grad_norm']:.3f} trained_tokens {int(m['trained_tokens'])} "
            f"tok/s {m['tokens_per_s']:.0f} eta {m['eta_s']:.0f}s{preference}",
            flush=True,
        )

    def checkpoint(step: int, path: str, manifest: dict[str, Any]) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] checkpoint step {step}: {path}", flush=True)

    return Hooks(progress=progress, event=event, metrics=metrics, checkpoint=checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.run", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="job config (YAML or JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument(
        "--vllm-url",
        default=os.environ.get("GATT_VLLM_URL"),
        help="a vLLM server serving the job's model under its name (sampling.backend; default: $GATT_VLLM_URL)",
    )
    parser.add_argument(
        "--train-processes",
        type=int,
        default=int(os.environ.get("GATT_TRAIN_PROCESSES", "1")),
        help="train in this many torchrun processes, one per GPU (default: $GATT_TRAIN_PROCESSES or 1)",
    )
    parser.add_argument(
        "--train-sharding",
        choices=("auto", "replicate", "fsdp"),
        default=os.environ.get("GATT_TRAIN_SHARDING", "auto"),
        help="with several training processes: shard the model over them with FSDP2 (fsdp), never "
        "(replicate), or when its training state would fill half a GPU (auto; default: $GATT_TRAIN_SHARDING)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.train_processes <= 64:
        parser.error("--train-processes must be 1 to 64")
    if args.train_sharding not in ("auto", "replicate", "fsdp"):  # a default from the environment
        parser.error("--train-sharding must be auto, replicate or fsdp")

    from workers.engine.pipeline import run_job  # torch is imported only once the config is valid

    try:
        config = load_config(args.config)
        if args.set:
            raw = config.to_json()
            for assignment in args.set:
                _apply_override(raw, assignment)
            config = parse_config(raw)
    except ValidationFailed as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    from gatt.masks import TemplateError
    from workers.engine.models import ModelError
    from workers.engine.pipeline import NoAcceptedSamples
    from workers.engine.sample_stage import OtherSamples
    from workers.engine.vllm import SamplerUnavailable

    try:
        result = run_job(
            config,
            printing_hooks(),
            vllm_url=args.vllm_url,
            train_processes=args.train_processes,
            train_sharding=args.train_sharding,
        )
    except (
        ModelError,
        NoAcceptedSamples,
        OtherSamples,
        SamplerUnavailable,
        TemplateError,
        ValidationFailed,
        FileNotFoundError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: str(v) if hasattr(v, "parts") else v for k, v in result.__dict__.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
