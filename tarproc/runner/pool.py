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
of a round trip between processes, slow shell commands still go out one by one. With
``parent_works`` (what ``tarproc -P`` uses), there are N-1 workers and the calling process runs
short batches itself whenever they all have their fill; with ``blocks``, workers send the results
of consecutive samples that went through cleanly as one block (see :class:`Outcome`).

Memory is bounded whatever the length of the stream: at most ``max_in_flight`` samples (default
:data:`IN_FLIGHT_PER_PROCESS` × N) and about ``max_bytes_in_flight`` bytes of input (default
:data:`BYTES_IN_FLIGHT_PER_PROCESS` × N, but always at least one sample) have been taken from the
input iterator and not yet yielded, including results held back to restore input order.

Failures (:class:`SampleFailed`, :class:`UnsafeNameError`) follow ``errors``: ``"abort"`` stops
the workers and raises the failure (the first in input order when ordered); ``"skip"`` yields an
Outcome with no outputs; ``"keep"`` yields the input sample unchanged. Other exceptions (bugs,
a full disk) always abort; so does a KeyboardInterrupt or SystemExit that a runner lets through
in a worker (raised again in the calling process, as at ``processes=1``). A worker process that
ends without being asked to (``os._exit``, a segfault in user code, the OOM killer) is a
:class:`WorkerDied` naming it and the samples it had. Closing the pool — on completion, on
error, on KeyboardInterrupt, or on SIGTERM, which it turns into ``SignalExit(143)`` (a
SystemExit) while open — stops the workers, which kill their commands' process groups and
remove their temp dirs first.
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import sys
import threading
import time

from tarproc.errors import SampleFailed, TarprocError, UnsafeNameError
from tarproc.runner.sampledir import Record

__all__ = ["SamplePool", "Outcome", "PoolStats", "process_samples", "SignalExit", "WorkerDied"]

#: Largest number of samples in one batch sent to a worker.
MAX_BATCH = 64
#: A batch is closed once its samples hold this many bytes (a batch has at least one sample).
MAX_BATCH_BYTES = 1 << 20
#: A batch should take about this long to process (seconds), once sample times are known.
TARGET_BATCH_SECONDS = 0.005
#: With parent_works, the calling process runs batches of 1/INLINE_SHARE of the usual size.
INLINE_SHARE = 8
#: Batches queued per worker (one running, one waiting), so a worker never idles for input.
BATCHES_PER_WORKER = 2
#: A worker's thread switch interval (seconds; see _worker_main).
SWITCH_INTERVAL = 0.0002
#: Default bound on samples in flight, per process.
IN_FLIGHT_PER_PROCESS = 4 * MAX_BATCH
#: Default bound on input bytes in flight, per process.
BYTES_IN_FLIGHT_PER_PROCESS = 64 << 20

_FAILURES = (SampleFailed, UnsafeNameError)
ERROR_POLICIES = ("abort", "skip", "keep")


class SignalExit(SystemExit):
    """The SystemExit that SIGTERM raises in a worker process, or in the calling process while a
    pool is open: the end of the process. Runners tell it from a ``sys.exit()`` in user code,
    which is a failure of the sample that was running (see PythonRunner)."""


class WorkerDied(TarprocError):
    """A worker process ended without being asked to (``os._exit`` or a crash in user code,
    the OOM killer...). Its message names the process, how it ended and the samples it had
    (see ``SamplePool.describe``); ``samples`` holds those descriptions."""

    def __init__(self, message, pid=None, exitcode=None, samples=()):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.samples = list(samples)


def _how_it_ended(exitcode):
    """``"exit status 0"`` or ``"killed by signal 11 (SIGSEGV)"`` for a process's exit code."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode >= 0:
        return f"exit status {exitcode}"
    try:
        name = f" ({signal.Signals(-exitcode).name})"
    except ValueError:
        name = ""
    return f"killed by signal {-exitcode}{name}"


def _describe_sample(item):
    """The default ``describe`` of a pool: a sample dict's key, as repr; else None."""
    if isinstance(item, dict):
        key = item.get("__key__")
        if key is not None:
            return repr(key)
    return None


class Outcome(Record):
    """What became of one input sample.

    ``outputs``: the output samples to write (empty when dropped or skipped; ``[input]`` when a
    failure is kept). With an ``encode`` function, ``outputs`` is empty and ``data`` holds the
    encoded outputs instead; ``count`` is the number of output samples either way. ``error``:
    the SampleFailed/UnsafeNameError under ``skip``/``keep``, else None. ``stdout``/``stderr``:
    what the command printed. ``key``: the input sample's key (None if it could not be decoded).

    ``inputs`` is 1, except for a *block* (pools made with ``blocks=True``): consecutive inputs
    that all went through cleanly (no failure, nothing printed) in one Outcome, ``index`` the
    first one's, ``key`` None, ``data`` the list of their encodings in order, ``count`` their
    outputs in all.
    """

    __slots__ = ("index", "key", "outputs", "stdout", "stderr", "error", "data", "count", "inputs")

    def __init__(self, index, key, outputs, stdout=b"", stderr=b"", error=None, data=None,
                 count=0, inputs=1):
        self.index = index
        self.key = key
        self.outputs = outputs
        self.stdout = stdout
        self.stderr = stderr
        self.error = error
        self.data = data
        self.count = count
        self.inputs = inputs


class PoolStats(Record):
    """Counts for the end-of-run summary.

    ``inputs``: samples read; ``outputs``: samples produced; ``dropped``: inputs that produced no
    output without failing; ``skipped``/``kept``: failures dropped or passed through;
    ``failed``: all failures (``skipped + kept``, plus one if the run aborted).
    """

    __slots__ = ("inputs", "outputs", "dropped", "skipped", "kept", "failed", "in_bytes",
                 "started", "finished")

    def __init__(self, inputs=0, outputs=0, dropped=0, skipped=0, kept=0, failed=0, in_bytes=0,
                 started=None, finished=None):
        self.inputs = inputs
        self.outputs = outputs
        self.dropped = dropped
        self.skipped = skipped
        self.kept = kept
        self.failed = failed
        self.in_bytes = in_bytes
        self.started = time.monotonic() if started is None else started
        self.finished = finished

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
    import traceback

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

    In a worker (``pack``), a KeyboardInterrupt or SystemExit that the runner let through (user
    code raised it: workers ignore SIGINT) is sent back as kind 2 too, for the calling process
    to raise, rather than ending the worker with a traceback; SignalExit (SIGTERM) still ends it.
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
    except BaseException as exc:
        if not pack or isinstance(exc, SignalExit):
            raise
        return (index, 2, _pack_exc(exc), b"", b"", None, 0)


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
        raise SignalExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    _die_with_parent()
    for c in inherited:  # parent ends of other workers' pipes, inherited through fork
        try:
            c.close()
        except OSError:
            pass
    decode, encode, keep, blocks = options
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

    def _sender():
        # Send results while the next batch runs: a large result would otherwise wait in
        # send() until the parent reads it, which may be busy running a batch itself.
        try:
            while True:
                data = outbox.get()
                if data is None:
                    return
                conn.send_bytes(data)
        except OSError:  # the parent is gone: _reader ends the loop
            pass

    from multiprocessing.reduction import ForkingPickler

    # The threads moving messages wait for the GIL at every read or write of a large one
    # while a batch runs: let them have it soon (the default is 5 ms), or the parent waits
    # in its send, and the worker for its next batch.
    sys.setswitchinterval(SWITCH_INTERVAL)
    outbox = queue.SimpleQueue()
    threading.Thread(target=_reader, daemon=True).start()
    threading.Thread(target=_sender, daemon=True).start()
    try:
        while True:
            batch = inbox.get()
            if batch is None:  # (the parent sends it once it has every result)
                break
            t0 = time.perf_counter()
            start, items = batch
            results = _run_batch((runner, decode, encode, keep, blocks), start, items, True)
            outbox.put(ForkingPickler.dumps((results, time.perf_counter() - t0)))
    finally:
        outbox.put(None)
        close = getattr(runner, "close", None)
        if close is not None:
            close()
        try:
            conn.close()
        except OSError:
            pass


def _blocks(results):
    """Results of one batch with each run of clean ones (kind 0, nothing printed) as one block.

    A block is ``(first index, 3, (encodings, inputs, dropped), b"", b"", None, outputs)``:
    fewer objects to send and to hand out, for samples that need nothing but writing.
    """
    out = []
    run = []
    for r in results:
        if r[1] == 0 and not r[3] and not r[4]:
            run.append(r)
            continue
        if run:
            out.append(_block(run))
            run = []
        out.append(r)
    if run:
        out.append(_block(run))
    return out


def _block(run):
    if len(run) == 1:
        return run[0]
    total = 0
    dropped = 0
    for r in run:
        if r[6]:
            total += r[6]
        else:
            dropped += 1
    return (run[0][0], 3, ([r[2] for r in run], len(run), dropped), b"", b"", None, total)


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
    decode, encode, keep, _ = options
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
    prepared, the previous dir removed (or, with a runner that has ``recycle``, tidied for the
    sample after next to reuse), and the outputs read back while a command runs. A result is put
    only once that file work is done, just before the wait: the calling thread, woken by it, then
    runs while this one waits, rather than taking turns with it for the GIL at each system call.
    """
    decode, encode, keep, _ = options
    release = getattr(runner, "recycle", None) or runner.cleanup
    wait = getattr(runner, "wait", None)

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
    done = None  # the result of previous, not yet put
    ending = False
    try:
        while True:
            if current is None:
                if staged is None:
                    if done is not None:
                        results.put(done)
                        done = None
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
                release(previous)
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
            if done is not None:
                # Put only now, the file work above done: the calling thread, woken by it,
                # then runs while this one waits, instead of taking turns with it for the GIL.
                results.put(done)
                done = None
            index, sample, job = current
            try:
                if wait is not None:
                    wait(job)
                else:
                    runner.reap(job)
                # Start the next command before taking this one's output and reading it back.
                current = None
                if staged is not None and not stop.is_set():
                    current, staged = launch(staged), None
                if wait is not None:
                    runner.reap(job)
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
            done = r
    finally:
        if done is not None:
            results.put(done)
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
    """Consecutive input samples sent to one worker as one message. ``items``: the samples, kept
    while the worker has them (to name them if it dies; they are in flight and counted so
    anyway)."""

    __slots__ = ("start", "count", "nbytes", "results", "items")

    def __init__(self, start, count, nbytes):
        self.start = start
        self.count = count
        self.nbytes = nbytes
        self.results = None
        self.items = None


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

    ``blocks`` (with ``encode``, worker processes only): the outcomes of consecutive samples of a
    batch that went through cleanly may come as one block (see :class:`Outcome`), which saves
    the calling process work per sample when samples are tiny.

    ``parent_works`` (worker processes only): start ``processes - 1`` workers and let the calling
    process run a batch itself whenever every worker has its fill: N processes in all share N
    cores, instead of N workers plus a feeding process (which, when it has as much to do per
    sample as splitting a tar stream of tiny samples, is one process too many).

    ``queue_depth``: batches sent to a worker and not yet answered, at most (default
    :data:`BATCHES_PER_WORKER`); with ``parent_works``, the calling process runs a batch when
    every worker has that many. Long batches (chunks of many samples) want one more: a worker
    whose last answer has not been read yet (the calling process was running a batch) then
    still has one to run.

    ``describe(item) -> str | None`` (runs in the calling process, only when a worker process
    dies): how to name an input item in the :class:`WorkerDied` error; default: a sample dict's
    ``__key__``. A worker that ends without being asked to (``os._exit``, a segfault, the OOM
    killer) is a WorkerDied naming its pid, how it ended and the items it had, never a
    traceback, nor a BrokenPipeError (which the commands take for a closed standard output).
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
        blocks=False,
        parent_works=False,
        queue_depth=BATCHES_PER_WORKER,
        describe=None,
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
        self.blocks = bool(blocks) and encode is not None
        self.parent_works = bool(parent_works)
        self.queue_depth = max(1, int(queue_depth))
        self.describe = describe or _describe_sample
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
            raise SignalExit(128 + signum)

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
        options = (self.decode, self.encode, self.errors == "keep", self.blocks)
        for _ in range(self.processes - 1 if self.parent_works else self.processes):
            parent_end, child_end = ctx.Pipe(duplex=True)
            inherited = [w.conn for w in self._workers] + [parent_end] if forking else []
            proc = ctx.Process(
                target=_worker_main,
                args=(child_end, self.runner, options, inherited),
                name="tarproc-worker",
                daemon=True,
            )
            try:
                proc.start()
            except OSError as exc:  # (EAGAIN, ENOMEM: a limit on processes or memory)
                raise TarprocError(
                    f"cannot start worker process {len(self._workers) + 1} of "
                    f"{self.processes} samples at once: {exc.strerror or exc}") from None
            child_end.close()
            self._workers.append(_Worker(proc, parent_end))

    def _start_threads(self):
        self._work = queue.SimpleQueue()
        self._results = queue.SimpleQueue()
        self._stop = threading.Event()
        options = (self.decode, self.encode, self.errors == "keep", False)
        for i in range(self.processes):
            t = threading.Thread(
                target=_thread_main,
                args=(self.runner, self._work, self._results, options, self._stop),
                name=f"tarproc-runner-{i}",
                daemon=True,
            )
            try:
                t.start()
            except RuntimeError as exc:  # "can't start new thread": a limit on threads or memory
                raise TarprocError(
                    f"cannot start runner thread {i + 1} of {self.processes} samples at once: "
                    f"{exc}") from None
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
        if kind == 3:  # a block of clean results (see _blocks)
            data, inputs, dropped = payload
            st.outputs += n
            st.dropped += dropped
            return Outcome(index, None, [], b"", b"", None, data, n, inputs)
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
        # Per thread: one running, one prepared while it runs, and one queued, so that a thread
        # finds the sample after next waiting as soon as it starts the next command (else
        # it would prepare it only once the command ends, in the path between two commands).
        max_pending = 3 * self.processes
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
        parent_works = self.parent_works
        run_options = (self.runner, self.decode, self.encode, self.errors == "keep", self.blocks)
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
                # ---- dispatch: keep every worker at queue_depth batches, within budget;
                # with parent_works, run one more batch here when they all have enough.
                ran_here = None
                while not exhausted and not failing:
                    w = min(workers, key=_outstanding) if workers else None
                    here = w is None or len(w.batches) >= self.queue_depth
                    if here and not parent_works:
                        break
                    # Room for this many more samples (counts and bytes are added up once
                    # per batch: this loop runs for every sample of the stream).
                    limit = self._batch_limit()
                    if here:  # a short one: back soon to keep the workers fed
                        limit = max(1, limit // INLINE_SHARE)
                    room = min(limit, max_in_flight - in_flight)
                    items = []
                    add = items.append
                    nbytes = 0
                    byte_room = max_bytes - bytes_in_flight
                    while room > 0:
                        if lookahead is None:
                            try:
                                lookahead = next(it)
                            except StopIteration:
                                exhausted = True
                                break
                            lookahead_size = (len(lookahead) if lookahead.__class__ is bytes
                                              else size_of(lookahead))
                            st.inputs += 1
                            st.in_bytes += lookahead_size
                        if nbytes + lookahead_size > byte_room and (in_flight or items):
                            break
                        add(lookahead)
                        lookahead = None
                        room -= 1
                        nbytes += lookahead_size
                        if nbytes >= MAX_BATCH_BYTES:
                            break
                    if not items:
                        break
                    count = len(items)
                    in_flight += count
                    bytes_in_flight += nbytes
                    batch = _Batch(next_index, count, nbytes)
                    next_index += count
                    if ordered:
                        order.append(batch)
                    if here:
                        t0 = time.perf_counter()
                        batch.results = _run_batch(run_options, batch.start, items)
                        self._timed(batch, time.perf_counter() - t0)
                        ran_here = batch
                        del items
                        break  # see what the workers have done meanwhile
                    try:
                        w.conn.send((batch.start, items))
                    except OSError:  # (BrokenPipeError: the worker is gone)
                        raise self._worker_died(w) from None
                    batch.items = items
                    w.batches.append(batch)
                    del items
                if in_flight == 0 and (exhausted or failing):
                    return

                # ---- collect whatever is ready (without waiting, after a batch run here)
                done = []
                if ran_here is not None:
                    for r in ran_here.results:
                        if r[1] == 2 or (abort and r[1] == 1):
                            failing = True
                    if not ordered:
                        done.append(ran_here)
                busy = [w.conn for w in workers if w.batches]
                ready = _wait_conns(busy, 0 if ran_here is not None else None) if busy else []
                for conn in ready:
                    w = by_conn[conn]
                    while True:  # every answer already there: the worker may have run several
                        try:
                            results, seconds = conn.recv()
                        except (EOFError, OSError):
                            raise self._worker_died(w) from None
                        batch = w.batches.popleft()
                        batch.results = results
                        batch.items = None
                        self._timed(batch, seconds)
                        for r in results:
                            if r[1] == 2 or (abort and r[1] == 1):
                                failing = True
                        if not ordered:
                            done.append(batch)
                        if not w.batches or not conn.poll():
                            break

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

    def _worker_died(self, w):
        """The WorkerDied error for worker ``w``, whose pipe broke: its pid, how it ended, and the
        samples of the batches it had (it died running one of them, or sending its results)."""
        w.proc.join(2.0)
        samples = []
        for batch in w.batches:
            items = batch.items or ()
            names = []
            for item in (items[:1] if len(items) < 2 else (items[0], items[-1])):
                try:
                    names.append(self.describe(item))
                except Exception:  # noqa: BLE001 - a name is a nicety, the error is the point
                    names.append(None)
            if None in names or not names:
                last = batch.start + batch.count - 1
                what = f"#{batch.start}" if last == batch.start else f"#{batch.start}-#{last}"
            else:
                what = " .. ".join(dict.fromkeys(names))  # (one name if first == last)
            samples.append(what)
        how = _how_it_ended(w.proc.exitcode)
        message = f"a worker process (pid {w.proc.pid}) died ({how})"
        if samples:
            shown = ", ".join(samples[:4]) + (f" and {len(samples) - 4} more" if len(samples) > 4 else "")
            message += f" while running sample(s) {shown}"
        return WorkerDied(message, w.proc.pid, w.proc.exitcode, samples)

    def _timed(self, batch, seconds):
        """Update the estimate of one sample's processing time from a batch's."""
        results = batch.results
        if results:
            n = batch.count if results[-1][1] != 2 else len(results)
            per = seconds / max(1, n)  # (a block stands for several samples)
            old = self._sample_seconds
            self._sample_seconds = per if old is None else 0.7 * old + 0.3 * per


def _run_batch(options, start, items, pack=False):
    """Run a batch of items here: in a worker process (pack=True, see _run_one) or in the parent."""
    runner, decode, encode, keep, blocks = options
    results = []
    for index, item in enumerate(items, start):
        r = _run_one(runner, item, index, decode, encode, keep, pack)
        results.append(r)
        if r[1] == 2:
            break
    if blocks and len(results) > 1:
        results = _blocks(results)
    return results


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
