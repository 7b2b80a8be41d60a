"""How much attention the model still pays to an instruction given once: the paper's Figure 10.

For a dialogue in the "once" condition (instruction only in the first user turn or the system
message, the model's own replies as context), one teacher-forced forward pass over the whole
dialogue gives, for each assistant turn, the share of attention mass that falls on the
instruction's tokens:

- `first`: at the reply's generation position, i.e. the last token of the generation prompt,
  whose output is the distribution of the reply's first token;
- `reply`: averaged over every position that predicts a reply token (the generation position up
  to the one before the end-of-turn token), so the whole reply counts, not only how it starts.

For each, per (layer, head) share, reduced over the network: `max` (the paper plots the maximum
activation across the network) and `mean`. `uniform` is the share the span would get if every
visible position got the same weight (span length / positions visible): the share naturally
falls as the dialogue grows, so compare the two curves with it in mind. Most of the mass of
small models sits on the first token (an "attention sink"); shares are of the whole mass.

Attention weights need the eager implementation: SDPA and flash kernels never materialise them
(with SDPA, transformers 5 returns no weights at all for `output_attentions=True`, with a
warning). `eager_attention` switches a loaded model with `set_attn_implementation("eager")`,
which in transformers 5.23 updates the model's config and its sub-configs in place (attention
modules read `config._attn_implementation` at every forward), and switches back afterwards;
checked in tests/workers/test_attention.py. The weights are read with forward hooks on the
attention modules the model itself records `attentions` from (`_can_record_outputs`) and reduced
to the few rows needed at once, so only one layer's (heads x length x length) matrix is alive at a
time instead of every layer's, which `output_attentions=True` would keep.

The instruction's token span comes from the rendered template, not from guessed token strings:
the instruction is replaced by a marker, both texts are rendered, the marker's character offset is
the instruction's, and the fast tokenizer's offset mapping turns characters into tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gatt.augment import Placement, TrainingDialogue
from gatt.instructions import Instruction
from gatt.masks import TemplateError, build_examples, encode, render
from workers.engine.evaluation import EvalConfig, evaluate_adherence
from workers.engine.hooks import Hooks, Stopped
from workers.engine.models import unwrap

__all__ = [
    "attention_report",
    "dialogue_attention",
    "eager_attention",
    "instruction_token_span",
    "plot_attention",
]

# Stands in for the instruction while locating it; letters only, so no template trims or escapes it.
_MARKER = "GATTINSTRUCTIONMARKERQZX"


@contextmanager
def eager_attention(model: Any) -> Iterator[Any]:
    """Run the block with eager attention (which can return weights); restore the previous kind.

    Works on a plain transformers model and on a peft model around one (the switch is made on
    the base model, whose attention modules LoRA leaves in place).
    """
    base = unwrap(model)
    previous = getattr(base.config, "_attn_implementation", None)
    if previous != "eager":
        base.set_attn_implementation("eager")
    try:
        yield base
    finally:
        if previous not in (None, "eager"):
            base.set_attn_implementation(previous)


def instruction_token_span(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    instruction: str,
    *,
    generation_prompt: bool = False,
) -> tuple[int, int]:
    """[start, end) of the instruction's tokens in `encode(render(messages, generation_prompt))`.

    The instruction (its first occurrence, surrounding whitespace ignored) must be in one of the
    messages. Tokens that straddle its edges (a leading space merged into the first word) belong
    to the span. Raises TemplateError if the template changes the instruction's text.
    """
    core = instruction.strip()
    if not core:
        raise ValueError("empty instruction")
    index = next((i for i, m in enumerate(messages) if core in m["content"]), None)
    if index is None:
        raise ValueError("the instruction is in none of the messages")
    marked = [dict(m) for m in messages]
    marked[index]["content"] = marked[index]["content"].replace(core, _MARKER, 1)
    text = render(tokenizer, messages, generation_prompt=generation_prompt)
    marked_text = render(tokenizer, marked, generation_prompt=generation_prompt)
    if marked_text.count(_MARKER) != 1 or marked_text.replace(_MARKER, core) != text:
        raise TemplateError("the chat template changes the instruction's text; cannot locate its tokens")
    char_start = marked_text.index(_MARKER)
    char_end = char_start + len(core)
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("locating the instruction needs a fast tokenizer (offset mapping)")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens = [
        i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < char_end and b > char_start
    ]
    if not tokens:
        raise TemplateError("no token covers the instruction")
    return tokens[0], tokens[-1] + 1


def _attention_recorders(base: Any) -> list[tuple[torch.nn.Module, int]]:
    """(module, index of the weights in its output) for every attention module of the model.

    The model class says where its `attentions` come from (`_can_record_outputs`: a class, whose
    output[1] holds the weights, or an OutputRecorder with a class, index and layer name).
    """
    spec = (getattr(type(base), "_can_record_outputs", None) or {}).get("attentions")
    specs = spec if isinstance(spec, list) else [spec] if spec is not None else []
    found: list[tuple[torch.nn.Module, int]] = []
    for s in specs:
        if isinstance(s, type):
            target, index, layer_name, class_name = s, 1, None, None
        elif isinstance(s, str):
            target, index, layer_name, class_name = None, 1, None, s
        else:
            target, index = getattr(s, "target_class", None), getattr(s, "index", 1)
            layer_name, class_name = getattr(s, "layer_name", None), getattr(s, "class_name", None)
        for name, module in base.named_modules():
            if target is not None and not isinstance(module, target):
                continue
            if target is None and not (class_name and name.endswith(class_name)):
                continue
            if layer_name and f".{layer_name.strip('.')}." not in f"{name}.":
                continue
            found.append((module, index))
    if not found:  # older or custom models: the usual name
        found = [(m, 1) for name, m in base.named_modules() if name.endswith("self_attn")]
    if not found:
        raise TemplateError(f"cannot find the attention modules of {type(base).__name__}")
    return found


def _span_shares(
    model: Any, ids: Sequence[int], span: tuple[int, int], queries: Sequence[int], device: Any
) -> torch.Tensor:
    """(layers, heads, queries): share of each query row's attention on ids[span[0]:span[1]]."""
    base = unwrap(model)
    rows = torch.tensor(list(queries), dtype=torch.long, device=device)
    collected: list[torch.Tensor] = []

    def hook(module: Any, args: Any, output: Any, index: int) -> None:
        weights = output[index] if isinstance(output, tuple) else None
        if weights is None:
            raise TemplateError("the attention module returned no weights; is the model in eager mode?")
        picked = weights[0].index_select(1, rows).float()  # (heads, queries, keys)
        collected.append(picked[..., span[0] : span[1]].sum(-1).cpu())

    handles = [
        module.register_forward_hook(lambda m, a, o, index=index: hook(m, a, o, index))
        for module, index in _attention_recorders(base)
    ]
    try:
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
        # logits_to_keep=1: the full (length x vocabulary) logits are not needed, only the weights.
        model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False, logits_to_keep=1
        )
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(collected)


def dialogue_attention(
    loaded: Any,
    messages: Sequence[Mapping[str, str]],
    instruction: str,
) -> list[dict[str, Any]]:
    """Per assistant message of `messages` (the instruction given once, replies included): the
    instruction's attention share at the generation position (`first`) and over the reply
    (`reply`), each as max and mean over layers and heads, plus `uniform` and `by_layer` (mean over
    heads, `reply`). The model must already be in eager mode (`eager_attention`)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        return []
    dialogue = TrainingDialogue(
        tuple(dict(m) for m in messages), tuple(m["role"] == "assistant" for m in messages)
    )
    masked = build_examples(tokenizer, dialogue, "all_turns")
    if masked.scope == "all_turns":  # one sequence holds every reply
        parts = [(list(messages), masked.examples[0])]
    else:  # the template re-renders earlier turns: one forward pass per reply, each on its own cut
        parts = [
            (list(messages[: k + 1]), example) for k, example in zip(assistant, masked.examples, strict=True)
        ]
    out = []
    for part_messages, example in parts:
        span = instruction_token_span(tokenizer, part_messages, instruction)
        full = encode(tokenizer, render(tokenizer, part_messages, generation_prompt=False))
        if tuple(full[: len(example.input_ids)]) != example.input_ids:
            raise TemplateError("the rendered dialogue does not tokenize as its training example")
        if span[1] > example.spans[0][0] - 1:
            raise TemplateError("the instruction is not before the first reply")
        queries: list[int] = []
        slices = []
        for start, end in example.spans:
            slices.append((len(queries), end - start))
            queries.extend(range(start - 1, end - 1))
        shares = _span_shares(model, example.input_ids, span, queries, loaded.device)  # (L, H, Q)
        for (offset, count), (start, _end) in zip(slices, example.spans, strict=True):
            first = shares[:, :, offset]
            reply = shares[:, :, offset : offset + count].mean(-1)
            visible = torch.arange(start - 1, start - 1 + count, dtype=torch.float32) + 1
            out.append(
                {
                    "first": {"max": float(first.max()), "mean": float(first.mean())},
                    "reply": {"max": float(reply.max()), "mean": float(reply.mean())},
                    "uniform": float(((span[1] - span[0]) / visible).mean()),
                    "by_layer": [float(x) for x in reply.mean(-1)],
                    "position": start,
                    "instruction_tokens": span[1] - span[0],
                }
            )
    return out


def attention_report(
    loaded: Any,
    dialogues: Sequence[Any],
    instructions: Sequence[Instruction],
    config: EvalConfig,
    *,
    placement: Placement,
    transcripts: Sequence[Mapping[str, Any]] | None = None,
    hooks: Hooks | None = None,
) -> dict[str, Any]:
    """Attention on the instruction per turn, averaged over dialogues, for one model.

    The "once" replies come from `transcripts` when given (`report["transcripts"]["once"]` of
    `evaluate_adherence` for the same model), else they are generated here with `config` (only
    the "once" condition). Call it once per model (base, fine-tuned) and plot the reports together
    with `plot_attention`. Dialogues the analysis cannot handle are listed under `skipped`.
    """
    from gatt.augment import plain_messages

    hooks = hooks or Hooks()
    started = time.monotonic()
    if transcripts is None:
        once = EvalConfig(**{**config.to_json(), "conditions": ("once",)})
        transcripts = evaluate_adherence(
            loaded, dialogues, instructions, once, placement=placement, hooks=hooks
        )["transcripts"]["once"]
    per_turn: dict[int, list[dict[str, Any]]] = {}
    skipped = []
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model), torch.inference_mode():
            for done, record in enumerate(transcripts):
                if hooks.should_stop():
                    raise Stopped("cancelled during the attention analysis")
                hooks.progress("attention", done, len(transcripts))
                text = record["instruction"]["text"]
                replies = list(record["replies"])
                messages = plain_messages(
                    text,
                    record["users"][: len(replies)],
                    replies,
                    system=record.get("system"),
                    placement=placement,
                )
                try:
                    turns = dialogue_attention(loaded, messages, text)
                except (TemplateError, ValueError) as exc:
                    skipped.append({"dialogue_id": record.get("dialogue_id"), "reason": str(exc)})
                    continue
                for t, values in enumerate(turns):
                    per_turn.setdefault(t + 1, []).append(values)
        hooks.progress("attention", len(transcripts), len(transcripts))
    finally:
        model.train(was_training)

    turns = [_turn_means(t, per_turn[t]) for t in sorted(per_turn)]
    return {
        "model": getattr(loaded, "source", None),
        "placement": {"attach": placement.attach, "keep": placement.keep},
        "queries": {
            "first": "the generation position (last prompt token, predicts the reply's first token)",
            "reply": "mean over the positions that predict the reply's tokens and its end-of-turn token",
        },
        "reductions": {"max": "max over layers and heads", "mean": "mean over layers and heads"},
        "dialogues": len(transcripts) - len(skipped),
        "skipped": skipped,
        "turns": turns,
        "wall_s": round(time.monotonic() - started, 2),
    }


def _turn_means(turn: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One turn's attention measures, each averaged over the dialogues that reached it."""

    def mean(values: list[float]) -> float:
        return round(sum(values) / len(values), 5)

    return {
        "turn": turn,
        "n": len(rows),
        "first": {k: mean([r["first"][k] for r in rows]) for k in ("max", "mean")},
        "reply": {k: mean([r["reply"][k] for r in rows]) for k in ("max", "mean")},
        "uniform": mean([r["uniform"] for r in rows]),
        "by_layer": [mean(list(v)) for v in zip(*(r["by_layer"] for r in rows), strict=True)],
        "position": mean([r["position"] for r in rows]),
        "instruction_tokens": mean([r["instruction_tokens"] for r in rows]),
    }


def plot_attention(
    reports: Mapping[str, Mapping[str, Any]], path: str | Path, *, query: str = "reply"
) -> Path:
    """Share of attention on the instruction against turn, one line per model (e.g. "base",
    "gatt"): max over the network on the left (as the paper's Figure 10), mean on the right, with
    the uniform share as a dotted reference. Written as PNG with matplotlib's Agg canvas (no
    display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for ax, reduction in zip(axes, ("max", "mean"), strict=True):
        for i, (name, report) in enumerate(reports.items()):
            turns = [row["turn"] for row in report["turns"]]
            ax.plot(
                turns,
                [row[query][reduction] for row in report["turns"]],
                marker="o",
                label=name,
                color=f"C{i}",
            )
            if reduction == "mean":
                ax.plot(
                    turns,
                    [row["uniform"] for row in report["turns"]],
                    linestyle=":",
                    color=f"C{i}",
                    label=f"{name}: uniform share",
                )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("turn")
        ax.set_ylabel("attention share on the instruction")
        ax.set_title(f"{reduction} over layers and heads")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(f"Attention to the instruction given once ({query} positions)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path
