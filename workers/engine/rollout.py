"""One turn of many dialogues at once: the step job sampling, evaluation and value proposal share.

Each caller keeps its own dialogues and decides what a turn's messages are (the instruction on
every user turn while sampling; given once, never or every turn in evaluation) and what happens
to the candidates (ranked and appended, or scored). In between, the same things must happen in
the same way everywhere: render the messages with the model's chat template and generation
prompt, leave out any context that would not fit the model's window with the reply, and ask the
`Sampler` for candidates: the loop on the model in this process, or a vLLM server (`vllm.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gatt.masks import encode, render
from workers.engine.config import SamplingConfig
from workers.engine.models import LoadedModel, end_of_turn_ids
from workers.engine.prefix_cache import PrefixStore
from workers.engine.sampling import Candidate, Sampler, SharedPrefillSampler

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Rollout:
    sampler: Sampler
    tokenizer: Any
    limit: int  # the context window in tokens: prompt plus max_new_tokens must fit

    @classmethod
    def of(
        cls, loaded: LoadedModel, *, max_context: int | None = None, sampler: Sampler | None = None
    ) -> Rollout:
        """The rollout of a loaded model, sampled in this process unless `sampler` says otherwise;
        `max_context` lowers its window."""
        limit = getattr(loaded.model.config, "max_position_embeddings", None) or 1 << 30
        if max_context is not None:
            limit = min(limit, max_context)
        if sampler is None:
            model = loaded.model
            # One store per rollout: a stage samples with fixed weights, the next may not.
            prefixes = PrefixStore() if PrefixStore.supports(model) else None
            sampler = SharedPrefillSampler(
                model, loaded.tokenizer, end_of_turn_ids(loaded.tokenizer), prefixes
            )
        return cls(sampler, loaded.tokenizer, limit)

    def forget(self) -> None:
        """Drop what the sampler keeps from earlier calls (the loop's prefix store), so that the next
        calls compute the same whatever ran before them."""
        prefixes = getattr(self.sampler, "prefixes", None)
        if prefixes is not None:
            prefixes.clear()

    def prompt(self, messages: Messages) -> list[int]:
        return encode(self.tokenizer, render(self.tokenizer, messages, generation_prompt=True))

    def fits(self, prompt: list[int], config: SamplingConfig) -> bool:
        """Whether the prompt and the longest reply fit the context window."""
        return len(prompt) + config.max_new_tokens <= self.limit

    def turn(
        self,
        contexts: Sequence[Messages],
        config: SamplingConfig,
        *,
        generator: torch.Generator | None = None,
        should_stop: Callable[[], bool] | None = None,
        by_length: bool = False,
    ) -> list[list[Candidate] | None]:
        """Candidates for each context, None where the context would not fit with the reply.

        By default the prompts are sampled in the order given. `by_length` sorts them by length
        first (less left padding per batch), and with greedy decoding samples each distinct prompt
        once, since its replies are the same.
        """
        prompts = [self.prompt(messages) for messages in contexts]
        keep = [i for i, p in enumerate(prompts) if self.fits(p, config)]
        out: list[list[Candidate] | None] = [None] * len(prompts)
        if not keep:
            return out
        if by_length and config.greedy:
            distinct = sorted(dict.fromkeys(tuple(prompts[i]) for i in keep), key=len)
            generated = self._sample([list(p) for p in distinct], config, generator, should_stop)
            by_prompt = dict(zip(distinct, generated, strict=True))
            for i in keep:
                out[i] = by_prompt[tuple(prompts[i])]
            return out
        if by_length:
            keep.sort(key=lambda i: len(prompts[i]))  # stable: equal lengths keep their order
        generated = self._sample([prompts[i] for i in keep], config, generator, should_stop)
        for i, candidates in zip(keep, generated, strict=True):
            out[i] = candidates
        return out

    def _sample(self, prompts, config, generator, should_stop) -> list[list[Candidate]]:
        return self.sampler.candidates(prompts, config, generator=generator, should_stop=should_stop)
