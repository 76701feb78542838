"""Progress bars appear on a terminal (and only there): tarproc and a Dask job under a real pty."""

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time

from cli_helpers import BIN, shell_env


def run_on_terminal(argv, cwd, timeout=120, size=(40, 120)):
    """Run argv with stderr on a pseudo-terminal of `size` (rows, columns); return what it
    printed there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    proc = subprocess.Popen(argv, cwd=cwd, env=shell_env({"TERM": "xterm"}), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_tarproc_shows_a_progress_bar_on_a_terminal(imagenet_dir, tmp_path):
    rc, text = run_on_terminal([str(BIN / "tarproc"), "-c", "sleep 0.05", str(imagenet_dir / "imagenet_train-0000.tgz"),
                                "-o", str(tmp_path / "o.tar")], tmp_path)
    assert rc == 0, text
    assert "\r10 samples [" in text and "samples/s" in text and "MB/s]" in text  # a live bar, redrawn
    assert "10 in, 10 out" in text                  # and the summary


def test_a_terminal_without_a_size_still_shows_the_bars(imagenet_dir, tmp_path):
    """Pseudo-terminals of `script` and CI runners report 0x0: the bars are drawn 80 wide."""
    rc, text = run_on_terminal([str(BIN / "tarproc"), "-c", "sleep 0.05", str(imagenet_dir / "imagenet_train-0000.tgz"),
                                "-o", str(tmp_path / "o.tar")], tmp_path, size=(0, 0))
    assert rc == 0 and "\r10 samples [" in text, text
    rc, text = run_on_terminal([str(BIN / "htmapper"), "-j", "1", "-C", "true",
                                str(imagenet_dir / "imagenet_train-@0008.tgz"), str(tmp_path / "o-@8.tar")],
                               tmp_path, size=(0, 0))
    assert rc == 0 and "8/8 [" in text, text


def test_quiet_and_pipes_have_no_bar(imagenet_dir, tmp_path):
    rc, text = run_on_terminal([str(BIN / "tarproc"), "-q", "-c", "true", str(imagenet_dir / "imagenet_train-0000.tgz")],
                               tmp_path)
    assert rc == 0 and text.strip() == ""
    proc = subprocess.run([str(BIN / "tarproc"), "-c", "true", str(imagenet_dir / "imagenet_train-0000.tgz")],
                          capture_output=True, env=shell_env(), cwd=tmp_path)
    assert b"\r" not in proc.stderr and b"10 in, 10 out" in proc.stderr


def test_shard_job_shows_a_bar_and_the_dashboard(imagenet_dir, tmp_path):
    rc, text = run_on_terminal([str(BIN / "htmapper"), "-j", "2", "-C", "sleep 0.1",
                                str(imagenet_dir / "imagenet_train-@0008.tgz"), str(tmp_path / "o-@8.tar")], tmp_path)
    assert rc == 0, text
    assert "htmapper: local cluster with 2 workers" in text and "dashboard: http://127.0.0.1:" in text
    assert "8/8" in text and "\r" in text
    assert "8 shards: 8 done" in text
