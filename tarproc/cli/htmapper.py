"""`htmapper`: run Python code or a shell command on every sample of many shards, one Dask task per shard.

    htmapper -p script.py 'data/imagenet_train-{0000..0007}.tgz' 'out/converted-@8.tar'
    htmapper -C 'convert sample.jpg sample.png; rm sample.jpg' 'data/imagenet_train-@0008.tgz' 'out/png-@8.tar'
"""

import argparse

from .common import add_job_options, job_kwargs, positive_seconds, report_job, run_main

PROG = "htmapper"


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                epilog="Input shard i goes to output shard i. Shards whose output exists are "
                                       "skipped (resume) unless --force.")
    p.add_argument("inputs", help="input shard pattern (URLs, {0000..0007}, @N, globs)")
    p.add_argument("outputs", help="output shard pattern naming as many shards as the input")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("-p", "--python", metavar="FILE.py",
                      help="Python file defining process_sample(sample) -> dict | list | None")
    what.add_argument("-C", "--command", help="shell command per sample, as with tarproc -c")
    p.add_argument("--errors", choices=["abort", "skip", "keep"], default="abort",
                   help="a failing sample fails its shard (abort, default), is dropped, or passes unchanged")
    p.add_argument("--timeout", type=positive_seconds, metavar="SEC", help="per-sample time limit for -C")
    p.add_argument("-b", "--basename", default="sample", help="base name of field files for -C")
    p.add_argument("-S", "--subdirs", action="store_true", help="one-in-many-out for -C (see tarproc -S)")
    p.add_argument("--strict", action="store_true", help="a sample split in two places is an error")
    add_job_options(p)
    return p


def main_body(argv=None):
    args = build_parser().parse_args(argv)
    from ..jobs.shardmap import map_shards

    shell = {"timeout": args.timeout, "basename": args.basename, "subdirs": args.subdirs}
    result = map_shards(args.inputs, args.outputs, args.python, command=args.command, errors=args.errors,
                        strict=args.strict, shell_options=shell, check=False, **job_kwargs(args))
    return report_job(PROG, args, result)


def main(argv=None):
    run_main(PROG, main_body, argv)


if __name__ == "__main__":
    main()
