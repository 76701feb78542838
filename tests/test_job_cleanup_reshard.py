"""What an interrupted, killed or failed htsort, htshuffle or htupload job leaves behind: nothing
of its own.

Real processes on a real local cluster, stopped with real signals, as in test_job_cleanup.py:
the hidden temp files (``.NAME.tmp-XXXXXXXX``) of output shards, of the manifest and of the work
files in a local --workdir that a stopped run leaves are removed by the run itself when it is
interrupted and by the next run when it was killed; so are the private sample dirs
(``tarproc-<pid>-...``) of dead workers whose mapper ran shell commands. Look-alike files and
dirs that are not the job's own survive.
"""

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

from cli_helpers import BIN
from tarproc.runner.sampledir import group_members
from tarproc.streams import iter_samples
from test_job_cleanup import _alive, _env, _roots, _sample_roots, _shards

KEYS = sorted(f"s{s}_{i:03d}" for s in range(3) for i in range(10))

#: htsort's reduce: each sample as it is, after TEST_SLEEP seconds (the same script, hence the
#: same job, with or without the sleep: the rerun resumes the stopped one)
SLOW_REDUCE = textwrap.dedent("""
    import os, time

    def reduce_samples(key, samples):
        time.sleep(float(os.environ.get("TEST_SLEEP", "0")))
        return [{"__key__": s["__key__"], "txt": s["txt"]} for s in samples]
""")

#: htshuffle's mapper: a shell command per sample through tarproc's runner (sample dirs in TMPDIR)
SHELL_MAPPER = textwrap.dedent("""
    from tarproc.processing import make_runner

    _runner = make_runner('sleep "${TEST_SLEEP:-0}"; tr a-z A-Z < sample.txt > up; mv up sample.txt')

    def process_sample(sample):
        return _runner.run(sample).outputs
""")

#: Files that look like temp files of the jobs (outputs o-@2.tar, work dir work/) but are not
#: their own: another name, a bad suffix, no such shard or partition, not in a map dir
OUT_DECOYS = [".other.tmp-abc", ".o-0.tar.tmp-a.b", ".o-7.tar.tmp-abc", "o-0.tar.tmp-abc",
              ".o-0.tar.tmp-", "notes.txt"]
WORK_DECOYS = ["map-00000/.part-00009.tar.tmp-abc",  # no partition 9 of 2
               "map-00000/.part-0.tar.tmp-abc", "map-00000/.notes.json.tmp-abc",
               "map-00099/.done.json.tmp-abc",  # no input 99 of 3
               ".part-00000.tar.tmp-abc", ".other.json.tmp-abc"]  # not in a map dir


@pytest.fixture
def job(tmp_path):
    """tmp_path with small/in-0..2.tar (10 samples each), a private TMPDIR, the scripts, and
    decoys in out/, work/ and elsewhere/ (a dir the jobs do not write to)."""
    _shards(tmp_path / "small")
    (tmp_path / "tmp").mkdir()
    (tmp_path / "slow.py").write_text(SLOW_REDUCE)
    (tmp_path / "mapper.py").write_text(SHELL_MAPPER)
    for path in [f"out/{n}" for n in OUT_DECOYS] + [f"work/{n}" for n in WORK_DECOYS] + \
            ["elsewhere/.o-0.tar.tmp-abc", "elsewhere/.part-00000.tar.tmp-abc"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"not ours")
    (tmp_path / "out/.o-1.tar.tmp-dir").mkdir()  # not a regular file: not ours
    (tmp_path / "work/map-00001").mkdir()
    (tmp_path / "work/map-00001/.done.json.tmp-dir").mkdir()
    return tmp_path


def _decoys_intact(job):
    for path in [f"out/{n}" for n in OUT_DECOYS] + [f"work/{n}" for n in WORK_DECOYS] + \
            ["elsewhere/.o-0.tar.tmp-abc", "elsewhere/.part-00000.tar.tmp-abc"]:
        assert (job / path).read_bytes() == b"not ours", path
    assert (job / "out/.o-1.tar.tmp-dir").is_dir()
    assert (job / "work/map-00001/.done.json.tmp-dir").is_dir()


def _temp_files(job):
    """The temp files under out/ and work/ (recursively) that are not decoys."""
    found = []
    for top in ("out", "work"):
        for d, _, names in os.walk(job / top):
            for name in names:
                rel = os.path.relpath(os.path.join(d, name), job)
                if ".tmp-" in name and rel.split("/", 1)[1] not in OUT_DECOYS + WORK_DECOYS:
                    found.append(rel)
    return sorted(found)


def _work_temp_files(job):
    return [p for p in _temp_files(job) if p.startswith("work/map-")]


def _out_temp_files(job):
    return [p for p in _temp_files(job) if p.startswith("out/")]


def _run(job, prog, *args, env=None, timeout=60):
    return subprocess.run([str(BIN / prog), *args], cwd=job, env=_env(job) | (env or {}),
                          capture_output=True, timeout=timeout)


def _descendants(pid):
    """The pids of the live processes below ``pid`` (children, theirs...), from /proc."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_tree(proc):
    """SIGKILL a command that still runs and every process it started (its workers too)."""
    if proc.poll() is None:
        for pid in _descendants(proc.pid) | {proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _stop_when(job, argv, ready, sig, env=None):
    """Start a command in a process group of its own, wait until ``ready()``, then stop it, and
    return (exit status, stderr) once it and every process it started have ended.

    SIGINT and SIGTERM go to the command's process group, as the terminal sends them (the local
    cluster's workers, in a session of their own, are stopped by the driver). SIGKILL goes to
    every process of the job at once, the workers too, as when a machine or its container is
    killed (killed alone, the driver's workers would finish their tasks and exit cleanly).
    """
    proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], cwd=job, env=_env(job) | (env or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert ready(), (proc.poll(), proc.stderr.read().decode(errors="replace")
                         if proc.poll() is not None else "")
        tree = _descendants(proc.pid)
        if sig == signal.SIGKILL:
            for pid in tree | group_members({proc.pid}):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        else:
            os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=40)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in tree)
        return proc.returncode, err.decode(errors="replace")
    finally:
        _kill_tree(proc)


def _keys_and_texts(pattern):
    return [(s["__key__"], s["txt"]) for s in iter_samples(pattern)]


def _expected(upper=False):
    out = []
    for key in KEYS:
        s, i = key[1:].split("_")
        text = f"hello {s} {int(i)}\n"
        out.append((key, (text.upper() if upper else text).encode()))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("phase, sig, status", [
    ("map", signal.SIGKILL, -9), ("reduce", signal.SIGKILL, -9),
    ("map", signal.SIGINT, 130), ("reduce", signal.SIGTERM, 143)])
def test_htsort_stopped_mid_job_then_rerun(job, phase, sig, status):
    """Stopped while a map task writes its sorted runs to the work dir (the reduce also runs as
    a combiner there, slowly) or while a reduce task writes an output shard: an interrupted run
    removes its temp files itself, a killed run's are removed by the rerun, which completes."""
    args = ["htsort", "-q", "-j", "2", "--no-speculation", "--retries", "0", "--workdir", "work",
            "--reduce", "slow.py", "small/in-@3.tar", "out/o-@2.tar"]
    if phase == "map":
        args.insert(-2, "--combine")
        ready = lambda: len(_work_temp_files(job)) >= 2  # noqa: E731
    else:
        ready = lambda: len(_out_temp_files(job)) >= 2  # noqa: E731
    # after an interrupt, 1 s a group: a task outlasts the driver's grace for its workers
    slow = "0.4" if sig == signal.SIGKILL else "1"
    code, err = _stop_when(job, args, ready, sig, env={"TEST_SLEEP": slow})
    assert code == status, err
    left = _temp_files(job)
    if sig == signal.SIGKILL:
        assert left, "a killed run leaves its temp files (else this test tests nothing)"
    else:
        assert left == [], err[-3000:]
    _decoys_intact(job)

    # after a kill, the rerun (slow too) removes the temp files before its tasks, not only at
    # its end; --keep-work: the work dir stays, to be looked at
    done = False
    rerun = subprocess.Popen([str(BIN / args[0]), "--keep-work", *args[1:]], cwd=job,
                             env=_env(job) | {"TEST_SLEEP": "0.1" if left else "0"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        outputs = [job / "out/o-0.tar", job / "out/o-1.tar"]
        while set(left) & set(_temp_files(job)) and rerun.poll() is None:
            done = all(p.exists() for p in outputs)
            time.sleep(0.02)
        assert not done, "the stale temp files outlived the rerun's tasks"
        _, err = rerun.communicate(timeout=60)
    finally:
        _kill_tree(rerun)
    _rerun_left_nothing(rerun, err, job)
    assert _keys_and_texts(str(job / "out/o-{0..1}.tar")) == _expected()
    assert sorted(os.listdir(job / "out")) == sorted(OUT_DECOYS + [".o-1.tar.tmp-dir", "o-0.tar",
                                                                     "o-1.tar"])


def _rerun_left_nothing(rerun, err, job):
    """The rerun succeeded, no temp file of ours is left, and every look-alike decoy survived."""
    assert rerun.returncode == 0, err.decode(errors="replace")
    assert _temp_files(job) == []
    _decoys_intact(job)


def _wait_dead(pids, seconds=20):
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(pid) for pid in pids)


@pytest.mark.timeout(120)
def test_htshuffle_shell_mapper_killed_then_rerun_removes_dead_sample_dirs(job):
    """Workers killed while their mapper runs shell commands leave their sample dirs; the rerun
    removes those of dead processes only, and its output is complete."""
    tmp = job / "tmp"
    dead, dead_root, live_root, odd, locked = _sample_roots(tmp)
    decoys = {live_root.name, odd.name, locked.name}
    args = ["htshuffle", "-q", "-j", "2", "--no-speculation", "--retries", "0", "--seed", "3",
            "--workdir", "work", "-p", "mapper.py", "small/in-@3.tar", "out/o-@2.tar"]
    seen = {}

    def ready():  # both workers run the mapper's commands
        seen.update({n: pid for n, pid in _roots(tmp).items() if pid != dead and n not in decoys})
        return len(seen) >= 2

    fd = os.open(locked, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        code, err = _stop_when(job, args, ready, signal.SIGKILL, env={"TEST_SLEEP": "0.3"})
        assert code == -9, err
        workers = set(seen.values())
        assert _wait_dead(workers)
        killed = {n for n in seen if (tmp / n).exists()}
        assert killed, "killed workers leave their sample dirs (else this test tests nothing)"

        again = _run(job, *args[:1], "--keep-work", *args[1:])
        assert again.returncode == 0, again.stderr.decode(errors="replace")
    finally:
        os.close(fd)
    left = set(_roots(tmp))
    assert not left & killed
    assert not dead_root.exists()
    assert live_root.exists() and odd.exists() and locked.exists()
    got = sorted(_keys_and_texts(str(job / "out/o-{0..1}.tar")))
    assert got == _expected(upper=True)
    assert _temp_files(job) == []
    _decoys_intact(job)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig, status", [(signal.SIGKILL, -9), (signal.SIGINT, 130)])
def test_htupload_stopped_mid_shard_then_rerun(job, sig, status):
    """Shards whose source is a FIFO nobody writes to stay open mid-write until the job is
    stopped: an interrupted run removes their temp files, a killed run's (and a stale temp file
    of its manifest) go at the start of the rerun, which then builds every shard and the
    manifest."""
    src = job / "src"
    src.mkdir()
    lines = []
    for i in range(6):
        path = src / f"f{i}.txt"
        if i % 3 == 0:
            os.mkfifo(path)  # one per shard: its read blocks, the shard stays half written
        else:
            path.write_bytes(f"file {i}\n".encode())
        lines.append(f"k{i}.txt\t{path}\n")
    (job / "plan.tsv").write_text("".join(lines))
    args = ["htupload", "-q", "-j", "2", "--no-speculation", "--retries", "0",
            "--manifest", "out/manifest.json", "plan.tsv", "out/o-@2.tar"]
    code, err = _stop_when(job, args, lambda: len(_out_temp_files(job)) >= 2, sig)
    assert code == status, err
    left = _out_temp_files(job)
    if sig == signal.SIGKILL:
        assert sorted(p.split(".tmp-")[0] for p in left) == ["out/.o-0.tar", "out/.o-1.tar"], left
    else:
        assert left == [], err[-3000:]
    _decoys_intact(job)
    stale = left + ["out/.manifest.json.tmp-k1lled_"]
    (job / stale[-1]).write_bytes(b"partial")  # as a killed manifest write leaves it

    # the rerun: shard 1 now reads a plain file, shard 0 waits for its FIFO until the stale temp
    # files are gone (so they went before the job's tasks ended), then gets its data
    (src / "f3.txt").unlink()
    (src / "f3.txt").write_bytes(b"file 3\n")
    rerun = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=job, env=_env(job),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 40
        while set(stale) & set(_temp_files(job)) and time.monotonic() < deadline:
            assert rerun.poll() is None, rerun.stderr.read().decode(errors="replace")
            time.sleep(0.02)
        assert not set(stale) & set(_temp_files(job)), "the stale temp files outlived the tasks"
        while True:  # (a FIFO opens for writing without blocking only once its reader waits)
            try:
                fd = os.open(src / "f0.txt", os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert rerun.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
        os.write(fd, b"file 0\n")
        os.close(fd)
        _, err = rerun.communicate(timeout=60)
    finally:
        _kill_tree(rerun)
    _rerun_left_nothing(rerun, err, job)
    got = [(s["__key__"], s["txt"]) for s in iter_samples(str(job / "out/o-{0..1}.tar"))]
    assert got == [(f"k{i}", f"file {i}\n".encode()) for i in range(6)]
    manifest = json.loads((job / "out/manifest.json").read_text())
    assert [e["count"] for e in manifest["shards"]] == [3, 3] and manifest["failed"] == []
