"""The artifact store: where job artifacts live for the API to serve. Two implementations, one interface.

- `LocalStore`: a directory (`GATT_ARTIFACT_DIR`), shared by the API and the workers. This is the
  default, and the worker's own output directory *is* the store: nothing is copied.
- `S3Store`: a bucket on S3 or an S3-compatible server (MinIO, ...), chosen when `GATT_S3_BUCKET`
  is set. Workers then treat `GATT_ARTIFACT_DIR` as local scratch and upload what the engine wrote
  (`workers/artifact_sync.py`); the API reads only from the bucket, so it needs no shared disk.

Keys are the same relative paths in both: `<team_id>/<job_id>/samples.jsonl`,
`<team_id>/<job_id>/train/checkpoints/step-000008/manifest.json`, ... Checkpoint rows in Postgres
hold the prefix of their directory, so a key is never built from a request's text.

Errors: `InvalidKey` (a key that is not a plain relative path, or leads out of the store),
`ArtifactMissing` (no such file), `StoreError` (the store failed: unreachable, denied, ...). The
API turns the first two into 404s; a `StoreError` is a server problem (500, logged).

The API imports this module, so it must never import torch (tests/app/test_no_torch.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.models import Job
    from service.settings import Settings

CHUNK = 1 << 20  # bytes per read: large enough to stream fast, small enough to never matter in memory


class StoreError(Exception):
    """The store could not do what was asked (unreachable, access denied, ...); not a missing file."""


class InvalidKey(ValueError):
    """A key that is not a plain relative path, or that leads out of the store."""


class ArtifactMissing(LookupError):
    """No file under this key."""


@dataclass(frozen=True)
class StoredFile:
    key: str  # relative to the store's root, like every key
    size: int
    mtime: float  # seconds since the epoch


def check_key(key: str) -> str:
    """`key` if it is a plain relative POSIX path: no empty, `.` or `..` parts, not absolute, no
    backslashes or NULs. The same rule for both stores, so that a key valid on one is valid on the other."""
    parts = key.split("/")
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or "\0" in key
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise InvalidKey(f"not a plain relative path: {key!r}")
    return key


class ArtifactStore(ABC):
    """What the API and the workers need of a store: list, read (streamed), write, delete."""

    @abstractmethod
    def list(self, prefix: str) -> list[StoredFile]:
        """Every file under the directory `prefix`, sorted by key; [] when there is none."""

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Generator[bytes, None, None]:
        """The file's bytes, a chunk at a time (raises `ArtifactMissing` on the first `next`)."""

    @abstractmethod
    def upload(self, path: Path, key: str) -> None:
        """Store the local file `path` under `key`, replacing it whole (readers never see half of it)."""

    @abstractmethod
    def download(self, key: str, path: Path) -> None:
        """Write the stored file to `path` (parent directories created)."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete these files; keys that do not exist are ignored."""

    def read_bytes(self, key: str) -> bytes | None:
        """A small file whole (JSON reports, a PNG), or None when it is missing."""
        try:
            return b"".join(self.iter_chunks(key))
        except ArtifactMissing:
            return None

    def iter_lines(self, key: str) -> Generator[bytes, None, None]:
        """The complete lines of a JSONL file, newline included. A last line without its newline is
        not yielded: a worker may be appending it right now, or died mid-append."""
        pending = b""
        for chunk in self.iter_chunks(key):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line + b"\n"


class LocalStore(ArtifactStore):
    """Files under a directory. Every key is confined to it: symlinks are resolved before the check,
    and a listing leaves symlinked files out (and refuses a directory that links out of itself)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """The file of `key`, resolved; `InvalidKey` when it lies outside the root."""
        root = self.root.resolve()
        path = (root / check_key(key)).resolve()
        if not path.is_relative_to(root):
            raise InvalidKey(f"{key!r} leads out of the artifact directory")
        return path

    def list(self, prefix: str) -> list[StoredFile]:
        directory = self.path(prefix)
        if not directory.is_dir():
            return []
        found = []
        for p in sorted(directory.rglob("*")):
            if p.is_symlink() or not p.is_file():
                continue
            if not p.resolve().is_relative_to(directory):  # reached through a linked directory
                raise InvalidKey(f"{p} leads out of {prefix!r}")
            st = p.stat()
            found.append(
                StoredFile(f"{prefix}/{p.relative_to(directory).as_posix()}", st.st_size, st.st_mtime)
            )
        return found

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Generator[bytes, None, None]:
        try:
            f = open(self.path(key), "rb")  # noqa: SIM115 - closed by the with below
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ArtifactMissing(key) from exc
        with f:
            while data := f.read(chunk_size):
                yield data

    def upload(self, path: Path, key: str) -> None:
        target = self.path(key)
        if target == Path(path).resolve():
            return  # the worker wrote it in place: the scratch directory is the store
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomically(Path(path), target)

    def download(self, key: str, path: Path) -> None:
        source = self.path(key)
        if not source.is_file():
            raise ArtifactMissing(key)
        if source != Path(path).resolve():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _copy_atomically(source, Path(path))

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.path(key).unlink(missing_ok=True)

    def remove_empty_dirs(self, prefix: str) -> None:
        """Remove the directory `prefix` and the directories below it that hold no file any more
        (S3 has no directories; after a job's files are deleted, its folders should go too)."""
        top = self.path(prefix)
        if not top.is_dir():
            return
        for directory in sorted(
            (p for p in top.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True
        ):
            with contextlib.suppress(OSError):  # not empty: a file is left, or one was just written
                directory.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def _copy_atomically(source: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class S3Store(ArtifactStore):
    """Objects in a bucket, under an optional key prefix. Credentials come from boto3's standard chain
    (environment, shared config/credentials files, instance or container roles); this class never
    sees them as settings and never logs them."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str | None = None,
        client: Any = None,
    ):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            import boto3
            from botocore.config import Config

            # S3-compatible servers (MinIO, ...) are reached by path (`http://host:9000/bucket/key`):
            # virtual-hosted names (`bucket.host`) need DNS set up for it. AWS itself takes either.
            style = addressing_style or ("path" if endpoint_url else "auto")
            config = Config(
                retries={"mode": "standard", "max_attempts": 5},  # throttling and 5xx: backoff, retry
                connect_timeout=10,
                read_timeout=60,
                s3={"addressing_style": style},
            )
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self.client = client

    def check(self) -> None:
        """The bucket exists and these credentials may use it (HEAD bucket); raises `StoreError`."""
        with self._errors(self.bucket):
            self.client.head_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """botocore's errors as ours: a missing object is `ArtifactMissing`, anything else `StoreError`."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ArtifactMissing(key) from exc
            raise StoreError(f"S3 {code} on {key!r}: {exc}") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StoreError(f"S3 failed on {key!r}: {exc}") from exc

    def list(self, prefix: str) -> list[StoredFile]:
        start = self._key(prefix) + "/"
        found = []
        with self._errors(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            ):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(start) :]
                    found.append(StoredFile(f"{prefix}/{rel}", obj["Size"], obj["LastModified"].timestamp()))
        return sorted(found, key=lambda f: f.key)

    def iter_chunks(self, key: str, chunk_size: int = CHUNK) -> Generator[bytes, None, None]:
        # The body is read as it arrives: a multi-gigabyte checkpoint never sits in memory.
        with self._errors(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        try:
            with self._errors(key):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()  # also when the reader stops early: the connection goes back to the pool

    def upload(self, path: Path, key: str) -> None:
        # upload_file streams from disk, in parts above 8 MiB; an object appears only once complete.
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key))

    def download(self, key: str, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with self._errors(key):  # download_file writes a temporary file and renames it into place
            self.client.download_file(self.bucket, self._key(key), str(path))

    def delete(self, keys: Iterable[str]) -> None:
        names = [self._key(k) for k in keys]
        for i in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            batch = names[i : i + 1000]
            with self._errors(batch[0]):
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StoreError(f"S3 could not delete {first.get('Key')!r}: {first.get('Code')}")


def artifact_store(settings: Settings) -> ArtifactStore:
    """The store the settings name: S3 when a bucket is configured, else the local artifact directory."""
    if settings.s3_bucket:
        return _s3_store(
            settings.s3_bucket,
            settings.s3_prefix,
            settings.s3_endpoint_url,
            settings.s3_region,
            settings.s3_addressing_style,
        )
    return LocalStore(settings.artifact_dir)


def remote_store(settings: Settings) -> S3Store | None:
    """The store a worker must upload to, or None when its output directory is the store already."""
    store = artifact_store(settings)
    return store if isinstance(store, S3Store) else None


@lru_cache(maxsize=8)
def _s3_store(
    bucket: str, prefix: str, endpoint_url: str | None, region: str | None, addressing_style: str | None
) -> S3Store:
    # One client per configuration, shared by every request: making one costs tens of milliseconds,
    # and boto3 clients are thread-safe.
    return S3Store(
        bucket, prefix, endpoint_url=endpoint_url, region=region, addressing_style=addressing_style
    )


# --- where a job's artifacts live ----------------------------------------------------------


def job_dir(settings: Settings, job: Job) -> Path:
    """Where a job's run writes: <artifact_dir>/<team>/<job> (with S3, the worker's local scratch)."""
    return settings.artifact_dir / job_key(job)


def job_key(job: Job) -> str:
    """The store key of a job's directory."""
    return f"{job.team_id}/{job.id}"
