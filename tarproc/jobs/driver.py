"""Run one function over many items on a Dask cluster: the engine under every tarproc job.

:func:`run_items` calls ``fn(item)`` once per item, on all cores or on a cluster, and returns a
:class:`JobResult` with what was done, skipped and failed. It is built for long, crash-prone runs
over large lists (shards, URLs, files):

- a bounded window of tasks is in flight, so 100,000 items neither flood the scheduler nor grow
  the driver (finished tasks are released; only their small statistics are kept);
- ``is_done(item)`` lets a rerun skip what a previous run finished: fix the bug, run the same
  call again, lose nothing;
- an exception is retried (by default twice) on another worker where possible; an item that
  still fails is listed with a one-line error while the others go on;
- a straggler gets a speculative copy on an idle worker; the first copy to finish wins;
- ``reduce`` folds ``(key, value)`` results into one dict on the driver.

Example::

    from tarproc.jobs.driver import run_items

    def convert(url):
        ...                                  # write the output, commit it atomically
        return {"samples_in": 10000, "samples_out": 9998, "bytes_out": 123456}

    result = run_items(convert, urls, is_done=lambda url: output_exists(url), desc="shards")
    print(result.summary())                  # 8 shards: 8 done, 0 skipped, 0 failed; ...
    if not result.ok:
        for key, error in result.failed:
            print(key, error)

``fn`` must be safe to run twice for the same item (retries after a worker died, speculative
copies): write to a temporary name and commit at the end. It may be a lambda, a closure or a
function of a module the workers cannot import (a script, a test module): such functions are
sent by value with cloudpickle. Workers must be able to import ``tarproc`` itself.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os
import queue
import random
import re
import site
import sys
import sysconfig
import threading
import time
import traceback
import types
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from tarproc.errors import TarprocError
from tarproc.jobs.cluster import ClusterError, connect

__all__ = ["JobResult", "run_items"]

_START_TOPIC = "tarproc-item-started"
_RESERVED = ("key", "index", "status", "seconds", "worker", "attempts", "speculative")


# ---------------------------------------------------------------------------------------------
# Worker side


_fn_cache: "OrderedDict[str, object]" = OrderedDict()
_fn_cache_lock = threading.Lock()


def _load_callable(payload):
    """Unpickle a driver-sent callable once per worker process (tasks reuse it)."""
    digest, blob = payload
    with _fn_cache_lock:
        fn = _fn_cache.get(digest)
        if fn is not None:
            _fn_cache.move_to_end(digest)
            return fn
    import cloudpickle

    fn = cloudpickle.loads(blob)
    with _fn_cache_lock:
        _fn_cache[digest] = fn
        while len(_fn_cache) > 16:
            _fn_cache.popitem(last=False)
    return fn


def _pairs(value):
    """The ``(key, value)`` pairs of an item's result when the job has a reduce."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return value.items()
    if isinstance(value, tuple) and len(value) == 2:
        return (value,)
    return value


def _combine(reduce, value):
    """Fold one item's pairs by key on the worker, so only one value per key travels."""
    out = {}
    for pair in _pairs(value):
        try:
            k, v = pair
        except (TypeError, ValueError):
            raise TypeError(f"with reduce=, fn must return (key, value) pairs, got {pair!r}") from None
        out[k] = reduce(out[k], v) if k in out else v
    return out


def _one_line(exc) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    if len(msg) > 300:
        msg = msg[:297] + "..."
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


#: How many of the last stderr lines of a failed command (``SampleFailed.stderr_tail``) the
#: one-line error of an item shows, and at most how many characters of them.
_TAIL_LINES = 3
_TAIL_CHARS = 300


def _error_of(exc):
    """``(one-line error, traceback text)`` of an exception raised by an item's ``fn``.

    A failed command's last stderr lines (an exception's ``stderr_tail``, as
    :class:`~tarproc.errors.SampleFailed` has) are what tells why: a few of them end the one-line
    error (``... -- stderr: line | line``), and up to ten end the traceback (the item's log).
    """
    error, tb = _one_line(exc), traceback.format_exc()
    tail = getattr(exc, "stderr_tail", None)
    if not tail or not isinstance(tail, str):
        return error, tb
    lines = [line.strip() for line in tail.strip("\n").split("\n") if line.strip()]
    if not lines:
        return error, tb
    short = " | ".join(lines[-_TAIL_LINES:])
    if len(short) > _TAIL_CHARS:
        short = "..." + short[-(_TAIL_CHARS - 3):]
    long = "\n".join(line[:1000] for line in tail.rstrip("\n").split("\n")[-10:])
    return f"{error} -- stderr: {short}", f"{tb.rstrip()}\nstderr of the command (last lines):\n{long}\n"


def _run_item(payload, item, job, dkey, reduce_payload):
    """Run ``fn(item)`` on a worker; never raise for fn's own errors (the driver retries)."""
    started = time.time()
    worker = None
    try:
        from distributed import get_worker

        w = get_worker()
        worker = w.address
        if job is not None:
            w.log_event(_START_TOPIC, {"job": job, "key": dkey, "worker": worker})
    except Exception:  # noqa: BLE001 - e.g. run outside a worker
        pass
    try:
        fn = _load_callable(payload)
        value = fn(item)
        if reduce_payload is not None:
            value = _combine(_load_callable(reduce_payload), value)
        elif isinstance(value, types.GeneratorType):
            value = list(value)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported to the driver
        error, tb = _error_of(exc)
        # An error that says so (DuplicateKeyError: the same data gives it again) is not retried.
        fatal = getattr(exc, "retry", True) is False
        return {"ok": False, "error": error, "traceback": tb, "fatal": fatal,
                "worker": worker, "seconds": time.time() - started}
    return {"ok": True, "value": value, "worker": worker, "seconds": time.time() - started}


# ---------------------------------------------------------------------------------------------
# Sending callables


def _library_dirs():
    dirs = set()
    for name in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            dirs.add(os.path.realpath(sysconfig.get_paths()[name]))
        except KeyError:
            pass
    try:
        dirs.update(os.path.realpath(p) for p in site.getsitepackages())
        dirs.add(os.path.realpath(site.getusersitepackages()))
    except Exception:  # noqa: BLE001 - virtualenv variants lack some of these
        pass
    return dirs


def _needs_by_value(modname) -> bool:
    """True for a module that workers may not be able to import (a script, a test module)."""
    if not modname or modname == "__main__" or modname.split(".")[0] == "tarproc":
        return False
    module = sys.modules.get(modname)
    path = getattr(module, "__file__", None)
    if module is None or not path:
        return False
    path = os.path.realpath(path)
    return not any(path.startswith(d + os.sep) for d in _library_dirs())


def _callable_modules(fn):
    seen = []
    while True:
        if isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif isinstance(fn, functools.partial):
            fn = fn.func
        else:
            break
    modname = getattr(fn, "__module__", None)
    if not isinstance(fn, (types.FunctionType, types.BuiltinFunctionType, type)):
        seen.append(type(fn).__module__)  # a callable instance: its class's module
    seen.append(modname)
    return [m for m in seen if m]


def _pack_callable(fn):
    """Pickle ``fn`` so workers can load it without importing the caller's module."""
    import cloudpickle

    for modname in _callable_modules(fn):
        if _needs_by_value(modname):
            cloudpickle.register_pickle_by_value(sys.modules[modname])
    blob = cloudpickle.dumps(fn)
    return hashlib.sha1(blob).hexdigest(), blob


# ---------------------------------------------------------------------------------------------
# Start notifications (for speculation): worker events routed to the driver running that job

_listeners: dict = {}


def _dispatch_start(event):
    try:
        _, msg = event
        listener = _listeners.get(msg.get("job"))
    except Exception:  # noqa: BLE001 - someone else's event on our topic
        return
    if listener is not None:
        listener(msg)


# ---------------------------------------------------------------------------------------------
# Result


@dataclass
class JobResult:
    """What a job did: counts, failures with one-line errors, per-item statistics, totals.

    ``items`` holds one dict per processed item: ``key``, ``index`` (position in the input),
    ``status`` (``"done"`` or ``"failed"``), ``seconds`` (run time of the winning attempt),
    ``worker``, ``attempts``, ``speculative`` (the speculative copy won), plus the statistics
    ``fn`` returned (a dict) or ``value`` (anything else); failed items carry ``error`` and
    ``traceback``. ``totals`` sums the numeric statistics of the done items. ``reduced`` is the
    reduce's ``{key: value}`` dict (None without ``reduce``).
    """

    desc: str = "items"
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)
    items: list = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    seconds: float = 0.0
    reduced: dict | None = None
    speculated: int = 0
    max_in_flight: int = 0

    @property
    def ok(self) -> bool:
        """True when no item failed."""
        return not self.failed

    def summary(self) -> str:
        """One line: ``8 shards: 8 done, 0 skipped, 0 failed; 80000 samples in, ... 2.5 MB written in 3.2 s``."""
        desc = self.desc[:-1] if self.total == 1 and self.desc.endswith("s") else self.desc
        line = (f"{self.total} {desc}: {self.done} done, {self.skipped} skipped, "
                f"{len(self.failed)} failed")
        parts = []
        for name, label in (("samples_in", "samples in"), ("samples_out", "samples out")):
            if name in self.totals:
                parts.append(f"{int(self.totals[name])} {label}")
        # samples whose processing failed under --errors skip / keep: never left unsaid
        for name, label in (("skipped", "failing samples dropped"), ("kept", "failing samples kept")):
            if self.totals.get(name):
                parts.append(f"{int(self.totals[name])} {label}")
        # bytes_in counts the samples' field data, bytes_out the shards as stored (compressed)
        for name, label in (("bytes_in", "of sample data read"), ("bytes_out", "written")):
            if name in self.totals:
                parts.append(f"{_human_bytes(self.totals[name])} {label}")
        if self.speculated:
            parts.append(f"{self.speculated} speculative")
        if parts:
            line += "; " + ", ".join(parts)
        return line + f" in {self.seconds:.1f} s"

    def to_dict(self) -> dict:
        """A JSON-ready dict (the ``--stats`` file of the commands)."""
        return {
            "desc": self.desc, "total": self.total, "done": self.done, "skipped": self.skipped,
            "failed": [{"key": k, "error": e} for k, e in self.failed],
            "seconds": self.seconds, "speculated": self.speculated, "totals": self.totals,
            "items": self.items,
            **({"reduced": {str(k): v for k, v in self.reduced.items()}}
               if self.reduced is not None else {}),
        }

    def to_json(self, path=None, indent=1) -> str:
        """The result as JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent, default=repr)
        if path is not None:
            from tarproc import storage

            with storage.open_write(path) as f:  # atomic; /dev/stdout is written into
                f.write((text + "\n").encode("utf-8"))
        return text


def _human_bytes(n) -> str:
    from tarproc.tarutils import format_size

    return format_size(n)


# ---------------------------------------------------------------------------------------------
# Driver


class _Item:
    __slots__ = ("index", "key", "item", "attempts", "failures", "futures", "bad_workers",
                 "speculated")

    def __init__(self, index, key, item):
        self.index = index
        self.key = key
        self.item = item
        self.attempts = 0          # submissions that were not speculative copies
        self.failures = []         # (worker, one-line error, traceback)
        self.futures = {}          # dask key -> future, live copies only
        self.bad_workers = set()
        self.speculated = False


def _safe_name(key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._+=@-]", "_", key).lstrip(".") or "_"
    if safe != key or len(safe) > 180:
        safe = f"{safe[:160]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return safe


class _Job:
    def __init__(self, client, fn, source, total, opts):
        self.client = client
        self.source = source
        self.o = opts
        self.job = uuid.uuid4().hex[:10]
        self.payload = _pack_callable(fn)
        self.reduce_payload = _pack_callable(opts["reduce"]) if opts["reduce"] else None
        self.result = JobResult(desc=opts["desc"], total=total or 0)
        if opts["reduce"]:
            self.result.reduced = {}
        self.live = {}             # index -> _Item
        self.inflight = {}         # dask key -> (_Item, speculative)
        self.started = {}          # dask key -> (monotonic time, worker)
        self.done_q = queue.Queue()       # futures whose task ended, from Dask's callbacks
        self.durations = []        # sorted run times of finished items
        self.exhausted = False
        self.counted = 0
        self.workers = {}
        self.threads = 0
        self.window = 8
        self.next_refresh = 0.0
        self.t0 = time.monotonic()
        self.bar = None
        self.next_postfix = 0.0

    # -- cluster state

    def refresh_workers(self, force=False):
        now = time.monotonic()
        if not force and now < self.next_refresh:
            return
        self.next_refresh = now + 2.0
        try:
            self.workers = dict(self.client.nthreads())
        except Exception:  # noqa: BLE001 - keep the last known picture
            return
        self.threads = sum(self.workers.values())
        w = self.o["window"]
        self.window = int(w) if w else max(8, 2 * self.threads + 8)

    # -- submission

    def submit(self, st, speculative=False, workers=None, loose=True):
        if speculative:
            dkey = f"{self.o['desc']}-{st.index}-spec-{self.job}"
        else:
            dkey = f"{self.o['desc']}-{st.index}-{st.attempts}-{self.job}"
            st.attempts += 1
        self.inflight[dkey] = (st, speculative)  # before submit: start events may race
        kwargs = {}
        if workers:
            kwargs = {"workers": list(workers), "allow_other_workers": loose}
        fut = self.client.submit(
            _run_item, self.payload, st.item, self.job if self.o["speculation"] else None, dkey,
            self.reduce_payload, key=dkey, pure=False, retries=0, **kwargs)
        st.futures[dkey] = fut
        fut.add_done_callback(self.done_q.put)
        self.result.max_in_flight = max(self.result.max_in_flight, len(self.inflight))

    def fill(self):
        while not self.exhausted and len(self.inflight) < self.window:
            try:
                index, key, item = next(self.source)
            except StopIteration:
                self.exhausted = True
                break
            self.counted += 1
            is_done = self.o["is_done"]
            if is_done is not None and not self.o["force"] and is_done(item):
                self.result.skipped += 1
                self.tick_bar(1)
                continue
            st = _Item(index, key, item)
            self.live[index] = st
            self.submit(st)

    # -- completion

    def on_start(self, msg):
        dkey = msg.get("key")
        if dkey in self.inflight:
            self.started[dkey] = (time.monotonic(), msg.get("worker"))

    def collect(self, futures):
        """(future, record) for ended tasks; a record mirrors :func:`_run_item`'s dict."""
        from distributed.scheduler import KilledWorker

        out, ok = [], []
        for fut in futures:
            if fut.key not in self.inflight:
                continue  # a cancelled loser, or already handled
            if fut.status == "finished":
                ok.append(fut)
                continue
            worker = self.started.get(fut.key, (0, None))[1]
            if fut.status == "error":
                exc = fut.exception()
                text = "".join(traceback.format_exception(type(exc), exc, fut.traceback()))
                out.append((fut, {"ok": False, "error": _one_line(exc), "traceback": text,
                                  "worker": worker, "fatal": isinstance(exc, KilledWorker)}))
                continue
            if self.client.status not in ("running", "connecting"):
                raise ClusterError(f"lost the Dask client ({self.client.status}) during the job")
            out.append((fut, {"ok": False, "error": f"task {fut.status}", "traceback": "",
                              "worker": worker}))
        if ok:
            try:  # one round trip for the whole batch
                out.extend(zip(ok, self.client.gather(ok)))
            except Exception:  # noqa: BLE001 - e.g. a result lost with its worker: one by one
                for fut in ok:
                    try:
                        out.append((fut, fut.result()))
                    except Exception as exc:  # noqa: BLE001
                        out.append((fut, {"ok": False, "error": _one_line(exc),
                                          "traceback": traceback.format_exc(), "worker": None}))
        return out

    def handle(self, fut, rec):
        dkey = fut.key
        st, speculative = self.inflight.pop(dkey)
        st.futures.pop(dkey, None)
        self.started.pop(dkey, None)
        if rec.get("ok"):
            self.finish_done(st, rec, speculative)
            return
        st.failures.append((rec.get("worker"), rec["error"], rec.get("traceback", ""),
                            speculative))
        if rec.get("worker"):
            st.bad_workers.add(rec["worker"])
        if st.futures:
            return  # another copy is still running
        if rec.get("fatal") or len(st.failures) > self.o["retries"]:
            self.finish_failed(st, rec)
            return
        allowed = [w for w in self.workers if w not in st.bad_workers]
        self.submit(st, workers=allowed if len(allowed) < len(self.workers) else None)

    def release(self, st):
        del self.live[st.index]
        losers = list(st.futures.items())
        st.futures.clear()
        for dkey, _ in losers:
            self.inflight.pop(dkey, None)
            self.started.pop(dkey, None)
        if losers:
            self.client.cancel([f for _, f in losers])

    def finish_done(self, st, rec, speculative):
        self.release(st)
        value = rec.get("value")
        record = {}
        if self.o["reduce"]:
            acc, reduce = self.result.reduced, self.o["reduce"]
            for k, v in (value or {}).items():
                acc[k] = reduce(acc[k], v) if k in acc else v
        elif isinstance(value, dict):
            record.update(value)
        elif value is not None:
            record["value"] = value
        log_text = record.pop("log", None)
        record.update(key=st.key, index=st.index, status="done", seconds=rec["seconds"],
                      worker=rec.get("worker"), attempts=st.attempts, speculative=speculative)
        bisect.insort(self.durations, rec["seconds"])
        totals = self.result.totals
        for k, v in record.items():
            if k != "index" and isinstance(v, (int, float)) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
        self.result.done += 1
        self.write_log(st, log_text)
        self.emit(record)

    def finish_failed(self, st, rec):
        self.release(st)
        record = {"key": st.key, "index": st.index, "status": "failed", "error": rec["error"],
                  "traceback": rec.get("traceback", ""), "worker": rec.get("worker"),
                  "attempts": st.attempts, "speculative": False}
        self.result.failed.append((st.key, rec["error"]))
        self.write_log(st, None)
        self.emit(record)

    def emit(self, record):
        self.result.items.append(record)
        if self.o["on_result"] is not None:
            self.o["on_result"](record)
        self.tick_bar(1)

    def write_log(self, st, log_text):
        log_dir = self.o["log_dir"]
        if not log_dir or (not log_text and not st.failures):
            return
        parts = []
        for n, (worker, error, tb, speculative) in enumerate(st.failures, 1):
            kind = "speculative copy" if speculative else "attempt"
            parts.append(f"--- {kind} failed ({n}) on {worker}: {error}\n{tb.rstrip()}\n")
        if log_text:
            if not isinstance(log_text, str):
                log_text = log_text.decode("utf-8", "replace") if isinstance(log_text, bytes) \
                    else str(log_text)
            parts.append(log_text if log_text.endswith("\n") else log_text + "\n")
        path = os.path.join(log_dir, _safe_name(st.key) + ".log")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(parts))

    # -- speculation

    def speculate(self):
        if not self.o["speculation"] or not self.durations:
            return
        capacity = min(self.threads, self.window)
        if len(self.inflight) >= capacity:
            return
        n = len(self.durations)
        median = (self.durations[(n - 1) // 2] + self.durations[n // 2]) / 2
        threshold = max(self.o["spec_factor"] * median, self.o["spec_min_seconds"])
        now = time.monotonic()
        for st in list(self.live.values()):
            if st.speculated or len(st.futures) != 1:
                continue
            (dkey,) = st.futures
            since, worker = self.started.get(dkey, (None, None))
            if since is None or now - since <= threshold:
                continue
            others = [w for w in self.workers if w != worker and w not in st.bad_workers]
            if not others:
                continue
            st.speculated = True
            self.result.speculated += 1
            self.submit(st, speculative=True, workers=others, loose=False)
            if len(self.inflight) >= capacity:
                return

    # -- progress

    def tick_bar(self, n):
        if self.bar is None:
            return
        self.bar.update(n)
        now = time.monotonic()
        if now < self.next_postfix:
            return
        self.next_postfix = now + 0.5
        elapsed = max(now - self.t0, 1e-6)
        t = self.result.totals
        post = {}
        samples = t.get("samples_in", t.get("samples_out"))
        if samples is not None:
            post["samples/s"] = f"{samples / elapsed:.0f}"
        nbytes = t.get("bytes_in", t.get("bytes_out"))
        if nbytes is not None:
            post["MB/s"] = f"{nbytes / elapsed / 1e6:.1f}"
        if self.result.skipped:
            post["skipped"] = self.result.skipped
        if self.result.failed:
            post["failed"] = len(self.result.failed)
        if post:
            self.bar.set_postfix(post, refresh=False)

    # -- main loop

    def run(self) -> JobResult:
        if self.o["progress"] and sys.stderr.isatty():
            from tqdm import tqdm

            from tarproc.progress import bar_width_options

            self.bar = tqdm(total=self.result.total or None, desc=self.o["desc"],
                            unit=" " + self.o["desc"], file=sys.stderr,
                            mininterval=0.5, **bar_width_options(sys.stderr))
        if self.o["speculation"]:
            _listeners[self.job] = self.on_start
            self.client.subscribe_topic(_START_TOPIC, _dispatch_start)
        finished = False
        try:
            self.refresh_workers(force=True)
            tick = 0.25 if self.o["speculation"] else 2.0
            while True:
                self.fill()
                if not self.inflight and self.exhausted:
                    break
                try:
                    batch = [self.done_q.get(timeout=tick)]
                except queue.Empty:
                    batch = []
                while True:
                    try:
                        batch.append(self.done_q.get_nowait())
                    except queue.Empty:
                        break
                for fut, rec in self.collect(batch):
                    if fut.key in self.inflight:
                        self.handle(fut, rec)
                self.refresh_workers()
                self.speculate()
            finished = True
        finally:
            _listeners.pop(self.job, None)
            if not finished and self.inflight:
                try:
                    self.client.cancel([st.futures[k] for k, (st, _) in self.inflight.items()
                                        if k in st.futures])
                except Exception:  # noqa: BLE001 - already failing
                    pass
            self.inflight.clear()
            self.live.clear()
            if self.bar is not None:
                self.bar.close()
        self.result.total = max(self.result.total, self.counted)
        self.result.seconds = time.monotonic() - self.t0
        self.result.items.sort(key=lambda r: r["index"])
        return self.result


def _numbered(items, keys, shuffle, seed):
    """(index, key, item) triples in submission order, and the total when it is known."""
    if keys is None:
        key_of = str
    elif callable(keys):
        key_of = keys
    else:
        key_of = None
        keys = list(keys)
    if shuffle or key_of is None:
        items = list(items)
    total = len(items) if hasattr(items, "__len__") else None
    if key_of is None:
        if len(keys) != len(items):
            raise TarprocError(f"{len(keys)} keys for {len(items)} items")
        triples = [(i, str(k), it) for i, (k, it) in enumerate(zip(keys, items))]
    else:
        triples = ((i, str(key_of(it)), it) for i, it in enumerate(items))
    if shuffle:
        triples = list(triples)
        random.Random(seed).shuffle(triples)

    def checked():
        seen = set()
        for index, key, item in triples:
            if key in seen:
                raise TarprocError(f"duplicate item key {key!r}: keys name logs and results, "
                                   f"give unique keys=")
            seen.add(key)
            yield index, key, item

    return checked(), total


def run_items(fn, items, *, keys=None, cluster=None, workers=None, retries=2, window=None,
              is_done=None, force=False, shuffle=False, seed=None, speculation=True,
              spec_factor=3.0, spec_min_seconds=10.0, progress=True, desc="items",
              log_dir=None, reduce=None, on_result=None) -> JobResult:
    """Run ``fn(item)`` once per item on a Dask cluster and return a :class:`JobResult`.

    fn
        Called on a worker with one item. Its return value: a ``dict`` is the item's
        statistics (numbers such as ``samples_in``, ``samples_out``, ``bytes_in``,
        ``bytes_out`` are summed into ``totals`` and drive the progress rates; a ``"log"``
        text goes to the item's log file); anything else is kept as the item's ``value``.
        Must be idempotent and commit its output atomically (it may run twice).
    items
        Any iterable; consumed lazily (not with ``shuffle`` or a key sequence).
    keys
        Stable unique names for the items (results, logs): a function ``item -> str`` or a
        sequence parallel to ``items``; default ``str(item)``.
    cluster, workers
        Where to run (see :mod:`tarproc.jobs.cluster`): ``None`` starts a local cluster of
        ``workers`` processes (default one per core) for this call; an address connects; a
        ``distributed.Client`` or :class:`~tarproc.jobs.cluster.Cluster` is used and left open.
    retries
        How often an item whose ``fn`` raised is tried again, on another worker where
        possible. An item whose task killed its workers (Dask's ``KilledWorker``, after the
        scheduler's own ``allowed-failures`` retries) is not retried further.
    window
        Most tasks in flight at once; default ``max(8, 2 * worker threads + 8)``, following
        the cluster as workers come and go.
    is_done, force
        ``is_done(item) -> bool`` is asked on the driver before submitting; true means skip
        (counted in ``skipped``) unless ``force``. Use it to resume an interrupted run.
    shuffle, seed
        Submit in a random (seeded) order, so partial progress is representative.
    speculation, spec_factor, spec_min_seconds
        An item running longer than ``spec_factor`` times the median run time of finished
        items and longer than ``spec_min_seconds``, while a worker thread is idle, gets one
        speculative copy on a different worker; the first copy to finish wins and the other
        is cancelled. ``speculative`` in the item's statistics says the copy won.
    progress, desc
        A tqdm bar on stderr, shown when ``progress`` and stderr is a terminal (so logs and
        pipes stay clean); ``desc`` labels the bar, the summary (``"8 shards: ..."``) and the
        Dask task names. ``progress=False`` also suppresses the cluster line on stderr.
    log_dir
        Writes ``log_dir/<key>.log`` for each item that has something to say: the ``"log"``
        text of its statistics and the tracebacks of failed attempts (only such items get a
        file; keys unsafe as file names are sanitised and suffixed with a short hash).
    reduce
        ``reduce(a, b) -> combined``, associative and commutative (e.g. ``operator.add``).
        ``fn`` then returns ``(key, value)`` pairs: one tuple, a list or generator of them, or
        a mapping such as a ``Counter``. Values are combined per key on the worker, then across
        items on the driver; the result is ``JobResult.reduced``, a ``{key: value}`` dict::

            def words(path):
                return Counter(open(path).read().split())
            run_items(words, paths, reduce=operator.add).reduced   # {"the": 1234, ...}

    on_result
        ``on_result(record)`` is called on the driver for each finished (done or failed) item
        with its statistics dict, as items complete (e.g. to write progress elsewhere).
    """
    if retries < 0:
        raise ValueError("retries must be >= 0")
    if window is not None and int(window) < 1:
        raise ValueError("window must be >= 1")
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    source, total = _numbered(items, keys, shuffle, seed)
    opts = dict(retries=int(retries), window=window, is_done=is_done, force=force,
                speculation=bool(speculation), spec_factor=float(spec_factor),
                spec_min_seconds=float(spec_min_seconds), progress=progress, desc=str(desc),
                log_dir=log_dir, reduce=reduce, on_result=on_result)
    with connect(cluster, workers=workers, quiet=not progress) as client:
        return _Job(client, fn, source, total, opts).run()
