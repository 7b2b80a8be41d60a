"""What `gatt jobs create --follow` and `gatt jobs follow` show while a job runs: a progress bar
for the whole job with the server's ETA and one per stage, each event as it is written, then the job's results (last metrics, the evaluation's
adherence table, the final checkpoint). With `--json`, one JSON object per line instead: each
event, then the final job.

It waits on the job with `Client.jobs.wait` (`If-None-Match`: a 304 while nothing changed) and
reads new events only when the job has changed, so following costs the server little.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

from gatt_client import models as m
from gatt_client.client import Client
from gatt_client.errors import NotFound

POLL_S = 1.0


def follow(
    client: Client, job_id: str, *, as_json: bool = False, results: bool = True, timeout: float | None = None
) -> m.Job:
    """Show the job until it ends (and then its results, unless `results` is false); return it."""
    view = _JsonView() if as_json else _Bars() if sys.stdout.isatty() else _Lines()
    seq = 0

    def changed(job: m.Job) -> None:
        nonlocal seq
        for event in client.jobs.events(job_id, after_seq=seq):
            seq = event.seq
            view.event(event)
        view.job(job)

    with view:
        job = client.jobs.wait(job_id, timeout=timeout, interval=POLL_S, on_change=changed)
    if results:
        view.results(client, job)
    return job


class _Lines:
    """Plain lines, for a log or a pipe: a line per event and per change of stage progress."""

    def __init__(self) -> None:
        self.last = ""

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def echo(self, text: str) -> None:
        print(text, flush=True)

    def event(self, event: m.Event) -> None:
        self.echo(f"  [{event.level}] {event.kind}: {event.message}")

    def job(self, job: m.Job) -> None:
        if job.status.value != "running" or not job.stage or not job.progress_total:
            return
        eta = f", eta {job.eta_s:.0f} s" if job.eta_s else ""
        line = f"  {job.stage.value}: {job.progress_done}/{job.progress_total}{eta}  [{_overall(job)}]"
        if line != self.last:
            self.echo(line)
            self.last = line

    def results(self, client: Client, job: m.Job) -> None:
        self.echo(f"\njob {job.id} {job.status.value}")
        if job.status.value != "succeeded":
            if job.error is not None:
                self.echo(json.dumps(job.error.model_dump(mode="json"), indent=2))
            return
        metrics = list(client.jobs.metrics(job.id))
        if metrics:
            last = metrics[-1]
            values = "  ".join(f"{k} {v:.4g}" for k, v in last.values.items() if isinstance(v, int | float))
            self.echo(f"last step {last.step}: {values}")
        with contextlib.suppress(NotFound):  # a job that did not evaluate has no report
            self.echo("\n" + client.jobs.evaluation(job.id).table)
        checkpoints = client.jobs.checkpoints(job.id)
        if checkpoints:
            self.echo(f"final checkpoint: step {checkpoints[-1].step} (gatt checkpoints download {job.id})")


def _overall(job: m.Job) -> str:
    eta = f", {job.overall_eta_s:.0f} s left" if job.overall_eta_s is not None else ""
    return f"job {job.overall_progress:.0%}{eta}"


class _Bars(_Lines):
    """A rich progress bar per stage, events printed above them."""

    def __init__(self) -> None:
        super().__init__()
        from rich.progress import BarColumn, Progress, TextColumn

        # The server's figures, not rich's: it knows how the stages weigh and how fast they went.
        self.progress = Progress(
            TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.fields[detail]}")
        )
        self.whole = self.progress.add_task("job", total=1.0, detail="")
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def echo(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def job(self, job: m.Job) -> None:
        self.progress.update(
            self.whole, completed=job.overall_progress, detail=_overall(job).removeprefix("job ")
        )
        if not job.stage or not job.progress_total:
            return
        stage = job.stage.value
        if stage not in self.tasks:
            for task, total in self.tasks.values():  # an earlier stage has ended
                self.progress.update(task, completed=total, detail=f"{total}/{total}")
            self.tasks[stage] = (
                self.progress.add_task(stage, total=job.progress_total, detail=""),
                job.progress_total,
            )
        task, _ = self.tasks[stage]
        self.tasks[stage] = (task, job.progress_total)
        eta = f", {job.eta_s:.0f} s left" if job.eta_s else ""
        detail = f"{job.progress_done}/{job.progress_total}{eta}"
        self.progress.update(task, completed=job.progress_done, total=job.progress_total, detail=detail)


class _JsonView(_Lines):
    """One JSON object per line: each event (`{"event": ...}`), then the final job (`{"job": ...}`)."""

    def event(self, event: m.Event) -> None:
        self.echo(json.dumps({"event": event.model_dump(mode="json")}, ensure_ascii=False))

    def job(self, job: m.Job) -> None:
        return None

    def results(self, client: Client, job: m.Job) -> None:
        self.echo(json.dumps({"job": job.model_dump(mode="json")}, ensure_ascii=False))
