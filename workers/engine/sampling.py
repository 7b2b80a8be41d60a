"""Sample K candidate replies per prompt: the "sample" half of GAtt's sample-and-rank step.

For every dialogue turn the engine renders the instruction-augmented context with the chat template
(generation prompt included), asks for K candidate replies here, and lets the reward model pick one.
K replies share one prompt, so the prompt is the expensive, repeated part: a 1,000-token context
with K=4 costs `generate(num_return_sequences=K)` four identical prefills. This module runs each
prompt through the model once and copies its KV cache K times instead ("shared prefill"), then
decodes all B*K rows of a prompt batch together with its own small sampling loop:

    prompts (B, left padded) --prefill once--> cache (B rows)
        --repeat_interleave K--> preallocated cache (B*K rows, room for max_new_tokens)
        --> decode step by step: temperature, nucleus (top-p), stop ids per row

On CPU this is 1.3x (128-token contexts) to 2.7x (1024) the candidate tokens/s of generate; see
docs/benchmarks.md. With a `PrefixStore` (`prefix_cache.py`; a rollout has one), the prefill
starts from the keys and values of the longest prompt already run that begins the same way, so a
dialogue's later turns prefill only their new messages.

What the loop has to get right, and what the tests check against `model.generate`:
- left padding: prompts of different lengths are right-aligned, padding is masked out, and position
  ids count real tokens only (a prompt's first real token is position 0 whatever its padding);
- the K copies of a prompt are rows i*K .. i*K+K-1, the same order generate uses;
- a row stops at its first stop id; the stop id is not part of the candidate. Finished rows keep
  feeding a pad token (their outputs are ignored) until every row is done or `max_new_tokens`.

`sample_with_generate` is the same job done by `model.generate(num_return_sequences=K)`: the
baseline for `bench/sampling.py` and a cross-check in the tests.

The engine asks for candidates through the `Sampler` interface (`workers/engine/rollout.py`
drives it turn by turn); `SharedPrefillSampler` is this loop behind it, on the job's own model.
Ours on purpose: on CPU the shared prefill is what makes K candidates affordable, and its exact
sampling order is what makes a resumed job sample what an uninterrupted one would.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

from workers.engine.config import SamplingConfig
from workers.engine.hooks import Stopped
from workers.engine.prefix_cache import Cached, PrefixStore

# Nucleus sampling needs the probabilities in descending order only until they add up to top_p.
# On CPU, sorting SmolLM2's 49k-token vocabulary for 8 rows takes ~12 ms, a fifth of a decode
# step, while a top-k of 64 takes 0.2 ms and of 1024 under 2 ms. Measured on SmolLM2 at
# temperature 0.8 / top_p 0.95, 92% of rows have a nucleus of at most 64 tokens and 99.8% of at
# most 1024; but one wide row in the batch forces the wider window, so the windows are tried in
# turn and the full sort stays as the last resort. Every path yields the same set of tokens.
_NUCLEUS_WINDOWS = (64, 1024)


@dataclass(frozen=True)
class Candidate:
    text: str  # decoded with skip_special_tokens=True, without the stop token
    token_ids: tuple[int, ...]  # the generated tokens, without the stop token
    finished: bool  # True: ended at a stop id; False: cut at max_new_tokens


class Sampler(Protocol):
    """K candidate replies (`config.k`) for each of a batch of prompts, rendered token ids that end
    with the generation prompt. The same generator state and prompts give the same candidates.
    `streams`: the sampler batches requests as they come (a vLLM server), so the sample stage sends
    each dialogue's turns as they are ready instead of a chunk's turns together (`sample_stage.py`)."""

    streams: ClassVar[bool]

    def candidates(
        self,
        prompts: list[list[int]],
        config: SamplingConfig,
        *,
        generator: torch.Generator | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[Candidate]]: ...


# Idle caches a sampler may hold: compiled decoding runs on GPUs, where this is a tenth of an
# 80 GB card. Not tuned on a device; the pool drops the least recently used shape beyond it.
_DECODE_CACHE_BUDGET = 8 << 30


@dataclass
class DecodeCaches:
    """Static caches kept from one prompt batch to the next, one per shape (rows, width, dtype,
    device), for compiled decoding only.

    A CUDA graph records the addresses of the cache it writes to. A new cache for every prompt
    batch makes torch.compile's CUDA graphs record again for each batch (a few eager steps'
    worth each time) where replaying the graph of the same shape would do; transformers'
    `generate` keeps its static cache on the model for the same reason. A taken cache is reset
    before it is filled again, so what a batch samples does not depend on the batch before.

    A sampling stage's widths repeat from chunk to chunk (turn t of every chunk rounds to about
    the same width), so every shape is kept up to `budget_bytes`, least recently used first out;
    the cache in use always stays. Eager decoding needs none: allocating its cache is a small
    part of a prompt batch. The pool lives as long as its sampler, one stage's rollout.
    """

    budget_bytes: int = _DECODE_CACHE_BUDGET
    _caches: OrderedDict[tuple, StaticCache] = field(default_factory=OrderedDict)

    def take(self, shape: tuple) -> StaticCache | None:
        """The kept cache of this shape, reset, or None; it is the caller's until `keep`."""
        cache = self._caches.pop(shape, None)
        if cache is not None:
            cache.reset()
        return cache

    def keep(self, shape: tuple, cache: StaticCache) -> None:
        """Hold `cache` for the next batch of its shape (the most recent cache always stays)."""
        self._caches[shape] = cache
        while len(self._caches) > 1 and self.nbytes > self.budget_bytes:
            self._caches.popitem(last=False)

    def held(self) -> dict[tuple, StaticCache]:
        """The caches held by shape, least recently used first."""
        return dict(self._caches)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for cache in self._caches.values()
            for layer in cache.layers
            if layer.is_initialized
            for t in (layer.keys, layer.values)
        )


@dataclass(frozen=True)
class SharedPrefillSampler:
    """`sample_candidates` on a model in this process."""

    streams: ClassVar[bool] = False  # one prefill per chunk: its dialogues go turn by turn together

    model: Any
    tokenizer: Any
    stop_ids: Collection[int]
    prefixes: PrefixStore | None = None  # reuse the keys and values of prompts sampled before
    caches: DecodeCaches = field(default_factory=DecodeCaches)  # for compiled decoding

    def candidates(
        self,
        prompts: list[list[int]],
        config: SamplingConfig,
        *,
        generator: torch.Generator | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[Candidate]]:
        return sample_candidates(
            self.model,
            self.tokenizer,
            prompts,
            config,
            stop_ids=self.stop_ids,
            generator=generator,
            should_stop=should_stop,
            prefixes=self.prefixes,
            caches=self.caches,
        )


def sample_candidates(
    model,
    tokenizer,
    prompts: list[list[int]],
    config: SamplingConfig,
    *,
    stop_ids: Collection[int],
    generator: torch.Generator | None = None,
    should_stop: Callable[[], bool] | None = None,
    prefixes: PrefixStore | None = None,
    caches: DecodeCaches | None = None,
) -> list[list[Candidate]]:
    """K candidates for each prompt (token ids already rendered with the generation prompt);
    `prefixes` prefills only what it does not hold of a prompt, and keeps the prompts' keys and
    values for later calls (`prefix_cache.py`); `caches` keeps compiled decoding's static caches
    from call to call (`DecodeCaches`).

    Prompts are processed `config.batch_prompts` at a time, which bounds memory: the KV cache holds
    batch_prompts * k rows of (longest prompt in the batch + max_new_tokens) positions, allocated
    up front (with `prefixes`, up to twice the longest prompt: rows are aligned at the end of
    their stored part). The same generator state (or the same `config.seed`) and the same prompts give the
    same candidates. `should_stop` is checked before each prompt batch; if it says yes, `Stopped`
    is raised and the batches already sampled are lost to the caller, so keep calls small where
    cancelling matters (the pipeline calls this once per chunk of `batch_prompts` dialogues).
    """
    _check_prompts(prompts)
    device = _device(model)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    pad_id = _pad_id(tokenizer, stop_ids)

    results: list[list[Candidate]] = []
    # Sampling must not run in training mode: dropout would change the distribution, and with
    # gradient checkpointing on, transformers turns the KV cache off. Restore the mode afterwards
    # because the engine alternates sampling rounds with training on the same model.
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), config.batch_prompts):
                if should_stop is not None and should_stop():
                    raise Stopped(f"cancelled while sampling, after {start} of {len(prompts)} prompts")
                batch = prompts[start : start + config.batch_prompts]
                rows = _sample_batch(model, batch, config, stop, pad_id, generator, device, prefixes, caches)
                results.extend(_candidates(tokenizer, rows, config.k))
    finally:
        model.train(was_training)
    return results


class _Prefilled(NamedTuple):
    cache: Any  # k rows per prompt, as wide as the prompt plus every new token
    logits: torch.Tensor  # each row's next-token logits
    mask: torch.Tensor  # the attention mask of the whole width
    positions: torch.Tensor  # each row's next position
    prompt_len: int


def _prefill(
    model,
    prompts: list[list[int]],
    config: SamplingConfig,
    pad_id: int,
    device: torch.device,
    store: PrefixStore | None = None,
    caches: DecodeCaches | None = None,
) -> _Prefilled:
    """Run the prompts once (after what `store` holds of them) and expand the cache and the last
    logits to K rows per prompt."""
    k = config.k
    cached = Cached.nothing(len(prompts), device) if store is None else store.lookup(prompts, model, device)
    rest = [p[n:] for p, n in zip(prompts, cached.matched, strict=True)]
    input_ids, rest_mask = _left_pad(rest, pad_id, device)
    # Position ids as generate computes them: count real tokens only, so padding does not shift
    # the rotary positions of a short prompt. Padding gets position 0 (masked out anyway). A row
    # whose first n tokens come from the store goes on from position n.
    matched = torch.tensor(cached.matched, dtype=torch.long, device=device)[:, None]
    positions = (matched + rest_mask.cumsum(-1) - 1).clamp_(min=0)
    prompt_mask = torch.cat([cached.mask, rest_mask], dim=1)
    prefill = cached.cache if cached.cache is not None else DynamicCache(config=model.config)
    # logits_to_keep=1: only the last position's logits are needed; the full (B, L, vocab) tensor
    # would be the largest allocation of the whole call (8 x 1024 x 49k floats = 1.6 GB).
    out = model(
        input_ids=input_ids,
        attention_mask=prompt_mask,
        position_ids=positions,
        past_key_values=prefill,
        use_cache=True,
        logits_to_keep=1,
    )
    if store is not None:
        store.store(prompts, out.past_key_values, prompt_mask)
    prompt_len = prompt_mask.shape[1]
    cache_len = prompt_len + config.max_new_tokens
    if config.compile:
        # Compiled graphs are specialised to the cache's width: round it up so that prompt
        # batches of similar lengths share one graph instead of compiling one each.
        cache_len = -(-cache_len // _COMPILE_BUCKET) * _COMPILE_BUCKET
    # The shared prefill: from here on every prompt is k identical rows (prompt-major, like
    # generate's expansion). The first token of each row is drawn from the same logits.
    cache = _expanded_cache(model, out.past_key_values, k, cache_len, caches if config.compile else None)
    logits = out.logits[:, -1, :].repeat_interleave(k, dim=0)
    rows = logits.shape[0]
    # The whole mask, allocated once: prompt part as padded, the rest all ones (rows that
    # finished feed pad tokens whose outputs are ignored, so they need no masking; positions not
    # yet written are excluded by the causal mask). A static cache takes the full width every
    # step, a dynamic one a prefix view as long as the cache.
    mask = torch.cat(
        [prompt_mask.repeat_interleave(k, dim=0), prompt_mask.new_ones(rows, cache_len - prompt_len)],
        dim=1,
    )
    next_position = positions[:, -1:].repeat_interleave(k, dim=0) + 1
    return _Prefilled(cache, logits, mask, next_position, prompt_len)


def _sample_batch(
    model,
    prompts: list[list[int]],
    config: SamplingConfig,
    stop: torch.Tensor,
    pad_id: int,
    generator: torch.Generator,
    device: torch.device,
    prefixes: PrefixStore | None = None,
    caches: DecodeCaches | None = None,
) -> list[tuple[list[int], bool]]:
    """Prefill once, expand K times, decode. Returns (tokens, finished) per row, prompt-major."""
    n_new = config.max_new_tokens
    cache, logits, mask, next_position, prompt_len = _prefill(
        model, prompts, config, pad_id, device, prefixes, caches
    )
    rows = logits.shape[0]
    static = isinstance(cache, StaticCache)
    decode = _compiled_forward(model) if config.compile and static else model

    tokens = torch.full((rows, n_new), pad_id, dtype=torch.long, device=device)
    lengths = torch.full((rows,), n_new, dtype=torch.long, device=device)  # tokens kept per row
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    # Checking "all rows done" needs a device->host sync; on CPU it is free, on a GPU it stalls the
    # queue, so there it is only checked every few steps (at most a few wasted steps).
    check_every = 1 if device.type == "cpu" else 8
    for step in range(n_new):
        token = _next_token(logits, config, generator)
        token = torch.where(done, pad_id, token)
        tokens[:, step] = token
        hit = torch.isin(token, stop) & ~done
        lengths = torch.where(hit, step, lengths)
        done |= hit
        if step == n_new - 1 or ((step + 1) % check_every == 0 and bool(done.all())):
            break
        if decode is not model:
            # Each call is a new step for CUDA graphs: the previous step's outputs (already used
            # to draw `token`) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        out = decode(
            input_ids=token[:, None],
            attention_mask=mask if static else mask[:, : prompt_len + step + 1],
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :]
        next_position = next_position + 1

    finished = done.tolist()
    return [
        (row[:length], fin)
        for row, length, fin in zip(tokens.tolist(), lengths.tolist(), finished, strict=True)
    ]


_COMPILE_BUCKET = 256


def _compiled_forward(model):
    """`model.forward` under torch.compile, compiled once per model and kept on it.

    On a GPU, "reduce-overhead" replays each decode step as one CUDA graph instead of hundreds of
    kernel launches. `dynamic=False`: one graph per shape (rows x cache width), which the cache
    width's rounding keeps to a few.
    """
    compiled = getattr(model, "_gatt_compiled_forward", None)
    if compiled is None:
        mode = "reduce-overhead" if _device(model).type == "cuda" else None
        compiled = torch.compile(model.forward, mode=mode, fullgraph=True, dynamic=False)
        model._gatt_compiled_forward = compiled
    return compiled


def _expanded_cache(
    model, prefill: DynamicCache, k: int, max_len: int, caches: DecodeCaches | None = None
) -> DynamicCache | StaticCache:
    """The prompt batch's cache with every row repeated k times, room for `max_len` positions;
    with `caches`, taken from them where they hold one of this shape, and kept there after.

    A DynamicCache grows by concatenation: every decode step copies the whole cache of every layer
    (B*K rows x context). The rows are copied once into a preallocated StaticCache instead, which
    writes each new position in place (5-7% faster end to end on CPU). Models whose layers
    are not all plain full attention (sliding windows, linear attention) keep the dynamic cache,
    repeated in place, because their layers store something other than the plain prefix.
    """
    shape = None
    if caches is not None and prefill.layers and prefill.layers[0].is_initialized:
        keys = prefill.layers[0].keys
        shape = (keys.shape[0] * k, max_len, keys.dtype, keys.device)
    static = caches.take(shape) if caches is not None and shape else None
    if static is None:
        static = StaticCache(config=model.config, max_cache_len=max_len)
    plain = all(type(layer) is StaticLayer for layer in static.layers) and all(
        type(layer) is DynamicLayer and layer.is_initialized for layer in prefill.layers
    )
    if plain and len(static.layers) == len(prefill.layers):
        for index, (keys, values, _) in enumerate(prefill):
            static.update(keys.repeat_interleave(k, dim=0), values.repeat_interleave(k, dim=0), index)
        if caches is not None and shape:
            caches.keep(shape, static)
        return static
    prefill.batch_repeat_interleave(k)
    return prefill


def _next_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """One token per row: argmax when greedy, else temperature + nucleus sampling."""
    if config.greedy:
        return logits.argmax(dim=-1)
    # Softmax in float32 whatever the model's dtype: bf16 probabilities are too coarse for the tail.
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p >= 1:  # plain sampling from the whole vocabulary
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    kept, index = _nucleus(probs, config.top_p)
    choice = torch.multinomial(kept, 1, generator=generator)  # multinomial renormalises
    return index.gather(-1, choice).squeeze(1)


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-p nucleus of each row: (probabilities in descending order, zero outside the
    nucleus; their vocabulary ids), cut to as many columns as the widest nucleus needs."""
    vocab = probs.shape[-1]
    # A GPU sorts the vocabulary in well under a millisecond; the windows only pay off on CPU,
    # and checking them costs a device->host sync.
    windows = [w for w in _NUCLEUS_WINDOWS if w < vocab] if probs.device.type == "cpu" else []
    for width in windows:
        top, index = torch.topk(probs, width, dim=-1)
        if bool((top.sum(-1) >= top_p).all()):
            break
    else:
        top, index = torch.sort(probs, dim=-1, descending=True)
    # Keep a token if the probability strictly above it is below top_p (so the most likely token
    # is always kept): the same set as transformers' TopPLogitsWarper.
    keep = top.cumsum(-1) - top < top_p
    if windows:
        # multinomial costs in proportion to its width (6 ms over the full vocabulary on CPU).
        width = int(keep.sum(-1).max())
        top, index, keep = top[:, :width], index[:, :width], keep[:, :width]
    return top.masked_fill(~keep, 0.0), index


def sample_with_generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    config: SamplingConfig,
    *,
    stop_ids: Collection[int],
    generator: torch.Generator | None = None,
) -> list[list[Candidate]]:
    """The same job through `model.generate(num_return_sequences=K)`: K prefills per prompt.

    The baseline for the benchmark. `generate` draws from torch's global RNG, not a generator, so
    the RNG is seeded from `generator` (or `config.seed`) inside a fork that leaves the caller's
    global state untouched. Top-k is switched off explicitly (generate's default is 50) so that
    both paths sample from the same distribution. An empty `stop_ids` means no stopping at all.
    """
    _check_prompts(prompts)
    device = _device(model)
    pad_id = _pad_id(tokenizer, stop_ids)
    seed = config.seed if generator is None else int(torch.randint(2**62, (1,), generator=generator).item())
    settings: dict = {"max_new_tokens": config.max_new_tokens, "pad_token_id": pad_id}
    settings["eos_token_id"] = sorted(set(stop_ids)) or None
    if config.greedy:
        settings.update(do_sample=False, num_return_sequences=1)
    else:
        settings.update(
            do_sample=True,
            num_return_sequences=config.k,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=0,
        )
    # Neutralise sampling settings the checkpoint's generation_config may carry (repetition
    # penalty, min_p, ...): the baseline must sample from the same distribution as our loop.
    settings.update(repetition_penalty=1.0, min_p=None, typical_p=1.0, min_new_tokens=0)

    results: list[list[Candidate]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), config.batch_prompts):
                batch = prompts[start : start + config.batch_prompts]
                input_ids, mask = _left_pad(batch, pad_id, device)
                output = model.generate(input_ids=input_ids, attention_mask=mask, **settings)
                generated = output[:, input_ids.shape[1] :].tolist()
                if config.greedy:  # one greedy row per prompt stands for all k
                    generated = [row for row in generated for _ in range(config.k)]
                rows = [_cut_at_stop(row, set(stop_ids)) for row in generated]
                results.extend(_candidates(tokenizer, rows, config.k))
    finally:
        model.train(was_training)
    return results


# --- helpers ----------------------------------------------------------------------------------


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; render it with the chat template's generation prompt")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer, stop_ids: Collection[int]) -> int:
    # Any real token id works: padding is masked in the prompt and ignored after a row finishes.
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return min(stop_ids, default=0)


def _left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align the prompts so that every row's next token is in the last column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), mask.to(device)


def _cut_at_stop(row: list[int], stop: set[int]) -> tuple[list[int], bool]:
    for i, token in enumerate(row):
        if token in stop:
            return row[:i], True
    return row, False


def _candidates(tokenizer, rows: list[tuple[list[int], bool]], k: int) -> list[list[Candidate]]:
    candidates = [
        Candidate(text=tokenizer.decode(ids, skip_special_tokens=True), token_ids=tuple(ids), finished=fin)
        for ids, fin in rows
    ]
    return [candidates[i : i + k] for i in range(0, len(candidates), k)]
