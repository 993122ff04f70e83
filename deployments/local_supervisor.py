"""``python -m deployments.local_supervisor STATE``: what ``sealserve serve`` is while it serves.

``deployments/local_serve.py`` starts the local Ray, deploys the application, waits for it to be
ready and then ``exec``s this module in the same process: the pid a user or a process manager
signals stays the same, and Ray's processes stay its children (they were started with
``PR_SET_PDEATHSIG``, so they still die with it). What the driver held (Ray's core worker, Ray,
Serve and the click CLI imported) is gone: this module imports the standard library only.
Measured with bench/request_path.py on the 2-core development machine: the driver held ~180 MiB
RSS while it waited; this process holds ~10 MiB.

On SIGINT or SIGTERM it ``exec``s ``local_serve --stop`` (same pid again), which connects to the
local Ray, shuts Serve down gracefully and stops Ray's processes, as ``serve run`` does on
Ctrl-C. When Ray's GCS or raylet exits on its own, it does the same and exits non-zero.

STATE is the JSON ``local_serve`` wrote (:func:`encode_state`): the GCS address, the config,
Ray's processes in the order to stop them, the private directory to remove, and ``watch``, the
pids whose exit means Ray is gone.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

LOCAL_SERVE = "deployments.local_serve"
# How often to look whether Ray's processes are still there; a signal ends the wait at once.
POLL_S = 1.0


def encode_state(state: dict[str, Any]) -> str:
    return json.dumps(state, separators=(",", ":"), sort_keys=True)


def exited(pid: int) -> bool:
    """Whether ``pid`` (a child of this process) has exited; reaps it when it has."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not (or no longer) our child: ask the kernel whether it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return done == pid


class _Signalled(Exception):  # not an error: how a signal ends the wait
    pass


def supervise(state: dict[str, Any], poll_s: float = POLL_S) -> str:
    """Wait for a stop signal or for Ray to go away; returns why (``SIGINT``, ``SIGTERM``, ``ray``)."""

    def on_signal(signum: int, _frame: Any) -> None:
        # Raised out of the sleep below (Python resumes a sleep a handler returned from).
        raise _Signalled(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    watched = [int(pid) for pid in state.get("watch", [])]
    try:
        while not any(exited(pid) for pid in watched):
            time.sleep(poll_s)
    except _Signalled as signalled:
        return str(signalled)
    finally:
        # A second signal while the stop runs must not interrupt it half-way.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return "ray"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m deployments.local_supervisor STATE_JSON", file=sys.stderr)
        return 2
    state = json.loads(args[0])
    reason = supervise(state)
    if reason == "ray":
        print("Ray's GCS or raylet has exited; stopping sealserve", file=sys.stderr, flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    command = [sys.executable, "-m", LOCAL_SERVE, str(state["config"]), "--stop", encode_state(state),
               "--stop-reason", reason]
    os.execv(sys.executable, command)  # noqa: S606 - our own interpreter and module
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
