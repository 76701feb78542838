"""The local ``-p N`` pool: run a runner over a stream of samples, N at a time.

:class:`SamplePool` takes any picklable *runner* — an object with ``run(sample, index) ->
SampleResult`` and optionally ``close()`` (:class:`~tarproc.runner.ShellRunner`,
:class:`~tarproc.runner.PythonRunner`) — and yields one :class:`Outcome` per input sample, in
input order (or as completed with ``ordered=False``), carrying the output samples and the
command's stdout/stderr so the caller can route them.

A runner whose ``pool_threads`` attribute is true (:class:`~tarproc.runner.ShellRunner`: its work
is done by child processes, and spawning and waiting release the GIL) is run by N threads of the
calling process instead, also at ``processes=1``, where the calling thread reads the next
sample while the command of the current one runs: no sample is pickled to another process, and
the calling thread only reads input and hands out results. The bounds below hold the same way.

Otherwise, with ``processes=1`` everything runs inline in the calling process. With more, worker processes
are started once (the runner is handed to them at startup, not per sample) and fed *batches* of
consecutive samples whose size adapts so that a batch is a few milliseconds of work (at most
:data:`MAX_BATCH` samples and about :data:`MAX_BATCH_BYTES` bytes): tiny samples share the cost
of a round trip between processes, slow shell commands still go out one by one.

Memory is bounded whatever the length of the stream: at most ``max_in_flight`` samples (default
:data:`IN_FLIGHT_PER_PROCESS` × N) and about ``max_bytes_in_flight`` bytes of input (default
:data:`BYTES_IN_FLIGHT_PER_PROCESS` × N, but always at least one sample) have been taken from the
input iterator and not yet yielded, including results held back to restore input order.

Failures (:class:`SampleFailed`, :class:`UnsafeNameError`) follow ``errors``: ``"abort"`` stops
the workers and raises the failure (the first in input order when ordered); ``"skip"`` yields an
Outcome with no outputs; ``"keep"`` yields the input sample unchanged. Other exceptions (bugs,
a full disk) always abort. Closing the pool — on completion, on error, on KeyboardInterrupt, or
on SIGTERM, which it turns into ``SystemExit(143)`` while open — stops the workers, which kill
their commands' process groups and remove their temp dirs first.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field

from tarproc.errors import SampleFailed, UnsafeNameError

__all__ = ["SamplePool", "Outcome", "PoolStats", "process_samples"]

#: Largest number of samples in one batch sent to a worker.
MAX_BATCH = 64
#: A batch is closed once its samples hold this many bytes (a batch has at least one sample).
MAX_BATCH_BYTES = 1 << 20
#: A batch should take about this long to process (seconds), once sample times are known.
TARGET_BATCH_SECONDS = 0.005
#: Batches queued per worker (one running, one waiting), so a worker never idles for input.
BATCHES_PER_WORKER = 2
#: Default bound on samples in flight, per process.
IN_FLIGHT_PER_PROCESS = 4 * MAX_BATCH
#: Default bound on input bytes in flight, per process.
BYTES_IN_FLIGHT_PER_PROCESS = 64 << 20

_FAILURES = (SampleFailed, UnsafeNameError)
ERROR_POLICIES = ("abort", "skip", "keep")


@dataclass(slots=True)
class Outcome:
    """What became of one input sample.

    ``outputs``: the output samples to write (empty when dropped or skipped; ``[input]`` when a
    failure is kept). With an ``encode`` function, ``outputs`` is empty and ``data`` holds the
    encoded outputs instead; ``count`` is the number of output samples either way. ``error``:
    the SampleFailed/UnsafeNameError under ``skip``/``keep``, else None. ``stdout``/``stderr``:
    what the command printed. ``key``: the input sample's key (None if it could not be decoded).
    """

    index: int
    key: object
    outputs: list
    stdout: bytes = b""
    stderr: bytes = b""
    error: Exception | None = None
    data: bytes | None = None
    count: int = 0


@dataclass
class PoolStats:
    """Counts for the end-of-run summary.

    ``inputs``: samples read; ``outputs``: samples produced; ``dropped``: inputs that produced no
    output without failing; ``skipped``/``kept``: failures dropped or passed through;
    ``failed``: all failures (``skipped + kept``, plus one if the run aborted).
    """

    inputs: int = 0
    outputs: int = 0
    dropped: int = 0
    skipped: int = 0
    kept: int = 0
    failed: int = 0
    in_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def seconds(self):
        """Wall time from the pool's start to its close (or until now)."""
        return (self.finished or time.monotonic()) - self.started


def _sample_bytes(sample):
    n = 0
    for v in sample.values():
        if v.__class__ is bytes:
            n += len(v)
    return n


# ------------------------------------------------------------------------------ exceptions


def _pack_exc(exc):
    """An exception as picklable parts that keep its attributes (SampleFailed's key, status...)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    state = {k: v for k, v in vars(exc).items() if not k.startswith("__")}
    return (type(exc), exc.args, state, tb)


def _unpack_exc(packed):
    cls, args, state, tb = packed
    try:
        exc = cls.__new__(cls)
        exc.args = args
        exc.__dict__.update(state)
    except Exception:
        exc = RuntimeError(f"{cls.__name__}: {args}")
    if not isinstance(exc, _FAILURES) and hasattr(exc, "add_note"):
        exc.add_note("in a worker process:\n" + tb)
    return exc


# ------------------------------------------------------------------------------ workers


def _run_one(runner, item, index, decode, encode, keep, pack):
    """Run one sample; a compact tuple ``(index, kind, payload, stdout, stderr, key, count)``.

    kind 0: payload is the outputs (or their encoding); kind 1: a per-sample failure, payload
    ``(exception, kept input or None)``; kind 2: any other exception (the run must abort).
    Tuples rather than objects: they are what crosses the pipe from workers, cheaply.
    """
    sample = item
    try:
        if decode is not None:
            sample = decode(item)
        return _done(runner.run(sample, index), sample, index, encode)
    except _FAILURES as exc:
        return _failed(exc, sample, index, encode, keep, pack)
    except Exception as exc:
        return (index, 2, _pack_exc(exc) if pack else exc, b"", b"", None, 0)


def _done(r, sample, index, encode):
    outputs = r.outputs
    n = len(outputs)
    if encode is not None:
        outputs = encode(outputs)
    return (index, 0, outputs, r.stdout, r.stderr, sample.get("__key__"), n)


def _failed(exc, sample, index, encode, keep, pack):
    kept = None
    if keep and sample is not None:
        kept = encode([sample]) if encode is not None else sample
    key = getattr(exc, "key", None)
    if key is None and isinstance(sample, dict):
        key = sample.get("__key__")
    return (
        index,
        1,
        (_pack_exc(exc) if pack else exc, kept),
        getattr(exc, "stdout", b""),
        getattr(exc, "stderr", b""),
        key,
        1 if kept is not None else 0,
    )


def _worker_main(conn, runner, options, inherited):
    """Loop of one worker process: receive batches, run them, send the outcomes back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it sends SIGTERM

    def _terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    _die_with_parent()
    for c in inherited:  # parent ends of other workers' pipes, inherited through fork
        try:
            c.close()
        except OSError:
            pass
    decode, encode, keep = options
    inbox = queue.SimpleQueue()

    def _reader():
        # Drain the pipe continuously so the parent's sends never block on a busy worker.
        try:
            while True:
                msg = conn.recv()
                inbox.put(msg)
                if msg is None:
                    return
        except (EOFError, OSError):
            inbox.put(None)

    threading.Thread(target=_reader, daemon=True).start()
    try:
        while True:
            batch = inbox.get()
            if batch is None:
                break
            t0 = time.perf_counter()
            results = []
            start, items = batch
            for index, item in enumerate(items, start):
                r = _run_one(runner, item, index, decode, encode, keep, True)
                results.append(r)
                if r[1] == 2:
                    break
            conn.send((results, time.perf_counter() - t0))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()
        try:
            conn.close()
        except OSError:
            pass


def _thread_main(runner, work, results, options, stop):
    """Loop of one runner thread: take ``(index, item)`` jobs, put result tuples.

    With a runner that works in steps (``prepare``/``launch``/``finish``/``cleanup``, as
    :class:`~tarproc.runner.ShellRunner`), the thread prepares the next sample and removes the
    previous one's dir while a command runs, so that only the command's start and the reading
    of its results lie between two commands.
    """
    init = getattr(runner, "thread_init", None)
    if init is not None:
        try:
            init()
        except Exception:
            pass
    try:
        if hasattr(runner, "prepare"):
            _thread_steps(runner, work, results, options, stop)
        else:
            _thread_simple(runner, work, results, options, stop)
    except BaseException as exc:  # noqa: BLE001 - the calling thread must hear of it
        results.put((-1, 2, exc, b"", b"", None, 0))


def _thread_simple(runner, work, results, options, stop):
    decode, encode, keep = options
    while True:
        job = work.get()
        if job is None:
            return
        if stop.is_set():
            continue  # closing: drop queued work
        index, item = job
        results.put(_run_one(runner, item, index, decode, encode, keep, False))


def _thread_steps(runner, work, results, options, stop):
    """The loop of :func:`_thread_main` for a runner that works in steps.

    Between two commands there is only the wait's end and the next start: the next sample is
    prepared, the previous dir removed, and the outputs read back while a command runs.
    """
    decode, encode, keep = options

    def stage(entry):
        """Prepare one queued entry: ``(index, sample, job)``, or None (result already put)."""
        index, item = entry
        sample = item
        try:
            if decode is not None:
                sample = decode(item)
            return index, sample, runner.prepare(sample, index)
        except _FAILURES as exc:
            results.put(_failed(exc, sample, index, encode, keep, False))
        except Exception as exc:
            results.put((index, 2, exc, b"", b"", None, 0))
        return None

    def launch(staged):
        """Start a staged job; it, or None (its failure already put, its dir removed)."""
        index, sample, job = staged
        try:
            runner.launch(job)
            return staged
        except _FAILURES as exc:
            r = _failed(exc, sample, index, encode, keep, False)
        except Exception as exc:
            r = (index, 2, exc, b"", b"", None, 0)
        runner.cleanup(job)
        results.put(r)
        return None

    staged = None  # prepared, not launched
    current = None  # launched
    previous = None  # done, its dir not yet removed
    ending = False
    try:
        while True:
            if current is None:
                if staged is None:
                    if ending:
                        return
                    entry = work.get()
                    if entry is None:
                        return
                    if stop.is_set():
                        continue  # closing: drop queued work
                    staged = stage(entry)
                    if staged is None:
                        continue
                if stop.is_set():
                    runner.cleanup(staged[2])
                    staged = None
                    continue
                current, staged = launch(staged), None
                if current is None:
                    continue
            # A command runs: remove the previous dir, prepare the next sample if one waits.
            if previous is not None:
                runner.cleanup(previous)
                previous = None
            if staged is None and not ending and not stop.is_set():
                try:
                    entry = work.get_nowait()
                except queue.Empty:
                    entry = False
                if entry is None:
                    ending = True
                elif entry is not False:
                    staged = stage(entry)
            index, sample, job = current
            try:
                runner.reap(job)
                # Start the next command before reading this one's outputs back.
                current = None
                if staged is not None and not stop.is_set():
                    current, staged = launch(staged), None
                r = _done(runner.collect_outputs(job), sample, index, encode)
            except _FAILURES as exc:
                if current is not None and current[2] is job:
                    current = None
                r = _failed(exc, sample, index, encode, keep, False)
            except Exception as exc:
                if current is not None and current[2] is job:
                    current = None
                r = (index, 2, exc, b"", b"", None, 0)
            previous = job
            results.put(r)
    finally:
        for held in (staged, current):
            if held is not None:
                runner.cleanup(held[2])
        if previous is not None:
            runner.cleanup(previous)


def _die_with_parent():
    """Ask Linux to SIGTERM this worker if its parent dies (no orphaned workers)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


class _Worker:
    __slots__ = ("proc", "conn", "batches")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.batches = collections.deque()  # sent, results not yet received (FIFO)


def _outstanding(w):
    return len(w.batches)


class _Batch:
    """Consecutive input samples sent to one worker as one message."""

    __slots__ = ("start", "count", "nbytes", "results")

    def __init__(self, start, count, nbytes):
        self.start = start
        self.count = count
        self.nbytes = nbytes
        self.results = None


# ------------------------------------------------------------------------------ the pool


class SamplePool:
    """Run ``runner`` over streams of samples with ``processes`` workers (see module doc).

    Use as a context manager, or call :meth:`close`; :meth:`map` yields :class:`Outcome` objects.
    ``mp_context``: a multiprocessing start method or context; default ``"fork"`` when the
    process has a single thread (fast start), else ``"forkserver"`` (safe with threads).
    ``handle_sigterm``: while open, and if SIGTERM has its default action, make it raise
    ``SystemExit(143)`` in the main thread so that cleanup runs.

    ``decode``/``encode`` (picklable callables, optional) run where the runner runs — in the
    workers — so that the parent only moves bytes: ``decode(item) -> sample`` turns each input
    item (say, the raw tar members of one sample) into a sample dict, ``encode(list_of_samples)
    -> bytes`` turns each input's outputs into bytes (say, their tar members), found in
    ``Outcome.data``. With tiny samples and cheap code, this is what lets N processes go faster
    than one.

    ``threads``: run the runner in threads of this process rather than worker processes; default
    the runner's ``pool_threads`` attribute (see module doc).
    """

    def __init__(
        self,
        runner,
        processes=1,
        *,
        ordered=True,
        errors="abort",
        max_in_flight=None,
        max_bytes_in_flight=None,
        mp_context=None,
        handle_sigterm=True,
        decode=None,
        encode=None,
        threads=None,
    ):
        if errors not in ERROR_POLICIES:
            raise ValueError(f"errors must be one of {ERROR_POLICIES}, not {errors!r}")
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self.runner = runner
        self.processes = int(processes)
        self.ordered = ordered
        self.errors = errors
        self.decode = decode
        self.encode = encode
        self.max_in_flight = max(1, max_in_flight or IN_FLIGHT_PER_PROCESS * self.processes)
        self.max_bytes_in_flight = max_bytes_in_flight or (
            BYTES_IN_FLIGHT_PER_PROCESS * self.processes
        )
        self.stats = PoolStats()
        self._workers = []
        self._threads = []
        if threads is None:
            threads = bool(getattr(runner, "pool_threads", False))
        self.threaded = bool(threads)
        self._closed = False
        self._old_sigterm = None
        self._sample_seconds = None  # running estimate of one sample's processing time
        if handle_sigterm:
            self._install_sigterm()
        try:
            load = getattr(runner, "load", None)
            if load is not None:
                load()  # report a broken script before starting anything
            if self.threaded:
                self._start_threads()
            elif self.processes > 1:
                self._start_workers(mp_context)
        except BaseException:
            self.close(abort=True)
            raise

    # -------------------------------------------------------------- lifecycle

    def _install_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return

        def _on_sigterm(signum, frame):
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)

    def _restore_sigterm(self):
        if self._old_sigterm is not None:
            try:
                signal.signal(signal.SIGTERM, self._old_sigterm)
            except ValueError:
                pass
            self._old_sigterm = None

    def _start_workers(self, mp_context):
        import multiprocessing  # only -p N needs it; tarproc itself starts fast

        if mp_context is None:
            mp_context = "fork" if threading.active_count() == 1 else "forkserver"
        ctx = (
            multiprocessing.get_context(mp_context) if isinstance(mp_context, str) else mp_context
        )
        forking = ctx.get_start_method() == "fork"
        options = (self.decode, self.encode, self.errors == "keep")
        for _ in range(self.processes):
            parent_end, child_end = ctx.Pipe(duplex=True)
            inherited = [w.conn for w in self._workers] + [parent_end] if forking else []
            proc = ctx.Process(
                target=_worker_main,
                args=(child_end, self.runner, options, inherited),
                name="tarproc-worker",
                daemon=True,
            )
            proc.start()
            child_end.close()
            self._workers.append(_Worker(proc, parent_end))

    def _start_threads(self):
        self._work = queue.SimpleQueue()
        self._results = queue.SimpleQueue()
        self._stop = threading.Event()
        options = (self.decode, self.encode, self.errors == "keep")
        for i in range(self.processes):
            t = threading.Thread(
                target=_thread_main,
                args=(self.runner, self._work, self._results, options, self._stop),
                name=f"tarproc-runner-{i}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)

    def _stop_threads(self):
        """Stop the runner threads: drop queued work, kill running commands, join."""
        self._stop.set()
        for _ in self._threads:
            self._work.put(None)
        kill = getattr(self.runner, "kill_running", None)
        deadline = time.monotonic() + 10.0
        for t in self._threads:
            while t.is_alive():
                if kill is not None:
                    kill()  # also commands started after the previous round
                t.join(0.05)
                if time.monotonic() > deadline:
                    break
        self._threads = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(abort=exc_type is not None)
        return False

    def close(self, abort=False):
        """Stop the workers and release the runner's resources; idempotent.

        ``abort=True`` (or when work is still in flight) terminates workers with SIGTERM — each
        kills its running command's process group and removes its temp dirs — and SIGKILLs any
        that do not exit within a few seconds.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._threads:
                self._stop_threads()
            busy = any(w.batches for w in self._workers)
            if abort or busy:
                for w in self._workers:
                    if w.proc.is_alive():
                        try:
                            os.kill(w.proc.pid, signal.SIGTERM)
                        except ProcessLookupError:
                            pass
            else:
                for w in self._workers:
                    try:
                        w.conn.send(None)
                    except OSError:
                        pass
            deadline = time.monotonic() + 5.0
            for w in self._workers:
                w.proc.join(max(0.0, deadline - time.monotonic()))
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(2.0)
                    cleanup = getattr(self.runner, "cleanup_process", None)
                    if cleanup is not None:
                        cleanup(w.proc.pid)
                try:
                    w.conn.close()
                except OSError:
                    pass
            close = getattr(self.runner, "close", None)
            if close is not None:
                close()
        finally:
            if self.stats.finished is None:
                self.stats.finished = time.monotonic()
            self._restore_sigterm()

    shutdown = close

    # -------------------------------------------------------------- processing

    def map(self, samples):
        """Process ``samples`` (any iterable of sample dicts); yield one Outcome per input.

        Raises the first failure under ``errors="abort"`` (after stopping the workers), with its
        ``index``, ``stdout`` and ``stderr`` attached.
        """
        if self._closed:
            raise ValueError("pool is closed")
        if self.threaded:
            return self._map_threads(samples)
        if self.processes == 1:
            return self._map_inline(samples)
        return self._map_workers(samples)

    def _failure(self, exc, index, stdout, stderr):
        """Attach context to a failure, count it, and raise it under errors="abort"."""
        exc.index = index
        exc.stdout = stdout
        exc.stderr = stderr
        self.stats.failed += 1
        if self.errors == "abort":
            raise exc
        if self.errors == "skip":
            self.stats.skipped += 1
        else:
            self.stats.kept += 1
        return exc

    def _outcome(self, r):
        """The Outcome for one result tuple of :func:`_run_one` (raising under "abort")."""
        index, kind, payload, out, err, key, n = r
        st = self.stats
        if kind == 0:
            if n:
                st.outputs += n
            else:
                st.dropped += 1
            if self.encode is None:
                return Outcome(index, key, payload, out, err, None, None, n)
            return Outcome(index, key, [], out, err, None, payload, n)
        if kind == 1:
            exc, kept = payload
            if isinstance(exc, tuple):
                exc = _unpack_exc(exc)
            self._failure(exc, index, out, err)
            st.outputs += n
            if kept is None:
                return Outcome(index, key, [], out, err, exc, None, 0)
            if self.encode is None:
                return Outcome(index, key, [kept], out, err, exc, None, 1)
            return Outcome(index, key, [], out, err, exc, kept, 1)
        raise _unpack_exc(payload) if isinstance(payload, tuple) else payload

    def _size(self, item):
        if item.__class__ is bytes:
            return len(item)
        if isinstance(item, dict):
            return _sample_bytes(item)
        try:
            return len(item)
        except TypeError:
            return 0

    def _map_inline(self, samples):
        runner, decode, encode = self.runner, self.decode, self.encode
        keep = self.errors == "keep"
        st = self.stats
        size = self._size
        try:
            for index, item in enumerate(samples):
                st.inputs += 1
                st.in_bytes += size(item)
                yield self._outcome(_run_one(runner, item, index, decode, encode, keep, False))
        except BaseException:
            self.close(abort=True)
            raise

    def _map_threads(self, samples):
        it = iter(samples)
        st = self.stats
        size_of = self._size
        outcome = self._outcome
        work, results = self._work, self._results
        ordered = self.ordered
        abort = self.errors == "abort"
        max_in_flight = self.max_in_flight
        max_bytes = self.max_bytes_in_flight
        max_pending = 2 * self.processes  # one running and one waiting per thread
        sizes = {}  # index -> input size, for samples read and not yet handed out
        held = {}  # ordered: results waiting for an earlier one
        next_index = 0  # index of the next sample read from the input
        next_out = 0  # ordered: index of the next result to hand out
        pending = 0  # sent to the threads, result not yet received
        bytes_in_flight = 0
        exhausted = False
        failing = False
        lookahead = None
        lookahead_size = 0
        try:
            while True:
                while not exhausted and not failing and pending < max_pending:
                    if len(sizes) >= max_in_flight:
                        break
                    if lookahead is None:
                        try:
                            lookahead = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        lookahead_size = size_of(lookahead)
                        st.inputs += 1
                        st.in_bytes += lookahead_size
                    if sizes and bytes_in_flight + lookahead_size > max_bytes:
                        break
                    work.put((next_index, lookahead))
                    sizes[next_index] = lookahead_size
                    bytes_in_flight += lookahead_size
                    next_index += 1
                    pending += 1
                    lookahead = None
                if not sizes and (exhausted or failing):
                    return
                if pending == 0:  # cannot happen: every sample read is sent or handed out
                    raise RuntimeError("tarproc pool: nothing running and nothing to hand out")
                r = results.get()
                if r[0] < 0:  # a runner thread died of something other than an Exception
                    raise r[2]
                pending -= 1
                if r[1] == 2 or (abort and r[1] == 1):
                    failing = True
                if ordered:
                    held[r[0]] = r
                    while next_out in held:
                        r = held.pop(next_out)
                        bytes_in_flight -= sizes.pop(next_out)
                        next_out += 1
                        yield outcome(r)  # raises a failure under "abort"
                else:
                    bytes_in_flight -= sizes.pop(r[0])
                    yield outcome(r)
        except BaseException:
            self.close(abort=True)
            raise

    def _batch_limit(self):
        t = self._sample_seconds
        if t is None:
            return 1
        if t <= 0:
            return MAX_BATCH
        return max(1, min(MAX_BATCH, int(TARGET_BATCH_SECONDS / t)))

    def _map_workers(self, samples):
        from multiprocessing.connection import wait as _wait_conns

        it = iter(samples)
        st = self.stats
        size_of = self._size
        outcome = self._outcome
        workers = self._workers
        by_conn = {w.conn: w for w in workers}
        ordered = self.ordered
        abort = self.errors == "abort"
        max_in_flight = self.max_in_flight
        max_bytes = self.max_bytes_in_flight
        order = collections.deque()  # ordered: batches in input order, until handed out
        next_index = 0  # index of the next sample read from the input
        in_flight = 0  # samples read and not yet handed out
        bytes_in_flight = 0
        exhausted = False
        failing = False  # abort: a failure was seen, send nothing more
        lookahead = None  # an item read but not yet sent (it did not fit the byte budget)
        lookahead_size = 0
        try:
            while True:
                # ---- dispatch: keep every worker at BATCHES_PER_WORKER batches, within budget
                while not exhausted and not failing:
                    w = min(workers, key=_outstanding)
                    if len(w.batches) >= BATCHES_PER_WORKER:
                        break
                    limit = self._batch_limit()
                    items = []
                    nbytes = 0
                    while len(items) < limit and in_flight < max_in_flight:
                        if lookahead is None:
                            try:
                                lookahead = next(it)
                            except StopIteration:
                                exhausted = True
                                break
                            lookahead_size = size_of(lookahead)
                            st.inputs += 1
                            st.in_bytes += lookahead_size
                        if in_flight and bytes_in_flight + lookahead_size > max_bytes:
                            break
                        items.append(lookahead)
                        lookahead = None
                        in_flight += 1
                        bytes_in_flight += lookahead_size
                        nbytes += lookahead_size
                        if nbytes >= MAX_BATCH_BYTES:
                            break
                    if not items:
                        break
                    batch = _Batch(next_index, len(items), nbytes)
                    next_index += len(items)
                    w.conn.send((batch.start, items))
                    w.batches.append(batch)
                    if ordered:
                        order.append(batch)
                    del items
                if in_flight == 0 and (exhausted or failing):
                    return

                # ---- collect whatever is ready
                done = []
                for conn in _wait_conns([w.conn for w in workers if w.batches]):
                    w = by_conn[conn]
                    try:
                        results, seconds = conn.recv()
                    except (EOFError, OSError):
                        w.proc.join(0.5)
                        raise RuntimeError(
                            f"tarproc worker {w.proc.pid} died (exit code {w.proc.exitcode})"
                        ) from None
                    batch = w.batches.popleft()
                    batch.results = results
                    if results:
                        per = seconds / len(results)
                        old = self._sample_seconds
                        self._sample_seconds = per if old is None else 0.7 * old + 0.3 * per
                    for r in results:
                        if r[1] == 2 or (abort and r[1] == 1):
                            failing = True
                    if not ordered:
                        done.append(batch)

                # ---- hand out results: batches in input order, or as they came
                if ordered:
                    while order and order[0].results is not None:
                        done.append(order.popleft())
                for batch in done:
                    for r in batch.results:
                        yield outcome(r)  # raises a failure under "abort"
                    in_flight -= batch.count
                    bytes_in_flight -= batch.nbytes
                    batch.results = None
        except BaseException:
            self.close(abort=True)
            raise


def process_samples(
    runner,
    samples,
    processes=1,
    ordered=True,
    errors="abort",
    max_in_flight=None,
    stats=None,
    **pool_options,
):
    """Process ``samples`` with ``runner``; yield one :class:`Outcome` per input sample.

    A one-call form of :class:`SamplePool`: the pool is closed when the iteration ends, fails or
    is abandoned. Pass a :class:`PoolStats` as ``stats`` to receive the counts.
    """
    with SamplePool(
        runner,
        processes,
        ordered=ordered,
        errors=errors,
        max_in_flight=max_in_flight,
        **pool_options,
    ) as pool:
        if stats is not None:
            pool.stats = stats
        yield from pool.map(samples)
