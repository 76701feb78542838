"""Process a stream of samples with a runner and write the results: the body of `tarproc`.

`process_stream` is what the `tarproc` command calls and what Python users call for the same
work: read samples from URLs or patterns, run a shell command or Python code on each (N at a
time, in order), route each command's stdout, and write the outputs to a storage URL, committed
only when every sample went through (with `errors="abort"`, a failure leaves nothing behind).
"""

import sys
import threading
import time

from . import streams, tario
from .tario import reader as tario_reader, writer as tario_writer
from .runner import PythonRunner, ShellRunner, PoolStats, process_samples
from .runner.sampledir import Record


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


class _CallableRunner:
    """Runs a Python callable as `process_sample` (same normalisation as script files)."""

    def __init__(self, fn):
        self.fn = fn

    def run(self, sample, index=0):
        from .runner.pyscript import normalize_result
        from .runner.sampledir import SampleResult
        from .errors import SampleFailed
        try:
            result = self.fn(sample)
        except Exception as exc:
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

    `raw` chooses how samples travel when a runner is given; None (the default) means True when
    `processes > 1` and the runner runs in worker processes (not `pool_threads`). Raw, this
    process splits the input into the tar members of each sample and writes the members it gets
    back: the workers decode, run and encode (the parent alone would otherwise be the bottleneck
    of cheap per-sample code). There are `processes - 1` workers; this process runs short batches
    itself while they all have enough to do, and writes the results of clean runs of samples in
    one piece (see `SamplePool`'s `parent_works` and `blocks`). The output is the same either
    way, byte for byte.
    """
    started = time.monotonic()
    if stdout is None:
        stdout = sys.stderr if output == "-" else sys.stdout
    stdout = getattr(stdout, "buffer", stdout)
    stderr = getattr(stderr or sys.stderr, "buffer", stderr or sys.stderr)
    unsafe = "skip" if errors == "skip" else "error"
    if raw is None:
        # Workers in other processes: let them decode and encode. Runners the pool runs in
        # threads of this process (pool_threads: shell commands) would gain nothing.
        raw = processes > 1 and not getattr(runner, "pool_threads", False)
    raw = bool(raw) and runner is not None
    read_options = dict(strict=strict, count=count, max_member_size=max_member_size, unsafe=unsafe)
    in_bytes = [0]  # raw: input data bytes, counted as samples are split
    held = {}  # raw: index -> (item, start of its tar members), until its outcome is handled
    if raw:
        samples = _raw_items(inputs, in_bytes, read_options, held)
        codec = dict(decode=_decode_item, encode=_encode_outputs, blocks=True, parent_works=True)
    else:
        samples = streams.iter_samples(inputs, **read_options)
        codec = {}
    result = StreamResult()
    sink = streams.SampleWriter(output, sha256=False) if output else None
    if sink is None and isinstance(runner, ShellRunner) and runner.collect and not raw:
        import copy

        runner = copy.copy(runner)  # outputs are not written: do not read them back (a copy
        runner.collect = False      # drops per-process state, and leaves the caller's alone)
    bar = _progress_bar(progress)
    try:
        if runner is None:
            for sample in samples:
                result.inputs += 1
                result.in_bytes += _size(sample)
                result.outputs += 1
                if sink:
                    sink.write(sample)
                if bar is not None:
                    bar.tick(result.in_bytes)
        else:
            stats = PoolStats()
            for outcome in process_samples(runner, samples, processes=processes, ordered=ordered,
                                           errors=errors, stats=stats, **codec):
                if outcome.stdout:
                    stdout.write(outcome.stdout)
                    stdout.flush()
                if outcome.stderr:
                    stderr.write(outcome.stderr)
                    stderr.flush()
                if outcome.error is not None and on_failure is not None:
                    on_failure(outcome.error)
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
    except BaseException:
        if sink:
            sink.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    result.seconds = time.monotonic() - started
    return result


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
        sink.write_raw(parts[0] if len(parts) == 1 else b"".join(parts), count)


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


def _encode_outputs(outputs):
    """The outputs of one sample as tar members, or _SAME (runs in the workers)."""
    known = getattr(_decoded, "plain", None)
    if known is not None and len(outputs) == 1 and tario_writer._same_sample(outputs[0], known[0], known[1]):
        return _SAME
    return tario.encode_samples(outputs)


def _size(sample):
    return sum(len(v) for k, v in sample.items() if isinstance(v, bytes))


class _Progress:
    """A tqdm bar on stderr counting samples, with MB/s of input in its postfix."""

    def __init__(self):
        from tqdm import tqdm
        self.bar = tqdm(unit=" samples", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
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
