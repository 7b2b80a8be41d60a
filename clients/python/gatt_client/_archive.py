"""Unpacking a downloaded checkpoint: nothing lands in the destination unless every file matches
the manifest the API lists for that checkpoint (sha256 and size), with no file missing or added."""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from gatt_client.errors import ChecksumMismatch

MANIFEST = "manifest.json"


def unpack_verified(archive: Path, dest: Path, listed: dict[str, Any]) -> Path:
    """Extract `archive` (a .tar.gz of one folder) into `dest` and return the folder's path.

    `listed` is the checkpoint's manifest as `GET /v1/jobs/{id}/checkpoints` gave it. Raises
    ChecksumMismatch when a file differs, is missing or is not in the manifest, and
    FileExistsError when the folder is already in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".unpacking-") as tmp:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links out or device files
        roots = list(Path(tmp).iterdir())
        if len(roots) != 1 or not roots[0].is_dir():
            raise ChecksumMismatch("the archive does not hold exactly one checkpoint folder")
        root = roots[0]
        inside = (
            json.loads((root / MANIFEST).read_text(encoding="utf-8")) if (root / MANIFEST).is_file() else {}
        )
        files: dict[str, dict[str, Any]] = listed.get("files") or {}
        if inside.get("files") != files:
            raise ChecksumMismatch("the archive's manifest differs from the one the API lists")
        present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
        if present != set(files):
            missing, extra = sorted(set(files) - present), sorted(present - set(files))
            raise ChecksumMismatch(f"files missing {missing} or not in the manifest {extra}")
        for name, meta in files.items():
            path = root / name
            if path.stat().st_size != meta.get("bytes") or _sha256(path) != meta.get("sha256"):
                raise ChecksumMismatch(f"{name} does not match its sha256 and size in the manifest")
        target = dest / root.name
        if target.exists():
            raise FileExistsError(f"{target} already exists")
        root.rename(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
