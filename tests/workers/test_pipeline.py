"""The whole engine on the embedded SmolLM2: sampling picks the reward argmax, the written training
set trains on nothing but sampled replies, the CLI's checkpoint loads with stock peft, and a rerun
reuses what the first run finished."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from gatt.instructions import Instruction, synthesize
from gatt.masks import IGNORE_INDEX, build_examples
from gatt.repetition import DEFAULT_MAX_ECHO, Repeat, closest_earlier, echo_share
from gatt.selection import select_best, summarize
from workers.engine.config import RewardConfig, parse_config
from workers.engine.hooks import Hooks
from workers.engine.models import end_of_turn_ids, load_model
from workers.engine.pipeline import load_dialogues, load_instruction_set, run_job, split_heldout
from workers.engine.records import SampleRow, TrainingRow
from workers.engine.rewards import Reward
from workers.engine.sample_stage import (
    OtherSamples,
    complete_reply,
    is_eligible,
    sample_dialogues,
    turn_selection,
)
from workers.engine.sampling import SharedPrefillSampler
from workers.engine.training_set import build_training_set

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _instruction_set(tmp_path: Path) -> str:
    # Verifiers a 135M model passes often enough under the augmented context, and fails sometimes:
    # both the argmax and the threshold get exercised.
    spec = {
        "custom": [
            {
                "name": "ahoy",
                "text": "Always start your reply with 'Ahoy!'",
                "verifiers": [{"type": "starts_with", "text": "Ahoy!"}],
            },
            {
                "name": "brief",
                "text": "Answer in at most 12 words.",
                "verifiers": [{"type": "max_words", "n": 12}],
            },
        ]
    }
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(spec))
    return str(path)


def _config(tmp_path: Path, **overrides):
    raw = {
        "output_dir": str(tmp_path / "job"),
        "seed": 3,
        "data": {
            "corpus": str(ROOT / "examples" / "dialogues.jsonl"),
            "instructions": _instruction_set(tmp_path),
            "max_dialogues": 3,
            "max_turns": 2,
        },
        "sampling": {"k": 3, "max_new_tokens": 32, "batch_prompts": 3},
        "reward": {"min_reward": 0.3},
        "training": {"max_steps": 2, "micro_batch_size": 2, "checkpoint_every": 1},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(raw)


@pytest.fixture(scope="module")
def loaded():
    return load_model("default")


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, loaded):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = _config(tmp)
    events: list[tuple[str, str]] = []
    hooks = Hooks(event=lambda level, kind, message, data: events.append((kind, message)))
    result = run_job(config, hooks, loaded=loaded)
    return config, result, events


def _records(config):
    return [json.loads(line) for line in (Path(config.output_dir) / "samples.jsonl").read_text().splitlines()]


def test_chosen_reply_is_the_reward_argmax(finished_job):
    config, result, _ = finished_job
    records = _records(config)
    assert len(records) == 3 and result.sampled_dialogues == 3
    turns = [t for r in records for t in r["turns"]]
    assert turns and all(len(t["candidates"]) == 3 for t in turns)
    # Short dialogues on a model with an 8k context: no dialogue may stop for lack of room.
    assert not [r for r in records if r["stopped"] == "context_length"]
    assert config.reward.prefer == "relevant" and config.reward.max_echo == DEFAULT_MAX_ECHO
    for record in records:
        sampling_text = Instruction.from_json(record["instruction"]).sampling_text
        for turn in record["turns"]:
            earlier = record["replies"][: turn["turn"]]
            question = record["users"][turn["turn"]]
            limit = config.reward.max_repeat_similarity
            for c in turn["candidates"]:  # the recorded closest earlier reply is the real one
                closest = closest_earlier(c["text"], earlier)
                assert c["repeat"] == closest.to_json()
                share = echo_share(c["text"], question, ignore=sampling_text)
                assert c["echo"] == {"share": round(share, 4), "is_echo": share >= config.reward.max_echo}
                assert -1.0 <= c["reward"]["relevance"] <= 1.0
                # Empty replies, copies of an earlier reply and echoes of the question are never chosen.
                echo = share >= config.reward.max_echo
                assert c["eligible"] == (bool(c["text"]) and not closest.is_copy(limit) and not echo)
            # Refused candidates rank as 0, in the choice and in the statistics alike.
            assert turn["ranked"] == [
                c["reward"]["total"] if c["eligible"] else 0.0 for c in turn["candidates"]
            ]
            assert turn["stats"]["max_reward"] == max(turn["ranked"])
            # Ties go to the more relevant reply, then the longer, then the earlier.
            eligible = [
                (c["reward"]["total"], c["reward"]["relevance"], len(c["text"]), i)
                for i, c in enumerate(turn["candidates"])
                if c["eligible"]
            ]
            best = min(eligible, key=lambda e: (-e[0], -e[1], -e[2], e[3]))[3] if eligible else None
            top = turn["candidates"][best]["reward"]["total"] if best is not None else -math.inf
            expected = best if top >= config.reward.min_reward else None
            assert turn["chosen"] == expected
            if expected is not None:
                assert record["replies"][turn["turn"]] == turn["candidates"][expected]["text"]
        # A dropped turn ends the dialogue: every kept reply is an accepted sample.
        assert len(record["replies"]) == sum(t["chosen"] is not None for t in record["turns"])
        assert all(record["trained"])


def test_every_row_written_matches_its_published_schema(finished_job):
    config, _, _ = finished_job
    out = Path(config.output_dir)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    training = [json.loads(line) for line in (out / "training_set.jsonl").read_text().splitlines()]
    assert samples and training
    for row in samples:
        SampleRow.model_validate(row)  # extra="forbid": a field on one side only fails here
    for row in training:
        TrainingRow.model_validate(row)


def test_written_training_set_trains_on_sampled_replies_only(finished_job, loaded):
    config, result, _ = finished_job
    rows = [
        json.loads(line) for line in (Path(config.output_dir) / "training_set.jsonl").read_text().splitlines()
    ]
    records = {r["index"]: r for r in _records(config)}
    assert rows and result.examples >= 1
    for row in rows:
        replies = records[row["index"]]["replies"]
        spans = [span for example in row["trained_spans"] for span in example]
        assert spans == [f"{reply}<|im_end|>" for reply in replies]
        # The instruction is in the first user turn only.
        instruction = records[row["index"]]["instruction"]["text"]
        users = [m["content"] for m in row["messages"] if m["role"] == "user"]
        assert users[0].startswith(instruction) and all(instruction not in u for u in users[1:])
    # And at token level: the labels the trainer gets decode to exactly the accepted replies.
    for record in (r for r in records.values() if r["replies"]):
        (example,) = build_training_set(
            config, loaded.tokenizer, [record], Path(config.output_dir) / "one.jsonl", Hooks()
        )
        trained = [
            t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX
        ]
        decoded = loaded.tokenizer.decode(trained, skip_special_tokens=False)
        assert decoded == "".join(f"{reply}<|im_end|>" for reply in record["replies"])


def test_summary_agrees_with_the_turn_statistics(finished_job):
    config, result, _ = finished_job
    turns = [t for r in _records(config) for t in r["turns"]]
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())["selection"]
    assert summary == result.selection
    assert summary["mean_best_reward"] == pytest.approx(
        sum(t["stats"]["max_reward"] for t in turns) / len(turns)
    )
    assert summary["mean_gain"] == pytest.approx(sum(t["stats"]["gain"] for t in turns) / len(turns))


def test_unfinished_replies_are_cut_to_their_last_sentence():
    assert complete_reply("Ahoy! I like it. And then", finished=False) == "Ahoy! I like it."
    assert complete_reply("no sentence ends here", finished=False) == ""
    assert complete_reply("  whole reply, model stopped  ", finished=True) == "whole reply, model stopped"
    # A trimmed reply that keeps less than half of the words is mostly its opening: not trainable.
    assert complete_reply("Oh, nice! She loves playing with those", finished=False) == ""
    assert complete_reply("Oh, nice! She loves it. And those", finished=False) == "Oh, nice! She loves it."
    assert complete_reply("Oh, nice! She loves playing with those", finished=True).endswith("those")


def _candidate(total: float, text: str, *, eligible: bool = True) -> dict:
    return {"text": text, "reward": {"total": total}, "eligible": eligible}


def test_summary_statistics_use_what_ranking_used():
    # A copy of an earlier reply has the highest raw reward, but ranking refused it (counted 0).
    candidates = [
        _candidate(1.0, "Ahoy! Paris.", eligible=False),
        _candidate(0.6, "Ahoy! It is Madrid."),
        _candidate(0.2, "Madrid."),
    ]
    rewards = [c["reward"]["total"] if c["eligible"] else math.nan for c in candidates]
    chosen = select_best(rewards, [c["text"] for c in candidates], threshold=0.5)
    turn = {
        "candidates": candidates,
        "chosen": chosen.chosen,
        "best": chosen.best,
        "ranked": list(chosen.rewards),
        "threshold": 0.5,
    }
    assert chosen.chosen == 1 and turn["ranked"] == [0.0, 0.6, 0.2]
    selection = turn_selection(turn)
    assert selection == chosen
    assert selection.max_reward == 0.6 and selection.mean_reward == pytest.approx(0.8 / 3)
    assert selection.pass_rate == pytest.approx(1 / 3)
    stats = summarize([selection])
    assert stats.mean_best_reward == 0.6 and stats.mean_gain == pytest.approx(0.6 - 0.8 / 3)
    # A record without "ranked" (an older run) still counts refused candidates as 0.
    del turn["ranked"]
    assert turn_selection(turn) == chosen


def test_copies_echoes_and_irrelevant_replies_are_not_eligible():
    config = RewardConfig()
    answer = Reward(total=1.0, verifier=1.0, reason="", relevance=0.6)
    fresh, copy = Repeat(0.2, 0), Repeat(0.9, 0)
    assert is_eligible("Ahoy! Three days.", answer, fresh, 0.3, config)
    assert not is_eligible("", answer, fresh, 0.0, config)
    assert not is_eligible("Ahoy! Paris.", answer, copy, 0.0, config)
    # Echoes are refused by max_echo (0.75), not by the copy threshold: 0.6 is an answer here.
    assert is_eligible("Ahoy! Cooked pasta keeps in the fridge.", answer, fresh, 0.6, config)
    assert not is_eligible("Ahoy! How long can cooked pasta keep?", answer, fresh, 0.8, config)
    assert is_eligible("x", answer, fresh, 1.0, RewardConfig(max_echo=None))
    floor = RewardConfig(min_relevance=0.28)
    assert is_eligible("Ahoy! Three days.", answer, fresh, 0.0, floor)
    off_topic = Reward(total=1.0, verifier=1.0, reason="", relevance=0.1)
    assert not is_eligible("Ahoy! I like boats.", off_topic, fresh, 0.0, floor)


def test_rerun_reuses_samples_and_checkpoints(finished_job):
    config, first, _ = finished_job
    samples = (Path(config.output_dir) / "samples.jsonl").read_bytes()
    events: list[str] = []
    steps: list[int] = []
    hooks = Hooks(
        event=lambda level, kind, message, data: events.append(kind), metrics=lambda s, m: steps.append(s)
    )
    again = run_job(config, hooks, loaded=load_model("default"))  # a restarted worker loads afresh
    assert (Path(config.output_dir) / "samples.jsonl").read_bytes() == samples  # nothing sampled twice
    assert again.final_checkpoint == first.final_checkpoint
    assert "resumed" in events and steps == []  # training resumed at its last step: nothing to redo


def test_samples_drawn_with_other_settings_are_refused_before_anything_is_written(finished_job, tmp_path):
    config, first, _ = finished_job
    out = Path(config.output_dir)
    before = {
        name: (out / name).read_bytes() for name in ("config.json", "instructions.jsonl", "samples.jsonl")
    }
    hotter = parse_config({**config.to_json(), "sampling": {**config.sampling.to_json(), "temperature": 1.2}})
    with pytest.raises(OtherSamples, match=r"other settings \(sampling\.temperature\)"):
        run_job(hotter, Hooks(), loaded=load_model("default"))
    assert {name: (out / name).read_bytes() for name in before} == before

    # Elsewhere, on a copy of the corpus, with other training settings: the same samples, reused.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("samples.jsonl", "samples-settings.json"):
        shutil.copy(out / name, copy / name)
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(config.data.corpus, corpus)
    raw = config.to_json()
    raw["output_dir"] = str(copy)
    raw["data"]["corpus"] = str(corpus)
    raw["training"]["learning_rate"] = 1e-3
    sampled: list[int] = []
    hooks = Hooks(sampled=sampled.append)
    again = run_job(parse_config(raw), hooks, loaded=load_model("default"))
    assert sampled == [] and (copy / "samples.jsonl").read_bytes() == before["samples.jsonl"]
    assert (copy / "training_set.jsonl").read_bytes() == (out / "training_set.jsonl").read_bytes()
    assert again.examples == first.examples


class OneAtATime:
    """The engine's own sampler run the way a vLLM server is: each dialogue's turns sent on their
    own as they are ready (`streams`), one request at a time into the one model."""

    streams = True

    def __init__(self, loaded) -> None:
        self.inner = SharedPrefillSampler(loaded.model, loaded.tokenizer, end_of_turn_ids(loaded.tokenizer))
        self.lock = threading.Lock()

    def candidates(self, prompts, config, *, generator=None, should_stop=None):
        with self.lock:
            return self.inner.candidates(prompts, config, generator=generator, should_stop=should_stop)


@pytest.mark.parametrize("streaming", [False, True], ids=["chunks", "streaming"])
def test_a_turn_with_no_acceptable_candidate_draws_k_more(tmp_path, streaming):
    k, retries = 2, 2
    loaded = load_model("default")  # the module's copy has been trained by finished_job

    def sampled(retries: int) -> list[dict]:
        config = _config(
            tmp_path,
            output_dir=str(tmp_path / f"retries-{retries}"),
            data={"max_dialogues": 6},
            sampling={"k": k, "max_new_tokens": 16, "batch_prompts": 6, "retries": retries},
        )
        dialogues, _ = split_heldout(config, load_dialogues(config))
        instructions = synthesize(load_instruction_set(config), len(dialogues), seed=config.seed)
        path = Path(config.output_dir) / "samples.jsonl"
        path.parent.mkdir()
        sampler = OneAtATime(loaded) if streaming else None
        return sample_dialogues(config, loaded, dialogues, instructions, path, Hooks(), sampler=sampler)

    def acceptable(turn: dict, draw: int) -> bool:
        return any(
            c["eligible"] and c["reward"]["total"] >= turn["threshold"]
            for c in turn["candidates"][draw * k : (draw + 1) * k]
        )

    once, again = sampled(0), sampled(retries)
    turns = [t for r in again for t in r["turns"]]
    draws = [len(t["candidates"]) // k for t in turns]
    assert all(len(t["candidates"]) % k == 0 for t in turns) and max(draws) > 1  # retries happened
    for turn, n in zip(turns, draws, strict=True):
        # Each retry was needed: no earlier draw of the turn held an acceptable candidate.
        assert not any(acceptable(turn, d) for d in range(n - 1))
        assert (turn["chosen"] is None) == (n == 1 + retries and not acceptable(turn, n - 1))
    # A dialogue's first turn starts the same random stream (the chunk's, or the dialogue's own
    # when streaming): its first draw is the one without retries.
    for a, b in zip(once, again, strict=True):
        assert [c["raw"] for c in a["turns"][0]["candidates"]] == [
            c["raw"] for c in b["turns"][0]["candidates"][:k]
        ]
    kept = sum(t["chosen"] is not None for r in again for t in r["turns"])
    assert kept > sum(t["chosen"] is not None for r in once for t in r["turns"])


def test_cli_writes_checkpoints_that_stock_peft_loads(tmp_path):
    config = _config(
        tmp_path,
        data={"max_dialogues": 2},
        reward={"min_reward": 0.0},
        training={"max_steps": 1, "merge_on_save": True},
    )
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config.to_json()))
    out = subprocess.run(
        [sys.executable, "-m", "workers.run", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    checkpoint = Path(summary["final_checkpoint"])
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["step"] == 1 and manifest["base_model"] == "default"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.engine.models import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello!"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_dir()), checkpoint)
    merged = AutoModelForCausalLM.from_pretrained(checkpoint / "merged")
    with torch.no_grad():
        a = adapter.generate(**prompt, max_new_tokens=6, do_sample=False)
        b = merged.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert a.shape[1] > prompt["input_ids"].shape[1]
    assert a.tolist() == b.tolist()


def test_cli_reports_a_job_with_nothing_to_train(tmp_path):
    config = _config(
        tmp_path,
        data={"max_dialogues": 1, "max_turns": 1},
        reward={"min_reward": 1.0},
        sampling={"k": 1, "max_new_tokens": 4},
    )
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config.to_json()))
    out = subprocess.run(
        [sys.executable, "-m", "workers.run", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert (
        out.returncode == 1 and "error: no accepted samples" in out.stderr and "Traceback" not in out.stderr
    )


def test_bad_config_is_reported_with_paths(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "sampling:\n  k: 0\n  topk: 3\ntraining:\n  method: qlora\nreward:\n  max_repeat_similarity: 2\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "workers.run", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "sampling.topk: unknown field" in out.stderr and "training.method" in out.stderr
    assert "reward.max_repeat_similarity: max_repeat_similarity must be <= 1.0, not 2" in out.stderr


def test_examples_build_for_every_scope(finished_job, loaded):
    config, _, _ = finished_job
    record = next(r for r in _records(config) if r["replies"])
    from gatt.augment import training_dialogue

    dialogue = training_dialogue(
        record["instruction"]["text"],
        record["users"][: len(record["replies"])],
        record["replies"],
        record["trained"],
    )
    whole = build_examples(loaded.tokenizer, dialogue, "all_turns")
    cuts = build_examples(loaded.tokenizer, dialogue, "last_turn")
    assert whole.n_trained == cuts.n_trained and whole.n_tokens <= cuts.n_tokens


def test_evaluation_falls_back_to_the_loop_with_a_warning_where_the_server_cannot_sample(tmp_path, loaded):
    """The job has trained by then: a server that cannot hold the model (or is missing) does not
    fail it, the loop evaluates the same model. The sampling stage still refuses."""
    from workers.engine.pipeline import _sampler
    from workers.engine.vllm import SamplerUnavailable

    config = _config(tmp_path, sampling={"backend": "vllm"})
    events: list[tuple[str, str, dict]] = []
    hooks = Hooks(event=lambda level, kind, message, data: events.append((kind, message, data)))
    with _sampler(config, loaded, None, hooks, 2, None, evaluating=True) as sampler:
        assert sampler is None
    ((kind, message, data),) = events
    assert kind == "sampler_fallback" and data == {"stage": "evaluate"}
    assert message.startswith("evaluating with the engine's loop") and "GATT_VLLM_URL" in message
    with (
        pytest.raises(SamplerUnavailable, match="GATT_VLLM_URL"),
        _sampler(config, loaded, None, hooks, 1, None),
    ):
        pass
