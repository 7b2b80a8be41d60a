"""One GAtt job, stage by stage: synthesize -> sample (and rank: `sample_stage.py`) -> build the
training set -> train, as many rounds as the job asks (`rounds.py`).

Everything a stage finishes is on disk before the next starts, and a restarted job reuses it:
each sampled dialogue is one appended line of `samples.jsonl`, and training resumes from its
last checkpoint. Artifacts in `output_dir`:

    config.json           the job config as run
    instruction_values.json  values.enabled: the family values the model listed (reused on a rerun)
    instructions.jsonl    the synthesized instruction of each dialogue
    samples.jsonl         every candidate with its reward, and the choice, per turn
    samples-settings.json what the samples depend on; a rerun with other settings is refused
    training_set.jsonl    the training dialogues with their trained spans in readable form
    train/                metrics.jsonl, metrics.csv, checkpoints/step-XXXXXX/
    rounds/<r>/           rounds.count > 1: round r's instructions.jsonl ("fresh"), samples.jsonl,
                          samples-settings.json, training_set.jsonl and train/ (`rounds.py`)
    rounds.json           each finished round's reward statistics and training
    summary.json          what the job did, at the end
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatt.dialogues import Dialogue, parse_corpus
from gatt.errors import GattError
from gatt.instructions import (
    InstructionSet,
    default_instruction_set,
    parse_instruction_set,
    synthesize,
)
from gatt.selection import Selection, summarize
from workers.engine.config import JobConfig
from workers.engine.eval_stage import Evaluation
from workers.engine.files import write_json, write_jsonl
from workers.engine.hooks import Hooks, Stage
from workers.engine.launch import train_ranks
from workers.engine.models import LoadedModel, ModelError, load_model
from workers.engine.rounds import offset_hooks, round_dir, round_report, round_seed, write_rounds
from workers.engine.sample_stage import (
    SAMPLES,
    check_samples,
    sample_dialogues,
    sampling_settings,
    turn_selection,
)
from workers.engine.sampling import Sampler
from workers.engine.training import train
from workers.engine.training_set import build_training_set
from workers.engine.values import VALUES_FILE, values_for_job
from workers.engine.vllm import SamplerUnavailable, job_sampler


class NoAcceptedSamples(GattError, RuntimeError):
    """Every sampled turn fell below the minimum reward: there is nothing to train on."""

    job_code = "no_accepted_samples"


@dataclass
class JobResult:
    output_dir: Path
    dialogues: int
    sampled_dialogues: int
    examples: int
    trained_tokens: int
    selection: dict[str, Any]
    final_checkpoint: Path | None
    final_metrics: dict[str, float]
    wall_s: float
    rounds: int = 1  # of sample, rank and train (`rounds.py`); the counts above are the last round's


def run_job(
    config: JobConfig,
    hooks: Hooks | None = None,
    *,
    loaded: LoadedModel | None = None,
    allowed_roots: list[Path] | None = None,
    vllm_url: str | None = None,
    train_processes: int = 1,
    train_sharding: str = "auto",
) -> JobResult:
    """Run (or resume) a whole job. `loaded` lets a caller reuse a model it already holds (it must
    not have been trained yet); `allowed_roots` confines model paths (the service passes its
    configured model roots); `vllm_url` is the worker's vLLM server (`sampling.backend`);
    `train_processes` > 1 trains in that many torchrun ranks, one per GPU, sharding the model over
    them as `train_sharding` says (`launch.py`)."""
    hooks = hooks or Hooks()
    started = time.monotonic()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _stage(hooks, Stage.SYNTHESIZE)
    dialogues, heldout = split_heldout(config, load_dialogues(config))
    if config.values.enabled:
        # The model lists some families' values itself (workers/engine/values.py): load it first.
        loaded = _job_model(config, loaded, allowed_roots)
    instruction_set = load_instruction_set(config, loaded=loaded, hooks=hooks)
    drawn = [synthesize(instruction_set, len(dialogues), seed=config.seed)]
    fresh = config.rounds.instructions == "fresh"
    for r in range(2, config.rounds.count + 1):
        drawn.append(
            synthesize(instruction_set, len(dialogues), seed=round_seed(config.seed, r))
            if fresh
            else drawn[0]
        )
    # Before anything is written: a rerun with settings its samples were not drawn with changes nothing.
    for r, instructions in enumerate(drawn, 1):
        check_samples(round_dir(out, r) / SAMPLES, sampling_settings(config, dialogues, instructions, r))
    hooks.fence()
    write_json(out / "config.json", config.to_json())
    write_jsonl(out / "instructions.jsonl", [i.to_json() for i in drawn[0]])

    loaded = _job_model(config, loaded, allowed_roots)
    evaluation = None
    reports: list[dict[str, Any]] = []
    all_selections: list[Selection] = []
    trained: Path | None = None  # the last round's final checkpoint
    for r in range(1, config.rounds.count + 1):
        where = round_dir(out, r)
        where.mkdir(parents=True, exist_ok=True)
        instructions = drawn[r - 1]
        if r > 1 and config.rounds.instructions == "fresh":
            hooks.fence()
            write_jsonl(where / "instructions.jsonl", [i.to_json() for i in instructions])
        _stage(hooks, Stage.SAMPLE)
        # The model the round before made (a LoRA adapter vLLM can load), or the job's.
        with _sampler(config, loaded, vllm_url, hooks, r, trained) as sampler:
            records = sample_dialogues(
                config,
                loaded,
                dialogues,
                instructions,
                where / SAMPLES,
                hooks,
                allowed_roots=allowed_roots,
                round_=r,
                sampler=sampler,
            )
        selections = [turn_selection(turn) for record in records for turn in record["turns"]]
        all_selections += selections
        examples = build_training_set(
            config, loaded.tokenizer, records, where / "training_set.jsonl", hooks, dialogues=dialogues
        )
        if not examples:
            raise NoAcceptedSamples(
                f"no accepted samples to train on{f' in round {r}' if r > 1 else ''}: no candidate "
                "reached reward.min_reward (or, for a DPO objective, no turn had a candidate ranked "
                "below its kept one); lower the threshold, raise sampling.k, or choose instructions "
                "the model can follow"
            )
        if r == 1 and config.evaluation.enabled:
            # Before training: train() turns the model into the trained one in place.
            _stage(hooks, Stage.EVALUATE)
            evaluation = Evaluation(
                config, instruction_set, dialogues, instructions, heldout, out / "evaluation"
            )
            if not evaluation.done("base"):  # a resumed job loads no adapter for nothing
                with _sampler(config, loaded, vllm_url, hooks, 1, None, evaluating=True) as sampler:
                    evaluation.run("base", loaded, hooks, sampler)

        _stage(hooks, Stage.TRAIN)
        first_step = sum(report["steps"]["last"] - report["steps"]["first"] + 1 for report in reports) + 1
        train_hooks = offset_hooks(hooks, first_step - 1)
        base_model = _adapter_base(config, loaded)
        # A later round's manifests count their steps from 1: say where the job's numbering starts.
        lineage = (
            {**(config.lineage or {}), "round": {"round": r, "first_step": first_step}}
            if config.rounds.count > 1
            else config.lineage
        )
        if train_processes > 1:
            result = train_ranks(
                config,
                loaded,
                examples,
                where / "train",
                processes=train_processes,
                sharding=train_sharding,
                start=str(trained) if trained is not None else config.model,
                hooks=train_hooks,
                base_model=base_model,
                lineage=lineage,
                allowed_roots=allowed_roots,
            )
        else:
            result = train(
                loaded.model,
                loaded.tokenizer,
                examples,
                config.training,
                where / "train",
                hooks=train_hooks,
                base_model=base_model,
                lineage=lineage,
            )
        # The next round samples with the trained model (for LoRA the peft model train() made).
        loaded = dataclasses.replace(loaded, model=result.model)
        trained = Path(result.checkpoint) if result.checkpoint else None
        trained_tokens = sum(e.n_trained for e in examples)
        final_metrics = result.metrics[-1] if result.metrics else {}
        reports.append(
            round_report(
                r,
                records,
                selections,
                config.sampling.batch_prompts,
                examples=len(examples),
                trained_tokens=trained_tokens,
                first_step=first_step,
                steps=result.steps,
                final_loss=final_metrics.get("loss"),
            )
        )
        write_rounds(out, reports, hooks)

    if evaluation is not None:
        _stage(hooks, Stage.EVALUATE)
        # The trained model, as a round after the last would sample it.
        last = config.rounds.count + 1
        if not evaluation.done("gatt"):
            with _sampler(config, loaded, vllm_url, hooks, last, trained, evaluating=True) as sampler:
                evaluation.run("gatt", loaded, hooks, sampler)
        evaluation.finish(hooks)
    job = JobResult(
        output_dir=out,
        dialogues=len(dialogues),
        sampled_dialogues=len(records),
        examples=len(examples),
        trained_tokens=trained_tokens,
        selection=summarize(all_selections).to_json(),
        final_checkpoint=Path(result.checkpoint) if result.checkpoint else None,
        final_metrics=dict(final_metrics),
        wall_s=time.monotonic() - started,
        rounds=len(reports),
    )
    hooks.fence()
    write_json(out / "summary.json", _jsonable(job.__dict__))
    _stage(hooks, Stage.DONE)
    return job


@contextlib.contextmanager
def _sampler(
    config: JobConfig,
    loaded: LoadedModel,
    vllm_url: str | None,
    hooks: Hooks,
    round_: int,
    trained: Path | None,
    *,
    evaluating: bool = False,
) -> Iterator[Sampler | None]:
    """The vLLM sampler for round `round_` (None: the loop), closed (its adapter unloaded) on the
    way out. `evaluating`: the evaluate stage, which falls back to the loop with a warning where
    the server cannot hold the model (full fine-tuning) even when `sampling.backend` is vllm:
    the job has trained by then, and the loop measures the same model."""
    where = {"round": round_} if not evaluating else {"stage": "evaluate"}

    def warn(message: str) -> None:
        hooks.event("warning", "sampler_fallback", message, where)

    try:
        sampler = job_sampler(config, loaded, vllm_url, round_, adapter=trained, warn=warn)
    except SamplerUnavailable as exc:
        if not evaluating:
            raise
        warn(f"evaluating with the engine's loop: {exc}")
        sampler = None
    try:
        yield sampler
    finally:
        if sampler is not None:
            sampler.close()


def _adapter_base(config: JobConfig, loaded: LoadedModel) -> str:
    """The base weights a checkpoint applies to: by the service's name where the job has one (a
    model id, or the full checkpoint it continues), else the embedded default by name and anything
    else by its directory."""
    lineage = config.lineage
    if lineage:
        return lineage.get("adapter_base") or lineage["base_model"]
    return loaded.base_name or str(loaded.base_dir)


def load_dialogues(config: JobConfig) -> list[Dialogue]:
    """The whole corpus; `split_heldout` decides what is trained on."""
    with open(config.data.corpus, "rb") as f:
        return parse_corpus(f)


def split_heldout(config: JobConfig, dialogues: list[Dialogue]) -> tuple[list[Dialogue], list[Dialogue]]:
    """(dialogues to sample and train on, dialogues held out for evaluation). With evaluation on,
    the first `heldout_dialogues` of the validation corpus are held out, or without one the corpus's
    last `heldout_dialogues`; max_dialogues applies to the rest."""
    heldout: list[Dialogue] = []
    if config.evaluation.enabled:
        n = config.evaluation.heldout_dialogues
        if config.data.validation is not None:
            with open(config.data.validation, "rb") as f:
                heldout = parse_corpus(f)[:n]
        elif n >= len(dialogues):
            raise ValueError(
                f"evaluation.heldout_dialogues is {n} but the corpus has only {len(dialogues)} dialogues"
            )
        else:
            dialogues, heldout = dialogues[:-n], dialogues[-n:]
    return (dialogues[: config.data.max_dialogues] if config.data.max_dialogues else dialogues), heldout


def load_instruction_set(
    config: JobConfig, *, loaded: LoadedModel | None = None, hooks: Hooks | None = None
) -> InstructionSet:
    if config.data.instructions == "default":
        instruction_set = default_instruction_set()
    else:
        with open(config.data.instructions, encoding="utf-8") as f:
            instruction_set = parse_instruction_set(json.load(f))
    if config.values.enabled:
        if loaded is None:
            raise ValueError("values.enabled: the model must be loaded before synthesis")
        path = Path(config.output_dir) / VALUES_FILE
        instruction_set = values_for_job(instruction_set, loaded, config, path, hooks or Hooks())
    return instruction_set


def _job_model(
    config: JobConfig, loaded: LoadedModel | None, allowed_roots: list[Path] | None
) -> LoadedModel:
    """`loaded`, or the job's model loaded now; refused before any sampling if it cannot be trained.

    A LoRA checkpoint as the model: LoRA training goes on training its adapter (same shape), full
    fine-tuning starts from the adapter merged into its base."""
    if loaded is None:
        loaded = load_model(
            config.model,
            device=config.device,
            dtype=config.dtype,
            allowed_roots=allowed_roots,
            base=config.base_model,
        )
    if hasattr(loaded.model, "peft_config"):
        if config.training.method == "full":
            return dataclasses.replace(loaded, model=loaded.model.merge_and_unload())
        adapter = loaded.model.peft_config["default"]
        if (adapter.r, adapter.lora_alpha) != (config.training.lora_r, config.training.lora_alpha):
            # Checked before sampling, which would otherwise be wasted.
            raise ModelError(
                "adapter_mismatch",
                f"the model is a LoRA checkpoint with r={adapter.r} and lora_alpha={adapter.lora_alpha}; "
                "continue it with the same training.lora_r and lora_alpha, or use training.method: full",
            )
    return loaded


# --- small helpers ---------------------------------------------------------------------------


def _stage(hooks: Hooks, stage: Stage) -> None:
    hooks.event("info", "stage", stage.value, {"stage": stage.value})
    hooks.stage(stage)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj
