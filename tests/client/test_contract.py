"""The Python client never drifts from the API: its models are generated from the OpenAPI document
the app serves now, and it has a call for every operation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gatt_client import _calls

from app.main import create_app

ROOT = Path(__file__).resolve().parents[2]


def test_the_client_models_are_generated_from_the_current_api():
    # Fails when an endpoint or schema changes and scripts/generate_client.py was not run.
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_client.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert check.returncode == 0, check.stderr


def test_the_client_has_a_call_for_every_operation():
    spec = create_app().openapi()
    operations = {op["operationId"] for path in spec["paths"].values() for op in path.values()}
    assert operations == _calls.OPERATIONS
