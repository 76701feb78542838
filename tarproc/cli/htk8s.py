"""htk8s: print one Kubernetes Job per shard, each streaming its shard through `tarproc -c CMD`.

    htk8s -c 'gm convert sample.jpg sample.png; rm sample.jpg' \\
        'http://data/imagenet_train-{0000..0147}.tgz' 'http://data/out-{0000..0147}.tar' \\
        | kubectl apply -f -

The pipeline style of running on a cluster: no Dask, each Job runs
`curl IN | tarproc -c CMD -o - | curl -T - OUT` and Kubernetes does the retries.
"""

import argparse
import sys

from .common import at_least_one, at_least_zero, run_main

PROG = "htk8s"


def build_parser():
    """The command line of htk8s."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Render one Kubernetes batch/v1 Job per shard (curl IN | tarproc -c CMD -o - | "
                    "curl -T - OUT) as a YAML stream for `kubectl apply -f -`.",
        epilog="Patterns use {0000..0147} or @N; inputs and outputs must name equally many shards. "
               "Every `$` in the command reaches bash unchanged (it is escaped from Kubernetes' "
               "$(VAR) expansion).")
    parser.add_argument("-c", "--command", required=True, metavar="CMD",
                        help="the shell command tarproc runs on each sample (as in `tarproc -c`)")
    parser.add_argument("inputs", help="input shard pattern (http(s)://, ftp://, file://, ...)")
    parser.add_argument("outputs", help="output shard pattern, as many shards as the inputs")
    parser.add_argument("--name", default="tarproc", metavar="PREFIX",
                        help="Job name prefix; Jobs are PREFIX-0000, PREFIX-0001, ... (default tarproc)")
    parser.add_argument("--image", metavar="IMAGE",
                        help="container image (default: the template's, tarproc-worker:latest)")
    parser.add_argument("--template", metavar="FILE",
                        help="Job template YAML (default: the built-in copy of k8s/job-template.yaml)")
    parser.add_argument("--cpu", metavar="QTY", help="CPU request and limit, e.g. 1 or 500m (default: template's)")
    parser.add_argument("--memory", metavar="QTY", help="memory request and limit, e.g. 2Gi (default: template's)")
    parser.add_argument("--backoff-limit", type=at_least_zero, metavar="N",
                        help="retries of a failed Job before Kubernetes gives up (default: template's, 3)")
    parser.add_argument("--procs", type=at_least_one, metavar="N",
                        help="samples each Job processes in parallel (tarproc -p N; default 1)")
    return parser


def _run(argv):
    args = build_parser().parse_args(argv)
    from .. import k8s

    jobs = k8s.render_jobs(
        args.inputs, args.outputs, args.command, template_path=args.template, image=args.image,
        name=args.name, cpu=args.cpu, memory=args.memory, backoff_limit=args.backoff_limit,
        procs=args.procs)
    sys.stdout.write(k8s.dump_jobs(jobs))
    sys.stdout.flush()
    return 0


def main(argv=None):
    """Entry point of the `htk8s` command."""
    run_main(PROG, _run, argv)


if __name__ == "__main__":
    main()
