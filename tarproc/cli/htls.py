"""`htls`: what a shard pattern holds: shard count, missing shards, total size, size skew.

    htls 'data/imagenet_train-@0008.tgz'
    htls -l --samples 'http://127.0.0.1:8080/Volume_@16.tgz'
"""

import argparse

from .common import add_cluster_options, prestart_if_local, report_job, run_main

PROG = "htls"


def _human(n):
    from ..tarutils import format_size

    return format_size(n)


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                epilog="Exit status 1 when shards are missing.")
    p.add_argument("pattern", help="shard pattern")
    p.add_argument("-l", "--long", action="store_true", help="one line per shard: size, samples, url")
    p.add_argument("--samples", action="store_true", help="also count the samples of every shard (in parallel)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_cluster_options(p)
    return p


def main_body(argv=None):
    args = build_parser().parse_args(argv)
    if args.samples:
        prestart_if_local(args)
    from ..jobs.shardmap import list_shards

    report = list_shards(args.pattern, samples=args.samples, cluster=args.cluster, workers=args.workers,
                         progress=not args.quiet)
    if args.long:
        for row in report["shards"]:
            size = "MISSING" if row["size"] is None else str(row["size"])
            samples = "" if row["samples"] is None else f"\t{row['samples']}"
            print(f"{size}{samples}\t{row['url']}")
    line = f"{report['count']} shards, {len(report['missing'])} missing, {_human(report['total_bytes'])} total"
    if "mean" in report:
        line += (f"; size min {_human(report['min'])}, mean {_human(report['mean'])}, "
                 f"max {_human(report['max'])}, skew (max/mean) {report['skew']:.2f}")
    if "total_samples" in report:
        line += (f"; {report['total_samples']} samples, per shard min {report['samples_min']}, "
                 f"mean {report['samples_mean']:.1f}, max {report['samples_max']}, "
                 f"skew {report['samples_skew']:.2f}")
    print(line)
    for url in report["missing"]:
        print(f"missing: {url}")
    status = 0
    if report["result"] is not None and not report["result"].ok:
        args.stats = None
        status = report_job(PROG, args, report["result"])
    return 1 if report["missing"] else status


def main(argv=None):
    run_main(PROG, main_body, argv)


if __name__ == "__main__":
    main()
