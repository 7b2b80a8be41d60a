"""The artifact store (service/storage.py) on both backends, the local directory and S3 (a real S3
HTTP server: moto's standalone server, see the `s3_server` fixture), the worker's copies between
its scratch directory and the store (workers/artifact_sync.py), and the fenced checkpoint row."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import boto3
import pytest

from service.db import session_scope
from service.repositories import jobs as repository
from service.settings import Settings
from service.storage import (
    ArtifactMissing,
    ArtifactStore,
    InvalidKey,
    LocalStore,
    S3Store,
    StoreError,
    artifact_store,
    remote_store,
)
from tests.app.factories import dialogue, jsonl, make_job
from workers import artifact_sync
from workers.artifact_sync import (
    CHECKPOINTS,
    MANIFEST,
    PARENT,
    ScratchSync,
    fetch_checkpoint,
    upload_checkpoint,
)
from workers.engine.hooks import Stopped
from workers.tasks import JobRun

PREFIX = "some/prefix"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, PREFIX, endpoint_url=endpoint, region="us-east-1")


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_round_trip_listing_and_deletion(store: ArtifactStore, tmp_path: Path) -> None:
    store.upload(_file(tmp_path, "a", b"alpha\n"), "t/j/a.txt")
    store.upload(_file(tmp_path, "b", b"b" * 5000), "t/j/sub/b.bin")
    store.upload(_file(tmp_path, "c", b"other job"), "t/j2/c.txt")

    assert store.read_bytes("t/j/a.txt") == b"alpha\n"
    assert b"".join(store.iter_chunks("t/j/sub/b.bin", chunk_size=1024)) == b"b" * 5000
    assert all(len(c) <= 1024 for c in store.iter_chunks("t/j/sub/b.bin", chunk_size=1024))
    listed = store.list("t/j")
    assert [(f.key, f.size) for f in listed] == [("t/j/a.txt", 6), ("t/j/sub/b.bin", 5000)]
    assert all(f.mtime > 0 for f in listed)
    assert store.list("t/nothing") == []
    assert store.list("t/j/a") == []  # a prefix is a directory, not a string prefix of "a.txt"

    # Replaced whole.
    store.upload(_file(tmp_path, "a2", b"beta\n"), "t/j/a.txt")
    assert store.read_bytes("t/j/a.txt") == b"beta\n"

    store.download("t/j/sub/b.bin", tmp_path / "out" / "deep" / "b.bin")
    assert (tmp_path / "out" / "deep" / "b.bin").read_bytes() == b"b" * 5000

    store.delete(["t/j/a.txt", "t/j/never-there"])  # a missing key is no error
    assert [f.key for f in store.list("t/j")] == ["t/j/sub/b.bin"]
    assert store.read_bytes("t/j/a.txt") is None
    with pytest.raises(ArtifactMissing):
        next(store.iter_chunks("t/j/a.txt"))
    with pytest.raises(ArtifactMissing):
        store.download("t/j/a.txt", tmp_path / "out" / "a.txt")


def test_jsonl_lines_leave_out_a_torn_last_line(store: ArtifactStore, tmp_path: Path) -> None:
    # A worker died mid-append, inside a UTF-8 sequence: the last line is not a row yet.
    data = b'{"i": 0}\n{"i": 1, "s": "\xc3\xa9"}\n{"i": 2, "s": "\xc3'
    store.upload(_file(tmp_path, "s", data), "t/j/samples.jsonl")
    assert [json.loads(line) for line in store.iter_lines("t/j/samples.jsonl")] == [
        {"i": 0},
        {"i": 1, "s": "é"},
    ]
    # Lines longer than a chunk come back whole.
    long = [json.dumps({"i": i, "pad": "x" * 3000}).encode() + b"\n" for i in range(3)]
    store.upload(_file(tmp_path, "l", b"".join(long)), "t/j/long.jsonl")
    assert list(store.iter_lines("t/j/long.jsonl")) == long


@pytest.mark.parametrize(
    "key", ["", "/etc/passwd", "../x", "t/../../x", "t/./x", "t//x", "t/x/", "t\\x", "t/\0x", ".."]
)
def test_keys_must_be_plain_relative_paths(store: ArtifactStore, key: str, tmp_path: Path) -> None:
    src = _file(tmp_path, "f", b"x")
    with pytest.raises(InvalidKey):
        store.upload(src, key)
    with pytest.raises(InvalidKey):
        store.list(key)
    with pytest.raises(InvalidKey):
        next(store.iter_chunks(key))


def test_local_store_stays_inside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "t" / "j").mkdir(parents=True)
    (root / "t" / "j" / "ok.txt").write_text("ok")
    (root / "t" / "j" / "leak").symlink_to(outside / "secret.txt")
    (root / "t" / "out").symlink_to(outside)
    store = LocalStore(root)

    # A symlinked file is left out of a listing and cannot be read through the link.
    assert [f.key for f in store.list("t/j")] == ["t/j/ok.txt"]
    with pytest.raises(InvalidKey):
        store.read_bytes("t/j/leak")
    # A directory that links out of the root is out of bounds, for reads, listings and writes.
    for call in (
        lambda: store.list("t/out"),
        lambda: store.read_bytes("t/out/secret.txt"),
        lambda: store.upload(outside / "secret.txt", "t/out/new.txt"),
    ):
        with pytest.raises(InvalidKey):
            call()
    assert not (outside / "new.txt").exists()
    # A directory whose files are reached through a link inside it does not list either.
    (root / "t" / "k").mkdir()
    (root / "t" / "k" / "sub").symlink_to(outside, target_is_directory=True)
    assert [f.key for f in store.list("t/k")] == []  # rglob does not follow the linked directory


def test_s3_keys_lie_under_the_prefix(s3_server: str, s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket, "/gatt/artifacts/", endpoint_url=s3_server, region="us-east-1")
    store.upload(_file(tmp_path, "a", b"x"), "t/j/a.txt")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["gatt/artifacts/t/j/a.txt"]


def test_s3_failures_are_store_errors_not_missing_files(s3_server: str, tmp_path: Path) -> None:
    store = S3Store("no-such-bucket-here", endpoint_url=s3_server, region="us-east-1")
    with pytest.raises(StoreError):
        store.list("t/j")
    with pytest.raises(StoreError):
        store.upload(_file(tmp_path, "a", b"x"), "t/j/a.txt")


def test_settings_choose_the_store(tmp_path: Path, s3_server: str) -> None:
    local = Settings(artifact_dir=tmp_path)
    assert isinstance(artifact_store(local), LocalStore) and remote_store(local) is None
    s3 = Settings(artifact_dir=tmp_path, s3_bucket="bucket", s3_prefix="p", s3_endpoint_url=s3_server)
    store = artifact_store(s3)
    assert isinstance(store, S3Store) and remote_store(s3) is store
    assert store.bucket == "bucket" and store.prefix == "p"
    assert artifact_store(s3) is store  # one client per configuration
    assert store.client.meta.config.s3["addressing_style"] == "path"  # what MinIO needs


def test_sync_constants_match_the_engine() -> None:
    from workers.engine import checkpoints

    assert f"train/{checkpoints.CHECKPOINTS}" == artifact_sync.CHECKPOINTS
    assert artifact_sync.MANIFEST == checkpoints.MANIFEST
    assert artifact_sync.STEP_DIR.pattern == checkpoints.STEP_DIR.pattern


# --- the worker's side -----------------------------------------------------------------------


class Recording(LocalStore):
    """A local store that remembers the order of uploads and deletes."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.calls: list[tuple[str, str]] = []

    def upload(self, path: Path, key: str) -> None:
        self.calls.append(("upload", key))
        super().upload(path, key)

    def delete(self, keys) -> None:
        keys = list(keys)
        self.calls += [("delete", k) for k in keys]
        super().delete(keys)


def _checkpoint(job: Path, step: int) -> Path:
    directory = job / CHECKPOINTS / f"step-{step:06d}"
    (directory / "merged").mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(b"w" * step)
    (directory / "merged" / "model.safetensors").write_bytes(b"m")
    (directory / MANIFEST).write_text(json.dumps({"step": step}))
    return directory


def test_sync_sends_changed_files_and_leaves_checkpoints_to_their_own_upload(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    job = scratch / "t" / "j"
    (job / "train").mkdir(parents=True)
    (job / "samples.jsonl").write_text('{"i": 0}\n')
    (job / "train" / "metrics.jsonl").write_text("{}\n")
    (job / "summary.json.tmp").write_text("half")
    _checkpoint(job, 1)
    store = Recording(tmp_path / "store")
    sync = ScratchSync(store, scratch, "t/j")

    assert sync.sync() == 2
    assert sorted(k for _, k in store.calls) == ["t/j/samples.jsonl", "t/j/train/metrics.jsonl"]
    assert sync.sync() == 0  # nothing changed
    with open(job / "samples.jsonl", "a") as f:
        f.write('{"i": 1}\n')
    assert sync.sync() == 1 and store.read_bytes("t/j/samples.jsonl") == b'{"i": 0}\n{"i": 1}\n'

    store.calls.clear()
    sync.upload_checkpoint(job / CHECKPOINTS / "step-000001", f"t/j/{CHECKPOINTS}/step-000001")
    keys = [k for _, k in store.calls]
    assert keys[-1].endswith(f"step-000001/{MANIFEST}") and len(keys) == 3  # the manifest last
    assert {k.rsplit("step-000001/", 1)[1] for k in keys} == {
        "adapter_model.safetensors",
        "merged/model.safetensors",
        MANIFEST,
    }
    # The same step written again with fewer files (a rerun after a resume): no leftovers in the store.
    shutil.rmtree(job / CHECKPOINTS / "step-000001" / "merged")
    sync.upload_checkpoint(job / CHECKPOINTS / "step-000001", f"t/j/{CHECKPOINTS}/step-000001")
    assert [f.key.rsplit("/", 1)[1] for f in store.list(f"t/j/{CHECKPOINTS}/step-000001")] == [
        "adapter_model.safetensors",
        MANIFEST,
    ]


def test_prune_deletes_checkpoints_gone_from_disk_manifest_first(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    job = scratch / "t" / "j"
    store = Recording(tmp_path / "store")
    sync = ScratchSync(store, scratch, "t/j")
    for step in (1, 2):
        sync.upload_checkpoint(_checkpoint(job, step), f"t/j/{CHECKPOINTS}/step-{step:06d}")
    shutil.rmtree(job / CHECKPOINTS / "step-000001")  # the trainer rotated it out
    store.calls.clear()
    assert sync.prune_checkpoints() == [f"t/j/{CHECKPOINTS}/step-000001"]
    assert store.calls[0] == ("delete", f"t/j/{CHECKPOINTS}/step-000001/{MANIFEST}")
    assert {f.key.split("/")[4] for f in store.list(f"t/j/{CHECKPOINTS}")} == {"step-000002"}


def test_restore_brings_back_the_store_copy_on_another_machine(tmp_path: Path) -> None:
    first = tmp_path / "machine1"
    job = first / "t" / "j"
    job.mkdir(parents=True)
    (job / "samples.jsonl").write_text('{"i": 0}\n{"i": 1}\n')
    (job / "evaluation").mkdir()
    (job / "evaluation" / "base.json").write_text("{}")
    store = LocalStore(tmp_path / "store")
    sync = ScratchSync(store, first, "t/j")
    sync.sync()
    sync.upload_checkpoint(_checkpoint(job, 2), f"t/j/{CHECKPOINTS}/step-000002")
    # An upload cut short before its manifest: not a checkpoint, never restored.
    store.upload(job / "samples.jsonl", f"t/j/{CHECKPOINTS}/step-000003/optimizer.pt")

    second = tmp_path / "machine2"
    stale = second / "t" / "j"
    stale.mkdir(parents=True)
    (stale / "samples.jsonl").write_text('{"i": 0}\n')  # an older attempt's, on this machine
    (stale / "only-here.txt").write_text("kept")
    _checkpoint(stale, 1)
    restored = ScratchSync(store, second, "t/j").restore()

    assert sorted(restored) == ["evaluation/base.json", "samples.jsonl", f"{CHECKPOINTS}/step-000002"]
    assert (stale / "samples.jsonl").read_text() == '{"i": 0}\n{"i": 1}\n'
    assert (stale / "only-here.txt").read_text() == "kept"
    ckpt = stale / CHECKPOINTS / "step-000002"
    assert (ckpt / "merged" / "model.safetensors").read_bytes() == b"m"
    assert (ckpt / MANIFEST).read_bytes() == (job / CHECKPOINTS / "step-000002" / MANIFEST).read_bytes()
    assert not (stale / CHECKPOINTS / "step-000003").exists() and not (stale / ".restore").exists()
    # Restoring again finds everything in place.
    assert ScratchSync(store, second, "t/j").restore() == []


def test_later_rounds_checkpoints_go_whole_are_pruned_and_come_back(tmp_path: Path) -> None:
    # rounds.count > 1: round r's training run is rounds/<r>/train (workers/engine/rounds.py).
    first = tmp_path / "machine1"
    job = first / "t" / "j"
    round_two = job / "rounds" / "2"
    (round_two / "train").mkdir(parents=True)
    (round_two / "samples.jsonl").write_text('{"i": 0}\n')
    store = Recording(tmp_path / "store")
    sync = ScratchSync(store, first, "t/j")
    for step in (1, 2):
        sync.upload_checkpoint(_checkpoint(round_two, step), f"t/j/rounds/2/{CHECKPOINTS}/step-{step:06d}")
    (round_two / CHECKPOINTS / "step-000002.tmp").mkdir()
    (round_two / CHECKPOINTS / "step-000002.tmp" / "half").write_text("x")
    store.calls.clear()
    assert sync.sync() == 1  # the samples; the checkpoints go whole through upload_checkpoint
    assert store.calls == [("upload", "t/j/rounds/2/samples.jsonl")]

    shutil.rmtree(round_two / CHECKPOINTS / "step-000001")  # the trainer rotated it out
    store.calls.clear()
    assert sync.prune_checkpoints() == [f"t/j/rounds/2/{CHECKPOINTS}/step-000001"]
    assert store.calls[0] == ("delete", f"t/j/rounds/2/{CHECKPOINTS}/step-000001/{MANIFEST}")

    second = tmp_path / "machine2"
    restored = ScratchSync(store, second, "t/j").restore()
    assert sorted(restored) == ["rounds/2/samples.jsonl", f"rounds/2/{CHECKPOINTS}/step-000002"]
    ckpt = second / "t" / "j" / "rounds" / "2" / CHECKPOINTS / "step-000002"
    assert (ckpt / MANIFEST).read_bytes() == (round_two / CHECKPOINTS / "step-000002" / MANIFEST).read_bytes()


def test_a_worker_that_lost_its_lease_records_no_checkpoint(client, tenant, db, settings, tmp_path) -> None:
    """A checkpoint row means "the lease holder put these files in the store": the row is written in
    the same transaction as a lease renewal, so a worker that was taken over stops instead."""
    r = client.post("/v1/corpora", files={"file": ("c.jsonl", jsonl(dialogue(0)))}, headers=tenant.headers)
    job_id = make_job(db, tenant.team.id, uuid.UUID(r.json()["id"]))
    with session_scope(db) as s:
        assert repository.claim(s, job_id, "new-owner", 60) is not None
    local = settings.model_copy(update={"artifact_dir": tmp_path})
    ckpt = _checkpoint(tmp_path / "t" / "j", 1)

    stale = JobRun(job_id, "old-owner", local, db)
    with pytest.raises(Stopped):
        stale.checkpoint(1, str(ckpt), {"step": 1})
    assert stale.lost.is_set()
    with db() as s:
        assert repository.checkpoints(s, job_id) == []

    JobRun(job_id, "new-owner", local, db).checkpoint(1, str(ckpt), {"step": 1})
    with db() as s:
        assert [(c.step, c.path) for c in repository.checkpoints(s, job_id)] == [
            (1, f"t/j/{CHECKPOINTS}/step-000001")
        ]


def test_a_parent_checkpoint_is_fetched_whole_and_never_uploaded_again(
    store: ArtifactStore, tmp_path: Path
) -> None:
    parent = tmp_path / "machine1" / "t" / "parent"
    upload_checkpoint(store, _checkpoint(parent, 3), f"t/parent/{CHECKPOINTS}/step-000003")
    store.upload(parent / CHECKPOINTS / "step-000003" / "adapter_model.safetensors", "t/parent/half/x.bin")

    child = tmp_path / "machine2" / "t" / "child"
    fetched = fetch_checkpoint(store, f"t/parent/{CHECKPOINTS}/step-000003", child)
    assert fetched == child / PARENT / "step-000003"
    assert (fetched / "merged" / "model.safetensors").read_bytes() == b"m"
    assert (fetched / MANIFEST).read_text() == json.dumps({"step": 3})
    # Kept for the next attempt; a copy without its manifest (cut short) is not a checkpoint.
    assert fetch_checkpoint(store, f"t/parent/{CHECKPOINTS}/step-000003", child) == fetched
    with pytest.raises(ArtifactMissing):
        fetch_checkpoint(store, "t/parent/half", child)
    # The child's own sync leaves the parent's copy out of the child's artifacts.
    (child / "samples.jsonl").write_text("{}\n")
    recording = Recording(tmp_path / "child-store")
    assert ScratchSync(recording, tmp_path / "machine2", "t/child").sync() == 1
    assert [k for _, k in recording.calls] == ["t/child/samples.jsonl"]
