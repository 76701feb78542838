#!/usr/bin/env python
"""Speed of `htmapper` against one process and dask.bag, and its per-shard job overhead (issue "htmapper", Speed).

One run prints a side-by-side table with PASS/MISS against each target:

  (E) htmapper over 8 shards x 10,000 tiny samples with a trivial Python mapper
      (`process_sample` returns the sample), local default with 2 workers (`-j 2`), timed as the
      whole command, cluster start-up and shut-down included; next to
        - a single-process loop over the same data: tarproc's own iter_samples + SampleWriter,
          calling the same function (the same work htmapper's tasks do, minus the pool), and
        - dask.bag doing the same map: `from_sequence(pairs, npartitions=8).map(process_shard)`
          with the same per-shard function, the processes scheduler with 2 workers.
      Every alternative runs as its own Python process, timed from start to exit (imports
      included), --repeat times interleaved; medians are reported. htmapper's job time (its
      --stats "seconds", which leaves out cluster start and stop) and the time of starting and
      stopping a 2-worker local cluster alone are reported separately.
      Targets: >= 1.7x the single loop's speed, and faster than dask.bag.
      Informational: the same job with -c on an already running `dask scheduler` with 2
      single-thread `dask worker` processes (no cluster start in the command).
  (F) Job overhead: 200 empty shards (valid tars with no samples) through htmapper; shards/s and
      total seconds. Target: "a few seconds" (we check <= 5 s for the job, excluding start-up).

The "others" column: CPU (cores, averaged over the run) used by processes outside the benchmark,
from /proc/stat; well above 0 means the row's figures are skewed by other work on the machine.

    .venv/bin/python benchmarks/bench_htmapper.py [--shards 8] [--samples 10000] [--repeat 3]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from bench_tarproc import Table, log, median_run, sh, tool  # noqa: E402

MAPPER = "def process_sample(sample):\n    return sample\n"

# The per-shard work, the same for the single loop and dask.bag: read with our reader, call the
# mapper, write with our atomic writer.
SHARD_FN = r'''
import sys
from tarproc.streams import SampleWriter, iter_samples

def process_sample(sample):
    return sample

def process_shard(pair):
    src, dst = pair
    n = 0
    with SampleWriter(dst) as sink:
        for sample in iter_samples(src):
            out = process_sample(sample)
            if out is not None:
                sink.write(out)
            n += 1
    return n
'''

SINGLE = SHARD_FN + r'''
if __name__ == "__main__":
    pairs = [line.split("\t") for line in open(sys.argv[1]).read().splitlines()]
    total = sum(process_shard(p) for p in pairs)
    assert total == int(sys.argv[2]), total
'''

DASK_BAG = SHARD_FN + r'''
if __name__ == "__main__":
    import dask
    import dask.bag as db
    pairs = [tuple(line.split("\t")) for line in open(sys.argv[1]).read().splitlines()]
    bag = db.from_sequence(pairs, npartitions=len(pairs)).map(process_shard)
    total = sum(bag.compute(scheduler="processes", num_workers=int(sys.argv[3])))
    assert total == int(sys.argv[2]), total
'''

CLUSTER = r'''
import json, sys, time
t0 = time.perf_counter()
import distributed  # noqa: F401  (connect imports it lazily: count it as import, not start)
from tarproc.jobs.cluster import connect
if __name__ == "__main__":
    t1 = time.perf_counter()
    with connect(None, workers=int(sys.argv[1]), quiet=True) as client:
        client.submit(sum, [1, 2], pure=False).result()
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    print(json.dumps({"import": t1 - t0, "start": t2 - t1, "stop": t3 - t2}))
'''


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def make_shards(directory, shards, samples):
    from tarproc.tario import TarWriter

    os.makedirs(directory, exist_ok=True)
    paths = []
    for s in range(shards):
        path = os.path.join(directory, f"tiny-{s:04d}.tar")
        with open(path, "wb") as f, TarWriter(f) as w:
            for i in range(samples):
                k = s * samples + i
                w.write({"__key__": "s%08d" % k, "cls": str(k % 1000), "txt": "text %d" % k})
        paths.append(path)
    return paths


def run_htmapper(tmp, mapper, pattern, out_dir, out_pattern, workers, address=None):
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    stats = os.path.join(tmp, "stats.json")
    where = ["-c", address] if address else ["-j", str(workers)]
    run = sh(tool("htmapper") + ["-q"] + where + ["-p", mapper, "--no-speculation",
                                 "--stats", stats, pattern, os.path.join(out_dir, out_pattern)])
    with open(stats) as f:
        data = json.load(f)
    if data["failed"] or data["done"] != data["total"]:
        raise RuntimeError(f"htmapper: {data['done']} of {data['total']} done, failed: {data['failed']}")
    run.job_seconds = data["seconds"]
    run.samples_out = data["totals"].get("samples_out", 0)
    return run


def cluster_start(workers):
    import subprocess

    out = subprocess.run([sys.executable, "-c", CLUSTER, str(workers)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--samples", type=int, default=10_000, help="tiny samples per shard (default 10000)")
    ap.add_argument("--workers", type=int, default=2, help="htmapper -j and dask.bag num_workers (default 2)")
    ap.add_argument("--empty", type=int, default=200, help="empty shards for the overhead test (default 200)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir under /tmp)")
    args = ap.parse_args()

    started = time.perf_counter()
    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="bench_htmapper-", dir=args.dir)
    table = Table()
    n = args.shards * args.samples
    try:
        log(f"generating {args.shards} x {args.samples:,} tiny samples in {tmp}")
        inputs = make_shards(os.path.join(tmp, "in"), args.shards, args.samples)
        pattern = os.path.join(tmp, "in", "tiny-{0000..%04d}.tar" % (args.shards - 1))
        mapper = write_file(os.path.join(tmp, "identity.py"), MAPPER)
        single = write_file(os.path.join(tmp, "single.py"), SINGLE)
        bag = write_file(os.path.join(tmp, "dask_bag.py"), DASK_BAG)
        out_dir = os.path.join(tmp, "out")
        pairs_file = os.path.join(tmp, "pairs.tsv")
        write_file(pairs_file, "".join(f"{src}\t{os.path.join(out_dir, f'o-{i:04d}.tar')}\n"
                                       for i, src in enumerate(inputs)))

        log(f"(E) htmapper -j {args.workers} vs one process vs dask.bag, {args.repeat} rounds")
        runs = {"single": [], "bag": [], "htmapper": []}
        starts = []
        for _ in range(args.repeat):
            for name in ("single", "bag"):
                shutil.rmtree(out_dir, ignore_errors=True)
                os.makedirs(out_dir)
                script = single if name == "single" else bag
                runs[name].append(sh([sys.executable, script, pairs_file, str(n), str(args.workers)]))
            runs["htmapper"].append(run_htmapper(tmp, mapper, pattern, out_dir, "o-@%04d.tar" % args.shards,
                                                 args.workers))
            starts.append(cluster_start(args.workers))
        med = {k: median_run(v) for k, v in runs.items()}
        h = med["htmapper"]
        if h.samples_out != n:
            table.notes.append(f"htmapper wrote {h.samples_out} samples of {n}")
        start = sorted(starts, key=lambda s: s["start"])[len(starts) // 2]
        table.row("E", "single process: iter_samples -> fn -> SampleWriter", med["single"], n, "baseline")
        table.row("E", f"dask.bag, processes scheduler, {args.workers} workers", med["bag"], n,
                  f"{med['single'].wall / med['bag'].wall:.2f}x single")
        table.row("E", f"htmapper -j {args.workers} -p identity.py (whole command)", h, n,
                  f"{med['single'].wall / h.wall:.2f}x single; job {h.job_seconds:.2f} s, "
                  f"rest (python, imports, cluster start/stop) {h.wall - h.job_seconds:.2f} s")
        table.row("E", f"  of which: local cluster of {args.workers} alone, measured apart", None, None,
                  f"import {start['import']:.2f} s, start {start['start']:.2f} s, stop {start['stop']:.2f} s")
        table.row("E", "  htmapper job only (--stats seconds)", None, None,
                  f"{h.job_seconds:.2f} s = {n / h.job_seconds:,.0f} samples/s = "
                  f"{med['single'].wall / h.job_seconds:.2f}x single (informational)")
        log(f"(E) the same with -c: a running dask scheduler and {args.workers} single-thread workers")
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from dask_fixtures import DaskProcesses

        procs = DaskProcesses(n_workers=args.workers)
        try:
            c_runs = [run_htmapper(tmp, mapper, pattern, out_dir, "o-@%04d.tar" % args.shards, args.workers,
                                   address=procs.address) for _ in range(args.repeat)]
        finally:
            procs.close()
        c = median_run(c_runs)
        table.row("E", f"htmapper -c SCHEDULER ({args.workers} running workers), whole command", c, n,
                  f"{med['single'].wall / c.wall:.2f}x single; job {c.job_seconds:.2f} s = "
                  f"{med['single'].wall / c.job_seconds:.2f}x single (informational)")
        speed = med["single"].wall / h.wall
        table.verdict(f"(E) htmapper -j {args.workers}: {speed:.2f}x the single loop, start-up included "
                      f"(target >= 1.7x)", speed >= 1.7)
        table.verdict(f"(E) htmapper: {med['bag'].wall / h.wall:.2f}x the speed of dask.bag (target > 1x)",
                      h.wall < med["bag"].wall)

        log(f"(F) {args.empty} empty shards through htmapper")
        empty_dir = os.path.join(tmp, "empty")
        os.makedirs(empty_dir)
        for i in range(args.empty):
            with open(os.path.join(empty_dir, f"e-{i:04d}.tar"), "wb") as f:
                f.write(bytes(1024))  # end-of-archive: a valid tar with no members
        e_runs = [run_htmapper(tmp, mapper, os.path.join(empty_dir, "e-{0000..%04d}.tar" % (args.empty - 1)),
                               os.path.join(tmp, "empty-out"), "o-@%04d.tar" % args.empty, args.workers)
                  for _ in range(max(1, args.repeat - 1))]
        e = median_run(e_runs)
        table.row("F", f"htmapper -j {args.workers}, {args.empty} empty shards (whole command)", e, None,
                  f"{args.empty / e.wall:.0f} shards/s")
        table.row("F", "  job only (--stats seconds)", None, None,
                  f"{e.job_seconds:.2f} s = {args.empty / e.job_seconds:.0f} shards/s")
        table.verdict(f"(F) {args.empty} empty shards: job {e.job_seconds:.1f} s, whole command {e.wall:.1f} s, "
                      f"{args.empty / e.job_seconds:.0f} shards/s (target: a few seconds; checked: job <= 5 s)",
                      e.job_seconds <= 5.0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    table.notes.append(f"{os.cpu_count()} cores; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; "
                       f"'others' = cores busy with processes outside this benchmark during the run")
    table.notes.append(f"total benchmark time {time.perf_counter() - started:.0f} s")
    table.print()


if __name__ == "__main__":
    main()
