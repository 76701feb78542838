"""Where a job's work runs: a local Dask cluster, a running scheduler, or a caller's client.

Every job takes one ``cluster=`` argument with the same meaning everywhere:

- ``None``: start a local cluster (one worker process per core, or ``workers``) for the job
  and shut it down when the job ends;
- an address string (``"localhost:8786"``, ``"tcp://host:8786"``): connect to a running
  ``dask scheduler``; only the connection is closed at the end;
- a ``distributed.Client``: used as is and never closed (it belongs to the caller);
- a :class:`Cluster`: one connection held open across several jobs.

Example, one local cluster for two jobs::

    from tarproc.jobs.cluster import Cluster
    from tarproc.jobs.driver import run_items

    with Cluster(workers=4) as c:
        run_items(str.upper, ["a", "b"], cluster=c)
        run_items(len, ["xyz"], cluster=c)

Workers must be able to import ``tarproc`` (same version as the driver): the driver's
per-item wrapper lives in this package. A local cluster inherits the driver's ``sys.path``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from tarproc.errors import TarprocError

__all__ = ["Cluster", "ClusterError", "connect", "prestart_local", "total_threads"]


class ClusterError(TarprocError):
    """Starting or connecting to a Dask cluster failed."""


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _dashboard_available() -> bool:
    """The dashboard needs bokeh; without it asking for one only produces warnings."""
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


_NOISY_LOGGERS = ("distributed", "distributed.scheduler", "distributed.worker", "distributed.nanny",
                  "distributed.core", "distributed.comm", "distributed.batched",
                  "distributed.client", "distributed.http.proxy", "tornado.application")


def _quiet_logs(level=logging.ERROR):
    """Silence distributed's chatty INFO/WARNING lines; return the previous levels to restore."""
    previous = {}
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        previous[name] = logger.level
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)
    return previous


def _restore_logs(previous):
    for name, level in previous.items():
        logging.getLogger(name).setLevel(level)


def _announce(client, how: str, quiet: bool, dashboard=True) -> None:
    if quiet:
        return
    prog = os.path.basename(sys.argv[0] or "") if sys.argv else ""
    prog = prog[:-3] if prog.endswith(".py") else prog  # python -m tarproc.cli.htsort
    prog = prog if prog.startswith(("ht", "tar")) else "tarproc"  # the command the user typed
    threads = total_threads(client)
    msg = f"{prog}: {how} ({threads} worker thread{'' if threads == 1 else 's'})"
    link = _dashboard_link(client) if dashboard else None
    if link:
        msg += f"; dashboard: {link}"
    else:
        msg += "; no dashboard" + ("" if dashboard else " (bokeh is not installed)")
    print(msg, file=sys.stderr, flush=True)


def _dashboard_link(client):
    """The dashboard URL if the scheduler really serves one (the link is formatted regardless)."""
    try:
        services = client.scheduler_info(n_workers=0).get("services", {})
        if "dashboard" not in services:
            return None
        return client.dashboard_link
    except Exception:  # noqa: BLE001 - a missing dashboard is not an error
        return None


def total_threads(client) -> int:
    """Number of worker threads currently connected to the client's scheduler."""
    try:
        return int(sum(client.nthreads().values()))
    except Exception:  # noqa: BLE001 - a scheduler hiccup must not fail the caller
        return 0


def prestart_local() -> bool:
    """Start the process the next local cluster's workers are forked from, if none is waiting.

    The commands call this before they import Dask, so that its imports (~0.4 s of distributed
    and tarproc) run on another core while the driver does its own (see ``localcluster``).
    Returns False if it could not be started (the cluster then starts it itself, a little later).
    """
    from .localcluster import prestart

    return prestart()


def _start_local(workers, threads_per_worker, dashboard=True):
    """A local cluster of worker processes (``localcluster.ForkedCluster``).

    The dashboard costs ~0.5 s, so it starts only when someone may look at it.
    """
    from .localcluster import ForkedCluster

    n = int(workers) if workers else _cpu_count()
    if n < 1:
        raise ClusterError(f"cannot start a local cluster with {n} workers")
    threads = int(threads_per_worker or 1)
    if dashboard:
        try:  # a free port: never squat on (or clash with) the usual 8787
            return ForkedCluster(n, threads, dashboard_address="127.0.0.1:0")
        except ClusterError:
            raise
        except Exception:  # noqa: BLE001 - fall back to no dashboard
            pass
    return ForkedCluster(n, threads, dashboard_address=None)


@contextlib.contextmanager
def connect(cluster=None, workers=None, threads_per_worker=1, quiet=False):
    """Yield a ``distributed.Client`` for ``cluster`` and release only what was made here.

    ``cluster`` is ``None`` (a local cluster of ``workers`` processes with
    ``threads_per_worker`` threads each, shut down at exit), an address string (connect; close
    the connection at exit), a ``distributed.Client`` (used as is, never closed), a
    :class:`Cluster` (its client, never closed), or a ``distributed`` cluster object such as a
    ``LocalCluster`` (a client is connected to it and closed at exit; the cluster is left
    running). Unless ``quiet``, one line on stderr says where the work runs and gives the
    dashboard link.

    >>> with connect(None, workers=2) as client:          # doctest: +SKIP
    ...     client.submit(sum, [1, 2]).result()
    3
    """
    from distributed import Client

    if isinstance(cluster, Cluster):
        if cluster.client is None:
            raise ClusterError("the Cluster is not open: use it as 'with Cluster(...) as c:'")
        yield cluster.client
        return
    if isinstance(cluster, Client):
        yield cluster
        return

    if cluster is None:
        previous = _quiet_logs()
        try:
            try:
                local = _start_local(workers, threads_per_worker, dashboard=not quiet)
            except ClusterError:
                raise
            except Exception as exc:  # noqa: BLE001
                hint = ""
                main = sys.modules.get("__main__")
                if getattr(main, "__file__", None) and "tarproc" not in os.path.basename(main.__file__):
                    hint = (f" (worker processes re-import {os.path.basename(main.__file__)}: in a script, "
                            "start jobs under `if __name__ == \"__main__\":`)")
                raise ClusterError(f"cannot start a local Dask cluster: "
                                   f"{type(exc).__name__}: {exc}{hint}") from exc
            try:
                client = Client(local, set_as_default=False)
            except BaseException:
                local.close()
                raise
            grace = 5.0
            try:
                _announce(client, f"local cluster with {local.n_workers} worker"
                                  f"{'' if local.n_workers == 1 else 's'}", quiet,
                          dashboard=_dashboard_available())
                yield client
            except BaseException as exc:
                if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM, exit: busy workers are
                    grace = 0.5                     # not waited for (their tasks are not wanted)
                raise
            finally:
                _quiet_logs(logging.CRITICAL)  # shutdown races log "stream closed" noise
                try:
                    client.close()
                finally:
                    local.close(grace=grace)
        finally:
            _restore_logs(previous)
        return

    if isinstance(cluster, str):
        address = cluster.strip()
        if not address:
            raise ClusterError("empty scheduler address")
        try:
            client = Client(address, set_as_default=False, timeout="20s")
        except Exception as exc:  # noqa: BLE001
            raise ClusterError(f"cannot connect to Dask scheduler {address}: "
                               f"{type(exc).__name__}: {exc}") from exc
        try:
            _announce(client, f"connected to {client.scheduler.address}", quiet)
            yield client
        finally:
            client.close()
        return

    if hasattr(cluster, "scheduler_address"):  # a distributed cluster object
        client = Client(cluster, set_as_default=False)
        try:
            _announce(client, f"connected to {cluster.scheduler_address}", quiet)
            yield client
        finally:
            client.close()
        return

    raise ClusterError(f"cluster must be None, an address, a distributed.Client or a Cluster, "
                       f"not {type(cluster).__name__}")


class Cluster:
    """Hold one Dask connection open across several jobs (a "distributed handler").

    ``Cluster(None)`` starts a local cluster, ``Cluster("tcp://host:8786")`` connects to a
    running scheduler, ``Cluster(client)`` wraps a caller's client; on exit only what was
    started or connected here is closed. Anything accepting ``cluster=`` accepts a Cluster.

    >>> with Cluster(workers=2) as c:                      # doctest: +SKIP
    ...     r1 = run_items(work, items, cluster=c)
    ...     r2 = run_items(more_work, r1_outputs, cluster=c)
    """

    def __init__(self, cluster=None, workers=None, threads_per_worker=1, quiet=False):
        self._spec = cluster
        self._workers = workers
        self._threads_per_worker = threads_per_worker
        self._quiet = quiet
        self._stack = None
        self.client = None

    def __enter__(self) -> "Cluster":
        if self.client is not None:
            raise ClusterError("Cluster is already open")
        stack = contextlib.ExitStack()
        try:
            self.client = stack.enter_context(
                connect(self._spec, workers=self._workers,
                        threads_per_worker=self._threads_per_worker, quiet=self._quiet))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def close(self) -> None:
        """Release what this Cluster started or connected (a caller's client stays open)."""
        stack, self._stack, self.client = self._stack, None, None
        if stack is not None:
            stack.close()

    @property
    def address(self):
        """The scheduler address, or None when not open."""
        return None if self.client is None else self.client.scheduler.address

    @property
    def dashboard_link(self):
        """The dashboard URL, or None."""
        return None if self.client is None else _dashboard_link(self.client)

    def __repr__(self):
        state = self.address or "closed"
        return f"<tarproc Cluster {state}>"
