"""htsort: sort the samples of M shards into N range-partitioned shards, optionally reducing.

    htsort 'data/Volume_@16.tgz' 'out/sorted-@32.tgz'
    htsort 'data/words-@8.tar' 'out/counts-@4.tar' -k txt --reduce wordcount.py
"""

import argparse

from .common import HelpFormatter, add_job_options, run_main
from .htshuffle import add_io_arguments, add_twophase_options, job_kwargs, report

EPILOG = """\
Samples are sorted by __key__ or by a field (-k FIELD: its bytes decoded as UTF-8, compared as
text, or as numbers with --numeric; --reverse for descending). Output shards are range
partitioned: reading shards 0..N-1 in order gives one sorted stream, shard sizes are balanced
from a sample of the keys, and equal keys land in one shard, next to each other.

--reduce FILE.py defines reduce_samples(key, samples) -> dict | list[dict] | None, called once
per group of equal keys (key: the field's text, or a float with --numeric; samples: a one-pass
iterator of the group's samples). If the script also defines process_sample(sample) and no -p
is given, that mapper runs first: map, then sort, then reduce. A word count (wordcount.py):

    def process_sample(sample):            # one sample per word, sort field txt = the word
        words = sample["txt"].decode().split()
        return [{"__key__": f"{sample['__key__']}-{i}", "txt": w, "count": "1"}
                for i, w in enumerate(words)]

    def reduce_samples(key, samples):      # key is the word
        n = sum(int(s["count"]) for s in samples)
        return {"__key__": key, "txt": key, "count": str(n)}

--combine also applies the reduce inside each map task before the shuffle (for associative
reduces such as counts), so far less data crosses it. Intermediates go to --workdir (default:
a local temp dir, only for the local cluster; required with -c) and are removed after success.
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="htsort", description="Sort (and reduce) sharded tar files into N range-partitioned shards.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    add_io_arguments(parser)
    parser.add_argument("-k", "--key", metavar="FIELD",
                        help="sort by this field (default: __key__)")
    parser.add_argument("--numeric", action="store_true", help="compare keys as numbers")
    parser.add_argument("--reverse", action="store_true", help="sort in descending order")
    parser.add_argument("--reduce", metavar="FILE.py",
                        help="apply reduce_samples(key, samples) to each group of equal keys")
    parser.add_argument("--combine", action="store_true",
                        help="also apply the reduce inside map tasks (associative reduces only)")
    add_twophase_options(parser)
    add_job_options(parser)
    return parser


def _main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.combine and not args.reduce:
        parser.error("--combine needs --reduce")
    from ..jobs.twophase import sort

    result = sort(args.inputs, args.output, key=args.key, numeric=args.numeric,
                  reverse=args.reverse, reduce=args.reduce, mapper=args.process,
                  combine=args.combine, **job_kwargs(args))
    return report("htsort", result, args)


def main(argv=None):
    run_main("htsort", _main, argv)


if __name__ == "__main__":
    main()
