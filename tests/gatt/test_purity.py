"""The GAtt core stays a pure method package: no database, queue, web or cache imports."""

import pkgutil
import subprocess
import sys

import gatt

FORBIDDEN = ("sqlalchemy", "celery", "fastapi", "redis", "starlette", "kombu", "psycopg", "alembic")


def test_core_imports_no_service_libraries():
    modules = sorted(f"gatt.{m.name}" for m in pkgutil.iter_modules(gatt.__path__))
    assert {"gatt.dialogues", "gatt.masks", "gatt.augment", "gatt.selection"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(','.join(sorted(n for n in {FORBIDDEN!r} if n in sys.modules)))\n"
    )
    # A fresh interpreter: this test process may have imported anything.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"gatt imports {out.stdout.strip()}"
