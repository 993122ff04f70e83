"""What `sealserve serve` becomes once the application is ready (deployments/local_supervisor.py).

The supervisor must stay small (standard library only), end its wait on SIGINT or SIGTERM, and
notice when Ray's GCS or raylet (its children) exits on its own. The whole hand-over (driver ->
supervisor -> stop, one pid) runs for real in tests/integration/test_clean_stops.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deployments.local_serve import stop_processes
from deployments.local_supervisor import encode_state, exited, supervise

ROOT = Path(__file__).resolve().parents[2]


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_the_supervisor_imports_nothing_but_the_standard_library() -> None:
    code = (
        "import sys, deployments.local_supervisor; "
        "heavy = ('ray', 'pydantic', 'fastapi', 'requests', 'yaml', 'lib'); "
        "print(sorted(n for n in heavy if n in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_ends_the_wait(signum: signal.Signals) -> None:
    child = sleeper()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signum)).start()
        started = time.monotonic()
        assert supervise({"watch": [child.pid]}, poll_s=120.0) == signum.name
        assert time.monotonic() - started < 60.0  # the signal cut the 120 s sleep short
        assert child.poll() is None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        child.kill()
        child.wait()


def test_ray_exiting_on_its_own_ends_the_wait() -> None:
    child = sleeper()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        threading.Timer(0.3, child.kill).start()
        assert supervise({"watch": [child.pid]}, poll_s=0.1) == "ray"
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert exited(child.pid)  # reaped by the supervisor: no zombie left


def test_stopping_processes_terminates_then_kills_the_stubborn() -> None:
    polite = sleeper()
    stubborn = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)")], stdout=subprocess.PIPE)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"ready\n"
    started = time.monotonic()
    stop_processes([polite.pid, stubborn.pid], grace_s=0.5)
    # Both gone and reaped (stop_processes waits for its children); the one that ignores SIGTERM
    # could only have gone by SIGKILL, after its grace.
    assert exited(polite.pid) and exited(stubborn.pid)
    assert time.monotonic() - started >= 0.5
    for proc in (polite, stubborn):
        proc.wait(timeout=5)


def test_the_state_round_trips_through_a_command_line_argument() -> None:
    state = {"address": "127.0.0.1:6380", "config": "/x/run.yaml", "processes": [3, 2, 1],
             "watch": [2, 3], "remove_on_exit": None}
    assert json.loads(encode_state(state)) == state
    assert " " not in encode_state(state)
