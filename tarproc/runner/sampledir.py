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

Where the time goes, per sample, and what keeps it small: the command is started with
``posix_spawn`` called through ctypes (no GIL held while the child starts, and a ``fchdir`` file
action instead of a working directory per thread); a pool thread reuses its sample dirs and the
files in them (renamed, overwritten in place: no pages freed and allocated again, no inodes made
and destroyed); every file operation goes through directory descriptors; files the command did
not touch are not read back, and a dir whose entries it left alone (its mtime is still the mark
prepare gave it) is not even listed; the capture buffers are memfds.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import os
import re
import signal
import stat
import sys
import threading
import time

from tarproc.errors import SampleFailed, TarprocError, UnsafeNameError

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
_CSPAWN_LOCK = threading.Lock()
_CONTROL = frozenset(chr(c) for c in range(32)) | {"\x7f"}
_BAD_CHARS = re.compile("[\x00-\x1f\x7f]")


class Record:
    """A plain record class: fields named by ``_fields`` (``__slots__`` by default), equality
    and repr by field — what a dataclass gives, without importing :mod:`dataclasses` (and
    :mod:`inspect`) at every start."""

    __slots__ = ()

    @property
    def _names(self):
        return getattr(self, "_fields", None) or self.__slots__

    def __repr__(self):
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._names)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._names)

    __hash__ = None


class SampleResult(Record):
    """What processing one input sample produced.

    ``outputs`` holds zero (dropped), one, or several (subdirs, lists) output samples; ``stdout``
    and ``stderr`` are what the command or the Python code printed, for the caller to route.
    """

    __slots__ = ("outputs", "stdout", "stderr")

    def __init__(self, outputs=None, stdout=b"", stderr=b""):
        self.outputs = [] if outputs is None else outputs
        self.stdout = stdout
        self.stderr = stderr


def check_key(key, what="key"):
    """Return ``key`` if it is a safe sample key, else raise UnsafeNameError.

    Keys may contain ``/`` (webdataset keys can name directories) but no ``..`` component, no
    leading ``/``, no control characters, and must not be empty: they become tar member names;
    and no ``.`` after the last ``/``, where a reader splits a member name into key and field.
    """
    if not isinstance(key, str):
        raise UnsafeNameError(f"{what} must be a string, not {type(key).__name__}: {key!r}")
    if not key:
        raise UnsafeNameError(f"{what} is empty")
    if key.startswith("/"):
        raise UnsafeNameError(f"{what} {key!r} refused: absolute")
    if not key.isprintable() and _BAD_CHARS.search(key):
        raise UnsafeNameError(f"{what} {key!r} refused: control characters")
    if ".." in key and ".." in key.split("/"):
        raise UnsafeNameError(f"{what} {key!r} refused: a '..' component")
    base = key[key.rfind("/") + 1:]
    if not base or "." in base:
        raise UnsafeNameError(
            f"{what} {key!r} refused: after its last '/' a key needs at least one character and "
            "no '.' (its members KEY.EXT would not read back as one sample)")
    return key


def check_ext(ext, key=None):
    """Return ``ext`` if it can be a file name suffix (no ``/``, no control chars, not empty)."""
    where = f" in sample {key!r}" if key is not None else ""
    if ext == "" and key is not None:
        raise UnsafeNameError(f"empty field name{where}: its member {key + '.'!r} ends in a dot, "
                              "so it names no field")
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
    import tempfile

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


#: Field names already found safe by check_ext (the same few names come back in every sample).
_SAFE_EXTS = set()

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
_OLD_FILE = os.O_WRONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_SUBDIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
_READ_BACK = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC


#: Descriptors of the roots this process made, each holding a shared ``flock`` on its root while
#: the process lives (see :func:`remove_dead_roots`).
_ROOT_LOCKS = []


def _make_root(base, prefix):
    """A new private (0700) directory in ``base`` named ``prefix`` + random characters.

    The process holds a shared ``flock`` on it until the root is removed or the process ends,
    however it ends: :func:`remove_dead_roots` never takes a locked root, even one whose pid
    means nothing in its pid namespace (a ``base`` shared between containers).
    """
    for _ in range(100):
        path = f"{base}/{prefix}{os.urandom(6).hex()}"
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)  # whatever the umask
        for held in list(_ROOT_LOCKS):  # let go of the locks of roots removed since
            try:
                gone = os.fstat(held).st_nlink == 0
            except OSError:
                gone = False
            if gone:
                try:
                    _ROOT_LOCKS.remove(held)
                except ValueError:
                    continue  # another thread let go of it
                os.close(held)
        if len(_ROOT_LOCKS) < 64:  # (roots kept with keep_dirs stay; so would their locks)
            try:
                import fcntl

                fd = os.open(path, _SUBDIR)
            except (ImportError, OSError):
                fd = -1
            if fd >= 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    _ROOT_LOCKS.append(fd)
                except OSError:  # a filesystem without locks: the pid alone protects the root
                    os.close(fd)
        return os.path.abspath(path)
    raise FileExistsError(f"no free name for a temp dir in {base}")


def _proc_stat(pid):
    """The fields of ``/proc/PID/stat`` after the command name (state first, then ppid, pgrp...);
    None when there is no such process, or no /proc to tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid):
    """True while process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    fields = _proc_stat(pid)
    if fields:
        return fields[0] not in (b"Z", b"X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (PermissionError: a process of another user)
        return True
    return True


def group_members(groups):
    """Pids of the live processes whose process group is one of ``groups`` (Linux /proc)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return set()
    found = set()
    for name in names:
        fields = _proc_stat(name) if name.isdigit() else None
        if fields and len(fields) > 2 and int(fields[2]) in groups and fields[0] not in (b"Z", b"X"):
            found.add(int(name))
    return found


def remove_dead_roots(base=None):
    """Remove the private root dirs in ``base`` (default: :func:`default_tmpdir`) of processes
    that ended without removing them. Never raises for what it finds: jobs call it to tidy up.

    Only directories named as :func:`_make_root` names them for a runner (``tarproc-<pid>-`` and
    12 hex digits), owned by this user, whose process no longer runs (no such pid, or a zombie),
    and on which no process holds the lock :func:`_make_root` takes. A pid reused by another
    process keeps the dir until that process ends too. Returns the paths removed.
    """
    if base is None:
        base = default_tmpdir()
    try:
        import fcntl

        names = os.listdir(base)
    except (ImportError, OSError):
        return []
    me, uid = os.getpid(), os.geteuid()
    removed = []
    for name in names:
        m = re.fullmatch(r"tarproc-([1-9][0-9]{0,9})-[0-9a-f]{12}", name)
        if m is None or int(m.group(1)) == me:
            continue
        pid = int(m.group(1))
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            continue
        if pid_alive(pid):
            continue
        try:
            fd = os.open(path, _SUBDIR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live process holds it
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                continue
            _remove_root(path)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _open_file_budget():
    """How many sample files a process may keep open between samples (a quarter of its limit)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 4096
    except (ImportError, OSError, ValueError):
        soft = 1024
    return max(0, min(1024, soft // 4))


def _which(name, path):
    """The first executable file ``name`` in the directories of ``path`` (as :func:`shutil.which`,
    whose module takes milliseconds to import: bz2, lzma...)."""
    for d in path.split(os.pathsep):
        if not d:
            continue
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _remove_root(path):
    """Remove a private root dir and everything in it, whatever the commands made of it."""
    try:
        fd = os.open(path, _SUBDIR)
    except OSError:
        return
    try:
        _empty_dir(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        import shutil  # something we could not remove our way (a dir without permissions...)

        shutil.rmtree(path, ignore_errors=True)


def _write_all(fd, data):
    n = os.write(fd, data) if data else 0
    if n < len(data):
        view = memoryview(data)[n:]
        while view:
            n = os.write(fd, view)
            view = view[n:]


def _write_file(path, data, mtime_ns=None, dir_fd=None):
    """Create ``path`` holding ``data``; with ``mtime_ns``, set its times and return its inode."""
    fd = os.open(path, _NEW_FILE, 0o644, dir_fd=dir_fd)
    try:
        _write_all(fd, data)
        if mtime_ns is not None:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
            return os.fstat(fd).st_ino
        return None
    finally:
        os.close(fd)


def _refill(fd, data, mtime_ns, mode, uid):
    """Write ``data`` over the file open as ``fd`` (one of a previous sample); its inode, or None.

    Only a plain file as this process creates them — regular, ``mode``, owned by ``uid``, with no
    other link — is reused: its bytes are written over the old ones and it is cut to length,
    which saves the kernel freeing and allocating (and zeroing) its pages again, and creating and
    destroying an inode. None means the file is not fit for reuse: nothing was written.
    """
    st = os.fstat(fd)
    if st.st_mode != mode or st.st_nlink != 1 or st.st_uid != uid:
        return None
    n = os.pwrite(fd, data, 0) if data else 0
    while n < len(data):
        n += os.pwrite(fd, memoryview(data)[n:], n)
    if st.st_size > n:
        os.ftruncate(fd, n)
    if mtime_ns is not None:
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    return st.st_ino


#: The longest per-sample time limit, in seconds (~11.5 days; the CLIs' --timeout has the same):
#: the wait for a command polls in milliseconds held in a C int (at most ~24.8 days).
MAX_TIMEOUT = 1e6

#: The most bytes of ``__key__`` read back: a key is a tar member name, never this long.
MAX_KEY_BYTES = 65536


def _read_file(name, dir_fd=None, key=None, limit=None):
    """The bytes of a file the command left in its dir (a symlink is followed).

    What it finally names must be a regular file: a FIFO, a device (``ln -s /dev/zero``) or a
    dir is a SampleFailed for sample ``key`` rather than a read that blocks or never ends. With
    ``limit``, a longer file is one too.
    """
    try:
        fd = os.open(name, _READ_BACK, dir_fd=dir_fd)  # non-blocking: a FIFO must not hang us
    except OSError as exc:
        raise SampleFailed(f"sample {key!r}: cannot read {name} back: {exc.strerror}",
                           key=key, status="badfile") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SampleFailed(f"sample {key!r}: the command left {name} as something other than a "
                               "regular file (or a link to one)", key=key, status="badfile")
        size = st.st_size
        data = b""
        if limit is None or size <= limit:  # (a longer one is not read at all)
            data = os.read(fd, size + 1) if size else b""
            if len(data) <= size:  # short read or a file still growing: read to EOF
                chunks = [data]
                total = len(data)
                while limit is None or total <= limit:
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    total += len(chunk)
                data = b"".join(chunks)
        if limit is not None and max(size, len(data)) > limit:
            raise SampleFailed(f"sample {key!r}: {name} written by the command is over {limit} bytes",
                               key=key, status="badfile")
        return data
    finally:
        os.close(fd)


def _drain_fd(fd):
    """Read everything written to the capture file ``fd`` and empty it for the next sample."""
    size = os.fstat(fd).st_size
    if not size:
        os.lseek(fd, 0, os.SEEK_SET)  # a command may have moved the offset without writing
        return b""
    data = os.pread(fd, size, 0)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    return data


def _remove_at(dfd, name):
    """Remove entry ``name`` of directory ``dfd`` (a file, a link, or a whole tree); no errors.

    Everything goes through directory file descriptors, never paths: a command that replaced a
    directory by a symbolic link cannot make this remove anything outside its own temp dir.
    """
    try:
        os.unlink(name, dir_fd=dfd)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    try:
        sub = os.open(name, _SUBDIR, dir_fd=dfd)
    except OSError:
        return
    try:
        _empty_dir(sub)
    finally:
        os.close(sub)
    try:
        os.rmdir(name, dir_fd=dfd)
    except OSError:
        pass


def _empty_dir(dfd, names=None):
    """Remove everything in directory ``dfd``; ``names``: its entries, when already known."""
    if names is None:
        try:
            with os.scandir(dfd) as entries:
                names = [e.name for e in entries]
        except OSError:
            return
    for name in names:
        _remove_at(dfd, name)


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
    name. ``keep_dirs``: leave temp dirs in place for debugging (also after :meth:`close`).
    ``env``: extra environment.
    ``collect=False``: the caller does not want the output data (``tarproc`` without ``-o``): the
    output samples are found and counted as usual, but their fields are not read (their values,
    and the ``add_log`` field's, are None), which saves reading every file back.

    One runner may be used by several threads at once (the pool runs shell commands from
    threads): each call gets its own temp dir and its own capture buffers.

    Background processes a command leaves behind are killed when it exits, so nothing keeps
    writing into a temp dir that is being removed or reused.

    Every sample gets a directory that is, as the command sees it, new: a name never used before,
    mode 0700, holding exactly ``__key__``, ``__source__`` and the ``sample.EXT`` files. Behind
    that, a pool thread that runs sample after sample (:meth:`recycle`) keeps the directory of
    the previous sample and the plain files it wrote there, renames the directory and writes the
    next sample's bytes over those files — what the command wrote or changed is removed — which
    costs the kernel far less than creating and removing a directory tree of fresh files.
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
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise ValueError(f"timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds, "
                             f"not {timeout!r} (None: no limit)")
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

    def __copy__(self):
        """A copy without this one's per-process state (dirs, open files), as pickling gives."""
        clone = self.__class__.__new__(self.__class__)
        clone.__setstate__(self.__getstate__())
        return clone

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
        """Called once by each pool thread before its first sample (see :func:`private_cwd`).

        Only needed where commands cannot be started with a working directory of their own
        (no ``posix_spawn_file_actions_addfchdir_np``).
        """
        if _CSpawn.get() is None:
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
                _remove_root(os.path.join(base, name))

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
        :meth:`launch`, :meth:`wait` (optional), :meth:`reap`, :meth:`collect_outputs`, and
        :meth:`cleanup` (or :meth:`recycle`, by a caller that runs more samples in the same
        thread) always, in a ``finally``.
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
        safe = _SAFE_EXTS
        for ext, value in sample.items():
            if ext[:2] == "__":
                continue
            if ext not in safe:
                check_ext(ext, key)
                safe.add(ext)
            files.append((ext, _as_bytes(value, key, ext)))
        source = sample.get("__url__") or "-"
        if source.__class__ is not str:
            source = str(source)

        local = self._state()
        ws = local.take()
        job = _Job(sample, key, index, source, local, ws)
        try:
            job.workdir = local.enter(ws, self.keep_dirs)
            dfd = ws.dfd
            old = ws.reuse  # name -> (fd, inode): files of a previous sample, still open
            files_now = ws.files = {}
            mode, uid = local.file_mode, local.uid
            # Files the command leaves untouched are not read back: their bytes are reused.
            # A write always sets the mtime to the present, so marking ours one second in the
            # past tells them apart (with the inode and the size) on a coarse clock too. The
            # key is marked even when nothing is collected: it is read back only if changed.
            # The dir, the key and each file get marks of their own, 1 us apart: a command
            # that copies one file over another with its times (`cp -p`, `touch -r`) leaves
            # the target with the other's mark, which does not pass for unchanged.
            mark = job.mark = (time.time_ns() // 1000) * 1000 - 1_000_000_000
            file_mark = job.key_mark = mark - 1000
            collect = self.collect
            written = job.written = {} if collect else None
            keyb = job.key_bytes = key.encode("utf-8")
            prefix = self.basename + "."
            for name, data, marked in _entries(keyb, source.encode("utf-8"), prefix, files, collect):
                ino = None
                kept = old.pop(name, None) if old else None
                if kept is not None:
                    fd = kept[0]
                    try:
                        ino = _refill(fd, data, file_mark if marked else None, mode, uid)
                    except BaseException:
                        local.close_file(fd)
                        raise
                    if ino is None:  # changed into something we must not write into
                        local.close_file(fd)
                        _remove_at(dfd, name)
                    else:
                        files_now[name] = kept
                if ino is None:
                    ino = local.create_file(ws, name, data, file_mark if marked else None)
                if marked:
                    if name == "__key__":
                        job.key_ino = ino
                    else:
                        written[ino] = (data, file_mark)
                    file_mark -= 1000
            job.names_in = files_now
            if old:  # files of the previous sample that this one does not have
                while old:
                    name, (fd, _) = old.popitem()
                    local.close_file(fd)
                    _remove_at(dfd, name)
            ws.reuse = None
            # The dir's mtime too: while it is still the mark, no entry was made, removed or
            # renamed in it, and reading it back needs no listing (see _read_sample_dir).
            try:
                os.utime(dfd, ns=(mark, mark))
                job.dir_marked = True
            except OSError:
                pass
        except OSError as exc:
            # (say, a command of another sample removed the dirs beside its own: rm -rf ../*)
            self.cleanup(job)
            what = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            raise SampleFailed(f"sample {key!r}: cannot write its files into its temp dir under "
                               f"{local.root}: {what}", key=key, status="prepare") from None
        except BaseException:
            self.cleanup(job)
            raise
        return job

    def launch(self, job):
        """Start the command of a prepared job (it runs in the background)."""
        local = job.local
        job.pid, job.proc = local.spawn(job)
        job.drained = False

    def finish(self, job):
        """Wait for a launched job's command; its :class:`SampleResult` or SampleFailed."""
        self.reap(job)
        return self.collect_outputs(job)

    def wait(self, job):
        """Wait for a launched job's command to end.

        The first step of :meth:`reap`, for callers that start the next command as soon as
        this one is done: what the command left running in the background is killed by
        :meth:`reap` (or :meth:`cleanup`), just after.
        """
        if job.status is None:
            pid, job.pid = job.pid, None  # from now on wait() answers for the command
            job.status = job.local.wait(pid, job.proc, self.timeout, kill=False)
            job.group = pid

    def reap(self, job):
        """Wait for a launched job's command and take its output; SampleFailed if it failed.

        The first half of :meth:`finish`; :meth:`collect_outputs` is the second.
        """
        self.wait(job)
        if job.group is not None:
            group, job.group = job.group, None
            _killpg(group)  # anything the command left running in the background
        ws = job.ws
        stdout = job.stdout = _drain_fd(ws.out)
        stderr = job.stderr = _drain_fd(ws.err)
        job.drained = True
        status = job.status
        if status != 0:
            key = job.key
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
        outputs = self._collect(job)
        return SampleResult(outputs, job.stdout, job.stderr)

    def cleanup(self, job):
        """Kill a job's command if it still runs, and remove its temp dir (unless keep_dirs)."""
        self._release(job, False)

    def recycle(self, job):
        """:meth:`cleanup` for a caller that goes on with more samples in the same thread.

        The job's directory and the plain files this runner wrote in it are kept for the next
        :meth:`prepare` to reuse (renamed, overwritten); everything else in it is removed now.
        """
        self._release(job, True)

    def _release(self, job, reuse):
        local = job.local
        if job.group is not None:
            group, job.group = job.group, None
            _killpg(group)
        if job.pid is not None:
            pid, job.pid = job.pid, None
            _killpg(pid)
            try:
                _reap(pid, job.proc)
            except ChildProcessError:
                pass
            finally:
                local.running.discard(pid)
        ws = job.ws
        if ws is None:
            return
        job.ws = None
        try:
            if not job.drained:
                local.empty_captures(ws)
            if self.keep_dirs:
                local.leave(ws)
            elif reuse and job.names_in is not None:
                local.tidy(ws, job)
            else:
                local.drop(ws, job.seen)
        finally:
            local.give(ws)

    def _collect(self, job):
        """Read the output samples back from the job's dir (and its subdirs).

        ``job.written`` maps the inodes of the files written for the command to their bytes
        and the mtime each was given: a file still matching is not read again.
        Sets ``job.seen`` to the entries of the dir, for :meth:`recycle`.
        """
        in_key = job.key
        url = job.sample.get("__url__")
        dfd = job.ws.dfd
        job.seen = None
        outputs = []
        main, subdirs = self._read_sample_dir(dfd, in_key, url, self.subdirs, job, True)
        if main is not None:
            outputs.append(main)
        for name in sorted(subdirs):
            try:
                sub = os.open(name, _SUBDIR, dir_fd=dfd)
            except OSError:
                continue
            try:
                out, _ = self._read_sample_dir(sub, None, url, False, job, False)
            finally:
                os.close(sub)
            if out is not None:
                outputs.append(out)
        if self.add_log is not None and outputs:
            first = outputs[0]
            if self.add_log in first:
                raise SampleFailed(
                    f"sample {in_key!r}: --add-log field {self.add_log!r} "
                    "was also written by the command",
                    key=in_key,
                    status="conflict",
                )
            first[self.add_log] = job.stdout if self.collect else None
        return outputs

    def _read_sample_dir(self, dfd, default_key, url, want_subdirs, job, top):
        """One sample from the directory ``dfd``: ``(sample_or_None, [subdir names])``.

        The key is the ``__key__`` file (trailing newlines stripped); without that file, the
        ``default_key`` (None for subdirs: a subdir without ``__key__`` is not a sample). Without
        ``collect``, field files are listed but not read: their values are None. With ``top``
        (the job's own dir), ``job.seen`` receives ``(name, inode)`` of the plain files and the
        names of everything else in it, once all are listed.
        """
        if top and job.dir_marked and os.fstat(dfd).st_mtime_ns == job.mark:
            return self._read_unchanged_dir(dfd, default_key, url, job), []
        prefix = self.basename + "."
        plen = len(prefix)
        collect = self.collect
        written = job.written
        plain, other = [], []
        fields = {}
        subdirs = []
        key_entry = None
        with os.scandir(dfd) as entries:
            for entry in entries:
                name = entry.name
                regular = entry.is_file(follow_symlinks=False)
                if regular:
                    plain.append((name, entry.inode()))
                else:
                    other.append(name)
                if name.startswith(prefix) and len(name) > plen:
                    if regular or entry.is_file():
                        if not collect:
                            fields[name[plen:]] = None
                            continue
                        data = None
                        if written and regular:
                            st = entry.stat(follow_symlinks=False)
                            was = written.get(st.st_ino)
                            if (was is not None and st.st_mtime_ns == was[1]
                                    and st.st_size == len(was[0])):
                                data = was[0]
                        fields[name[plen:]] = (_read_file(name, dfd, job.key) if data is None
                                               else data)
                elif name == "__key__":
                    key_entry = entry
                elif want_subdirs and not regular and entry.is_dir(follow_symlinks=False):
                    subdirs.append(name)
        if top:
            job.seen = (plain, other)
        if not fields:
            return None, subdirs
        if key_entry is not None:
            key = None
            if top and job.key_ino is not None and key_entry.is_file(follow_symlinks=False):
                key = self._key_as_written(key_entry.stat(follow_symlinks=False), job)
            if key is None:
                key = self._read_key(dfd, default_key, job)
        elif default_key is not None:
            key = default_key
        else:
            return None, subdirs
        return self._sample(key, url, fields), subdirs

    def _read_unchanged_dir(self, dfd, default_key, url, job):
        """:meth:`_read_sample_dir` of the job's own dir while its entries are still those
        :meth:`prepare` made (the dir's mtime is still the mark: nothing was created, removed or
        renamed in it): the same sample and ``job.seen``, with no listing."""
        prefix = self.basename + "."
        plen = len(prefix)
        collect = self.collect
        written = job.written
        plain = []
        fields = {}
        for name, (_, ino) in job.names_in.items():
            plain.append((name, ino))
            if name.startswith(prefix) and len(name) > plen:
                if not collect:
                    fields[name[plen:]] = None
                    continue
                was = written.get(ino) if written else None
                data = None
                if was is not None:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if st.st_ino == ino and st.st_mtime_ns == was[1] and st.st_size == len(was[0]):
                        data = was[0]
                fields[name[plen:]] = _read_file(name, dfd, job.key) if data is None else data
        job.seen = (plain, [])
        if not fields:
            return None
        key = None
        if job.key_ino is not None:
            key = self._key_as_written(os.stat("__key__", dir_fd=dfd, follow_symlinks=False), job)
        if key is None:
            key = self._read_key(dfd, default_key, job)
        return self._sample(key, url, fields)

    @staticmethod
    def _key_as_written(st, job):
        """The input key if ``st`` is the ``__key__`` file as prepare wrote it, else None."""
        if (st.st_ino == job.key_ino and st.st_mtime_ns == job.key_mark
                and st.st_size == len(job.key_bytes)):
            return job.key
        return None

    @staticmethod
    def _read_key(dfd, default_key, job):
        """The key the command wrote to ``__key__`` in ``dfd``, checked."""
        try:
            key = _read_file("__key__", dfd, job.key, MAX_KEY_BYTES).decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise SampleFailed(
                f"sample {default_key!r}: __key__ written by the command is not UTF-8",
                key=default_key,
                status="badkey",
            ) from None
        try:
            check_key(key, f"sample {job.key!r}: key written by the command")
        except UnsafeNameError as exc:  # the command's doing: a failure of its sample
            raise SampleFailed(str(exc), key=default_key, status="badkey") from None
        return key

    @staticmethod
    def _sample(key, url, fields):
        out = {"__key__": key}
        if url is not None:
            out["__url__"] = url
        safe = _SAFE_EXTS
        for ext in sorted(fields):
            if ext not in safe:
                check_ext(ext, key)
                safe.add(ext)
            out[ext] = fields[ext]
        return out

    def __repr__(self):
        what = f"command={self.command!r}" if self.command is not None else f"script={self.script_name!r}"
        return f"ShellRunner({what}, basename={self.basename!r})"


def _entries(keyb, sourceb, prefix, files, collect):
    """``(file name, bytes, marked)`` for each file of a sample dir, ``__key__`` first."""
    yield "__key__", keyb, True
    yield "__source__", sourceb, False
    for ext, data in files:
        yield prefix + ext, data, collect


class _Job:
    """One sample between :meth:`ShellRunner.prepare` and :meth:`ShellRunner.cleanup`."""

    __slots__ = ("sample", "key", "index", "source", "workdir", "local", "ws", "written", "mark",
                 "key_mark", "key_ino", "key_bytes", "names_in", "seen", "pid", "proc", "status", "group",
                 "drained", "stdout", "stderr", "dir_marked")

    def __init__(self, sample, key, index, source, local, ws):
        self.sample = sample
        self.key = key
        self.index = index
        self.source = source
        self.local = local
        self.ws = ws
        self.workdir = None
        self.written = None
        self.mark = None
        self.key_mark = None
        self.key_ino = None
        self.key_bytes = None
        self.names_in = None
        self.seen = None
        self.pid = None
        self.proc = None
        self.status = None
        self.group = None  # process group of a command that ended, not yet killed
        self.drained = True
        self.stdout = b""
        self.stderr = b""
        self.dir_marked = False


class _Workspace:
    """A sample dir in the making, with the capture buffers of the command that runs in it.

    ``dfd`` is an open descriptor of the directory (-1: none yet), ``name`` its name in the
    process's root. ``files`` maps the names of the files written for the current sample to
    ``(open descriptor or -1, inode)``; ``reuse``, between samples, holds those left (unchanged
    in kind) for the next sample to overwrite. ``out``/``err`` are the command's stdout/stderr capture files. ``fa`` and
    ``envp`` are what :class:`_CSpawn` prepared for this workspace.
    """

    __slots__ = ("dfd", "name", "ino", "dev", "files", "reuse", "out", "err", "fa", "envp",
                 "envkey")

    def __init__(self, out, err):
        self.dfd = -1
        self.name = None
        self.ino = None
        self.dev = None
        self.files = None
        self.reuse = None
        self.out = out
        self.err = err
        self.fa = None
        self.envp = None
        self.envkey = None


class _ProcessState:
    """Everything a ShellRunner needs in the process that runs it; never pickled.

    Shared by the threads of that process: the temp dir counter is an ``itertools.count`` (atomic
    under the GIL), workspaces (a dir and a pair of capture memfds each) are taken from and given
    back to a free list, and ``running`` holds the process groups of the commands now running
    (see :meth:`kill_all`).
    """

    def __init__(self, runner):
        self.pid = os.getpid()
        self.counter = itertools.count(1)
        self.keep_dirs = runner.keep_dirs
        base = runner.tmpdir or default_tmpdir()
        if not os.path.isdir(base):  # made by nobody but its owner: a typo must not leave a tree
            raise TarprocError(f"temp dir base {base} (--tmpdir or $TMPDIR): "
                               + ("not a directory" if os.path.exists(base) else "no such directory"))
        self.root = _make_root(base, f"tarproc-{self.pid}-")
        self.rootfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._free = []  # workspaces not in use
        self._all = []  # every workspace, for close()
        # Files kept open between samples (see create_file), at most a quarter of the limit.
        self._open_lock = threading.Lock()
        self.open_files = 0
        self.max_open = _open_file_budget()
        self.running = set()
        self.uid = os.geteuid()
        # The mode a new file gets here (0644 less the umask): files reused must still have it.
        probe = f".probe-{self.pid}"
        _write_file(probe, b"", dir_fd=self.rootfd)
        self.file_mode = os.stat(probe, dir_fd=self.rootfd).st_mode
        os.unlink(probe, dir_fd=self.rootfd)
        env = dict(os.environ)
        if runner.env:
            env.update(runner.env)
        # Encoded once: each spawn then only adds the three TARPROC_* variables.
        self.env = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        self.runner_info = None  # (script name, #! line) when the kernel starts a -s script
        if runner.command is not None:
            self.argv = [runner.shell, "-c", runner.command]
        else:
            script = os.path.join(self.root, "script-" + runner.script_name)
            _write_file(script, runner.script_bytes)
            os.chmod(script, stat.S_IRWXU)
            if runner.interpreter:
                import shlex

                self.argv = shlex.split(runner.interpreter) + [script]
            elif runner.script_bytes.startswith(b"#!"):
                self.argv = [script]
                first = runner.script_bytes.split(b"\n", 1)[0].decode("utf-8", "replace")
                self.runner_info = (runner.script_name, first)
            else:
                self.argv = [runner.shell, script]
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._spawn_argv = None
        self.direct = _direct_command(runner, self.env)
        self.cspawn = _CSpawn.get()
        self._closed = False
        atexit.register(self.close)

    # ------------------------------------------------------------ workspaces

    def take(self):
        """A workspace for one sample (its capture buffers empty, offset 0)."""
        try:
            return self._free.pop()
        except IndexError:
            ws = _Workspace(self._capture_fd("stdout"), self._capture_fd("stderr"))
            self._all.append(ws)
            return ws

    def give(self, ws):
        self._free.append(ws)

    def empty_captures(self, ws):
        """Empty the capture buffers of a workspace whose command was not drained."""
        try:
            for fd in (ws.out, ws.err):
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
        except OSError:
            pass

    def enter(self, ws, fresh=False):
        """Give ``ws`` an empty-looking private dir with a name never used before; its path.

        The workspace's previous dir is renamed, if it is still where and what it was; else (or
        with ``fresh``) a new dir is made.
        """
        name = str(next(self.counter))
        rootfd = self.rootfd
        if ws.dfd >= 0 and not fresh:
            try:
                os.rename(ws.name, name, src_dir_fd=rootfd, dst_dir_fd=rootfd)
                st = os.stat(name, dir_fd=rootfd, follow_symlinks=False)
                if st.st_ino == ws.ino and st.st_dev == ws.dev:
                    if st.st_mode & 0o7777 != 0o700:
                        os.chmod(ws.dfd, 0o700)
                    ws.name = name
                    return f"{self.root}/{name}"
            except OSError:
                pass
            # Not ours any more (the command moved or replaced its dir): start afresh.
            self._close_dir(ws)
            _remove_at(rootfd, name)
        elif ws.dfd >= 0:
            self.drop(ws)
        os.mkdir(name, 0o700, dir_fd=rootfd)
        ws.dfd = os.open(name, _SUBDIR, dir_fd=rootfd)
        st = os.fstat(ws.dfd)
        ws.ino, ws.dev, ws.name = st.st_ino, st.st_dev, name
        return f"{self.root}/{name}"

    def tidy(self, ws, job):
        """After a sample: keep in its dir only the plain files that were written for it."""
        if ws.dfd < 0:
            return
        try:
            seen = job.seen
            if seen is None:
                plain, other = [], []
                with os.scandir(ws.dfd) as entries:
                    for e in entries:
                        if e.is_file(follow_symlinks=False):
                            plain.append((e.name, e.inode()))
                        else:
                            other.append(e.name)
            else:
                plain, other = seen
            files = ws.files or {}
            ws.files = None
            keep = {}
            for name, ino in plain:
                kept = files.pop(name, None)
                if kept is not None and kept[1] == ino and kept[0] >= 0:
                    keep[name] = kept  # still the file we wrote: overwritten next time
                else:
                    if kept is not None:
                        self.close_file(kept[0])
                    _remove_at(ws.dfd, name)
            for fd, _ in files.values():  # gone, or renamed (and removed above)
                self.close_file(fd)
            for name in other:
                _remove_at(ws.dfd, name)
            ws.reuse = keep
        except OSError:
            self.drop(ws)

    def drop(self, ws, seen=None):
        """Remove a workspace's dir and everything in it."""
        if ws.dfd < 0:
            return
        self._close_files(ws)
        names = None if seen is None else [n for n, _ in seen[0]] + seen[1]
        _empty_dir(ws.dfd, names)
        try:
            os.rmdir(ws.name, dir_fd=self.rootfd)
        except OSError:
            if names is not None:  # something the listing missed: look again
                _empty_dir(ws.dfd)
                try:
                    os.rmdir(ws.name, dir_fd=self.rootfd)
                except OSError:
                    pass
        self._close_dir(ws)

    def create_file(self, ws, name, data, mtime_ns):
        """Create file ``name`` in the workspace's dir holding ``data``; its inode.

        With ``mtime_ns``, its times are set to that. The file stays open for the next sample to
        overwrite while this process keeps fewer than :attr:`max_open` such files.
        """
        fd = os.open(name, _NEW_FILE, 0o644, dir_fd=ws.dfd)
        try:
            _write_all(fd, data)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            ino = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            raise
        with self._open_lock:
            keep = self.open_files < self.max_open
            if keep:
                self.open_files += 1
        if keep:
            ws.files[name] = (fd, ino)
        else:
            os.close(fd)
            ws.files[name] = (-1, ino)
        return ino

    def close_file(self, fd):
        """Close a file :meth:`create_file` kept open."""
        if fd < 0:
            return
        with self._open_lock:
            self.open_files -= 1
        try:
            os.close(fd)
        except OSError:
            pass

    def _close_files(self, ws):
        for table in (ws.files, ws.reuse):
            if table:
                for fd, _ in table.values():
                    self.close_file(fd)
        ws.files = ws.reuse = None

    def leave(self, ws):
        """Forget a workspace's dir without removing it (keep_dirs)."""
        self._close_dir(ws)

    def _close_dir(self, ws):
        self._close_files(ws)
        if ws.fa is not None:
            self.cspawn.free_actions(ws.fa)
            ws.fa = None
        if ws.dfd >= 0:
            fd, ws.dfd = ws.dfd, -1
            try:
                os.close(fd)
            except OSError:
                pass

    def _capture_fd(self, name):
        if hasattr(os, "memfd_create"):
            try:
                return os.memfd_create(f"tarproc-{name}", os.MFD_CLOEXEC)
            except OSError:
                pass
        path = f"{self.root}/.{name}-{os.urandom(6).hex()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.unlink(path)
        return fd

    # ------------------------------------------------------------ running commands

    def _resolved(self):
        """``(exe, argv)`` as bytes, the program looked up on $PATH once."""
        resolved = self._spawn_argv
        if resolved is None:
            argv = self.argv
            path = os.fsdecode(self.env.get(b"PATH", os.defpath.encode()))
            exe = argv[0] if "/" in argv[0] else _which(argv[0], path)
            if exe is None:
                raise FileNotFoundError(2, "No such file or directory", argv[0])
            resolved = self._spawn_argv = (os.fsencode(exe), [os.fsencode(a) for a in argv])
        return resolved

    def spawn(self, job):
        """Start the job's command in its dir, in its own session; ``(pid, Popen or None)``."""
        direct = self.direct
        ws = job.ws
        try:
            cspawn = self.cspawn
            if cspawn is not None:
                exe, argv = direct if direct is not None else self._resolved()
                pid = cspawn.spawn(self, ws, exe, argv, job, direct is not None)
                proc = None
            else:
                env = self._env_dict(job, direct)
                if _thread_cwd.private:
                    exe, argv = direct if direct is not None else self._resolved()
                    os.fchdir(ws.dfd)  # this thread only (see private_cwd)
                    pid = os.posix_spawn(
                        exe,
                        argv,
                        env,
                        file_actions=[
                            (os.POSIX_SPAWN_DUP2, self.devnull, 0),
                            (os.POSIX_SPAWN_DUP2, ws.out, 1),
                            (os.POSIX_SPAWN_DUP2, ws.err, 2),
                        ],
                        setsid=True,
                        setsigdef=_DEFAULT_SIGNALS,
                    )
                    proc = None
                else:
                    import subprocess

                    exe, argv = direct if direct is not None else (None, self.argv)
                    proc = subprocess.Popen(
                        argv,
                        executable=exe,
                        cwd=job.workdir,
                        env=env,
                        stdin=self.devnull,
                        stdout=ws.out,
                        stderr=ws.err,
                        close_fds=True,
                        start_new_session=True,
                    )
                    pid = proc.pid
        except OSError as exc:
            if direct is None:
                raise self._spawn_error(exc) from None
            # Not runnable directly after all (say, a script without #!): bash knows what to do.
            self.direct = None
            return self.spawn(job)
        self.running.add(pid)
        return pid, proc

    def _spawn_error(self, exc):
        """What a failed start says: for a ``-s`` script run by its ``#!`` line, the
        interpreter that line names (the kernel reports the script, our private copy)."""
        runner = self.runner_info
        if runner is not None and exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
            name, first = runner
            return TarprocError(f"{name}: cannot start it with its #! line {first!r}: "
                                f"{exc.strerror}")
        return exc

    def _env_dict(self, job, direct):
        env = self.env.copy()
        env[b"TARPROC_KEY"] = job.key.encode("utf-8", "surrogateescape")
        env[b"TARPROC_INDEX"] = str(job.index).encode()
        env[b"TARPROC_SOURCE"] = job.source.encode("utf-8", "surrogateescape")
        if direct is not None:
            # What bash -c does for a plain simple command, without bash (see _direct_command).
            env[b"PWD"] = os.fsencode(job.workdir)
            env[b"_"] = direct[0]
            env.setdefault(b"SHLVL", b"0")
        return env

    def env_layout(self, direct):
        """``(fixed "NAME=value" entries, names of the per-sample ones)`` for :class:`_CSpawn`."""
        per_sample = [b"TARPROC_KEY", b"TARPROC_INDEX", b"TARPROC_SOURCE"]
        fixed = {}
        for k, v in self.env.items():
            fixed[k] = v
        if direct is not None:
            per_sample.append(b"PWD")
            fixed[b"_"] = direct[0]
            fixed.setdefault(b"SHLVL", b"0")
        for k in per_sample:
            fixed.pop(k, None)
        return [k + b"=" + v for k, v in fixed.items()], per_sample

    def wait(self, pid, proc, timeout, kill=True):
        """Wait for a command from :meth:`spawn`; its exit status, negative for a signal, or
        "timeout".

        The command's process group is killed on return: background processes it left behind
        (unless ``kill`` is false: the caller does it), or the command itself when interrupted.
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
        if kill:
            _killpg(pid)  # anything the command left running in the background
        return status

    def kill_all(self):
        """Kill the process groups of all commands running now (from any thread)."""
        for pid in list(self.running):
            _killpg(pid)

    def close(self):
        if self._closed:
            return
        self._closed = True
        for ws in self._all:
            self._close_files(ws)
            if ws.fa is not None and self.cspawn is not None:
                self.cspawn.free_actions(ws.fa)
                ws.fa = None
            for fd in (ws.dfd, ws.out, ws.err):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            ws.dfd = -1
        for fd in (self.devnull, self.rootfd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._all = []
        self._free = []
        if not self.keep_dirs:
            _remove_root(self.root)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass


class _CSpawn:
    """``posix_spawn`` called through ctypes, which releases the GIL while the child starts.

    ``os.posix_spawn`` holds the GIL until the (vfork) child has exec'ed, which stalls every other
    thread — the one reading input, the other runners — for the whole start of each command. Here
    the file actions of each workspace (stdin from /dev/null, stdout/stderr to its capture files,
    ``fchdir`` into its dir, so no thread needs a working directory of its own) are built once,
    and the environment is an array in which only the per-sample entries change.

    :meth:`get` returns None where the C library lacks ``posix_spawn_file_actions_addfchdir_np``
    (glibc < 2.29, macOS): the ShellRunner then uses ``os.posix_spawn`` or :mod:`subprocess`.
    """

    _instance = None
    _tried = False

    #: POSIX_SPAWN_SETSIGDEF and POSIX_SPAWN_SETSID (glibc, musl)
    _FLAGS = 0x04 | 0x80

    @classmethod
    def get(cls):
        if not cls._tried:
            with _CSPAWN_LOCK:
                if not cls._tried:
                    try:
                        cls._instance = cls() if sys.platform.startswith("linux") else None
                    except Exception:
                        cls._instance = None
                    cls._tried = True
        return cls._instance

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        c_void_p, c_int = ctypes.c_void_p, ctypes.c_int
        self._spawn = libc.posix_spawn
        self._spawn.argtypes = [ctypes.POINTER(c_int), ctypes.c_char_p, c_void_p, c_void_p,
                                c_void_p, c_void_p]
        self._spawn.restype = c_int
        self._fa_init = libc.posix_spawn_file_actions_init
        self._fa_destroy = libc.posix_spawn_file_actions_destroy
        self._fa_dup2 = libc.posix_spawn_file_actions_adddup2
        self._fa_fchdir = libc.posix_spawn_file_actions_addfchdir_np
        for f in (self._fa_init, self._fa_destroy):
            f.argtypes = [c_void_p]
            f.restype = c_int
        self._fa_dup2.argtypes = [c_void_p, c_int, c_int]
        self._fa_dup2.restype = c_int
        self._fa_fchdir.argtypes = [c_void_p, c_int]
        self._fa_fchdir.restype = c_int
        # Generous buffers: posix_spawnattr_t is 336 bytes and sigset_t 128 on glibc x86-64.
        self._attr = ctypes.create_string_buffer(2048)
        sigs = ctypes.create_string_buffer(512)
        check = self._check
        check(libc.posix_spawnattr_init(self._attr))
        check(libc.sigemptyset(sigs))
        for sig in _DEFAULT_SIGNALS:
            check(libc.sigaddset(sigs, c_int(int(sig))))
        check(libc.posix_spawnattr_setsigdefault(self._attr, sigs))
        check(libc.posix_spawnattr_setflags(self._attr, ctypes.c_short(self._FLAGS)))
        self._argv_cache = {}

    @staticmethod
    def _check(rc):
        if rc != 0:
            raise OSError(rc, os.strerror(rc))

    def actions(self, devnull, out, err, dfd):
        """File actions: stdin from devnull, stdout/stderr to out/err, cwd the dir dfd."""
        fa = self.ctypes.create_string_buffer(1024)
        self._check(self._fa_init(fa))
        try:
            for src, dst in ((devnull, 0), (out, 1), (err, 2)):
                self._check(self._fa_dup2(fa, src, dst))
            self._check(self._fa_fchdir(fa, dfd))
        except BaseException:
            self._fa_destroy(fa)
            raise
        return fa

    def free_actions(self, fa):
        self._fa_destroy(fa)

    def _argv(self, argv):
        key = tuple(argv)
        arr = self._argv_cache.get(key)
        if arr is None:
            arr = self._argv_cache[key] = (self.ctypes.c_char_p * (len(argv) + 1))(*argv, None)
        return arr

    def spawn(self, local, ws, exe, argv, job, direct):
        """Start ``exe`` with ``argv`` for ``job`` in workspace ``ws``; the pid."""
        ctypes = self.ctypes
        if ws.fa is None:
            ws.fa = self.actions(local.devnull, ws.out, ws.err, ws.dfd)
        envkey = (id(local), direct)
        if ws.envkey != envkey:
            fixed, per_sample = local.env_layout(local.direct)
            envp = (ctypes.c_char_p * (len(fixed) + len(per_sample) + 1))(*fixed)
            ws.envp = (envp, len(fixed))
            ws.envkey = envkey
        envp, n = ws.envp
        source = job.source.encode("utf-8", "surrogateescape")
        if b"\0" in source:  # (keys are checked: no control characters)
            raise ValueError("embedded null byte in the sample's source")
        envp[n] = b"TARPROC_KEY=" + job.key.encode("utf-8", "surrogateescape")
        envp[n + 1] = b"TARPROC_INDEX=%d" % job.index
        envp[n + 2] = b"TARPROC_SOURCE=" + source
        if direct:
            envp[n + 3] = b"PWD=" + os.fsencode(job.workdir)
        pid = ctypes.c_int(0)
        rc = self._spawn(ctypes.byref(pid), exe, ws.fa, self._attr, self._argv(argv), envp)
        if rc != 0:
            raise OSError(rc, os.strerror(rc), os.fsdecode(exe))
        return pid.value


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
        exe = _which(first, path)
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
    import select

    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(pidfd)
