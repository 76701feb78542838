"""htupload: upload files as a sharded tar dataset, building the shards in parallel on Dask.

    htupload images/ 'http://127.0.0.1:8080/dataset-@16.tar'
    htupload images/ 'out/dataset-%06d.tar' --maxcount 1000 --maxsize 1GB --shuffle --seed 1
    htupload plan.tsv 's3://bucket/ds-@8.tar'
    find images -name '*.jpg' | htupload --files - 'out/ds-@4.tar'
"""

import argparse
import json
import sys

from .common import (HelpFormatter, add_job_options, at_least_one, error_line, prestart_if_local, run_main,
                     size_value)

PROG = "htupload"

EPILOG = """\
sources:
  DIR            every file of the tree; key = relative path up to the first dot of the name
  PLAN.tsv | -   lines KEY.EXT<TAB>SOURCE; SOURCE is a path, a URL, or text:VALUE
  --files LIST   one file per line (- for stdin); keys relative to their common directory

output:
  NAME-@N.tar    exactly N shards, samples dealt evenly
  NAME-%06d.tar  as many shards as --maxcount/--maxsize need (default 100000 samples)
  NAME.tar       one shard

A shard holding an unreadable file fails and is not written (the error names every bad file);
rerun after fixing them and only missing shards are built. --skip-unreadable writes the shard
without those samples and lists them. Either way the exit status is 1.
"""


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, usage="%(prog)s [options] [SOURCE ...] OUTPUT", description="Upload files as a sharded tar dataset (shards built in parallel on Dask).",
        epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="SOURCE ... OUTPUT",
                        help="directories or plan files (or none with --files), then the output pattern")
    parser.add_argument("--files", metavar="LIST", help="read a list of files, one a line (- for stdin)")
    parser.add_argument("--root", metavar="DIR", help="with --files: make keys relative to DIR")
    parser.add_argument("--maxcount", type=at_least_one, metavar="N", help="most samples per shard (%%06d patterns)")
    parser.add_argument("--maxsize", type=size_value, metavar="SIZE", help="most bytes per shard before compression, e.g. 1GB, 500MB, 1e9 (%%06d patterns)")
    parser.add_argument("--shuffle", action="store_true", help="put the samples in a random order first")
    parser.add_argument("--seed", type=int, help="seed of --shuffle (needed to resume a shuffled upload)")
    parser.add_argument("--manifest", metavar="FILE.json", help="write the list of shards with count, bytes, sha256")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="leave out samples whose files cannot be read (listed; exit status 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the shard plan and stop")
    add_job_options(parser)
    return parser


def _body(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    *sources, output = args.paths
    if not sources and args.files is None:
        parser.error("give a SOURCE (directory or plan file) or --files LIST before OUTPUT")
    if args.files == "-" and "-" in sources:
        parser.error("stdin can hold the plan or the --files list, not both")
    if args.root and args.files is None:
        parser.error("--root applies to --files only")
    if args.seed is not None and not args.shuffle:
        parser.error("--seed applies to --shuffle only")
    from ..jobs import upload_job

    if args.dry_run:
        shards, seed = upload_job.plan_upload(
            sources, output, files=args.files, root=args.root, maxcount=args.maxcount,
            maxsize=args.maxsize, shuffle=args.shuffle, seed=args.seed)
        from ..uploadplan import sample_sizes

        for shard in shards:
            size = sum(sample_sizes(shard.samples)) if shard.samples else 0
            print(f"{shard.url}\t{len(shard.samples)} samples\t{size} bytes")
        if seed is not None:
            print(f"{PROG}: shuffle seed {seed}", file=sys.stderr)
        return 0

    prestart_if_local(args)
    result = upload_job.upload(
        sources, output, files=args.files, root=args.root, maxcount=args.maxcount,
        maxsize=args.maxsize, shuffle=args.shuffle, seed=args.seed, manifest=args.manifest,
        skip_unreadable=args.skip_unreadable, cluster=args.cluster, workers=args.workers,
        retries=args.retries, force=args.force, speculation=not args.no_speculation,
        progress=not args.quiet, log_dir=args.log_dir)
    if args.stats:
        stats = result.job.to_dict()
        stats["manifest"] = result.manifest
        with open(args.stats, "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=1, default=repr)
            f.write("\n")
    for p in result.unreadable:
        what = f"left out sample {p['key']}" if args.skip_unreadable else f"{p['shard']} not written"
        cause = p["error"] if p["error"].startswith("cannot read ") else f"cannot read {p['source']}: {p['error']}"
        error_line(PROG, f"{p['key']}.{p['field']}: {cause} ({what})")
    for url, error in result.failed:
        error_line(PROG, f"{url}: {error}" if not error.startswith(url) else error)
    if args.shuffle and args.seed is None and not args.quiet:
        print(f"{PROG}: shuffle seed {result.seed} (give --seed {result.seed} to resume)", file=sys.stderr)
    if not args.quiet:
        print(f"{PROG}: {result.summary()}", file=sys.stderr)
    return 0 if result.ok else 1


def main(argv=None):
    run_main(PROG, _body, argv)


if __name__ == "__main__":
    main()
