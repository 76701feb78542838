"""What every command shares: one-line errors and honest exit codes, signals, common options.

Commands are thin: parse arguments, call one library function, and let `run_main` turn what goes
wrong into a single line on stderr and an exit status (1 for errors, 2 for usage, 130 for Ctrl-C,
143 for SIGTERM) instead of a traceback.

Closed standard streams (`cmd >&-`, `2>&-`, `<&-`; Python then sets sys.stdout... to None) are
handled once for every command in `run_main`: the file descriptor is held open on /dev/null (so
that no file opened later takes its number: a child or a write "to standard output" would use
it); a closed stderr makes messages go nowhere and the command otherwise works; reading a closed
stdin or writing to a closed stdout is a one-line error ("standard output is closed") when it
happens, and only then: a command that needs neither runs as usual. `check_standard_streams`
reports it before any work when a command knows it will need one (`tarproc -o -`, input `-`).
"""

import argparse
import os
import signal
import sys

from ..errors import TarprocError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help layout (descriptions and epilogs as written), as wide as the terminal.

    The width is found without ``shutil``, which argparse would import for it, and which imports
    ``bz2`` and ``lzma``: ~3 ms of every command's start, for help that is rarely printed.
    """

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _columns():
    """Terminal width as ``shutil.get_terminal_size`` finds it: $COLUMNS, the tty, else 80."""
    try:
        n = int(os.environ.get("COLUMNS", ""))
        if n > 0:
            return n
    except ValueError:
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that cleanup code (finally, __exit__) runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def error_line(prog, message):
    """Print `prog: error: message` as one line on stderr."""
    text = " ".join(str(message).split("\n")).strip()
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)


def warning_line(prog, message):
    """Print `prog: warning: message` as one line on stderr."""
    text = " ".join(str(message).split("\n")).strip()
    print(f"{prog}: warning: {text}", file=sys.stderr, flush=True)


#: Warnings of one kind shown by a command, at most; then one line says more were not shown.
MAX_WARNINGS = 20


def _one_line_warnings(prog):
    """Show Python warnings (a skipped link, a split sample...) as `prog: warning: ...`, one
    line each without the source line, and at most MAX_WARNINGS of each kind."""
    import warnings

    shown = {}

    def show(message, category, filename, lineno, file=None, line=None):
        n = shown[category] = shown.get(category, 0) + 1
        if n <= MAX_WARNINGS:
            warning_line(prog, message)
        elif n == MAX_WARNINGS + 1:
            warning_line(prog, f"more warnings like these ({category.__name__}) are not shown")

    warnings.showwarning = show


#: The standard streams that were closed when the command started ("stdin", "stdout", "stderr").
CLOSED_STREAMS = set()

_STREAM_NAMES = {"stdin": "standard input", "stdout": "standard output", "stderr": "standard error"}


class ClosedStream:
    """Stands in sys for a standard stream that was closed at start: reading or writing it
    raises an OSError (EBADF) saying so, "standard output is closed", which `run_main` reports
    in one line; flushing and closing do nothing, so that a command that never uses it works.
    It is its own ``buffer`` (binary writes fail the same way)."""

    encoding = "utf-8"
    errors = "strict"
    standard_stream_closed = True  # (processing says why it needed the stream)

    def __init__(self, name):
        self.name = name
        self.buffer = self

    def _closed(self, *args, **kwargs):
        import errno

        raise OSError(errno.EBADF, f"{_STREAM_NAMES.get(self.name, self.name)} is closed")

    write = writelines = read = read1 = readinto = readinto1 = readline = readlines = fileno = _closed

    def flush(self):
        pass

    def close(self):
        pass

    def isatty(self):
        return False

    closed = False


def _closed_standard_streams():
    """Make closed standard streams safe to have (see the module doc); note them in
    CLOSED_STREAMS. Does nothing (a few attribute reads) when all three are open."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None and not isinstance(getattr(sys, name), ClosedStream):
            continue
        CLOSED_STREAMS.add(name)
        try:
            os.fstat(fd)
        except OSError:  # closed (not something else holding the number): hold it
            try:
                new = os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)
                if new != fd:
                    os.dup2(new, fd)  # (inheritable)
                    os.close(new)
                else:
                    os.set_inheritable(fd, True)
            except OSError:
                pass
        if name == "stderr":
            # a job must work without it: what it would say goes nowhere (print(file=None)
            # would write to stdout, which may be the tar stream)
            sys.stderr = open(os.devnull, "w")
        else:
            setattr(sys, name, ClosedStream(name))


def _whole_writes_to_stdout():
    """Under PYTHONUNBUFFERED=1 (python -u; set in many containers), sys.stdout writes straight
    to a raw file, whose write may take only part of the data when a pipe is full, and Python's
    text layer drops the rest without a word. A buffered writer underneath writes everything;
    flushed at each newline, what is printed still shows up at once."""
    import io

    out = sys.stdout
    raw = getattr(out, "buffer", None)
    if isinstance(out, io.TextIOWrapper) and isinstance(raw, io.RawIOBase):
        try:
            fd = raw.fileno()
        except (OSError, ValueError):
            return
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "wb", closefd=False)),
                                      encoding=out.encoding, errors=out.errors, line_buffering=True)


def check_standard_streams(inputs=(), output=None):
    """Raise a one-line TarprocError before any work when the command will read standard input
    (`-` among `inputs`) or write its `output` to standard output (`-`, /dev/stdout...) and that
    stream was closed when it started."""
    if "stdin" in CLOSED_STREAMS and "-" in inputs:
        raise TarprocError("standard input is closed (the input '-' is read from it)")
    if "stdout" in CLOSED_STREAMS and output in ("-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"):
        raise TarprocError(f"standard output is closed (the output {output!r} is written to it)")


def run_main(prog, fn, argv=None, fast_exit=False):
    """Run `fn(argv)` as a command's body and exit with a status that tells the truth.

    Any other exception than those a command raises on purpose (a bug, say) is reported too, as
    one line naming its type; TARPROC_DEBUG=1 prints the traceback of whatever failed.

    `fast_exit` (for a console script, never for a caller in Python): end the process without
    the interpreter's teardown, see `exit_fast`.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    _one_line_warnings(prog)
    _closed_standard_streams()
    _whole_writes_to_stdout()
    failure = None  # the exception that ended the command, for TARPROC_DEBUG
    try:
        status = fn(argv)
    except Terminated as exc:
        failure = exc
        error_line(prog, "terminated")
        status = 143
    except KeyboardInterrupt as exc:
        failure = exc
        error_line(prog, "interrupted")
        status = 130
    except BrokenPipeError as exc:
        # the reader went away (e.g. `| head`): stop quietly, as Unix filters do
        failure = exc
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        status = 141
    except TarprocError as exc:
        failure = exc
        error_line(prog, exc)
        status = 1
    except OSError as exc:
        failure = exc
        error_line(prog, f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
        status = 1
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, not a traceback
        failure = exc
        detail = str(exc)
        error_line(prog, f"internal error: {type(exc).__name__}{': ' + detail if detail else ''}"
                         " (TARPROC_DEBUG=1 shows the traceback)")
        status = 1
    if os.environ.get("TARPROC_DEBUG") and failure is not None:
        import traceback

        # (printed here, after the except clauses: print_exc() would find no exception)
        traceback.print_exception(type(failure), failure, failure.__traceback__)
    if fast_exit:
        exit_fast(status or 0)
    sys.exit(status or 0)


def exit_fast(status):
    """End the process as `sys.exit(status)` would, minus the interpreter's teardown.

    The atexit handlers run (temp dirs, worker processes) and the standard streams are flushed;
    what is skipped is freeing every module and object one by one, ~10 ms at the end of every
    `tarproc` run. Only when no other non-daemon thread runs (those sys.exit waits for).
    """
    import threading

    main = threading.main_thread()
    if threading.current_thread() is not main or any(
            t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(status)
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - what the teardown would have failed to write too
                pass
        os._exit(status)


def add_cluster_options(parser):
    """`-c ADDRESS` (a running dask-scheduler) and `-j N` (local workers) for the Dask jobs."""
    parser.add_argument("-c", "--cluster", metavar="ADDRESS",
                        help="address of a running dask-scheduler (host:8786); default: start a local cluster")
    parser.add_argument("-j", "--workers", type=at_least_one, metavar="N",
                        help="worker processes of the local cluster (default: one per core)")


def _whole_number(text, minimum):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(
            f"must be at least {minimum}, not {value}" if minimum else f"must not be negative, not {value}")
    return value


def at_least_one(text):
    """argparse type of a count of workers: a whole number, 1 or more."""
    return _whole_number(text, 1)


def at_least_zero(text):
    """argparse type of a count that may be zero (retries, lines): a whole number, 0 or more."""
    return _whole_number(text, 0)


#: The longest time limit, in seconds (about 11.5 days): a command's wait is a poll() counting
#: milliseconds in a C int, whose limit is 2**31 ms (about 24.8 days); "inf" or 1e30 would
#: overflow it. No limit at all is what leaving the option out means.
MAX_SECONDS = 1e6


def size_value(text):
    """argparse type of a size: bytes, or "1GB", "500MB", "64KiB" (see tarutils.parse_size)."""
    from ..errors import TarprocError
    from ..tarutils import parse_size

    try:
        return parse_size(text)
    except TarprocError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_seconds(text):
    """argparse type of a time limit: a number of seconds above zero, at most MAX_SECONDS."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:  # (also NaN)
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    if not value <= MAX_SECONDS:  # (also inf)
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_SECONDS:.0f} seconds (leave the option out for no limit): {text!r}")
    return value


def add_job_options(parser):
    """Options every shard job shares: retries, resume, progress, logs and statistics."""
    add_cluster_options(parser)
    parser.add_argument("--retries", type=at_least_zero, default=2, help="retries of a failed shard (default 2)")
    parser.add_argument("--force", action="store_true", help="redo shards whose output already exists")
    parser.add_argument("--no-speculation", action="store_true",
                        help="never start speculative copies of straggling shards")
    parser.add_argument("--log-dir", metavar="DIR", help="keep each shard's log here")
    parser.add_argument("--stats", metavar="FILE.json", help="write per-shard statistics and totals here")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bar, and no summary unless a shard failed")


def prestart_if_local(args):
    """Start the local cluster's fork server early when the job will run on a local cluster."""
    if getattr(args, "cluster", None) is None:
        from ..jobs.cluster import prestart_local

        prestart_local()


def job_kwargs(args):
    """The driver options of a parsed command line, as keyword arguments for the job functions.

    Without `-c`, the local cluster's fork server is started here, before Dask is imported, so
    that its start-up overlaps the driver's (see cluster.prestart_local).
    """
    prestart_if_local(args)
    return {"cluster": args.cluster, "workers": args.workers, "retries": args.retries,
            "force": args.force, "speculation": not args.no_speculation,
            "progress": not args.quiet, "log_dir": args.log_dir}


def report_job(prog, args, result):
    """Write --stats, print the one-line summary and the failed shards; return the exit status."""
    if args.stats:
        result.to_json(args.stats)
    if result.skipped and not args.quiet:
        print(f"{prog}: skipped {result.skipped} shard(s) whose output already exists (--force to redo)",
              file=sys.stderr)
    for key, error in result.failed:
        print(f"{prog}: failed: {key}: {error}", file=sys.stderr)
    if not args.quiet or result.failed:
        print(f"{prog}: {result.summary()}", file=sys.stderr)
    if result.failed:
        error_line(prog, f"{len(result.failed)} of {result.total} shard(s) failed")
        return 1
    return 0
