"""Process a stream of samples with a runner and write the results: the body of `tarproc`.

`process_stream` is what the `tarproc` command calls and what Python users call for the same
work: read samples from URLs or patterns, run a shell command or Python code on each (N at a
time, in order), route each command's stdout, and write the outputs to a storage URL, committed
only when every sample went through (with `errors="abort"`, a failure leaves nothing behind).
"""

import io
import os
import stat
import sys
import threading
import time

from .errors import DuplicateKeyError
from . import shards, storage, streams, tario
from .tario import reader as tario_reader, writer as tario_writer
from .tario.compress import _PrefixedReader
from .runner import PythonRunner, ShellRunner, PoolStats, SamplePool, process_samples
from .runner.pool import _FAILURES, _pack_exc, _sample_bytes, _unpack_exc
from .runner.sampledir import Record, SampleResult
from .storage.local import full_writer

#: Chunk mode: a chunk of input ends at the first sample boundary after this many bytes.
CHUNK_BYTES = 1 << 20
#: Chunk mode: chunks in flight (sent, or done and waiting for their turn), per process.
CHUNKS_PER_PROCESS = 4


class StreamResult(Record):
    """Counts of one `process_stream` run, for the one-line summary."""

    _fields = ("inputs", "outputs", "dropped", "skipped", "kept", "failed", "in_bytes",
               "out_bytes", "seconds")

    def __init__(self, inputs=0, outputs=0, dropped=0, skipped=0, kept=0, failed=0, in_bytes=0,
                 out_bytes=0, seconds=0.0):
        self.inputs = inputs
        self.outputs = outputs
        self.dropped = dropped
        self.skipped = skipped
        self.kept = kept
        self.failed = failed
        self.in_bytes = in_bytes
        self.out_bytes = out_bytes
        self.seconds = seconds

    def summary(self):
        rate = self.inputs / self.seconds if self.seconds > 0 else 0.0
        mb = self.in_bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.inputs} in, {self.outputs} out, {self.dropped} dropped, {self.skipped} skipped, "
                f"{self.kept} kept, {self.failed} failed; {self.seconds:.2f} s "
                f"({rate:.1f} samples/s, {mb:.1f} MB/s)")


def make_runner(command=None, script=None, python=None, *, interpreter=None, shell="bash",
                basename="sample", tmpdir=None, timeout=None, subdirs=False, add_log=None,
                keep_dirs=False, process_sample=None):
    """The runner for one of: a shell `command`, a `script` file, a `python` file, or a callable.

    With none of them, samples pass through unchanged (copy, recompress, concatenate).
    """
    if process_sample is not None:
        return _CallableRunner(process_sample)
    if python is not None:
        return PythonRunner.from_file(python)
    if command is not None or script is not None:
        return ShellRunner(command, script=script, interpreter=interpreter, shell=shell,
                           basename=basename, tmpdir=tmpdir, timeout=timeout, subdirs=subdirs,
                           add_log=add_log, keep_dirs=keep_dirs)
    return None


def _is_our_stdout(output):
    """True when the output URL is this process's standard output under another name
    (``/dev/stdout``, ``/dev/fd/1``, the file or pipe stdout goes to): the commands' own output
    must not go into the tar stream there either."""
    if not output or "://" in output or output.startswith("pipe:"):
        return False
    try:
        a, b = os.stat(output), os.fstat(1)
    except (OSError, ValueError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class _CallableRunner:
    """Runs a Python callable as `process_sample` (same normalisation as script files; a
    `sys.exit()` in it is a failure of the sample, as there)."""

    def __init__(self, fn):
        self.fn = fn

    def run(self, sample, index=0):
        from .runner.pyscript import normalize_result
        from .runner.sampledir import SampleResult
        from .runner.pool import SignalExit
        from .errors import SampleFailed
        try:
            result = self.fn(sample)
        except (Exception, SystemExit) as exc:
            if isinstance(exc, SignalExit):
                raise
            raise SampleFailed(f"{sample.get('__key__')}: {type(exc).__name__}: {exc}",
                               key=sample.get("__key__"), status="exception") from exc
        return SampleResult(outputs=normalize_result(result, sample), stdout=b"", stderr=b"")


def process_stream(inputs, output=None, runner=None, *, processes=1, ordered=True,
                   errors="abort", count=None, strict=False, max_member_size=None,
                   stdout=None, stderr=None, progress=False, on_failure=None, raw=None):
    """Run `runner` over every sample of `inputs` and write the outputs to `output` (a URL or None).

    `stdout` receives the commands' standard output (default: sys.stdout, or sys.stderr when the
    tar stream itself goes to stdout). `on_failure(error)` is told about each skipped or kept
    failure. Returns a StreamResult; raises the first failure under `errors="abort"`, in which
    case nothing is written at `output`.

    `raw` chooses how samples travel when a runner is given. None (the default) means "chunks"
    when `processes > 1`, the runner runs in worker processes (not `pool_threads`) and there is
    no `count`; else True in the same case with a `count`; else False.

    "chunks": this process cuts each input's (decompressed) tar stream into chunks of whole
    samples (about CHUNK_BYTES; `tario.iter_chunks` reads only the headers' sizes, and names
    near a cut); each chunk goes to a worker, or to this process when the `processes - 1`
    workers have enough (`SamplePool`'s `parent_works`), as one item (for a plain local file,
    where to read it: the worker reads it there, checked, rather than through a pipe). There
    the `-p 1` path runs over it: read with `tario.iter_chunk_samples`, run, write with
    `TarWriter` to bytes; back
    come those bytes, the counts, what was printed and the failures (see `_ChunkRunner`). This
    process writes the chunks in input order (also with `ordered=False`). A chunk never spans
    two inputs. The reader's per-stream state (keys seen for split samples, warnings counted,
    the last member for error messages) is this process's (`tario.StreamState`): a chunk whose
    reading warned or failed in the worker (which then runs nothing), or that holds a key
    seen in an earlier chunk (a split sample: the worker's run of it is dropped, so that
    chunk's samples are run twice), is read again and run here in its turn, with that state,
    as is the end of an input that `iter_chunks` cannot cut (a member over `max_member_size`,
    a damaged header): warnings, errors and their messages are those of `-p 1`. Per-sample
    work in this process is thus a few header fields and a key: -p 2 runs cheap code on tiny
    samples about twice as fast as -p 1 (without chunks it was 1.1 times).

    True (raw samples): this process splits the input into the tar members of each sample and
    writes the members it gets back: the workers decode, run and encode. There are `processes
    - 1` workers; this process runs short batches itself while they all have enough to do, and
    writes the results of clean runs of samples in one piece (see `SamplePool`'s `parent_works`
    and `blocks`). False: sample dicts travel. The output is the same every way, byte for byte.
    """
    started = time.monotonic()
    if stdout is None:
        to_stderr = output == "-" or _is_our_stdout(output)
        stdout = sys.stderr if to_stderr else sys.stdout
        if stdout is None or getattr(stdout, "standard_stream_closed", False):
            # closed (Python sets it to None; cli.common puts a stand-in there): an error
            # saying so, and why, at the first output of a command; stderr: dropped
            stdout = _ClosedStream(None if to_stderr else "standard output")
    stdout = full_writer(getattr(stdout, "buffer", stdout))
    stderr = stderr or sys.stderr or _ClosedStream(None)  # nowhere to say it: dropped
    stderr = full_writer(getattr(stderr, "buffer", stderr))
    unsafe = "skip" if errors == "skip" else "error"
    if raw is None:
        # Workers in other processes: let them read, decode and encode. Runners the pool runs
        # in threads of this process (pool_threads: shell commands) would gain nothing.
        raw = processes > 1 and not getattr(runner, "pool_threads", False)
        if raw and count is None:
            raw = "chunks"
    chunks = raw == "chunks" and runner is not None and count is None
    raw = bool(raw) and runner is not None and not chunks
    read_options = dict(strict=strict, count=count, max_member_size=max_member_size, unsafe=unsafe)
    in_bytes = [0]  # raw: input data bytes, counted as samples are split
    held = {}  # raw: index -> (item, start of its tar members), until its outcome is handled
    if raw:
        samples = _raw_items(inputs, in_bytes, read_options, held)
        codec = dict(decode=_decode_item, encode=_encode_outputs if output else _no_outputs,
                     blocks=True, parent_works=True, describe=_describe_item)
    elif not chunks:
        samples = streams.iter_samples(inputs, **read_options)
        codec = {}

    def emit(out, err, error):
        """Route what one sample (or a run of them) printed, then report its failure."""
        if out:
            stdout.write(out)
            stdout.flush()
        if err:
            stderr.write(err)
            stderr.flush()
        if error is not None and on_failure is not None:
            on_failure(error)

    result = StreamResult()
    sink = streams.SampleWriter(output, sha256=False) if output else None
    if sink is None and isinstance(runner, ShellRunner) and runner.collect and not raw:
        runner = runner.__copy__()  # outputs are not written: do not read them back (a copy
        runner.collect = False      # drops per-process state, and leaves the caller's alone)
    bar = _progress_bar(progress)
    try:
        if chunks:
            del read_options["count"]
            _process_chunks(inputs, sink, runner, processes, errors, read_options, emit, bar, result)
        elif runner is None:
            for sample in samples:
                result.inputs += 1
                result.in_bytes += _size(sample)
                result.outputs += 1
                if sink:
                    sink.write(sample)
                if bar is not None:
                    bar.tick(result.in_bytes)
        elif processes <= 1 and not raw and not getattr(runner, "pool_threads", False):
            # Code that runs in this process, one sample at a time: the loop of _run_samples
            # with no pool between the reader and the writer (~15-20% faster on tiny samples).
            if bar is not None:
                samples = _ticking(samples, bar)
            _run_here(runner, samples, sink.write if sink else _discard, errors, emit, result)
        else:
            stats = PoolStats()
            for outcome in process_samples(runner, samples, processes=processes, ordered=ordered,
                                           errors=errors, stats=stats, **codec):
                emit(outcome.stdout, outcome.stderr, outcome.error)
                if raw:
                    data = outcome.data
                    if outcome.inputs > 1:  # a block of clean samples: one write for them all
                        _write_block(sink, held, outcome.index, data, outcome.count)
                    else:
                        item, start = held.pop(outcome.index)
                        if data == _SAME and sink:  # the output is the input, bytes and all
                            sink.write_raw(memoryview(item)[start:], 1)
                        elif data and sink:
                            sink.write_raw(data, outcome.count)
                        del item
                elif sink:
                    if outcome.data:
                        sink.write_raw(outcome.data, outcome.count)
                    else:
                        for sample in outcome.outputs:
                            sink.write(sample)
                if bar is not None:
                    bar.tick(in_bytes[0] if raw else stats.in_bytes, outcome.inputs)
            for name in ("inputs", "outputs", "dropped", "skipped", "kept", "failed", "in_bytes"):
                setattr(result, name, getattr(stats, name))
            if raw:
                result.in_bytes = in_bytes[0]
        if sink:
            sink.close()
            result.out_bytes = sink.nbytes
    except BaseException as exc:
        if sink:
            sink.abort()
            if isinstance(exc, DuplicateKeyError) and exc.url is None:  # found in a worker
                raise sink.named(exc) from None
        raise
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.monotonic() - started
    return result


# Chunk mode (see process_stream): the pool's items are _Chunk objects, chunks of tar stream; the
# runner, a _ChunkRunner, answers each with one tuple (see _ChunkRunner.run) or None.
def _process_chunks(inputs, sink, runner, processes, errors, read_options, emit, bar, result):
    """Run `runner` over the samples of `inputs` in chunks; write to `sink`, count in `result`."""
    write = sink.write if sink else _discard
    with SamplePool(_ChunkRunner(runner, errors, read_options, bool(sink)), processes,
                    parent_works=True, max_in_flight=CHUNKS_PER_PROCESS * processes,
                    queue_depth=3, describe=_Chunk.describe) as pool:
        for url in shards.expand_inputs(inputs):
            with storage.open_read(url) as raw:
                url = storage.redact(url)  # what samples and messages name from here on
                stream = tario.open_decompressed(raw, url)
                read = stream.read
                state = tario_reader.StreamState()
                keys = _ChunkKeys(state)
                held = {}  # index -> (offset, chunk), until its outcome is handled
                tail = []  # (offset, chunk) where iter_chunks stopped short of the stream's end
                items = _chunk_items(read, url, read_options["max_member_size"], held, tail,
                                     _plain_file(raw, stream))
                for outcome in pool.map(items):
                    before = result.inputs
                    offset, chunk = held.pop(outcome.index)
                    done = outcome.outputs[0]
                    if done is not None and keys.add(done[3], done[4]):
                        _chunk_done(done, chunk, sink, emit, result, state)
                    else:  # read and run it here, knowing the stream before it
                        keys.sync()
                        samples = tario_reader.iter_chunk_samples(chunk, url, offset, state, **read_options)
                        _run_here(runner, samples, write, errors, emit, result)
                    del chunk
                    if bar is not None:
                        bar.tick(result.in_bytes, result.inputs - before)
                if tail:
                    before = result.inputs
                    (offset, chunk), = tail
                    keys.sync()
                    samples = tario_reader.iter_chunk_samples(chunk, url, offset, state, read=read,
                                                              **read_options)
                    del tail, chunk
                    _run_here(runner, samples, write, errors, emit, result)
                    if bar is not None:
                        bar.tick(result.in_bytes, result.inputs - before)


def _chunk_items(read, url, max_member_size, held, tail, path=None):
    """The pool's items (_Chunk) for the chunks of one input (see tario.iter_chunks); a last
    chunk the stream goes on after is put in `tail`, for this process to read on from. With
    the `path` of the input, a plain local file, a worker reads the chunk there itself."""
    index = 0
    for offset, chunk, more in tario_reader.iter_chunks(read, url, target=CHUNK_BYTES,
                                                        max_member_size=max_member_size):
        if more:
            tail.append((offset, chunk))
            return
        held[index] = (offset, chunk)
        index += 1
        yield _Chunk(url, offset, len(chunk), None if path else chunk, path, chunk[:512], chunk[-512:])


def _plain_file(raw, stream):
    """The path of the input `raw` if it is a local regular file read as it is (no
    decompression): stream offsets are file offsets there. Else None."""
    if type(raw) is not io.BufferedReader or not isinstance(stream, _PrefixedReader):
        return None
    try:
        st = os.fstat(raw.fileno())
        path = os.path.abspath(raw.name)  # (a name such as "<stdin>" names no such file)
        if stat.S_ISREG(st.st_mode) and os.path.samestat(st, os.stat(path)):
            return path
    except (OSError, TypeError, ValueError):
        pass
    return None


class _Chunk:
    """A chunk of input as the pool's item: its bytes, or where a worker reads them (`path`,
    a plain file that this process reads too, `offset` and `size`), which spares sending
    them. `len` is its size (the pool counts bytes in flight with it); `get` answers None (the
    pool asks items for a "__key__")."""

    __slots__ = ("url", "offset", "size", "data", "path", "head", "tail")

    def __init__(self, url, offset, size, data, path, head, tail):
        self.url = url
        self.offset = offset
        self.size = size
        self.data = data
        self.path = path
        self.head = head  # its first and last 512 bytes, to check what is read at `path`
        self.tail = tail  # (a last chunk with a byte standing for data after the end of the
        # archive differs from the file there: read returns None, and it is read here then)

    def __len__(self):
        return self.size

    def get(self, key, default=None):
        return default

    def describe(self):
        """The chunk's samples for an error message, "'first' .. 'last' of URL" (the pool's
        `describe`, when a worker dies; reads the chunk again)."""
        where = f"bytes {self.offset}-{self.offset + self.size} of {self.url}"
        files = {}
        try:
            chunk = self.read(files)
            if chunk is None:
                return where
            state = tario_reader.StreamState(raise_warnings=True)
            keys = [s["__key__"] for s in tario_reader.iter_chunk_samples(chunk, self.url, self.offset, state)]
        except Exception:  # noqa: BLE001 - then the bytes are what we can name
            return where
        finally:
            for fd in files.values():
                os.close(fd)
        if not keys:
            return where
        names = repr(keys[0]) if len(keys) == 1 else f"{keys[0]!r} .. {keys[-1]!r}"
        return f"{names} of {self.url}"

    def read(self, files):
        """The chunk's bytes, or None if the file does not hold them (any more); `files`
        keeps this process's open files by path."""
        if self.data is not None:
            return self.data
        fd = files.get(self.path)
        if fd is None:
            fd = files[self.path] = os.open(self.path, os.O_RDONLY)
        data = os.pread(fd, self.size, self.offset)
        if len(data) == self.size and data.startswith(self.head) and data.endswith(self.tail):
            return data
        return None


class _ChunkKeys:
    """The keys of the chunks of one input handled so far, to notice a key seen in an earlier
    chunk (a split sample) as the reader does with `state.seen`, at less cost per key when they
    come in order (as in most shards): chunks whose keys all sort after every earlier key
    are kept as their "\n"-joined keys, and go into `state.seen` only when some other chunk
    comes, or when the reader needs them (`sync`)."""

    def __init__(self, state):
        self.seen = state.seen
        self.pending = []  # "\n"-joined keys of chunks, in order, not yet in self.seen
        self.top = ""  # the greatest key of the chunks in pending; None: no more pending

    def add(self, joined, ordered):
        """Remember the keys of a chunk (`joined`; `ordered`: they are in increasing order);
        False, and nothing remembered, if one of them was seen before."""
        if not joined:
            return True
        if ordered and self.top is not None:
            nl = joined.find("\n")
            if (joined if nl < 0 else joined[:nl]) > self.top:
                self.pending.append(joined)
                self.top = joined[joined.rfind("\n") + 1 :]
                return True
        self.sync()
        return self.seen.add_all(joined.split("\n"))

    def sync(self):
        """Put the pending keys into `state.seen`; from now on every key goes there."""
        for joined in self.pending:
            self.seen.add_all(joined.split("\n"))
        self.pending = []
        self.top = None


_COUNTS = ("inputs", "outputs", "dropped", "skipped", "kept", "failed", "in_bytes")


def _add_counts(result, counts):
    for name, n in zip(_COUNTS, counts):
        setattr(result, name, getattr(result, name) + n)


def _chunk_done(done, chunk, sink, emit, result, state):
    """Write and report what a _ChunkRunner made of `chunk`; raise its failure (errors="abort")."""
    data, counts, events, _, _, last, failure, keys = done
    first = result.inputs  # index of the chunk's first sample in the stream of samples
    for out, err, error in events:
        if error is not None:
            error = _unpack_exc(error)
            error.index += first
        emit(out, err, error)
    if failure is not None:
        failure = _unpack_exc(failure)
        failure.index += first
        raise failure
    if data and sink:
        sink.write_raw(chunk if data == _SAME else data, counts[1], keys=keys)
    _add_counts(result, counts)
    if last is not None:
        state.last = last


def _run_here(runner, samples, write, errors, emit, result):
    """Run `runner` over `samples` in this process, writing and reporting at once."""
    counts, failure = _run_samples(runner, samples, write, errors, emit, result.inputs)
    if failure is not None:
        raise failure
    _add_counts(result, counts)


def _discard(sample):
    pass


def _ticking(samples, bar):
    """`samples`, ticking the progress bar with each (and the input bytes so far)."""
    nbytes = 0
    for sample in samples:
        nbytes += _size(sample)
        bar.tick(nbytes)
        yield sample


def _run_samples(runner, samples, write, errors, emit, index=0):
    """Run `runner` over `samples` as the pool does at -p 1: each output sample to `write`,
    what each printed and its failure (skip, keep) to `emit(stdout, stderr, error)`.

    Returns the counts (as _COUNTS) and, under errors="abort", the failure that stopped it (not
    raised: what came before it is to be reported first), else None. `index` is the first
    sample's.
    """
    inputs = outputs = dropped = skipped = kept = failed = nbytes = 0
    run = runner.run
    failure = None
    for sample in samples:
        inputs += 1
        nbytes += _sample_bytes(sample)
        try:
            r = run(sample, index)
        except _FAILURES as exc:
            exc.index = index
            exc.stdout = getattr(exc, "stdout", b"")
            exc.stderr = getattr(exc, "stderr", b"")
            failed += 1
            if errors == "abort":
                failure = exc
                break
            emit(exc.stdout, exc.stderr, exc)
            if errors == "skip":
                skipped += 1
            else:
                kept += 1
                outputs += 1
                write(sample)
        else:
            outs = r.outputs
            if outs:
                outputs += len(outs)
                for out in outs:
                    write(out)
            else:
                dropped += 1
            if r.stdout or r.stderr:
                emit(r.stdout, r.stderr, None)
        index += 1
    return (inputs, outputs, dropped, skipped, kept, failed, nbytes), failure


class _ChunkRunner:
    """The pool's runner in chunk mode: runs `runner` over the samples of a chunk as `-p 1`
    runs it over a stream (see process_stream)."""

    def __init__(self, runner, errors, read_options, outputs=True):
        self.runner = runner
        self.errors = errors
        self.read_options = read_options
        self.outputs = outputs  # False: the outputs are dropped, not even encoded
        self.files = {}  # path -> open file descriptor, of the inputs read in this process

    def __getstate__(self):
        return dict(self.__dict__, files={})

    def __setstate__(self, state):
        self.__dict__.update(state)

    def load(self):
        load = getattr(self.runner, "load", None)
        if load is not None:
            load()

    def close(self):
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def run(self, item, index=0):
        """A SampleResult whose one output is `(data, counts, events, keys, ordered, last,
        failure, out_keys)`: the chunk's output samples as tar members (or _SAME), the counts
        (as _COUNTS), `(stdout, stderr, packed failure or None)` runs to report in order, the
        input keys ("\n"-joined) and whether they increase, the last member's name, the packed
        failure that stopped it (errors="abort"), and the keys of the first and last output
        samples (for `TarWriter.write_raw`); or None, before anything runs, if reading the
        chunk warned or failed."""
        url = item.url
        # (room for a key a member; a warning raised, to stop at once)
        state = tario_reader.StreamState(item.size >> 9, raise_warnings=True)
        pairs = []  # (sample, what the reader knew of its headers: see tario's _last_read)
        last_read = tario_reader._last_read
        try:
            chunk = item.read(self.files)
            if chunk is None:
                return SampleResult([None])
            for sample in tario_reader.iter_chunk_samples(chunk, url, item.offset, state,
                                                          **self.read_options):
                pairs.append((sample, last_read[0]))
        except Exception:  # FormatError, UnsafeNameError, TarioWarning; OSError reading
            return SampleResult([None])
        sink = tario_writer._Collector()
        writer = tario.TarWriter(sink)
        events = []
        counts, failure = _run_samples(self.runner, _replay(pairs),
                                       writer.write if self.outputs else _discard, self.errors,
                                       lambda out, err, error: _add_event(events, out, err, error))
        writer._flush()
        events = [(b"".join(outs), err, None if error is None else _pack_exc(error))
                  for outs, err, error in events]
        keys = [sample["__key__"] for sample, _ in pairs]
        ordered = keys == sorted(keys)  # (and distinct, or the reader would have warned)
        data = b"".join(sink.parts)
        out_keys = (tario_writer.first_key(data), writer.last_key)
        if data == chunk:  # the output is the input, bytes and all: do not send it back
            data = _SAME
        done = (data, counts, events, "\n".join(keys), ordered, state.last,
                None if failure is None else _pack_exc(failure), out_keys)
        return SampleResult([done])


def _replay(pairs):
    """The samples of `pairs`, each with what the reader knew of its headers set as it was
    when the reader yielded it, so that the writer reuses them as at -p 1."""
    last_read = tario_reader._last_read
    for sample, known in pairs:
        last_read[0] = known
        try:
            yield sample
        finally:
            last_read[0] = None


def _add_event(events, out, err, error):
    """Add what a sample printed, and its failure, to `events` ([stdout parts, stderr, error]
    each): to the last one when that one printed nothing on stderr and did not fail (the
    order of everything is the same)."""
    if events:
        last = events[-1]
        if not last[1] and last[2] is None:
            last[0].append(out)
            last[1] = err
            last[2] = error
            return
    events.append([[out], err, error])


# Raw mode: the pool's items are bytes `OFFSET ULEN\nURL` followed by the sample's tar members
# (tario.iter_raw_samples); workers decode them, run the runner and encode the outputs as tar
# members, or answer _SAME when the outputs are the input sample as it was (identity, filters,
# errors="keep"): the parent then writes the input's own members, which are byte for byte what
# encoding would give (tario checks that), and saves moving them back.
_SAME = b"="  # never a tar encoding: those are whole 512-byte blocks
_decoded = threading.local()  # .plain: (key, fields, raw) of the sample this thread just decoded


def _raw_items(inputs, in_bytes, read_options, held):
    last = None
    tail = b""
    index = 0
    for url, offset, raw, nbytes in streams.iter_raw_samples(inputs, **read_options):
        if url is not last:
            last = url
            ub = url.encode("utf-8", "surrogateescape")
            tail = b" %d\n" % len(ub) + ub
        in_bytes[0] += nbytes
        head = b"%d" % offset + tail
        item = head + raw
        held[index] = (item, len(head))
        index += 1
        yield item


def _write_block(sink, held, index, datas, count):
    """Write the outputs of the consecutive samples from ``index`` in one piece (raw mode)."""
    parts = []
    pop = held.pop
    for i, data in enumerate(datas, index):
        item, start = pop(i)
        if data == _SAME:
            parts.append(memoryview(item)[start:])
        elif data:
            parts.append(data)
    if sink and parts:
        sink.write_raw_parts(parts, count)


def _decode_item(item):
    """An item of `_raw_items` as a sample dict (runs in the workers)."""
    nl = item.index(b"\n", 0, 64)
    offset, ulen = item[:nl].split(b" ")
    start = nl + 1
    end = start + int(ulen)
    url = item[start:end].decode("utf-8", "surrogateescape")
    _decoded.plain = None
    sample, _decoded.plain = tario_reader._decode_raw(item[end:], url, int(offset))
    return sample


def _describe_item(item):
    """An item of `_raw_items` for an error message: its key, as repr (when a worker dies)."""
    nl = item.index(b"\n", 0, 64)
    end = nl + 1 + int(item[:nl].split(b" ")[1])
    return repr(tario_writer.first_key(item[end:]))


def _encode_outputs(outputs):
    """The outputs of one sample as tar members, or _SAME (runs in the workers)."""
    known = getattr(_decoded, "plain", None)
    if known is not None and len(outputs) == 1 and tario_writer._same_sample(outputs[0], known[0], known[1]):
        return _SAME
    return tario.encode_samples(outputs)


def _no_outputs(outputs):
    """The encoding of outputs that are dropped (no output URL): none (runs in the workers)."""
    return b""


class _ClosedStream:
    """Stands for a closed standard stream where the commands' output goes: writing to it
    raises an OSError saying which one is closed (the job stops with that error at the first
    output: what the commands print is not silently lost); with `name` None, what is written
    is dropped (stderr: there is nowhere to say it)."""

    def __init__(self, name):
        self.name = name

    def write(self, data):
        if self.name is None:
            return len(data)
        import errno

        raise OSError(errno.EBADF, f"cannot write what the commands printed: {self.name} is "
                                   "closed (redirect it, e.g. >/dev/null)")

    def flush(self):
        pass


def _size(sample):
    return sum(len(v) for k, v in sample.items() if isinstance(v, bytes))


class _Progress:
    """A tqdm bar on stderr counting samples, with MB/s of input in its postfix."""

    def __init__(self):
        from tqdm import tqdm

        from .progress import bar_width_options
        self.bar = tqdm(unit=" samples", file=sys.stderr, mininterval=0.5,
                        **bar_width_options(sys.stderr))
        self.started = time.monotonic()
        self.last = 0.0

    def tick(self, in_bytes, n=1):
        self.bar.update(n)
        now = time.monotonic()
        if now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix_str(f"{in_bytes / 1e6 / max(now - self.started, 1e-9):.1f} MB/s", refresh=False)

    def close(self):
        self.bar.close()


def _progress_bar(enabled):
    return _Progress() if enabled else None
