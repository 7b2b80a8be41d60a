"""The typed configuration of one GAtt job: one pydantic model, read from YAML or JSON, checked strictly.

One file describes a whole job (model, data, and a section per stage). `JobOptions` is what a
request may set (the API publishes its JSON schema: every field with its default, bounds and the
docstring under it); `JobConfig` adds what only the server decides (model, paths, device).
Unknown keys are errors with a "did you mean" (a typo must not silently fall back to a default),
numbers are not strings or booleans, and every problem is reported at once with its dotted path
("sampling.top_p"). Importable without torch: the API validates with it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator
from pydantic import StrictBool as Bool
from pydantic import StrictInt as Int
from pydantic import StrictStr as Str

from gatt.augment import Placement
from gatt.errors import Problem, ValidationFailed, did_you_mean
from gatt.masks import Scope
from gatt.repetition import DEFAULT_MAX_ECHO

Float = Annotated[float, Strict()]  # an int is taken as a float; a bool or a string is not
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]  # mixed into torch/numpy generators
Share = Annotated[float, Strict(), Field(gt=0.0, le=1.0)]
Method = Literal["lora", "full"]
Schedule = Literal["cosine", "linear", "constant"]
Packing = Literal["auto", "packed", "padded"]
Switch = Literal["auto", "on", "off"]
Condition = Literal["none", "once", "every_turn", "none_fixed", "once_fixed", "every_turn_fixed"]

# Upper bounds of every size a job's config sets: a job is a tenant's request, and nothing it asks
# for may be unbounded (work, memory, disk). Generous for real jobs; each is named in the error.
LIMITS: dict[str, int] = {
    "k": 64,  # candidates per prompt (also values.samples)
    "retries": 8,  # sampling.retries: more draws of K for a turn with no acceptable candidate
    "max_new_tokens": 4096,
    "batch_prompts": 256,
    "batch_size": 1024,  # reward-model batch
    "weight": 100,  # reward weights
    "lora_r": 512,
    "lora_alpha": 8192,
    "lora_targets": 64,  # module names in a list
    "steps": 1_000_000,  # max_steps, warmup_steps, checkpoint_every
    "epochs": 100,
    "micro_batch_size": 512,
    "micro_batch_tokens": 1_048_576,
    "grad_accum": 1024,
    "max_seq_len": 131_072,
    "keep_checkpoints": 50,
    "families": 32,  # values.families
    "per_family": 200,  # values proposed or required per family
    "temperature": 10,
    "dialogues": 1_000_000,  # data.max_dialogues
    "turns": 64,  # data.max_turns: a corpus dialogue has at most 64 turns
    "replay": 10,  # plain corpus dialogues per GAtt example
    "rounds": 10,
    "name_chars": 1024,  # paths and module names
}
# Evaluation: own context (the model's earlier replies), then fixed context (the corpus's earlier
# replies); its bounds hold for the API's evaluation section and for workers/evaluate.py.
CONDITIONS: tuple[str, ...] = ("none", "once", "every_turn", "none_fixed", "once_fixed", "every_turn_fixed")
MAX_TURNS = 64  # gatt.dialogues.CorpusLimits.max_turns
EVAL_LIMITS = {
    "turns": MAX_TURNS,
    "dialogues": 4096,
    "instructions_per_dialogue": 1024,  # workers/probe.py runs every instruction of a set
    "max_new_tokens": 2048,
    "batch_prompts": 256,
    "samples_per_turn": 100,
}
_MODULE_NAMES = re.compile(r"[A-Za-z0-9_.]+(\|[A-Za-z0-9_.]+)*")
Name = Annotated[str, Strict(), Field(min_length=1, max_length=LIMITS["name_chars"])]
Beta = Annotated[float, Strict(), Field(ge=0.0, lt=1.0)]
FamilyName = Annotated[str, Strict(), Field(min_length=1, max_length=64, pattern=r"\S")]


class Section(BaseModel):
    """A config section: immutable, closed (unknown keys are errors), finite numbers only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# pydantic reads this off the dataclass when a job config embeds it: unknown keys are errors there too.
Placement.__pydantic_config__ = ConfigDict(extra="forbid", use_attribute_docstrings=True)  # type: ignore[attr-defined]


class SamplingConfig(Section):
    """Sampling K candidate replies for every sampled assistant turn (workers/engine/sampling.py)."""

    k: Int = Field(4, ge=1, le=LIMITS["k"])
    """Candidates per prompt."""
    retries: Int = Field(0, ge=0, le=LIMITS["retries"])
    """Draws of K more candidates for a turn where none is acceptable, before the dialogue ends
    there; the turn is ranked over all its candidates. Spends sampling where the instruction is
    hard to follow (often a dialogue's first turn) rather than raising K everywhere."""
    temperature: Float = Field(0.8, ge=0.0, le=LIMITS["temperature"])
    """0 means greedy (argmax); top_p is then irrelevant."""
    top_p: Share = 0.95
    """Nucleus: sample from the smallest set of tokens holding this much probability."""
    max_new_tokens: Int = Field(96, ge=1, le=LIMITS["max_new_tokens"])
    """Longest reply sampled, in tokens; a cut reply is trimmed to its last sentence."""
    batch_prompts: Int = Field(8, ge=1, le=LIMITS["batch_prompts"])
    """Prompts per prefill; the decode batch is batch_prompts * k rows."""
    seed: Seed = 0
    """Mixed with the job's seed for sampling."""
    backend: Literal["auto", "loop", "vllm"] = "auto"
    """Who samples: `loop`, the engine's own loop on the job's model (workers/engine/sampling.py);
    `vllm`, the worker's vLLM server (workers/engine/vllm.py: GATT_VLLM_URL, serving the job's
    model under its name; later rounds of a LoRA job load the previous round's adapter into it);
    `auto`, the vLLM server on a GPU worker that has one, for every round it can sample (the loop
    for later rounds of full fine-tuning, or where the server cannot load adapters), else the loop."""
    compile: Bool = False
    """Decode steps through torch.compile (CUDA graphs on a GPU, about 3x faster there): launch
    overhead dominates GPU decoding of small batches. Costs a compilation of 20-30 s per prompt
    batch shape; each shape's cache is kept for the next batch of that shape, so its graphs
    replay rather than record again."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class RewardConfig(Section):
    """Ranking the candidates of a turn and keeping the best (workers/engine/rewards.py)."""

    verifier_weight: Float = Field(1.0, ge=0.0, le=LIMITS["weight"])
    """Weight of the instruction's verifiers (each scores 0 to 1) in the reward."""
    reward_model: Name | None = None
    """A local directory of a sequence-classification model, under one of the server's model roots."""
    reward_model_weight: Float = Field(0.0, ge=0.0, le=LIMITS["weight"])
    """Weight of the reward model's score; > 0 needs reward_model."""
    min_reward: Float | None = Field(0.5, ge=0.0, le=1.0)
    """A turn whose best candidate scores lower is dropped."""
    batch_size: Int = Field(16, ge=1, le=LIMITS["batch_size"])
    """Candidates per reward-model forward pass."""
    max_repeat_similarity: Share | None = 0.8
    """A candidate at least this similar to an earlier reply of its dialogue never wins
    (gatt/repetition.py); null: no check."""
    max_echo: Share | None = DEFAULT_MAX_ECHO
    """A candidate that repeats at least this share of the question it answers never wins
    (gatt/repetition.py, echo_share); null: no check."""
    relevance_weight: Float = Field(0.0, ge=0.0, le=LIMITS["weight"])
    """Weight of relevance in the reward: the cosine of the question and the reply without the
    instruction's words (gatt/relevance.py). 0: not in the reward."""
    min_relevance: Float | None = Field(None, ge=-1.0, le=1.0)
    """A candidate less relevant than this never wins; null: no floor (0.28 is what 95% of the
    corpus's real answers reach)."""
    prefer: Literal["relevant", "shorter", "longer"] = "relevant"
    """Among candidates with equal reward (common with 0/1 verifiers and no reward model), keep the
    most relevant one (then the longer), the shorter or the longer one."""

    @model_validator(mode="after")
    def _weights(self) -> RewardConfig:
        if self.verifier_weight + self.reward_model_weight + self.relevance_weight <= 0:
            raise ValueError("at least one reward weight must be > 0")
        if self.reward_model_weight > 0 and not self.reward_model:
            raise ValueError("reward_model_weight > 0 needs reward_model (a local directory)")
        return self

    @property
    def needs_relevance(self) -> bool:
        """Whether ranking uses relevance: weighted in, as a floor, or to break ties."""
        return self.relevance_weight > 0 or self.min_relevance is not None or self.prefer == "relevant"


class DpoConfig(Section):
    """Preference pairs from each sampled turn's ranked candidates, and the DPO loss on them
    (workers/engine/pairs.py, dpo.py `DPO`)."""

    beta: Float = Field(0.1, gt=0.0, le=LIMITS["weight"])
    """DPO's beta: how far from the reference model a log-probability margin may move the loss."""
    sft_weight: Float = Field(1.0, ge=0.0, le=LIMITS["weight"])
    """objective "sft+dpo": weight of the chosen reply's mean token cross-entropy beside each pair's
    DPO loss (TRL's rpo_alpha), and of each replayed corpus dialogue's."""
    rejected: Literal["worst", "repeats", "degenerate"] = "worst"
    """Which candidate of the turn is the rejected reply: the lowest-ranked ("worst"; refused
    candidates rank 0), or first a candidate refused for copying an earlier reply or echoing the
    question ("repeats"), or first one that says nothing, fewer than two words, such as emoji
    spam, even when it was cut before its first sentence ended ("degenerate"), then the
    lowest-ranked."""
    min_margin: Float = Field(0.1, ge=0.0, le=LIMITS["weight"])
    """A pair needs the chosen reply's ranked reward above the rejected one's by more than this
    (a verifier's confidence, as the language verifier's, may differ by 1e-5 between two replies
    that both pass)."""


class TrainConfig(Section):
    """Masked fine-tuning (workers/engine/training.py)."""

    objective: Literal["sft", "dpo", "sft+dpo"] = "sft"
    """"sft": GAtt's cross-entropy on the kept replies. "dpo": DPO on pairs of a turn's kept reply
    and a rejected candidate of the same turn, in the same training view (instruction only in the
    first turn), loss on the reply tokens only; the reference is the model as training starts (for
    a new LoRA adapter, the base model). "sft+dpo": DPO plus `dpo.sft_weight` times the kept reply's
    cross-entropy."""
    dpo: DpoConfig = DpoConfig()
    """Pair selection and the DPO loss (objective "dpo" or "sft+dpo")."""
    method: Method = "lora"
    """"lora" (adapters; the checkpoint holds only them) or "full" (every weight)."""
    lora_r: Int = Field(16, ge=1, le=LIMITS["lora_r"])
    """LoRA rank."""
    lora_alpha: Int = Field(32, ge=1, le=LIMITS["lora_alpha"])
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: Float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA path."""
    lora_targets: Name | tuple[Name, ...] = "all-linear"
    """"all-linear" (peft: every linear layer but the output head), module names joined by "|"
    ("q_proj|v_proj"), or a list of module names."""
    learning_rate: Float = Field(2e-4, gt=0.0, le=1.0)
    """Peak learning rate of AdamW, after warm-up."""
    weight_decay: Float = Field(0.0, ge=0.0, le=1.0)
    """AdamW weight decay."""
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """AdamW's (beta1, beta2)."""
    schedule: Schedule = "cosine"
    """Learning-rate decay after warm-up: cosine or linear to 0, or constant."""
    warmup_steps: Int = Field(0, ge=0, le=LIMITS["steps"])
    """Steps of linear warm-up from 0 to learning_rate."""
    max_steps: Int | None = Field(None, ge=1, le=LIMITS["steps"])
    """Optimiser steps; null: ceil(epochs * batches / grad_accum)."""
    epochs: Float = Field(1.0, gt=0.0, le=LIMITS["epochs"])
    """Passes over the training set (fractions allowed) when max_steps is null."""
    micro_batch_size: Int = Field(4, ge=1, le=LIMITS["micro_batch_size"])
    """Sequences per forward pass (unless micro_batch_tokens is set)."""
    micro_batch_tokens: Int | None = Field(None, ge=1, le=LIMITS["micro_batch_tokens"])
    """Fill micro-batches by tokens instead of micro_batch_size: packed rows of 4,096 tokens (as
    long as the longest example, rounded up to 128, where that is longer; the budget's length
    where that is shorter), micro_batch_tokens // that many rows (at least one), taking each
    epoch's examples in about their order until none of the next 16 fits. Every micro-batch then
    has one shape, which compiled layers on a GPU need to run at full speed: 45.6% MFU against
    41.9% by micro_batch_size on an H200 (docs/benchmarks.md, "GPU training"). Packs on any
    device; SFT only (DPO's pairs are padded). Another data order than micro_batch_size's, so a
    run resumes only with the same value."""
    grad_accum: Int = Field(1, ge=1, le=LIMITS["grad_accum"])
    """Micro-batches per optimiser step."""
    max_grad_norm: Float | None = Field(1.0, gt=0.0, le=1e6)
    """Gradient clipping; null: none (the gradient norm is still reported)."""
    max_seq_len: Int = Field(2048, ge=2, le=LIMITS["max_seq_len"])
    """Longer training sequences are cut (with a warning event)."""
    seed: Seed = 0
    """Mixed with the job's seed for shuffling and initialising the adapters."""
    checkpoint_every: Int = Field(0, ge=0, le=LIMITS["steps"])
    """Steps between checkpoints; 0: only the final checkpoint."""
    keep_checkpoints: Int = Field(2, ge=1, le=LIMITS["keep_checkpoints"])
    """How many checkpoints stay on disk; older ones are deleted. The newest (final) always stays."""
    merge_on_save: Bool = False
    """LoRA only: also write merged full weights into each checkpoint's `merged/`."""
    packing: Packing = "auto"
    """How a micro-batch's examples are laid out: "packed" end to end in rows as long as the longest
    example (attention stays within each example; on a GPU through flex attention), or "padded"
    one per row. The loss and the data order are the same either way. "auto": packed on a GPU,
    padded on a CPU."""
    compile: Switch = "auto"
    """torch.compile each decoder layer for training (the first steps pay for the compilation).
    "auto": on a GPU when packed."""

    @model_validator(mode="after")
    def _tokens_need_packing(self) -> TrainConfig:
        if self.micro_batch_tokens is not None and (self.packing == "padded" or self.objective != "sft"):
            raise ValueError(
                "micro_batch_tokens packs examples into rows: it needs packing auto or packed and "
                "objective sft (DPO's pairs are padded); use micro_batch_size instead"
            )
        return self

    @field_validator("lora_targets")
    @classmethod
    def _module_names(cls, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
        # peft matches a string as a regex over every module name (Python's re): only names and
        # alternatives, which cannot backtrack, are taken from a job.
        if isinstance(value, str) and value != "all-linear" and not _MODULE_NAMES.fullmatch(value):
            raise ValueError(
                "lora_targets must be 'all-linear', module names joined by '|' "
                f"(letters, digits, '_' and '.'), or a list of module names, not {value!r}"
            )
        if isinstance(value, tuple) and not 1 <= len(value) <= LIMITS["lora_targets"]:
            raise ValueError(f"lora_targets must list 1 to {LIMITS['lora_targets']} module names")
        return value


class EvaluationConfig(Section):
    """The evaluate stage: adherence by turn (and attention to the instruction) of the model before
    and after training, on dialogues held out from the corpus and instructions drawn with another
    seed (workers/engine/evaluation.py)."""

    enabled: Bool = False
    """Run the evaluate stage after training (it needs held-out dialogues)."""
    heldout_dialogues: Int = Field(8, ge=1, le=EVAL_LIMITS["dialogues"])
    """The last N dialogues of the corpus are held out: never sampled, never trained on."""
    turns: Int = Field(8, ge=1, le=EVAL_LIMITS["turns"])
    """As far as the held-out dialogues and the context go."""
    conditions: tuple[Condition, ...] = Field(
        ("once", "every_turn"), min_length=1, max_length=len(CONDITIONS)
    )
    """none / once / every_turn (the model's own earlier replies as context) and none_fixed /
    once_fixed / every_turn_fixed (the corpus's earlier replies: memory, not imitation)."""
    max_new_tokens: Int = Field(64, ge=1, le=EVAL_LIMITS["max_new_tokens"])
    """Longest reply generated per turn, in tokens."""
    pass_threshold: Float = Field(0.5, ge=0.0, le=1.0)
    """A turn adheres when its verifier score is at least this."""
    batch_prompts: Int = Field(8, ge=1, le=EVAL_LIMITS["batch_prompts"])
    """Prompts per generation batch."""
    attention: Bool = True
    """Also report the attention the last turn pays to the instruction (the paper's Figure 10)."""
    max_repeat_similarity: Share | None = 0.8
    """A reply at least this similar to an earlier reply of its dialogue scores 0 (gatt/repetition.py)."""
    max_echo: Share | None = DEFAULT_MAX_ECHO
    """A reply whose echo share of the question is at least this is not useful (gatt/repetition.py)."""
    relevance: Bool = True
    """Question-reply relevance by sentence embeddings (gatt/relevance.py)."""

    @field_validator("conditions")
    @classmethod
    def _distinct(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"conditions must not repeat, got {list(value)!r}")
        return value

    def adherence(self, seed: int = 0):
        from workers.engine.evaluation import EvalConfig  # torch-free module

        return EvalConfig(
            turns=self.turns,
            dialogues=self.heldout_dialogues,
            conditions=self.conditions,
            max_new_tokens=self.max_new_tokens,
            pass_threshold=self.pass_threshold,
            batch_prompts=self.batch_prompts,
            seed=seed,
            max_repeat_similarity=self.max_repeat_similarity,
            max_echo=self.max_echo,
            relevance=self.relevance,
        )


class DataOptions(Section):
    """Which dialogues are sampled, how, and what each kept reply is trained after."""

    max_dialogues: Int | None = Field(None, ge=1, le=LIMITS["dialogues"])
    """Use the first N dialogues of the corpus; null: all."""
    max_turns: Int = Field(3, ge=1, le=LIMITS["turns"])
    """User turns per dialogue to sample (the corpus may have more)."""
    sample_turns: Literal["all", "last"] = "all"
    """"last" (the paper's reading): keep the corpus's own earlier assistant turns as zero-loss
    context and sample only the last one. "all": sample every assistant turn in order, each on the
    earlier samples; small models follow the instruction far more often this way."""
    train_history: Literal["sampled", "corpus", "both"] = "sampled"
    """The history a sampled reply is trained on. "sampled": the dialogue as sampled (with
    sample_turns "all", the model's own adherent replies). "corpus": each reply alone after the
    corpus's own earlier replies, so that only the first turn's instruction explains it (memory, not
    imitation). "both": the sampled dialogue and the corpus view of turns 2 onwards."""
    replay: Float = Field(0.0, ge=0.0, le=LIMITS["replay"])
    """Plain corpus dialogues per GAtt training example (0.5: one for every two), with no
    instruction and loss on the corpus's own replies, so that the model keeps answering as it did
    where no instruction is given."""


class DataConfig(DataOptions):
    corpus: Name = "examples/dialogues.jsonl"
    validation: Name | None = None
    """A JSONL corpus the evaluation holds its dialogues out from; null: the corpus's tail."""
    instructions: Name = "default"
    """"default" (the paper-style set) or a JSON instruction-set file."""


class ValuesConfig(Section):
    """Values of some families listed by the chat model itself (the paper's hobbies and public
    figures), asked for before synthesis; see workers/engine/values.py."""

    enabled: Bool = False
    """Ask the model for the families' values before synthesis."""
    families: tuple[FamilyName, ...] = Field(("hobby", "public_figure"), max_length=LIMITS["families"])
    """The instruction-set families whose values the model lists."""
    per_family: Int = Field(30, ge=1, le=LIMITS["per_family"])
    """At most this many values proposed per family."""
    mode: Literal["replace", "merge"] = "merge"
    """"replace": the family's values become the model's; "merge": appended to the family's own."""
    min_values: Int = Field(5, ge=1, le=LIMITS["per_family"])
    """Fewer surviving proposals: the family keeps its own values."""
    max_new_tokens: Int = Field(160, ge=1, le=LIMITS["max_new_tokens"])
    """Longest list reply, in tokens."""
    temperature: Float = Field(0.7, ge=0.0, le=LIMITS["temperature"])
    """Sampling temperature of the list replies."""
    samples: Int = Field(4, ge=1, le=LIMITS["k"])
    """Replies sampled per family; their lists are merged."""


class RoundsConfig(Section):
    """Multi-round GAtt: round r samples with the model round r-1 trained, ranks, and trains it
    further (the paper's iterated rejection sampling)."""

    count: Int = Field(1, ge=1, le=LIMITS["rounds"])
    """Rounds of sample, rank and train; 1: a plain GAtt job."""
    instructions: Literal["fixed", "fresh"] = "fixed"
    """"fixed": every round attaches the same instruction to each dialogue (what changes is the
    model that samples); "fresh": each round synthesises its own (seeded by the round)."""


class JobOptions(Section):
    """A job's hyperparameters, by section; every field is optional and has a default. Unknown
    fields are errors (422 `invalid_config`, every problem with its path in `details`); every size
    is bounded, and a larger one is refused with its limit. Verifier patterns are RE2 (linear time)."""

    seed: Seed = 0
    """One seed for instruction synthesis, sampling and training."""
    data: DataOptions = DataOptions()
    """The dialogues sampled and what each kept reply is trained after."""
    placement: Placement = Placement()
    """`attach` (prefix|suffix): where the instruction goes on each user turn while sampling;
    `keep` (first_user|system): where it stays in the training dialogue."""
    sampling: SamplingConfig = SamplingConfig()
    """K candidates per sampled turn, the instruction on every user turn."""
    reward: RewardConfig = RewardConfig()
    """Ranking the candidates and keeping the best."""
    loss_scope: Scope = "all_turns"
    """"all_turns": one sequence, loss on every sampled reply; "last_turn" (the paper): one example
    per reply."""
    training: TrainConfig = TrainConfig()
    """Fine-tuning with the loss on the kept replies only."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Adherence by turn before and after training, on held-out dialogues."""
    values: ValuesConfig = ValuesConfig()
    """Family values listed by the model itself (off by default)."""
    rounds: RoundsConfig = RoundsConfig()
    """Rounds of sampling with the model trained so far (1 by default)."""

    @model_validator(mode="after")
    def _vllm_samples_lora_rounds(self) -> JobOptions:
        if self.sampling.backend == "vllm" and self.rounds.count > 1 and self.training.method != "lora":
            raise ValueError(
                "sampling.backend vllm samples later rounds as LoRA adapters of the served weights, so "
                "rounds.count above 1 needs training.method lora; use auto, which samples the later "
                "rounds of full fine-tuning with the loop"
            )
        return self

    @model_validator(mode="after")
    def _replay_needs_sft(self) -> JobOptions:
        if self.training.objective == "dpo" and self.data.replay > 0:
            raise ValueError(
                "training.objective dpo trains on preference pairs only, so data.replay (plain corpus "
                "dialogues, trained by cross-entropy) would train nothing: use sft+dpo or data.replay 0"
            )
        return self


class JobConfig(JobOptions):
    """A whole job: the options and what only the server (or the CLI) decides."""

    model: Name = "default"
    """"default" (embedded SmolLM2-135M-Instruct), a local Hugging Face directory or a checkpoint."""
    base_model: Name | None = None
    """For a LoRA checkpoint `model`: its base ("default" or a directory); null: as its
    adapter_config.json names it."""
    lineage: dict[str, Any] | None = None
    """Recorded in every checkpoint's manifest (the service's base model id, parent job and step);
    checkpoints name their base by its `adapter_base` (a parent's full checkpoint), else its
    `base_model`."""
    output_dir: Name = "var/jobs/job"
    device: Str | None = None
    """null: CUDA if present, else CPU."""
    dtype: Str | None = None
    """null: bfloat16 on CUDA, float32 on CPU."""
    data: DataConfig = DataConfig()


def _added(full: type[BaseModel], options: type[BaseModel], prefix: str = "") -> set[str]:
    return {prefix + name for name in full.model_fields.keys() - options.model_fields.keys()}


# Set by the server, never by a request: where data and outputs live, and on which device.
SERVER_FIELDS = frozenset(_added(JobConfig, JobOptions) | _added(DataConfig, DataOptions, "data."))


def load_config(path: str | Path) -> JobConfig:
    """Read a job config from a YAML (or JSON, which is YAML) file."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    return parse_config(raw if raw is not None else {})


def parse_config(raw: Any) -> JobConfig:
    """The whole config of a job; ValidationFailed lists every problem."""
    return _parse(JobConfig, raw)


def parse_options(raw: Any) -> JobOptions:
    """What a request may set; a server-decided field is a `server_field` problem."""
    return _parse(JobOptions, raw)


M = TypeVar("M", bound=BaseModel)


def _parse(model: type[M], raw: Any) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = [_problem(model, error) for error in exc.errors(include_url=False)]
        # Where a problem lies inside a list, pydantic also reports the list itself (a union's
        # other member: "expected a string, found list"; too few items once the bad one is gone).
        inner = [p.field for p in problems]
        problems = [p for p in problems if not any(f.startswith(p.field + "[") for f in inner)]
        raise ValidationFailed("job config", problems) from None


# --- pydantic's errors as the service's problems: stable codes, dotted paths, plain messages ---

_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "list_type": "a list",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dataclass_type": "a mapping",
    "dataclass_args_type": "a mapping",
    "dict_type": "a mapping",
}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _problem(model: type[BaseModel], error: Any) -> Problem:
    path, at_section, known = _walk(model, error["loc"])
    name = path.rsplit(".", 1)[-1]
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx", {})
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        if path in SERVER_FIELDS:
            return Problem("server_field", "set by the server, not by a request", path)
        return Problem("unknown_field", f"unknown field {name!r}{did_you_mean(name, known)}", path)
    if kind in _EXPECTED:
        return Problem("invalid_type", f"expected {_EXPECTED[kind]}, found {_kind(value)}", path or "config")
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return Problem("invalid_value", f"{name} must be {_BOUNDS[kind]} {bound}, not {_short(value)}", path)
    if kind == "literal_error":
        return Problem("invalid_value", f"expected {ctx['expected']}, found {_short(value)}", path)
    if kind == "string_pattern_mismatch":
        return Problem("invalid_value", f"{name} must not be blank", path)
    message = str(error["msg"]).removeprefix("Value error, ")
    first = message.split(" ", 1)[0]
    if at_section and first.split(".")[0] in known:  # a section's own check names the field it is about
        path = f"{path}.{first}" if path else first
    return Problem("invalid_value", message, path or "config")


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, bool, tuple[str, ...]]:
    """The dotted path of an error's location, whether it is a whole section, and the field names
    of the section it lies in (or is).

    pydantic's locations also name the member of a union ("str", "tuple[...]") that failed: not a
    place in the document, so they are left out."""
    path, section, known = "", _fields(model), tuple(_fields(model))
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif section:
            known = tuple(section)
            path = f"{path}.{part}" if path else str(part)
            section = _fields(section.get(part))
    if section:
        known = tuple(section)
    return path, bool(section), known


def _fields(section: Any) -> dict[str, Any]:
    """A section's field names and types; {} for anything that is not a section."""
    if isinstance(section, type) and issubclass(section, BaseModel):
        return {name: f.annotation for name, f in section.model_fields.items()}
    if isinstance(section, type) and dataclasses.is_dataclass(section):
        return {f.name: f.type for f in dataclasses.fields(section)}
    return {}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return "a mapping" if isinstance(value, dict) else type(value).__name__


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
