"""`htextract`: print chosen fields of every sample of many shards, one line per sample, in order.

    htextract data/uw3-lines.tgz -f text
    htextract 'data/imagenet_train-@0008.tgz' -f __key__ -f cls
    htextract 'data/imagenet_train-@0008.tgz' --counts cls
"""

import argparse
import sys

from .common import add_job_options, at_least_zero, job_kwargs, report_job, run_main

PROG = "htextract"


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n")[0],
        epilog="Values are decoded as UTF-8 with backslash, tab and newline escaped (\\\\, \\t, \\n); "
               "a missing field is an empty cell (null with --json). Lines come in shard order, then "
               "sample order, although shards are read in parallel.")
    p.add_argument("inputs", help="shard pattern")
    p.add_argument("-f", "--field", action="append", default=[], metavar="FIELD",
                   help="field to print (repeatable; __key__ allowed)")
    p.add_argument("--json", action="store_true",
                   help='JSON lines instead of tab-separated (--counts/-K: {"value"|"field": ..., "count": N})')
    p.add_argument("-o", "--output", metavar="URL",
                   help="write here instead of stdout (any storage URL; written only if every shard succeeds)")
    p.add_argument("--count", type=at_least_zero, metavar="N", help="at most N lines")
    p.add_argument("--counts", metavar="FIELD", help="how many samples have each value of FIELD, most frequent first")
    p.add_argument("-K", "--keys", action="store_true", help="field names present and how many samples have each")
    p.add_argument("--strict", action="store_true", help="a sample split in two places is an error")
    add_job_options(p)
    return p


class _TextSink:
    """Text lines to a storage writer, encoded as UTF-8 and written in large pieces."""

    def __init__(self, writer, limit=1 << 16):
        self.writer, self.limit = writer, limit
        self.parts, self.size = [], 0

    def write(self, text):
        self.parts.append(text)
        self.size += len(text)
        if self.size >= self.limit:
            self.flush()

    def flush(self):
        if self.parts:
            self.writer.write("".join(self.parts).encode("utf-8"))
            self.parts, self.size = [], 0


def main_body(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..errors import TarprocError
    from ..jobs.shardmap import count_lines, count_values, extract

    modes = bool(args.field) + bool(args.counts) + bool(args.keys)
    if modes != 1:
        raise TarprocError("give -f FIELD (repeatable), or --counts FIELD, or -K")
    writer = None
    out = sys.stdout
    if args.output:
        from .. import storage

        # -o appears only once the whole job has succeeded: never partial, never emptied by a failure
        writer = storage.open_write(args.output)
        out = _TextSink(writer)
    try:
        if args.field:
            result = extract(args.inputs, args.field, as_json=args.json, count=args.count, out=out,
                             strict=args.strict, check=False, **job_kwargs(args))
        else:
            counts, result = count_values(args.inputs, None if args.keys else args.counts,
                                          strict=args.strict, check=False, **job_kwargs(args))
            for line in count_lines(counts[: args.count], args.json, "field" if args.keys else "value"):
                out.write(line + "\n")
        if writer is not None:
            if result.ok:
                out.flush()
                writer.commit()
            else:
                writer.abort()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    status = report_job(PROG, args, result)
    if writer is not None and not result.ok:
        print(f"{PROG}: nothing written to {writer.name}", file=sys.stderr)
    return status


def main(argv=None):
    run_main(PROG, main_body, argv)


if __name__ == "__main__":
    main()
