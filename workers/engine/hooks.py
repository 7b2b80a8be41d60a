"""How the engine reports to whoever runs it (the CLI prints, the Celery task writes Postgres).

Every hook is optional and cheap to call; the engine never depends on what a hook does, except
`should_stop`, which it checks between batches and optimiser steps so that a cancel takes effect
within one step, and `fence`, which it calls before it writes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Stage(enum.StrEnum):
    """The stages of a job, in the order they start (`evaluate` runs before and after `train`)."""

    SYNTHESIZE = "synthesize"
    SAMPLE = "sample"
    EVALUATE = "evaluate"
    TRAIN = "train"
    DONE = "done"


@dataclass
class Hooks:
    # (stage, done, total): progress of the current stage in its own units (dialogues, steps).
    progress: Callable[[str, int, int], None] = lambda stage, done, total: None
    # (level, kind, message, data): append-only events: stage changes, warnings, errors.
    event: Callable[[str, str, str, dict[str, Any]], None] = lambda level, kind, message, data: None
    # (step, metrics): one row per optimiser step.
    metrics: Callable[[int, dict[str, float]], None] = lambda step, metrics: None
    # (step, path, manifest): after a checkpoint is completely written.
    checkpoint: Callable[[int, str, dict[str, Any]], None] = lambda step, path, manifest: None
    # (stage): a stage starts; also reported as an event of kind "stage".
    stage: Callable[[Stage], None] = lambda stage: None
    should_stop: Callable[[], bool] = lambda: False
    # (tokens): tokens generated while sampling a chunk of dialogues, for the worker's counters.
    sampled: Callable[[int], None] = lambda tokens: None
    # Called right before each write to the job's files; raises `Stopped` when this run no longer
    # owns the job (another worker took it over), so that two runs never write the same files.
    fence: Callable[[], None] = lambda: None


class Stopped(Exception):
    """Raised inside the engine when `Hooks.should_stop()` said yes; work done so far is kept."""
