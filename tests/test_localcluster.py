"""The local default cluster (tarproc.jobs.localcluster): real worker processes, killed for real.

What the nanny-less design must still give: only the workers run beside the driver, a worker that
dies is replaced and the job loses nothing, the workers go when the cluster closes, when the driver
is interrupted and when it is SIGKILLed, and scripts need no ``__main__`` guard.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from tarproc.jobs.cluster import Cluster, total_threads
from tarproc.jobs.driver import run_items


def _descendants():
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait_gone(pids, timeout=15.0):
    deadline = time.time() + timeout
    alive = set(pids)
    while alive and time.time() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.05)
    return alive


def _sleepy(x):
    time.sleep(0.3)
    return {"x": x, "pid": os.getpid()}


def test_only_workers_beside_the_driver_and_all_gone_after():
    before = _descendants()
    with Cluster(workers=2, quiet=True) as c:
        pids = set(c.client.run(os.getpid).values())
        assert len(pids) == 2 and os.getpid() not in pids
        # no fork server, resource tracker or nanny: the tree is the driver and its two workers
        assert _descendants() - before == pids
        assert total_threads(c.client) == 2
    assert _wait_gone(pids, timeout=5) == set()
    assert _descendants() - before == set()


def test_killed_workers_are_replaced_and_no_item_is_lost():
    with Cluster(workers=2, quiet=True) as c:
        first = set(c.client.run(os.getpid).values())
        seen = []

        def on_result(record):
            seen.append(record["key"])
            if len(seen) == 2:  # both workers at once: the job can only go on with new ones
                for pid in first:
                    os.kill(pid, signal.SIGKILL)

        r = run_items(_sleepy, range(12), cluster=c, progress=False, on_result=on_result,
                      speculation=False)
        assert r.ok and r.done == 12 and not r.failed
        assert sorted(it["x"] for it in r.items) == list(range(12))
        assert sorted(seen) == sorted(str(x) for x in range(12))
        deadline = time.time() + 30
        while total_threads(c.client) < 2 and time.time() < deadline:
            time.sleep(0.1)
        now = set(c.client.run(os.getpid).values())
        assert len(now) == 2 and not now & first


def _run_driver(code, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, cwd=tmp_path,
                            start_new_session=True)


_HOLD_CLUSTER = """
    import os, sys, time
    from tarproc.jobs.cluster import Cluster

    # no `if __name__ == "__main__":` guard: local workers do not re-import this script
    with Cluster(workers=2, quiet=True) as c:
        pids = sorted(c.client.run(os.getpid).values())
        print(" ".join(map(str, pids)), flush=True)
        time.sleep(60)
"""


def test_workers_exit_when_the_driver_is_sigkilled(tmp_path):
    proc = _run_driver(_HOLD_CLUSTER, tmp_path)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_gone(pids) == set()
    finally:
        proc.kill()


def test_ctrl_c_reaches_the_driver_which_stops_the_workers(tmp_path):
    code = r"""
        import os, sys, time
        from tarproc.jobs.driver import run_items

        def slow(x):
            # one write per line: both workers share this pipe, and print() writes twice
            # when stdout is unbuffered (PYTHONUNBUFFERED=1)
            os.write(1, b"%d\n" % os.getpid())
            time.sleep(30)
            return x

        try:
            run_items(slow, range(2), workers=2, progress=False)
        except KeyboardInterrupt:
            sys.exit(130)
    """
    proc = _run_driver(code, tmp_path)
    try:
        pids = {int(proc.stdout.readline()), int(proc.stdout.readline())}
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
        assert proc.wait(timeout=20) == 130
        assert _wait_gone(pids) == set()
    finally:
        proc.kill()
