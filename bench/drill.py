"""Fault drill: faults against a live ``sealserve serve``, with bounded load and bounded time.

    make drill                                   # every row, SQLite
    python -m bench.drill --database postgresql  # the database in a fresh PostgreSQL database
    python -m bench.drill --rows sigkill-ingress,database-restart   # what .ci/run runs

It starts ``sealserve serve`` (its own Ray, the demo models, production mode with a random admin
key), then for each row creates a fresh API key, sends ``--requests`` classify requests from
``--clients`` closed-loop clients, injects the fault once a third of them were answered, and
reads back the usage the service recorded for the key. Rows:

- ``sigkill-ingress``: SIGKILL to the Ingress replica's process (found among the run's own
  processes by its Ray title; nothing outside the run is touched).
- ``database-restart``: SQLite: another process holds an exclusive lock on the database file for
  ``--outage-s`` seconds (writers wait; in WAL mode readers do not). PostgreSQL (the service
  points at a fresh database on 127.0.0.1:5432): the database refuses connections
  (``ALLOW_CONNECTIONS false``) for ``--outage-s`` seconds and the service's connections are
  terminated (``pg_terminate_backend``); the shared server itself is never restarted.
- ``model-replica-killed``: SIGKILL to the ImageClassifier replica's process mid-request.

The table: fault, requests sent, answers by status, usage recorded vs answered (2xx and 4xx:
responses a client received and is billed for), and recovery time (from the fault to the end of
the last request that got no answer or a 5xx; 0 when none did) beside the slowest answer to a
request sent after the fault (one that waited for a replacement replica). Written to
``bench/reports/drill.json``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.measures import process_label
from bench.processes import Server, free_port, write_serve_config
from bench.report import write_json

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
APP = "sealserve"
ROWS = ("sigkill-ingress", "database-restart", "model-replica-killed")
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.drill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--requests", type=int, default=240, help="classify requests per row")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--outage-s", type=float, default=4.0, help="how long the database is away")
    parser.add_argument("--row-timeout-s", type=float, default=180.0, help="most seconds one row may take")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    args.rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}: choose from {', '.join(ROWS)}")
    return args


class Load:
    """Closed-loop classify clients in threads; each answer as (sent at, answered at, status)."""

    def __init__(self, url: str, key: str, total: int, clients: int) -> None:
        self.answers: list[tuple[float, float, int]] = []
        self._lock = threading.Lock()
        self._left = total
        self._url = url + "/v1/classify"
        self._headers = {"Authorization": f"Bearer {key}"}
        self._body = {"image": classify_image(), "top_k": 1}
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        session = requests.Session()
        while True:
            with self._lock:
                if self._left <= 0:
                    return
                self._left -= 1
            sent = time.monotonic()
            try:
                answer = session.post(self._url, json=self._body, headers=self._headers, timeout=60)
                status = answer.status_code
            except requests.RequestException:
                status = 0  # no answer: refused, reset or timed out
            with self._lock:
                self.answers.append((sent, time.monotonic(), status))

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.answers)

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._left = 0  # past the row's time: no new requests


def classify_image() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 160, 90)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Drill:
    def __init__(self, args: argparse.Namespace, server: Server, url: str, admin_key: str,
                 database: dict[str, str]) -> None:
        self.args, self.server, self.url, self.database = args, server, url, database
        self.admin = {"Authorization": f"Bearer {admin_key}"}

    def create_key(self, row: str) -> tuple[str, str]:
        body = {"name": f"drill-{row}", "scopes": ["classify"], "rate_limit": "100000/minute"}
        response = requests.post(self.url + "/v1/admin/keys", json=body, headers=self.admin, timeout=30)
        response.raise_for_status()
        created = response.json()
        return created["key"], created["id"]

    def recorded(self, key_id: str) -> int | None:
        try:
            response = requests.get(self.url + "/v1/admin/usage/summary", params={"key_id": key_id},
                                    headers=self.admin, timeout=30)
        except requests.RequestException:
            return None
        return int(response.json()["total_requests"]) if response.ok else None

    def replica_pid(self, deployment: str) -> int:
        wanted = f"ray::ServeReplica:{APP}:{deployment}"
        for proc in self.server.members():
            try:
                if process_label(proc.name(), proc.cmdline()) == wanted:
                    return int(proc.pid)
            except Exception:  # noqa: S112 - a process that ended meanwhile
                continue
        raise RuntimeError(f"no {deployment} replica among the run's processes")

    def fault(self, row: str) -> Callable[[], None]:
        """Start the row's fault; returns what ends it (a no-op for a kill)."""
        if row == "sigkill-ingress":
            os.kill(self.replica_pid("Ingress"), signal.SIGKILL)
        elif row == "model-replica-killed":
            os.kill(self.replica_pid("ImageClassifier"), signal.SIGKILL)
        elif self.database["kind"] == "sqlite":
            return hold_sqlite_lock(Path(self.database["path"]), self.args.outage_s)
        else:
            return terminate_connections(self.database["name"], self.args.outage_s)
        return lambda: None

    def run_row(self, row: str) -> dict[str, Any]:
        key, key_id = self.create_key(row)
        load = Load(self.url, key, self.args.requests, self.args.clients)
        started = time.monotonic()
        while load.done < self.args.requests // 3 and time.monotonic() - started < self.args.row_timeout_s:
            time.sleep(0.05)
        fault_at = time.monotonic()
        end_fault = self.fault(row)
        end_fault()
        load.join(max(1.0, self.args.row_timeout_s - (time.monotonic() - started)))
        statuses = Counter(status for _, _, status in load.answers)
        answered = sum(n for status, n in statuses.items() if 200 <= status < 500)
        waits = [done - sent for sent, done, _ in load.answers if sent >= fault_at]
        failed = [done for _, done, status in load.answers if done >= fault_at and not 200 <= status < 500]
        recorded = self.settle(key_id, answered)
        return {
            "fault": row, "database": self.database["kind"], "sent": len(load.answers),
            "answers": {str(k): v for k, v in sorted(statuses.items())}, "answered": answered,
            "recorded": recorded,
            "shortfall": None if recorded is None else max(0, answered - recorded),
            "in_flight_excess": None if recorded is None else max(0, recorded - answered),
            "recovery_s": round(max(failed) - fault_at, 2) if failed else 0.0,
            "slowest_after_fault_s": round(max(waits), 2) if waits else None,
            "seconds": round(time.monotonic() - started, 1),
        }

    def settle(self, key_id: str, answered: int, timeout_s: float = 60.0) -> int | None:
        """The usage recorded for ``key_id`` once it has stopped growing (or reached ``answered``
        and stayed there through a few flush intervals)."""
        deadline = time.monotonic() + timeout_s
        last, steady_since = None, time.monotonic()
        while time.monotonic() < deadline:
            now = self.recorded(key_id)
            if now != last:
                last, steady_since = now, time.monotonic()
            elif now is not None and now >= answered and time.monotonic() - steady_since > 3:
                break
            time.sleep(0.5)
        return last


def hold_sqlite_lock(path: Path, seconds: float) -> Callable[[], None]:
    """Another process takes an exclusive lock on the database for ``seconds``; returns a wait."""
    script = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE'); time.sleep(float(sys.argv[2])); c.execute('ROLLBACK')\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script, str(path), str(seconds)])

    def wait() -> None:
        holder.wait(timeout=seconds + 60)

    return wait


def terminate_connections(database: str, seconds: float) -> Callable[[], None]:
    """The database refuses connections for ``seconds`` and the service's are terminated (a restart
    as the service sees it; the shared server keeps running)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
            try:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": database})
                time.sleep(seconds)
            finally:
                conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
    finally:
        engine.dispose()
    return lambda: None


def postgres_database(action: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if action == "create":
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            else:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'fault':<22}{'db':<12}{'sent':>6}  {'answers by status':<28}{'answered':>9}{'recorded':>9}" \
             f"{'short':>7}{'recovery s':>12}{'slowest s':>11}"
    print(header)
    print("-" * len(header))
    for row in rows:
        answers = " ".join(f"{k}:{v}" for k, v in row["answers"].items())
        print(f"{row['fault']:<22}{row['database']:<12}{row['sent']:>6}  {answers:<28}{row['answered']:>9}"
              f"{row['recorded']!s:>9}{row['shortfall']!s:>7}{row['recovery_s']!s:>12}"
              f"{row.get('slowest_after_fault_s')!s:>11}")


@dataclass
class Service:
    """A running ``sealserve serve`` of a drill or soak: its process, URL, admin key, database."""

    server: Server
    url: str
    admin_key: str
    database: dict[str, str]
    workdir: Path
    stopped: dict[str, Any] = field(default_factory=dict)


@contextmanager
def running_service(database_kind: str, ready_timeout_s: float, prefix: str) -> Iterator[Service]:
    """``sealserve serve`` in production mode with the demo models and a random admin key, its
    accounts in a fresh SQLite file or PostgreSQL database (dropped afterwards); stopped on exit."""
    workdir = Path(tempfile.mkdtemp(prefix=f"sealserve-{prefix}-"))
    subprocess.run([str(BIN / "sealserve"), "demo-models", "--dir", "ai-models", "--if-missing"],
                   cwd=ROOT, check=True, timeout=600)
    admin_key = f"ss_{prefix}_" + secrets.token_urlsafe(32)
    env = {**os.environ, "ENVIRONMENT": "production", "API_KEYS": admin_key,
           "SECRET_KEY": secrets.token_urlsafe(48)}
    env.pop("RAY_ADDRESS", None)
    state = workdir / "state"
    database: dict[str, str] = {"kind": database_kind}
    if database_kind == "postgresql":
        database["name"] = f"sealserve_{prefix}_{uuid.uuid4().hex[:10]}"
        postgres_database("create", database["name"])
        env["DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database['name']}"
    else:
        env.pop("DATABASE_URL", None)
        database["path"] = str(state / "sealserve.db")
    write_serve_config(workdir / "serve.yaml", {"environment": "production", "state_dir": str(state),
                                                "model_dirs": [str(ROOT / "ai-models")]})
    port = free_port()
    server = Server("sealserve", [str(BIN / "sealserve"), "serve", "--config", str(workdir / "serve.yaml"),
                                  "--port", str(port)], workdir / "sealserve.log", cwd=ROOT, env=env)
    service = Service(server, f"http://127.0.0.1:{port}", admin_key, database, workdir)
    try:
        wait_ready(server, service.url, ready_timeout_s)
        yield service
    finally:
        service.stopped = server.stop()
        if database_kind == "postgresql":
            postgres_database("drop", database["name"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[dict[str, Any]] = []
    with running_service(args.database, args.ready_timeout, "drill") as service:
        drill = Drill(args, service.server, service.url, service.admin_key, service.database)
        for row in args.rows:
            print(f"drill: {row} ...", flush=True)
            rows.append(drill.run_row(row))
            wait_ready(service.server, service.url, args.row_timeout_s)
    print_table(rows)
    report = {"database": args.database, "requests": args.requests, "clients": args.clients,
              "outage_s": args.outage_s, "rows": rows, "stop": service.stopped, "logs": str(service.workdir)}
    write_json("drill", report)
    print(f"logs: {service.workdir}")
    short = [row["fault"] for row in rows if row["shortfall"] != 0 and row["fault"] != "model-replica-killed"]
    if short:
        print(f"usage shortfall in {short}", file=sys.stderr)
    return 1 if short else 0


def wait_ready(server: Server, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"sealserve serve exited:\n{server.log_tail()}")
        try:
            if requests.get(url + "/health", timeout=5).json().get("ready"):
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError(f"sealserve serve not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


if __name__ == "__main__":
    sys.exit(main())
