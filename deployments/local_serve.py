"""``python -m deployments.local_serve CONFIG``: Ray Serve's ``serve run`` on a lean local Ray.

``sealserve serve`` becomes this process (it ``exec``s it, so the service is one driver process,
not a CLI waiting on a driver) instead of running the ``serve run`` command, so that the local Ray
it starts leaves out what an embedded single-node service does not use. Measured with
bench/request_path.py (RSS on the 2-core development machine):

- the dashboard's head and its module processes, ~1.2 GiB (``--dashboard`` starts them);
- the autoscaler's monitor, ~85 MiB (it scales Ray nodes, and a local Ray has no node to add);
- the log monitor, ~80 MiB (it streams every worker's log to this console; ``--logs`` starts it,
  and without it the logs are in the files under the Ray session's ``logs/`` directory).

Everything else is ``serve run`` itself, called in-process: the config means exactly what it means
to ``serve deploy``, and Ctrl-C (SIGINT) or SIGTERM shuts Serve and the local Ray down as
``serve run`` does. The Ray processes share this process's fate (they exit when it dies).

With ``RAY_ADDRESS`` set (other than ``local``), it attaches to that cluster instead of starting
one (as ``serve run`` does); without it, it always starts a new local Ray, never one it happens to
find.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import ray
from ray.serve.scripts import cli

from lib.cli.serve import announce_when_ready, stop_processes_naming

# The namespace serve run uses for the applications it deploys (ray.serve._private.constants).
SERVE_NAMESPACE = "serve"


def start_local_ray(*, dashboard: bool, logs: bool) -> Any:
    """A head node started as ``ray.init`` starts one, without the processes the flags leave out.

    ``ray.init`` has no switch for the autoscaler's monitor or the log monitor (``ray start`` has:
    ``--no-monitor``, ``--include-log-monitor``), so the node is built from the same parameters
    ``ray.init`` uses; the caller connects with ``ray.init(address=node.address)``.
    """
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    # include_log_monitor is annotated str | None in Ray, read as a truth value.
    log_monitor: Any = logs or dashboard
    params = RayParams(include_dashboard=dashboard, no_monitor=not dashboard, include_log_monitor=log_monitor)
    return Node(params, head=True, shutdown_at_exit=False, spawn_reaper=True, ray_init_cluster=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.local_serve", description=__doc__)
    parser.add_argument("config", type=Path, help="a Serve config file, as for serve run / serve deploy")
    parser.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too")
    parser.add_argument("--logs", action="store_true", help="stream every replica's log to this console")
    parser.add_argument("--url", help="print the ready banner for the service at this URL")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--remove-on-exit", type=Path, help="a private directory to remove on exit")
    args = parser.parse_args(argv)
    node = None
    try:
        address = os.environ.get("RAY_ADDRESS", "local")
        if address == "local":
            try:
                node = start_local_ray(dashboard=args.dashboard, logs=args.logs)
                address = node.address
            except (ImportError, AttributeError, TypeError) as exc:  # another Ray's private API
                print(f"note: starting a plain local Ray ({type(exc).__name__}: {exc})", file=sys.stderr)
        ray.init(address=address, namespace=SERVE_NAMESPACE, log_to_driver=args.logs or args.dashboard,
                 **({"include_dashboard": args.dashboard} if node is None and address == "local" else {}))
        # serve run stops Serve on KeyboardInterrupt; a shell that started us in the background
        # left SIGINT ignored, and SIGTERM (a process manager's stop) deserves the same graceful
        # path. Installed after ray.init, whose core worker replaces the SIGTERM handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda _signum, _frame: signal.default_int_handler(_signum, _frame))
        if args.url:
            threading.Thread(
                target=announce_when_ready, args=(args.url, args.config, args.ready_timeout), daemon=True
            ).start()
        cli.main(["run", str(args.config)], prog_name="serve", standalone_mode=False)
    except KeyboardInterrupt:
        return 130
    finally:
        ray.shutdown()
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=True)
        if args.remove_on_exit is not None:
            # HAProxy, which Ray starts with its files in this directory, outlives the Ray actor
            # that started it: no process may keep the port after a stop.
            stop_processes_naming(args.remove_on_exit)
            shutil.rmtree(args.remove_on_exit, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
