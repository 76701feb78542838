"""`import tarproc`: every job as a function, with Python callables, on a local cluster, a real
dask-scheduler with workers, or a caller's own Client."""

import json
import operator
import os
from collections import Counter

import pytest

import tarproc


class WordCount(tarproc.MapReduce):
    """The README's example, defined in this test module (workers cannot import it by path)."""

    def map(self, sample):
        for w in sample["txt"].decode().split():
            yield w, 1

    def combine(self, key, values):
        return sum(values)

    def reduce(self, key, values):
        return {"__key__": key, "count": str(sum(values)).encode()}


class NoCombine(tarproc.MapReduce):
    """The same without a combiner: every (word, 1) crosses the shuffle."""

    map = WordCount.map
    reduce = WordCount.reduce


def counter_of(pattern):
    return Counter(w for s in tarproc.iter_samples(pattern) for w in s["txt"].decode().split())


def test_mapreduce_wordcount_on_a_real_cluster(words_dir, tmp_path, dask_scheduler_address):
    pattern = str(words_dir / "words-@8.tar")
    result = WordCount().run(pattern, str(tmp_path / "counts-@3.tar"), cluster=dask_scheduler_address,
                             workdir=str(tmp_path / "work"), progress=False)
    assert result.ok, result.failed
    got = [(s["__key__"], int(s["count"])) for s in tarproc.iter_samples(str(tmp_path / "counts-@3.tar"))]
    assert dict(got) == dict(counter_of(pattern))
    assert [k for k, _ in got] == sorted(k for k, _ in got)


def test_mapreduce_without_combiner_locally(words_dir, tmp_path):
    pattern = str(words_dir / "words-{0..3}.tar")
    assert not hasattr(NoCombine(), "combine")
    result = NoCombine().run(pattern, str(tmp_path / "c-@2.tar"), workers=2, progress=False)
    assert result.ok
    got = {s["__key__"]: int(s["count"]) for s in tarproc.iter_samples(str(tmp_path / "c-@2.tar"))}
    assert got == dict(counter_of(pattern))


def test_writers_and_readers(tmp_path):
    samples = [{"__key__": f"s{i:03d}", "txt": f"sample {i}".encode(), "cls": str(i % 3).encode()}
               for i in range(25)]
    count, nbytes = tarproc.write_samples(str(tmp_path / "one.tar.gz"), samples)
    assert count == 25 and nbytes == os.path.getsize(tmp_path / "one.tar.gz")
    with tarproc.ShardWriter(str(tmp_path / "sh-%04d.tar"), maxcount=10) as sink:
        for s in samples:
            sink.write(s)
    assert [x["count"] for x in sink.shards] == [10, 10, 5]
    back = list(tarproc.iter_samples(str(tmp_path / "sh-{0000..0002}.tar")))
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in back] == samples
    assert tarproc.expand(str(tmp_path / "sh-@0003.tar")) == [str(tmp_path / f"sh-{i:04d}.tar") for i in range(3)]
    with tarproc.open_read(str(tmp_path / "one.tar.gz")) as f:
        assert f.read(2) == b"\x1f\x8b"
    with pytest.raises(RuntimeError):
        with tarproc.SampleWriter(str(tmp_path / "never.tar")) as sink:
            sink.write(samples[0])
            raise RuntimeError("interrupted")
    assert not (tmp_path / "never.tar").exists()
    with pytest.raises(tarproc.DuplicateKeyError) as e:  # readers would merge the two
        tarproc.write_samples(str(tmp_path / "dup.tar"), [samples[0], dict(samples[0], txt=b"b")])
    assert e.value.key == "s000" and isinstance(e.value, tarproc.TarprocError)
    assert not (tmp_path / "dup.tar").exists()


def test_callable_map_extract_and_caller_owned_client(imagenet_dir, tmp_path, dask_scheduler_address):
    from distributed import Client

    def size_only(sample):  # a closure-free function of this test module
        return {"__key__": sample["__key__"], "size": str(len(sample["jpg"]))}

    pattern = str(imagenet_dir / "imagenet_train-{0000..0003}.tgz")
    with Client(dask_scheduler_address, set_as_default=False) as client:
        result = tarproc.map_shards(pattern, str(tmp_path / "sizes-@4.tar"), size_only, cluster=client,
                                    progress=False)
        assert result.ok and result.done == 4 and result.totals["samples_out"] == 40
        counts, res2 = tarproc.count_values(pattern, "cls", cluster=client, progress=False)
        assert client.status == "running"  # still ours, still open
        assert sum(n for _, n in counts) == 40
    sizes = [int(s["size"]) for s in tarproc.iter_samples(str(tmp_path / "sizes-@4.tar"))]
    assert sizes == [len(s["jpg"]) for s in tarproc.iter_samples(pattern)]


def test_one_cluster_for_several_jobs(imagenet_dir, tmp_path):
    pattern = str(imagenet_dir / "imagenet_train-{0000..0001}.tgz")
    with tarproc.Cluster(workers=2) as cluster:
        r1 = tarproc.map_shards(pattern, str(tmp_path / "a-@2.tar"), lambda s: s, cluster=cluster, progress=False)
        r2 = tarproc.shuffle(pattern, str(tmp_path / "b-@3.tar"), seed=3, cluster=cluster, progress=False)
        report = tarproc.list_shards(str(tmp_path / "b-@3.tar"), samples=True, cluster=cluster, progress=False)
    assert r1.ok and r2.ok
    assert report["total_samples"] == 20 and report["missing"] == []


def test_items_driver_resume_shuffle_and_reduce(tmp_path):
    """The driver for any list: an interrupted run, then a rerun that redoes only what was missing."""
    done_dir = tmp_path / "done"
    done_dir.mkdir()

    def work(n):
        if n == 7 and not (tmp_path / "fixed").exists():
            raise ValueError("bug on item 7")
        (done_dir / f"{n}").write_text(str(n * n))
        return Counter({"even" if n % 2 == 0 else "odd": n})

    is_done = lambda n: (done_dir / f"{n}").exists()  # noqa: E731
    with tarproc.Cluster(workers=2) as cluster:
        first = tarproc.run_items(work, range(20), cluster=cluster, is_done=is_done, retries=0,
                                  shuffle=True, seed=1, reduce=operator.add, progress=False)
        assert not first.ok and [k for k, _ in first.failed] == ["7"]
        assert "bug on item 7" in first.failed[0][1]
        (tmp_path / "fixed").write_text("")
        second = tarproc.run_items(work, range(20), cluster=cluster, is_done=is_done, reduce=operator.add,
                                   progress=False)
    assert second.ok and second.done == 1 and second.skipped == 19
    assert second.reduced == {"odd": 7}
    assert first.reduced == {"even": sum(range(0, 20, 2)), "odd": sum(range(1, 20, 2)) - 7}
    assert sorted(int(p.name) for p in done_dir.iterdir()) == list(range(20))
    json.loads(second.to_json())


def test_map_shards_counts_outputs_without_fields_as_dropped(imagenet_dir, tmp_path, dask_scheduler_address):
    """htmapper's task (MapShard) counts what the runner returns: an output with no field is
    nothing to write, so the sample is dropped, not out; sys.exit() fails one sample."""
    import sys

    from distributed import Client

    def no_fields(sample, stop=keys_of_first(imagenet_dir)[3]):
        if sample["__key__"] == stop:
            sys.exit(1)
        return {} if int(sample["cls"]) % 2 else {"__key__": sample["__key__"]}

    pattern = str(imagenet_dir / "imagenet_train-{0000..0001}.tgz")
    with Client(dask_scheduler_address, set_as_default=False) as client:
        result = tarproc.map_shards(pattern, str(tmp_path / "none-@2.tar"), no_fields, cluster=client,
                                    errors="skip", progress=False)
    assert result.ok
    totals = result.totals
    assert (totals["samples_in"], totals["samples_out"], totals["dropped"], totals["skipped"]) == (20, 0, 19, 1)
    assert list(tarproc.iter_samples(str(tmp_path / "none-@2.tar"))) == []


def keys_of_first(imagenet_dir):
    return [s["__key__"] for s in tarproc.iter_samples(str(imagenet_dir / "imagenet_train-0000.tgz"))]


def test_writer_edges_lose_nothing_and_merge_nothing(tmp_path):
    """A sample refused half-way leaves none of its fields; a sample without fields is neither
    written nor counted, and does not part two samples of one key; writing after close fails."""
    import subprocess

    from tarproc.errors import DuplicateKeyError

    out = str(tmp_path / "part-%03d.tar")
    sink = tarproc.ShardWriter(out, maxcount=10)
    sink.write({"__key__": "a", "txt": b"1"})
    with pytest.raises(TypeError, match="key 'z': value of 'cls' is int"):
        sink.write({"__key__": "z", "a": b"ok", "cls": 3})
    with pytest.raises(ValueError, match="key 'y': value of 'txt' is not valid Unicode"):
        sink.write({"__key__": "y", "a": b"ok", "txt": "\udcff"})
    sink.write({"__key__": "c", "txt": b"1"})
    sink.close()
    names = subprocess.run(["tar", "tf", str(tmp_path / "part-000.tar")], capture_output=True,
                           text=True, check=True).stdout.split()
    assert names == ["a.txt", "c.txt"] and sink.shards[0]["count"] == 2
    with pytest.raises(ValueError, match="write to a closed ShardWriter"):
        sink.write({"__key__": "d", "txt": b"2"})
    with pytest.raises(DuplicateKeyError, match="'a'"):
        tarproc.write_samples(str(tmp_path / "m.tar"),
                              [{"__key__": "a", "txt": b"1"}, {"__key__": "b"}, {"__key__": "a", "cls": b"2"}])
    assert not (tmp_path / "m.tar").exists()
    assert tarproc.write_samples(str(tmp_path / "n.tar"), [{"__key__": "a"}, {"__key__": "a", "txt": b"1"},
                                                           {"__key__": "b", "__url__": "x"}])[0] == 1


def test_shardwriter_limits_and_paths(tmp_path):
    import pathlib

    with tarproc.ShardWriter(tmp_path / "s-%03d.tar", maxcount=None, maxsize="1kB") as sink:
        for i in range(3):
            sink.write({"__key__": f"k{i}", "txt": b"x" * 600})
    assert [d["count"] for d in sink.shards] == [1, 1, 1]
    with tarproc.ShardWriter(str(tmp_path / "t-%03d.tar"), maxcount=2, maxsize=None) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "txt": b"x" * 600})
    assert [d["count"] for d in sink.shards] == [2, 2, 1]
    path = pathlib.Path(sink.shards[0]["url"])
    assert len(list(tarproc.iter_samples(path))) == 2
    assert len(list(tarproc.iter_samples([path, str(path)]))) == 4
    with open(path, "rb") as f:
        got = list(tarproc.iter_samples(f))
        assert not f.closed  # the caller's file stays the caller's
    assert [s["__key__"] for s in got] == ["k0", "k1"] and got[0]["__url__"] == str(path)
    with pytest.raises(TypeError, match="not int"):
        list(tarproc.iter_samples([3]))


def test_map_shards_refuses_what_is_neither_callable_nor_path(tmp_path):
    for i in range(2):
        tarproc.write_samples(str(tmp_path / f"in-{i}.tar"), [{"__key__": "k", "txt": b"x"}])
    log = open(tmp_path / "app.log", "w")
    with pytest.raises(TypeError, match="process_sample must be a callable or the path of a Python file, not int"):
        tarproc.map_shards(str(tmp_path / "in-@2.tar"), str(tmp_path / "o-@2.tar"), log.fileno())
    log.write("still open\n")
    log.close()


class DottedKeys(tarproc.MapReduce):
    def map(self, sample):
        yield "e.g", 1

    def reduce(self, key, values):
        return {"__key__": key, "count": str(sum(values)).encode()}


def test_mapreduce_bad_output_key_names_the_reduce_and_the_group(words_dir, tmp_path):
    r = DottedKeys().run(str(words_dir / "words-@8.tar"), str(tmp_path / "wc-@2.tar"), workers=1,
                         progress=False, retries=0)
    assert not r.ok
    message = r.failed[0][1]
    assert "reduce_samples on key 'e.g': key returned by reduce_samples 'e.g' refused" in message
    assert "process_sample" not in message
