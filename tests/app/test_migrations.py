"""`alembic upgrade head && alembic check` on a brand-new database, as CI runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from tests.app import db


def alembic(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATT_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=db.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_upgrade_check_downgrade_on_a_fresh_database() -> None:
    name = f"gatt_test_migrations_{uuid.uuid4().hex[:8]}"
    db.create_database(name)
    try:
        url = db.url_for(name)
        for step in (("upgrade", "head"), ("check",), ("downgrade", "base")):
            result = alembic(*step, url=url)
            assert result.returncode == 0, f"alembic {' '.join(step)}:\n{result.stdout}\n{result.stderr}"
            if step == ("check",):
                assert "No new upgrade operations detected" in result.stdout
    finally:
        db.drop_database(name)
