"""`tarproc`: run a shell command or Python code on every sample of a tar stream.

    cat imagenet_train-0000.tgz | tarproc -c 'convert sample.jpg sample.ppm; rm sample.jpg' -p 8 -o out.tar
"""

import argparse
import sys

from .common import (HelpFormatter, at_least_one, check_standard_streams, error_line,
                     positive_seconds, run_main, warning_line)

PROG = "tarproc"

#: The most samples in parallel (-p): one thread (-c, -s) or process (-P) each; more than the
#: system lets a process start fails half-way ("can't start new thread"), so it is refused.
MAX_PROCESSES = 1024

#: Options that only a shell command or script uses (-c, -s): given with -P or without a command,
#: they would be ignored, so they are refused. (option, attribute, the value when not given)
SHELL_ONLY = (("--timeout", "timeout", None), ("--add-log", "add_log", None),
              ("-b/--basename", "basename", None), ("-S/--subdirs", "subdirs", False),
              ("--tmpdir", "tmpdir", None), ("--keep-dirs", "keep_dirs", False),
              ("--shell", "shell", None))

EPILOG = """\
Each sample is unpacked into a fresh private temp dir as __key__, __source__ and sample.EXT files;
the command runs there (bash -c); afterwards __key__ and every sample.* file form the output
sample (a sample whose files are all removed is dropped). Keys reach the command only through
files and the environment (TARPROC_KEY, TARPROC_INDEX, TARPROC_SOURCE), never its command line.

examples:
  cat imagenet_train-0000.tgz | tarproc -c ls --count 3
  cat imagenet_train-0000.tgz | tarproc -p 8 -c "convert sample.jpg sample.ppm; rm sample.jpg" -o out.tar
  tarproc -P mapper.py 'imagenet_train-{0000..0003}.tgz' -o mapped.tar
  tarproc in.tgz -o out.tar.zst          (no command: copy / recompress / concatenate)
"""


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("inputs", nargs="*", default=["-"],
                   help="input URLs or shard patterns (default: - for stdin)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("-c", "--command", help="shell command run in each sample's directory")
    what.add_argument("-s", "--script", metavar="FILE", help="script file run in each sample's directory")
    what.add_argument("-P", "--python", metavar="FILE.py",
                      help="Python file defining process_sample(sample) -> dict | list | None")
    p.add_argument("--interpreter", help="run --script with this interpreter instead of its shebang")
    p.add_argument("--shell", help="shell for -c (default: bash)")
    p.add_argument("-b", "--basename", help="base name of field files (default: sample)")
    p.add_argument("-S", "--subdirs", action="store_true",
                   help="each subdirectory with __key__ and sample.* files is one more output sample")
    p.add_argument("-o", "--output", metavar="URL", help="write the output tar here (- for stdout); "
                   "compressed by its name; default: results are dropped")
    p.add_argument("-p", "--processes", type=_processes, default=1, metavar="N",
                   help=f"samples in parallel (default 1, at most {MAX_PROCESSES})")
    p.add_argument("--unordered", action="store_true", help="write results as they finish (faster with -p)")
    p.add_argument("--count", type=int, metavar="N", help="stop after N input samples")
    p.add_argument("--errors", choices=["abort", "skip", "keep"], default="abort",
                   help="on a failing sample: stop (default), drop it, or pass it through unchanged")
    p.add_argument("--timeout", type=positive_seconds, metavar="SEC", help="per-sample time limit (kills the process group)")
    p.add_argument("--add-log", metavar="EXT", help="also store each command's stdout in the sample as EXT")
    p.add_argument("--tmpdir", metavar="DIR", help="where per-sample dirs go (default: $TMPDIR if set, else /dev/shm if it has room, else /tmp)")
    p.add_argument("--keep-dirs", action="store_true", help="keep per-sample dirs (debugging)")
    p.add_argument("--strict", action="store_true", help="a sample split in two places is an error, not a warning")
    p.add_argument("--max-member-size", type=at_least_one, metavar="BYTES", help="refuse tar members larger than this")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    return p


def _processes(text):
    """argparse type of -p: a whole number from 1 to MAX_PROCESSES."""
    value = at_least_one(text)
    if value > MAX_PROCESSES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_PROCESSES}, not {value}")
    return value


def check_options(parser, args):
    """Refuse, as a usage error (exit 2) before any work, options that would be ignored: those of
    a shell command or script with -P or without a command, --interpreter without -s."""
    if args.command is None and args.script is None:
        what = "-P" if args.python is not None else "copying (no -c/-s)"
        for option, name, unset in SHELL_ONLY:
            if getattr(args, name) != unset:
                parser.error(f"{option} applies to -c/-s only, not to {what}")
    if args.interpreter is not None and args.script is None:
        parser.error("--interpreter applies to -s only")


def main_body(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(parser, args)
    from ..processing import make_runner, process_stream
    from ..errors import SampleFailed, TarprocError

    if args.count is not None and args.count < 0:
        raise TarprocError("--count must not be negative")
    check_standard_streams(args.inputs, args.output)
    runner = make_runner(args.command, args.script, args.python, interpreter=args.interpreter,
                         shell=args.shell or "bash", basename=args.basename or "sample",
                         tmpdir=args.tmpdir,
                         timeout=args.timeout, subdirs=args.subdirs, add_log=args.add_log,
                         keep_dirs=args.keep_dirs)
    failures = []

    def on_failure(exc):
        failures.append(exc)
        if not args.quiet:
            done = "skipped" if args.errors == "skip" else "passed through unchanged"
            warning_line(PROG, f"{done}: {exc}")

    try:
        result = process_stream(args.inputs, args.output, runner, processes=args.processes,
                                ordered=not args.unordered, errors=args.errors, count=args.count,
                                strict=args.strict, max_member_size=args.max_member_size,
                                progress=not args.quiet and sys.stderr.isatty(), on_failure=on_failure)
    except SampleFailed as exc:
        detail = str(exc)
        prefix = f"sample {exc.key!r}: "
        if exc.key is not None and detail.startswith(prefix):
            detail = detail[len(prefix):]  # (said once, in front)
        if detail and (isinstance(exc.status, int) or exc.status == "timeout"):
            message = f"sample {exc.key!r} failed: {detail}"  # the detail says how
        else:
            message = f"sample {exc.key!r} failed ({_status(exc.status)})"
            if detail:
                message += f": {detail}"
        error_line(PROG, message + ("; no output written" if args.output else ""))
        tail = (exc.stderr_tail or "").rstrip()
        if tail:
            sys.stderr.write("".join(f"  | {line}\n" for line in tail.splitlines()[-10:]))
        return 1
    if not args.quiet:
        print(f"{PROG}: {result.summary()}", file=sys.stderr)
    return 0


def _status(status):
    if status == "timeout":
        return "timed out"
    if isinstance(status, int):
        return f"exit status {status}" if status >= 0 else f"killed by signal {-status}"
    return str(status)


def main(argv=None):
    """`tarproc` as a Python function: exits through SystemExit."""
    run_main(PROG, main_body, argv)


def command():
    """The `tarproc` console script: `main` without the interpreter's teardown at exit."""
    run_main(PROG, main_body, None, fast_exit=True)


if __name__ == "__main__":
    command()
