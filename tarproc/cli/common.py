"""What every command shares: one-line errors and honest exit codes, signals, common options.

Commands are thin: parse arguments, call one library function, and let `run_main` turn what goes
wrong into a single line on stderr and an exit status (1 for errors, 2 for usage, 130 for Ctrl-C,
143 for SIGTERM) instead of a traceback.
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


def run_main(prog, fn, argv=None, fast_exit=False):
    """Run `fn(argv)` as a command's body and exit with a status that tells the truth.

    `fast_exit` (for a console script, never for a caller in Python): end the process without
    the interpreter's teardown, see `exit_fast`.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)
    _one_line_warnings(prog)
    try:
        status = fn(argv)
    except Terminated:
        error_line(prog, "terminated")
        status = 143
    except KeyboardInterrupt:
        error_line(prog, "interrupted")
        status = 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly, as Unix filters do
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        status = 141
    except TarprocError as exc:
        error_line(prog, exc)
        status = 1
    except OSError as exc:
        error_line(prog, f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}")
        status = 1
    if os.environ.get("TARPROC_DEBUG") and status not in (0, None):
        import traceback
        traceback.print_exc()
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
    parser.add_argument("-j", "--workers", type=_at_least_one, metavar="N",
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


def _at_least_one(text):
    """argparse type of a count of workers: a whole number, 1 or more."""
    return _whole_number(text, 1)


def at_least_zero(text):
    """argparse type of a count that may be zero (retries, lines): a whole number, 0 or more."""
    return _whole_number(text, 0)


def positive_seconds(text):
    """argparse type of a time limit: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:  # (also NaN)
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
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
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")


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
