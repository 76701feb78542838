"""Local files, ``file://`` URLs and ``-`` (standard input and output)."""

import glob as _glob
import io
import os
import re
import stat
import sys

from tarproc.storage.base import Writer, fail
from tarproc.storage.urls import is_local, local_path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_read(url):
    """Open a local file for buffered binary reading."""
    path = local_path(url)
    try:
        return open(path, "rb")
    except OSError as exc:
        raise fail("cannot open", url, exc) from exc


def _write_in_place(path):
    """True for a destination to write into as it is, never to replace: a device, FIFO or
    socket (``/dev/null``, ``/dev/stdout``, a named pipe, ``/dev/fd/63`` of a ``>(...)``), or
    anything under ``/dev/`` or ``/proc/``. A temp file renamed over one of those would take its
    place (``-o /dev/null`` would leave a regular file there for every other program)."""
    if path.startswith(("/dev/", "/proc/")):
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def _temp_prefix(base):
    """How the temp file of a write to ``base`` starts (tempfile adds letters, digits, '_')."""
    return f".{base}.tmp-"


_TEMP_SUFFIX = re.compile(r"[a-z0-9_]+")


def remove_temp_files(urls):
    """Remove the temp files that writes to the local ``urls`` left behind; the paths removed.

    A write stopped between its start and its commit (a job interrupted, a worker killed) leaves
    its ``.NAME.tmp-XXXXXXXX`` beside the target (beside the file a link points to). Only regular
    files named so are removed; URLs of other schemes, ``-`` and devices are passed over. Jobs call
    this before their first task and after their last.
    """
    by_dir = {}
    for url in urls:
        if url == "-" or not is_local(url):
            continue
        path = os.path.abspath(local_path(url))
        if _write_in_place(path):
            continue
        if os.path.islink(path):
            path = os.path.realpath(path)
        directory, base = os.path.split(path)
        if base:
            by_dir.setdefault(directory, set()).add(_temp_prefix(base))
    removed = []
    for directory, prefixes in by_dir.items():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            cut = name.rfind(".tmp-") + 5
            if cut < 5 or name[:cut] not in prefixes or not _TEMP_SUFFIX.fullmatch(name[cut:]):
                continue
            path = os.path.join(directory, name)
            try:
                if stat.S_ISREG(os.lstat(path).st_mode):
                    os.unlink(path)
                    removed.append(path)
            except OSError:
                continue
    return removed


def _not_a_dir(directory):
    """The first ancestor of ``directory`` (or itself) that exists and is no directory."""
    parts = os.path.abspath(directory).split(os.sep)
    for i in range(2, len(parts) + 1):
        path = os.sep.join(parts[:i])
        if os.path.exists(path) and not os.path.isdir(path):
            return path
    return directory


class LocalWriter(Writer):
    """Writes to ``.NAME.tmp-XXXX`` beside the target and renames it into place on commit.

    The rename is atomic within a filesystem, so a reader sees either no file or the complete
    one; an aborted or crashed write leaves at most the hidden temp file (removed on abort).
    A symbolic link stays a link: the file it points to is the one replaced. A device, FIFO or
    socket (see :func:`_write_in_place`) is written into directly, as standard output is: what
    was written before an abort cannot be taken back there.
    """

    def __init__(self, url, fsync=False):
        super().__init__(url)
        self.path = os.path.abspath(local_path(url))
        self.fsync = fsync
        self.tmp = None
        directory, base = os.path.split(self.path)
        if not base:
            raise fail("cannot write", url, "not a file name")
        if _write_in_place(self.path):
            try:
                self.file = open(self.path, "wb", buffering=1 << 20)
            except OSError as exc:
                raise fail("cannot write", url, exc) from exc
            return
        if os.path.isdir(self.path):
            raise fail("cannot write", url, "is a directory")
        if os.path.islink(self.path):
            self.path = os.path.realpath(self.path)
            directory, base = os.path.split(self.path)
        try:
            try:
                os.makedirs(directory, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise fail("cannot write", url, f"{_not_a_dir(directory)} is not a directory") from None
            import tempfile  # (~4 ms of imports, random and more, only writers need)

            fd, self.tmp = tempfile.mkstemp(prefix=_temp_prefix(base), dir=directory)
            os.fchmod(fd, 0o666 & ~_umask())
        except OSError as exc:
            raise fail("cannot write", url, exc) from exc
        self.file = os.fdopen(fd, "wb", buffering=1 << 20)

    def _write(self, data):
        try:
            self.file.write(data)
        except BrokenPipeError:
            raise  # a FIFO whose reader went away: the command stops quietly, as `| head` asks
        except OSError as exc:
            raise fail("cannot write", self.url, exc) from exc

    def _commit(self):
        try:
            self.file.flush()
            if self.fsync and self.tmp is not None:
                os.fsync(self.file.fileno())
            self.file.close()
            if self.tmp is None:
                return
            os.replace(self.tmp, self.path)
            if self.fsync:
                dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as exc:
            raise fail("cannot commit", self.url, exc) from exc

    def _abort(self):
        try:
            self.file.close()
        except OSError:
            pass
        if self.tmp is None:
            return
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


class _StdinReader(io.RawIOBase):
    """Standard input as a readable stream whose close leaves the real stdin open."""

    name = "-"

    def __init__(self):
        super().__init__()
        if sys.stdin is None:  # (`<&-`: Python sets it to None)
            raise fail("cannot read", "-", "standard input is closed")
        self._stream = sys.stdin.buffer

    def readable(self):
        return True

    def readinto(self, b):
        stream = self._stream
        if hasattr(stream, "readinto1"):
            return stream.readinto1(b)
        return stream.readinto(b)


def open_stdin():
    """Standard input, buffered; closing it does not close the process's stdin."""
    return io.BufferedReader(_StdinReader(), buffer_size=1 << 16)


def full_writer(stream):
    """A binary stream that writes all it is given: ``stream`` itself, or, for a raw one, a
    buffered stream on its file descriptor.

    Under ``python -u`` or ``PYTHONUNBUFFERED=1`` (set in many containers and CI machines),
    ``sys.stdout.buffer`` is a raw ``FileIO`` whose ``write`` makes one system call and may take
    only part of the data when the other end of a pipe is slow; the rest would be lost silently.
    """
    if isinstance(stream, io.RawIOBase):
        try:
            fd = stream.fileno()
        except (OSError, ValueError, AttributeError):
            return stream
        return io.BufferedWriter(io.FileIO(fd, "wb", closefd=False), buffer_size=1 << 16)
    return stream


class StdoutWriter(Writer):
    """Standard output. Commit flushes; abort cannot take back what was written."""

    def __init__(self):
        super().__init__("-")
        if sys.stdout is None:  # (`>&-`: Python sets it to None)
            raise fail("cannot write", "-", "standard output is closed")
        self.stream = full_writer(sys.stdout.buffer)

    def _write(self, data):
        try:
            self.stream.write(data)
        except BrokenPipeError:
            raise  # the reader went away (`| head`): the command stops quietly (run_main)
        except OSError as exc:
            raise fail("cannot write", "-", exc) from exc

    def _commit(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise fail("cannot write", "-", exc) from exc

    def _abort(self):
        try:
            self.stream.flush()
        except OSError:
            pass


def exists(url):
    return os.path.exists(local_path(url))


def committed(url):
    try:
        st = os.stat(local_path(url))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise fail("cannot check", url, exc) from exc
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def size(url):
    try:
        return os.stat(local_path(url)).st_size
    except OSError as exc:
        raise fail("cannot stat", url, exc) from exc


def remove(url):
    try:
        os.unlink(local_path(url))
    except OSError as exc:
        raise fail("cannot remove", url, exc) from exc


def _join(url, name):
    return url + name if url.endswith("/") else url + "/" + name


def listdir(url):
    """Entries of a directory, or the files whose path starts with ``url`` (a prefix)."""
    path = local_path(url)
    try:
        if os.path.isdir(path):
            return sorted(_join(url, name) for name in os.listdir(path))
        parent_url, _, base = url.rpartition("/")
        parent = os.path.dirname(path) or "."
        names = sorted(n for n in os.listdir(parent) if n.startswith(base))
    except OSError as exc:
        raise fail("cannot list", url, exc) from exc
    if not parent_url and not url.startswith("/"):
        return names
    return [(parent_url or "") + "/" + n for n in names]


def glob(pattern):
    path = local_path(pattern)
    matches = sorted(_glob.glob(path))
    if path != pattern:  # a file:// URL: answer in the same form
        prefix = pattern[: len(pattern) - len(path)]
        return [prefix + m for m in matches]
    return matches
