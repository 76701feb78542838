"""tarsplit: split tar streams into numbered shards of at most --maxcount samples / --maxsize bytes.

    tarsplit big.tar -o 'parts/part-%06d.tar' --maxcount 1000
    cat a.tar b.tar | tarsplit - -o 's3://bucket/ds-{:04d}.tgz' --maxsize 500MB --manifest m.json
"""

import argparse
import sys

from .common import at_least_one, at_least_zero, run_main, size_value

PROG = "tarsplit"


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Split tar streams into numbered shards (each committed atomically).")
    parser.add_argument("inputs", nargs="*", default=["-"], metavar="INPUT",
                        help="files, URLs or shard patterns; - for stdin (default)")
    parser.add_argument("-o", "--output", required=True, metavar="PATTERN",
                        help="numbered output names: out-%%06d.tar or out-{:06d}.tgz (compression by name)")
    parser.add_argument("--maxcount", type=at_least_one, metavar="N", help="most samples per shard")
    parser.add_argument("--maxsize", type=size_value, metavar="SIZE", help="most bytes of field data per shard (1GB, 500MB, 1e9)")
    parser.add_argument("--start", type=at_least_zero, default=0, metavar="I", help="number of the first shard (default 0)")
    parser.add_argument("-n", "--count", type=at_least_zero, metavar="N", help="copy at most N samples")
    parser.add_argument("--skip", type=at_least_zero, default=0, metavar="N", help="skip the first N samples")
    parser.add_argument("--manifest", metavar="FILE.json", help="write the list of shards with count, bytes, sha256")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not list the shards written")
    return parser


def _body(argv):
    args = build_parser().parse_args(argv)
    from ..tarutils import parse_size, split, write_manifest

    maxsize = parse_size(args.maxsize) if args.maxsize is not None else None
    shards = split(args.inputs or ["-"], args.output, maxcount=args.maxcount, maxsize=maxsize,
                   count=args.count, skip=args.skip, start=args.start)
    if args.manifest:
        write_manifest(args.manifest, {"output": args.output, "shards": shards,
                                       "samples": sum(s["count"] for s in shards),
                                       "bytes": sum(s["bytes"] for s in shards)})
    if not args.quiet:
        for s in shards:
            print(f"{s['url']}\t{s['count']} samples\t{s['bytes']} bytes", file=sys.stderr)
    return 0


def main(argv=None):
    run_main(PROG, _body, argv)


if __name__ == "__main__":
    main()
