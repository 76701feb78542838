"""The per-shard jobs of `htmapper`, `htextract` and `htls`, as functions callable from Python.

Each job is a list of input shards and one Dask task per shard, run through the items driver
(`run_items`: bounded window, retries, speculation, resume, progress). Tasks read and write
storage URLs directly, so workers need no filesystem shared with the driver; Python code is sent
as source text or pickled by value.
"""

import collections
import copy
import io
import operator
import warnings

from .. import shards, storage
from ..errors import PatternError, TarprocError
from ..streams import SampleWriter, iter_samples
from ..storage.local import remove_temp_files
from .driver import run_items


class JobFailed(TarprocError):
    """A job finished with failed shards; `.result` holds the JobResult."""

    def __init__(self, result):
        lines = [f"{key}: {error}" for key, error in result.failed[:10]]
        more = len(result.failed) - len(lines)
        text = "; ".join(lines) + (f"; and {more} more" if more > 0 else "")
        super().__init__(f"{len(result.failed)} of {result.total} {result.desc} failed: {text}")
        self.result = result


def _ship_by_value(obj):
    """Let workers unpickle user code defined in modules they cannot import (scripts, tests)."""
    import sys

    import cloudpickle

    from .driver import _callable_modules, _needs_by_value

    for modname in _callable_modules(obj):
        if _needs_by_value(modname):
            cloudpickle.register_pickle_by_value(sys.modules[modname])


class _Warnings:
    """Collects warnings (split samples, skipped links) raised while a task reads its shard."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings(record=True)
        self.caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def text(self):
        return "".join(f"warning: {w.message}\n" for w in self.caught)


class MapShard:
    """One map task: run a runner over every sample of one shard and commit the output shard.

    Samples run one after another in the task (the cluster provides the parallelism), straight
    through the runner without the local pool's machinery: about 10 us less per sample.
    """

    def __init__(self, runner, errors="abort", strict=False):
        self.runner = runner
        self.errors = errors
        self.strict = strict

    def __call__(self, pair):
        in_url, out_url = pair
        log = io.StringIO()
        counts = {}
        unsafe = "skip" if self.errors == "skip" else "error"
        # a copy per task: worker threads may run several tasks at once, each with its own dirs
        runner = copy.copy(self.runner) if self.runner is not None else None
        _remove_dead_roots(runner)  # of workers killed before (here: the worker's own machine)
        try:
            sink = self._run(runner, in_url, out_url, unsafe, counts, log)
        finally:
            close = getattr(runner, "close", None)
            if close is not None:
                close()
        return {"samples_in": counts["in"], "samples_out": sink.count, "dropped": counts["dropped"],
                "skipped": counts["skipped"], "kept": counts["kept"], "bytes_in": counts["bytes"],
                "bytes_out": sink.nbytes, "log": log.getvalue()}

    def _run(self, runner, in_url, out_url, unsafe, counts, log):
        from ..errors import SampleFailed, UnsafeNameError

        n_in = nbytes = dropped = skipped = kept = 0
        try:
            with _Warnings() as caught:
                samples = iter_samples(in_url, strict=self.strict, unsafe=unsafe)
                with SampleWriter(out_url, sha256=False) as sink:
                    write = sink.write
                    run = runner.run if runner is not None else None
                    for sample in samples:
                        for v in sample.values():  # key and url are str: only fields count
                            if v.__class__ is bytes:
                                nbytes += len(v)
                        index, n_in = n_in, n_in + 1
                        if run is None:
                            write(sample)
                            continue
                        try:
                            result = run(sample, index)
                        except (SampleFailed, UnsafeNameError) as exc:
                            if self.errors == "abort":
                                raise
                            log.write(f"{self.errors}: {exc}\n")
                            tail = getattr(exc, "stderr_tail", "")
                            if tail:
                                log.write(tail.rstrip() + "\n")
                            if self.errors == "keep":
                                write(sample)
                                kept += 1
                            else:
                                skipped += 1
                            continue
                        if result.stderr:
                            log.write(result.stderr.decode("utf-8", "replace"))
                        outputs = result.outputs
                        if outputs:
                            for out in outputs:
                                write(out)
                        else:
                            dropped += 1
            log.write(caught.text())
        finally:
            counts.update({"in": n_in, "bytes": nbytes, "dropped": dropped, "skipped": skipped,
                           "kept": kept})
        return sink


def _remove_dead_roots(runner):
    """Remove the sample dirs a killed process left in ``runner``'s temp base (see
    sampledir.remove_dead_roots), unless the runner keeps its dirs (debugging)."""
    from ..runner.sampledir import ShellRunner, remove_dead_roots

    if isinstance(runner, ShellRunner) and not runner.keep_dirs:
        remove_dead_roots(runner.tmpdir)


def make_runner(process_sample=None, command=None, **shell_options):
    """A runner from a `process_sample` callable, a Python file path, or a shell command."""
    from ..processing import make_runner as _make

    if callable(process_sample):
        _ship_by_value(process_sample)
        return _make(process_sample=process_sample)
    if process_sample is not None:
        import os

        if not isinstance(process_sample, (str, os.PathLike)):  # (an int would open a descriptor)
            raise TypeError(f"process_sample must be a callable or the path of a Python file, "
                            f"not {type(process_sample).__name__}")
        return _make(python=os.fspath(process_sample))
    if command is not None:
        return _make(command, **shell_options)
    return None


def shown_keys(urls):
    """How a job names its items (in failures, logs, --stats, progress): the URLs without
    credentials; numbered ``i:URL`` if that would make two of them alike."""
    keys = [storage.redact(u) for u in urls]
    if len(set(keys)) != len(keys):
        keys = [f"{i}:{k}" for i, k in enumerate(keys)]
    return keys


def absolute(url):
    """A local path made absolute, so that workers with another working directory find it."""
    import os

    if url != "-" and storage.is_local(url) and not url.startswith("file://"):
        return os.path.abspath(url)
    return url


def input_urls(pattern):
    """The expanded input shards, local paths made absolute; missing local ones are one error
    now, before a cluster starts (see shards.require_local_inputs)."""
    return shards.require_local_inputs([absolute(u) for u in shards.expand_inputs(pattern)])


def _job_options(kw):
    return {k: kw[k] for k in ("cluster", "workers", "retries", "force", "speculation", "progress",
                               "log_dir", "window", "spec_factor", "spec_min_seconds") if k in kw}


def map_shards(inputs, outputs, process_sample=None, *, command=None, errors="abort", strict=False,
               shell_options=None, check=False, **job):
    """The `htmapper` job: input shard i through `process_sample` (or a shell `command`) to output shard i.

    `process_sample` is a callable or the path of a Python file defining one; `command` a shell
    command run per sample like `tarproc -c`. Shards whose output exists are skipped unless
    `force=True` (resume). Job options: cluster, workers, retries, force, speculation, progress,
    log_dir. Returns the JobResult (`.ok`, `.failed`); with `check=True` raises JobFailed instead.

        map_shards("data/imagenet_train-{0000..0007}.tgz", "out/converted-@8.tar", my_fn)
    """
    in_urls = input_urls(inputs)
    out_urls = [absolute(u) for u in shards.expand_outputs(outputs, len(in_urls))]
    if len(set(out_urls)) != len(out_urls):
        raise PatternError(f"{outputs}: output names repeat")
    overlap = set(in_urls) & set(out_urls)
    if overlap:
        raise PatternError(f"{sorted(overlap)[0]}: a shard is both input and output")
    runner = make_runner(process_sample, command, **(shell_options or {}))
    load = getattr(runner, "load", None)
    if load is not None:
        load()  # a broken script fails here, once, not in every task and each of its retries
    task = MapShard(runner, errors=errors, strict=strict)
    # temp files of our outputs that an interrupted or killed run left go first, and those of
    # this run (stopped workers, cancelled tasks) at the end, however the job ends
    remove_temp_files(out_urls)
    try:
        result = run_items(task, list(zip(in_urls, out_urls)), keys=shown_keys(in_urls),
                           is_done=lambda pair: storage.committed(pair[1]), desc="shards",
                           **_job_options(job))
    finally:
        remove_temp_files(out_urls)
        _remove_dead_roots(runner)  # of the local cluster's workers, stopped by now
    if check and not result.ok:
        raise JobFailed(result)
    return result


# ------------------------------------------------------------------------------------- extract

def escape_value(value):
    """A field as one tab-separated cell: UTF-8 text with backslash, tab, CR and newline escaped."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def count_lines(counts, as_json=False, name="value"):
    """The lines `htextract --counts` / `-K` print: ``N<TAB>value`` escaped as `escape_value`
    escapes cells, or JSON objects ``{name: value, "count": N}``."""
    import json

    if as_json:
        return [json.dumps({name: value, "count": n}, ensure_ascii=False) for value, n in counts]
    return [f"{n}\t{escape_value(value)}" for value, n in counts]


class ExtractShard:
    """One extract task: the chosen fields of every sample of a shard, as text lines."""

    def __init__(self, fields, as_json=False, count=None, strict=False):
        self.fields = list(fields)
        self.as_json = as_json
        self.count = count
        self.strict = strict

    def __call__(self, url):
        import json

        lines = []
        nbytes = 0
        with _Warnings() as caught:
            for sample in iter_samples(url, strict=self.strict, count=self.count):
                nbytes += sum(len(v) for v in sample.values() if isinstance(v, bytes))
                values = [sample.get(f) for f in self.fields]
                if self.as_json:
                    record = {f: (v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v)
                              for f, v in zip(self.fields, values)}
                    lines.append(json.dumps(record, ensure_ascii=False))
                else:
                    lines.append("\t".join(escape_value(v) for v in values))
        return {"samples_in": len(lines), "bytes_in": nbytes, "lines": lines, "log": caught.text()}


class CountShard:
    """One counting task: how many samples have each value of a field (or each field name)."""

    def __init__(self, field=None, strict=False):
        self.field = field
        self.strict = strict

    def __call__(self, url):
        counter = collections.Counter()
        for sample in iter_samples(url, strict=self.strict):
            if self.field is None:
                counter.update(k for k in sample if not k.startswith("__") or k == "__key__")
            elif self.field in sample:
                value = sample[self.field]
                counter[value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value] += 1
        return counter


def extract(inputs, fields, *, as_json=False, count=None, out=None, strict=False, check=False, **job):
    """The `htextract` job: write the chosen fields of every sample as lines to `out` (a text file object).

    Lines come in shard order, then sample order, although shards are read in parallel. With
    `count`, at most that many lines. Returns the JobResult.
    """
    import sys

    out = out or sys.stdout
    urls = input_urls(inputs)
    pending = {}
    state = {"next": 0, "written": 0}
    keys = shown_keys(urls)
    index_of = {key: i for i, key in enumerate(keys)}

    def emit(record):
        lines = record.pop("lines", None)
        pending[index_of[record["key"]]] = lines or []
        while state["next"] in pending:
            for line in pending.pop(state["next"]):
                if count is not None and state["written"] >= count:
                    break
                out.write(line + "\n")
                state["written"] += 1
            state["next"] += 1
        out.flush()

    job.setdefault("speculation", True)
    result = run_items(ExtractShard(fields, as_json, count, strict), urls, keys=keys, desc="shards",
                       on_result=emit, **_job_options(job))
    if check and not result.ok:
        raise JobFailed(result)
    return result


def count_values(inputs, field=None, *, strict=False, check=False, **job):
    """How many samples have each value of `field` (or, with field None, each field name), most first.

    Returns (list of (value, count) most frequent first, JobResult).
    """
    urls = input_urls(inputs)
    result = run_items(CountShard(field, strict), urls, keys=shown_keys(urls), desc="shards", reduce=operator.add,
                       **_job_options(job))
    if check and not result.ok:
        raise JobFailed(result)
    counts = sorted((result.reduced or {}).items(), key=lambda kv: (-kv[1], str(kv[0])))
    return counts, result


# ------------------------------------------------------------------------------------------ ls

def _count_samples(url):
    n = 0
    for _ in iter_samples(url):
        n += 1
    return {"samples_in": n}


def list_shards(pattern, *, samples=False, **job):
    """The `htls` report for a shard pattern: which shards exist, their sizes and (optionally) sample counts.

    Returns a dict: shards (list of {url, size (None if missing), samples}), count, missing (urls),
    total_bytes, min, mean, max, skew (max/mean), and `result` (the JobResult of counting, or None).
    """
    from concurrent.futures import ThreadPoolExecutor

    urls = shards.expand_inputs(pattern)
    threads = 1 if all(storage.is_local(u) for u in urls) else 16
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(_size_or_none, urls))
    rows = [{"url": u, "size": s, "samples": None} for u, s in zip(urls, sizes)]
    present = [r for r in rows if r["size"] is not None]
    report = {"shards": rows, "count": len(rows), "missing": [r["url"] for r in rows if r["size"] is None],
              "total_bytes": sum(r["size"] for r in present), "result": None}
    if present:
        values = [r["size"] for r in present]
        mean = sum(values) / len(values)
        report.update(min=min(values), mean=mean, max=max(values), skew=(max(values) / mean if mean else 0.0))
    if samples and present:
        items = [absolute(r["url"]) for r in present]
        by_key = dict(zip(shown_keys(items), present))
        result = run_items(_count_samples, items, keys=list(by_key), desc="shards",
                           on_result=lambda rec: by_key[rec["key"]].update(samples=rec.get("samples_in")),
                           **_job_options(job))
        report["result"] = result
        counts = [r["samples"] for r in present if r["samples"] is not None]
        if counts:
            mean = sum(counts) / len(counts)
            report.update(total_samples=sum(counts), samples_min=min(counts), samples_max=max(counts),
                          samples_mean=mean, samples_skew=(max(counts) / mean if mean else 0.0))
    return report


def _size_or_none(url):
    """The shard's size; None when there is no shard there (nothing, or a local directory).
    A server that cannot be asked (refused, timed out, 5xx) is an error, not a missing shard."""
    if not storage.exists(url):
        return None
    if storage.is_local(url):
        import os

        if not os.path.isfile(storage.local_path(url)):
            return None
    return storage.size(url)
