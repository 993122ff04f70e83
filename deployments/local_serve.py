"""``python -m deployments.local_serve CONFIG [--dashboard] [--metrics-port N]``: a lean ``serve run``.

``sealserve serve`` runs this instead of the ``serve run`` command so that the local Ray it starts
leaves out the dashboard unless asked for: the dashboard's head and its module processes hold
about 1.2 GiB on an otherwise idle machine (measured with bench/request_path.py), more than any
model replica of the embedded defaults. Everything else is ``serve run`` itself, called
in-process after ``ray.init``: the config means exactly what it means to ``serve deploy``, and
Ctrl-C (SIGINT) shuts Serve and the local Ray down as ``serve run`` does.

With ``RAY_ADDRESS`` set, it attaches to that cluster instead of starting one (as ``serve run``
does); without it, it always starts a new local Ray, never one it happens to find.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import ray
from ray.serve.scripts import cli

# The namespace serve run uses for the applications it deploys (ray.serve._private.constants).
SERVE_NAMESPACE = "serve"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.local_serve", description=__doc__)
    parser.add_argument("config", help="a Serve config file, as for serve run / serve deploy")
    parser.add_argument("--dashboard", action="store_true", help="start Ray's dashboard too")
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="Prometheus port of the metrics agent"
    )
    args = parser.parse_args(argv)
    # serve run stops Serve on KeyboardInterrupt; a shell that started us in the background left
    # SIGINT ignored, and SIGTERM (a process manager's stop) deserves the same graceful path.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: signal.default_int_handler(_signum, _frame))
    address = os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        namespace=SERVE_NAMESPACE,
        include_dashboard=args.dashboard if address == "local" else None,
        # Ray's metrics agent runs on every node, dashboard or not; a fixed port makes it
        # scrapeable (Ray's own option; a cluster's nodes take --metrics-export-port).
        _metrics_export_port=args.metrics_port if address == "local" else None,
    )
    try:
        cli.main(["run", args.config], prog_name="serve", standalone_mode=False)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
