"""One GAtt job, stage by stage: synthesize -> sample (and rank: `sample_stage.py`) -> build the
training set -> train, as many rounds as the job asks (`rounds.py`).

Everything a stage finishes is on disk before the next starts, and a restarted job reuses it:
each sampled dialogue is one appended line of `samples.jsonl`, and training resumes from its
last checkpoint. Artifacts in `output_dir`:

    config.json           the job config as run
    instruction_values.json  values.enabled: the family values the model listed (reused on a rerun)
    instructions.jsonl    the synthesized instruction of each dialogue
    samples.jsonl         every candidate with its reward, and the choice, per turn
    training_set.jsonl    the training dialogues with their trained spans in readable form
    train/                metrics.jsonl, metrics.csv, checkpoints/step-XXXXXX/
    rounds/<r>/           rounds.count > 1: round r's instructions.jsonl ("fresh"), samples.jsonl,
                          training_set.jsonl and train/ (`rounds.py`)
    rounds.json           each finished round's reward statistics and training
    summary.json          what the job did, at the end
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatt.augment import corpus_history, training_dialogue
from gatt.dialogues import Dialogue, leading_replies, parse_corpus
from gatt.errors import GattError
from gatt.instructions import (
    Instruction,
    InstructionSet,
    default_instruction_set,
    parse_instruction_set,
    synthesize,
)
from gatt.masks import (
    TemplateError,
    TokenizedExample,
    build_examples,
    trained_text,
)
from gatt.selection import Selection, summarize
from workers.engine.config import JobConfig
from workers.engine.dpo import PreferencePair
from workers.engine.hooks import Hooks, Stage
from workers.engine.launch import train_ranks
from workers.engine.models import LoadedModel, ModelError, load_model
from workers.engine.pairs import preference_pairs
from workers.engine.rounds import offset_hooks, round_dir, round_report, round_seed, write_rounds
from workers.engine.sample_stage import sample_dialogues, turn_selection
from workers.engine.training import train
from workers.engine.values import VALUES_FILE, values_for_job
from workers.engine.vllm import job_sampler


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
    hooks.fence()
    _write_json(out / "config.json", config.to_json())

    _stage(hooks, Stage.SYNTHESIZE)
    dialogues, heldout = split_heldout(config, load_dialogues(config))
    if config.values.enabled:
        # The model lists some families' values itself (workers/engine/values.py): load it first.
        loaded = _job_model(config, loaded, allowed_roots)
    instruction_set = load_instruction_set(config, loaded=loaded, hooks=hooks)
    instructions = synthesize(instruction_set, len(dialogues), seed=config.seed)
    hooks.fence()
    _write_jsonl(out / "instructions.jsonl", [i.to_json() for i in instructions])

    loaded = _job_model(config, loaded, allowed_roots)
    evaluation = None
    reports: list[dict[str, Any]] = []
    all_selections: list[Selection] = []
    trained: Path | None = None  # the last round's final checkpoint
    for r in range(1, config.rounds.count + 1):
        where = round_dir(out, r)
        where.mkdir(parents=True, exist_ok=True)
        if r > 1 and config.rounds.instructions == "fresh":
            instructions = synthesize(instruction_set, len(dialogues), seed=round_seed(config.seed, r))
            hooks.fence()
            _write_jsonl(where / "instructions.jsonl", [i.to_json() for i in instructions])
        _stage(hooks, Stage.SAMPLE)
        sampler = job_sampler(
            config,
            loaded,
            vllm_url,
            r,
            adapter=trained,  # the model the round before made; a LoRA one vLLM can load
            warn=lambda message, r=r: hooks.event("warning", "sampler_fallback", message, {"round": r}),
        )
        try:
            records = sample_dialogues(
                config,
                loaded,
                dialogues,
                instructions,
                where / "samples.jsonl",
                hooks,
                allowed_roots=allowed_roots,
                round_=r,
                sampler=sampler,
            )
        finally:
            if sampler is not None:
                sampler.close()
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
            evaluation.run("base", loaded, hooks)

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
        evaluation.run("gatt", loaded, hooks)
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
    _write_json(out / "summary.json", _jsonable(job.__dict__))
    _stage(hooks, Stage.DONE)
    return job


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


# --- evaluation ------------------------------------------------------------------------------


class Evaluation:
    """The evaluate stage, run on the base model before training and on the trained one after.

    Each report is written as soon as it exists, so a resumed job does not evaluate twice.
    Files in `directory`: base.json, gatt.json, adherence.json ({base, gatt, compare, overlap,
    table}), adherence_summary.json (adherence.json without the transcripts), attention.json and
    attention.png.
    """

    def __init__(
        self, config, instruction_set, train_dialogues, train_instructions, heldout, directory: Path
    ):
        from workers.engine.evaluation import check_overlap, eval_instructions

        self.config = config
        self.settings = config.evaluation.adherence(seed=config.seed)
        self.heldout = heldout
        self.instructions = eval_instructions(
            instruction_set, len(heldout), self.settings, train_seed=config.seed
        )
        self.overlap = check_overlap(train_dialogues, train_instructions, heldout, self.instructions)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def run(self, label: str, loaded: LoadedModel, hooks: Hooks) -> None:
        from workers.engine.attention import attention_report
        from workers.engine.evaluation import evaluate_adherence
        from workers.engine.validation import validation_loss

        path = self.directory / f"{label}.json"
        if path.exists():
            return
        placement = self.config.placement
        adherence = evaluate_adherence(
            loaded, self.heldout, self.instructions, self.settings, placement=placement, hooks=hooks
        )
        attention = None
        if self.config.evaluation.attention:
            attention = attention_report(
                loaded,
                self.heldout,
                self.instructions,
                self.settings,
                placement=placement,
                transcripts=adherence["transcripts"].get("once"),
                hooks=hooks,
            )
        validation = validation_loss(loaded, self.heldout, self.config.training.max_seq_len)
        hooks.fence()
        _write_json(path, {"adherence": adherence, "attention": attention, "validation": validation})

    def finish(self, hooks: Hooks) -> dict[str, Any]:
        from workers.engine.attention import plot_attention
        from workers.engine.eval_report import compare, format_table

        base = json.loads((self.directory / "base.json").read_text())
        gatt = json.loads((self.directory / "gatt.json").read_text())
        hooks.fence()
        report = {
            "base": base["adherence"],
            "gatt": gatt["adherence"],
            "compare": compare(base["adherence"], gatt["adherence"]),
            "overlap": self.overlap,
            "table": format_table(base["adherence"], gatt["adherence"]) + _loss_line(base, gatt),
            # Files of a job evaluated before validation loss existed have none.
            "validation_loss": {"base": base.get("validation"), "gatt": gatt.get("validation")},
        }
        _write_json(self.directory / "adherence.json", report)
        # The same without the transcripts (every reply of every run), which make it large: what the
        # API serves as the job's evaluation, read whole, while tools use the full report.
        summary = {**report, **{m: _without_transcripts(report[m]) for m in ("base", "gatt")}}
        _write_json(self.directory / SUMMARY, summary)
        if base["attention"] and gatt["attention"]:
            _write_json(
                self.directory / "attention.json", {"base": base["attention"], "gatt": gatt["attention"]}
            )
            plot_attention(
                {"base": base["attention"], "gatt": gatt["attention"]}, self.directory / "attention.png"
            )
        return report


SUMMARY = "adherence_summary.json"


def _loss_line(base: dict[str, Any], gatt: dict[str, Any]) -> str:
    before, after = (report.get("validation") or {} for report in (base, gatt))
    if before.get("loss") is None or after.get("loss") is None:
        return ""
    return (
        f"\n\nValidation loss (the held-out dialogues' own replies, no instruction; "
        f"{after['tokens']} tokens): before {before['loss']:.4f}, after {after['loss']:.4f}\n"
    )


def _without_transcripts(model_report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_report.items() if k != "transcripts"}


# --- training set ----------------------------------------------------------------------------


def build_training_set(
    config: JobConfig,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    path: Path,
    hooks: Hooks,
    *,
    dialogues: Sequence[Dialogue] = (),
) -> list[TokenizedExample] | list[PreferencePair]:
    """Turn sampled dialogues into loss-masked examples (or, for a DPO objective, preference pairs:
    `pairs.py`) and write them in readable form.

    `dialogues` (indexed by each record's `index`) supplies the corpus's replies that
    `data.train_history` "corpus" and "both" put before each sampled reply, and the plain
    dialogues `data.replay` adds."""
    if config.training.objective != "sft":
        pairs, rows = preference_pairs(config, tokenizer, records, dialogues, hooks)
        replayed: list[TokenizedExample] = []
        rows += _replay(config, tokenizer, dialogues, len(rows), hooks, replayed)  # none without pairs
        hooks.fence()
        _write_jsonl(path, rows)
        # A replayed dialogue has no rejected reply: under sft+dpo it trains by cross-entropy alone.
        return [*pairs, *(PreferencePair(e, None) for e in replayed)]
    examples: list[TokenizedExample] = []
    rows = []
    history = config.data.train_history
    for record in records:
        if not any(record["trained"]):
            continue
        views: list[tuple[str, list[str], list[bool]]] = []
        if history in ("sampled", "both"):
            views.append(("sampled", record["replies"], record["trained"]))
        if history in ("corpus", "both"):
            corpus_replies = [reply for _, reply in dialogues[record["index"]].turns]
            views.extend(
                ("corpus", replies, trained)
                for replies, trained in corpus_history(
                    record["replies"], record["trained"], corpus_replies, include_first=history == "corpus"
                )
            )
        for view, replies, trained in views:
            row = _training_example(config, tokenizer, record, replies, trained, hooks, examples)
            if row is not None:
                rows.append({"history": view, **row})
    rows += _replay(config, tokenizer, dialogues, len(rows), hooks, examples)
    hooks.fence()
    _write_jsonl(path, rows)
    return examples


def _replay(
    config: JobConfig,
    tokenizer: Any,
    dialogues: Sequence[Dialogue],
    n_rows: int,
    hooks: Hooks,
    examples: list[TokenizedExample],
) -> list[dict[str, Any]]:
    """`data.replay` plain corpus dialogues per training row: their examples appended to
    `examples`, their rows returned."""
    rows = []
    for record in _replay_records(config, dialogues, round(config.data.replay * n_rows)):
        row = _training_example(
            config, tokenizer, record, record["replies"], record["trained"], hooks, examples
        )
        if row is not None:
            rows.append({"history": "replay", **row})
    return rows


def _replay_records(config: JobConfig, dialogues: Sequence[Dialogue], n: int) -> list[dict[str, Any]]:
    """`n` corpus dialogues drawn with the job's seed (each at most once), as plain records: no
    instruction, every corpus reply of the first `data.max_turns` turns trained."""
    order = random.Random(config.seed).sample(range(len(dialogues)), k=min(n, len(dialogues)))
    records = []
    for i in order:
        turns = dialogues[i].turns[: config.data.max_turns]
        replies = leading_replies([reply for _, reply in turns])
        if replies:
            users = [user for user, _ in turns[: len(replies)]]
            records.append(
                {
                    "index": i,
                    "dialogue_id": dialogues[i].id,
                    "instruction": None,
                    "system": dialogues[i].system,
                    "users": users,
                    "replies": replies,
                    "trained": [True] * len(replies),
                }
            )
    return records


def _training_example(
    config: JobConfig,
    tokenizer: Any,
    record: dict[str, Any],
    replies: Sequence[str],
    trained: Sequence[bool],
    hooks: Hooks,
    examples: list[TokenizedExample],
) -> dict[str, Any] | None:
    """Append one training dialogue's masked examples to `examples`; its readable row, or None
    when its template refuses it."""
    instruction = record["instruction"]
    dialogue = training_dialogue(
        Instruction.from_json(instruction).text if instruction is not None else None,
        record["users"][: len(replies)],
        replies,
        trained,
        system=record["system"],
        placement=config.placement,
    )
    try:
        masked = build_examples(tokenizer, dialogue, config.loss_scope)
    except TemplateError as exc:
        hooks.event("warning", "template", f"dialogue {record['index']} skipped: {exc}", {})
        return None
    if masked.fallback_reason:
        hooks.event("warning", "loss_scope_fallback", masked.fallback_reason, {"dialogue": record["index"]})
    examples.extend(masked.examples)
    return {
        "index": record["index"],
        "dialogue_id": record["dialogue_id"],
        "scope": masked.scope,
        "fallback_reason": masked.fallback_reason,
        "messages": list(dialogue.messages),
        "trained": list(dialogue.trained),
        "trained_spans": [trained_text(tokenizer, e) for e in masked.examples],
        "tokens": masked.n_tokens,
        "trained_tokens": masked.n_trained,
    }


# --- small helpers ---------------------------------------------------------------------------


def _stage(hooks: Hooks, stage: Stage) -> None:
    hooks.event("info", "stage", stage.value, {"stage": stage.value})
    hooks.stage(stage)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: Sequence[Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj
