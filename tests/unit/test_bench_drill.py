"""bench/drill.py: its arguments, its table and its database lock (the live run is `make drill`)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from bench.drill import ROWS, hold_sqlite_lock, parse_args, print_table


def test_rows_are_checked() -> None:
    assert parse_args([]).rows == list(ROWS)
    chosen = parse_args(["--rows", "sigkill-ingress, database-restart"]).rows
    assert chosen == ["sigkill-ingress", "database-restart"]
    with pytest.raises(SystemExit):
        parse_args(["--rows", "unplug-the-rack"])


def test_the_table_names_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([{"fault": "sigkill-ingress", "database": "sqlite", "sent": 240,
                  "answers": {"200": 232, "500": 8}, "answered": 232, "recorded": 236, "shortfall": 0,
                  "recovery_s": 3.1}])
    out = capsys.readouterr().out
    assert "sigkill-ingress" in out and "200:232 500:8" in out and "236" in out


def test_the_sqlite_outage_really_locks_the_database(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    wait = hold_sqlite_lock(path, 3.0)
    try:
        time.sleep(1.0)  # the holder takes the lock
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            sqlite3.connect(path, timeout=0.1).execute("INSERT INTO t VALUES (1)")
    finally:
        wait()
    with sqlite3.connect(path, timeout=1) as conn:
        conn.execute("INSERT INTO t VALUES (1)")
