"""Pytest fixtures for a real Dask cluster: a ``dask scheduler`` and ``dask worker`` processes.

``tests/conftest.py`` does ``from dask_fixtures import *``. The processes listen on 127.0.0.1
only, on free ports, without dashboards. Workers run without a nanny, so ``kill_worker`` kills
the very process executing tasks, as a crashed machine would; they get ``tarproc`` on their
``PYTHONPATH`` but not the tests directory (test functions must travel by value), and
different ``PYTHONHASHSEED`` values (1, 2, ...) so code relying on ``hash()`` shows it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

__all__ = ["DaskProcesses", "dask_cluster", "dask_scheduler_address"]

REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask_command():
    """The venv's ``dask`` CLI (``dask scheduler`` / ``dask worker``)."""
    exe = Path(sys.executable).with_name("dask")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("dask")
    if found:
        return [found]
    return [sys.executable, "-m", "distributed.cli.dask_spec"]  # pragma: no cover


class DaskProcesses:
    """A running scheduler and its workers; ``address`` is the scheduler's ``tcp://`` address.

    ``workers`` lists the worker ``Popen`` objects (None once killed); ``kill_worker(i)``
    SIGKILLs one; ``start_worker(env=...)`` starts one more and waits until it is connected.
    """

    def __init__(self, n_workers=2, memory_limit="2GB"):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.memory_limit = memory_limit
        self.workdir = tempfile.mkdtemp(prefix="tarproc-dask-")
        self.workers: list = []
        self._seed = 0
        self._client = None
        self._logs = []
        env = self._env()
        self.scheduler = subprocess.Popen(
            _dask_command() + ["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                               "--dashboard-address", "127.0.0.1:0"],
            cwd=self.workdir, env=env, stdout=subprocess.DEVNULL,
            stderr=self._log("scheduler"))
        try:
            for _ in range(n_workers):
                self.start_worker()
        except BaseException:
            self.close()
            raise

    def _env(self, extra=None):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO)  # tarproc importable; tests/ deliberately not
        env["DASK_DISTRIBUTED__WORKER__DAEMON"] = "False"
        env.setdefault("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", "30s")
        env.update(extra or {})
        return env

    def _log(self, name):
        f = open(os.path.join(self.workdir, f"{name}.log"), "wb")
        self._logs.append(f)
        return f

    @property
    def client(self):
        """A client of the fixture's own, for waiting on workers (tests should make theirs)."""
        if self._client is None:
            from distributed import Client

            self._client = Client(self.address, timeout="30s", set_as_default=False)
        return self._client

    def n_workers(self) -> int:
        """Workers the scheduler currently knows."""
        return len(self.client.nthreads())

    def wait_for_workers(self, n, timeout=60.0):
        """Block until the scheduler has exactly ``n`` workers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.n_workers() == n:
                return
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"dask scheduler exited: {self.scheduler.returncode}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.n_workers()} workers connected, expected {n}")

    def start_worker(self, env=None, nthreads=1, wait=True):
        """Start one more worker (``PYTHONHASHSEED`` 1, 2, ... unless ``env`` sets it)."""
        expected = len(self.live_workers()) + 1
        self._seed += 1
        extra = {"PYTHONHASHSEED": str(self._seed)}
        extra.update(env or {})
        index = len(self.workers)
        proc = subprocess.Popen(
            _dask_command() + ["worker", self.address, "--host", "127.0.0.1",
                               "--nthreads", str(nthreads), "--nworkers", "1", "--no-nanny",
                               "--no-dashboard", "--memory-limit", str(self.memory_limit),
                               "--name", f"w{index}",
                               "--local-directory", os.path.join(self.workdir, f"w{index}")],
            cwd=self.workdir, env=self._env(extra), stdout=subprocess.DEVNULL,
            stderr=self._log(f"worker-{index}"))
        self.workers.append(proc)
        if wait:
            self.wait_for_workers(expected)
        return index

    def live_workers(self):
        """Indexes of workers whose process is still running."""
        return [i for i, p in enumerate(self.workers) if p is not None and p.poll() is None]

    def kill_worker(self, i=None):
        """SIGKILL worker ``i`` (default: the first live one); return its index."""
        if i is None:
            i = self.live_workers()[0]
        proc = self.workers[i]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.workers[i] = None
        return i

    def restore(self, n=2, timeout=60.0):
        """Make sure ``n`` workers are running and connected (after a test killed some)."""
        while len(self.live_workers()) < n:
            self.start_worker(wait=False)
        self.wait_for_workers(len(self.live_workers()), timeout)

    def close(self):
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass
            self._client = None
        for proc in [p for p in self.workers if p is not None] + [self.scheduler]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [p for p in self.workers if p is not None] + [self.scheduler]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._logs:
            f.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def dask_cluster():
    """A real ``dask scheduler`` with two single-thread ``dask worker`` processes (session)."""
    procs = DaskProcesses(n_workers=2)
    try:
        yield procs
    finally:
        procs.close()


@pytest.fixture
def dask_scheduler_address(dask_cluster):
    """The scheduler address, with two workers running again if an earlier test killed some."""
    dask_cluster.restore(2)
    return dask_cluster.address
