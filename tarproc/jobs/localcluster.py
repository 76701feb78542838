"""The local default cluster: Dask workers forked from one process that has imported them already.

``cluster=None`` runs a job on this machine. Dask's own ``LocalCluster`` keeps a nanny per worker
and, to start workers fast, a fork server holding its own copy of the imports; on two workers that
is ~75 MB of the job's summed RSS spent on processes that do no work (and ~0.4 s more when the
workers are spawned instead). Here one *seed* process is started as early as possible (the commands
start it before they import Dask, so its imports run on the other core): it imports distributed and
tarproc's task code, waits for the scheduler's address on its stdin, forks the other workers and
becomes the first one itself. Nothing else stays alive: the scheduler runs in the driver, as in
``LocalCluster``.

What the nanny did is done here: a worker that dies while the cluster is open is replaced (by a
freshly started process, up to a limit), workers get the nanny's pre-spawn environment
(``MALLOC_TRIM_THRESHOLD_``, one BLAS thread, a fixed ``PYTHONHASHSEED``) unless it is set already,
the driver's ``sys.path``, working directory and Dask config, and every worker exits when the
driver goes away, even by SIGKILL (its stdin pipe closes). Workers run in a session of their own,
so a Ctrl-C at the terminal reaches only the driver, which shuts them down in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import subprocess
import sys
import time

from tarproc.runner.sampledir import group_members as _group_members, pid_alive as _alive

__all__ = ["ForkedCluster", "prestart"]

#: Imported by the seed process before it forks, so every worker starts with them loaded: Dask's
#: worker and tarproc's task code (numpy and pandas are left to the tasks that use them).
PRELOAD = ("distributed", "tarproc.jobs.driver", "tarproc.jobs.shardmap", "tarproc.jobs.twophase",
           "tarproc.jobs.upload_job")

#: Environment a Dask nanny gives its worker before it starts (distributed's
#: ``distributed.nanny.pre-spawn-environ``, and the nanny's fixed hash seed); values the user set
#: win.
PRE_SPAWN_ENV = {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "OPENBLAS_NUM_THREADS": "1", "PYTHONHASHSEED": "6640"}

_BOOT = ("import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
         "from tarproc.jobs.localcluster import _seed_main; _seed_main()")

_waiting = None  # a seed process started ahead of time by prestart(), not yet given orders


def _start_seed():
    import json

    env = dict(os.environ)
    for name, value in PRE_SPAWN_ENV.items():
        env.setdefault(name, value)
    if env.get("PYTHONHASHSEED") == "0":  # "0" means random per process: not stable across workers
        env["PYTHONHASHSEED"] = PRE_SPAWN_ENV["PYTHONHASHSEED"]
    return subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(sys.path)], stdin=subprocess.PIPE,
                            env=env, start_new_session=True, close_fds=True)


def prestart() -> bool:
    """Start the seed process of the next local cluster now, so its imports overlap the caller's.

    Returns False if it could not be started (the cluster then starts one itself).
    """
    global _waiting
    if _waiting is not None and _waiting.poll() is None:
        return True
    try:
        _waiting = _start_seed()
    except OSError:
        _waiting = None
        return False
    return True


def _take_seed():
    global _waiting
    seed, _waiting = _waiting, None
    if seed is not None and seed.poll() is None:
        return seed
    return _start_seed()


def _make_cluster_class():
    """ForkedCluster is a LocalCluster (so code that asks "is this local?" still knows)."""
    from distributed import LocalCluster
    from distributed.diagnostics.plugin import SchedulerPlugin

    class _Replacer(SchedulerPlugin):
        """Starts a new worker process when one dies while the cluster is open."""

        name = "tarproc-replace-workers"

        def __init__(self, cluster):
            self.cluster = cluster

        def remove_worker(self, scheduler, worker, **kwargs):
            self.cluster._worker_gone(worker)

    class ForkedCluster(LocalCluster):
        """A LocalCluster whose scheduler runs here and whose workers are forked from a seed process.

        ``ForkedCluster(n, threads_per_worker=1, dashboard_address=None)``; the workers are up
        when the constructor returns (or a ClusterError says why not).
        """

        def __init__(self, n_workers, threads_per_worker=1, dashboard_address=None, timeout=60.0):
            super().__init__(n_workers=0, processes=True, threads_per_worker=threads_per_worker,
                             dashboard_address=dashboard_address, silence_logs=logging.ERROR)
            self._n = int(n_workers)
            self._nthreads = int(threads_per_worker)
            self._procs = []  # seed processes started here (the forked workers are their children)
            self._pids = set()  # every worker process ever seen
            self._closing = False
            self._replaced = 0
            self._max_replacements = 10 * self._n
            try:
                self.scheduler.add_plugin(_Replacer(self))
                self._launch(self._n, seed=_take_seed())
                self._wait_for_workers(timeout)
            except BaseException:
                self.close()
                raise

        @property
        def n_workers(self) -> int:
            return self._n

        def _orders(self, count, first_name):
            import dask

            return pickle.dumps({
                "address": self.scheduler_address, "n": count, "first_name": first_name,
                "nthreads": self._nthreads, "path": list(sys.path), "cwd": os.getcwd(),
                "config": dask.config.config,
            })

        def _launch(self, count, seed=None, first_name=0):
            seed = seed or _start_seed()
            self._procs.append(seed)
            try:
                seed.stdin.write(self._orders(count, first_name))
                seed.stdin.flush()  # the pipe stays open: its end tells the workers to go
            except OSError as exc:
                from .cluster import ClusterError

                raise ClusterError(f"cannot start local Dask workers: {exc}") from exc

        def _wait_for_workers(self, timeout):
            from .cluster import ClusterError

            deadline = time.monotonic() + timeout
            while len(self.scheduler.workers) < self._n:
                dead = [p for p in self._procs if p.poll() is not None]
                if dead:
                    raise ClusterError(f"local Dask worker process exited with status "
                                       f"{dead[0].returncode} while starting")
                if time.monotonic() > deadline:
                    raise ClusterError(f"local Dask workers did not start within {timeout:.0f} s")
                time.sleep(0.01)
            self._pids.update(ws.pid for ws in self.scheduler.workers.values())

        def _worker_gone(self, address):
            if self._closing or self.scheduler.status.name in ("closing", "closed"):
                return
            if self._replaced >= self._max_replacements:
                return  # something kills every worker: let the job's retries report it
            self._replaced += 1
            self._launch(1, first_name=self._n + self._replaced - 1)

        def close(self, timeout=None, grace=5.0):
            """Close the cluster; workers still running a task after ``grace`` seconds are
            killed (an interrupted job passes a short one: its tasks' outputs are not wanted)."""
            self._closing = True
            try:
                return super().close(timeout=timeout)
            finally:
                self._stop_processes(grace)

        def _stop_processes(self, grace=5.0):
            """Close the workers' stdin pipes and wait for every worker process to end."""
            for proc in self._procs:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            try:
                self._pids.update(ws.pid for ws in self.scheduler.workers.values())
            except Exception:  # noqa: BLE001 - the scheduler may be gone already
                pass
            deadline = time.monotonic() + grace
            pending = set(self._pids) | {p.pid for p in self._procs}
            while pending and time.monotonic() < deadline:
                for proc in self._procs:
                    proc.poll()  # reap our children as they end
                pending = {pid for pid in pending if _alive(pid)}
                if pending:
                    time.sleep(0.02)
            if pending:  # seeds run in sessions of their own: their groups hold every worker
                for proc in self._procs:
                    with contextlib.suppress(OSError):
                        os.killpg(proc.pid, signal.SIGKILL)
                for pid in pending:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            for proc in self._procs:
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed above
                    pass
            # a SIGKILL takes effect a moment later: when this returns, every worker is gone (so
            # what they left, such as sample dirs, can be told from what live processes use)
            # (workers the driver never heard of are in their seed's process group too)
            pending |= _group_members({p.pid for p in self._procs})
            deadline = time.monotonic() + grace
            while pending and time.monotonic() < deadline:
                pending = {pid for pid in pending if _alive(pid)}
                if pending:
                    time.sleep(0.01)
            self._procs = []

    return ForkedCluster


_cluster_class = None


def ForkedCluster(*args, **kwargs):  # noqa: N802 - a class, made on first use (imports Dask)
    """Start a local cluster: see the module docstring and ``_make_cluster_class``."""
    global _cluster_class
    if _cluster_class is None:
        _cluster_class = _make_cluster_class()
    return _cluster_class(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# the seed process


def _seed_main():
    """Import the worker code, wait for orders on stdin, fork the other workers, be the first."""
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops us; not the terminal
    for name in PRELOAD:
        importlib.import_module(name)
    try:
        orders = pickle.load(sys.stdin.buffer)
    except (EOFError, pickle.UnpicklingError):
        return  # the driver went away (or changed its mind) before starting the cluster
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.path[:] = orders["path"]
    try:
        os.chdir(orders["cwd"])
    except OSError:
        pass
    import dask

    dask.config.update(dask.config.config, orders["config"], priority="new")
    index = 0
    for i in range(1, orders["n"]):
        if os.fork() == 0:
            index = i
            break
    try:
        _serve(orders, orders["first_name"] + index)
    finally:
        os._exit(0)


def _serve(orders, name):
    import asyncio

    from distributed import Worker

    from .cluster import _quiet_logs

    _quiet_logs()

    async def run():
        worker = Worker(orders["address"], nthreads=orders["nthreads"], name=name,
                        death_timeout=60, silence_logs=logging.ERROR)
        loop = asyncio.get_running_loop()

        def driver_gone():  # stdin at EOF: the driver closed the cluster or died
            loop.remove_reader(0)
            asyncio.ensure_future(worker.close(reason="the driver has gone"))

        loop.add_reader(0, driver_gone)
        await worker
        await worker.finished()

    asyncio.run(run())
