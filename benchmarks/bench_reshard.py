"""Benchmark: global shuffle and sort of sharded tar files, tarproc next to other engines.

Two datasets, 8 input shards each (uncompressed tar, so the engines are measured, not gzip):

- tiny: 100,000 samples of a few dozen bytes (`__key__` random, `txt`, `cls`);
- imagenet: 4,000 ImageNet-sized samples (~100 KB JPEG, `cls`, `json`).

Operations: shuffle (8 -> 8 shards, random order) and sort by `__key__` (8 -> 8 range-partitioned
shards). Engines, each in a fresh process on the same machine:

- tarproc: `htshuffle` / `htsort` with the local default (a local Dask cluster, one worker per core);
- dask.bag: samples read with tarproc's tar reader, `groupby(partition, shuffle="disk")`, then
  each group ordered and written as one tar (the bag way to reshard; foldby is for reductions);
- ray: Ray Data `read_webdataset` -> `random_shuffle` / `sort` -> `write_webdataset`;
- spark: pyspark `local[2]`, `repartitionAndSortWithinPartitions` / `sortByKey`, partitions
  written as tar with tarproc's writer.

Wall time, samples/s, and the peaks of the whole process tree's summed RSS and summed PSS (sampled
every 50 ms with psutil) are printed as a Markdown table. Summed RSS counts pages that forked
processes share once per process; summed PSS counts them once in all, so it is the tree's real
memory (PSS is read every 250 ms, RSS every 50 ms, from /proc). Engines that are not installed
are reported as skipped.

    python benchmarks/bench_reshard.py [--workdir DIR] [--engines tarproc,dask,ray,spark]
        [--datasets tiny,imagenet] [--ops shuffle,sort]
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARDS = 8
SIZES = {"tiny": 100_000, "imagenet": 4_000}


# ---------------------------------------------------------------------------------------------
# data


def make_data(root, name):
    """Write the dataset once (reused by later runs)."""
    sys.path.insert(0, REPO)
    from tarproc import datagen

    d = os.path.join(root, name)
    done = os.path.join(d, ".complete")
    if os.path.exists(done):
        return d
    os.makedirs(d, exist_ok=True)
    n = SIZES[name]
    per = n // SHARDS
    rng = random.Random(0)
    for s in range(SHARDS):
        if name == "tiny":
            samples = [{"__key__": f"{rng.getrandbits(48):012x}{s}{i:05d}",
                        "txt": " ".join(rng.choice(datagen.WORDS) for _ in range(4)).encode(),
                        "cls": str(rng.randrange(1000)).encode()} for i in range(per)]
        else:
            samples = datagen.imagenet_samples(per, start=s * per, seed=1, distinct=50)
            for smp in samples:  # random keys, so that sorting has work to do
                smp["__key__"] = f"{rng.getrandbits(48):012x}_{smp['__key__']}"
        datagen.write_tar(os.path.join(d, f"in-{s}.tar"), samples, compress=False)
    open(done, "w").close()
    return d


# ---------------------------------------------------------------------------------------------
# engines (each runs in its own process: `--run ENGINE OP INDIR OUTDIR`)


def run_tarproc(op, indir, outdir):
    prog = "htshuffle" if op == "shuffle" else "htsort"
    cmd = [sys.executable, "-m", f"tarproc.cli.{prog}", f"{indir}/in-@{SHARDS}.tar",
           f"{outdir}/out-@{SHARDS}.tar", "-q", "--no-speculation"]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=REPO))


def _read_shard(url):
    from tarproc.streams import iter_samples
    out = []
    for s in iter_samples(url):
        s.pop("__url__", None)
        out.append(s)
    return out


def _write_tar(path, samples):
    from tarproc.streams import write_samples
    return write_samples(path, samples)[0]


def _boundaries(keys, n):
    keys = sorted(keys)
    return [keys[len(keys) * i // n] for i in range(1, n)]


def _blake(key, seed=0):
    import hashlib
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).hexdigest()


def run_dask(op, indir, outdir):
    import bisect

    import dask
    import dask.bag as db

    urls = [f"{indir}/in-{s}.tar" for s in range(SHARDS)]
    bag = db.from_sequence(urls, npartitions=SHARDS).map(_read_shard).flatten()
    if op == "shuffle":
        part = lambda s: int(_blake(s["__key__"]), 16) % SHARDS  # noqa: E731
        order = lambda s: _blake(s["__key__"], 1)  # noqa: E731
    else:
        sample = bag.map(lambda s: s["__key__"]).random_sample(0.02, random_state=0)
        bounds = _boundaries(sample.compute(scheduler="processes", num_workers=2), SHARDS)
        part = lambda s: bisect.bisect_right(bounds, s["__key__"])  # noqa: E731
        order = lambda s: s["__key__"]  # noqa: E731
    grouped = bag.groupby(part, shuffle="disk", npartitions=SHARDS)

    def write(pair):
        p, samples = pair
        samples.sort(key=order)
        return _write_tar(f"{outdir}/out-{p}.tar", samples)

    with dask.config.set(num_workers=2):
        grouped.map(write).compute(scheduler="processes")


def run_ray(op, indir, outdir):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ds = ray.data.read_webdataset(f"{indir}", decoder=None, override_num_blocks=SHARDS)
    ds = ds.random_shuffle(seed=0) if op == "shuffle" else ds.sort("__key__")
    ds.repartition(SHARDS).write_webdataset(outdir, encoder=None)
    ray.shutdown()


def run_spark(op, indir, outdir):
    from pyspark import SparkConf, SparkContext

    conf = (SparkConf().setMaster("local[2]").setAppName("bench")
            .set("spark.ui.enabled", "false").set("spark.driver.memory", "2g"))
    sc = SparkContext(conf=conf)
    sc.setLogLevel("ERROR")
    urls = [f"{indir}/in-{s}.tar" for s in range(SHARDS)]
    rdd = sc.parallelize(urls, SHARDS).flatMap(_read_shard)

    def write(index, items):
        yield _write_tar(f"{outdir}/out-{index}.tar", (s for _, s in items))

    if op == "shuffle":
        pairs = rdd.map(lambda s: (_blake(s["__key__"]), s))
        out = pairs.repartitionAndSortWithinPartitions(
            SHARDS, partitionFunc=lambda k: int(k, 16))
    else:
        out = rdd.map(lambda s: (s["__key__"], s)).sortByKey(numPartitions=SHARDS)
    out.mapPartitionsWithIndex(write).collect()
    sc.stop()


ENGINES = {"tarproc": run_tarproc, "dask": run_dask, "ray": run_ray, "spark": run_spark}
NEEDS = {"tarproc": "distributed", "dask": "dask.bag", "ray": "ray", "spark": "pyspark"}


# ---------------------------------------------------------------------------------------------
# measuring


def _rss(pid):
    """Resident bytes of a process from /proc/PID/statm (cheap: no page walk)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _pss(pid):
    """Proportional set size from /proc/PID/smaps_rollup (walks the pages: ~ms per process)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


PAGE = os.sysconf("SC_PAGE_SIZE")


def measure(cmd, env):
    """Run cmd; return (seconds, peak RSS, peak PSS, returncode, stderr) of the process tree.

    RSS summed over processes counts a page shared by several of them (forked workers, a fork
    server) once per process; PSS splits each shared page between its sharers, so its sum is the
    memory the tree really holds. RSS is sampled every 50 ms, PSS (whose reading walks every
    page: it would take a fifth of a core at 50 ms) and the list of processes every 250 ms.
    """
    import psutil

    import tempfile

    errfile = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall workers
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errfile)
    ps = psutil.Process(proc.pid)
    peak = peak_pss = 0
    pids = [proc.pid]
    tick = 0
    while proc.poll() is None:
        slow = tick % 5 == 0
        tick += 1
        if slow:
            try:
                pids = [proc.pid] + [c.pid for c in ps.children(recursive=True)]
            except psutil.Error:
                pass
        rss = pss = 0
        for pid in pids:
            try:
                rss += _rss(pid)
                if slow:
                    pss += _pss(pid)
            except (OSError, ValueError, IndexError):
                continue
        peak = max(peak, rss)
        if slow:
            peak_pss = max(peak_pss, pss)
        time.sleep(0.05)
    seconds = time.monotonic() - t0
    errfile.seek(0)
    err = errfile.read().decode(errors="replace")
    return seconds, peak, peak_pss, proc.returncode, err


def count_out(outdir):
    sys.path.insert(0, REPO)
    from tarproc.tario import iter_samples

    n = 0
    for name in sorted(os.listdir(outdir)):
        if name.endswith(".tar"):
            with open(os.path.join(outdir, name), "rb") as f:
                n += sum(1 for _ in iter_samples(f, name))
    return n


def available(engine):
    import importlib.util
    return importlib.util.find_spec(NEEDS[engine].split(".")[0]) is not None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/tarproc-bench")
    parser.add_argument("--engines", default="tarproc,dask,ray,spark")
    parser.add_argument("--datasets", default="tiny,imagenet")
    parser.add_argument("--ops", default="shuffle,sort")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--run", nargs=3, metavar=("ENGINE", "OP", "INDIR/OUTDIR"),
                        help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.run:
        engine, op, indir = args.run
        sys.path.insert(0, REPO)
        ENGINES[engine](op, indir, rest[0])
        return 0

    rows = []
    env = dict(os.environ, PYTHONPATH=REPO)
    for dataset in args.datasets.split(","):
        indir = make_data(args.workdir, dataset)
        n = SIZES[dataset]
        for op in args.ops.split(","):
            for engine in args.engines.split(","):
                if not available(engine):
                    rows.append((dataset, op, engine, None, None, None, None, "not installed"))
                    continue
                outdir = os.path.join(args.workdir, "out", f"{dataset}-{op}-{engine}")
                shutil.rmtree(outdir, ignore_errors=True)
                os.makedirs(outdir)
                cmd = [sys.executable, os.path.abspath(__file__), "--run", engine, op, indir,
                       outdir]
                seconds, peak, pss, rc, err = measure(cmd, env)
                note = ""
                if rc != 0:
                    note = "failed: " + (err.strip().splitlines() or ["?"])[-1][:120]
                else:
                    got = count_out(outdir)
                    if got != n:
                        note = f"wrong count {got}"
                rows.append((dataset, op, engine, seconds, n / seconds if not note else None,
                             peak, pss, note))
                print(f"{dataset:9} {op:8} {engine:8} {seconds:7.1f} s  peak RSS {peak / 1e6:7.0f} MB"
                      f"  PSS {pss / 1e6:7.0f} MB  {note}", file=sys.stderr, flush=True)
                shutil.rmtree(outdir, ignore_errors=True)

    print("| data | op | engine | wall s | samples/s | peak RSS MB | peak PSS MB | note |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for d, op, e, s, rate, peak, pss, note in rows:
        fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
        print(f"| {d} | {op} | {e} | {fmt(s, '{:.1f}')} | {fmt(rate, '{:.0f}')} | "
              f"{fmt(peak and peak / 1e6, '{:.0f}')} | {fmt(pss and pss / 1e6, '{:.0f}')} | {note} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
