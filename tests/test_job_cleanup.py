"""What an interrupted, killed or failed htmapper job leaves behind: nothing of its own.

Real htmapper processes on a real local cluster, stopped with real signals: no hidden temp files
of the outputs (``.NAME.tmp-XXXXXXXX``) and no private sample dirs (``tarproc-<pid>-...``) of
dead worker processes remain; a rerun removes such leftovers of an earlier run; a failing
command's stderr reaches the per-shard error line, the --log-dir logs and --stats.
"""

import fcntl
import io
import json
import os
import re
import signal
import subprocess
import tarfile
import time

import pytest

from cli_helpers import BIN, shell_env

ROOT = re.compile(r"tarproc-([0-9]+)-[0-9a-f]{12}\Z")


def _shards(d, n=3, samples=10):
    d.mkdir()
    for s in range(n):
        with tarfile.open(d / f"in-{s}.tar", "w") as t:
            for i in range(samples):
                data = f"hello {s} {i}\n".encode()
                info = tarfile.TarInfo(f"s{s}_{i:03d}.txt")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


@pytest.fixture
def job(tmp_path):
    """tmp_path with small/in-0..2.tar (10 samples each) and a private TMPDIR for sample dirs."""
    _shards(tmp_path / "small")
    (tmp_path / "tmp").mkdir()
    return tmp_path


def _env(job):
    return shell_env({"TMPDIR": str(job / "tmp")})


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def _roots(d):
    return {name: int(m.group(1)) for name in os.listdir(d) if (m := ROOT.match(name))}


def _temp_files(d):
    return sorted(name for name in os.listdir(d) if ".tmp-" in name) if d.exists() else []


def _htmapper(job, *args, timeout=60):
    return subprocess.run([str(BIN / "htmapper"), *args], cwd=job, env=_env(job), capture_output=True,
                          timeout=timeout)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_job_leaves_no_temp_files_and_no_sample_dirs(job, sig, status):
    out, tmp = job / "out", job / "tmp"
    # 10 s per shard: the workers are stopped (after the driver's grace, killed) in mid-shard
    proc = subprocess.Popen([str(BIN / "htmapper"), "-q", "-j", "2", "--no-speculation", "-C", "sleep 1",
                             "small/in-@3.tar", "out/o-@3.tar"], cwd=job, env=_env(job),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        seen = {}
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and proc.poll() is None:
            seen.update(_roots(tmp))
            if len(_temp_files(out)) == 2 and len(seen) >= 2:
                break
            time.sleep(0.05)
        assert len(_temp_files(out)) == 2 and len(seen) >= 2, (seen, proc.poll())
        time.sleep(0.5)  # the first samples' commands running
        t0 = time.monotonic()
        os.killpg(proc.pid, sig)  # as the terminal does: the whole foreground group
        _, err = proc.communicate(timeout=40)
        assert proc.returncode == status, err.decode(errors="replace")
        # busy workers are given half a second, not the 5 s of a normal close
        assert time.monotonic() - t0 < 4, time.monotonic() - t0
        assert _temp_files(out) == []
        workers = set(seen.values())
        assert not any(_alive(pid) for pid in workers)
        left = {name: pid for name, pid in _roots(tmp).items() if not _alive(pid)}
        if left:  # (rarely) a worker still exiting as the driver ended: the next run takes it
            again = _htmapper(job, "-q", "-j", "1", "-C", "true", "small/in-@3.tar", "out2/o-@3.tar")
            assert again.returncode == 0, again.stderr.decode(errors="replace")
            left = {name: pid for name, pid in _roots(tmp).items() if not _alive(pid)}
        assert left == {}, err.decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _sample_roots(tmp):
    """Sample roots in ``tmp``: one of a dead process (to remove) and three to keep: one of this
    live process, one oddly named, and one of a dead pid but locked (a live process in another
    pid namespace sharing the dir; the caller locks it). ``(dead pid, dead, live, odd, locked)``."""
    dead = _dead_pid()
    dead_root = tmp / f"tarproc-{dead}-0123456789ab"
    (dead_root / "sample-1").mkdir(parents=True)
    (dead_root / "sample-1" / "sample.txt").write_bytes(b"x")
    live_root = tmp / f"tarproc-{os.getpid()}-0123456789ab"
    live_root.mkdir()
    odd = tmp / f"tarproc-{dead}-notours"
    odd.mkdir()
    locked = tmp / f"tarproc-{dead}-ba9876543210"
    locked.mkdir()
    return dead, dead_root, live_root, odd, locked


@pytest.mark.timeout(90)
def test_rerun_removes_what_a_killed_run_left_and_nothing_else(job):
    out, tmp = job / "out", job / "tmp"
    out.mkdir()
    stale = [".o-0.tar.tmp-abc", ".o-2.tar.tmp-uthjfcv_"]
    others = [".o-0.tar.tmp-a.b", ".o-9.tar.tmp-abc", "o-0.tar.tmp-abc", ".x.tmp-abc", "notes.txt"]
    for name in stale + others:
        (out / name).write_bytes(b"partial")
    (out / ".o-1.tar.tmp-dir").mkdir()  # not a file: not ours
    dead, dead_root, live_root, odd, locked = _sample_roots(tmp)
    fd = os.open(locked, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        proc = _htmapper(job, "-q", "-j", "1", "-C", "cat sample.txt > /dev/null",
                         "small/in-@3.tar", "out/o-@3.tar")
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    finally:
        os.close(fd)
    names = set(os.listdir(out))
    assert {"o-0.tar", "o-1.tar", "o-2.tar"} <= names
    assert not names & set(stale)
    assert set(others) <= names and ".o-1.tar.tmp-dir" in names
    assert not dead_root.exists()
    assert live_root.exists() and odd.exists() and locked.exists()
    assert not [n for n in _roots(tmp) if n not in (live_root.name, locked.name)]


@pytest.mark.timeout(90)
def test_failing_command_stderr_in_error_line_logs_and_stats(job):
    proc = _htmapper(job, "-q", "-j", "1", "--retries", "0", "-C",
                     "echo first line >&2; echo bad thing >&2; exit 2",
                     "small/in-@3.tar", "hfail/o-@3.tar", "--log-dir", "hlogs", "--stats", "stats.json")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err
    failed = [line for line in err.splitlines() if line.startswith("htmapper: failed: ")]
    assert len(failed) == 3, err
    for line in failed:
        assert "command exited with status 2" in line and "first line | bad thing" in line, line
    logs = sorted((job / "hlogs").iterdir())
    assert len(logs) == 3
    for log in logs:
        text = log.read_text()
        assert "bad thing" in text and "first line\nbad thing\n" in text, text
    stats = json.loads((job / "stats.json").read_text())
    assert len(stats["failed"]) == 3
    assert all("bad thing" in f["error"] for f in stats["failed"])
    assert _temp_files(job / "hfail") == []
    assert list(_roots(job / "tmp")) == []


@pytest.mark.timeout(90)
def test_stderr_in_error_line_is_bounded(job):
    cmd = "for i in $(seq 1 50); do printf 'line %d %0200d\\n' $i 0 >&2; done; exit 3"
    proc = _htmapper(job, "-q", "-j", "1", "--retries", "0", "-C", cmd, "small/in-@1.tar", "o-@1.tar")
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err
    (line,) = [line for line in err.splitlines() if line.startswith("htmapper: failed: ")]
    assert "line 50 " in line and "line 47 " not in line and len(line) < 800, line
