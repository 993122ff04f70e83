"""``python -m deployments.local_serve CONFIG [--metrics-port N]``: ``serve run`` on a lean local Ray.

``sealserve serve`` becomes this process (it ``exec``s it, so the service is one process to signal,
not a CLI waiting on a driver) instead of running the ``serve run`` command, so that the local Ray
it starts leaves out what an embedded single-node service does not use. Measured with
bench/request_path.py (RSS on the 2-core development machine):

- the dashboard's head and its module processes, ~1.2 GiB (``--dashboard`` starts them); even
  its minimal head, which ``ray.init`` starts without the dashboard, ~130 MiB;
- the autoscaler's monitor, ~85 MiB (it scales Ray nodes, and a local Ray has no node to add);
- the log monitor, ~80 MiB (it streams every worker's log to this console; ``--logs`` starts it,
  and without it the logs are in the files under the Ray session's ``logs/`` directory);
- the driver itself, ~180 MiB: once the application is deployed and ready, this process
  ``exec``s ``deployments/local_supervisor.py`` (same pid, standard library only, ~10 MiB), which
  ``exec``s ``local_serve --stop`` on a signal to shut Serve and Ray down. With ``--logs`` or
  ``--dashboard`` the driver stays, printing the replicas' logs as ``serve run`` does.

Everything else is ``serve run`` itself, called in-process: the config means exactly what it means
to ``serve deploy``, and Ctrl-C (SIGINT) or SIGTERM shuts Serve and the local Ray down as
``serve run`` does. The Ray processes share this process's fate (they exit when it dies).

With ``RAY_ADDRESS`` set (other than ``local``), it attaches to that cluster instead of starting
one (as ``serve run`` does), and stays its driver; without it, it always starts a new local Ray,
never one it happens to find.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.scripts import cli

from deployments.local_supervisor import encode_state, exited
from lib.cli.serve import announce_when_ready, stop_processes_naming

# The namespace serve run uses for the applications it deploys (ray.serve._private.constants).
SERVE_NAMESPACE = "serve"
SUPERVISOR = "deployments.local_supervisor"
# Seconds each of Ray's processes gets to exit on SIGTERM before SIGKILL (Ray's own stop waits
# for the raylet to stop its workers the same way).
STOP_GRACE_S = 10.0
KILL_WAIT_S = 5.0


def start_local_ray(*, dashboard: bool, logs: bool, metrics_port: int | None) -> Any:
    """A head node started as ``ray.init`` starts one, without the processes the flags leave out.

    ``ray.init`` has no switch for the autoscaler's monitor or the log monitor (``ray start`` has:
    ``--no-monitor``, ``--include-log-monitor``), so the node is built from the same parameters
    ``ray.init`` uses; the caller connects with ``ray.init(address=node.address)``. Without
    ``dashboard`` even the dashboard's minimal head (job and state APIs, which nothing here uses)
    is left out: Ray starts it whatever ``include_dashboard`` says.
    """
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    class LeanNode(Node):
        def start_api_server(self, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
            if include_dashboard:
                super().start_api_server(include_dashboard=True, raise_on_failure=raise_on_failure)

    # include_log_monitor is annotated str | None in Ray, read as a truth value.
    log_monitor: Any = logs or dashboard
    # Ray's metrics agent runs on every node, dashboard or not: a fixed port makes it scrapeable.
    params = RayParams(include_dashboard=dashboard, no_monitor=not dashboard, include_log_monitor=log_monitor,
                       metrics_export_port=metrics_port)
    return LeanNode(params, head=True, shutdown_at_exit=False, spawn_reaper=True, ray_init_cluster=True)


def node_processes(node: Any) -> list[int]:
    """The pids of the node's processes in the order Ray stops them: the raylet (which stops its
    workers), then the GCS, then the rest."""
    first = ["raylet", "gcs_server"]
    kinds = sorted(node.all_processes, key=lambda kind: first.index(kind) if kind in first else len(first))
    return [info.process.pid for kind in kinds for info in node.all_processes[kind]]


def stop_processes(pids: list[int], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM each pid in turn (waiting up to ``grace_s`` for it), then SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while not exited(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    left = [pid for pid in pids if not exited(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_S
    while left and time.monotonic() < deadline:  # reap them: no zombie outlives the stop
        left = [pid for pid in left if not exited(pid)]
        time.sleep(0.05)


def remove_private(directory: Path | None) -> None:
    if directory is not None:
        # HAProxy, which Ray starts with its files in this directory, outlives the Ray actor
        # that started it: no process may keep the port after a stop.
        stop_processes_naming(directory)
        shutil.rmtree(directory, ignore_errors=True)


def stop(state: dict[str, Any], reason: str) -> int:
    """``--stop``: what the supervisor runs on a signal, in its own process (same pid)."""
    print(f"stopping sealserve ({reason}) ...", flush=True)
    try:
        if reason != "ray":  # with the GCS or raylet gone there is nothing to drain (or to reach)
            ray.init(address=state["address"], namespace=SERVE_NAMESPACE, log_to_driver=False)
            serve.shutdown()  # drains the replicas, as serve run does on Ctrl-C
    except Exception as exc:  # Ray already gone: its processes are stopped below
        print(f"note: Serve could not be shut down gracefully ({type(exc).__name__}: {exc})",
              file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        stop_processes([int(pid) for pid in state["processes"]])
        remove_private(Path(state["remove_on_exit"]) if state.get("remove_on_exit") else None)
    return 1 if reason == "ray" else 0


def hand_over(node: Any, args: argparse.Namespace, address: str) -> None:
    """Disconnect and become the supervisor (``exec``, same pid; does not return)."""
    state = {
        "address": address,
        "config": str(args.config),
        "processes": node_processes(node),
        "watch": [info.process.pid for kind in ("gcs_server", "raylet")
                  for info in node.all_processes.get(kind, [])],
        "remove_on_exit": str(args.remove_on_exit) if args.remove_on_exit else None,
    }
    ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", SUPERVISOR, encode_state(state)])  # noqa: S606


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.local_serve", description=__doc__)
    parser.add_argument("config", type=Path, help="a Serve config file, as for serve run / serve deploy")
    parser.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too")
    parser.add_argument("--logs", action="store_true", help="stream every replica's log to this console")
    parser.add_argument("--url", help="print the ready banner for the service at this URL")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--remove-on-exit", type=Path, help="a private directory to remove on exit")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port of the metrics agent")
    parser.add_argument("--stop", help=argparse.SUPPRESS)  # the supervisor's state (JSON)
    parser.add_argument("--stop-reason", default="SIGTERM", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stop is not None:
        return stop(json.loads(args.stop), args.stop_reason)
    node = None
    try:
        address = os.environ.get("RAY_ADDRESS", "local")
        if address == "local":
            try:
                node = start_local_ray(
                    dashboard=args.dashboard, logs=args.logs, metrics_port=args.metrics_port
                )
                address = node.address
            except (ImportError, AttributeError, TypeError) as exc:  # another Ray's private API
                print(f"note: starting a plain local Ray ({type(exc).__name__}: {exc})", file=sys.stderr)
        streams_logs = args.logs or args.dashboard
        ray.init(address=address, namespace=SERVE_NAMESPACE, log_to_driver=streams_logs,
                 **({"include_dashboard": args.dashboard, "_metrics_export_port": args.metrics_port}
                    if node is None and address == "local" else {}))
        # serve run stops Serve on KeyboardInterrupt; a shell that started us in the background
        # left SIGINT ignored, and SIGTERM (a process manager's stop) deserves the same graceful
        # path. Installed after ray.init, whose core worker replaces the SIGTERM handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda _signum, _frame: signal.default_int_handler(_signum, _frame))
        metrics_url = f"http://127.0.0.1:{args.metrics_port}/metrics" if args.metrics_port else None
        if node is None or streams_logs:
            # A driver that stays: it prints the replicas' logs (--logs), or Ray is not ours to stop.
            if args.url:
                threading.Thread(
                    target=announce_when_ready, args=(args.url, args.config, args.ready_timeout, metrics_url),
                    daemon=True,
                ).start()
            cli.main(["run", str(args.config)], prog_name="serve", standalone_mode=False)
            return 0
        try:
            cli.main(["run", "--non-blocking", "--address", address, str(args.config)],
                     prog_name="serve", standalone_mode=False)
            if args.url:
                announce_when_ready(args.url, args.config, args.ready_timeout, metrics_url)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                serve.shutdown()
            raise
        hand_over(node, args, address)
    except KeyboardInterrupt:
        return 130
    finally:
        ray.shutdown()
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=True)
        remove_private(args.remove_on_exit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
