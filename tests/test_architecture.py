"""Dependencies run one way: gatt <- engine <- worker -> service core <- api.

The contracts are in pyproject.toml (`[tool.importlinter]`); docs/architecture.md draws them.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout
