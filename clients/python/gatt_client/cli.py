"""`gatt`, the service's command line, on the Python client.

    gatt corpora upload dialogues.jsonl
    gatt jobs create --corpus <id> --config job.yaml --follow
    gatt checkpoints download <job id> --dest checkpoints/

Where the service is and which key to use: `--url` and `--api-key`, else GATT_URL and
GATT_API_KEY, else the profile (`--profile`, GATT_PROFILE, default "default") of the TOML file
GATT_CONFIG (default ~/.config/gatt/config.toml):

    [profiles.default]
    url = "http://127.0.0.1:8000"
    api_key = "gatt_..."

`--json` prints what the API answered as JSON (one object per line for lists and streams), for
scripts. Errors print the API's code and every problem, and exit 1.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from gatt_client.client import Client
from gatt_client.errors import GattError

app = typer.Typer(help="Run and inspect GAtt fine-tuning jobs.", no_args_is_help=True, add_completion=False)
corpora = typer.Typer(help="Upload and list dialogue corpora.", no_args_is_help=True)
instruction_sets = typer.Typer(help="Create and list instruction sets.", no_args_is_help=True)
jobs = typer.Typer(help="Create, follow and inspect jobs.", no_args_is_help=True)
checkpoints = typer.Typer(help="List and download checkpoints.", no_args_is_help=True)
keys = typer.Typer(help="The team's API keys.", no_args_is_help=True)
webhooks = typer.Typer(help="Signed notifications of job endings and checkpoints.", no_args_is_help=True)
models = typer.Typer(help="The models jobs can fine-tune.", no_args_is_help=True)
app.add_typer(corpora, name="corpora")
app.add_typer(instruction_sets, name="instruction-sets")
app.add_typer(jobs, name="jobs")
app.add_typer(checkpoints, name="checkpoints")
app.add_typer(keys, name="keys")
app.add_typer(webhooks, name="webhooks")
app.add_typer(models, name="models")


class State:
    client: Client
    json: bool = False


state = State()


@app.callback()
def _options(
    url: Annotated[str | None, typer.Option(help="The service's base URL (env GATT_URL).")] = None,
    api_key: Annotated[str | None, typer.Option(help="An API key (env GATT_API_KEY).")] = None,
    profile: Annotated[
        str | None, typer.Option(help="A profile of the config file (env GATT_PROFILE).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's answers as JSON.")] = False,
) -> None:
    saved = _profile(profile or os.environ.get("GATT_PROFILE") or "default")
    state.client = Client(
        url or os.environ.get("GATT_URL") or saved.get("url"),
        api_key or os.environ.get("GATT_API_KEY") or saved.get("api_key"),
    )
    state.json = as_json


def _profile(name: str) -> dict[str, Any]:
    path = Path(os.environ.get("GATT_CONFIG") or Path.home() / ".config" / "gatt" / "config.toml")
    if not path.is_file():
        return {}
    profiles = tomllib.loads(path.read_text(encoding="utf-8")).get("profiles", {})
    return dict(profiles.get(name, {}))


def _out(value: Any, text: str | None = None) -> None:
    """One answer: as JSON with --json, else `text` (or the JSON, indented)."""
    if state.json or text is None:
        data = value.model_dump(mode="json", by_alias=True) if isinstance(value, BaseModel) else value
        typer.echo(json.dumps(data, ensure_ascii=False, indent=None if state.json else 2))
    else:
        typer.echo(text)


def _load(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix in {".yaml", ".yml"}:
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


# --- corpora --------------------------------------------------------------------------------


@corpora.command("upload")
def corpora_upload(
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A JSONL file of dialogues.")],
    name: Annotated[str | None, typer.Option(help="A label (default: the file name).")] = None,
) -> None:
    """Upload a corpus; it is validated whole before anything is stored."""
    corpus = state.client.corpora.upload(path, name)
    stats = corpus.stats
    _out(corpus, f"{corpus.id}  {corpus.name}: {stats.dialogues} dialogues, {stats.user_turns} user turns")


@corpora.command("list")
def corpora_list() -> None:
    for corpus in state.client.corpora.list():
        _out(corpus, f"{corpus.id}  {corpus.created_at:%Y-%m-%d %H:%M}  {corpus.name}")


# --- instruction sets -----------------------------------------------------------------------


@instruction_sets.command("create")
def instruction_sets_create(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The spec, JSON or YAML.")],
    name: Annotated[str, typer.Option(help="The set's name.")],
) -> None:
    """Create an instruction set from a spec file (`families` and/or `custom`)."""
    created = state.client.instruction_sets.create(name, _load(spec))
    _out(created, f"{created.id}  {created.name}")


@instruction_sets.command("list")
def instruction_sets_list() -> None:
    for item in state.client.instruction_sets.list():
        _out(item, f"{item.id}  {item.name}")


# --- jobs -----------------------------------------------------------------------------------


@jobs.command("create")
def jobs_create(
    corpus: Annotated[str | None, typer.Option(help="The corpus id.")] = None,
    corpus_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Upload this JSONL file as the corpus first."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="JSON or YAML: the job's config sections, or a whole request body.",
        ),
    ] = None,
    instruction_set: Annotated[str | None, typer.Option(help='An instruction set id, or "default".')] = None,
    validation_corpus: Annotated[
        str | None, typer.Option(help="A corpus id the evaluation holds its dialogues out from.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help='The base model\'s id (`gatt models list`; "default").')
    ] = None,
    from_job: Annotated[
        str | None, typer.Option(help="Continue from this job's checkpoint (one of your team's jobs).")
    ] = None,
    step: Annotated[
        int | None, typer.Option(help="With --from-job: its checkpoint at this step (else the latest).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="A label for the job.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Send again with it: the same job.")] = None,
    follow: Annotated[bool, typer.Option(help="Follow the job to its end, then print its results.")] = False,
) -> None:
    """Create a job and print it, or follow it to the end."""
    body = _load(config) if config is not None else {}
    if not ("config" in body or "corpus_id" in body):
        body = {"config": body}
    if corpus_file is not None:
        uploaded = state.client.corpora.upload(corpus_file)
        if not state.json:
            typer.echo(f"corpus {uploaded.id}: {uploaded.stats.dialogues} dialogues", err=True)
        corpus = str(uploaded.id)
    corpus = corpus or body.get("corpus_id")
    if corpus is None:
        raise typer.BadParameter("give --corpus, --corpus-file, or corpus_id in the config file")
    job = state.client.jobs.create(
        corpus,
        instruction_set_id=instruction_set or body.get("instruction_set_id"),
        config=body.get("config"),
        model={"job_id": from_job, "step": step} if from_job else model or body.get("model"),
        name=name or body.get("name"),
        metadata=body.get("metadata"),
        idempotency_key=idempotency_key,
        validation_corpus_id=validation_corpus or body.get("validation_corpus_id"),
    )
    if not follow:
        _out(job, f"{job.id}  {job.status.value}")
        return
    if not state.json:
        typer.echo(f"job {job.id} {job.status.value}")
    _follow(str(job.id))


@jobs.command("follow")
def jobs_follow(job_id: str) -> None:
    """Follow a job to its end: a progress bar per stage, its events as they come, then its results."""
    _follow(job_id)


def _follow(job_id: str) -> None:
    from gatt_client.progress import follow

    job = follow(state.client, job_id, as_json=state.json)
    if job.status.value != "succeeded":
        raise typer.Exit(1)


@jobs.command("list")
def jobs_list(status: Annotated[str | None, typer.Option(help="Only jobs in this status.")] = None) -> None:
    for job in state.client.jobs.list(status=status):
        _out(
            job,
            f"{job.id}  {job.status.value:<9}  {job.stage.value if job.stage else '-':<10}  {job.name or ''}",
        )


@jobs.command("get")
def jobs_get(job_id: str) -> None:
    _out(state.client.jobs.get(job_id))


@jobs.command("cancel")
def jobs_cancel(job_id: str) -> None:
    job = state.client.jobs.cancel(job_id)
    _out(job, f"{job.id}  {job.status.value} (cancel requested)")


@jobs.command("delete")
def jobs_delete(job_id: str) -> None:
    """Delete a finished job and everything it wrote, checkpoints included."""
    state.client.jobs.delete(job_id)
    _out({"deleted": job_id}, f"{job_id}  deleted")


@jobs.command("wait")
def jobs_wait(
    job_id: str,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
) -> None:
    """Wait for a job to end (polling with If-None-Match); exit 1 unless it succeeded."""
    job = state.client.jobs.wait(job_id, timeout=timeout)
    _out(job, f"{job.id}  {job.status.value}")
    if job.status.value != "succeeded":
        raise typer.Exit(1)


@jobs.command("events")
def jobs_events(
    job_id: str, after_seq: Annotated[int, typer.Option(help="Start after this event.")] = 0
) -> None:
    for event in state.client.jobs.events(job_id, after_seq=after_seq):
        _out(event, f"{event.seq:>4}  [{event.level}] {event.kind}: {event.message}")


@jobs.command("metrics")
def jobs_metrics(job_id: str) -> None:
    for metric in state.client.jobs.metrics(job_id):
        values = "  ".join(f"{k} {v:.4g}" for k, v in metric.values.items() if isinstance(v, int | float))
        _out(metric, f"step {metric.step:>5}  {values}")


@jobs.command("evaluation")
def jobs_evaluation(job_id: str) -> None:
    """The adherence table of the job's evaluation (base model against the checkpoint)."""
    report = state.client.jobs.evaluation(job_id)
    _out(report, report.table)


# --- checkpoints ----------------------------------------------------------------------------


@checkpoints.command("list")
def checkpoints_list(job_id: str) -> None:
    for checkpoint in state.client.jobs.checkpoints(job_id):
        _out(checkpoint, f"step {checkpoint.step:>6}  {checkpoint.created_at:%Y-%m-%d %H:%M:%S}")


@checkpoints.command("download")
def checkpoints_download(
    job_id: str,
    step: Annotated[int | None, typer.Option(help="The checkpoint's step (default: the latest).")] = None,
    dest: Annotated[Path, typer.Option(help="Unpack into this folder.")] = Path("."),
) -> None:
    """Download a checkpoint, check every file's sha256 against its manifest, and unpack it."""
    path = state.client.jobs.download_checkpoint(job_id, step, dest)
    _out({"path": str(path)}, str(path))


# --- keys -----------------------------------------------------------------------------------


@models.command("list")
def models_list() -> None:
    """Every model by id; those that cannot be trained, with the reason."""
    for model in state.client.models.list():
        size = f"{model.parameters / 1e6:,.0f}M" if model.parameters else "?"
        status = "trainable" if model.trainable else f"not trainable: {model.problem.code}"  # type: ignore[union-attr]
        _out(model, f"{model.id}  {model.architecture or '?'}  {size}  {status}")


@models.command("get")
def models_get(model_id: str) -> None:
    model = state.client.models.get(model_id)
    _out(model, model.model_dump_json(indent=2))


@keys.command("create")
def keys_create(name: Annotated[str | None, typer.Option(help="A label for the key.")] = None) -> None:
    """Make a key for your team and print it: it is not shown again."""
    new = state.client.keys.create(name)
    _out(new, new.key)


@keys.command("list")
def keys_list() -> None:
    for key in state.client.keys.list():
        revoked = f"  revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else ""
        _out(key, f"{key.prefix}  {key.created_at:%Y-%m-%d}  {key.name or ''}{revoked}")


@keys.command("revoke")
def keys_revoke(prefix: str) -> None:
    """Revoke a key by its prefix (the 8 characters after `gatt_`)."""
    key = state.client.keys.revoke(prefix)
    _out(key, f"{key.prefix} revoked")


# --- webhooks -------------------------------------------------------------------------------

EVENT_TYPES = ("job.succeeded", "job.failed", "job.cancelled", "checkpoint.created")


@webhooks.command("create")
def webhooks_create(
    url: str,
    event: Annotated[
        list[str] | None,
        typer.Option(help=f"An event type to send (repeat it); default all: {', '.join(EVENT_TYPES)}."),
    ] = None,
) -> None:
    """Send the team's events to URL; prints the signing secret, which is not shown again."""
    created = state.client.webhooks.create(url, event or EVENT_TYPES)
    _out(created, f"{created.id}  {created.url}\nsecret {created.secret}")


@webhooks.command("list")
def webhooks_list() -> None:
    for hook in state.client.webhooks.list():
        types = ",".join(str(t) for t in hook.event_types)
        state_ = "" if hook.enabled in (None, True) else f"  disabled: {hook.disabled_reason}"
        _out(hook, f"{hook.id}  {hook.url}  {types}{state_}")


@webhooks.command("delete")
def webhooks_delete(webhook_id: str) -> None:
    state.client.webhooks.delete(webhook_id)
    _out({"deleted": webhook_id}, f"{webhook_id} deleted")


@webhooks.command("rotate-secret")
def webhooks_rotate(webhook_id: str) -> None:
    """A new signing secret; the old one keeps signing too for a day."""
    rotated = state.client.webhooks.rotate_secret(webhook_id)
    _out(rotated, f"secret {rotated.secret}")


@webhooks.command("deliveries")
def webhooks_deliveries(webhook_id: str) -> None:
    """The delivery log: each event's status, attempts and last answer."""
    for d in state.client.webhooks.deliveries(webhook_id):
        answer = d.last_status_code or d.last_error or ""
        _out(d, f"{d.id}  {d.event_id}  {d.event_type}  {d.status}  attempts {d.attempts}  {answer}")


@webhooks.command("enable")
def webhooks_enable(webhook_id: str) -> None:
    """Send to an endpoint again after it was disabled for failing."""
    hook = state.client.webhooks.enable(webhook_id)
    _out(hook, f"{hook.id}  enabled")


@webhooks.command("resend")
def webhooks_resend(webhook_id: str, delivery_id: str) -> None:
    """Send a delivery again (`gatt webhooks deliveries` lists their ids)."""
    d = state.client.webhooks.resend(webhook_id, delivery_id)
    _out(d, f"{d.id}  {d.status}")


def main() -> None:
    try:
        app()
    except GattError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
