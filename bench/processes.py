"""The processes of the request-path bench: start in their own session, watch, measure, stop.

Every server is started with ``start_new_session=True``, so its pid is also its session id and
its process group id. Ray gives each worker its own process group but keeps it in the session,
so "ours" is: the session's members, the descendants of the root pid, and any process titled
``ray::*``, ``raylet``, ``gcs_server`` or ``haproxy`` started after the bench began whose
``RAY_RAYLET_PID`` is one of our raylets (a reparented worker). Nothing is ever found or
signalled by name alone: other work on the machine may run its own Ray.

psutil is Ray's dependency; Ray also ships a copy in ``ray/thirdparty_files``, used when the
virtual environment has no psutil of its own.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import yaml

from bench.measures import count_replicas, process_label
from lib.cli.serve import BUILD_APP

RAY_NAMES = ("raylet", "gcs_server", "haproxy")


def import_psutil() -> ModuleType:
    try:
        return importlib.import_module("psutil")
    except ImportError:
        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise
        sys.path.append(str(Path(next(iter(spec.submodule_search_locations))) / "thirdparty_files"))
        return importlib.import_module("psutil")


psutil = import_psutil()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One server process in its own session, its output in ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, *, cwd: Path,
                 env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.pid = self.process.pid
        self.seen: dict[int, float] = {}  # pid -> create_time of every process ever seen as ours

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def members(self, since: float | None = None) -> list[Any]:
        """Our live processes (see the module docstring); remembers each one for :meth:`leftovers`."""
        found: dict[int, Any] = {}
        late: list[Any] = []
        for proc in psutil.process_iter(["pid", "name", "create_time"]):
            try:
                if _session_of(proc.pid) == self.pid:
                    found[proc.pid] = proc
                elif since is not None and proc.info["create_time"] >= since and _ray_named(proc):
                    late.append(proc)
            except (psutil.Error, OSError):
                continue
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.pid)
            found.setdefault(root.pid, root)
            for child in root.children(recursive=True):
                found.setdefault(child.pid, child)
        raylets = {p.pid for p in found.values() if _safe(p.name) == "raylet"}
        for proc in late:
            with contextlib.suppress(psutil.Error):
                if int(proc.environ().get("RAY_RAYLET_PID", "-1")) in raylets:
                    found.setdefault(proc.pid, proc)
        for proc in found.values():
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault(proc.pid, proc.create_time())
        return list(found.values())

    def leftovers(self) -> list[int]:
        """Pids of processes ever seen as ours that are still running (same pid, same start)."""
        left = []
        for pid, created in list(self.seen.items()):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
        return sorted(left)

    def stop(self, interrupt_wait_s: float = 45.0, term_wait_s: float = 10.0) -> dict[str, Any]:
        """SIGINT to the process group, then SIGTERM and SIGKILL to what is left, each by pid."""
        self.members()  # remember everything alive now, so leftovers can be checked by pid
        steps = []
        for sig, wait_s in ((signal.SIGINT, interrupt_wait_s), (signal.SIGTERM, term_wait_s),
                            (signal.SIGKILL, 5.0)):
            left = self.leftovers()
            if not left:
                break
            steps.append(signal.Signals(sig).name)
            if sig == signal.SIGINT:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, sig)
            else:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)
            _wait_until(lambda: not self.leftovers(), wait_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self._log.close()
        return {"signals": steps, "processes_seen": len(self.seen), "left": self.leftovers(),
                "exit_code": self.process.poll()}


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _safe(getter: Callable[[], str]) -> str:
    try:
        return getter()
    except psutil.Error:
        return ""


def _ray_named(proc: Any) -> bool:
    name = proc.info.get("name") or ""
    return name.startswith("ray::") or name in RAY_NAMES


def _wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


def write_serve_config(path: Path, args: dict[str, Any]) -> Path:
    """A Serve config of sealserve alone, as ``serve_config.yaml`` has it, with these app args
    (``sealserve serve --port`` chooses the port). Returns ``path``."""
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {"name": "sealserve", "route_prefix": "/", "import_path": BUILD_APP, "args": args},
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def interrupt(process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """SIGINT, as Ctrl-C (``sealserve serve`` then stops Serve and its local Ray), and wait; after
    ``timeout_s``, SIGKILL to its process group (it was started in a session of its own)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def cpu_seconds(processes: Sequence[Any]) -> float:
    """User + system CPU time the processes have used so far (those that have exited count 0)."""
    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def wait_quiet(server: Server, since: float, *, cores: float = 0.25, window_s: float = 2.0,
               timeout_s: float = 90.0) -> float:
    """Wait (at most ``timeout_s``) until ``server``'s processes together use under ``cores`` CPU
    over ``window_s``: what a load left behind (a replica stopping, a usage backlog being
    written) is done. Returns the cores they used over the last window. An idle sealserve uses
    ~0.1 core on the 2-core development machine (Ray's controller loop and health checks)."""
    deadline = time.monotonic() + timeout_s
    used = float("inf")
    while time.monotonic() < deadline:
        procs = server.members(since)
        before = cpu_seconds(procs)
        time.sleep(window_s)
        used = (cpu_seconds(procs) - before) / window_s
        if used < cores:
            break
    return used


def describe(processes: Sequence[Any]) -> list[dict[str, Any]]:
    """pid, label, RSS and (when readable) PSS of each live process."""
    rows = []
    for proc in processes:
        try:
            with proc.oneshot():
                rss = proc.memory_info().rss
                row = {"pid": proc.pid, "label": process_label(proc.name(), proc.cmdline()), "rss": rss}
            try:
                row["pss"] = proc.memory_full_info().pss
            except (psutil.Error, AttributeError):
                row["pss"] = None
            rows.append(row)
        except psutil.Error:
            continue
    return rows


def titles(processes: Sequence[Any]) -> list[str]:
    """Each process's title (``argv[0]``, which Ray sets for workers), ``""`` if it is gone."""
    out = []
    for proc in processes:
        try:
            cmdline = proc.cmdline()
            out.append(cmdline[0] if cmdline else proc.name())
        except psutil.Error:
            out.append("")
    return out


class Sampler(threading.Thread):
    """Once a second: replicas per deployment of ``app`` and the total RSS of ``server``'s processes."""

    def __init__(self, server: Server, app: str, since: float, clock_origin: float,
                 interval_s: float = 1.0) -> None:
        super().__init__(name="replica-sampler", daemon=True)
        self._server, self._app, self._since = server, app, since
        self._origin, self._interval_s = clock_origin, interval_s
        self._stop_event = threading.Event()
        self._paused = threading.Event()
        self.samples: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.perf_counter()
            if self._paused.is_set():
                self._stop_event.wait(self._interval_s)
                continue
            with contextlib.suppress(psutil.Error, OSError):
                procs = self._server.members(self._since)
                rss = 0
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        rss += proc.memory_info().rss
                self.samples.append({
                    "t": round(started - self._origin, 2),
                    "replicas": count_replicas(titles(procs), self._app),
                    "processes": len(procs),
                    "rss_mib": round(rss / 2**20, 1),
                })
            self._stop_event.wait(max(0.0, self._interval_s - (time.perf_counter() - started)))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No samples meanwhile: a sample reads every process's /proc entries, CPU time that
        would land inside what is being timed."""
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
