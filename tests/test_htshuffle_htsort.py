"""htshuffle and htsort end to end: real shards, a real local Dask cluster, a real
dask-scheduler with workers under different PYTHONHASHSEED, and nginx WebDAV."""

import os
import random
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from tarproc import datagen
from tarproc.jobs.cluster import Cluster
from tarproc.jobs.twophase import shuffle, sort
from tarproc.streams import iter_samples

REPO = Path(__file__).resolve().parent.parent

WORDCOUNT = textwrap.dedent('''
    def process_sample(sample):
        words = sample["txt"].decode().split()
        return [{"__key__": f"{sample['__key__']}-{i}", "txt": w, "count": "1"}
                for i, w in enumerate(words)]

    def reduce_samples(key, samples):
        n = sum(int(s["count"]) for s in samples)
        return {"__key__": key, "txt": key, "count": str(n)}
''')


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of two workers for the Python-API tests of this module."""
    with Cluster(workers=2, quiet=True) as c:
        yield c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """data/Volume_00.tgz .. Volume_15.tgz (16 x 10 OCR-like samples, named so that the seed
    command's 'Volume_@16.tgz' matches) and data/words-0.tar .. words-7.tar (8 x 50 docs)."""
    root = tmp_path_factory.mktemp("reshard")
    d = root / "data"
    datagen.write_dataset("uw3", str(d), shards=16, samples=10, seed=2, name="Volume_{:02d}.tgz")
    datagen.write_dataset("words", str(d), shards=8, samples=50, seed=3, name="words-{:d}.tar")
    (root / "wordcount.py").write_text(WORDCOUNT)
    return root


def cli(prog, *args, cwd, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", f"tarproc.cli.{prog}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def canon(sample):
    """A sample as a hashable value: key and every field (not __url__)."""
    return (sample["__key__"],) + tuple(sorted((k, v) for k, v in sample.items()
                                               if not k.startswith("__")))


def read_all(pattern):
    return [canon(s) for s in iter_samples(pattern)]


def shard_counts(urls):
    return [sum(1 for _ in iter_samples(u)) for u in urls]


def file_bytes(paths):
    return [Path(p).read_bytes() for p in paths]


def test_htshuffle_seed_command(data, tmp_path):
    """htshuffle 'data/Volume_@16.tgz' 'out/shuffled-@32.tgz': same multiset, new order."""
    r = cli("htshuffle", "data/Volume_@16.tgz", "out/shuffled-@32.tgz", "-j", "2", "-q",
            cwd=data)
    assert r.returncode == 0, r.stderr
    out = sorted((data / "out").iterdir())
    assert [p.name for p in out] == [f"shuffled-{i:02d}.tgz" for i in range(32)]
    original = read_all(str(data / "data/Volume_@16.tgz"))
    shuffled = read_all(str(data / "out/shuffled-@32.tgz"))
    assert Counter(shuffled) == Counter(original) and len(shuffled) == 160
    assert shuffled != original


def test_shuffle_repeats_with_seed_whatever_the_workers(data, tmp_path, cluster):
    inputs = str(data / "data/Volume_@16.tgz")
    a = shuffle(inputs, str(tmp_path / "a/s-@4.tar"), seed=7, cluster=cluster, progress=False)
    assert a.ok, a.failed
    b = shuffle(inputs, str(tmp_path / "b/s-@4.tar"), seed=7, workers=1, progress=False)
    assert b.ok, b.failed
    c = shuffle(inputs, str(tmp_path / "c/s-@4.tar"), seed=8, cluster=cluster, progress=False)
    fa, fb, fc = (file_bytes(sorted((tmp_path / d).iterdir())) for d in "abc")
    assert fa == fb  # byte-identical with 2 workers and 1 worker
    assert fa != fc  # another seed, another order
    assert Counter(read_all(str(tmp_path / "c/s-@4.tar"))) == \
        Counter(read_all(str(tmp_path / "a/s-@4.tar")))


def tiny_shards(directory, shards, per_shard, key=lambda s, i: f"k{s:02d}-{i:06d}", extra=None):
    paths = []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            sample = {"__key__": key(s, i), "v": f"{s}:{i}".encode()}
            if extra:
                sample.update(extra(s, i))
            samples.append(sample)
        paths.append(datagen.write_tar(os.path.join(directory, f"in-{s:0{len(str(shards))}d}.tar"), samples))
    return paths


def test_shuffle_balance_on_10000_tiny_samples(tmp_path, cluster):
    tiny_shards(tmp_path / "in", 8, 1300)
    r = shuffle(str(tmp_path / "in/in-@8.tar"), str(tmp_path / "out/o-@16.tar"), seed=3,
                cluster=cluster, progress=False)
    assert r.ok, r.failed
    counts = shard_counts(sorted(str(p) for p in (tmp_path / "out").iterdir()))
    assert sum(counts) == 10_400
    assert max(counts) / (sum(counts) / 16) <= 1.05
    # each output shard mixes many inputs, in no particular order
    first = [s["v"].split(b":")[0] for s in iter_samples(str(tmp_path / "out/o-00.tar"))]
    assert len(set(first)) == 8
    assert first != sorted(first)


def test_htsort_seed_command_sorted_across_shards(data):
    """htsort 'data/Volume_@16.tgz' 'out/sorted-@32.tgz' (16 -> 32)."""
    r = cli("htsort", "data/Volume_@16.tgz", "out/sorted-@32.tgz", "-j", "2", "-q", cwd=data)
    assert r.returncode == 0, r.stderr
    keys = [s["__key__"] for s in iter_samples(str(data / "out/sorted-@32.tgz"))]
    assert keys == sorted(keys) and len(keys) == 160
    assert Counter(read_all(str(data / "out/sorted-@32.tgz"))) == \
        Counter(read_all(str(data / "data/Volume_@16.tgz")))


def test_sort_fewer_outputs_skewed_numeric_reverse(tmp_path, cluster):
    """16 -> 4 shards by a skewed numeric field, descending: order and balance within 20%."""
    rng = random.Random(5)
    values = {}

    def extra(s, i):
        v = round(rng.expovariate(1.0) ** 4 * 1000, 3)
        values[(s, i)] = v
        return {"score": str(v).encode()}

    tiny_shards(tmp_path / "in", 16, 400, extra=extra)
    r = sort(str(tmp_path / "in/in-@16.tar"), str(tmp_path / "out/o-@4.tar"), key="score",
             numeric=True, reverse=True, cluster=cluster, progress=False)
    assert r.ok, r.failed
    outs = [str(tmp_path / f"out/o-{i}.tar") for i in range(4)]
    scores = [float(s["score"]) for u in outs for s in iter_samples(u)]
    assert scores == sorted(values.values(), reverse=True)
    counts = shard_counts(outs)
    assert max(counts) / (sum(counts) / 4) <= 1.2, counts


def test_sort_skewed_text_keys_balanced(tmp_path, cluster):
    rng = random.Random(9)
    tiny_shards(tmp_path / "in", 4, 2500,
                key=lambda s, i: f"{int(rng.paretovariate(0.7)):012d}-{s}-{i:05d}")
    r = sort(str(tmp_path / "in/in-@4.tar"), str(tmp_path / "out/o-@10.tar"), cluster=cluster,
             progress=False)
    assert r.ok, r.failed
    outs = [str(tmp_path / f"out/o-{i:02d}.tar") for i in range(10)]
    keys = [s["__key__"] for u in outs for s in iter_samples(u)]
    assert keys == sorted(keys) and len(keys) == 10_000
    counts = shard_counts(outs)
    assert max(counts) / 1000 <= 1.2, counts


def test_equal_keys_land_in_one_shard_contiguous(tmp_path, cluster):
    groups = "apple banana cherry date elder fig grape".split()
    tiny_shards(tmp_path / "in", 6, 300,
                extra=lambda s, i: {"g": groups[(s * 7 + i * i) % len(groups)].encode()})
    r = sort(str(tmp_path / "in/in-@6.tar"), str(tmp_path / "out/o-@3.tar"), key="g",
             cluster=cluster, progress=False)
    assert r.ok, r.failed
    where = {}
    seq = []
    for n in range(3):
        for s in iter_samples(str(tmp_path / f"out/o-{n}.tar")):
            where.setdefault(s["g"], set()).add(n)
            seq.append(s["g"])
    assert all(len(v) == 1 for v in where.values())
    assert seq == sorted(seq)


def test_wordcount_seed_command_equals_counter(data):
    """htsort 'data/words-@8.tar' 'out/counts-@4.tar' -k txt --reduce wordcount.py"""
    r = cli("htsort", "data/words-@8.tar", "out/counts-@4.tar", "-k", "txt", "--reduce",
            "wordcount.py", "-j", "2", "-q", cwd=data)
    assert r.returncode == 0, r.stderr
    expected = Counter()
    for s in iter_samples(str(data / "data/words-@8.tar")):
        expected.update(s["txt"].decode().split())
    got = [(s["txt"].decode(), int(s["count"])) for s in iter_samples(str(data / "out/counts-@4.tar"))]
    assert dict(got) == dict(expected)
    assert [w for w, _ in got] == sorted(expected)


def test_wordcount_python_callables_with_combiner(data, tmp_path, cluster):
    """The same word count from Python callables defined here, with --combine (a combiner)."""
    def split_words(sample):
        return [{"__key__": f"{sample['__key__']}-{i}", "txt": w, "count": "1"}
                for i, w in enumerate(sample["txt"].decode().split())]

    def add_counts(key, samples):
        return {"__key__": key, "txt": key, "count": str(sum(int(s["count"]) for s in samples))}

    r = sort(str(data / "data/words-@8.tar"), str(tmp_path / "c-@3.tar"), key="txt",
             mapper=split_words, reduce=add_counts, combine=True, cluster=cluster,
             progress=False, keep_work=True)
    assert r.ok, r.failed
    expected = Counter()
    for s in iter_samples(str(data / "data/words-@8.tar")):
        expected.update(s["txt"].decode().split())
    got = {s["txt"].decode(): int(s["count"]) for s in iter_samples(str(tmp_path / "c-@3.tar"))}
    assert got == dict(expected)
    # the combiner ran in the map tasks: at most one record per word per map crossed the shuffle
    assert r.phases["map"].totals["samples_out"] <= 8 * len(expected)
    assert r.phases["map"].totals["samples_mapped"] == sum(expected.values())
    assert os.path.isdir(r.workdir)  # keep_work


def test_interrupted_job_resumes_from_map_outputs(data, tmp_path, cluster):
    """A map task fails (as if the job was interrupted); the rerun reuses the others."""
    flag = tmp_path / "fail-now"
    flag.write_text("1")
    script = tmp_path / "mapper.py"
    script.write_text(textwrap.dedent(f'''
        import os
        def process_sample(sample):
            if os.path.exists({str(flag)!r}) and sample["__url__"].endswith("Volume_05.tgz"):
                raise RuntimeError("simulated crash")
            return sample
    '''))
    work = tmp_path / "work"
    args = (str(data / "data/Volume_@16.tgz"), str(tmp_path / "out/s-@6.tgz"))
    kw = dict(seed=1, mapper=str(script), cluster=cluster, workdir=str(work), retries=0,
              progress=False)
    r1 = shuffle(*args, **kw)
    assert not r1.ok
    assert [k for k, _ in r1.failed] == [str(data / "data/Volume_05.tgz")]
    assert "simulated crash" in r1.failed[0][1]
    assert not (tmp_path / "out").exists()  # nothing at the destination
    assert sum(1 for m in range(16) if (work / f"map-{m:05d}/done.json").exists()) == 15
    flag.unlink()
    r2 = shuffle(*args, **kw)
    assert r2.ok, r2.failed
    assert r2.phases["map"].skipped == 15 and r2.phases["map"].done == 1
    assert not work.exists()  # removed after success
    fresh = shuffle(args[0], str(tmp_path / "fresh/s-@6.tgz"), seed=1, mapper=str(script),
                    cluster=cluster, progress=False)
    assert file_bytes(sorted((tmp_path / "out").iterdir())) == \
        file_bytes(sorted((tmp_path / "fresh").iterdir()))
    assert fresh.ok


def test_interrupted_reduce_resumes_with_the_outputs_it_committed(data, tmp_path, cluster):
    """A reduce task fails (its output path is taken by a directory): the rerun keeps the
    shards the first run committed and writes only the missing one. After success, an output
    that exists without this job's record of writing it is rewritten, never patched in."""
    out = tmp_path / "out"
    (out / "s-2.tgz").mkdir(parents=True)
    work = tmp_path / "work"
    args = (str(data / "data/Volume_@16.tgz"), str(out / "s-@6.tgz"))
    kw = dict(seed=1, cluster=cluster, workdir=str(work), retries=0, progress=False)
    r1 = shuffle(*args, **kw)
    assert not r1.ok and [k for k, _ in r1.failed] == [str(out / "s-2.tgz")]
    assert r1.phases["reduce"].done == 5
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert len(first) == 5
    (out / "s-2.tgz").rmdir()
    r2 = shuffle(*args, **kw)
    assert r2.ok, r2.failed
    assert r2.phases["map"].skipped == 16 and r2.phases["reduce"].skipped == 5
    assert r2.phases["reduce"].done == 1 and r2.rewritten == 0
    assert {n: (out / n).stat().st_mtime_ns for n in first} == first  # not written again
    assert not work.exists()
    fresh = shuffle(args[0], str(tmp_path / "fresh/s-@6.tgz"), seed=1, cluster=cluster, progress=False)
    assert fresh.ok
    assert file_bytes(sorted(out.iterdir())) == file_bytes(sorted((tmp_path / "fresh").iterdir()))
    # the work files are gone now: with one output removed, all are rewritten (same bytes)
    (out / "s-4.tgz").unlink()
    r3 = shuffle(*args, **kw)
    assert r3.ok and r3.phases["reduce"].done == 6 and r3.rewritten == 5
    assert "5 output shard(s) that existed rewritten" in r3.summary()
    assert file_bytes(sorted(out.iterdir())) == file_bytes(sorted((tmp_path / "fresh").iterdir()))
    # all present: nothing to do
    r4 = shuffle(*args, **kw)
    assert r4.skipped and "nothing to do" in r4.summary()


def test_corrupt_input_reported_nothing_written(data, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(4):
        (src / f"v-{i}.tgz").write_bytes((data / f"data/Volume_{i:02d}.tgz").read_bytes())
    good = (src / "v-2.tgz").read_bytes()
    (src / "v-2.tgz").write_bytes(good[: len(good) // 2])  # truncated gzip
    r = cli("htsort", "in/v-@4.tgz", "out/o-@2.tgz", "-j", "2", "-q", "--retries", "0",
            cwd=tmp_path)
    assert r.returncode == 1
    assert "in/v-2.tgz" in r.stderr and "failed" in r.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_remote_cluster_needs_workdir(data):
    r = cli("htshuffle", "-c", "127.0.0.1:1", "data/Volume_@16.tgz", "out/x-@2.tgz", cwd=data)
    assert r.returncode == 1
    assert "--workdir" in r.stderr and "Traceback" not in r.stderr
    assert not (data / "out/x-0.tgz").exists()


def test_real_cluster_http_seed_command(data, tmp_path, dask_scheduler_address, nginx_server):
    """htshuffle -c ADDR 'http://.../Volume_@16.tgz' 'http://.../shuffled-@8.tgz' --seed 7 on a
    real dask-scheduler whose workers run under different PYTHONHASHSEED, with the workdir on
    WebDAV; byte-identical to a local run."""
    web = nginx_server.root / "rs"
    web.mkdir(exist_ok=True)
    for i in range(16):
        (web / f"Volume_{i:02d}.tgz").write_bytes((data / f"data/Volume_{i:02d}.tgz").read_bytes())
    base = f"{nginx_server.url}/rs"
    r = cli("htshuffle", "-c", dask_scheduler_address, f"{base}/Volume_@16.tgz",
            f"{base}/shuffled-@8.tgz", "--seed", "7", "--workdir", f"{base}/work/", "-q",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    local = shuffle(str(data / "data/Volume_@16.tgz"), str(tmp_path / "local/shuffled-@8.tgz"),
                    seed=7, workers=1, progress=False)
    assert local.ok
    assert file_bytes([web / f"shuffled-{i}.tgz" for i in range(8)]) == \
        file_bytes(sorted((tmp_path / "local").iterdir()))
    assert not any((web / "work").rglob("*.tar"))  # intermediates deleted


def test_real_cluster_sort_with_reduce_callable(data, tmp_path, dask_scheduler_address):
    """A reduce defined in this test module (not importable by the workers) on the real cluster."""
    def dedup(key, samples):
        return next(samples)

    src = tmp_path / "in"
    tiny_shards(src, 4, 200, key=lambda s, i: f"k{i % 150:04d}")  # duplicates across shards
    r = sort(str(src / "in-@4.tar"), str(tmp_path / "out/o-@2.tar"), reduce=dedup,
             cluster=dask_scheduler_address, workdir=str(tmp_path / "work"), progress=False)
    assert r.ok, r.failed
    keys = [s["__key__"] for s in iter_samples(str(tmp_path / "out/o-@2.tar"))]
    assert keys == [f"k{i:04d}" for i in range(150)]


@pytest.mark.filterwarnings("ignore:.*split")  # the same key again, further on
def test_duplicate_keys_shuffled_apart_and_refused_by_sort(tmp_path, cluster):
    """Inputs holding each key several times (two copies of a dataset, and a key in every
    shard): htshuffle writes every sample, never two of one key in a row (webdataset would read
    those as one sample and fail); htsort, which must put them side by side, fails with a
    message naming the output and the key, and writes nothing; --reduce merges them."""
    import webdataset as wds

    tiny_shards(tmp_path / "in", 6, 200, key=lambda s, i: f"k{i % 100:03d}" if i % 7 else "same")
    inputs = str(tmp_path / "in/in-@6.tar")
    original = read_all(inputs)
    r = shuffle(inputs, str(tmp_path / "sh/o-@3.tar"), seed=1, cluster=cluster, progress=False)
    assert r.ok, r.failed
    outs = sorted(str(p) for p in (tmp_path / "sh").iterdir())
    assert Counter(read_all(str(tmp_path / "sh/o-@3.tar"))) == Counter(original)
    for url in outs:
        keys = [s["__key__"] for s in iter_samples(url)]
        assert all(a != b for a, b in zip(keys, keys[1:]))
        assert sum(1 for _ in wds.WebDataset(url, shardshuffle=False)) == len(keys)
    r = cli("htsort", "in/in-@6.tar", "st/o-@2.tar", "-j", "2", "-q", cwd=tmp_path)  # (no retries)
    assert r.returncode != 0
    assert "two consecutive output samples have the key" in r.stderr and "--reduce" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "st").exists() or not any(
        p.name.endswith(".tar") for p in (tmp_path / "st").iterdir())
    (tmp_path / "merge.py").write_text(
        "def reduce_samples(key, samples):\n"
        "    return {'__key__': key, 'v': b','.join(sorted(s['v'] for s in samples))}\n")
    r = cli("htsort", "in/in-@6.tar", "st/o-@2.tar", "-j", "2", "-q", "--reduce", "merge.py",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    merged = read_all(str(tmp_path / "st/o-@2.tar"))
    assert len(merged) == len({k for k, *_ in original}) == 101


def test_keys_apart_holds_back_only_what_it_must():
    from tarproc.errors import DuplicateKeyError
    from tarproc.reshard import keys_apart

    def run(keys, window=64):
        got = [s["__key__"] for s in keys_apart(({"__key__": k} for k in keys), window)]
        assert sorted(got) == sorted(keys)
        assert all(a != b for a, b in zip(got, got[1:])), got
        return "".join(got)

    assert run("abcab") == "abcab"  # nothing to do
    assert run("aab") == "aba"
    assert run("aaabcd") == "abacad"
    assert run("abbbcdd") == "abcbdbd"
    assert run("xaaaabbbbcccc" + "defghijklmnop") == "xababababcdcecfcghijklmnop"
    # the end: what still waits goes into the latest gap between two other keys
    assert run("abcdee") == "abcede"
    assert run("abcdeee") == "abecede"
    assert run("abcdeee", window=3) == "abecede"
    with pytest.raises(DuplicateKeyError, match="'a'"):
        run("abaa")
    with pytest.raises(DuplicateKeyError, match="'e'"):
        run("abcdeee", window=2)  # a, b are out: c d e is no room for two more
