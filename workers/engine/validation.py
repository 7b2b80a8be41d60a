"""Validation loss: how well a model predicts the held-out dialogues' own replies, no instruction given.

GAtt trains on replies the model sampled under an instruction; this measures what that does to the
model's ordinary chat: the mean negative log-likelihood per token of each held-out dialogue's
corpus replies, given the dialogue before them, with the loss masks the trainer uses (every reply
and its end-of-turn token, `gatt/masks.py`). The evaluation runs it on the model before and after
training; a model that now answers everything the same way, or has drifted, predicts these replies
worse. Dialogues are used up to their first missing reply; sequences longer than the training's
`max_seq_len` are left out, as training leaves them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from gatt.augment import training_dialogue
from gatt.dialogues import Dialogue, leading_replies
from gatt.masks import IGNORE_INDEX, TemplateError, build_examples
from workers.engine.eval_stats import round4
from workers.engine.models import LoadedModel


def validation_loss(loaded: LoadedModel, dialogues: Sequence[Dialogue], max_seq_len: int) -> dict[str, Any]:
    """{"loss": mean NLL per reply token (null with none), "tokens": counted, "dialogues": used}."""
    model, tokenizer = loaded.model, loaded.tokenizer
    was_training = model.training
    model.eval()
    nll, tokens, used = 0.0, 0, 0
    try:
        for dialogue in dialogues:
            turns = dialogue.turns
            replies = leading_replies([reply for _, reply in turns])
            if not replies:
                continue
            users = [user for user, _ in turns[: len(replies)]]
            view = training_dialogue(None, users, replies, [True] * len(replies), system=dialogue.system)
            try:
                examples = build_examples(tokenizer, view, "all_turns").examples
            except TemplateError:
                continue
            counted = False
            for example in examples:
                if len(example.input_ids) > max_seq_len:
                    continue
                ids = torch.tensor([example.input_ids], device=loaded.device)
                target = torch.tensor(example.labels[1:], device=loaded.device)
                with torch.inference_mode():
                    logits = model(input_ids=ids).logits[0, :-1].float()
                keep = target != IGNORE_INDEX
                nll += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
                tokens += int(keep.sum())
                counted = True
            used += counted
    finally:
        model.train(was_training)
    return {"loss": round4(nll / tokens) if tokens else None, "tokens": tokens, "dialogues": used}
