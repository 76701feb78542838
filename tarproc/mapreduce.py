"""Map-reduce over shards for people who think in (key, value) pairs.

    class WordCount(tarproc.MapReduce):
        def map(self, sample):                  # yields (key, value) pairs
            for w in sample["txt"].decode().split():
                yield w, 1
        def combine(self, key, values):         # optional: a partial reduce inside map tasks
            return sum(values)
        def reduce(self, key, values):          # one output sample (or None, or a list)
            return {"__key__": key, "count": str(sum(values)).encode()}

    WordCount().run("books-@0100.tgz", "counts-@0010.tar", cluster="tcp://sched:8786")

It runs on the same two-phase shuffle as `htsort`: map tasks turn samples into (key, value) records
sorted by key, reduce tasks see each key's values together, and output shards are range-partitioned
by key, so reading them in order gives the keys in sorted order. Keys are str; values any
picklable Python object. The instance itself travels to the workers (pickled by value, so a class
defined in a notebook or a test module works on a real cluster).
"""

import pickle

from .errors import TarprocError


class MapReduce:
    """Subclass and define `map(sample)` and `reduce(key, values)`; optionally `combine(key, values)`."""

    def map(self, sample):
        """Yield (key, value) pairs for one input sample."""
        raise NotImplementedError

    def reduce(self, key, values):
        """Turn one key's values (an iterator) into an output sample dict, a list of them, or None."""
        raise NotImplementedError

    # -- plumbing: records are samples {"__key__", "k": key, "v": pickled value}

    def _map_sample(self, sample):
        records = []
        for i, pair in enumerate(self.map(sample) or ()):
            try:
                key, value = pair
            except (TypeError, ValueError):
                raise TarprocError(f"{type(self).__name__}.map must yield (key, value) pairs, got {pair!r}") from None
            if not isinstance(key, str):
                raise TarprocError(f"{type(self).__name__}.map: keys must be str, got {type(key).__name__}")
            records.append({"__key__": f"{sample['__key__']}-{i}", "k": key.encode("utf-8"),
                            "v": pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)})
        return records

    def _combine_records(self, key, records):
        first = None

        def values():
            nonlocal first
            for record in records:
                if first is None:
                    first = record
                yield pickle.loads(record["v"])

        combined = self.combine(key, values())
        return {"__key__": first["__key__"], "k": key.encode("utf-8"),
                "v": pickle.dumps(combined, protocol=pickle.HIGHEST_PROTOCOL)}

    def _reduce_records(self, key, records):
        return self.reduce(key, (pickle.loads(record["v"]) for record in records))

    def run(self, inputs, outputs, *, cluster=None, workers=None, workdir=None, memory="256MB",
            retries=2, force=False, progress=True, log_dir=None, keep_work=False):
        """Run the job from input shards to output shards; returns the job's result (`.ok`, `.summary()`)."""
        from .jobs.shardmap import _ship_by_value
        from .jobs.twophase import sort

        _ship_by_value(self)
        combine = self._combine_records if hasattr(self, "combine") else False
        return sort(inputs, outputs, key="k", mapper=self._map_sample, reduce=self._reduce_records,
                    combine=combine, cluster=cluster, workers=workers, workdir=workdir,
                    keep_work=keep_work, memory=memory, retries=retries, force=force,
                    progress=progress, log_dir=log_dir)
