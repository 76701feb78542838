"""One sample in one private temp dir, processed by one shell command or script.

A :class:`ShellRunner` is a small, picklable configuration that is called once per sample. It
unpacks the sample into a fresh directory (``__key__``, ``__source__``, ``sample.EXT`` per
field), runs the command there in its own session, and reads the result back: the possibly
rewritten ``__key__`` plus every ``sample.*`` file. Keys reach the command only through files and
the environment (``TARPROC_KEY``, ``TARPROC_INDEX``, ``TARPROC_SOURCE``), never its command line.

Per-process state (the private root directory under the temp base, the buffers that capture
stdout and stderr, a copy of a script file) is created lazily in the process that runs samples,
so the same object can be sent to pool workers or Dask workers that share no filesystem with the
process that built it.
"""

from __future__ import annotations

import atexit
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field

from tarproc.errors import SampleFailed, UnsafeNameError

__all__ = [
    "SampleResult",
    "ShellRunner",
    "default_tmpdir",
    "check_key",
    "check_ext",
    "stderr_tail",
]

#: /dev/shm is used for temp dirs only if it has at least this much free space.
SHM_MIN_FREE = 256 * 1024 * 1024
#: How many trailing lines of stderr a SampleFailed carries.
TAIL_LINES = 10

_CONTROL = frozenset(chr(c) for c in range(32)) | {"\x7f"}
_BAD_CHARS = re.compile("[\x00-\x1f\x7f]")


@dataclass(slots=True)
class SampleResult:
    """What processing one input sample produced.

    ``outputs`` holds zero (dropped), one, or several (subdirs, lists) output samples; ``stdout``
    and ``stderr`` are what the command or the Python code printed, for the caller to route.
    """

    outputs: list = field(default_factory=list)
    stdout: bytes = b""
    stderr: bytes = b""


def check_key(key, what="key"):
    """Return ``key`` if it is a safe sample key, else raise UnsafeNameError.

    Keys may contain ``/`` (webdataset keys can name directories) but no ``..`` component, no
    leading ``/``, no control characters, and must not be empty: they become tar member names.
    """
    if not isinstance(key, str):
        raise UnsafeNameError(f"{what} must be a string, not {type(key).__name__}: {key!r}")
    if not key:
        raise UnsafeNameError(f"empty {what}")
    if key.startswith("/"):
        raise UnsafeNameError(f"absolute {what} refused: {key!r}")
    if not key.isprintable() and _BAD_CHARS.search(key):
        raise UnsafeNameError(f"{what} with control characters refused: {key!r}")
    if ".." in key and ".." in key.split("/"):
        raise UnsafeNameError(f"{what} with a '..' component refused: {key!r}")
    return key


def check_ext(ext, key=None):
    """Return ``ext`` if it can be a file name suffix (no ``/``, no control chars, not empty)."""
    where = f" in sample {key!r}" if key is not None else ""
    if not isinstance(ext, str) or not ext:
        raise UnsafeNameError(f"bad field name{where}: {ext!r}")
    if "/" in ext or not _CONTROL.isdisjoint(ext) or ext in (".", ".."):
        raise UnsafeNameError(f"unsafe field name{where} refused: {ext!r}")
    return ext


def stderr_tail(data, lines=TAIL_LINES):
    """The last ``lines`` lines of ``data`` (bytes or str) as text, for one-line error reports."""
    if isinstance(data, bytes):
        data = data[-65536:].decode("utf-8", "replace")
    return "\n".join(data.rstrip("\n").split("\n")[-lines:]) if data.strip() else ""


def default_tmpdir(min_free=SHM_MIN_FREE):
    """The base directory for sample temp dirs when none is given.

    ``$TMPDIR`` if set (the user asked for it); else ``/dev/shm`` when it exists, is writable and
    has ``min_free`` bytes free (tmpfs makes per-sample file work about twice as fast as disk);
    else the platform default of :mod:`tempfile`.
    """
    env = os.environ.get("TMPDIR")
    if env:
        return env
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
            st = os.statvfs(shm)
            if st.f_bavail * st.f_frsize >= min_free:
                return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def _as_bytes(value, key, ext):
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise SampleFailed(
        f"sample {key!r}: field {ext!r} is {type(value).__name__}, not bytes",
        key=key,
        status="badvalue",
    )


def _write_file(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        os.close(fd)


def _read_file(path):
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1) if size else b""
        if len(data) <= size:  # short read or a file still growing: read to EOF
            chunks = [data]
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            data = b"".join(chunks)
        return data
    finally:
        os.close(fd)


def _drain_fd(fd):
    """Read everything written to the capture file ``fd`` and empty it for the next sample."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    if size:
        os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return data


class ShellRunner:
    """Run a shell command (or a script file) once per sample, in a fresh private temp dir.

    Give exactly one of ``command`` (run as ``[shell, "-c", command]``) or ``script`` (a path
    whose bytes are read now and carried with the object; it runs by its shebang, or with
    ``interpreter`` — a command line such as ``"python3 -u"`` — or with ``shell`` when it has no
    shebang). ``basename`` names the field files (``sample.jpg``). ``tmpdir`` is the base for temp
    dirs (default: :func:`default_tmpdir`, resolved in the process that runs samples).
    ``timeout`` seconds per sample, after which the command's whole process group is killed.
    ``subdirs``: each subdirectory holding ``__key__`` and ``BASENAME.*`` files is one more output
    sample. ``add_log``: store the command's stdout in the (first) output sample under this field
    name. ``keep_dirs``: leave temp dirs in place for debugging. ``env``: extra environment.

    Background processes a command leaves behind are killed when it exits, so nothing keeps
    writing into a temp dir that is being removed.
    """

    def __init__(
        self,
        command=None,
        *,
        script=None,
        interpreter=None,
        shell="bash",
        basename="sample",
        tmpdir=None,
        timeout=None,
        subdirs=False,
        add_log=None,
        keep_dirs=False,
        env=None,
    ):
        if (command is None) == (script is None):
            raise ValueError("give exactly one of command or script")
        if not basename or "/" in basename or not _CONTROL.isdisjoint(basename):
            raise ValueError(f"bad basename: {basename!r}")
        if basename.startswith("__"):
            raise ValueError(f"basename may not start with '__': {basename!r}")
        if add_log is not None:
            check_ext(add_log)
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        self.command = command
        self.script_name = None
        self.script_bytes = None
        if script is not None:
            with open(script, "rb") as f:
                self.script_bytes = f.read()
            self.script_name = os.path.basename(script) or "script"
        self.interpreter = interpreter
        self.shell = shell
        self.basename = basename
        self.tmpdir = tmpdir
        self.timeout = timeout
        self.subdirs = bool(subdirs)
        self.add_log = add_log
        self.keep_dirs = bool(keep_dirs)
        self.env = dict(env) if env else None
        self._local = None

    # ----------------------------------------------------------------- pickling / process state

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_local"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def _state(self):
        """Per-process state, created on first use in each process (and again after a fork)."""
        local = self._local
        if local is not None and local.pid == os.getpid():
            return local
        local = _ProcessState(self)
        self._local = local
        return local

    @property
    def root(self):
        """This process's private directory that holds the per-sample temp dirs."""
        return self._state().root

    def close(self):
        """Remove this process's private root directory and release the capture buffers.

        Idempotent; a later :meth:`run` starts afresh.
        """
        local = self._local
        self._local = None
        if local is not None and local.pid == os.getpid():
            local.close()

    def cleanup_process(self, pid):
        """Remove private root dirs left by a process ``pid`` that was killed without cleanup."""
        base = self.tmpdir or default_tmpdir()
        prefix = f"tarproc-{pid}-"
        try:
            names = os.listdir(base)
        except OSError:
            return
        for name in names:
            if name.startswith(prefix):
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)

    # ----------------------------------------------------------------- per sample

    def __call__(self, sample, index=0):
        return self.run(sample, index)

    def run(self, sample, index=0):
        """Process one sample; return a :class:`SampleResult`.

        Raises UnsafeNameError for a key or field name that is not safe, SampleFailed for a
        non-zero exit, a timeout, or an unusable result. The temp dir is removed in every case
        (unless ``keep_dirs``), also when interrupted.
        """
        key = sample.get("__key__")
        check_key(key)
        files = []
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            check_ext(ext, key)
            files.append((ext, _as_bytes(value, key, ext)))
        source = sample.get("__url__") or "-"
        if not isinstance(source, str):
            source = str(source)

        local = self._state()
        local.counter += 1
        workdir = f"{local.root}/{local.counter}"
        os.mkdir(workdir, 0o700)
        try:
            _write_file(workdir + "/__key__", key.encode("utf-8"))
            _write_file(workdir + "/__source__", source.encode("utf-8"))
            prefix = f"{workdir}/{self.basename}."
            for ext, data in files:
                _write_file(prefix + ext, data)

            env = local.env.copy()
            env["TARPROC_KEY"] = key
            env["TARPROC_INDEX"] = str(index)
            env["TARPROC_SOURCE"] = source
            status = local.execute(workdir, env, self.timeout)
            stdout = _drain_fd(local.out_fd)
            stderr = _drain_fd(local.err_fd)
            if status != 0:
                if status == "timeout":
                    msg = f"sample {key!r}: timed out after {self.timeout:g} s"
                elif status < 0:
                    msg = f"sample {key!r}: command killed by signal {-status}"
                else:
                    msg = f"sample {key!r}: command exited with status {status}"
                exc = SampleFailed(msg, key=key, status=status, stderr_tail=stderr_tail(stderr))
                exc.stdout = stdout
                exc.stderr = stderr
                raise exc
            outputs = self._collect(workdir, key, sample, stdout)
            return SampleResult(outputs, stdout, stderr)
        finally:
            if not self.keep_dirs:
                _remove_tree(workdir)

    def _collect(self, workdir, in_key, sample, stdout):
        """Read the output samples back from ``workdir`` (and its subdirs)."""
        url = sample.get("__url__")
        outputs = []
        main, subdirs = self._read_sample_dir(workdir, in_key, url, want_subdirs=self.subdirs)
        if main is not None:
            outputs.append(main)
        for name in sorted(subdirs):
            sub, _ = self._read_sample_dir(f"{workdir}/{name}", None, url, want_subdirs=False)
            if sub is not None:
                outputs.append(sub)
        if self.add_log is not None and outputs:
            first = outputs[0]
            if self.add_log in first:
                raise SampleFailed(
                    f"sample {in_key!r}: --add-log field {self.add_log!r} "
                    "was also written by the command",
                    key=in_key,
                    status="conflict",
                )
            first[self.add_log] = stdout
        return outputs

    def _read_sample_dir(self, path, default_key, url, want_subdirs):
        """One sample from one directory: ``(sample_or_None, [subdir names])``.

        The key is the ``__key__`` file (trailing newlines stripped); without that file, the
        ``default_key`` (None for subdirs: a subdir without ``__key__`` is not a sample).
        """
        prefix = self.basename + "."
        plen = len(prefix)
        fields = {}
        subdirs = []
        has_key = False
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(prefix) and len(name) > plen:
                    if entry.is_file():
                        fields[name[plen:]] = _read_file(entry.path)
                elif name == "__key__":
                    has_key = True
                elif want_subdirs and entry.is_dir(follow_symlinks=False):
                    subdirs.append(name)
        if not fields:
            return None, subdirs
        if has_key:
            try:
                key = _read_file(path + "/__key__").decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise SampleFailed(
                    f"sample {default_key!r}: __key__ written by the command is not UTF-8",
                    key=default_key,
                    status="badkey",
                ) from None
        elif default_key is not None:
            key = default_key
        else:
            return None, subdirs
        check_key(key, "key written by the command")
        out = {"__key__": key}
        if url is not None:
            out["__url__"] = url
        for ext in sorted(fields):
            check_ext(ext, key)
            out[ext] = fields[ext]
        return out, subdirs

    def __repr__(self):
        what = f"command={self.command!r}" if self.command is not None else f"script={self.script_name!r}"
        return f"ShellRunner({what}, basename={self.basename!r})"


def _remove_tree(path):
    """Remove a sample dir: flat dirs with plain files the fast way, anything else by rmtree."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    raise IsADirectoryError(entry.path)
                os.unlink(entry.path)
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


class _ProcessState:
    """Everything a ShellRunner needs in the process that runs it; never pickled."""

    def __init__(self, runner):
        self.pid = os.getpid()
        self.counter = 0
        base = runner.tmpdir or default_tmpdir()
        os.makedirs(base, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix=f"tarproc-{self.pid}-", dir=base)
        os.chmod(self.root, 0o700)
        self.out_fd = self._capture_fd("stdout")
        self.err_fd = self._capture_fd("stderr")
        env = dict(os.environ)
        if runner.env:
            env.update(runner.env)
        self.env = env
        if runner.command is not None:
            self.argv = [runner.shell, "-c", runner.command]
        else:
            script = os.path.join(self.root, "script-" + runner.script_name)
            _write_file(script, runner.script_bytes)
            os.chmod(script, stat.S_IRWXU)
            if runner.interpreter:
                self.argv = shlex.split(runner.interpreter) + [script]
            elif runner.script_bytes.startswith(b"#!"):
                self.argv = [script]
            else:
                self.argv = [runner.shell, script]
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._closed = False
        atexit.register(self.close)

    def _capture_fd(self, name):
        if hasattr(os, "memfd_create"):
            try:
                return os.memfd_create(f"tarproc-{name}", os.MFD_CLOEXEC)
            except OSError:
                pass
        path = os.path.join(self.root, "." + name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        return fd

    def execute(self, workdir, env, timeout):
        """Run the command in ``workdir``; its exit status, negative for a signal, or "timeout"."""
        proc = subprocess.Popen(
            self.argv,
            cwd=workdir,
            env=env,
            stdin=self.devnull,
            stdout=self.out_fd,
            stderr=self.err_fd,
            close_fds=True,
            start_new_session=True,
        )
        pid = proc.pid
        try:
            if timeout is not None and not _wait_exit(pid, timeout):
                _killpg(pid)
                proc.wait()
                return "timeout"
            status = proc.wait()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM turned into SystemExit): take the command with us.
            _killpg(pid)
            try:
                proc.wait()
            except BaseException:
                pass
            raise
        _killpg(pid)  # anything the command left running in the background
        return status

    def close(self):
        if self._closed:
            return
        self._closed = True
        for fd in (self.out_fd, self.err_fd, self.devnull):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass


def _killpg(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_exit(pid, timeout):
    """Wait until process ``pid`` exits or ``timeout`` seconds pass; True if it exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is None:
        import time

        deadline = time.monotonic() + timeout
        delay = 0.0002
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(pidfd)
