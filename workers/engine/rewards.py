"""Reward for ranking candidates: verifiers of the instruction, optionally relevance and a reward model.

reward = (w_v * verifier + w_rel * relevance + w_rm * reward_model) / (w_v + w_rel + w_rm)

The verifier score is the instruction's own aggregate (`gatt.verifiers.score_all_batch`): the
minimum over its constraints by default, so a reply that speaks French but forgets Napoleon
does not pass. Relevance (`gatt.relevance`) is the cosine of the sentence embeddings of the
question and of the reply without the instruction's words, counted from 0 in the reward: the
verifiers say whether the instruction is kept, not whether the question is answered. It is also
computed, without entering the total, when ranking needs it for a floor (`min_relevance`) or to
break ties (`prefer: relevant`). The optional reward model is a local Hugging Face
sequence-classification model (safetensors only, no remote code) that scores each candidate in its
augmented context, mapped to [0, 1] with a sigmoid so all parts share a scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatt import verifiers
from gatt.instructions import Instruction
from gatt.relevance import relevance
from workers.engine.config import RewardConfig


@dataclass(frozen=True)
class Reward:
    total: float
    verifier: float
    reason: str
    reward_model: float | None = None
    relevance: float | None = None  # None: not computed

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "verifier": self.verifier,
            "relevance": self.relevance,
            "reward_model": self.reward_model,
            "reason": self.reason,
        }


class RewardScorer:
    """Scores K candidates per context. Loads the reward model once, if one is configured."""

    def __init__(self, config: RewardConfig, *, device: Any = None, allowed_roots: list[Path] | None = None):
        self.config = config
        self._rm = None
        if config.reward_model and config.reward_model_weight > 0:
            self._rm = _load_reward_model(config.reward_model, device, allowed_roots)
        # Relevance in the reward or as a floor cannot do without the embedding model: fail before
        # any sampling. As a mere tie-break it can (ties then go to the longer reply).
        self._relevance = config.needs_relevance
        if config.relevance_weight > 0 or config.min_relevance is not None:
            from gatt.embeddings import packaged_model_dir

            packaged_model_dir()

    def score(
        self,
        instruction: Instruction,
        contexts: Sequence[Sequence[dict[str, str]]],
        candidates: Sequence[Sequence[str]],
        *,
        questions: Sequence[str] | None = None,
    ) -> list[list[Reward]]:
        """`candidates[i]` are the replies sampled for `contexts[i]`; one Reward per candidate.

        `questions[i]` is the user message `contexts[i]` asks to answer, without the instruction
        (relevance compares replies with it); by default the last user message of the context with
        the instruction's sampling text removed.
        """
        flat = [text for group in candidates for text in group]
        checks = verifiers.score_all_batch(list(instruction.verifiers), flat, instruction.aggregate)
        rm_scores: list[float | None] = [None] * len(flat)
        if self._rm is not None:
            pairs = [(ctx, text) for ctx, group in zip(contexts, candidates, strict=True) for text in group]
            rm_scores = list(_reward_model_scores(self._rm, pairs, self.config.batch_size))
        rel_scores: list[float | None] = [None] * len(flat)
        if self._relevance:
            if questions is None:
                questions = [_question(ctx, instruction.sampling_text) for ctx in contexts]
            if len(questions) != len(candidates):
                raise ValueError(f"{len(questions)} questions for {len(candidates)} contexts")
            from gatt.embeddings import EmbedderUnavailable

            asked = [q for q, group in zip(questions, candidates, strict=True) for _ in group]
            try:
                rel_scores = list(relevance(asked, flat, ignore=[instruction.sampling_text] * len(flat)))
            except EmbedderUnavailable:
                if self.config.relevance_weight > 0 or self.config.min_relevance is not None:
                    raise
        w_v, w_rm = self.config.verifier_weight, self.config.reward_model_weight if self._rm else 0.0
        w_rel = self.config.relevance_weight
        rewards = [
            Reward(
                total=(w_v * check.value + w_rel * max(0.0, rel or 0.0) + w_rm * (rm or 0.0))
                / (w_v + w_rel + w_rm),
                verifier=check.value,
                reason=check.reason,
                reward_model=rm,
                relevance=rel,
            )
            for check, rm, rel in zip(checks, rm_scores, rel_scores, strict=True)
        ]
        out, i = [], 0
        for group in candidates:
            out.append(rewards[i : i + len(group)])
            i += len(group)
        return out


def _question(context: Sequence[dict[str, str]], instruction: str) -> str:
    """The last user message of `context` without the instruction attached to it."""
    last = next((m["content"] for m in reversed(context) if m.get("role") == "user"), "")
    return last.replace(instruction, "").strip() if instruction else last.strip()


def _load_reward_model(path: str, device: Any, allowed_roots: list[Path] | None) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers.engine.models import check_model_dir

    directory = check_model_dir(path, allowed_roots)
    model = AutoModelForSequenceClassification.from_pretrained(
        directory, trust_remote_code=False, use_safetensors=True, local_files_only=True
    ).eval()
    if device is not None:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The classification head reads the last token that is not padding, so the model must know the
    # pad id (without it a batch of more than one fails). Right padding keeps every row's positions
    # as they are unbatched, and an over-long text loses its start, not the reply at its end.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return model, tokenizer


def _reward_model_scores(rm: tuple[Any, Any], pairs: list[tuple[Sequence[dict[str, str]], str]], batch: int):
    import torch

    model, tokenizer = rm
    texts = []
    for context, reply in pairs:
        messages = [*context, {"role": "assistant", "content": reply}]
        if tokenizer.chat_template:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append("\n".join(f"{m['role']}: {m['content']}" for m in messages))
    # A rendered chat template already holds BOS; adding special tokens again would double it.
    special = not tokenizer.chat_template
    for start in range(0, len(texts), batch):
        enc = tokenizer(
            texts[start : start + batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            add_special_tokens=special,
        )
        with torch.inference_mode():
            logits = model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float()
        # One logit: a scalar reward. Several: the last class is "good".
        raw = logits[:, 0] if logits.shape[-1] == 1 else logits.log_softmax(-1)[:, -1].exp().logit()
        yield from torch.sigmoid(raw).tolist()
