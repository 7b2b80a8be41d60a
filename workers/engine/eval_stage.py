"""The evaluate stage of a job (`evaluation.enabled`): the base model's adherence, attention and
validation loss before training, the trained model's after, and the comparison of the two.
The measurements themselves are `evaluation.py`, `attention.py` and `validation.py`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.engine.files import write_json
from workers.engine.hooks import Hooks
from workers.engine.models import LoadedModel
from workers.engine.sampling import Sampler


class Evaluation:
    """The evaluate stage, run on the base model before training and on the trained one after.

    Each report is written as soon as it exists, so a resumed job does not evaluate twice.
    Files in `directory`: base.json, gatt.json, adherence.json ({base, gatt, compare, overlap,
    table}), adherence_summary.json (adherence.json without the transcripts), attention.json and
    attention.png.
    """

    def __init__(
        self, config, instruction_set, train_dialogues, train_instructions, heldout, directory: Path
    ):
        from workers.engine.evaluation import check_overlap, eval_instructions

        self.config = config
        self.settings = config.evaluation.adherence(seed=config.seed)
        self.heldout = heldout
        self.instructions = eval_instructions(
            instruction_set, len(heldout), self.settings, train_seed=config.seed
        )
        self.overlap = check_overlap(train_dialogues, train_instructions, heldout, self.instructions)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def done(self, label: str) -> bool:
        """Whether `label`'s report exists (a resumed job): `run` would do nothing."""
        return (self.directory / f"{label}.json").exists()

    def run(self, label: str, loaded: LoadedModel, hooks: Hooks, sampler: Sampler | None = None) -> None:
        """Evaluate `loaded` as `label` ("base" or "gatt"), its replies from `sampler` if given
        (the vLLM server holding the same model), else from the loop on `loaded.model`."""
        from workers.engine.attention import attention_report
        from workers.engine.evaluation import evaluate_adherence
        from workers.engine.validation import validation_loss

        if self.done(label):
            return
        path = self.directory / f"{label}.json"
        placement = self.config.placement
        adherence = evaluate_adherence(
            loaded,
            self.heldout,
            self.instructions,
            self.settings,
            placement=placement,
            hooks=hooks,
            sampler=sampler,
        )
        attention = None
        if self.config.evaluation.attention:
            attention = attention_report(
                loaded,
                self.heldout,
                self.instructions,
                self.settings,
                placement=placement,
                transcripts=adherence["transcripts"].get("once"),
                hooks=hooks,
            )
        validation = validation_loss(loaded, self.heldout, self.config.training.max_seq_len)
        hooks.fence()
        write_json(path, {"adherence": adherence, "attention": attention, "validation": validation})

    def finish(self, hooks: Hooks) -> dict[str, Any]:
        from workers.engine.attention import plot_attention
        from workers.engine.eval_report import compare, format_table

        base = json.loads((self.directory / "base.json").read_text())
        gatt = json.loads((self.directory / "gatt.json").read_text())
        hooks.fence()
        report = {
            "base": base["adherence"],
            "gatt": gatt["adherence"],
            "compare": compare(base["adherence"], gatt["adherence"]),
            "overlap": self.overlap,
            "table": format_table(base["adherence"], gatt["adherence"]) + _loss_line(base, gatt),
            # Files of a job evaluated before validation loss existed have none.
            "validation_loss": {"base": base.get("validation"), "gatt": gatt.get("validation")},
        }
        write_json(self.directory / "adherence.json", report)
        # The same without the transcripts (every reply of every run), which make it large: what the
        # API serves as the job's evaluation, read whole, while tools use the full report.
        summary = {**report, **{m: _without_transcripts(report[m]) for m in ("base", "gatt")}}
        write_json(self.directory / SUMMARY, summary)
        if base["attention"] and gatt["attention"]:
            write_json(
                self.directory / "attention.json", {"base": base["attention"], "gatt": gatt["attention"]}
            )
            plot_attention(
                {"base": base["attention"], "gatt": gatt["attention"]}, self.directory / "attention.png"
            )
        return report


SUMMARY = "adherence_summary.json"


def _loss_line(base: dict[str, Any], gatt: dict[str, Any]) -> str:
    before, after = (report.get("validation") or {} for report in (base, gatt))
    if before.get("loss") is None or after.get("loss") is None:
        return ""
    return (
        f"\n\nValidation loss (the held-out dialogues' own replies, no instruction; "
        f"{after['tokens']} tokens): before {before['loss']:.4f}, after {after['loss']:.4f}\n"
    )


def _without_transcripts(model_report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model_report.items() if k != "transcripts"}
