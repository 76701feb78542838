"""tarshow: show the samples of tar streams: each key with its fields and their sizes.

    tarshow data/imagenet_train-0000.tgz -n 3
    tarshow 'http://host/shard-{00..15}.tar' -f cls -f json
    curl -s URL | tarshow - -n 1 -f jpg --raw > first.jpg
"""

import argparse

from .common import at_least_zero, run_main

PROG = "tarshow"


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Show the samples of tar streams: key, then each field with its size in bytes.")
    parser.add_argument("inputs", nargs="*", default=["-"], metavar="INPUT",
                        help="files, URLs or shard patterns; - for stdin (default)")
    parser.add_argument("-n", "--count", type=at_least_zero, metavar="N", help="show at most N samples")
    parser.add_argument("--skip", type=at_least_zero, default=0, metavar="N", help="skip the first N samples")
    parser.add_argument("-f", "--field", action="append", default=[], metavar="FIELD",
                        help="also print this field's content (repeatable; a;b for alternatives)")
    parser.add_argument("--raw", action="store_true",
                        help="write only the raw bytes of the one -f FIELD (e.g. to a file)")
    parser.add_argument("-u", "--urls", action="store_true", help="prefix each line with the shard it came from")
    return parser


def _body(argv):
    args = build_parser().parse_args(argv)
    from ..tarutils import show

    show(args.inputs or ["-"], count=args.count, skip=args.skip, fields=args.field,
         raw=args.raw, urls=args.urls)
    return 0


def main(argv=None):
    run_main(PROG, _body, argv)


if __name__ == "__main__":
    main()
