"""`python -m workers.evaluate`: the experiment's evaluation command, end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

from tests.workers.tiny import tiny_llama3
from workers.engine.eval_schema import AdherenceReport, Comparison
from workers.evaluate import main

ROOT = Path(__file__).resolve().parents[2]


def test_evaluates_base_and_checkpoint_and_writes_the_comparison(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    loaded = tiny_llama3(2048)
    loaded.model.save_pretrained(model_dir, safe_serialization=True)
    loaded.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "eval"
    argv = [
        "--model", str(model_dir), "--checkpoint", str(model_dir), "--out", str(out),
        "--heldout", str(ROOT / "examples" / "heldout.jsonl"), "--dialogues", "2", "--turns", "2",
        "--max-new-tokens", "4", "--conditions", "once,every_turn_fixed", "--no-relevance",
        "--train-corpus", str(ROOT / "examples" / "dialogues.jsonl"), "--threads", "1",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "adherence.json").read_text())
    for label in ("base", "gatt"):
        assert set(report[label]["conditions"]) == {"once", "every_turn_fixed"}
        assert report[label]["dialogues"] == 2
    assert "paired" in report["compare"] and report["overlap"]["user_messages"]["eval"] > 0
    for label in ("base", "gatt"):
        AdherenceReport.model_validate(report[label])  # the published schema holds
    Comparison.model_validate(report["compare"])
    printed = capsys.readouterr().out
    assert report["table"] in printed and "held-out overlap with training" in printed
    # The same model twice: the same validation loss, over the same replies.
    losses = report["validation_loss"]
    assert (
        losses["base"] == losses["gatt"] and losses["base"]["tokens"] > 0 and losses["base"]["dialogues"] == 2
    )
    assert (
        f"validation loss (the held-out dialogues' own replies, no instruction): base {losses['base']['loss']:.4f}"
        in printed
    )


def test_bad_arguments_are_refused_before_any_model_loads(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--conditions", "sometimes"]) == 2
    assert "conditions" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--heldout", str(tmp_path / "missing.jsonl")]) == 1


def test_a_later_evaluation_reuses_the_base_report_only_under_the_same_settings(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    loaded = tiny_llama3(2048)
    loaded.model.save_pretrained(model_dir, safe_serialization=True)
    loaded.tokenizer.save_pretrained(model_dir)
    common = [
        "--model", str(model_dir), "--checkpoint", str(model_dir),
        "--heldout", str(ROOT / "examples" / "heldout.jsonl"), "--dialogues", "2",
        "--max-new-tokens", "4", "--conditions", "once,none", "--no-relevance", "--threads", "1",
    ]  # fmt: skip
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([*common, "--turns", "2", "--out", str(first)]) == 0
    capsys.readouterr()
    assert main([*common, "--turns", "2", "--out", str(second), "--base-from", str(first)]) == 0
    assert "base: reused from" in capsys.readouterr().out
    earlier, later = (json.loads((d / "adherence.json").read_text()) for d in (first, second))
    assert later["base"] == earlier["base"] and later["settings"] == earlier["settings"]
    assert later["validation_loss"]["base"] == earlier["validation_loss"]["base"]
    # The checkpoint was evaluated again, on the same runs: the same paired comparison.
    assert later["gatt"]["conditions"] == earlier["gatt"]["conditions"]
    assert later["compare"] == earlier["compare"]

    # Other settings, other runs: refused before any model loads, and nothing written.
    third = tmp_path / "third"
    assert main([*common, "--turns", "3", "--out", str(third), "--base-from", str(first)]) == 1
    assert "other settings (eval)" in capsys.readouterr().err
    assert not (third / "adherence.json").exists()
    assert main([*common, "--out", str(third), "--base-from", str(tmp_path / "none.json")]) == 1
    assert main([*common, "--out", str(third), "--base-from", str(first), "--attention"]) == 2
