"""Process a stream of samples with a runner and write the results: the body of `tarproc`.

`process_stream` is what the `tarproc` command calls and what Python users call for the same
work: read samples from URLs or patterns, run a shell command or Python code on each (N at a
time, in order), route each command's stdout, and write the outputs to a storage URL, committed
only when every sample went through (with `errors="abort"`, a failure leaves nothing behind).
"""

import sys
import time
from dataclasses import dataclass

from . import streams
from .runner import PythonRunner, ShellRunner, PoolStats, process_samples


@dataclass
class StreamResult:
    """Counts of one `process_stream` run, for the one-line summary."""

    inputs: int = 0
    outputs: int = 0
    dropped: int = 0
    skipped: int = 0
    kept: int = 0
    failed: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    seconds: float = 0.0

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
                   stdout=None, stderr=None, progress=False, on_failure=None):
    """Run `runner` over every sample of `inputs` and write the outputs to `output` (a URL or None).

    `stdout` receives the commands' standard output (default: sys.stdout, or sys.stderr when the
    tar stream itself goes to stdout). `on_failure(error)` is told about each skipped or kept
    failure. Returns a StreamResult; raises the first failure under `errors="abort"`, in which
    case nothing is written at `output`.
    """
    started = time.monotonic()
    if stdout is None:
        stdout = sys.stderr if output == "-" else sys.stdout
    stdout = getattr(stdout, "buffer", stdout)
    stderr = getattr(stderr or sys.stderr, "buffer", stderr or sys.stderr)
    unsafe = "skip" if errors == "skip" else "error"
    samples = streams.iter_samples(inputs, strict=strict, count=count,
                                   max_member_size=max_member_size, unsafe=unsafe)
    result = StreamResult()
    sink = streams.SampleWriter(output) if output else None
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
                                           errors=errors, stats=stats):
                if outcome.stdout:
                    stdout.write(outcome.stdout)
                    stdout.flush()
                if outcome.stderr:
                    stderr.write(outcome.stderr)
                    stderr.flush()
                if outcome.error is not None and on_failure is not None:
                    on_failure(outcome.error)
                if sink:
                    for sample in outcome.outputs:
                        sink.write(sample)
                if bar is not None:
                    bar.tick(stats.in_bytes)
            for name in ("inputs", "outputs", "dropped", "skipped", "kept", "failed", "in_bytes"):
                setattr(result, name, getattr(stats, name))
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


def _size(sample):
    return sum(len(v) for k, v in sample.items() if isinstance(v, bytes))


class _Progress:
    """A tqdm bar on stderr counting samples, with MB/s of input in its postfix."""

    def __init__(self):
        from tqdm import tqdm
        self.bar = tqdm(unit=" samples", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        self.started = time.monotonic()
        self.last = 0.0

    def tick(self, in_bytes):
        self.bar.update(1)
        now = time.monotonic()
        if now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix_str(f"{in_bytes / 1e6 / max(now - self.started, 1e-9):.1f} MB/s", refresh=False)

    def close(self):
        self.bar.close()


def _progress_bar(enabled):
    return _Progress() if enabled else None
