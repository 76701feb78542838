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
import itertools
import os
import re
import select
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

from tarproc.errors import SampleFailed, UnsafeNameError

__all__ = [
    "SampleResult",
    "ShellRunner",
    "default_tmpdir",
    "check_key",
    "check_ext",
    "stderr_tail",
    "private_cwd",
]

#: /dev/shm is used for temp dirs only if it has at least this much free space.
SHM_MIN_FREE = 256 * 1024 * 1024
#: How many trailing lines of stderr a SampleFailed carries.
TAIL_LINES = 10

_STATE_LOCK = threading.Lock()
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


def _write_file(path, data, mtime_ns=None):
    """Create ``path`` holding ``data``; with ``mtime_ns``, set its times and return its inode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        n = os.write(fd, data) if data else 0
        if n < len(data):
            view = memoryview(data)[n:]
            while view:
                n = os.write(fd, view)
                view = view[n:]
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            return os.fstat(fd).st_ino
        return None
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
    ``collect=False``: the caller does not want the output data (``tarproc`` without ``-o``): the
    output samples are found and counted as usual, but their fields are not read (their values,
    and the ``add_log`` field's, are None), which saves reading every file back.

    One runner may be used by several threads at once (the pool runs shell commands from
    threads): each call gets its own temp dir and its own capture buffers.

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
        collect=True,
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
        self.collect = bool(collect)
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
        with _STATE_LOCK:  # threads of a pool start together: one state for them all
            local = self._local
            if local is None or local.pid != os.getpid():
                local = self._local = _ProcessState(self)
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

    #: The pool runs this runner in threads rather than worker processes: the work is in the
    #: commands, and spawning and waiting release the GIL (no samples pickled between processes).
    pool_threads = True

    def thread_init(self):
        """Called once by each pool thread before its first sample (see :func:`private_cwd`)."""
        private_cwd()

    def kill_running(self):
        """Kill the process groups of the commands this process runs now, from any thread."""
        local = self._local
        if local is not None and local.pid == os.getpid():
            local.kill_all()

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
        (unless ``keep_dirs``), also when interrupted. Safe to call from several threads at once.

        The same in steps, for callers that overlap the work of several samples (the pool's
        threads prepare the next sample's dir while a command runs): :meth:`prepare`,
        :meth:`launch`, :meth:`finish`, and :meth:`cleanup` always, in a ``finally``.
        """
        job = self.prepare(sample, index)
        try:
            self.launch(job)
            return self.finish(job)
        finally:
            self.cleanup(job)

    def prepare(self, sample, index=0):
        """Check the sample and write its temp dir; a job for :meth:`launch`.

        Raises UnsafeNameError or SampleFailed (a field that is not bytes); the dir is then
        already removed.
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
        workdir = f"{local.root}/{next(local.counter)}"
        os.mkdir(workdir, 0o700)
        job = _Job(sample, key, index, source, workdir, local)
        try:
            _write_file(workdir + "/__key__", key.encode("utf-8"))
            _write_file(workdir + "/__source__", source.encode("utf-8"))
            prefix = f"{workdir}/{self.basename}."
            if self.collect:
                # Files the command leaves untouched are not read back: their bytes are reused.
                # A write always sets the mtime to the present, so marking ours one second in the
                # past tells them apart (with the inode and the size) on a coarse clock too.
                written = job.written = {}
                mark = job.mark = time.time_ns() - 1_000_000_000
                for ext, data in files:
                    written[_write_file(prefix + ext, data, mark)] = data
            else:
                for ext, data in files:
                    _write_file(prefix + ext, data)
        except BaseException:
            self.cleanup(job)
            raise
        return job

    def launch(self, job):
        """Start the command of a prepared job (it runs in the background)."""
        local = job.local
        env = local.env.copy()
        env[b"TARPROC_KEY"] = job.key.encode("utf-8", "surrogateescape")
        env[b"TARPROC_INDEX"] = str(job.index).encode()
        env[b"TARPROC_SOURCE"] = job.source.encode("utf-8", "surrogateescape")
        job.slot = local.acquire()
        job.pid, job.proc = local.spawn(job.workdir, env, job.slot)

    def finish(self, job):
        """Wait for a launched job's command; its :class:`SampleResult` or SampleFailed."""
        self.reap(job)
        return self.collect_outputs(job)

    def reap(self, job):
        """Wait for a launched job's command and take its output; SampleFailed if it failed.

        The first half of :meth:`finish`; :meth:`collect_outputs` is the second.
        """
        local = job.local
        key = job.key
        pid, job.pid = job.pid, None  # from now on wait() answers for the command
        status = local.wait(pid, job.proc, self.timeout)
        slot = job.slot
        stdout = job.stdout = _drain_fd(slot[0])
        stderr = job.stderr = _drain_fd(slot[1])
        job.slot = None
        local.release(slot)
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

    def collect_outputs(self, job):
        """The :class:`SampleResult` of a job that :meth:`reap` found successful."""
        job.names = []
        outputs = self._collect(job.workdir, job.key, job.sample, job.stdout, job.written,
                                job.mark, job.names)
        return SampleResult(outputs, job.stdout, job.stderr)

    def cleanup(self, job):
        """Kill a job's command if it still runs, and remove its temp dir (unless keep_dirs)."""
        local = job.local
        if job.pid is not None:
            pid, job.pid = job.pid, None
            _killpg(pid)
            try:
                _reap(pid, job.proc)
            except ChildProcessError:
                pass
            finally:
                local.running.discard(pid)
        if job.slot is not None:
            slot, job.slot = job.slot, None
            local.discard(slot)
        if not self.keep_dirs and job.workdir is not None:
            workdir, job.workdir = job.workdir, None
            if job.names is not None:
                _remove_listed(workdir, job.names)
            else:
                _remove_tree(workdir)

    def _collect(self, workdir, in_key, sample, stdout, written=None, mark=None, names=None):
        """Read the output samples back from ``workdir`` (and its subdirs).

        ``written`` maps the inodes of the files written for the command to their bytes, ``mark``
        is the mtime they were given: a file still matching is not read again. ``names``, when a
        list, receives the entries of ``workdir`` if it holds only files (else it is cleared).
        """
        url = sample.get("__url__")
        outputs = []
        main, subdirs = self._read_sample_dir(
            workdir, in_key, url, self.subdirs, written, mark, names
        )
        if main is not None:
            outputs.append(main)
        for name in sorted(subdirs):
            sub, _ = self._read_sample_dir(f"{workdir}/{name}", None, url, False, written, mark)
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
            first[self.add_log] = stdout if self.collect else None
        return outputs

    def _read_sample_dir(self, path, default_key, url, want_subdirs, written=None, mark=None,
                         names=None):
        """One sample from one directory: ``(sample_or_None, [subdir names])``.

        The key is the ``__key__`` file (trailing newlines stripped); without that file, the
        ``default_key`` (None for subdirs: a subdir without ``__key__`` is not a sample). Without
        ``collect``, field files are listed but not read: their values are None.
        """
        prefix = self.basename + "."
        plen = len(prefix)
        collect = self.collect
        fields = {}
        subdirs = []
        has_key = False
        flat = True
        with os.scandir(path) as entries:
            for entry in entries:
                name = entry.name
                if names is not None:
                    names.append(name)
                if name.startswith(prefix) and len(name) > plen:
                    if entry.is_file():
                        if not collect:
                            fields[name[plen:]] = None
                            continue
                        data = None
                        if written:
                            st = entry.stat()
                            data = written.get(st.st_ino)
                            if data is not None and (
                                st.st_mtime_ns != mark
                                or st.st_size != len(data)
                                or not entry.is_file(follow_symlinks=False)
                            ):
                                data = None
                        fields[name[plen:]] = _read_file(entry.path) if data is None else data
                    elif flat and entry.is_dir(follow_symlinks=False):
                        flat = False
                elif name == "__key__":
                    has_key = True
                elif want_subdirs and entry.is_dir(follow_symlinks=False):
                    subdirs.append(name)
                    flat = False
                elif flat and entry.is_dir(follow_symlinks=False):
                    flat = False
        if names is not None and not flat:
            names.clear()
            names.append(None)  # not flat: remove by the general path
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


def _remove_listed(path, names):
    """Remove a sample dir whose entries ``names`` (plain files, no subdirs) are already known."""
    if names and names[0] is None:
        _remove_tree(path)
        return
    try:
        for name in names:
            os.unlink(f"{path}/{name}")
        os.rmdir(path)
    except OSError:
        _remove_tree(path)


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


class _Job:
    """One sample between :meth:`ShellRunner.prepare` and :meth:`ShellRunner.cleanup`."""

    __slots__ = ("sample", "key", "index", "source", "workdir", "local", "written", "mark",
                 "slot", "pid", "proc", "names", "stdout", "stderr")

    def __init__(self, sample, key, index, source, workdir, local):
        self.sample = sample
        self.key = key
        self.index = index
        self.source = source
        self.workdir = workdir
        self.local = local
        self.written = None
        self.mark = None
        self.slot = None
        self.pid = None
        self.proc = None
        self.names = None
        self.stdout = b""
        self.stderr = b""


class _ProcessState:
    """Everything a ShellRunner needs in the process that runs it; never pickled.

    Shared by the threads of that process: the temp dir counter is an ``itertools.count`` (atomic
    under the GIL), capture buffers are pairs of memfds taken from and given back to a free list,
    and ``running`` holds the process groups of the commands now running (see :meth:`kill_all`).
    """

    def __init__(self, runner):
        self.pid = os.getpid()
        self.counter = itertools.count(1)
        base = runner.tmpdir or default_tmpdir()
        os.makedirs(base, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix=f"tarproc-{self.pid}-", dir=base)
        os.chmod(self.root, 0o700)
        self._free = []  # capture pairs (stdout fd, stderr fd) not in use
        self._all = []  # every capture fd, for close()
        self.running = set()
        env = dict(os.environ)
        if runner.env:
            env.update(runner.env)
        # Encoded once: each spawn then only adds the three TARPROC_* variables.
        self.env = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
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
        self._spawn_argv = None
        self.direct = _direct_command(runner, self.env)
        self._closed = False
        atexit.register(self.close)

    # ------------------------------------------------------------ capture buffers

    @property
    def out_fd(self):  # the first capture pair, for callers that look at it directly
        if not self._all:
            self.release(self.acquire())
        return self._all[0]

    @property
    def err_fd(self):
        if not self._all:
            self.release(self.acquire())
        return self._all[1]

    def acquire(self):
        """A pair of empty capture fds (stdout, stderr) for one command."""
        try:
            return self._free.pop()
        except IndexError:
            pair = (self._capture_fd("stdout"), self._capture_fd("stderr"))
            self._all.extend(pair)
            return pair

    def release(self, pair):
        """Give back a pair that was drained (empty, offset 0)."""
        self._free.append(pair)

    def discard(self, pair):
        """Give back a pair in an unknown state (interrupted): empty it first."""
        try:
            for fd in pair:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
        except OSError:
            return
        self._free.append(pair)

    def _capture_fd(self, name):
        if hasattr(os, "memfd_create"):
            try:
                return os.memfd_create(f"tarproc-{name}", os.MFD_CLOEXEC)
            except OSError:
                pass
        fd, path = tempfile.mkstemp(prefix="." + name, dir=self.root)
        os.unlink(path)
        return fd

    # ------------------------------------------------------------ running commands

    def execute(self, workdir, env, timeout, slot=None):
        """Run the command in ``workdir``; its exit status, negative for a signal, or "timeout"."""
        if slot is None:
            slot = (self.out_fd, self.err_fd)
        pid, proc = self.spawn(workdir, env, slot)
        return self.wait(pid, proc, timeout)

    def spawn(self, workdir, env, slot):
        """Start the command in ``workdir`` in its own session; ``(pid, Popen or None)``."""
        argv = self.argv
        exe = None
        direct = self.direct
        if direct is not None:
            # What bash -c does for a plain simple command, without bash (see _direct_command).
            exe, argv = direct
            env[b"PWD"] = os.fsencode(workdir)
            env[b"_"] = exe
            env.setdefault(b"SHLVL", b"0")
        try:
            if _thread_cwd.private:
                pid = self._posix_spawn(workdir, env, slot, exe, argv)
                proc = None
            else:
                proc = subprocess.Popen(
                    argv,
                    executable=exe,
                    cwd=workdir,
                    env=env,
                    stdin=self.devnull,
                    stdout=slot[0],
                    stderr=slot[1],
                    close_fds=True,
                    start_new_session=True,
                )
                pid = proc.pid
        except OSError:
            if direct is None:
                raise
            # Not runnable directly after all (say, a script without #!): bash knows what to do.
            self.direct = None
            for name in (b"PWD", b"_", b"SHLVL"):
                env.pop(name, None)
                if name in self.env:
                    env[name] = self.env[name]
            return self.spawn(workdir, env, slot)
        self.running.add(pid)
        return pid, proc

    def wait(self, pid, proc, timeout):
        """Wait for a command from :meth:`spawn`; its exit status (see :meth:`execute`).

        Whatever happens, the command's process group is killed on return: background
        processes it left behind, or the command itself when interrupted.
        """
        try:
            if timeout is not None and not _wait_exit(pid, timeout):
                _killpg(pid)
                _reap(pid, proc)
                return "timeout"
            status = _reap(pid, proc)
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM turned into SystemExit): take the command with us.
            _killpg(pid)
            try:
                _reap(pid, proc)
            except BaseException:
                pass
            raise
        finally:
            self.running.discard(pid)
        _killpg(pid)  # anything the command left running in the background
        return status

    def _posix_spawn(self, workdir, env, slot, exe, argv):
        """Start the command with posix_spawn (vfork: cheap); the calling thread has its own cwd."""
        if exe is None:
            resolved = self._spawn_argv
            if resolved is None:
                path = os.fsdecode(self.env.get(b"PATH", os.defpath.encode()))
                exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=path)
                if exe is None:
                    raise FileNotFoundError(2, "No such file or directory", argv[0])
                resolved = self._spawn_argv = (os.fsencode(exe), [os.fsencode(a) for a in argv])
            exe, argv = resolved
        os.chdir(workdir)  # this thread only (see _private_cwd)
        return os.posix_spawn(
            exe,
            argv,
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, self.devnull, 0),
                (os.POSIX_SPAWN_DUP2, slot[0], 1),
                (os.POSIX_SPAWN_DUP2, slot[1], 2),
            ],
            setsid=True,
            setsigdef=_DEFAULT_SIGNALS,
        )

    def kill_all(self):
        """Kill the process groups of all commands running now (from any thread)."""
        for pid in list(self.running):
            _killpg(pid)

    def close(self):
        if self._closed:
            return
        self._closed = True
        for fd in self._all + [self.devnull]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._all = []
        self._free = []
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass


#: Signals Python ignores that a command must get with their default action (as subprocess does).
_DEFAULT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, name)
)


class _ThreadCwd(threading.local):
    private = False


_thread_cwd = _ThreadCwd()


def private_cwd():
    """Give the calling thread a working directory of its own (Linux ``unshare(CLONE_FS)``).

    Then :class:`ShellRunner` starts commands from this thread with ``posix_spawn`` after a
    ``chdir`` into the sample's dir, which does not disturb the process's other threads. Meant
    for threads that only run samples (the pool's); never for the main thread. Returns True if
    it worked; else commands are started with :mod:`subprocess` as usual.
    """
    if _thread_cwd.private:
        return True
    if threading.current_thread() is threading.main_thread() or not hasattr(os, "posix_spawn"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_FS = 0x00000200
        if libc.unshare(CLONE_FS) != 0:
            return False
    except Exception:
        return False
    _thread_cwd.private = True
    return True


#: Bash builtins and reserved words: a command starting with one of them needs bash itself.
_BASH_BUILTINS = frozenset(
    """. : [ [[ ]] ! { } alias bg bind break builtin caller case cd command compgen complete
    compopt continue coproc declare dirs disown do done echo elif else enable esac eval exec exit
    export false fc fg fi for function getopts hash help history if in jobs kill let local logout
    mapfile popd printf pushd pwd read readarray readonly return select set shift shopt source
    suspend test then time times trap true type typeset ulimit umask unalias unset until wait
    while""".split()
)
#: A word bash passes through unchanged: no quoting, expansion, globbing, redirection or operator.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./:=,+@%-]+")
#: Variables that make bash do something before running a command (startup file, tracing...).
_BASH_ENV_VARS = (b"BASH_ENV", b"ENV", b"SHELLOPTS", b"BASHOPTS", b"BASH_XTRACEFD", b"POSIXLY_CORRECT")


def _direct_command(runner, env):
    """``(exe, argv)`` when ``bash -c COMMAND`` would just exec one program, else None.

    That is: the shell is bash, the command is plain words separated by blanks (characters that
    no step of bash's parsing changes), the first is not a builtin, keyword or assignment and is
    found on an absolute ``$PATH``, and nothing in the environment makes bash run code first
    (``BASH_ENV``, exported functions, ``SHELLOPTS``...). Running that program directly, with
    the variables bash would add (``PWD``, ``_``, ``SHLVL``), is what ``bash -c`` amounts to, minus
    bash's start-up (about 1.5-2.5 ms of CPU per sample here, a fifth of a ``convert``).
    """
    command = runner.command
    if command is None or os.path.basename(runner.shell) != "bash" or "\n" in command:
        return None
    words = command.replace("\t", " ").split(" ")
    words = [w for w in words if w]
    if not words or not all(_PLAIN_WORD.fullmatch(w) for w in words):
        return None
    first = words[0]
    if first in _BASH_BUILTINS or "=" in first:
        return None
    if any(name in env for name in _BASH_ENV_VARS):
        return None
    if any(name.startswith(b"BASH_FUNC_") for name in env):
        return None
    path = os.fsdecode(env.get(b"PATH", b""))
    if "/" in first:
        exe = first if os.path.isabs(first) else None
    else:
        dirs = path.split(os.pathsep)
        if not path or not all(os.path.isabs(d) for d in dirs):
            return None  # empty or relative entries are searched from the sample's dir
        exe = shutil.which(first, path=path)
    if exe is None or not os.path.isfile(exe) or not os.access(exe, os.X_OK):
        return None
    return os.fsencode(exe), [os.fsencode(w) for w in words]


def _reap(pid, proc):
    """Wait for ``pid`` (a Popen when ``proc`` is given); its status, negative for a signal."""
    if proc is not None:
        return proc.wait()
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        return os.waitstatus_to_exitcode(status)


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
