"""Optional experiment tracking: each job as an MLflow run, when the operator sets
`GATT_MLFLOW_TRACKING_URI` (mlflow-skinny; any tracking server, or a local `sqlite:///...` store).

One run per job, in the experiment `<GATT_MLFLOW_EXPERIMENT>/<team id>` so that teams' runs stay
apart, named after the job (its name, else its id) and tagged `gatt.job_id`, `gatt.team_id`,
`gatt.model`. A job's later attempt (after a worker was lost) finds its run by that tag and goes on
logging into it. The run holds the job's options as params (flattened, `training.lora_r`), every
training step's metrics, the evaluation's summary and table, the final checkpoint's files (not the
optimizer state), and ends FINISHED, FAILED or KILLED with the job.

Tracking never fails a job: the first error (the server unreachable, a refused write) is logged
and tracking stops for the rest of the run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from service.settings import Settings

log = logging.getLogger(__name__)

JOB_TAG = "gatt.job_id"
SKIPPED = ("optimizer.pt",)  # resume state, a pickle: not an artifact anyone loads
_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class Tracker:
    """The hooks' side of a job's MLflow run; inert without a tracking URI or once tracking failed."""

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id: str | None = None

    @classmethod
    def start(cls, settings: Settings, job: Any) -> Tracker:
        """The job's run (created, or found again for a later attempt), or an inert tracker."""
        tracker = cls()
        if settings.mlflow_tracking_uri:
            tracker._safely(tracker._open, settings, job)
        return tracker

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.run_id is not None:
            self._safely(self._log_step, step, values)

    def finish(self, outcome: str, out: Path, checkpoint: Path | None) -> None:
        """The evaluation and the final checkpoint as artifacts, and the run's end."""
        if self.run_id is not None:
            self._safely(self._end, outcome, out, checkpoint)

    def _open(self, settings: Settings, job: Any) -> None:
        # MLflow's own HTTP defaults (7 retries with exponential backoff, 120 s timeouts) hold a job
        # for minutes when the server is down; a job must not wait on its tracking. An operator's
        # own values win.
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow import MlflowClient  # only where tracking is configured: it takes a second to import
        from mlflow.entities import Param

        client = MlflowClient(tracking_uri=settings.mlflow_tracking_uri)
        name = f"{settings.mlflow_experiment}/{job.team_id}"
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:  # a tracking server keeps artifacts where it is set to; a local store, where we say
            experiment_id = client.create_experiment(
                name, artifact_location=settings.mlflow_artifact_location
            )
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{job.id}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {JOB_TAG: str(job.id), "gatt.team_id": str(job.team_id), "gatt.model": job.model}
            run_id = client.create_run(experiment_id, run_name=job.name or str(job.id), tags=tags).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in sorted(flatten(job.config).items())]
            for first in range(0, len(params), 100):  # log_batch takes at most 100 params
                client.log_batch(run_id, params=params[first : first + 100])
        self.client, self.run_id = client, run_id

    def _log_step(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step) for k, v in values.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=rows)

    def _end(self, outcome: str, out: Path, checkpoint: Path | None) -> None:
        evaluation = out / "evaluation"
        for name in ("adherence_summary.json", "attention.png"):
            if (evaluation / name).is_file():
                self.client.log_artifact(self.run_id, str(evaluation / name), "evaluation")
        if (evaluation / "adherence_summary.json").is_file():
            table = json.loads((evaluation / "adherence_summary.json").read_text()).get("table")
            if isinstance(table, str):
                self.client.log_text(self.run_id, table, "evaluation/adherence_table.md")
        if checkpoint is not None and checkpoint.is_dir():
            for path in _files(checkpoint):
                folder = path.parent.relative_to(checkpoint).as_posix()
                self.client.log_artifact(
                    self.run_id, str(path), "checkpoint" if folder == "." else f"checkpoint/{folder}"
                )
        status = _STATUS.get(outcome.partition(":")[0])
        if status is not None:  # "lease lost" and the like: the run goes on in the next attempt
            self.client.set_terminated(self.run_id, status)

    def _safely(self, call: Callable[..., None], *args: Any) -> None:
        try:
            call(*args)
        except Exception:
            log.warning("experiment tracking failed; the job goes on without it", exc_info=True)
            self.client = self.run_id = None


def flatten(value: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"training": {"lora_r": 8}}` -> `{"training.lora_r": 8}`."""
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update(flatten(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


def _files(directory: Path) -> Iterator[Path]:
    return (p for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in SKIPPED)
