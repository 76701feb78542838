"""The -p N pool: order, error policies, bounded memory, clean shutdown (real processes)."""

import collections
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from tarproc.errors import SampleFailed
from tarproc.runner import PoolStats, PythonRunner, SamplePool, ShellRunner, process_samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def samples(n, prefix="s"):
    return [{"__key__": f"{prefix}{i:05d}", "__url__": "in.tar", "txt": str(i).encode()}
            for i in range(n)]


_BEFORE = set()


@pytest.fixture(autouse=True)
def _children_before():
    """Processes the test session already runs (servers, Dask) are not the pool's workers."""
    _BEFORE.clear()
    _BEFORE.update(p.pid for p in psutil.Process().children(recursive=True))
    yield


def workers_alive():
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and p.pid not in _BEFORE]


def left_in(base):
    return [os.path.join(r, f) for r, ds, fs in os.walk(base) for f in fs + ds]


@pytest.fixture
def base(tmp_path):
    d = tmp_path / "base"
    d.mkdir()
    return d


# Index-dependent delays make completion order differ from input order at -p 2.
JITTER = 'sleep 0.0$(( (TARPROC_INDEX * 7) % 5 )); cat sample.txt; echo'


@pytest.mark.parametrize("processes", [1, 2])
def test_ordered_output(base, processes):
    runner = ShellRunner(JITTER + "; rev sample.txt > sample.rev", tmpdir=str(base))
    stats = PoolStats()
    outs = list(process_samples(runner, samples(20), processes=processes, stats=stats))
    assert [o.index for o in outs] == list(range(20))
    assert [o.stdout for o in outs] == [f"{i}\n".encode() for i in range(20)]
    assert [o.outputs[0]["__key__"] for o in outs] == [f"s{i:05d}" for i in range(20)]
    assert outs[12].outputs[0]["rev"] == b"21"
    assert (stats.inputs, stats.outputs, stats.failed) == (20, 20, 0)
    assert left_in(base) == []


def test_unordered_same_multiset(base):
    runner = ShellRunner(JITTER, tmpdir=str(base))
    ordered = list(process_samples(runner, samples(24), processes=2))
    unordered = list(process_samples(runner, samples(24), processes=2, ordered=False))
    key = lambda o: (o.index, o.stdout, o.outputs[0]["__key__"], o.outputs[0]["txt"])  # noqa
    assert sorted(map(key, unordered)) == sorted(map(key, ordered))
    assert len(unordered) == 24
    assert left_in(base) == []


FAIL_SOME = '[ $((TARPROC_INDEX % 4)) != 1 ] || { echo "bad $TARPROC_KEY" >&2; exit 5; }'


@pytest.mark.parametrize("processes", [1, 2])
def test_errors_skip(base, processes):
    runner = ShellRunner(FAIL_SOME, tmpdir=str(base))
    with SamplePool(runner, processes, errors="skip") as pool:
        outs = list(pool.map(samples(20)))
    assert len(outs) == 20
    failed = [o for o in outs if o.error]
    assert [o.index for o in failed] == [1, 5, 9, 13, 17]
    assert all(o.outputs == [] for o in failed)
    assert failed[0].error.status == 5 and failed[0].error.key == "s00001"
    assert failed[0].stderr == b"bad s00001\n"
    st = pool.stats
    assert (st.inputs, st.outputs, st.skipped, st.kept, st.failed) == (20, 15, 5, 0, 5)
    assert left_in(base) == []


@pytest.mark.parametrize("processes", [1, 2])
def test_errors_keep(base, processes):
    runner = ShellRunner(FAIL_SOME + "; echo changed > sample.txt", tmpdir=str(base))
    inputs = samples(12)
    with SamplePool(runner, processes, errors="keep") as pool:
        outs = list(pool.map(inputs))
    assert [o.outputs[0]["txt"] for o in outs if o.error] == [b"1", b"5", b"9"]
    assert [o.outputs[0] for o in outs if o.error] == [inputs[1], inputs[5], inputs[9]]
    assert all(o.outputs[0]["txt"] == b"changed\n" for o in outs if not o.error)
    st = pool.stats
    assert (st.outputs, st.skipped, st.kept, st.failed) == (12, 0, 3, 3)


@pytest.mark.parametrize("processes,ordered", [(1, True), (2, True), (2, False)])
def test_abort_raises_and_stops_workers(base, processes, ordered):
    runner = ShellRunner('[ "$TARPROC_INDEX" != 6 ] || { echo oops >&2; exit 9; }; sleep 0.02',
                         tmpdir=str(base))
    got = []
    with pytest.raises(SampleFailed) as info:
        for o in process_samples(runner, samples(200), processes=processes, ordered=ordered):
            got.append(o.index)
    exc = info.value
    assert (exc.key, exc.status, exc.index, exc.stderr_tail) == ("s00006", 9, 6, "oops")
    if ordered:
        assert got == list(range(6))
    assert len(got) < 60
    time.sleep(0.1)
    assert workers_alive() == []
    assert left_in(base) == []


def test_bounded_in_flight(base):
    """However long the stream, the pool reads at most max_in_flight samples ahead."""
    taken = 0

    def gen():
        nonlocal taken
        for i in range(3000):
            taken += 1
            yield {"__key__": f"k{i}", "txt": b"x"}

    runner = PythonRunner("def process_sample(s):\n    return s\n")
    ahead = []
    with SamplePool(runner, 2, max_in_flight=50) as pool:
        for n, o in enumerate(pool.map(gen()), 1):
            ahead.append(taken - n)
            if n % 500 == 0:
                time.sleep(0.05)  # a slow consumer must not make the pool read more
    assert len(ahead) == 3000
    assert max(ahead) <= 50
    # default bound: a documented multiple of N
    with SamplePool(runner, 2) as pool:
        taken = 0
        ahead = [taken - n for n, o in enumerate(pool.map(gen()), 1)]
    assert max(ahead) <= pool.max_in_flight == 2 * 256


def test_bounded_bytes_in_flight():
    runner = PythonRunner("def process_sample(s):\n    return s\n")
    big = ({"__key__": f"k{i}", "bin": bytes(100_000)} for i in range(200))
    taken = []

    def tap(it):
        for n, s in enumerate(it, 1):
            taken.append(n)
            yield s

    with SamplePool(runner, 2, max_bytes_in_flight=1_000_000) as pool:
        ahead = [len(taken) - n for n, o in enumerate(pool.map(tap(big)), 1)]
    assert max(ahead) <= 11  # 10 samples fit in the budget, +1 looked ahead


SCRIPT = textwrap.dedent('''
    def process_sample(sample):
        n = int(sample["txt"])
        if n % 3 == 0:
            return None
        if n % 3 == 1:
            return {"__key__": sample["__key__"], "sq": str(n * n)}
        return [dict(sample, __key__=sample["__key__"] + "/a"),
                dict(sample, __key__=sample["__key__"] + "/b")]
''')


def test_python_runner_pool_same_result_any_processes():
    results = {}
    for p in (1, 2, 3):
        stats = PoolStats()
        outs = list(process_samples(PythonRunner(SCRIPT, "s.py"), samples(500),
                                    processes=p, stats=stats))
        results[p] = [(o.index, o.outputs) for o in outs]
        assert (stats.inputs, stats.outputs, stats.dropped) == (500, 499, 167)
    assert results[1] == results[2] == results[3]


def test_decode_encode_run_in_workers():
    runner = PythonRunner("import os\ndef process_sample(s):\n"
                          "    return dict(s, pid=str(os.getpid()))\n")
    items = [f"k{i}:{i}".encode() for i in range(300)]
    with SamplePool(runner, 2, decode=_decode, encode=_encode) as pool:
        outs = list(pool.map(items))
    assert [o.data.split(b"|")[0] for o in outs] == [f"k{i}".encode() for i in range(300)]
    pids = {o.data.split(b"|")[2] for o in outs}
    assert str(os.getpid()).encode() not in pids and len(pids) == 2
    assert all(o.count == 1 and o.outputs == [] for o in outs)


def _decode(item):
    key, value = item.split(b":")
    return {"__key__": key.decode(), "v": value}


def _encode(outputs):
    return b";".join(b"|".join([o["__key__"].encode(), o["v"], o["pid"]]) for o in outputs)


def test_bug_in_worker_aborts_whatever_the_policy():
    runner = PythonRunner("def process_sample(s):\n    return s\n")
    with pytest.raises(ValueError, match="not enough values"):
        list(process_samples(runner, [b"nocolon"] * 5, processes=2, errors="skip",
                             decode=_decode))
    assert workers_alive() == []


def test_abandoned_iteration_stops_workers(base):
    runner = ShellRunner("sleep 0.05", tmpdir=str(base))
    gen = process_samples(runner, samples(100), processes=2)
    next(gen)
    gen.close()
    assert workers_alive() == []
    assert left_in(base) == []


CHILD = textwrap.dedent('''
    import sys
    sys.path.insert(0, {repo!r})
    from tarproc.runner import ShellRunner, process_samples
    runner = ShellRunner("echo started >> {log}; sleep {marker}", tmpdir={base!r})
    samples = ({{"__key__": f"k{{i}}", "txt": b"x"}} for i in range(100))
    for o in process_samples(runner, samples, processes={p}):
        pass
''')


def _our_sleeps(marker):
    return [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][:2] == ["sleep", marker]]


@pytest.mark.parametrize("sig,p", [(signal.SIGTERM, 2), (signal.SIGINT, 2), (signal.SIGTERM, 1)])
def test_signal_cleans_up(base, tmp_path, sig, p):
    marker = f"77.{os.getpid()}{p}{int(sig)}"
    log = tmp_path / "log"
    code = CHILD.format(repo=REPO, base=str(base), marker=marker, p=p, log=str(log))
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while (not log.exists() or len(log.read_text().split()) < p) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_our_sleeps(marker)) == p
    proc.send_signal(sig)
    rc = proc.wait(20)
    assert rc in ((143, 1) if sig == signal.SIGTERM else (-signal.SIGINT, 130, 1))
    if sig == signal.SIGTERM:
        assert rc == 143
    time.sleep(0.1)
    assert _our_sleeps(marker) == []
    assert left_in(base) == []


@pytest.mark.parametrize("processes", [1, 3])
def test_shell_runner_runs_in_threads(base, processes):
    """Shell commands run from threads of this process: no worker processes, samples not pickled."""
    runner = ShellRunner(JITTER + "; rev sample.txt > sample.rev", tmpdir=str(base))
    with SamplePool(runner, processes) as pool:
        assert pool.threaded
        outs = list(pool.map(samples(30)))
        assert [c.name() for c in psutil.Process().children() if c.pid not in _BEFORE] == []
    assert [o.outputs[0]["rev"] for o in outs] == [str(i)[::-1].encode() for i in range(30)]
    assert left_in(base) == []


def test_threads_prepare_failure_in_order(base):
    """A sample refused before its command runs fails in its place, under every policy."""
    bad = samples(10)
    bad[4]["__key__"] = "../evil"
    with SamplePool(ShellRunner("cat sample.txt", tmpdir=str(base)), 2, errors="skip") as pool:
        outs = list(pool.map(bad))
    assert [o.index for o in outs] == list(range(10))
    assert outs[4].error is not None and outs[4].outputs == []
    assert [o.stdout for o in outs if o.index != 4] == [str(i).encode() for i in range(10) if i != 4]
    assert left_in(base) == []


BLOCKS_SCRIPT = textwrap.dedent('''
    def process_sample(sample):
        n = int(sample["v"])
        if n % 10 == 3:
            print("loud", n)
        if n % 10 == 7:
            raise ValueError("seven")
        if n % 10 == 5:
            return None
        return sample
''')


def _enc_list(outputs):
    return b";".join(o["__key__"].encode() + b"=" + o["v"] for o in outputs)


@pytest.mark.parametrize("errors", ["skip", "keep"])
def test_blocks_of_clean_outcomes(errors):
    """With blocks=True, clean consecutive samples come back as one Outcome; the rest, and the
    counts, are as without."""
    items = [f"k{i}:{i}".encode() for i in range(400)]
    got = {}
    for blocks in (False, True):
        with SamplePool(PythonRunner(BLOCKS_SCRIPT), 2, decode=_decode, encode=_enc_list,
                        errors=errors, blocks=blocks) as pool:
            outs = list(pool.map(items))
            st = pool.stats
        per_sample = []
        for o in outs:
            if o.inputs > 1:
                assert o.key is None and not o.stdout and o.error is None
                assert isinstance(o.data, list) and len(o.data) == o.inputs
                assert o.count == sum(1 for d in o.data if d)
                per_sample += [(o.index + j, d, b"", type(None)) for j, d in enumerate(o.data)]
            else:
                per_sample.append((o.index, o.data, o.stdout, type(o.error)))
        got[blocks] = (per_sample, (st.inputs, st.outputs, st.dropped, st.skipped, st.kept,
                                    st.failed))
        if blocks:
            assert len(outs) < 200 and max(o.inputs for o in outs) > 1
        else:
            assert all(o.inputs == 1 for o in outs)
    assert got[True] == got[False]
    per_sample, counts = got[True]
    assert [i for i, *_ in per_sample] == list(range(400))
    assert per_sample[3][2] == b"loud 3\n" and per_sample[7][3] is SampleFailed
    assert counts[:3] == (400, 320 if errors == "skip" else 360, 40)


def test_blocks_need_encode():
    runner = PythonRunner("def process_sample(s):\n    return s\n")
    with SamplePool(runner, 2, blocks=True) as pool:
        outs = list(pool.map(samples(50)))
    assert not pool.blocks and [o.index for o in outs] == list(range(50))


@pytest.mark.parametrize("ordered", [True, False])
def test_parent_works_with_one_worker_fewer(ordered):
    """parent_works: -p 2 is one worker process plus the calling process, which runs batches
    itself while the worker has its fill; results as with two workers."""
    runner = PythonRunner("import os, time\ndef process_sample(s):\n"
                          "    time.sleep(0.0002)\n"
                          "    return dict(s, pid=str(os.getpid()))\n")
    items = [f"k{i}:{i}".encode() for i in range(600)]
    with SamplePool(runner, 2, decode=_decode, encode=_encode, parent_works=True,
                    ordered=ordered) as pool:
        assert len(pool._workers) == 1
        outs = list(pool.map(items))
        st = pool.stats
    keys = [o.data.split(b"|")[0] for o in outs]
    if ordered:
        assert keys == [f"k{i}".encode() for i in range(600)]
    else:
        assert sorted(keys) == sorted(f"k{i}".encode() for i in range(600))
    pids = {o.data.split(b"|")[2] for o in outs}
    assert str(os.getpid()).encode() in pids and len(pids) == 2
    assert (st.inputs, st.outputs) == (600, 600)
    assert workers_alive() == []


def test_parent_works_failures_abort_in_order():
    runner = PythonRunner("def process_sample(s):\n"
                          "    if s['v'] == b'150':\n        raise ValueError('no')\n"
                          "    return s\n")
    items = [f"k{i}:{i}".encode() for i in range(400)]
    got = []
    with pytest.raises(SampleFailed) as info:
        with SamplePool(runner, 2, decode=_decode, encode=_enc_list, parent_works=True,
                        blocks=True) as pool:
            for o in pool.map(items):
                got.append((o.index, o.inputs))
    assert info.value.index == 150
    assert sum(n for _, n in got) == 150 and got[0][0] == 0
    assert workers_alive() == []


# ------------------------------------------------------------------ code that ends or kills its process


@pytest.mark.parametrize("how,ended", [("os._exit(0)", "exit status 0"),
                                       ("faulthandler.disable(); os.kill(os.getpid(), signal.SIGSEGV)",
                                        "killed by signal 11 (SIGSEGV)")])  # (no dump of pytest's)
@pytest.mark.parametrize("ordered", [True, False])
def test_a_worker_that_dies_is_a_worker_died_error(how, ended, ordered):
    """Not a RuntimeError traceback, nor a BrokenPipeError (which commands take for a closed
    stdout and exit 141 quietly): a TarprocError naming the process and the samples it had."""
    from tarproc.errors import TarprocError
    from tarproc.runner.pool import WorkerDied

    runner = PythonRunner("import faulthandler, os, signal\ndef process_sample(s):\n"
                          f"    if s['__key__'] == 's00137': {how}\n"
                          "    return s\n")
    for _ in range(3):  # (where the parent notices it varies)
        with pytest.raises(WorkerDied) as info:
            list(process_samples(runner, samples(400), processes=2, ordered=ordered))
        exc = info.value
        assert isinstance(exc, TarprocError) and exc.exitcode == (0 if "_exit" in how else -11)
        assert str(exc).startswith(f"a worker process (pid {exc.pid}) died ({ended}) while running sample(s) ")
        assert exc.samples and all(s.startswith("'s0") for s in exc.samples)
        spans = [[int(k.strip("' ")[1:]) for k in s.split(" .. ")] for s in exc.samples]
        assert any(span[0] <= 137 <= span[-1] for span in spans), exc.samples
        assert workers_alive() == []


def test_describe_names_items_that_are_not_sample_dicts():
    from tarproc.runner.pool import WorkerDied

    runner = PythonRunner("import os\ndef process_sample(s):\n    os._exit(3)\n")
    with pytest.raises(WorkerDied, match=r"died \(exit status 3\) while running sample\(s\) <k0>"):
        list(process_samples(runner, [b"k0:0"], processes=2, decode=_decode,
                             describe=lambda item: "<" + item.split(b":")[0].decode() + ">"))
    with pytest.raises(WorkerDied, match=r"while running sample\(s\) #0\b"):  # (bytes: no key known)
        list(process_samples(runner, [b"k0:0"], processes=2, decode=_decode))
    assert workers_alive() == []


@pytest.mark.parametrize("p", [1, 2])
def test_sys_exit_in_python_code_is_a_sample_failure(p):
    runner = PythonRunner("import sys\ndef process_sample(s):\n"
                          "    if s['__key__'] == 's00007': sys.exit('bye')\n"
                          "    return s\n")
    stats = PoolStats()
    outs = list(process_samples(runner, samples(20), processes=p, errors="skip", stats=stats))
    failed = [o.error for o in outs if o.error is not None]
    assert len(failed) == 1 and failed[0].key == "s00007" and failed[0].status == "exception"
    assert "process_sample raised SystemExit: bye" in str(failed[0])
    assert (stats.inputs, stats.outputs, stats.skipped) == (20, 19, 1)
    assert workers_alive() == []


def test_signal_exit_is_not_taken_for_a_failure_of_the_sample():
    """SIGTERM in a worker raises SignalExit, wherever it is: it ends the process."""
    from tarproc.runner.pool import SignalExit

    runner = PythonRunner("from tarproc.runner.pool import SignalExit\n"
                          "def process_sample(s):\n    raise SignalExit(143)\n")
    with pytest.raises(SignalExit):
        runner.run(samples(1)[0])


def test_keyboard_interrupt_raised_in_a_worker_is_raised_in_the_caller():
    runner = PythonRunner("def process_sample(s):\n    raise KeyboardInterrupt\n")
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            list(process_samples(runner, samples(100), processes=2, errors="skip"))
        assert workers_alive() == []


def test_threads_that_cannot_start_are_a_one_line_error(base, monkeypatch):
    import threading

    from tarproc.errors import TarprocError

    started = []
    real_start = threading.Thread.start

    def start(self):
        if self.name.startswith("tarproc-runner-") and len(started) >= 3:
            raise RuntimeError("can't start new thread")
        started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(TarprocError, match=r"^cannot start runner thread 4 of 50 samples at once: can't start"):
        SamplePool(ShellRunner("true", tmpdir=str(base)), 50)
    assert not any(t.is_alive() for t in started)
