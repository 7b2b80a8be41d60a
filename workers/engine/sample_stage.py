"""The sample stage: every dialogue sampled and ranked turn by turn, into `samples.jsonl`.

Sampling and ranking are interleaved turn by turn, because the reply chosen for turn t is the
context that turn t+1 is sampled from: every turn of a synthetic dialogue follows the
instruction. A turn where no candidate is acceptable draws K more, up to `sampling.retries`
times, and then ends that dialogue there (earlier accepted turns are kept). Each sampled
dialogue is one appended line of `samples.jsonl`, fsynced, and a restarted job samples only the
dialogues not in it.

The loop samples a chunk of `batch_prompts` dialogues together, one turn of all of them per
batch (its shared prefill wants equal turns). A vLLM server batches on its own: there every
remaining dialogue is in flight at once, each sending its next turn as soon as its current one is
ranked (`_sample_streaming`).

Next to `samples.jsonl`, `samples-settings.json` records what its samples depend on (the model,
the seed, the sampling, ranking and placement settings, the dialogues and instructions, and from
round 2 on everything that trained the model that sampled). A rerun in the same folder with other
settings is refused (`OtherSamples`) rather than mixing two samplings in one training set; with
the same settings, the file can be copied into a new job's folder to train other settings on the
very same samples (`examples/experiment/run.sh` `SAMPLES_FROM`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from gatt.augment import Placement, sampling_messages
from gatt.dialogues import Dialogue
from gatt.errors import GattError
from gatt.instructions import Instruction
from gatt.masks import TemplateError, check_contents
from gatt.repetition import Repeat, closest_earlier, echo_share
from gatt.selection import Selection, select_best
from workers.engine.config import JobConfig, RewardConfig
from workers.engine.files import write_json
from workers.engine.hooks import Hooks, Stopped
from workers.engine.models import LoadedModel
from workers.engine.rewards import Reward, RewardScorer
from workers.engine.rollout import Messages, Rollout
from workers.engine.sampling import Candidate, Sampler

SAMPLES = "samples.jsonl"
MAX_DIALOGUES_IN_FLIGHT = 256  # with a streaming sampler: dialogues sampled at once, each its own thread
POLL_S = 0.5  # how often the stage checks for finished dialogues and a cancel while they run
# Job settings that never change a round's samples (pydantic's `exclude`): where the job writes,
# how it is evaluated, how many rounds follow; and paths, which name the same content differently
# on another machine (the dialogues and instructions are compared by content). From round 2 on
# every other setting counts (it trained the model that samples).
NOT_SAMPLING: dict[str, Any] = {
    "output_dir": True,
    "evaluation": True,
    "rounds": {"count"},
    "data": {"corpus", "validation", "instructions"},
}
# Round 1 samples with the job's own model: training settings do not reach its samples.
TRAINING_ONLY: dict[str, Any] = {"training": True, "loss_scope": True, "data": {"train_history", "replay"}}


class OtherSamples(GattError, ValueError):
    """The job's folder holds samples drawn with other settings."""

    job_code = "samples_mismatch"


def sample_dialogues(
    config: JobConfig,
    loaded: LoadedModel,
    dialogues: Sequence[Dialogue],
    instructions: Sequence[Instruction],
    path: Path,
    hooks: Hooks,
    *,
    allowed_roots: list[Path] | None = None,
    round_: int = 1,
    sampler: Sampler | None = None,
) -> list[dict[str, Any]]:
    """Sample every dialogue not yet in `path` (chunk by chunk, or all at once with a sampler that
    `streams`); return all records in order.
    `round_` > 1 (`rounds.py`) draws other random numbers than round 1. `sampler` replaces the
    loop on `loaded` (a vLLM server, `vllm.py`); `loaded` still renders, ranks and trains."""
    _claim(path, sampling_settings(config, dialogues, instructions, round_), hooks)
    done = {record["index"]: record for record in _read_records(path)}
    scorer = RewardScorer(config.reward, device=loaded.device, allowed_roots=allowed_roots)
    rollout = Rollout.of(loaded, sampler=sampler)
    hooks.progress("sample", len(done), len(dialogues))

    def seed(position: int) -> int:
        """The seed of the random stream that starts at dialogue `position`: a resumed job samples
        what is left exactly as an uninterrupted one would."""
        value = ((config.seed * 1_000_003 + config.sampling.seed) * 1_000_003 + position) % 2**63
        return (value * 1_000_003 + round_) % 2**63 if round_ > 1 else value

    if rollout.sampler.streams:
        todo = [i for i in range(len(dialogues)) if i not in done]
        _sample_streaming(config, rollout, scorer, dialogues, instructions, todo, seed, path, done, hooks)
        return [done[i] for i in sorted(done)]
    chunk_size = config.sampling.batch_prompts
    for start in range(0, len(dialogues), chunk_size):
        todo = [i for i in range(start, min(start + chunk_size, len(dialogues))) if i not in done]
        if not todo:
            continue
        if hooks.should_stop():
            raise Stopped("cancelled during sampling")
        # One stream per chunk, on the model's device (sampling draws there), and nothing kept
        # from earlier chunks: a resumed job samples the chunk as an uninterrupted one did.
        rollout.forget()
        generator = torch.Generator(device=loaded.device).manual_seed(seed(start))
        chunk = _sample_chunk(config, rollout, scorer, dialogues, instructions, todo, generator, hooks)
        _append(path, chunk, done, len(dialogues), hooks)
    return [done[i] for i in sorted(done)]


def sampling_settings(
    config: JobConfig, dialogues: Sequence[Dialogue], instructions: Sequence[Instruction], round_: int
) -> dict[str, Any]:
    """What a round's samples depend on, as JSON; the corpus and the instructions by content (a
    copy of the corpus elsewhere samples the same)."""
    exclude = dict(NOT_SAMPLING)
    if round_ == 1:
        exclude |= {**TRAINING_ONLY, "data": NOT_SAMPLING["data"] | TRAINING_ONLY["data"]}
    if config.lineage is not None:
        # A service job: the worker resolved its model to a path on this machine; the lineage names
        # the same model wherever the job resumes (its base model id, the parent job and step).
        exclude |= {"model": True, "base_model": True}
    settings = config.model_dump(mode="json", exclude=exclude)

    def digest(rows: list[Any]) -> str:
        return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    settings["round"] = round_
    settings["dialogues_sha256"] = digest([d.to_json() for d in dialogues])
    settings["instructions_sha256"] = digest([i.to_json() for i in instructions])
    return settings


def check_samples(path: Path, settings: dict[str, Any]) -> None:
    """Raise OtherSamples when the samples in `path` were drawn with other `settings`. Samples of
    an earlier version, with no record of their settings, are taken as they are."""
    record = _settings_path(path)
    if not record.exists():
        return
    theirs = json.loads(record.read_text(encoding="utf-8"))
    if theirs != settings:
        raise OtherSamples(
            f"{path} holds samples drawn with other settings ({', '.join(_differing(theirs, settings))}); "
            "give the job a new output_dir, or set these back"
        )


def _claim(path: Path, settings: dict[str, Any], hooks: Hooks) -> None:
    """The samples in `path` are, and will be, drawn with `settings`."""
    check_samples(path, settings)
    record = _settings_path(path)
    if not record.exists():
        hooks.fence()
        write_json(record, settings)


def _settings_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}-settings.json")


def _differing(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted paths where two JSON objects differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [prefix or "(all)"]
    return [
        path
        for key in sorted(a.keys() | b.keys())
        for path in _differing(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
    ]


def _append(path: Path, records: list[dict], done: dict[int, dict], total: int, hooks: Hooks) -> None:
    """Append finished dialogues to `path`, durably, and count them as done."""
    hooks.fence()  # a run taken over while it sampled must not append what the new one samples too
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    done.update((r["index"], r) for r in records)
    hooks.sampled(sum(c["tokens"] for r in records for t in r["turns"] for c in t["candidates"]))
    hooks.progress("sample", len(done), total)


def _sample_streaming(
    config: JobConfig,
    rollout: Rollout,
    scorer: RewardScorer,
    dialogues: Sequence[Dialogue],
    instructions: Sequence[Instruction],
    todo: list[int],
    seed: Callable[[int], int],
    path: Path,
    done: dict[int, dict],
    hooks: Hooks,
) -> None:
    """Sample the dialogues `todo` with a sampler that batches on its own (a vLLM server): each
    dialogue runs turn after turn in a thread of its own, sending its next turn as soon as its
    current one is ranked, with a random stream of its own (`seed(index)`), so that what it
    samples does not depend on when the others finish. A finished dialogue's record is appended
    once every dialogue before it in `todo` is (a crash loses at most what was waiting, which a
    rerun samples again the same way). Hooks are called from this thread only."""
    states = [_new_record(config, rollout.tokenizer, dialogues[i], i, instructions[i], hooks) for i in todo]
    shared = threading.Lock()  # the tokenizer and the scorer's models are not for concurrent use
    abandoned = threading.Event()

    def run(s: dict[str, Any]) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(seed(s["index"]))
        while s["stopped"] is None and len(s["replies"]) < len(s["users"]) and not abandoned.is_set():
            context = sampling_context(
                instructions[s["index"]], s["users"], s["replies"], s["system"], config.placement
            )
            with shared:
                prompt = rollout.prompt(context)
            if not rollout.fits(prompt, config.sampling):
                s["stopped"] = "context_length"
                break

            def draw(positions: list[int], prompt: list[int] = prompt) -> list[list[Candidate]]:
                return rollout.sampler.candidates([prompt], config.sampling, generator=generator)

            def rank(i: int, drawn: list[Candidate], context: Messages = context) -> dict[str, Any]:
                with shared:  # a draw waits outside the lock: it is the server's work
                    return _ranked_turn(config, scorer, s, context, drawn)

            (turn,) = _ranked_with_retries(config.sampling.retries, draw([0]), rank, draw)
            _commit(s, turn)
        return s

    with ThreadPoolExecutor(max_workers=max(1, min(MAX_DIALOGUES_IN_FLIGHT, len(states)))) as pool:
        pending = {pool.submit(run, s) for s in states}
        waiting: dict[int, dict[str, Any]] = {}  # finished, behind an unfinished one in `todo`
        next_at = 0
        try:
            while pending:
                finished, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
                for future in finished:
                    record = future.result()
                    waiting[record["index"]] = record
                    if record["stopped"] == "context_length":
                        hooks.event(
                            "warning",
                            "context_length",
                            f"dialogue {record['index']} stopped: context full",
                            {},
                        )
                # The file stays in corpus order: a dialogue is appended once all before it are.
                ready = []
                while next_at < len(todo) and todo[next_at] in waiting:
                    ready.append(waiting.pop(todo[next_at]))
                    next_at += 1
                if ready:
                    _append(path, ready, done, len(dialogues), hooks)
                if pending and hooks.should_stop():
                    raise Stopped("cancelled during sampling")
        finally:
            abandoned.set()  # the dialogues still running stop after their current turn
            for future in pending:
                future.cancel()


def _sample_chunk(config, rollout, scorer, dialogues, instructions, indices, generator, hooks) -> list[dict]:
    """Sample the dialogues `indices` turn by turn, all at once; their records."""
    states = [
        _new_record(config, rollout.tokenizer, dialogues[i], i, instructions[i], hooks) for i in indices
    ]
    while True:
        active = [s for s in states if s["stopped"] is None and len(s["replies"]) < len(s["users"])]
        if not active:
            break
        if hooks.should_stop():
            raise Stopped("cancelled during sampling")
        contexts = [
            sampling_context(
                instructions[s["index"]], s["users"], s["replies"], s["system"], config.placement
            )
            for s in active
        ]
        results = rollout.turn(contexts, config.sampling, generator=generator)
        for s, candidates in zip(active, results, strict=True):
            if candidates is None:
                s["stopped"] = "context_length"
                hooks.event("warning", "context_length", f"dialogue {s['index']} stopped: context full", {})
        fitting = [i for i, candidates in enumerate(results) if candidates is not None]
        _rank_chunk_turn(
            config,
            rollout,
            scorer,
            [active[i] for i in fitting],
            [contexts[i] for i in fitting],
            [results[i] or [] for i in fitting],
            generator,
        )
    return states


def _rank_chunk_turn(config, rollout, scorer, states, contexts, candidates, generator) -> None:
    """Rank one turn of each dialogue of a chunk (with its retries) and commit it."""

    def draw(positions: list[int]) -> list[list[Candidate]]:
        more = rollout.turn([contexts[i] for i in positions], config.sampling, generator=generator)
        return [m or [] for m in more]  # a context that fitted once fits again

    def rank(i: int, drawn: list[Candidate]) -> dict[str, Any]:
        return _ranked_turn(config, scorer, states[i], contexts[i], drawn)

    for s, turn in zip(
        states, _ranked_with_retries(config.sampling.retries, candidates, rank, draw), strict=True
    ):
        _commit(s, turn)


def _new_record(
    config: JobConfig, tokenizer: Any, dialogue: Dialogue, index: int, instruction: Instruction, hooks: Hooks
) -> dict[str, Any]:
    """A dialogue's `samples.jsonl` record before its first sampled turn."""
    turns = dialogue.turns[: config.data.max_turns]
    users = [user for user, _ in turns]
    replies: list[str] = []
    trained: list[bool] = []
    if config.data.sample_turns == "last":
        # Earlier corpus replies stay as context with zero loss; only the last turn is sampled.
        replies = [reply or "" for _, reply in turns[:-1]]
        trained = [False] * len(replies)
    try:  # text that spells a control token would forge turn boundaries in every prompt
        check_contents(tokenizer, [{"content": text} for text in [*users, *replies, dialogue.system or ""]])
        stopped = None
    except TemplateError as exc:
        stopped = "control_token"
        hooks.event("warning", "control_token", f"dialogue {index} skipped: {exc}", {"dialogue": index})
    return {
        "index": index,
        "dialogue_id": dialogue.id,
        "instruction": instruction.to_json(),
        "system": dialogue.system,
        "users": users,
        "replies": replies,
        "trained": trained,
        "turns": [],
        "stopped": stopped,
    }


def _ranked_turn(
    config: JobConfig,
    scorer: RewardScorer,
    s: dict[str, Any],
    context: list[dict[str, str]],
    candidates: Sequence[Candidate],
) -> dict[str, Any]:
    """One turn's candidates scored, and the choice among them, as the dialogue's record `s`
    will hold them (`_commit`)."""
    texts = [complete_reply(c.text, c.finished) for c in candidates]
    instruction = Instruction.from_json(s["instruction"])
    question = s["users"][len(s["replies"])]
    (rewards,) = scorer.score(instruction, [context], [texts], questions=[question])
    repeats = [closest_earlier(t, s["replies"]) for t in texts]
    # The instruction's words are not an echo: it may demand a phrase the question also has.
    echoes = [echo_share(t, question, ignore=instruction.sampling_text) for t in texts]
    eligible = [
        is_eligible(t, r, rep, echo, config.reward)
        for t, r, rep, echo in zip(texts, rewards, repeats, echoes, strict=True)
    ]
    selection = select_best(
        [r.total if ok else math.nan for r, ok in zip(rewards, eligible, strict=True)],
        texts,
        threshold=config.reward.min_reward,
        prefer=config.reward.prefer,
        relevance=_relevances(rewards),
    )
    max_echo = config.reward.max_echo
    return {
        "turn": len(s["replies"]),
        "candidates": [
            {
                "text": t,  # what was scored and may be trained on
                "raw": c.text,  # what the model generated
                "finished": c.finished,
                "tokens": len(c.token_ids),
                "reward": r.to_json(),
                "repeat": rep.to_json(),  # closest earlier reply of the dialogue
                # how much of the question it repeats, and whether that refused it
                "echo": {"share": round(echo, 4), "is_echo": max_echo is not None and echo >= max_echo},
                "eligible": ok,  # ranked on its reward; False: never chosen, counts 0
            }
            for t, c, r, rep, echo, ok in zip(
                texts, candidates, rewards, repeats, echoes, eligible, strict=True
            )
        ],
        "chosen": selection.chosen,
        "best": selection.best,
        # the rewards the choice and the statistics were computed from
        "ranked": list(selection.rewards),
        "stats": {
            "mean_reward": selection.mean_reward,
            "max_reward": selection.max_reward,
            "pass_rate": selection.pass_rate,
            "gain": selection.gain,
        },
        "threshold": selection.threshold,
    }


def _commit(s: dict[str, Any], turn: dict[str, Any]) -> None:
    """Record a ranked turn in the dialogue's record `s`: its choice becomes the context of the
    next turn, or no choice ends the dialogue."""
    s["turns"].append(turn)
    if turn["chosen"] is None:
        s["stopped"] = "no_acceptable_candidate"
    else:
        s["replies"].append(turn["candidates"][turn["chosen"]]["text"])
        s["trained"].append(True)


def _ranked_with_retries(
    retries: int,
    candidates: Sequence[Sequence[Candidate]],
    rank: Callable[[int, list[Candidate]], dict[str, Any]],
    draw: Callable[[list[int]], Sequence[Sequence[Candidate]]],
) -> list[dict[str, Any]]:
    """Each of a batch of turns ranked (`rank(i, candidates)`, `_ranked_turn`); a turn with no
    acceptable candidate draws K more (`draw(positions)`, for all such turns at once) up to
    `retries` times, and is ranked over all it drew."""
    drawn = [list(c) for c in candidates]
    turns = [rank(i, c) for i, c in enumerate(drawn)]
    for _ in range(retries):
        again = [i for i, turn in enumerate(turns) if turn["chosen"] is None]
        if not again:
            break
        for i, more in zip(again, draw(again), strict=True):
            drawn[i] += more
            turns[i] = rank(i, drawn[i])
    return turns


def sampling_context(
    instruction: Instruction,
    users: Sequence[str],
    replies: Sequence[str],
    system: str | None,
    placement: Placement,
) -> list[dict[str, str]]:
    """The messages a reply is sampled from: the instruction's full wording on every user turn.

    A terse instruction (`Instruction.terse`) stays terse only in the training view
    (`build_training_set`), as in the paper."""
    return sampling_messages(instruction.sampling_text, users, replies, system=system, placement=placement)


_SENTENCE_END = re.compile(r"[.!?…](?=\s|$)|\n")


_WORD = re.compile(r"\w+")


def complete_reply(text: str, finished: bool) -> str:
    """The reply as it may be trained on: whole if the model ended it, else cut back to its last
    complete sentence. "" (never chosen) when no sentence was completed within max_new_tokens, or
    when the complete sentences hold less than half of the words generated: what is left is then
    mostly the opening ("Oh, nice!" of "Oh, nice! She loves playing with those"), often the very
    phrase an instruction asks for, and ranking would keep the phrase with no answer after it."""
    text = text.strip()
    if finished:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends:
        return ""
    kept = text[: ends[-1]].strip()
    return kept if 2 * len(_WORD.findall(kept)) >= len(_WORD.findall(text)) else ""


def is_eligible(text: str, reward: Reward, repeat: Repeat, echo: float, config: RewardConfig) -> bool:
    """Whether a candidate may be chosen at all; one that may not is ranked as NaN (counts 0).

    Not an empty reply (or one cut by max_new_tokens before its first sentence ended): training on
    it would teach the model to stop mid-sentence. Not a copy of an earlier reply: it would teach
    the model to "keep" the instruction by repeating itself. Not an echo of the question, which
    passes an opening-phrase verifier ("Ahoy! How long can cooked pasta be frozen?") without
    answering anything. Not a reply less relevant to the question than `min_relevance`.
    """
    if not text or repeat.is_copy(config.max_repeat_similarity):
        return False
    if config.max_echo is not None and echo >= config.max_echo:
        return False
    return config.min_relevance is None or (
        reward.relevance is not None and reward.relevance >= config.min_relevance
    )


def _relevances(rewards: Sequence[Reward]) -> list[float] | None:
    """The candidates' relevance for `prefer: relevant`; None when it was not computed."""
    values = [r.relevance for r in rewards if r.relevance is not None]
    return values if len(values) == len(rewards) else None


def turn_selection(turn: dict[str, Any]) -> Selection:
    """The turn's Selection as ranking made it, from the rewards it ranked on (refused candidates
    count 0), so that summary.json agrees with the turn's `stats`."""
    if "ranked" in turn:
        rewards = tuple(float(r) for r in turn["ranked"])
    else:  # a record written before rankings were recorded: its candidates' totals
        rewards = tuple(c["reward"]["total"] if c.get("eligible", True) else 0.0 for c in turn["candidates"])
    return Selection(chosen=turn["chosen"], best=turn["best"], rewards=rewards, threshold=turn["threshold"])


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Finished dialogues of an earlier run. A torn last line (a crash mid-write) is cut off."""
    if not path.exists():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    for line in data[:end].splitlines():
        if line.strip():
            yield json.loads(line)
