"""What `gatt jobs follow` shows of a running job: the whole job's figure from the server beside
each stage's, as plain lines (a pipe) and as rich bars (a terminal)."""

from __future__ import annotations

from gatt_client import models as m
from gatt_client.progress import _Bars, _Lines


def running(stage: str, done: int, total: int, overall: float, eta: float | None) -> m.Job:
    return m.Job.model_construct(
        status=m.JobStatus("running"),
        stage=m.JobStage(stage),
        progress_done=done,
        progress_total=total,
        eta_s=12.0,
        overall_progress=overall,
        overall_eta_s=eta,
    )


def test_lines_show_the_stage_and_the_whole_job(capsys):
    view = _Lines()
    view.job(running("sample", 3, 8, 0.25, None))
    view.job(running("sample", 3, 8, 0.25, None))  # unchanged: no second line
    view.job(running("train", 5, 10, 0.625, 95.4))
    assert capsys.readouterr().out.splitlines() == [
        "  sample: 3/8, eta 12 s  [job 25%]",
        "  train: 5/10, eta 12 s  [job 62%, 95 s left]",
    ]


def test_bars_show_a_bar_for_the_job_and_one_per_stage():
    with _Bars() as view:
        view.job(running("sample", 3, 8, 0.25, None))
        view.job(running("train", 5, 10, 0.625, 95.4))
    tasks = {t.description: t for t in view.progress.tasks}
    assert list(tasks) == ["job", "sample", "train"]
    assert (tasks["job"].completed, tasks["job"].fields["detail"]) == (0.625, "62%, 95 s left")
    assert (tasks["sample"].completed, tasks["sample"].fields["detail"]) == (8, "8/8")  # it has ended
    assert tasks["train"].fields["detail"] == "5/10, 12 s left"
