"""The Dask-free core of the two-phase jobs (`htshuffle`, `htsort`, map-reduce).

Both jobs are one machine: a total order over samples, a partitioning of that order into N output
shards, and an external sort that keeps each task's memory bounded. A shuffle is a sort by a
stable random key; a sort is a sort by `__key__` or a field. Everything here is deterministic and
independent of the process it runs in (no Python `hash()`), so results are byte-identical across
workers, retries and reruns.

The pieces:

- :class:`Ordering` -- what samples are ordered by (shuffle key, `__key__`, a field, numeric,
  reversed) and the *order key* of a sample: `(encoded key, source, position, sub)`, unique and
  comparable with native tuple comparison (reversal is folded into the encoding);
- :class:`Dealer` -- balanced, seed-random assignment of one map task's samples to partitions;
- :func:`reservoir`, :func:`choose_boundaries`, :class:`RangePartitioner` -- balanced range
  partitioning from a sample of the keys; equal keys always land in one partition;
- :class:`ExternalSorter` -- accumulate up to a memory limit, sort, spill runs as tar to local
  temp disk, k-way merge them back (bounded fan-in);
- :func:`group_reduce` -- apply `reduce_samples(key, samples)` to each run of equal keys (used
  for the final reduce and for the combiner inside map tasks);
- :func:`keys_apart` -- a shuffled stream with no two consecutive samples of one key (readers
  would take them for one sample);
- :func:`write_run` / :func:`read_run` -- the intermediate tar format (batches of msgpack records
  holding each sample's order, original key and fields, so equal keys never merge).
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import heapq
import itertools
import math
import os
import random
import shutil
import struct
import tempfile

from .errors import DuplicateKeyError, TarprocError

__all__ = [
    "ReshardError", "Ordering", "Dealer", "RangePartitioner", "ExternalSorter", "reservoir",
    "choose_boundaries", "group_reduce", "merge_runs", "write_run", "read_run",
    "load_script", "apply_mapper", "sample_nbytes", "keys_apart", "RUN_FIELD",
]

#: The field (member extension) of the batch members of intermediate run files.
RUN_FIELD = "tpb"
#: Most sorted streams merged at once; more are merged in several passes through temp runs.
DEFAULT_FANIN = 64
#: Rough per-sample overhead of a dict of bytes in memory, for the memory estimate.
SAMPLE_OVERHEAD = 360
FIELD_OVERHEAD = 90


class ReshardError(TarprocError):
    """A sample cannot be ordered or reduced (missing or unparsable key field, bad reduce result)."""


def sample_nbytes(sample):
    """Approximate memory held by a sample (payload plus Python object overhead)."""
    n = SAMPLE_OVERHEAD + FIELD_OVERHEAD * len(sample)
    for value in sample.values():
        if value.__class__ is bytes or value.__class__ is str:
            n += len(value)
    return n


# ---------------------------------------------------------------------------------------------
# ordering


_SHUFFLE_HASHERS = {}  # seed bytes -> blake2b primed with the seed, copied per sample
_SRC_POS = struct.Struct("<qq")


def _reverse_text(text):
    """An encoding whose ascending order is the descending order of `text` (prefixes included)."""
    return tuple(-ord(c) for c in text) + (1,)


class Ordering:
    """The total order of a job: by a seeded random key (shuffle) or by a sort key.

    `field=None` sorts by `__key__`; otherwise by the field's bytes decoded as UTF-8 (as text, or
    as a number with `numeric`). `reverse` gives descending order. Order keys are tuples
    `(encoded key, source, position, sub)` so ties keep input order and every key is unique.
    Instances are small and picklable: map and reduce tasks each get a copy.
    """

    def __init__(self, mode="sort", field=None, numeric=False, reverse=False, seed=0):
        if mode not in ("sort", "shuffle"):
            raise ValueError(f"mode must be 'sort' or 'shuffle', not {mode!r}")
        self.mode = mode
        self.field = None if field in (None, "__key__") else field
        self.numeric = bool(numeric)
        self.reverse = bool(reverse)
        self.seed = seed
        self._seed_bytes = str(seed).encode()

    def describe(self):
        """A stable text naming this ordering (part of a job's fingerprint)."""
        if self.mode == "shuffle":
            return f"shuffle seed={self.seed}"
        return (f"sort field={self.field or '__key__'} numeric={self.numeric} "
                f"reverse={self.reverse}")

    def __repr__(self):
        return f"Ordering({self.describe()})"

    # the user-visible key ------------------------------------------------------------------

    def key_value(self, sample):
        """The sort key as users see it: a str, or a float with `numeric` (None for a shuffle)."""
        if self.mode == "shuffle":
            return None
        if self.field is None:
            text = sample.get("__key__")
            if not isinstance(text, str):
                raise ReshardError(f"sample without __key__ from {sample.get('__url__', '?')}")
        else:
            value = sample.get(self.field)
            if value is None:
                raise ReshardError(
                    f"sample {sample.get('__key__')!r} ({sample.get('__url__', '?')}) has no "
                    f"field {self.field!r} to sort by")
            if isinstance(value, str):
                text = value
            else:
                try:
                    text = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise ReshardError(
                        f"sample {sample.get('__key__')!r} ({sample.get('__url__', '?')}): field "
                        f"{self.field!r} is not UTF-8 text") from None
        if not self.numeric:
            return text
        try:
            number = float(text)
        except ValueError:
            raise ReshardError(
                f"sample {sample.get('__key__')!r} ({sample.get('__url__', '?')}): "
                f"{self.field or '__key__'} {text[:40]!r} is not a number") from None
        if math.isnan(number):
            raise ReshardError(f"sample {sample.get('__key__')!r}: sort key is NaN")
        return number

    def encode(self, value):
        """The comparable form of a key value; ascending order of encodings is the job's order."""
        if self.numeric:
            return -value if self.reverse else value
        return _reverse_text(value) if self.reverse else value

    # order keys -----------------------------------------------------------------------------

    def shuffle_key(self, src, pos):
        """A stable 64-bit random key for the sample at (source shard, position)."""
        base = _SHUFFLE_HASHERS.get(self._seed_bytes)
        if base is None:
            base = _SHUFFLE_HASHERS[self._seed_bytes] = hashlib.blake2b(
                self._seed_bytes, digest_size=8, person=b"tarproc-shuffle")
        h = base.copy()  # a third faster than a new keyed hasher per sample
        h.update(_SRC_POS.pack(src, pos))
        return int.from_bytes(h.digest(), "big")

    def order_key(self, sample):
        """The full order key of a sample that carries `__order__` = (src, pos, sub).

        A key computed before is kept in the sample's `__okey__` (and travels in intermediate
        runs), so the merges of the reduce phase never hash or decode keys again.
        """
        okey = sample.get("__okey__")
        if okey is not None:
            return okey
        src, pos, sub = sample["__order__"]
        if self.mode == "shuffle":
            return (self.shuffle_key(src, pos), src, pos, sub)
        return (self.encode(self.key_value(sample)), src, pos, sub)

    def group_key(self, sample):
        """The encoded key that defines groups of equal keys for a reduce."""
        if self.mode == "shuffle":
            return self.order_key(sample)
        okey = sample.get("__okey__")
        if okey is not None:
            return okey[0]
        return self.encode(self.key_value(sample))


# ---------------------------------------------------------------------------------------------
# partitioning


class Dealer:
    """Deal one map task's samples to `n` partitions: balanced counts, random for each sample.

    Samples go round-robin over a seed-derived random permutation of the partitions, starting at
    a seed-derived random offset. Each sample's partition is uniformly random, while each task's
    counts differ by at most one between partitions (independent draws would not be balanced).
    """

    def __init__(self, n, seed, src):
        rng = random.Random(f"tarproc-dealer:{seed}:{src}")
        self.perm = list(range(n))
        rng.shuffle(self.perm)
        self.offset = rng.randrange(n)
        self.n = n

    def partition(self, pos):
        return self.perm[(self.offset + pos) % self.n]


class RangePartitioner:
    """Map an encoded key to its output shard by binary search over N-1 boundaries.

    Partition i holds keys k with boundary[i-1] <= k < boundary[i] in encoded order, so shards
    0..N-1 read in order give one sorted stream, and equal keys always share one shard.
    """

    def __init__(self, boundaries, ordering):
        self.encoded = [ordering.encode(v) for v in boundaries]
        self.ordering = ordering

    def partition_of(self, encoded):
        return bisect.bisect_right(self.encoded, encoded)

    def __call__(self, sample):
        return self.partition_of(self.ordering.group_key(sample))


def reservoir(iterable, size, seed=0):
    """A uniform random sample of at most `size` items (deterministic for a seed) and the count."""
    rng = random.Random(f"tarproc-reservoir:{seed}")
    kept = []
    count = 0
    for item in iterable:
        if count < size:
            kept.append(item)
        else:
            j = rng.randrange(count + 1)
            if j < size:
                kept[j] = item
        count += 1
    return kept, count


def choose_boundaries(shard_samples, n, ordering):
    """N-1 key values splitting the weighted key samples into N parts of equal weight.

    `shard_samples` is a list of `(count, sampled key values)` per input shard; each sampled key
    stands for `count / len(keys)` samples of its shard, so shards of different sizes weigh
    right. Boundaries are actual key values, so equal keys cannot be split.
    """
    if n <= 1:
        return []
    weighted = []
    for count, keys in shard_samples:
        if keys:
            w = count / len(keys)
            weighted.extend((ordering.encode(k), k, w) for k in keys)
    if not weighted:
        return []
    weighted.sort(key=lambda t: t[0])
    total = sum(w for _, _, w in weighted)
    boundaries = []
    acc = 0.0
    i = 0
    for b in range(1, n):
        target = total * b / n
        while i < len(weighted) - 1 and acc + weighted[i][2] <= target:
            acc += weighted[i][2]
            i += 1
        boundaries.append(weighted[i][1])
    return boundaries


# ---------------------------------------------------------------------------------------------
# intermediate runs (tar)


def _tario():
    from . import tario
    return tario


#: Records per batch member of an intermediate run, and its size target.
_BATCH_RECORDS = 4096
_BATCH_BYTES = 1 << 20


def _msgpack():
    import msgpack

    return msgpack


def _record(sample):
    """A sample as one msgpack-able record: ``[order, src, pos, sub, key, name, value, ...]``.

    ``order`` is the encoded sort key the job computed (``__okey__[0]``), or None when the
    sample carries none; values are bytes (str fields are stored as UTF-8).
    """
    src, pos, sub = sample["__order__"]
    okey = sample.get("__okey__")
    rec = [None if okey is None else okey[0], src, pos, sub, sample["__key__"]]
    for name, value in sample.items():
        if name[:2] == "__":
            continue
        if value.__class__ is not bytes:
            value = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        rec.append(name)
        rec.append(value)
    return rec


def write_run(fileobj, samples):
    """Write samples (in order) to an uncompressed intermediate tar; returns (count, payload bytes).

    The tar holds batch members ``SEQ.tpb``: msgpack arrays of up to 4096 records (~1 MB) with
    each sample's order, original key and fields. One member per batch rather than per sample
    keeps tar headers and per-member work out of the shuffle's way; msgpack (C, shipped with
    Dask) packs and parses them without running any code, so a shared work location can never
    make a reader execute something.
    """
    packb = _msgpack().Packer(use_bin_type=True, autoreset=True).pack
    writer = _tario().TarWriter(fileobj, compression=None)
    count = nbytes = batches = 0
    batch = []
    held = 0
    for sample in samples:
        rec = _record(sample)
        batch.append(rec)
        count += 1
        for v in rec[6::2]:
            held += len(v)
        if len(batch) >= _BATCH_RECORDS or held >= _BATCH_BYTES:
            data = packb(batch)
            writer.write({"__key__": f"{batches:010d}", RUN_FIELD: data})
            nbytes += len(data)
            batches += 1
            batch, held = [], 0
    if batch:
        data = packb(batch)
        writer.write({"__key__": f"{batches:010d}", RUN_FIELD: data})
        nbytes += len(data)
    writer.close()
    return count, nbytes


def _records(batch, url, member):
    try:
        records = _msgpack().unpackb(batch, use_list=False, raw=False)
        if records.__class__ is not tuple:
            raise ValueError("not an array")
        for rec in records:
            enc, src, pos, sub, key = rec[:5]
            sample = {"__key__": key, "__order__": (src, pos, sub)}
            if enc is not None:
                sample["__okey__"] = (enc, src, pos, sub)
            i, n = 5, len(rec)
            while i < n:
                sample[rec[i]] = rec[i + 1]
                i += 2
            if key.__class__ is not str or n & 1 == 0:
                raise ValueError("bad record")
            yield sample
    except (ValueError, TypeError, IndexError, _msgpack().UnpackException):
        raise ReshardError(f"{url}: not a tarproc intermediate file (member {member!r})") from None


def read_run(fileobj, url="<run>"):
    """Yield the samples of an intermediate tar written by :func:`write_run`, in order.

    Samples carry ``__order__`` and, when the writer had it, the order key ``__okey__``.
    """
    for member in _tario().iter_samples(fileobj, url):
        batch = member.get(RUN_FIELD)
        if batch is None:
            raise ReshardError(f"{url}: not a tarproc intermediate file (member {member.get('__key__')!r})")
        yield from _records(batch, url, member.get("__key__"))


class _LocalRun:
    """A spilled sorted run on local disk."""

    def __init__(self, path, count):
        self.path = path
        self.count = count

    def __iter__(self):
        with open(self.path, "rb") as stream:
            yield from read_run(stream, self.path)


def merge_runs(streams, sort_key, fanin=DEFAULT_FANIN, tmpdir=None):
    """k-way merge of sorted iterables by `sort_key`, at most `fanin` open at once.

    With more streams than `fanin`, groups of them are first merged into temporary runs on local
    disk (in `tmpdir`), so memory and open files stay bounded however many inputs there are.
    `streams` may hold iterables that open their source lazily when iterated.
    """
    streams = list(streams)
    cleanup = None
    while len(streams) > fanin:
        if cleanup is None:
            cleanup = tempfile.mkdtemp(prefix="tarproc-merge-", dir=tmpdir)
        merged = []
        for i in range(0, len(streams), fanin):
            group = streams[i:i + fanin]
            path = os.path.join(cleanup, f"merge-{len(merged):05d}-{random.getrandbits(32):08x}.tar")
            with open(path, "wb") as out:
                count, _ = write_run(out, heapq.merge(*group, key=sort_key))
            merged.append(_LocalRun(path, count))
        streams = merged
    try:
        yield from heapq.merge(*streams, key=sort_key)
    finally:
        if cleanup:
            shutil.rmtree(cleanup, ignore_errors=True)


class ExternalSorter:
    """Sort samples by (partition, order key) within a memory budget, spilling to local disk.

    `add` samples that carry `__order__`; `partition(sample)` (if given) picks each one's output
    partition. Once the in-memory estimate passes `memory`, the buffer is sorted (optionally
    combined) and spilled as a tar run under `tmpdir`. `sorted()` yields `(partition, sample)` in
    order: from memory when nothing spilled, else by a k-way merge of the runs. Use as a context
    manager (or call `close`) to remove the spill files.
    """

    def __init__(self, ordering, memory=256 << 20, partition=None, tmpdir=None, combine=None,
                 fanin=DEFAULT_FANIN):
        self.ordering = ordering
        self.memory = max(1 << 20, int(memory))
        self.partition = partition
        self.tmpdir = tmpdir
        self.combine = combine
        self.fanin = fanin
        self._buffer = []
        self._held = 0
        self._runs = []
        self._spilldir = None
        self.spilled_runs = 0
        self.spilled_bytes = 0
        self.count = 0

    def _entry_key(self, entry):
        return entry[0]

    def add(self, sample):
        okey = sample["__okey__"] = self.ordering.order_key(sample)  # partition() reuses it
        part = self.partition(sample) if self.partition is not None else 0
        sample["__part__"] = part
        self._buffer.append(((part, okey), sample))
        self._held += sample_nbytes(sample) + 120
        self.count += 1
        if self._held >= self.memory:
            self._spill()

    def _sorted_buffer(self, combine=None):
        self._buffer.sort(key=self._entry_key)
        samples = (s for _, s in self._buffer)
        if combine is not None:
            samples = combine(samples)
        return samples

    def _spill(self):
        if not self._buffer:
            return
        if self._spilldir is None:
            self._spilldir = tempfile.mkdtemp(prefix="tarproc-spill-", dir=self.tmpdir)
        path = os.path.join(self._spilldir, f"run-{len(self._runs):05d}.tar")
        with open(path, "wb") as out:
            count, nbytes = write_run(out, self._sorted_buffer(self.combine))
        self._runs.append(_LocalRun(path, count))
        self.spilled_runs += 1
        self.spilled_bytes += nbytes
        self._buffer = []
        self._held = 0

    def _full_key(self, sample):
        # partitions are not stored in runs: they are a pure function of the sample
        part = sample.get("__part__")
        if part is None:
            part = sample["__part__"] = self.partition(sample) if self.partition is not None else 0
        return (part, self.ordering.order_key(sample))

    def sorted(self):
        """Yield every sample added, in (partition, order) order, each with `__part__` set.

        The combiner is applied to spilled runs only; the caller applies it to this stream.
        """
        if not self._runs:
            buffer, self._buffer = self._buffer, []
            buffer.sort(key=self._entry_key)
            for i in range(len(buffer)):
                entry, buffer[i] = buffer[i], None
                yield entry[1]
            return
        self._spill()
        for sample in merge_runs(self._runs, self._full_key, self.fanin, self.tmpdir):
            if "__part__" not in sample:  # heapq.merge skips the key of a lone last stream
                self._full_key(sample)
            yield sample

    def close(self):
        self._buffer = []
        if self._spilldir:
            shutil.rmtree(self._spilldir, ignore_errors=True)
            self._spilldir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ---------------------------------------------------------------------------------------------
# user code: mappers and reducers


def load_script(source, filename="<script>"):
    """Run a script's source in a fresh module and return the module (its functions by name)."""
    from .runner.pyscript import load_module

    return load_module(source, filename)


def _as_result(result):
    """Lists/tuples/dicts/None pass; any other iterable (a generator) becomes a list."""
    if result is None or isinstance(result, (dict, list, tuple)):
        return result
    try:
        return list(result)
    except TypeError:
        return result


def apply_mapper(mapper, samples, src):
    """Apply `process_sample` to each sample; number the outputs (src, position, 0) in order."""
    from .runner.pyscript import normalize_result

    pos = 0
    for sample in samples:
        if mapper is None:
            outputs = [sample]
        else:
            try:
                result = mapper(sample)
            except TarprocError:
                raise
            except Exception as exc:
                raise ReshardError(
                    f"process_sample failed on sample {sample.get('__key__')!r} "
                    f"({sample.get('__url__', '?')}): {type(exc).__name__}: {exc}") from exc
            outputs = normalize_result(_as_result(result), sample)
        for out in outputs:
            out["__order__"] = (src, pos, 0)
            pos += 1
            yield out


def _reduce_outputs(reduce_fn, key, first, group, check):
    from .runner.pyscript import normalize_result

    try:
        result = reduce_fn(key, group)
    except TarprocError:
        raise
    except Exception as exc:
        raise ReshardError(f"reduce_samples failed on key {key!r}: {type(exc).__name__}: {exc}") from exc
    pseudo = {"__key__": first["__key__"] if isinstance(first.get("__key__"), str) else str(key)}
    try:
        outputs = normalize_result(_as_result(result), pseudo)
    except TarprocError as exc:
        # (worded for process_sample and an input sample: say which reduce and group instead)
        message = str(exc).replace(f"sample {pseudo['__key__']!r}: ", "", 1)
        raise ReshardError(f"reduce_samples on key {key!r}: "
                           f"{message.replace('process_sample', 'reduce_samples')}") from None
    src, pos, _ = first["__order__"]
    for sub, out in enumerate(outputs):
        out.pop("__url__", None)
        out.pop("__okey__", None)  # a copied input's key: this output's order is its own
        out["__order__"] = (src, pos, sub)
        if check is not None:
            check(out)
        yield out


def group_reduce(samples, ordering, reduce_fn, keep_group_key=False):
    """Apply `reduce_fn(key, samples_iterator)` to each run of equal keys of a sorted stream.

    The reduce gets the user-visible key (str, or float with `numeric`) and a one-pass iterator
    over the group's samples; it returns a dict, a list of dicts, or None. Outputs take the order
    position of the group's first sample. With `keep_group_key` (a combiner), an output whose
    sort key differs from its group's is an error: it would break the order downstream.
    """
    for gkey, group in itertools.groupby(samples, key=ordering.group_key):
        group = iter(group)
        first = next(group)
        part = first.get("__part__")
        members = itertools.chain([first], group)
        key = ordering.key_value(first) if ordering.mode == "sort" else first["__key__"]

        check = None
        if keep_group_key:
            def check(out, gkey=gkey, key=key):
                try:
                    same = ordering.group_key(out) == gkey
                except ReshardError:
                    same = False
                if not same:
                    raise ReshardError(
                        f"the combiner (reduce_samples with --combine) changed the sort key "
                        f"{key!r} of its output {out.get('__key__')!r}; a combiner must keep it")
        user_group = (_strip_private(s) for s in members)
        outputs = list(_reduce_outputs(reduce_fn, key, dict(first), user_group, check))
        for _ in group:  # drain what the reduce did not consume
            pass
        for out in outputs:
            if part is not None:
                out["__part__"] = part
            yield out


def keys_apart(samples, window=64):
    """`samples` in their order, except that a sample with the key of the one before it waits
    until one with another key has gone out: no two consecutive samples share a key.

    For shuffled output, where samples of one key (a dataset with duplicate keys) meet only by
    chance, and would read back as one sample. The last `window` samples are held before they
    go out, so that samples still waiting when the stream ends can be put in among them.
    DuplicateKeyError, naming the key, if there is no room even there (one key makes up
    most of the end of the stream).
    """
    ready = collections.deque()  # in order, not yet yielded
    held = collections.deque()  # waiting for another key to go out first
    last = None  # key of the last sample in `ready`
    gone = None  # key of the last sample yielded
    for sample in samples:
        key = sample["__key__"]
        if key == last:
            held.append(sample)
            continue
        ready.append(sample)
        last = key
        while held and held[0]["__key__"] != last:
            sample = held.popleft()
            last = sample["__key__"]
            ready.append(sample)
        while len(ready) > window:
            sample = ready.popleft()
            gone = sample["__key__"]
            yield sample
    for sample in held:  # each of the last key: into the latest gap between two other keys
        key = sample["__key__"]
        for i in range(len(ready) - 1, -1, -1):
            before = ready[i - 1]["__key__"] if i else gone
            if before != key and ready[i]["__key__"] != key:
                ready.insert(i, sample)
                break
        else:
            raise DuplicateKeyError(
                f"the samples with the key {key!r} cannot be kept apart at the end of the output: "
                "readers (webdataset, tarproc) would take consecutive samples of one key for "
                "one sample; give them distinct keys", key)
    yield from ready


def _strip_private(sample):
    sample.pop("__part__", None)
    sample.pop("__okey__", None)
    return sample
