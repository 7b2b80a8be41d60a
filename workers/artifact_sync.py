"""A worker's copies between its scratch directory and a remote artifact store (S3).

With a local store the engine's output directory is the store, and none of this runs. With S3 the
engine still writes to `<GATT_ARTIFACT_DIR>/<team>/<job>/` (the worker's scratch: resume, rotation
and hashing all work on local files) and `workers/tasks.py` calls, at the right moments:

- `upload_checkpoint` before a checkpoint's row is written: a row means the files are in the store.
  `manifest.json` goes last, so a store copy with a manifest is complete (as on disk, where the
  manifest is written last and the directory renamed into place);
- `prune_checkpoints` after the row: store copies of checkpoints the trainer deleted are deleted,
  manifest first, so a half-deleted copy is no checkpoint either;
- `sync` at every stage change, checkpoint and ending: every other file that changed since it was
  last sent (samples, training set, metrics, evaluation, summary);
- `restore` when a new attempt starts (a takeover, maybe on another machine): what the store holds
  is brought back into the scratch directory, so the engine resumes from it (finished samples,
  evaluation reports and, above all, checkpoints) instead of starting over.

This module imports no torch: the path constants below mirror `workers/engine/checkpoints.py`
(tests/app/test_storage.py checks that they agree).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

from service.settings import Settings
from service.storage import ArtifactMissing, ArtifactStore, LocalStore, StoredFile, remote_store

log = logging.getLogger(__name__)

CHECKPOINTS = "train/checkpoints"  # the pipeline trains into out/"train"; checkpoints.CHECKPOINTS below it
MANIFEST = "manifest.json"  # checkpoints.MANIFEST
STEP_DIR = re.compile(r"^step-(\d{6,})$")  # checkpoints.STEP_DIR: finished checkpoints only, not *.tmp
# Where a job's checkpoint directories are, relative to it: round 1's and those of later rounds
# (`workers/engine/rounds.py`: rounds/<r>/train), then the checkpoint's name.
CHECKPOINT_DIR = re.compile(rf"^((?:rounds/\d+/)?{CHECKPOINTS})/([^/]+)(?:/|$)")
RESTORE = ".restore"  # staging for downloaded checkpoints, inside the job directory
PARENT = ".parent"  # the checkpoint a job continues from, downloaded; never uploaded again


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.is_symlink())


def artifact_bytes(directory: Path) -> int:
    """What a job's directory puts in the artifact store: its files, less the staging copies (a
    restore in progress, a parent's checkpoint) that are never uploaded."""
    if not directory.is_dir():
        return 0
    staged = (directory / RESTORE, directory / PARENT)
    return sum(p.stat().st_size for p in _files(directory) if not any(p.is_relative_to(s) for s in staged))


def upload_checkpoint(store: ArtifactStore, directory: Path, key: str) -> None:
    """Every file of a finished checkpoint directory under `key`, manifest.json last."""
    manifest = directory / MANIFEST
    sent: set[str] = set()
    for path in _files(directory):
        if path != manifest:
            name = f"{key}/{path.relative_to(directory).as_posix()}"
            store.upload(path, name)
            sent.add(name)
    store.upload(manifest, f"{key}/{MANIFEST}")
    # A step written again (after a resume) may have fewer files than its earlier copy: the archive
    # is built from the store's listing, so leftovers of the earlier copy must go.
    store.delete(f.key for f in store.list(key) if f.key not in sent and f.key != f"{key}/{MANIFEST}")


def fetch_checkpoint(store: ArtifactStore, key: str, job_directory: Path) -> Path:
    """A local copy of the stored checkpoint `key` (another job's, which this one continues) under
    `<job_directory>/.parent/`, kept from an earlier attempt when it is the same. Raises
    `ArtifactMissing` when the store holds no complete copy."""
    name = key.rsplit("/", 1)[-1]
    target = job_directory / PARENT / name
    if _place_checkpoint(store, key, store.list(key), target, job_directory / RESTORE / name) is None:
        raise ArtifactMissing(key)
    return target


def stored_checkpoint(settings: Settings, key: str, job_directory: Path) -> Path:
    """The directory of the stored checkpoint `key`: read in place from a local store, fetched
    under `job_directory` from S3 (`fetch_checkpoint`). Raises `ArtifactMissing` when it is gone."""
    store = remote_store(settings)
    return (
        fetch_checkpoint(store, key, job_directory) if store else LocalStore(settings.artifact_dir).path(key)
    )


def _place_checkpoint(
    store: ArtifactStore, key: str, files: list[StoredFile], final: Path, staging: Path
) -> bool | None:
    """Bring the stored checkpoint `key` (its `files`) to `final` whole: downloaded into `staging`,
    then renamed into place, so no reader ever sees half of one. True when it was downloaded, False
    when `final` holds it already, None when the store has no manifest (an upload cut short)."""
    manifest = store.read_bytes(f"{key}/{MANIFEST}")
    if manifest is None:
        return None
    if (final / MANIFEST).is_file() and (final / MANIFEST).read_bytes() == manifest:
        return False
    shutil.rmtree(staging, ignore_errors=True)
    for f in files:
        store.download(f.key, staging / f.key[len(key) + 1 :])
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    return True


def delete_checkpoint(store: ArtifactStore, key: str) -> None:
    store.delete([f"{key}/{MANIFEST}"])  # first: without it, what is left is not a checkpoint
    store.delete(f.key for f in store.list(key))


class ScratchSync:
    """Keeps the store's copy of one job directory up to date with the worker's scratch copy."""

    def __init__(self, store: ArtifactStore, root: Path, job_key: str):
        self.store, self.job_key = store, job_key
        self.directory = Path(root) / job_key
        self._sent: dict[str, tuple[int, int]] = {}  # rel path -> (size, mtime_ns) when last uploaded

    def sync(self) -> int:
        """Upload the files that changed since they were last sent; returns how many. Checkpoints are
        left out (they go whole, through `upload_checkpoint`), and so are temporary files. Called only
        from engine hooks, while the engine writes nothing: every file is whole."""
        if not self.directory.is_dir():
            return 0
        sent = 0
        for path in _files(self.directory):
            rel = path.relative_to(self.directory).as_posix()
            if (
                CHECKPOINT_DIR.match(rel)
                or rel.startswith((f"{RESTORE}/", f"{PARENT}/"))
                or any(part.endswith(".tmp") for part in rel.split("/"))
            ):
                continue  # whole checkpoints go through upload_checkpoint; *.tmp are being written
            st = path.stat()
            signature = (st.st_size, st.st_mtime_ns)
            if self._sent.get(rel) == signature:
                continue
            self.store.upload(path, f"{self.job_key}/{rel}")
            self._sent[rel] = signature
            sent += 1
        return sent

    def sync_quietly(self) -> None:
        """`sync` for a job that is ending badly anyway: a store failure is logged, not raised."""
        try:
            self.sync()
        except Exception:
            log.exception("could not upload the artifacts of %s", self.job_key)

    def upload_checkpoint(self, directory: Path, key: str) -> None:
        upload_checkpoint(self.store, directory, key)

    def prune_checkpoints(self) -> list[str]:
        """Delete the store's checkpoints that are not on local disk any more (the trainer keeps only
        the newest few); returns their keys. Also removes copies whose upload was cut short."""
        pruned = []
        for checkpoint in _checkpoint_files(self.store, self.job_key):
            if not (self.directory / checkpoint / MANIFEST).is_file():
                key = f"{self.job_key}/{checkpoint}"
                try:
                    delete_checkpoint(self.store, key)
                    pruned.append(key)
                except Exception:  # housekeeping: the checkpoint's row is gone already; log and go on
                    log.exception("could not delete %s from the artifact store", key)
        return pruned

    def restore(self) -> list[str]:
        """Bring the store's copy of the job back into the scratch directory; returns what came back.

        Files missing here, or of another size, are downloaded (the store is the truth after a
        takeover: this machine may hold an older attempt's files); files only here are kept (work
        this machine did after its last upload). A checkpoint comes back whole, and only with its
        manifest, into a staging directory first and then renamed into place, so the engine never
        sees half of one (it verifies every sha256 before resuming from it anyway).
        """
        restored: list[str] = []
        shutil.rmtree(self.directory / RESTORE, ignore_errors=True)
        checkpoints = _checkpoint_files(self.store, self.job_key)
        for f in self.store.list(self.job_key):
            rel = f.key[len(self.job_key) + 1 :]
            if CHECKPOINT_DIR.match(rel):
                continue
            local = self.directory / rel
            if not (local.is_file() and local.stat().st_size == f.size):
                self.store.download(f.key, local)
                restored.append(rel)
            st = local.stat()
            self._sent[rel] = (st.st_size, st.st_mtime_ns)  # the store has it: no need to send it back
        for checkpoint, files in sorted(checkpoints.items()):
            final = self.directory / checkpoint
            staging = self.directory / RESTORE / checkpoint
            # Not restored: an upload cut short (no manifest), or one this machine has already.
            if _place_checkpoint(self.store, f"{self.job_key}/{checkpoint}", files, final, staging):
                restored.append(checkpoint)
        shutil.rmtree(self.directory / RESTORE, ignore_errors=True)
        return restored


def _checkpoint_files(store: ArtifactStore, job_key: str) -> dict[str, list[StoredFile]]:
    """The store's checkpoint directories of a job (`[rounds/<r>/]train/checkpoints/step-XXXXXX`,
    relative to the job), each with its files."""
    found: dict[str, list[StoredFile]] = defaultdict(list)
    for f in store.list(job_key):
        match = CHECKPOINT_DIR.match(f.key[len(job_key) + 1 :])
        if match and STEP_DIR.match(match.group(2)):
            found[f"{match.group(1)}/{match.group(2)}"].append(f)
    return dict(found)
