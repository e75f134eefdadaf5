"""On the SQLite default (WAL, BEGIN IMMEDIATE, busy timeout), a few labelers at once never hit
"database is locked", and nothing is lost, doubled or over-assigned. Runs in a subprocess
because the suite's own database may be PostgreSQL or an in-memory SQLite."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_eight_labelers_on_a_sqlite_file_never_see_database_is_locked(tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "VAR_DIR": str(tmp_path),
        "CACHE_REDIS": "0",
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.labeling._sqlite_crowd", "8", "15", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["errors"] == []
    assert summary["submitted"] == summary["rankings"] == 30
    assert summary["complete_items"] == 15
    assert summary["max_rankings_per_item"] == 2
    assert summary["duplicate_assignments"] == 0
