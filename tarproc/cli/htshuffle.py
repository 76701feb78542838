"""htshuffle: globally shuffle the samples of M shards into N shards on a Dask cluster.

    htshuffle 'data/Volume_@16.tgz' 'out/shuffled-@32.tgz'
    htshuffle -c localhost:8786 'http://host/Volume_@16.tgz' 'http://host/shuffled-@8.tgz' \\
        --seed 7 --workdir http://host/work/
"""

import argparse
import sys

from .common import HelpFormatter, add_job_options, prestart_if_local, run_main, size_value

EPILOG = """\
Every sample lands in a uniformly random output shard, shard sizes are balanced, and each output
shard is randomly permuted. The same inputs and --seed give byte-identical shards, whatever the
number of workers.

The job has two phases: map tasks scatter each input shard into sorted runs under --workdir
(default: a temp dir on local disk, only for the local cluster; with -c give a location all
workers share, e.g. http://host/work/ on WebDAV or s3://bucket/tmp/), then reduce tasks merge
each output shard from those runs and commit it atomically. A rerun after a crash reuses the
finished map outputs; they are removed after success unless --keep-work.
"""


def add_twophase_options(parser):
    """Options shared by htshuffle and htsort: work location, memory, a mapper."""
    parser.add_argument("-p", "--process", metavar="FILE.py",
                        help="apply process_sample(sample) from this script to every sample first")
    parser.add_argument("--workdir", metavar="URL",
                        help="where intermediate files go (required with -c)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the intermediate files after success")
    parser.add_argument("--memory", type=size_value, default="256MB", metavar="SIZE",
                        help="memory per task before sorted runs spill to local disk (default 256MB)")


def add_io_arguments(parser):
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="input shards: a pattern such as 'data/Volume_@16.tgz' or {0000..0015}")
    parser.add_argument("output", metavar="OUTPUT",
                        help="output shards, e.g. 'out/part-@32.tgz' (the @N sets their number)")


def job_kwargs(args):
    """Keyword arguments of the job functions that come from the shared options."""
    prestart_if_local(args)
    return dict(cluster=args.cluster, workers=args.workers, workdir=args.workdir,
                keep_work=args.keep_work, memory=args.memory, retries=args.retries,
                force=args.force, speculation=not args.no_speculation, progress=not args.quiet,
                log_dir=args.log_dir)


def report(prog, result, args):
    """Print the summary and the failed shards; the exit status (0 or 1)."""
    if args.stats:
        result.to_json(args.stats)
    if not args.quiet or not result.ok:
        print(f"{prog}: {result.summary()}", file=sys.stderr)
    for key, error in result.failed:
        print(f"{prog}: failed: {key}: {error}", file=sys.stderr)
    return 0 if result.ok else 1


def build_parser():
    parser = argparse.ArgumentParser(
        prog="htshuffle", description="Globally shuffle sharded tar files into N new shards.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    add_io_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_twophase_options(parser)
    add_job_options(parser)
    return parser


def _main(argv):
    args = build_parser().parse_args(argv)
    from ..jobs.twophase import shuffle

    result = shuffle(args.inputs, args.output, seed=args.seed, mapper=args.process,
                     **job_kwargs(args))
    return report("htshuffle", result, args)


def main(argv=None):
    run_main("htshuffle", _main, argv)


if __name__ == "__main__":
    main()
