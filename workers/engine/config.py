"""The typed configuration of one GAtt job, read from YAML or JSON and checked strictly.

One file describes a whole job (model, data, and a section per stage). Every field has a
documented default, unknown keys are errors (a typo must not silently fall back to a default),
and all problems are reported at once, each with its dotted path ("sampling.top_p").
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gatt.augment import Placement
from gatt.errors import Problem, ValidationFailed
from gatt.masks import Scope
from gatt.repetition import DEFAULT_MAX_ECHO

# --- stage configs: plain dataclasses, importable without torch (the API validates with them) ---

Method = Literal["lora", "full"]
Schedule = Literal["cosine", "linear", "constant"]

# Upper bounds of every size a job's config sets: a job is a tenant's request, and nothing it asks
# for may be unbounded (work, memory, disk). Generous for real jobs; each is named in the error.
LIMITS: dict[str, int] = {
    "k": 64,  # candidates per prompt (also values.samples)
    "max_new_tokens": 4096,
    "batch_prompts": 256,
    "batch_size": 1024,  # reward-model batch
    "lora_r": 512,
    "lora_alpha": 8192,
    "steps": 1_000_000,  # max_steps, warmup_steps, checkpoint_every
    "epochs": 100,
    "micro_batch_size": 512,
    "grad_accum": 1024,
    "max_seq_len": 131_072,
    "keep_checkpoints": 50,
    "per_family": 200,  # values proposed or required per family
    "temperature": 10,
    "dialogues": 1_000_000,  # data.max_dialogues
    "turns": 64,  # data.max_turns: a corpus dialogue has at most 64 turns
    "replay": 10,  # plain corpus dialogues per GAtt example
}
_MODULE_NAMES = re.compile(r"[A-Za-z0-9_.]+(\|[A-Za-z0-9_.]+)*")


@dataclass(frozen=True)
class SamplingConfig:
    k: int = 4  # candidates per prompt
    temperature: float = 0.8  # 0 means greedy (argmax); top_p is then irrelevant
    top_p: float = 0.95  # nucleus: sample from the smallest set of tokens holding this much probability
    max_new_tokens: int = 96
    batch_prompts: int = 8  # prompts per prefill; the decode batch is batch_prompts * k rows
    seed: int = 0  # seeds the generator when the caller passes none
    # Decode steps through torch.compile (CUDA graphs on a GPU): launch overhead dominates GPU
    # decoding of small batches. Costs a compilation per prompt batch shape; off by default.
    compile: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.k, int) and 1 <= self.k <= LIMITS["k"]):
            problems.append(f"k must be an integer in [1, {LIMITS['k']}], got {self.k!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be > 0, or 0 for greedy, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (
            isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= LIMITS["max_new_tokens"]
        ):
            problems.append(
                f"max_new_tokens must be an integer in [1, {LIMITS['max_new_tokens']}], got {self.max_new_tokens!r}"
            )
        if not (isinstance(self.batch_prompts, int) and 1 <= self.batch_prompts <= LIMITS["batch_prompts"]):
            problems.append(
                f"batch_prompts must be an integer in [1, {LIMITS['batch_prompts']}], got {self.batch_prompts!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            problems.append(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.compile, bool):
            problems.append(f"compile must be true or false, got {self.compile!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class RewardConfig:
    verifier_weight: float = 1.0
    reward_model: str | None = None  # local directory of a sequence-classification model
    reward_model_weight: float = 0.0
    min_reward: float | None = 0.5  # a turn whose best candidate is below this is dropped
    batch_size: int = 16
    # A candidate at least this similar to an earlier reply of its dialogue never wins
    # (gatt/repetition.py); None: no check.
    max_repeat_similarity: float | None = 0.8
    # A candidate that repeats at least this share of the question it answers never wins
    # (gatt/repetition.py, echo_share); None: no check.
    max_echo: float | None = DEFAULT_MAX_ECHO
    # Relevance: cosine of the question and the reply without the instruction's words
    # (gatt/relevance.py). Weighted into the reward like the other parts (0: not in the reward).
    relevance_weight: float = 0.0
    # A candidate less relevant than this never wins; None: no floor (gatt.relevance.RELEVANCE_FLOOR,
    # 0.28, is what 95% of the corpus's real answers reach).
    min_relevance: float | None = None
    # Among candidates with equal reward (common with 0/1 verifiers and no reward model), keep the
    # most relevant one ("relevant", then the longer), the shorter or the longer one.
    prefer: Literal["relevant", "shorter", "longer"] = "relevant"

    def __post_init__(self) -> None:
        if self.verifier_weight < 0 or self.reward_model_weight < 0 or self.relevance_weight < 0:
            raise ValueError("reward weights must be >= 0")
        if self.verifier_weight + self.reward_model_weight + self.relevance_weight <= 0:
            raise ValueError("at least one reward weight must be > 0")
        if self.reward_model_weight > 0 and not self.reward_model:
            raise ValueError("reward_model_weight > 0 needs reward_model (a local directory)")
        if self.min_reward is not None and not 0.0 <= self.min_reward <= 1.0:
            raise ValueError("min_reward must be in [0, 1]")
        _int_at_least("batch_size", self.batch_size, 1, LIMITS["batch_size"])
        if self.max_repeat_similarity is not None and not 0.0 < self.max_repeat_similarity <= 1.0:
            raise ValueError("max_repeat_similarity must be in (0, 1] or null")
        if self.max_echo is not None and not 0.0 < self.max_echo <= 1.0:
            raise ValueError("max_echo must be in (0, 1] or null")
        if self.min_relevance is not None and not -1.0 <= self.min_relevance <= 1.0:
            raise ValueError("min_relevance must be in [-1, 1] or null")
        if self.prefer not in ("relevant", "shorter", "longer"):
            raise ValueError(f"prefer must be 'relevant', 'shorter' or 'longer', not {self.prefer!r}")

    @property
    def needs_relevance(self) -> bool:
        """Whether ranking uses relevance: weighted in, as a floor, or to break ties."""
        return self.relevance_weight > 0 or self.min_relevance is not None or self.prefer == "relevant"


@dataclass(frozen=True)
class TrainConfig:
    method: Method = "lora"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    # "all-linear" (peft: every linear layer but the output head), names joined by "|"
    # ("q_proj|v_proj"), or a tuple of module names such as ("q_proj", "v_proj").
    lora_targets: str | tuple[str, ...] = "all-linear"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Schedule = "cosine"
    warmup_steps: int = 0
    # Optimiser steps; None: ceil(epochs * n_batches / grad_accum).
    max_steps: int | None = None
    epochs: float = 1.0
    micro_batch_size: int = 4
    grad_accum: int = 1
    # None: no clipping (the gradient norm is still reported).
    max_grad_norm: float | None = 1.0
    max_seq_len: int = 2048
    seed: int = 0
    # 0: only the final checkpoint.
    checkpoint_every: int = 0
    # How many checkpoints stay on disk; older ones are deleted. The newest (final) always stays.
    keep_checkpoints: int = 2
    # LoRA only: also write merged full weights into each checkpoint's `merged/`.
    merge_on_save: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', not {self.method!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant', not {self.schedule!r}")
        _int_at_least("lora_r", self.lora_r, 1, LIMITS["lora_r"])
        _int_at_least("lora_alpha", self.lora_alpha, 1, LIMITS["lora_alpha"])
        _number_in("lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)
        if isinstance(self.lora_targets, str):
            # peft matches a string as a regex over every module name (Python's re): only names and
            # alternatives, which cannot backtrack, are taken from a job.
            if self.lora_targets != "all-linear" and not _MODULE_NAMES.fullmatch(self.lora_targets):
                raise ValueError(
                    "lora_targets must be 'all-linear', module names joined by '|' "
                    f"(letters, digits, '_' and '.'), or a list of module names, not {self.lora_targets!r}"
                )
        elif not (
            isinstance(self.lora_targets, tuple)
            and self.lora_targets
            and all(isinstance(t, str) and t for t in self.lora_targets)
        ):
            raise ValueError(
                "lora_targets must be 'all-linear', a regex, or a non-empty tuple of module names"
            )
        _number_in("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _number_in("weight_decay", self.weight_decay, low=0.0)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), not {self.betas!r}")
        for i, beta in enumerate(self.betas):
            _number_in(f"betas[{i}]", beta, low=0.0, high=1.0, high_open=True)
        _int_at_least("warmup_steps", self.warmup_steps, 0, LIMITS["steps"])
        if self.max_steps is not None:
            _int_at_least("max_steps", self.max_steps, 1, LIMITS["steps"])
        _number_in("epochs", self.epochs, low=0.0, low_open=True, high=LIMITS["epochs"])
        _int_at_least("micro_batch_size", self.micro_batch_size, 1, LIMITS["micro_batch_size"])
        _int_at_least("grad_accum", self.grad_accum, 1, LIMITS["grad_accum"])
        if self.max_grad_norm is not None:
            _number_in("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        _int_at_least("max_seq_len", self.max_seq_len, 2, LIMITS["max_seq_len"])
        _int_at_least("seed", self.seed, 0)
        if self.seed >= 2**32:
            raise ValueError(f"seed must be < 2**32, not {self.seed}")
        _int_at_least("checkpoint_every", self.checkpoint_every, 0, LIMITS["steps"])
        _int_at_least("keep_checkpoints", self.keep_checkpoints, 1, LIMITS["keep_checkpoints"])
        if not isinstance(self.merge_on_save, bool):
            raise ValueError(f"merge_on_save must be a bool, not {self.merge_on_save!r}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["betas"] = list(self.betas)
        if isinstance(self.lora_targets, tuple):
            out["lora_targets"] = list(self.lora_targets)
        return out


def _int_at_least(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, not {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, not {value}")


def _number_in(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, not {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, not {value}")


@dataclass(frozen=True)
class EvaluationConfig:
    """The evaluate stage: adherence by turn (and attention to the instruction) of the model before
    and after training, on dialogues held out from the corpus and instructions drawn with another
    seed (workers/engine/evaluation.py)."""

    enabled: bool = False
    # The last N dialogues of the corpus are held out: never sampled, never trained on.
    heldout_dialogues: int = 8
    turns: int = 8  # up to 64, as far as the held-out dialogues and the context go
    # Of none / once / every_turn (the model's own earlier replies as context) and none_fixed /
    # once_fixed / every_turn_fixed (the corpus's earlier replies: memory, not imitation).
    conditions: tuple[str, ...] = ("once", "every_turn")
    max_new_tokens: int = 64
    pass_threshold: float = 0.5
    batch_prompts: int = 8
    attention: bool = True
    # A reply at least this similar to an earlier reply of its dialogue scores 0 (gatt/repetition.py).
    max_repeat_similarity: float | None = 0.8
    # A reply whose echo share of the question is at least this is not useful (gatt/repetition.py).
    max_echo: float | None = DEFAULT_MAX_ECHO
    relevance: bool = True  # question-reply relevance by sentence embeddings (gatt/relevance.py)

    def __post_init__(self) -> None:
        if isinstance(self.conditions, list):
            object.__setattr__(self, "conditions", tuple(self.conditions))
        _int_at_least("heldout_dialogues", self.heldout_dialogues, 1)
        self.adherence()  # its own checks, one place

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


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "examples/dialogues.jsonl"
    instructions: str = "default"  # "default" (the paper-style set) or a JSON instruction-set file
    max_dialogues: int | None = None  # use the first N dialogues of the corpus
    max_turns: int = 3  # user turns per dialogue to sample (the corpus may have more)
    # "last" (the paper's reading): keep the corpus's own earlier assistant turns as zero-loss
    # context and sample only the last one. "all": sample every assistant turn in order, each on
    # the earlier samples; small models follow the instruction far more often this way.
    sample_turns: Literal["all", "last"] = "all"
    # The history a sampled reply is trained on. "sampled": the dialogue as sampled (with
    # sample_turns "all", the model's own adherent replies). "corpus": each reply alone after the
    # corpus's own earlier replies, so that only the first turn's instruction explains it (memory,
    # not imitation). "both": the sampled dialogue and the corpus view of turns 2 onwards.
    train_history: Literal["sampled", "corpus", "both"] = "sampled"
    # Replay: this many plain corpus dialogues per GAtt training example (0.5: one for every two),
    # with no instruction and loss on the corpus's own replies, so that the model keeps answering
    # as it did where no instruction is given.
    replay: float = 0.0

    def __post_init__(self) -> None:
        _number_in("replay", self.replay, low=0.0, high=LIMITS["replay"])
        if self.max_dialogues is not None:
            _int_at_least("max_dialogues", self.max_dialogues, 1, LIMITS["dialogues"])
        _int_at_least("max_turns", self.max_turns, 1, LIMITS["turns"])


@dataclass(frozen=True)
class ValuesConfig:
    """Values of some families listed by the chat model itself (the paper's hobbies and public
    figures), asked for before synthesis; see workers/engine/values.py."""

    enabled: bool = False
    families: tuple[str, ...] = ("hobby", "public_figure")
    per_family: int = 30  # at most this many values proposed per family
    # "replace": the family's values become the model's; "merge": appended to the family's own.
    mode: Literal["replace", "merge"] = "merge"
    min_values: int = 5  # fewer surviving proposals: the family keeps its own values
    max_new_tokens: int = 160
    temperature: float = 0.7
    samples: int = 4  # replies sampled per family; their lists are merged

    def __post_init__(self) -> None:
        if isinstance(self.families, list):
            object.__setattr__(self, "families", tuple(self.families))
        if not isinstance(self.enabled, bool):
            raise ValueError(f"enabled must be a bool, not {self.enabled!r}")
        if not (
            isinstance(self.families, tuple) and all(isinstance(f, str) and f.strip() for f in self.families)
        ):
            raise ValueError(f"families must be a list of family names, not {self.families!r}")
        if self.mode not in ("replace", "merge"):
            raise ValueError(f"mode must be 'replace' or 'merge', not {self.mode!r}")
        _int_at_least("per_family", self.per_family, 1, LIMITS["per_family"])
        _int_at_least("min_values", self.min_values, 1, LIMITS["per_family"])
        _int_at_least("max_new_tokens", self.max_new_tokens, 1, LIMITS["max_new_tokens"])
        _number_in("temperature", self.temperature, low=0.0, high=LIMITS["temperature"])
        _int_at_least("samples", self.samples, 1, LIMITS["k"])


@dataclass(frozen=True)
class JobConfig:
    model: str = "default"  # "default" (embedded SmolLM2-135M-Instruct), a local HF dir, or a checkpoint
    output_dir: str = "var/jobs/job"
    seed: int = 0
    device: str | None = None  # None: CUDA if present, else CPU
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on CPU
    data: DataConfig = field(default_factory=DataConfig)
    placement: Placement = field(default_factory=Placement)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss_scope: Scope = "all_turns"
    training: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    values: ValuesConfig = field(default_factory=ValuesConfig)

    def __post_init__(self) -> None:
        # Seeds are mixed into torch/numpy generators, which take at most 64 bits.
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), not {self.seed!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path) -> JobConfig:
    """Read a job config from a YAML (or JSON, which is YAML) file."""
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    return parse_config(raw if raw is not None else {})


def parse_config(raw: Any) -> JobConfig:
    problems: list[Problem] = []
    config = _build(JobConfig, raw, "", problems)
    if problems:
        raise ValidationFailed("job config", problems)
    return config


def _build(cls: type, raw: Any, path: str, problems: list[Problem]) -> Any:
    if not isinstance(raw, dict):
        problems.append(
            Problem("invalid_type", f"expected a mapping, found {type(raw).__name__}", path or "config")
        )
        return None
    start = len(problems)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            problems.append(Problem("unknown_field", f"unknown field {key!r}", _join(path, str(key))))
    values = {}
    for name in names & raw.keys():
        values[name] = _convert(hints[name], raw[name], _join(path, name), problems)
    if len(problems) > start:
        return None
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:  # the dataclass's own range checks
        # Their messages start with the field's name ("k must be ..."); point at that field.
        for message in str(exc).split("; "):
            name = message.split(" ", 1)[0].split("[", 1)[0]
            field_path = _join(path, name) if name in names else path or "config"
            problems.append(Problem("invalid_value", message, field_path))
        return None


def _convert(hint: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        options = tuple(o for o in options if o is not type(None))
        # str | tuple[str, ...]: a list in the file means the tuple.
        sequence = next((o for o in options if typing.get_origin(o) is tuple), None)
        if sequence is not None and isinstance(value, list | tuple):
            return _convert(sequence, value, path, problems)
        return _convert(options[0], value, path, problems)
    if origin is Literal:
        if value not in typing.get_args(hint):
            allowed = ", ".join(repr(a) for a in typing.get_args(hint))
            problems.append(Problem("invalid_value", f"expected one of {allowed}, found {value!r}", path))
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            problems.append(Problem("invalid_type", f"expected a list, found {type(value).__name__}", path))
            return value
        return tuple(value)
    expected = {float: (int, float), int: (int,), str: (str,), bool: (bool,)}.get(hint)
    # bool is an int in Python; a `true` where a number belongs is a mistake, not a 1.
    if expected and (not isinstance(value, expected) or (hint is not bool and isinstance(value, bool))):
        problems.append(
            Problem("invalid_type", f"expected {hint.__name__}, found {type(value).__name__}", path)
        )
    return float(value) if hint is float and isinstance(value, int) else value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
