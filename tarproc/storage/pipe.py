"""``pipe:COMMAND``: read a shell command's standard output or write its standard input.

The command runs under ``bash -c`` in its own process group. Its exit status is part of the
stream: a reader that reaches the end of the output, and a writer that commits, both fail with
StorageError when the command exits non-zero, so a failing command never looks like a short but
valid stream.
"""

import io
import os
import signal
import subprocess

from tarproc.storage.base import RawReader, Writer, fail

_SIGPIPE_STATUSES = (-signal.SIGPIPE, 128 + signal.SIGPIPE)


def _command(url):
    return url[len("pipe:") :]


def _start(url, **streams):
    try:
        return subprocess.Popen(
            ["bash", "-c", _command(url)], start_new_session=True, bufsize=0, **streams
        )
    except OSError as exc:
        raise fail("cannot start", url, exc) from exc


def _describe(status):
    if status < 0:
        try:
            return f"command killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"command killed by signal {-status}"
    return f"command exited with status {status}"


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


class PipeReader(RawReader):
    """The standard output of a command.

    Reaching the end of the output waits for the command and raises StorageError on a non-zero
    exit. Closing before the end stops the command without an error (the reader chose to stop
    early), unless the command had already failed on its own by then.
    """

    def __init__(self, url):
        super().__init__(url)
        self.proc = _start(url, stdout=subprocess.PIPE)
        self._eof = False

    def readinto(self, b):
        if self._eof:
            return 0
        n = self.proc.stdout.readinto(b)
        if n == 0 and len(b) > 0:
            self._eof = True
            status = self.proc.wait()
            if status != 0:
                raise fail("cannot read", self.url, _describe(status))
        return n

    def close(self):
        if self.closed:
            return
        proc = self.proc
        try:
            if not self._eof:
                status = proc.poll()
                proc.stdout.close()
                if status is None:
                    try:
                        proc.wait(timeout=0.2)
                    except subprocess.TimeoutExpired:
                        _kill(proc)
                elif status != 0 and status not in _SIGPIPE_STATUSES:
                    raise fail("cannot read", self.url, _describe(status))
            else:
                proc.stdout.close()
        finally:
            super().close()


def open_read(url):
    return io.BufferedReader(PipeReader(url), buffer_size=1 << 16)


class PipeWriter(Writer):
    """The standard input of a command; commit closes it and requires exit status 0.

    Abort kills the command's process group before it sees the end of its input, so a command
    such as ``curl -T -`` does not complete an upload of partial data. What a command has already
    done by itself cannot be undone.
    """

    def __init__(self, url):
        super().__init__(url)
        self.proc = _start(url, stdin=subprocess.PIPE)

    def _write(self, data):
        try:
            self.proc.stdin.write(data)
        except (BrokenPipeError, ConnectionResetError):
            _kill(self.proc)
            status = self.proc.returncode
            why = _describe(status) if status else "command stopped reading its input"
            raise fail("cannot write", self.url, why) from None
        except OSError as exc:
            raise fail("cannot write", self.url, exc) from exc

    def _commit(self):
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        status = self.proc.wait()
        if status != 0:
            raise fail("cannot write", self.url, _describe(status))

    def _abort(self):
        if self.proc.poll() is None:
            _kill(self.proc)
        try:
            self.proc.stdin.close()
        except OSError:
            pass
