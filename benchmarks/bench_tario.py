#!/usr/bin/env python
"""Copy throughput of tarproc.tario against webdataset and `cat`.

Copies (read + write, identity, no decoding) two shards, each with tarproc.tario, with the
webdataset library (its tar reader and TarWriter), and reads them with `cat FILE > /dev/null` as
the ceiling:

  (a) 1,000 JPEG-sized samples: ~100 KB of random bytes each (standing in for JPEGs: only the
      I/O matters here) plus a small .cls;
  (b) 100,000 tiny samples: a .cls and a .txt of a few bytes each.

The shards live in /dev/shm when it exists (so the disk is not measured), the copies are written
to /dev/null by default (the tar bytes are still fully produced; ``--out DIR`` writes real files)
so that they compare with `cat > /dev/null`. Prints samples/s and MB/s (of the input tar) side by
side; each figure is the best of a few runs (``--repeat``, default 5; webdataset: one run, it is
slow). On a busy machine more repeats give cat and tarproc alike a better chance of a quiet moment.
Usage: python benchmarks/bench_tario.py [--tiny N] [--large N] [--dir DIR] [--out DIR] [--repeat N]
"""

import argparse
import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tarproc.tario import TarWriter, iter_samples  # noqa: E402


def make_large(path, n):
    rnd = os.urandom(1 << 20)
    with open(path, "wb") as f, TarWriter(f) as w:
        for i in range(n):
            size = 90_000 + (i * 7919) % 20_000
            start = (i * 104_729) % (len(rnd) - size)
            w.write({"__key__": "img%06d" % i, "jpg": rnd[start : start + size], "cls": str(i % 1000)})


def make_tiny(path, n):
    with open(path, "wb") as f, TarWriter(f) as w:
        for i in range(n):
            w.write({"__key__": "s%07d" % i, "cls": str(i % 1000), "txt": "text %d" % i})


def copy_tarproc(src, dst):
    n = 0
    with open(src, "rb") as f, open(dst, "wb") as g, TarWriter(g) as w:
        for sample in iter_samples(f, src):
            w.write(sample)
            n += 1
    return n


def check_identity(src):
    """A tarproc copy of a shard tarproc wrote is byte-identical to it."""
    out = io.BytesIO()
    with open(src, "rb") as f, TarWriter(out) as w:
        for sample in iter_samples(f, src):
            w.write(sample)
    with open(src, "rb") as f:
        if f.read() != out.getvalue():
            raise SystemExit("tarproc copy is not byte-identical to its input")


def copy_webdataset(src, dst, limit=None):
    from webdataset.tariterators import group_by_keys, tar_file_expander
    from webdataset.writer import TarWriter as WdsTarWriter

    n = 0
    with open(src, "rb") as f, open(dst, "wb") as g:
        w = WdsTarWriter(g, encoder=False)
        for sample in group_by_keys(tar_file_expander([{"url": src, "stream": f}])):
            w.write(sample)
            n += 1
            if n == limit:
                break
        w.close()
    return n


def cat(src, dst):
    subprocess.run(f"cat '{src}' > /dev/null", shell=True, check=True)
    return None


def timed(fn, src, dst, repeat):
    best = None
    n = None
    for _ in range(repeat):
        t = time.perf_counter()
        n = fn(src, dst)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--large", type=int, default=1000, help="samples of ~100 KB (default 1000)")
    ap.add_argument("--tiny", type=int, default=100_000, help="tiny samples (default 100000)")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None, help="where to put the input shards")
    ap.add_argument("--out", default=None, help="write the copies to files in this directory (default /dev/null)")
    ap.add_argument("--no-webdataset", action="store_true", help="skip the (slow) webdataset runs")
    ap.add_argument("--repeat", type=int, default=5, help="runs of cat and of tarproc, the best taken (default 5)")
    ap.add_argument(
        "--wds-tiny",
        type=int,
        default=20_000,
        help="webdataset copies only this many of the tiny samples (default 20000; it needs ~1 ms "
        "a sample, and its tarfile reader only slows down as a shard grows, so the rate is not flattered)",
    )
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench_tario-", dir=args.dir)
    try:
        sets = [
            (f"(a) {args.large:,} JPEG-sized (~100 KB)", "large.tar", make_large, args.large),
            (f"(b) {args.tiny:,} tiny (.cls+.txt)", "tiny.tar", make_tiny, args.tiny),
        ]
        tools = [("cat > /dev/null", cat, args.repeat), ("tarproc.tario", copy_tarproc, args.repeat)]
        if not args.no_webdataset:
            tools.append(("webdataset", copy_webdataset, 1))
        rows = []
        for label, fname, make, n in sets:
            src = os.path.join(tmp, fname)
            make(src, n)
            size = os.path.getsize(src)
            cat(src, None)  # warm the page cache
            results = {}
            for tool, fn, repeat in tools:
                dst = os.path.join(args.out, "bench_tario-copy.tar") if args.out else os.devnull
                want = n
                if fn is copy_webdataset and fname == "tiny.tar" and args.wds_tiny < n:
                    want = args.wds_tiny
                    fn = functools.partial(copy_webdataset, limit=want)
                    tool = f"webdataset ({want:,})"
                dt, count = timed(fn, src, dst, repeat)
                if count is not None and count != want:
                    raise SystemExit(f"{tool} copied {count} samples of {want}")
                if fn is copy_tarproc:
                    check_identity(src)
                results[tool] = dt
                rows.append((label, tool, want / dt, size * want / n / dt / 1e6, dt))
                if dst != os.devnull and os.path.exists(dst):
                    os.unlink(dst)
            os.unlink(src)
            rows.append(None)
            print(f"{label}: {size / 1e6:.1f} MB tar", file=sys.stderr)

        print()
        print(f"{'data set':34} {'tool':18} {'samples/s':>12} {'MB/s':>9} {'seconds':>8}")
        print("-" * 85)
        for row in rows:
            if row is None:
                print()
                continue
            label, tool, sps, mbs, dt = row
            print(f"{label:34} {tool:18} {sps:12,.0f} {mbs:9,.0f} {dt:8.2f}")
        by = {(r[0], r[1]): r for r in rows if r}
        large, tiny = sets[0][0], sets[1][0]
        half_cat = by[(large, "tarproc.tario")][3] / by[(large, "cat > /dev/null")][3]
        print(f"tarproc / cat MB/s on (a): {half_cat:.2f} (target >= 0.5)")
        if not args.no_webdataset:
            for label in (large, tiny):
                wds_row = next(r for r in rows if r and r[0] == label and r[1].startswith("webdataset"))
                ratio = by[(label, "tarproc.tario")][2] / wds_row[2]
                print(f"tarproc / webdataset samples/s on {label.split()[0]}: {ratio:.1f}x (target on (b): >= 2x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
