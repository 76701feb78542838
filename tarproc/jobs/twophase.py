"""Two-phase shard jobs on Dask: a global shuffle and a sort with an optional reduce.

M input shards become N output shards (N larger or smaller than M) in up to three passes of
per-shard tasks on the driver (:func:`tarproc.jobs.driver.run_items`):

1. (sort only) a *sampling* pass returns a small random sample of the sort keys of each input
   shard; the driver turns them into N-1 range boundaries, so output shards are balanced even
   on skewed keys;
2. *map* tasks read one input shard each (applying a mapper, and a combiner if asked), sort
   their samples by (partition, order) within the memory budget, and write one sorted run per
   non-empty partition to the work location, ``WORKDIR/map-IIIII/part-PPPPP.tar``, followed by
   a done marker ``WORKDIR/map-IIIII/done.json`` -- a rerun reuses every map task with a marker;
3. *reduce* tasks each k-way merge their partition's runs from all map tasks (applying the
   reduce to groups of equal keys) and commit one output shard atomically; the driver then
   writes ``WORKDIR/reduce-PPPPP.done.json`` -- a rerun after a crash keeps every output shard
   with a marker. An output that exists without one (after a finished job removed its work
   files, or from another job) is rewritten: a shuffle or sort cannot be patched shard by
   shard with shards of unknown origin (only when all outputs exist is nothing redone).

Names in the work location are deterministic, so it can be any storage that can read, write
and delete by name (a local or shared directory, nginx WebDAV, s3, gs): nothing is ever listed.
Intermediates are removed after success unless ``keep_work``; after a failure they stay, so the
same call resumes. Nothing appears at the destination unless its reduce task succeeded. The temp
files that stopped writes leave beside the outputs and local work files, and the sample dirs of
dead processes (a mapper may run commands through a ShellRunner), are removed before the first
task and after the last, however the job ends.

Example::

    from tarproc.jobs.twophase import shuffle, sort

    shuffle("data/Volume_@16.tgz", "out/shuffled-@32.tgz", seed=7)

    def reduce_samples(key, samples):
        return {"__key__": key, "count": str(sum(int(s["count"]) for s in samples))}
    sort("words-@8.tar", "counts-@4.tar", key="txt", mapper=split_words,
         reduce=reduce_samples, combine=True)
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from tarproc import reshard, shards, storage
from tarproc.errors import DuplicateKeyError, TarprocError
from tarproc.storage.local import remove_temp_files
from tarproc.tarutils import parse_size  # (one meaning of "256MB" in every option: 256e6 bytes)

__all__ = ["shuffle", "sort", "run_twophase", "ReshardResult", "UserCode", "WorkdirError"]

#: Sort keys sampled per input shard (at least; more when there are many outputs per input).
MIN_SAMPLE_PER_SHARD = 1000
SAMPLE_PER_OUTPUT = 400
FORMAT_VERSION = "tarproc-twophase-3"


class WorkdirError(TarprocError):
    """No usable work location for the intermediate files."""


# ---------------------------------------------------------------------------------------------
# user code sent to workers


_code_cache = {}


class UserCode:
    """A user function for workers: a script's source text (plus function name) or a callable.

    Scripts travel as text, never as paths, so workers need no shared filesystem; callables
    (lambdas, functions of a test module or notebook) travel by value with cloudpickle.
    """

    def __init__(self, name, source=None, filename=None, fn=None):
        self.name = name
        self.source = source
        self.filename = filename
        self.blob = None
        if fn is not None:
            from tarproc.jobs.driver import _pack_callable
            self.blob = _pack_callable(fn)
        self.digest = hashlib.sha256(
            (source or "").encode() + (self.blob[0].encode() if self.blob else b"")).hexdigest()

    @classmethod
    def make(cls, spec, name):
        """From a callable, a path to a .py file, or None; scripts are read here, on the driver."""
        if spec is None:
            return None
        if callable(spec):
            return cls(name, fn=spec)
        path = os.fspath(spec)
        try:
            with open(path, encoding="utf-8") as stream:
                source = stream.read()
        except OSError as exc:
            raise TarprocError(f"{path}: cannot read script: {exc.strerror or exc}") from None
        module = reshard.load_script(source, path)  # fail early, on the driver
        if not callable(getattr(module, name, None)):
            raise TarprocError(f"{path}: does not define {name}(...)")
        return cls(name, source=source, filename=path)

    def has(self, name):
        """Whether a script also defines `name` (e.g. a reduce script's own process_sample)."""
        if self.source is None:
            return False
        return callable(getattr(reshard.load_script(self.source, self.filename), name, None))

    def sibling(self, name):
        """The same script's function `name`."""
        return UserCode(name, source=self.source, filename=self.filename)

    def load(self):
        """The function itself (scripts are executed once per worker process)."""
        cache_key = (self.digest, self.name)
        fn = _code_cache.get(cache_key)
        if fn is None:
            if self.blob is not None:
                from tarproc.jobs.driver import _load_callable
                fn = _load_callable(self.blob)
            else:
                fn = getattr(reshard.load_script(self.source, self.filename), self.name)
            _code_cache[cache_key] = fn
        return fn


# ---------------------------------------------------------------------------------------------
# the job description every task gets


@dataclass
class Plan:
    """Everything a task needs: small and picklable."""

    mode: str
    inputs: list
    outputs: list
    workdir: str
    ordering: reshard.Ordering
    fingerprint: str
    memory: int
    mapper: UserCode | None = None
    reducer: UserCode | None = None
    combine: bool = False
    combiner: UserCode | None = None  # a combine of its own; else the reducer combines
    boundaries: list | None = None
    sources: list = field(default_factory=list)  # per partition: map indices with a run
    sample_size: int = MIN_SAMPLE_PER_SHARD
    fanin: int = reshard.DEFAULT_FANIN

    def map_dir(self, m):
        return f"{self.workdir}/map-{m:05d}"

    def part_url(self, m, p):
        return f"{self.map_dir(m)}/part-{p:05d}.tar"

    def marker_url(self, m):
        return f"{self.map_dir(m)}/done.json"

    def reduce_marker_url(self, p):
        return f"{self.workdir}/reduce-{p:05d}.done.json"

    @property
    def boundaries_url(self):
        return f"{self.workdir}/boundaries.json"


def _read_json(url):
    with storage.open_read(url) as stream:
        return json.loads(stream.read().decode("utf-8"))


def _ours(plan, url):
    """The JSON record at ``url`` if this job wrote it (its fingerprint matches), else None
    (none there, unreadable, or another job's)."""
    try:
        record = _read_json(url)
    except (TarprocError, OSError, ValueError):
        return None
    return record if record.get("fingerprint") == plan.fingerprint else None


def _write_json(url, value):
    with storage.open_write(url) as stream:
        stream.write(json.dumps(value, sort_keys=True).encode("utf-8"))


def _input_samples(url):
    from tarproc import tario

    with storage.open_read(url) as raw:
        yield from tario.iter_samples(raw, url=storage.redact(url))


class _Counted:
    """Counts samples and payload bytes passing through an iterator."""

    def __init__(self, samples):
        self.samples = samples
        self.count = 0
        self.nbytes = 0

    def __iter__(self):
        count = nbytes = 0
        try:
            for sample in self.samples:
                count += 1
                for v in sample.values():  # __key__ and __url__ are str: only fields count
                    if v.__class__ is bytes:
                        nbytes += len(v)
                yield sample
        finally:
            self.count += count
            self.nbytes += nbytes


def _mapped(plan, m, counter):
    mapper = plan.mapper.load() if plan.mapper is not None else None
    return reshard.apply_mapper(mapper, counter, m)


# ---------------------------------------------------------------------------------------------
# tasks (run on workers)


def sample_task(plan, m):
    """Sampling pass: a seeded random sample of one input shard's sort keys, and its count."""
    _remove_dead_sample_dirs(plan)  # of workers killed before (here: the worker's own machine)
    counter = _Counted(_input_samples(plan.inputs[m]))
    keys = (plan.ordering.key_value(s) for s in _mapped(plan, m, counter))
    kept, count = reshard.reservoir(keys, plan.sample_size, seed=f"{plan.ordering.seed}:{m}")
    return {"keys": kept, "count": count, "samples_in": counter.count, "bytes_in": counter.nbytes}


def _partitioner(plan, m):
    if plan.mode == "shuffle":
        dealer = reshard.Dealer(len(plan.outputs), plan.ordering.seed, m)
        return lambda sample: dealer.partition(sample["__order__"][1])
    if len(plan.outputs) == 1:
        return lambda sample: 0
    return reshard.RangePartitioner(plan.boundaries, plan.ordering)


def map_task(plan, m):
    """Scatter one input shard into sorted runs per partition, then write the done marker."""
    started = time.time()
    _remove_dead_sample_dirs(plan)  # of workers killed before (here: the worker's own machine)
    counter = _Counted(_input_samples(plan.inputs[m]))
    combine = None
    if plan.combine and (plan.combiner or plan.reducer) is not None:
        reducer = (plan.combiner or plan.reducer).load()
        combine = functools.partial(reshard.group_reduce, ordering=plan.ordering,
                                    reduce_fn=reducer, keep_group_key=True)
    counts = {}
    nbytes = 0
    mapped = 0
    with reshard.ExternalSorter(plan.ordering, plan.memory, partition=_partitioner(plan, m),
                                combine=combine) as sorter:
        for sample in _mapped(plan, m, counter):
            sorter.add(sample)
            mapped += 1
        stream = sorter.sorted()
        if combine is not None:
            stream = combine(stream)
        for part, group in itertools.groupby(stream, key=lambda s: s["__part__"]):
            with storage.open_write(plan.part_url(m, part)) as out:
                count, size = reshard.write_run(out, group)
            counts[str(part)] = count
            nbytes += size
        spilled = sorter.spilled_runs
    stats = {"samples_in": counter.count, "bytes_in": counter.nbytes, "samples_mapped": mapped,
             "samples_out": sum(counts.values()), "bytes_out": nbytes, "spilled_runs": spilled}
    marker = {"fingerprint": plan.fingerprint, "parts": counts, "stats": stats,
              "seconds": time.time() - started}
    _write_json(plan.marker_url(m), marker)
    return dict(stats, parts=counts)


def _lazy_run(url):
    with storage.open_read(url) as stream:
        yield from reshard.read_run(stream, url)


def reduce_task(plan, p):
    """Merge partition p's runs from every map task (reducing equal keys) into one output shard."""
    from tarproc.streams import SampleWriter

    _remove_dead_sample_dirs(plan)  # of workers killed before (here: the worker's own machine)
    ordering = plan.ordering
    runs = [_lazy_run(plan.part_url(m, p)) for m in plan.sources[p]]
    counter = _Counted(reshard.merge_runs(runs, ordering.order_key, plan.fanin))
    stream = iter(counter)
    if plan.reducer is not None:
        stream = reshard.group_reduce(stream, ordering, plan.reducer.load())
    if plan.mode == "shuffle":
        stream = reshard.keys_apart(stream)  # duplicate keys, side by side by chance
    with SampleWriter(plan.outputs[p], sha256=False) as sink:
        try:
            for sample in stream:
                sample.pop("__order__", None)
                sample.pop("__part__", None)
                sink.write(sample)
        except DuplicateKeyError as exc:
            exc = sink.named(exc)  # (one from keys_apart does not name the output yet)
            if plan.mode == "sort" and plan.reducer is None and ordering.field is None:
                raise DuplicateKeyError(
                    f"{exc} (the inputs hold it more than once, and sorted, those samples are side "
                    "by side; --reduce FILE.py merges the samples of each key)",
                    exc.key, exc.url) from None
            raise exc from None
    return {"samples_in": counter.count, "bytes_in": counter.nbytes,
            "samples_out": sink.count, "bytes_out": sink.nbytes}


# ---------------------------------------------------------------------------------------------
# result


@dataclass
class ReshardResult:
    """What a two-phase job did: one driver JobResult per phase, failures, totals, time."""

    mode: str
    inputs: list
    outputs: list
    workdir: str
    phases: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)
    seconds: float = 0.0
    skipped: bool = False
    message: str = ""
    rewritten: int = 0  # outputs that existed without this job's reduce marker, written again

    @property
    def ok(self):
        return not self.failed

    @property
    def totals(self):
        """Input counts from the map phase, output counts from the reduce phase."""
        out = {}
        m, r = self.phases.get("map"), self.phases.get("reduce")
        if m is not None:
            for k in ("samples_in", "bytes_in", "spilled_runs"):
                if k in m.totals:
                    out[k] = m.totals[k]
            if "samples_out" in m.totals:
                out["samples_shuffled"] = m.totals["samples_out"]
        if r is not None:
            for k in ("samples_out", "bytes_out"):
                if k in r.totals:
                    out[k] = r.totals[k]
        return out

    def summary(self):
        if self.skipped:
            return self.message
        parts = [f"{self.mode}: {len(self.inputs)} -> {len(self.outputs)} shards"]
        for name, res in self.phases.items():
            parts.append(f"{name}: {res.done} done, {res.skipped} skipped, "
                         f"{len(res.failed)} failed in {res.seconds:.1f} s")
        t = self.totals
        if "samples_in" in t:
            parts.append(f"{int(t['samples_in'])} samples in")
        if "samples_out" in t:
            parts.append(f"{int(t['samples_out'])} samples out")
        if self.rewritten:
            parts.append(f"{self.rewritten} output shard(s) that existed rewritten (not known "
                         "to come from this job: its work files were gone)")
        line = "; ".join(parts) + f"; {self.seconds:.1f} s"
        if self.failed:
            line += f"; FAILED {len(self.failed)}"
        return line

    def to_dict(self):
        return {"mode": self.mode, "inputs": self.inputs, "outputs": self.outputs,
                "workdir": self.workdir, "ok": self.ok, "seconds": self.seconds,
                "failed": [{"key": k, "error": e} for k, e in self.failed],
                "totals": self.totals,
                "phases": {k: v.to_dict() for k, v in self.phases.items()}}

    def to_json(self, path=None):
        text = json.dumps(self.to_dict(), indent=1, default=repr)
        if path is not None:
            with open(path, "w", encoding="utf-8") as stream:
                stream.write(text + "\n")
        return text


# ---------------------------------------------------------------------------------------------
# driver side


def _as_list(urls):
    return [urls] if isinstance(urls, str) else list(urls)


def _expand_outputs(outputs):
    names = []
    for pattern in _as_list(outputs):
        names.extend(shards.expand_outputs(pattern))
    if len(set(names)) != len(names):
        raise TarprocError("output shard names repeat")
    return names


def _fingerprint(mode, inputs, outputs, ordering, mapper, reducer, combine):
    text = json.dumps({"v": FORMAT_VERSION, "mode": mode, "inputs": inputs, "outputs": outputs,
                       "ordering": ordering.describe(),
                       "mapper": mapper.digest if mapper else None,
                       "reducer": reducer.digest if reducer else None,
                       "combine": combine if isinstance(combine, str) else bool(combine)},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_local_cluster(cluster):
    """True when the work certainly runs on this machine (so a local temp dir is shared)."""
    if cluster is None:
        return True
    client = getattr(cluster, "client", cluster)
    inner = getattr(client, "cluster", None)
    try:
        from distributed import LocalCluster
    except ImportError:  # pragma: no cover
        return False
    return isinstance(inner, LocalCluster)


def _resolve_workdir(workdir, cluster, fingerprint):
    if workdir:
        workdir = str(workdir).rstrip("/")
        if storage.scheme(workdir) in ("stdio", "pipe"):
            raise WorkdirError(f"--workdir {workdir}: must be a directory or URL prefix, not a stream")
        if storage.scheme(workdir) == "file":
            path = storage.local_path(workdir)
            return os.path.abspath(path), True
        return workdir, False
    if not _is_local_cluster(cluster):
        raise WorkdirError(
            "with a remote cluster (-c), give --workdir: a location every worker can read and "
            "write (a shared directory, http://.../work/ on WebDAV, s3://bucket/tmp/)")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = os.path.join(tempfile.gettempdir(), f"tarproc-work-{uid}-{fingerprint[:16]}")
    return path, True


def _cleanup(plan, markers, local):
    """Delete what the job wrote to the work location (by name: nothing is listed)."""
    if local and os.path.isdir(plan.workdir):
        for m in range(len(plan.inputs)):
            shutil.rmtree(plan.map_dir(m), ignore_errors=True)
        for name in ["boundaries.json"] + [f"reduce-{p:05d}.done.json" for p in range(len(plan.outputs))]:
            try:
                os.remove(os.path.join(plan.workdir, name))
            except OSError:
                pass
        try:
            os.rmdir(plan.workdir)
        except OSError:
            pass
        return
    for m, marker in markers.items():
        for p in marker.get("parts", {}):
            storage.remove(plan.part_url(m, int(p)), missing_ok=True)
        storage.remove(plan.marker_url(m), missing_ok=True)
    if plan.mode == "sort":
        storage.remove(plan.boundaries_url, missing_ok=True)
    for p in range(len(plan.outputs)):
        storage.remove(plan.reduce_marker_url(p), missing_ok=True)
    for m in range(len(plan.inputs)):
        try:  # a WebDAV collection; object stores have none
            storage.remove(plan.map_dir(m) + "/", missing_ok=True)
        except Exception:  # noqa: BLE001 - best effort
            pass


#: The temp file of a write to a work file in a map dir (see LocalWriter): part or marker name.
_WORK_TEMP = re.compile(r"\.(part-([0-9]{5,})\.tar|done\.json)\.tmp-")


def _temp_targets(plan, local):
    """The files of the job whose temp files a stopped write may have left: the output shards
    and, when the work location is local, the work files of it that have one beside them.

    The map dirs are listed rather than every part name made (M x N of them): only names the
    job itself gives (``part-PPPPP.tar`` with P < N, ``done.json``, ``boundaries.json``) count.
    """
    targets = list(plan.outputs)
    if local:
        targets.append(plan.boundaries_url)
        targets.extend(plan.reduce_marker_url(p) for p in range(len(plan.outputs)))
        for m in range(len(plan.inputs)):
            try:
                names = os.listdir(plan.map_dir(m))
            except OSError:
                continue
            for name in names:
                match = _WORK_TEMP.match(name)
                if match is None:
                    continue
                if match.group(2) is None:
                    targets.append(plan.marker_url(m))
                    continue
                p = int(match.group(2))
                if p < len(plan.outputs) and match.group(1) == f"part-{p:05d}.tar":
                    targets.append(plan.part_url(m, p))
    return targets


def _remove_dead_sample_dirs(plan):
    """Remove the per-sample temp dirs (``tarproc-<pid>-...``) that killed processes left in the
    default temp base, when the job runs user code: a mapper or reduce may run a command per
    sample through tarproc's ShellRunner (``tarproc.processing.make_runner``). Only dirs of this
    user whose process is dead and that no process holds locked go (sampledir.remove_dead_roots).
    """
    if plan.mapper is None and plan.reducer is None and plan.combiner is None:
        return
    from tarproc.runner.sampledir import remove_dead_roots

    remove_dead_roots()


def _tidy(plan, local):
    """What interrupted or killed writers and workers left: temp files of the job's own files
    (see storage.local.remove_temp_files: only regular files named so beside our targets), and
    the sample dirs of dead processes."""
    remove_temp_files(_temp_targets(plan, local))
    _remove_dead_sample_dirs(plan)


def run_twophase(mode, inputs, outputs, *, ordering, mapper=None, reducer=None, combine=False,
                 cluster=None, workers=None, workdir=None, keep_work=False, memory="256MB",
                 retries=2, force=False, speculation=True, progress=True, log_dir=None,
                 sample_size=None) -> ReshardResult:
    """The engine of :func:`shuffle` and :func:`sort` (see the module doc for the phases)."""
    from tarproc.jobs.cluster import connect
    from tarproc.jobs.driver import run_items

    t0 = time.monotonic()
    in_urls = shards.expand_inputs(inputs)
    out_urls = _expand_outputs(outputs)
    for url in in_urls:
        if url == "-" or url.startswith("pipe:"):
            raise TarprocError(f"{url}: a two-phase job needs input shards, not a stream")
    shards.require_local_inputs(in_urls)
    mapper = UserCode.make(mapper, "process_sample") if not isinstance(mapper, UserCode) else mapper
    reducer = UserCode.make(reducer, "reduce_samples") if not isinstance(reducer, UserCode) else reducer
    combiner = None
    if combine is not None and not isinstance(combine, bool):
        combiner = combine if isinstance(combine, UserCode) else UserCode.make(combine, "reduce_samples")
        combine = True
    if combine and reducer is None:
        raise TarprocError("--combine needs --reduce")
    fingerprint = _fingerprint(mode, in_urls, out_urls, ordering, mapper, reducer,
                               combiner.digest if combiner else combine)
    workdir, local = _resolve_workdir(workdir, cluster, fingerprint)
    n_in, n_out = len(in_urls), len(out_urls)
    if sample_size is None:
        sample_size = max(MIN_SAMPLE_PER_SHARD, -(-SAMPLE_PER_OUTPUT * n_out // n_in))
    plan = Plan(mode=mode, inputs=in_urls, outputs=out_urls, workdir=workdir, ordering=ordering,
                fingerprint=fingerprint, memory=parse_size(memory), mapper=mapper,
                reducer=reducer, combine=combine, combiner=combiner, sample_size=sample_size)
    result = ReshardResult(mode=mode, inputs=in_urls, outputs=out_urls, workdir=workdir)

    # temp files of our outputs and work files that an interrupted or killed run left go
    # first, and those of this run (stopped workers, cancelled tasks) at the end, however the
    # job ends; so do the sample dirs of dead processes when user code runs
    _tidy(plan, local)
    try:
        existing = set() if force else {p for p, u in enumerate(out_urls) if storage.committed(u)}
        if len(existing) == n_out:
            result.skipped = True
            result.message = (f"{mode}: all {n_out} output shards exist already; nothing to do "
                              f"(--force to redo)")
            result.seconds = time.monotonic() - t0
            return result

        in_keys = [storage.redact(u) for u in in_urls]
        if len(set(in_keys)) != len(in_keys):
            in_keys = [f"{i}:{k}" for i, k in enumerate(in_keys)]
        out_keys = [storage.redact(u) for u in out_urls]
        common = dict(retries=retries, speculation=speculation, progress=progress, log_dir=log_dir)

        with connect(cluster, workers=workers, quiet=not progress) as client:
            if plan.mode == "sort" and n_out > 1:
                plan.boundaries = _boundaries(plan, client, run_items, in_keys, force, common,
                                              result)
                if plan.boundaries is None:
                    return _finish(result, t0)

            markers = {}

            def map_done(m):
                marker = _ours(plan, plan.marker_url(m))
                if marker is None:
                    return False
                markers[m] = marker
                return True

            def on_map(record):
                if record["status"] == "done":
                    markers[record["index"]] = {"parts": record.get("parts", {})}

            res = run_items(functools.partial(map_task, plan), range(n_in), keys=in_keys,
                            **_driver_kw(client, is_done=map_done, force=force, desc="map",
                                         on_result=on_map, **common))
            result.phases["map"] = res
            if not res.ok:
                result.failed = _failures(res)
                return _finish(result, t0)

            plan.sources = [[m for m in range(n_in) if markers[m]["parts"].get(str(p))]
                            for p in range(n_out)]
            def reduce_done(p):
                return p in existing and _ours(plan, plan.reduce_marker_url(p)) is not None

            def on_reduce(record):
                if record["status"] == "done":
                    _write_json(plan.reduce_marker_url(record["index"]),
                                {"fingerprint": plan.fingerprint})

            res = run_items(functools.partial(reduce_task, plan), range(n_out), keys=out_keys,
                            **_driver_kw(client, is_done=reduce_done, force=force, desc="reduce",
                                         on_result=on_reduce, **common))
            result.phases["reduce"] = res
            result.rewritten = sum(1 for r in res.items
                                   if r["status"] == "done" and r["index"] in existing)
            if not res.ok:
                result.failed = _failures(res)
                return _finish(result, t0)

        if not keep_work:
            _cleanup(plan, markers, local)
        return _finish(result, t0)
    finally:
        _tidy(plan, local)  # (the cluster's workers, if local, are stopped by now)


def _failures(res):
    """Failed items of a phase in input order."""
    return [(r["key"], r["error"]) for r in res.items if r["status"] == "failed"]


def _driver_kw(client, **kw):
    kw["cluster"] = client
    return kw


def _boundaries(plan, client, run_items, in_keys, force, common, result):
    """Range boundaries from a sample of keys, reused from the work location on a rerun."""
    saved = None if force else _ours(plan, plan.boundaries_url)
    if saved is not None:
        return saved["boundaries"]
    res = run_items(functools.partial(sample_task, plan), range(len(plan.inputs)), keys=in_keys,
                    **_driver_kw(client, desc="sample", **common))
    result.phases["sample"] = res
    if not res.ok:
        result.failed = _failures(res)
        return None
    per_shard = [(r["count"], r["keys"]) for r in sorted(res.items, key=lambda r: r["index"])]
    boundaries = reshard.choose_boundaries(per_shard, len(plan.outputs), plan.ordering)
    _write_json(plan.boundaries_url, {"fingerprint": plan.fingerprint, "boundaries": boundaries})
    return boundaries


def _finish(result, t0):
    result.seconds = time.monotonic() - t0
    return result


# ---------------------------------------------------------------------------------------------
# public jobs


def shuffle(inputs, outputs, *, seed=0, mapper=None, cluster=None, workers=None, workdir=None,
            keep_work=False, memory="256MB", retries=2, force=False, speculation=True,
            progress=True, log_dir=None) -> ReshardResult:
    """Globally shuffle the samples of `inputs` into the shards named by `outputs`.

    Every sample lands in a uniformly random output shard, shard sizes are balanced, and each
    shard is randomly permuted; the same inputs and `seed` give byte-identical shards whatever
    the number of workers. `mapper` (a `process_sample` callable or a script path) is applied
    first. `cluster`: None (a local cluster), an address, a Client or a Cluster; with a remote
    cluster `workdir` must be a location all workers share. Returns a :class:`ReshardResult`
    (check `.ok`; `.failed` lists shards with their errors).

        shuffle("data/Volume_@16.tgz", "out/shuffled-@32.tgz", seed=7)
    """
    ordering = reshard.Ordering("shuffle", seed=seed)
    return run_twophase("shuffle", inputs, outputs, ordering=ordering, mapper=mapper,
                        cluster=cluster, workers=workers, workdir=workdir, keep_work=keep_work,
                        memory=memory, retries=retries, force=force, speculation=speculation,
                        progress=progress, log_dir=log_dir)


def sort(inputs, outputs, *, key=None, numeric=False, reverse=False, reduce=None, mapper=None,
         combine=False, cluster=None, workers=None, workdir=None, keep_work=False,
         memory="256MB", retries=2, force=False, speculation=True, progress=True, log_dir=None,
         sample_size=None) -> ReshardResult:
    """Sort the samples of `inputs` by `__key__` or a field into range-partitioned output shards.

    Reading the outputs 0..N-1 in order gives one sorted stream; equal keys share one shard.
    `key` names a field (its bytes decoded as UTF-8; `numeric` compares them as numbers,
    `reverse` sorts descending). `mapper` is a `process_sample(sample)` applied first;
    `reduce` a `reduce_samples(key, samples)` applied to each group of equal keys (`samples`
    is a one-pass iterator; return a dict, a list of dicts or None); both may be callables or
    script paths. A reduce script that also defines `process_sample` uses it as the mapper
    when no `mapper` is given. `combine` applies the reduce inside map tasks too (only for
    associative reduces such as counts; it must keep the sort key).

        sort("data/words-@8.tar", "out/counts-@4.tar", key="txt", reduce="wordcount.py")
    """
    ordering = reshard.Ordering("sort", field=key, numeric=numeric, reverse=reverse)
    if reduce is not None and not callable(reduce):
        reduce = UserCode.make(reduce, "reduce_samples")
        if mapper is None and reduce.has("process_sample"):
            mapper = reduce.sibling("process_sample")
    return run_twophase("sort", inputs, outputs, ordering=ordering, mapper=mapper,
                        reducer=reduce, combine=combine, cluster=cluster, workers=workers,
                        workdir=workdir, keep_work=keep_work, memory=memory, retries=retries,
                        force=force, speculation=speculation, progress=progress,
                        log_dir=log_dir, sample_size=sample_size)
