"""tarcat: concatenate tar streams into one, recompressing as the output name says.

    tarcat 'data/imagenet_train-{0000..0007}.tgz' -o all.tar.gz
    tarcat a.tar b.tgz -n 100 | tarshow
"""

import argparse
import sys

from .common import at_least_zero, run_main

PROG = "tarcat"


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Concatenate the samples of tar streams into one output (committed atomically).")
    parser.add_argument("inputs", nargs="*", default=["-"], metavar="INPUT",
                        help="files, URLs or shard patterns; - for stdin (default)")
    parser.add_argument("-o", "--output", default="-", metavar="OUTPUT",
                        help="file or URL; compression from the name (.tgz, .tar.zst, ...); default: stdout")
    parser.add_argument("-n", "--count", type=at_least_zero, metavar="N", help="copy at most N samples")
    parser.add_argument("--skip", type=at_least_zero, default=0, metavar="N", help="skip the first N samples")
    parser.add_argument("-v", "--verbose", action="store_true", help="say how many samples and bytes were written")
    return parser


def _body(argv):
    args = build_parser().parse_args(argv)
    from ..tarutils import cat

    info = cat(args.inputs or ["-"], args.output, count=args.count, skip=args.skip)
    if args.verbose:
        print(f"{PROG}: {info['count']} samples, {info['bytes']} bytes to {info['url']}", file=sys.stderr)
    return 0


def main(argv=None):
    run_main(PROG, _body, argv)


if __name__ == "__main__":
    main()
