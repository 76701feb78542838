"""The items driver and cluster connection, against real Dask processes (no mocks).

Most tests use the session's real ``dask scheduler`` + two ``dask worker`` processes
(``dask_cluster`` from dask_fixtures); the workers cannot import this module, so every function
defined here reaches them by value. A few tests start a LocalCluster, as ``cluster=None`` does.
"""

import collections
import json
import operator
import os
import random
import time

import psutil
import pytest

from tarproc.errors import TarprocError
from tarproc.jobs.cluster import Cluster, connect
from tarproc.jobs.driver import JobResult, run_items

OFFSET = 1000


def _square(x):
    return {"value_sq": x * x, "samples_in": 1, "samples_out": 1, "bytes_in": 10}


def _helper(x):
    return x + OFFSET


def _worker_address():
    from distributed import get_worker

    return get_worker().address


def _children():
    """Child processes, minus multiprocessing's long-lived resource tracker and fork server."""
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(p.cmdline())
            # multiprocessing's long-lived helpers: the resource tracker, and the fork server
            # that local clusters fork their workers from (it lives as long as the driver)
            if "resource_tracker" not in cmdline and "forkserver" not in cmdline:
                pids.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


# --------------------------------------------------------------------------------------------
# Where the work runs


def test_local_default_runs_and_closes():
    before = _children()
    r = run_items(_square, range(6), workers=2, progress=False)
    assert r.ok and r.done == 6 and r.total == 6
    assert [it["value_sq"] for it in r.items] == [x * x for x in range(6)]
    assert len({it["worker"] for it in r.items}) >= 1
    time.sleep(0.5)
    assert _children() - before == set()  # the local cluster's processes are gone


def test_address_string(dask_cluster, dask_scheduler_address):
    addr = dask_scheduler_address.replace("tcp://", "")  # "127.0.0.1:port" form works too
    r = run_items(_helper, range(5), cluster=addr, progress=False)
    assert r.ok and [it["value"] for it in r.items] == [x + OFFSET for x in range(5)]
    assert {it["worker"] for it in r.items} <= set(dask_cluster.client.nthreads())


def test_caller_client_stays_open(dask_scheduler_address):
    from distributed import Client

    with Client(dask_scheduler_address, set_as_default=False) as client:
        r = run_items(_helper, range(4), cluster=client, progress=False)
        assert r.ok
        assert client.status == "running"
        assert client.submit(operator.add, 1, 2).result() == 3
        with Cluster(client) as c:  # a Cluster around a caller's client leaves it open too
            assert run_items(_helper, [1], cluster=c, progress=False).ok
        assert client.status == "running"


def test_cluster_context_reused_across_jobs(dask_scheduler_address):
    with Cluster(dask_scheduler_address, quiet=True) as c:
        client = c.client
        r1 = run_items(_helper, range(3), cluster=c, progress=False)
        r2 = run_items(_square, range(3), cluster=c, progress=False)
        assert c.client is client and client.status == "running"
        assert c.address == dask_scheduler_address
    assert r1.ok and r2.ok and r2.totals["value_sq"] == 5
    assert client.status == "closed"
    assert c.client is None


def test_connect_rejects_garbage():
    with pytest.raises(TarprocError):
        with connect(42):
            pass


# --------------------------------------------------------------------------------------------
# Window, resume, retries


def _timed_sleep(x):
    t0 = time.time()
    time.sleep(0.01)
    return {"t0": t0, "t1": time.time()}


def test_window_bounds_tasks_in_flight():
    """1,000 items, 16 worker threads, window 8: never more than 8 run at once."""
    with Cluster(None, workers=2, threads_per_worker=8, quiet=True) as c:
        r = run_items(_timed_sleep, range(1000), cluster=c, window=8, progress=False,
                      speculation=False)
    assert r.ok and r.done == 1000
    assert r.max_in_flight == 8
    events = sorted([(it["t0"], 1) for it in r.items] + [(it["t1"], -1) for it in r.items],
                    key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert 2 <= peak <= 8
    assert "t0" not in r.totals or r.totals["t0"] > 0


def _write_output(args):
    out_dir, x = args
    path = os.path.join(out_dir, f"out-{x}")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(x))
    os.replace(tmp, path)
    return {"samples_out": 1}


def test_is_done_skips_and_force(tmp_path, dask_scheduler_address):
    out = str(tmp_path)
    items = [(out, x) for x in range(10)]

    def is_done(item):
        return os.path.exists(os.path.join(item[0], f"out-{item[1]}"))

    for x in range(4):
        _write_output((out, x))
    r = run_items(_write_output, items, keys=lambda it: f"out-{it[1]}", is_done=is_done,
                  cluster=dask_scheduler_address, progress=False)
    assert (r.total, r.done, r.skipped, r.ok) == (10, 6, 4, True)
    assert sorted(it["key"] for it in r.items) == sorted(f"out-{x}" for x in range(4, 10))
    assert "10 items: 6 done, 4 skipped, 0 failed" in r.summary()
    r = run_items(_write_output, items, is_done=is_done, cluster=dask_scheduler_address,
                  progress=False)
    assert (r.done, r.skipped) == (0, 10)
    r = run_items(_write_output, items, is_done=is_done, force=True,
                  cluster=dask_scheduler_address, progress=False)
    assert (r.done, r.skipped) == (10, 0)


def _fail_once(args):
    state_dir, x = args
    marker = os.path.join(state_dir, f"failed-{x}")
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(_worker_address())
        raise RuntimeError(f"first attempt of {x} fails")
    return {"x": x}


def test_fails_once_succeeds_on_retry_on_another_worker(tmp_path, dask_scheduler_address):
    items = [(str(tmp_path), x) for x in range(6)]
    r = run_items(_fail_once, items, keys=lambda it: f"item{it[1]}",
                  cluster=dask_scheduler_address, progress=False, log_dir=str(tmp_path / "logs"))
    assert r.ok and r.done == 6
    for it in r.items:
        assert it["attempts"] == 2
        failed_on = (tmp_path / f"failed-{it['x']}").read_text()
        assert it["worker"] != failed_on  # the retry went to the other worker
    log = (tmp_path / "logs" / "item0.log").read_text()
    assert "RuntimeError: first attempt of 0 fails" in log and "Traceback" in log


def _fail_on_three(x):
    if x == 3:
        raise ValueError(f"item {x} is corrupt\nsecond line")
    return {"samples_in": 10}


def test_always_failing_item_is_listed_others_done(tmp_path, dask_scheduler_address):
    r = run_items(_fail_on_three, range(8), cluster=dask_scheduler_address, progress=False,
                  retries=2, log_dir=str(tmp_path), desc="shards")
    assert not r.ok
    assert r.done == 7
    assert r.failed == [("3", "ValueError: item 3 is corrupt")]
    bad = r.items[3]
    assert bad["status"] == "failed" and bad["attempts"] == 3
    assert "Traceback" in bad["traceback"] and "second line" in bad["traceback"]
    assert (tmp_path / "3.log").read_text().count("ValueError: item 3 is corrupt") >= 3
    assert r.summary().startswith("8 shards: 7 done, 0 skipped, 1 failed; 70 samples in")
    data = json.loads(r.to_json(str(tmp_path / "stats.json")))
    assert data["failed"] == [{"key": "3", "error": "ValueError: item 3 is corrupt"}]
    assert json.loads((tmp_path / "stats.json").read_text())["totals"]["samples_in"] == 70


def test_zero_retries(dask_scheduler_address):
    r = run_items(_fail_on_three, range(5), cluster=dask_scheduler_address, progress=False,
                  retries=0)
    assert r.items[3]["attempts"] == 1 and len(r.failed) == 1


# --------------------------------------------------------------------------------------------
# Worker death and stragglers


def _sleepy(x):
    time.sleep(0.5)
    return {"x": x, "pid": os.getpid()}


def test_killed_worker_mid_job_every_item_once(dask_cluster, dask_scheduler_address):
    seen = []

    def on_result(record):
        seen.append(record["key"])
        if len(seen) == 2:
            dask_cluster.kill_worker()

    r = run_items(_sleepy, range(12), cluster=dask_scheduler_address, progress=False,
                  on_result=on_result, speculation=False)
    assert r.ok and r.done == 12 and not r.failed
    assert sorted(it["x"] for it in r.items) == list(range(12))
    assert sorted(seen) == sorted(str(x) for x in range(12)) and len(seen) == 12
    assert len(dask_cluster.live_workers()) == 1
    dask_cluster.restore(2)


def _slow_first_time(args):
    state_dir, x = args
    if x == 0:
        marker = os.path.join(state_dir, "slow-started")
        if not os.path.exists(marker):
            open(marker, "w").close()
            deadline = time.time() + 20
            while time.time() < deadline and not os.path.exists(os.path.join(state_dir, "release")):
                time.sleep(0.05)
            return {"x": x, "slow": True}
    time.sleep(0.1)
    return {"x": x, "slow": False}


def test_straggler_gets_speculative_copy_that_wins(tmp_path, dask_scheduler_address):
    items = [(str(tmp_path), x) for x in range(6)]
    t0 = time.monotonic()
    try:
        r = run_items(_slow_first_time, items, keys=lambda it: f"s{it[1]}",
                      cluster=dask_scheduler_address, progress=False, spec_min_seconds=1.0)
    finally:
        (tmp_path / "release").touch()  # free the loser's worker thread
    assert time.monotonic() - t0 < 15
    assert r.ok and r.done == 6 and r.speculated == 1
    slow = r.items[0]
    assert slow["speculative"] is True and slow["slow"] is False
    assert not any(it["speculative"] for it in r.items[1:])
    assert "1 speculative" in r.summary()


def test_no_speculation_waits_for_straggler(tmp_path, dask_scheduler_address):
    items = [(str(tmp_path), x) for x in range(3)]
    (tmp_path / "release").touch()  # the "slow" item returns at once
    r = run_items(_slow_first_time, items, cluster=dask_scheduler_address, progress=False,
                  speculation=False, spec_min_seconds=0)
    assert r.ok and r.speculated == 0 and r.items[0]["slow"] is True


# --------------------------------------------------------------------------------------------
# Functions, reduce, ordering, keys


def test_closure_and_test_module_function_on_real_cluster(dask_scheduler_address):
    offset = 7

    def local(x):
        return _helper(x) + offset

    r = run_items(local, range(5), cluster=dask_scheduler_address, progress=False)
    assert r.ok and [it["value"] for it in r.items] == [x + OFFSET + 7 for x in range(5)]
    r = run_items(lambda x: x * 3, range(3), cluster=dask_scheduler_address, progress=False)
    assert [it["value"] for it in r.items] == [0, 3, 6]


TEXTS = ["the cat sat on the mat", "the dog", "a cat and a dog and a bird", "", "mat mat"]


def _count_words(text):
    return collections.Counter(text.split())


def _pairs_generator(text):
    for w in text.split():
        yield w, 1


def test_reduce_word_count(dask_scheduler_address):
    expected = collections.Counter(" ".join(TEXTS).split())
    r = run_items(_count_words, TEXTS, keys=range(len(TEXTS)), reduce=operator.add,
                  cluster=dask_scheduler_address, progress=False)
    assert r.ok and r.reduced == dict(expected)
    r = run_items(_pairs_generator, TEXTS, keys=range(len(TEXTS)), reduce=operator.add,
                  cluster=dask_scheduler_address, progress=False)
    assert r.reduced == dict(expected)
    r = run_items(lambda n: (n % 2, n), range(10), reduce=max, cluster=dask_scheduler_address,
                  progress=False)
    assert r.reduced == {0: 8, 1: 9}


def test_shuffle_order_is_seeded(dask_scheduler_address):
    order = []
    r = run_items(_helper, range(20), shuffle=True, seed=5, window=1, speculation=False,
                  cluster=dask_scheduler_address, progress=False,
                  on_result=lambda rec: order.append(rec["index"]))
    expected = list(range(20))
    random.Random(5).shuffle(expected)
    assert order == expected
    assert [it["index"] for it in r.items] == list(range(20))  # results in input order


def test_duplicate_keys_rejected(dask_scheduler_address):
    with pytest.raises(TarprocError, match="duplicate item key"):
        run_items(_helper, [1, 2, 1], cluster=dask_scheduler_address, progress=False)
    with pytest.raises(TarprocError, match="3 keys for 2 items"):
        run_items(_helper, [1, 2], keys=["a", "b", "c"], cluster=dask_scheduler_address,
                  progress=False)


def test_log_text_written_per_item(tmp_path, dask_scheduler_address):
    def with_log(x):
        return {"samples_out": x, "log": f"converted {x}\n"}

    r = run_items(with_log, ["a/b", "c"], keys=lambda s: s, cluster=dask_scheduler_address,
                  progress=False, log_dir=str(tmp_path))
    assert r.ok
    assert "log" not in r.items[0]
    assert (tmp_path / "c.log").read_text() == "converted c\n"
    (other,) = [p for p in tmp_path.iterdir() if p.name.startswith("a_b")]
    assert other.read_text() == "converted a/b\n"


def test_result_summary_and_json():
    r = JobResult(desc="shards", total=8, done=8, totals={"samples_in": 80000,
                                                           "bytes_out": 2_500_000},
                  seconds=3.21)
    assert r.ok
    assert r.summary() == ("8 shards: 8 done, 0 skipped, 0 failed; 80000 samples in, "
                           "2.5 MB written in 3.2 s")
    assert json.loads(r.to_json())["done"] == 8
    # samples failing under --errors skip/keep are counted in the line; bytes say what they count
    r = JobResult(desc="shards", total=4, done=4, totals={
        "samples_in": 40, "samples_out": 36, "skipped": 4, "kept": 0, "bytes_in": 187_000,
        "bytes_out": 270_300}, seconds=1.24)
    assert r.summary() == ("4 shards: 4 done, 0 skipped, 0 failed; 40 samples in, 36 samples out, "
                           "4 failing samples dropped, 187.0 kB of sample data read, "
                           "270.3 kB written in 1.2 s")
    r.totals.update(skipped=0, kept=3)
    assert "36 samples out, 3 failing samples kept, 187.0 kB" in r.summary()


def _scheduler_tasks(dask_scheduler):
    return len(dask_scheduler.tasks)


def test_200_trivial_items_overhead(dask_cluster, dask_scheduler_address, capsys):
    t0 = time.monotonic()
    r = run_items(_helper, range(200), cluster=dask_scheduler_address, progress=False)
    seconds = time.monotonic() - t0
    assert r.ok and r.done == 200
    assert r.max_in_flight <= 2 * 2 + 8
    deadline = time.monotonic() + 10  # every task was released: nothing piles up
    while dask_cluster.client.run_on_scheduler(_scheduler_tasks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert dask_cluster.client.run_on_scheduler(_scheduler_tasks) == 0
    with capsys.disabled():
        print(f"\n200 trivial items on 2 real workers: {seconds:.2f} s, {200 / seconds:.0f} items/s")
    assert seconds < 10
