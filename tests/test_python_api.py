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
